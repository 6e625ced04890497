"""A padding mask: which positions of a sequence batch are examples, and which are padding.

A batch of sequences of unequal length is padded to one length `T`; the loss averages over
the M' real tokens only (the mask's sum), and so must the Fisher. With `mask` of the
output's example shape (`[B, T]` for outputs `[B, T, C]`), the capture

* draws (or, for the exact Fisher, sums) output cotangents at the real tokens only, each
  scaled as the gradient of the masked mean loss, and reports ``Ŝ = M' Σ ĝĝᵀ``;
* averages every input factor over the real positions only: a layer whose input rows are
  indexed by positions ``[B, T, ...]`` weights each row by the mask at its ``(b, t)``
  (``Â = Σ_n w_n a_nᵀa_n / Σ_n w_n``), and an embedding counts only the real tokens.

A layer's positions must start with the mask's axes (every dense, embedding, norm and
sequence convolution of a sequence model does); one that does not is an error naming it,
never silently averaged over the padding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["example_weights", "positive", "row_weights"]


def positive(total: jax.Array) -> jax.Array:
  """`total`, or 1 where it is 0 (a divisor for a weighted mean whose weights are all 0)."""
  return jnp.where(total > 0, total, 1.0)


def example_weights(mask: jax.Array, out: jax.Array) -> jax.Array:
  """The mask as weights `out.shape[:-1]` in `out`'s dtype (at least float32).

  Args:
    mask: booleans or 0/1 numbers, one per example of the output.
    out: the model's output `[..., C]` (or its `jax.ShapeDtypeStruct`).

  Returns:
    The weights.

  Raises:
    ValueError: when `mask`'s shape is not the output's example shape.
  """
  want = tuple(out.shape[:-1]) if len(out.shape) > 1 else ()
  if tuple(jnp.shape(mask)) != want:
    raise ValueError(f"mask has shape {tuple(jnp.shape(mask))}; expected the output's "
                     f"example shape {want} (the output is {tuple(out.shape)}: one entry per "
                     "example, every axis but the last).")
  dtype = jnp.promote_types(out.dtype, jnp.float32)
  return jnp.asarray(mask).astype(dtype)


def row_weights(mask: jax.Array, layer: str, positions: tuple[int, ...]) -> jax.Array:
  """One weight per input row of a layer whose rows are indexed by `positions`.

  Args:
    mask: the capture's padding mask (`example_weights`).
    layer: the layer's path, for the error.
    positions: the shape of the layer's row index (`[B, T]`, `[B, T, H]`, ...), the rows
      being that index flattened in order.

  Returns:
    `[∏positions]`: the mask at each row's leading axes.

  Raises:
    ValueError: when the positions do not start with the mask's axes.
  """
  positions = tuple(positions)
  if positions[:mask.ndim] != tuple(mask.shape):
    raise ValueError(
        f"layer {layer}: its inputs are indexed by positions {positions}, which do not start "
        f"with the padding mask's axes {tuple(mask.shape)}, so the mask cannot say which of "
        "its inputs are padding. Capture without mask=, or exclude the layer from K-FAC.")
  extra = positions[mask.ndim:]
  w = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * len(extra)), positions)
  return w.reshape(math.prod(positions))
