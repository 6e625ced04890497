"""Dense layers with any number of input and output axes: `Dense`/`Linear`, `DenseGeneral`/
`LinearGeneral` (and so attention's query, key, value and output projections).

A kernel `[d1..dk, e1..em]` contracting input axes `axis` of `x` is one `(∏d) x (∏e)`
matrix: the rows of A are `x` with the contracted axes moved last and flattened (in kernel
order), every other axis of `x` a position (an extra example); the output axes are the
trailing axes of the layer's output, flattened into S's side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from secondorder.capture.types import LayerStats, ProjectedLayerStats

KIND = "dense"


def _normalize(axis, ndim: int) -> tuple[int, ...]:
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(a % ndim for a in axis)


def describe(x: jax.Array, axis, batch_axes) -> tuple[tuple[int, ...], int] | str:
  """The contracted input axes and their number, or why the call cannot be covered.

  Args:
    x: the layer's input.
    axis: the contracted axis or axes of `x`.
    batch_axes: the layer's kernel batch axes (`batch_dims` / `batch_axis`), which K-FAC
      does not cover.

  Returns:
    `(contracted axes of x, number of kernel input axes)`, or a reason string.
  """
  if batch_axes:
    return "a dense layer with kernel batch axes (batch_dims / batch_axis)"
  if jnp.ndim(x) < 2:
    return "an unbatched input (rank < 2)"
  axes = _normalize(axis, jnp.ndim(x))
  return axes, len(axes)


def input_rows(axes: tuple[int, ...], x: jax.Array) -> jax.Array:
  """`[N, ∏d]`: the contracted axes of `x` moved last, in kernel order, then flattened.

  Args:
    axes: the contracted axes of `x` (from `describe`).
    x: the layer's input.

  Returns:
    One row per position of the other axes.
  """
  rest = tuple(a for a in range(x.ndim) if a not in axes)
  x = x.transpose(rest + tuple(axes))
  return x.reshape(-1, _prod(x.shape[len(rest):]))


def positions(axes: tuple[int, ...], x: jax.Array) -> tuple[int, ...]:
  """The shape of the row index of `input_rows` (every axis of `x` not contracted)."""
  return tuple(d for a, d in enumerate(x.shape) if a not in axes)


def _prod(shape) -> int:
  n = 1
  for d in shape:
    n *= d
  return n


def slot_shapes(layer) -> tuple[tuple[int, ...], ...]:
  """Zero slots of a Kronecker pair's taps (dense or convolution): A, S and the uses."""
  return (layer.factor_shape(layer.a_dim), layer.factor_shape(layer.s_dim),
          layer.factor_shape(0)[:-2])


def statistics(layer, first: tuple, fisher: tuple, m: int):
  """`LayerStats(Â = (1/R) Σ_uses Â_use, Ŝ = M Σ ĝĝᵀ, E = M Σ_n P_n²)` from the slots'
  cotangents (E only for a layer captured with EK-FAC bases: `taps.tap_projected`).

  Args:
    layer: the covered layer.
    first: the slots' cotangents of the gradient pass (`(A, S, uses)`).
    fisher: those of the Fisher pass.
    m: M, the number of examples of the model's output.

  Returns:
    The layer's `LayerStats`.
  """
  del layer
  uses = jnp.maximum(first[2], 1)[..., None, None]
  a, s = first[0] / uses, m * fisher[1]
  if len(fisher) > 5:   # EK-FAC bases (slots A, S, uses, Q_A, Q_S, E): E from the Fisher pass
    return ProjectedLayerStats(a=a, s=s, e=m * fisher[5])
  return LayerStats(a=a, s=s)
