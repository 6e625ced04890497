"""Which axes of a parameter are a matrix's rows, columns and independent layers.

A transform that looks inside a leaf's shape (Shampoo's factors, SOAP's eigenbases,
AdaHessian's averaging) reads the leaf through *dimension numbers*, never through its rank
alone. The convention is optax's :class:`optax.contrib.MuonDimensionNumbers`: a
``reduction_axis`` (the input side of ``y = x W``, one axis or several) and an ``output_axis``
(one or several); every other axis is a *batch* axis, an independent layer (the layer axis of
``nnx.scan`` / ``nn.scan`` stacks). A leaf ``[L, d_in, d_out]`` with
``MuonDimensionNumbers(1, 2)`` is L independent ``d_in x d_out`` matrices; attention's
``[d, heads, head_dim]`` kernel with ``MuonDimensionNumbers(0, (1, 2))`` is one
``d x (heads * head_dim)`` matrix.

``weight_dimension_numbers`` arguments are a pytree with the params' structure whose leaves
are dimension numbers or ``None`` (the method's rank-based default for that leaf), or a
callable ``params -> such a pytree``, or ``None`` (the default for every leaf).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import numpy as np
from optax.contrib import MuonDimensionNumbers

__all__ = ["MuonDimensionNumbers", "LeafAxes", "leaf_axes", "resolve_leaf_axes",
           "WeightDimensionNumbers"]

WeightDimensionNumbers = Union[Any, Callable[[Any], Any], None]


def _is_spec(x: Any) -> bool:
  return x is None or isinstance(x, MuonDimensionNumbers)


@dataclasses.dataclass(frozen=True)
class LeafAxes:
  """A leaf's axes split into batch, reduction and output axes (all non-negative)."""

  shape: tuple[int, ...]
  batch: tuple[int, ...]
  reduction: tuple[int, ...]
  output: tuple[int, ...]

  @property
  def matrix_shape(self) -> tuple[int, int, int]:
    """``(B, R, O)``: the number of independent layers, rows and columns."""
    size = lambda axes: math.prod(self.shape[a] for a in axes)
    return size(self.batch), size(self.reduction), size(self.output)

  @property
  def _transpose(self) -> tuple[int, ...]:
    return self.batch + self.reduction + self.output

  def to_matrices(self, x: jax.Array) -> jax.Array:
    """``x`` of the leaf's shape as a stack ``[B, R, O]`` of matrices."""
    return x.transpose(self._transpose).reshape(self.matrix_shape)

  def from_matrices(self, y: jax.Array) -> jax.Array:
    """The inverse of :meth:`to_matrices`."""
    perm = self._transpose
    y = y.reshape(tuple(self.shape[a] for a in perm))
    return y.transpose(tuple(np.argsort(perm)))


def _axes_tuple(value: Any, name: str, where: str) -> tuple[int, ...]:
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return (int(value),)
  if isinstance(value, Sequence) and value and all(
      isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in value):
    return tuple(int(a) for a in value)
  raise ValueError(f"{where}: {name} must be an int or a non-empty sequence of ints, "
                   f"got {value!r}.")


def leaf_axes(spec: MuonDimensionNumbers, shape: Sequence[int], path: str = "<leaf>"
              ) -> LeafAxes:
  """Validates ``spec`` against a leaf of ``shape`` and splits its axes.

  Raises:
    ValueError: naming ``path``, the shape and the spec, when an axis is out of range,
      repeated, or shared between the reduction and output sides.
  """
  shape = tuple(int(d) for d in shape)
  where = f"weight_dimension_numbers for {path} (shape {shape}, spec {spec!r})"
  if not isinstance(spec, MuonDimensionNumbers):
    raise TypeError(f"{where}: expected optax.contrib.MuonDimensionNumbers or None, "
                    f"got {type(spec).__name__}.")
  ndim = len(shape)
  red = _axes_tuple(spec.reduction_axis, "reduction_axis", where)
  out = _axes_tuple(spec.output_axis, "output_axis", where)
  for a in red + out:
    if not -ndim <= a < ndim:
      raise ValueError(f"{where}: axis {a} does not exist in a rank-{ndim} leaf.")
  red = tuple(a % ndim for a in red)
  out = tuple(a % ndim for a in out)
  if len(set(red)) != len(red) or len(set(out)) != len(out):
    raise ValueError(f"{where}: an axis is repeated.")
  if set(red) & set(out):
    raise ValueError(f"{where}: reduction axes {red} and output axes {out} overlap.")
  batch = tuple(a for a in range(ndim) if a not in red and a not in out)
  return LeafAxes(shape, batch, red, out)


def resolve_leaf_axes(weight_dimension_numbers: WeightDimensionNumbers, params: Any
                      ) -> list[LeafAxes | None]:
  """One :class:`LeafAxes` (or ``None``) per leaf of ``params``, in ``jax.tree.leaves`` order.

  Args:
    weight_dimension_numbers: ``None``, a pytree of ``MuonDimensionNumbers`` / ``None`` with
      the structure of ``params``, or a callable of ``params`` returning one.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``; only shapes are read).

  Raises:
    ValueError: when the tree does not match ``params`` or a spec does not fit its leaf.
  """
  paths_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  if weight_dimension_numbers is None:
    return [None] * len(paths_leaves)
  spec_tree = (weight_dimension_numbers(params) if callable(weight_dimension_numbers)
               else weight_dimension_numbers)
  treedef = jax.tree.structure(params)
  try:
    specs = treedef.flatten_up_to(spec_tree)
  except (ValueError, TypeError) as e:
    raise ValueError("weight_dimension_numbers must have the structure of the params "
                     f"(with MuonDimensionNumbers or None at each leaf): {e}") from None
  out = []
  for (path, leaf), spec in zip(paths_leaves, specs):
    if spec is None:
      out.append(None)
      continue
    out.append(leaf_axes(spec, np.shape(leaf), jax.tree_util.keystr(path) or "<root>"))
  return out
