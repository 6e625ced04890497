"""Identity functions whose backward pass reports a layer's K-FAC statistics.

A covered layer's input passes through `tap_inputs` and its output through `tap_outputs`.
Both are the identity forward; backward, they pass the cotangent through unchanged and, as
the cotangent of a zero *slot* argument, return the layer's statistic:

  input tap:   ∂/∂slot_a = Â_use = rowsᵀ rows / N,   ∂/∂count = 1
  output tap:  ∂/∂slot_s = Σ_rows ĝ ĝᵀ                 (ĝ the back-propagated output cotangent)

The statistics leave the model through `jax.vjp` with respect to the slots, never as values
stored during the forward pass: so `jax.checkpoint` / `nn.remat` / `nnx.remat`, `lax.scan`
and any other transformation around the layer see ordinary differentiable functions, and a
layer used several times accumulates every use (the sum of the cotangents).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def tap_inputs(x: jax.Array, slot: jax.Array, count: jax.Array,
               rows_fn: Callable[[jax.Array], jax.Array], with_bias: bool) -> jax.Array:
  """`x`, whose backward pass returns Â of this use for `slot` and 1 for `count`.

  Args:
    x: the layer's input.
    slot: zeros `[a_dim, a_dim]` in the statistics' dtype.
    count: a zero scalar in the statistics' dtype (counts the uses of the layer).
    rows_fn: `x -> [N, in]`, the layer kind's input rows.
    with_bias: append a constant 1 to every row.

  Returns:
    `x` unchanged.
  """

  @jax.custom_vjp
  def tap(x, slot, count):
    del slot, count
    return x

  def fwd(x, slot, count):
    del slot, count
    return x, x

  def bwd(x, ct):
    rows = rows_fn(jax.lax.stop_gradient(x)).astype(slot.dtype)
    if with_bias:
      rows = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)
    a = jnp.matmul(rows.T, rows, precision=_HIGHEST) / rows.shape[0]
    return ct, a, jnp.ones([], count.dtype)

  tap.defvjp(fwd, bwd)
  return tap(x, slot, count)


def tap_outputs(y: jax.Array, slot: jax.Array) -> jax.Array:
  """`y`, whose backward pass returns Σ ĝ ĝᵀ over its rows for `slot`.

  Args:
    y: the layer's output; its trailing axes (`slot`'s side in all) are the output units.
    slot: zeros `[s_dim, s_dim]` in the statistics' dtype.

  Returns:
    `y` unchanged.
  """
  side = slot.shape[-1]

  @jax.custom_vjp
  def tap(y, slot):
    del slot
    return y

  def fwd(y, slot):
    del slot
    return y, None

  def bwd(_, ct):
    g = ct.reshape(-1, side).astype(slot.dtype)
    return ct, jnp.matmul(g.T, g, precision=_HIGHEST)

  tap.defvjp(fwd, bwd)
  return tap(y, slot)
