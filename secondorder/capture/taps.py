"""Identity functions whose backward pass reports a layer's K-FAC statistics.

A covered layer's input passes through `tap_inputs` and its output through `tap_outputs`.
Both are the identity forward; backward, they pass the cotangent through unchanged and, as
the cotangent of a zero *slot* argument, return the layer's statistic:

  input tap:   ∂/∂slot_a = Â_use = rowsᵀ rows / N,   ∂/∂count = 1
  output tap:  ∂/∂slot_s = Σ_rows ĝ ĝᵀ                 (ĝ the back-propagated output cotangent)
  value tap:   ∂/∂slot = a statistic of the forward pass (an embedding's token counts)
  scale tap:   ∂/∂slot = Σ_rows per-feature outer products of (ĝ ⊙ x̂, ĝ)   (norm layers)
  projected:   ∂/∂slot = Σ_n (Σ_t Q_Aᵀa_{n,t} ĝ_{n,t}ᵀQ_S)²   (EK-FAC, dense layers)

The statistics leave the model through `jax.vjp` with respect to the slots, never as values
stored during the forward pass: so `jax.checkpoint` / `nn.remat` / `nnx.remat`, `lax.scan`
and any other transformation around the layer see ordinary differentiable functions, and a
layer used several times accumulates every use (the sum of the cotangents).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from secondorder.capture import padding

_HIGHEST = jax.lax.Precision.HIGHEST


def tap_inputs(x: jax.Array, slot: jax.Array, count: jax.Array,
               rows_fn: Callable[[jax.Array], jax.Array], with_bias: bool,
               weights: jax.Array | None = None) -> jax.Array:
  """`x`, whose backward pass returns Â of this use for `slot` and 1 for `count`.

  A layer made of G independent blocks (a grouped convolution) has rows `[N, G, in]`, a
  slot `[G, a_dim, a_dim]` and a count `[G]`: one Â per block. With `weights` (a padding
  mask, `secondorder.capture.padding`) Â is the weighted mean `Σ w aᵀa / Σ w`.

  Args:
    x: the layer's input.
    slot: zeros `[a_dim, a_dim]` (or `[G, a_dim, a_dim]`) in the statistics' dtype.
    count: a zero scalar (or `[G]`) in the statistics' dtype (counts the uses of the layer).
    rows_fn: `x -> [N, in]` (or `[N, G, in]`), the layer kind's input rows.
    with_bias: append a constant 1 to every row.
    weights: `[N]` row weights, or None for the plain mean.

  Returns:
    `x` unchanged.
  """

  @jax.custom_vjp
  def tap(x, slot, count, weights):
    del slot, count, weights
    return x

  def fwd(x, slot, count, weights):
    del slot, count
    return x, (x, weights)

  def bwd(res, ct):
    x, w = res
    rows = rows_fn(jax.lax.stop_gradient(x)).astype(slot.dtype)
    if with_bias:
      rows = jnp.concatenate([rows, jnp.ones(rows.shape[:-1] + (1,), rows.dtype)], axis=-1)
    if w is None:
      a = jnp.einsum("n...i,n...j->...ij", rows, rows, precision=_HIGHEST) / rows.shape[0]
      return ct, a, jnp.ones(count.shape, count.dtype), None
    w = jax.lax.stop_gradient(w).astype(slot.dtype)
    a = jnp.einsum("n...i,n...j->...ij", rows * w.reshape(w.shape + (1,) * (rows.ndim - 1)),
                   rows, precision=_HIGHEST)
    a = a / padding.positive(jnp.sum(w))
    return ct, a, jnp.ones(count.shape, count.dtype), jnp.zeros_like(w)

  tap.defvjp(fwd, bwd)
  return tap(x, slot, count, weights)


def tap_outputs(y: jax.Array, slot: jax.Array) -> jax.Array:
  """`y`, whose backward pass returns Σ ĝ ĝᵀ over its rows for `slot`.

  Args:
    y: the layer's output; its trailing axes (`slot`'s side in all, or G times it for a
      slot `[G, s_dim, s_dim]`, block-major) are the output units.
    slot: zeros `[s_dim, s_dim]` (or `[G, s_dim, s_dim]`) in the statistics' dtype.

  Returns:
    `y` unchanged.
  """
  rows = (-1,) + slot.shape[:-1]          # [N, s_dim] or [N, G, s_dim]

  @jax.custom_vjp
  def tap(y, slot):
    del slot
    return y

  def fwd(y, slot):
    del slot
    return y, None

  def bwd(_, ct):
    g = ct.reshape(rows).astype(slot.dtype)
    return ct, jnp.einsum("n...i,n...j->...ij", g, g, precision=_HIGHEST)

  tap.defvjp(fwd, bwd)
  return tap(y, slot)


def tap_value(y: jax.Array, value: jax.Array, slot: jax.Array, count: jax.Array) -> jax.Array:
  """`y`, whose backward pass returns `value` for `slot` and 1 for `count`.

  Reports a statistic the forward pass computed (for example an embedding's token
  frequencies, which need the integer inputs that have no cotangent).

  Args:
    y: any array on the layer's path (passed through unchanged).
    value: the statistic, shaped like `slot`.
    slot: zeros in the statistics' dtype.
    count: a zero scalar in the statistics' dtype (counts the uses of the layer).

  Returns:
    `y` unchanged.
  """

  @jax.custom_vjp
  def tap(y, value, slot, count):
    del value, slot, count
    return y

  def fwd(y, value, slot, count):
    del slot, count
    return y, value

  def bwd(value, ct):
    return (ct, jnp.zeros_like(value), jax.lax.stop_gradient(value).astype(slot.dtype),
            jnp.ones([], count.dtype))

  tap.defvjp(fwd, bwd)
  return tap(y, value, slot, count)


def tap_scale_shift(y: jax.Array, x_hat: jax.Array, slot: jax.Array,
                    feature_axes: tuple[int, ...], with_shift: bool) -> jax.Array:
  """`y = x̂ ⊙ γ (+ β)`, whose backward pass returns the per-feature blocks for `slot`.

  With per-row gradients u = ĝ ⊙ x̂ (of γ) and ĝ (of β), the slot's cotangent is, per
  feature j, `Σ_rows [u_j, ĝ_j]ᵀ [u_j, ĝ_j]` (`[features, 2, 2]`), or `Σ_rows u_j²`
  (`[features, 1, 1]`) without a shift.

  Args:
    y: the layer's output.
    x_hat: the normalised input (the factor γ multiplies), shaped like `y`.
    slot: zeros `[features, k, k]` in the statistics' dtype.
    feature_axes: the axes of `y` holding the features (flattened in order).
    with_shift: whether the layer has a shift β.

  Returns:
    `y` unchanged.
  """

  def rows(v):
    rest = tuple(a for a in range(v.ndim) if a not in feature_axes)
    v = v.transpose(rest + feature_axes)
    return v.reshape(-1, slot.shape[-3]).astype(slot.dtype)

  @jax.custom_vjp
  def tap(y, x_hat, slot):
    del x_hat, slot
    return y

  def fwd(y, x_hat, slot):
    del slot
    return y, x_hat

  def bwd(x_hat, ct):
    g = rows(ct)
    u = g * rows(jax.lax.stop_gradient(x_hat))
    per_row = jnp.stack([u, g], axis=-1) if with_shift else u[..., None]   # [N, F, k]
    blocks = jnp.einsum("nfi,nfj->fij", per_row, per_row, precision=_HIGHEST)
    return ct, jnp.zeros_like(x_hat), blocks

  tap.defvjp(fwd, bwd)
  return tap(y, x_hat, slot)


def tap_projected(y: jax.Array, x: jax.Array, q_a: jax.Array, q_s: jax.Array,
                  slot: jax.Array, rows_fn: Callable[[jax.Array], jax.Array],
                  with_bias: bool) -> jax.Array:
  """`y`, whose backward pass returns EK-FAC's per-example projected second moment.

  The example n's gradient of a dense layer is `Σ_t a_{n,t} ĝ_{n,t}ᵀ` over its positions t
  (every non-contracted input axis after the first); in the eigenbases its entries are
  `P_n = Σ_t (Q_Aᵀ a_{n,t})(Q_Sᵀ ĝ_{n,t})ᵀ`, formed from the projected rows without the
  per-example gradients in the parameters' basis. The slot's cotangent is `Σ_n P_n²`.

  Args:
    y: the layer's output (its trailing axes the output units, the others its rows).
    x: the layer's input (its first axis the examples); only read, never differentiated.
    q_a: `[a_dim, a_dim]`, the eigenbasis of A (columns), bias row included.
    q_s: `[s_dim, s_dim]`, the eigenbasis of S.
    slot: zeros `[a_dim, s_dim]` in the statistics' dtype.
    rows_fn: `x -> [N, in]`, the layer kind's input rows (example-major).
    with_bias: append a constant 1 to every row.

  Returns:
    `y` unchanged.
  """

  @jax.custom_vjp
  def tap(y, x, q_a, q_s, slot):
    del x, q_a, q_s, slot
    return y

  def fwd(y, x, q_a, q_s, slot):
    del slot
    return y, (x, q_a, q_s)

  def bwd(res, ct):
    x, q_a, q_s = res
    n = x.shape[0]
    rows = rows_fn(jax.lax.stop_gradient(x)).astype(slot.dtype)
    if with_bias:
      rows = jnp.concatenate([rows, jnp.ones(rows.shape[:-1] + (1,), rows.dtype)], axis=-1)
    pa = jnp.matmul(rows.reshape(n, -1, rows.shape[-1]),
                    jax.lax.stop_gradient(q_a).astype(slot.dtype), precision=_HIGHEST)
    ps = jnp.matmul(ct.reshape(n, -1, slot.shape[-1]).astype(slot.dtype),
                    jax.lax.stop_gradient(q_s).astype(slot.dtype), precision=_HIGHEST)
    if pa.shape[1] == 1:   # one row per example: Σ_n (p_a p_sᵀ)² = (p_a²)ᵀ p_s², no [N, a, s]
      e = jnp.einsum("nti,ntj->ij", pa * pa, ps * ps, precision=_HIGHEST)
    else:
      p = jnp.einsum("nti,ntj->nij", pa, ps, precision=_HIGHEST)
      e = jnp.sum(p * p, 0)
    return ct, jnp.zeros_like(x), jnp.zeros_like(q_a), jnp.zeros_like(q_s), e

  tap.defvjp(fwd, bwd)
  return tap(y, x, q_a, q_s, slot)
