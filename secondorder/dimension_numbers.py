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
  """A leaf's axes split into batch, reduction and output axes (all non-negative).

  ``reduction`` is empty for a stack of vectors (each batch slice one vector).
  """

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
  def vectors(self) -> bool:
    """Whether every layer is a vector (no reduction axis)."""
    return not self.reduction

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


def _axes_tuple(value: Any, name: str, where: str, allow_empty: bool = False
                ) -> tuple[int, ...]:
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return (int(value),)
  if isinstance(value, Sequence) and not isinstance(value, str) and (
      value or allow_empty) and all(
          isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in value):
    return tuple(int(a) for a in value)
  what = "a sequence of ints (possibly empty)" if allow_empty else "a non-empty sequence of ints"
  raise ValueError(f"{where}: {name} must be an int or {what}, got {value!r}.")


def leaf_axes(spec: MuonDimensionNumbers, shape: Sequence[int], path: str = "<leaf>"
              ) -> LeafAxes:
  """Validates ``spec`` against a leaf of ``shape`` and splits its axes.

  An empty ``reduction_axis`` (``MuonDimensionNumbers(reduction_axis=(), output_axis=1)``)
  declares a stack of vectors: every batch slice is one vector over the output axes, read as
  a ``[B, 1, O]`` matrix stack (a scan-stacked bias or norm scale ``[L, d]``). The output
  side may not be empty.

  Args:
    spec: the leaf's dimension numbers.
    shape: the leaf's shape.
    path: the leaf's name in error messages.

  Returns:
    The leaf's :class:`LeafAxes` (axes made non-negative).

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
  red = _axes_tuple(spec.reduction_axis, "reduction_axis", where, allow_empty=True)
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


# --- Deriving dimension numbers from a Flax model ------------------------------------------
#
# Flax records no stacking in a parameter's metadata (an `nnx.vmap` / `nnx.scan` / `nn.scan`
# leaf is a plain array with one more axis), but each layer knows its own kernel's layout:
# `Linear` / `Dense` `[in, out]`, `LinearGeneral` / `DenseGeneral`
# `[*batch, *in_features, *out_features]`, `Conv` `[*kernel_size, in, out]`, `Embed`
# `[num_embeddings, features]`. A stored kernel with more axes than its layer's own kernel is
# a stack; where the stack axes sit is declared by `stack_axis` (default 0, where
# `nnx.vmap`, `nnx.scan` and `nn.scan` put them unless told otherwise) and checked against
# the shapes, never searched for.

_KernelLayout = tuple[int, int, int]   # (batch, reduction, output) axis counts of one layer


def _stacked_spec(shape: tuple[int, ...], layer_shape: tuple[int, ...],
                  layout: _KernelLayout, stack_axis: int, path: str
                  ) -> MuonDimensionNumbers:
  """The spec of a stored kernel of `shape` whose layer's own kernel is `layer_shape`."""
  n_batch, n_red, n_out = layout
  extra = len(shape) - len(layer_shape)
  where = (f"{path}: stored shape {shape}, the layer's own kernel {layer_shape} "
           f"(stack_axis={stack_axis})")
  if extra < 0:
    raise ValueError(f"{where}: the stored kernel has fewer axes than the layer's.")
  start = stack_axis if stack_axis >= 0 else len(layer_shape) + 1 + stack_axis
  if not 0 <= start <= len(layer_shape):
    raise ValueError(f"{where}: stack_axis is out of range.")
  stack = tuple(range(start, start + extra))
  kept = tuple(a for a in range(len(shape)) if a not in stack)
  if tuple(shape[a] for a in kept) != tuple(layer_shape):
    raise ValueError(f"{where}: removing the stack axes {stack} does not leave the layer's "
                     "kernel; pass the stack_axis the stacking transform used "
                     "(its out_axes / variable_axes).")
  red = kept[n_batch:n_batch + n_red]
  out = kept[n_batch + n_red:]
  assert len(out) == n_out, (where, layout)
  return MuonDimensionNumbers(red if len(red) != 1 else red[0],
                              out if len(out) > 1 else out[0])


def _stacked_vector_spec(shape: tuple[int, ...], extra: int, stack_axis: int, path: str
                         ) -> MuonDimensionNumbers | None:
  """``MuonDimensionNumbers((), axis)`` for a stack of 1-D vectors (a scan-stacked bias or
  norm scale) with ``extra`` stack axes at ``stack_axis``; None when the layer's own
  parameter is not 1-D or not stacked (the methods' default reads it as it is)."""
  if extra <= 0 or len(shape) - extra != 1:
    return None
  return _stacked_spec(shape, tuple(d for i, d in enumerate(shape)
                                    if not _in_stack(i, extra, stack_axis)),
                       (0, 0, 1), stack_axis, path)


def _in_stack(axis: int, extra: int, stack_axis: int) -> bool:
  """Whether ``axis`` of a stored parameter with one own axis is one of its stack axes."""
  start = stack_axis if stack_axis >= 0 else 2 + stack_axis
  return start <= axis < start + extra


def _nnx_kernel_layouts(module: Any) -> dict[str, tuple[tuple[int, ...], _KernelLayout]]:
  """{attribute: (the layer's own kernel shape, its layout)} of a known NNX layer."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  if isinstance(module, nnx.Linear):
    return {"kernel": ((module.in_features, module.out_features), (0, 1, 1))}
  if isinstance(module, nnx.LinearGeneral):
    batch = tuple(module.batch_axis.values())
    return {"kernel": ((*batch, *module.in_features, *module.out_features),
                       (len(batch), len(module.in_features), len(module.out_features)))}
  if isinstance(module, nnx.Conv):
    spatial = tuple(module.kernel_size)
    shape = (*spatial, module.in_features // module.feature_group_count, module.out_features)
    return {"kernel": (shape, (0, len(spatial) + 1, 1))}
  if isinstance(module, nnx.Embed):
    return {"embedding": ((module.num_embeddings, module.features), (0, 1, 1))}
  return {}


def _nnx_vector_layer(module: Any) -> bool:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return isinstance(module, (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Embed, nnx.LayerNorm,
                             nnx.RMSNorm, nnx.BatchNorm, nnx.GroupNorm))


def _path_key(path) -> tuple[str, ...]:
  """A key path of jax.tree_util as a tuple of names (attribute, key or index)."""
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
  return tuple(names)


def _specs_like(params: Any, specs: dict, unknown: dict, what: str, on_unknown: str) -> Any:
  """`params` with each leaf replaced by its spec (None where none applies)."""
  if on_unknown not in ("raise", "none"):
    raise ValueError(f"on_unknown must be 'raise' or 'none', got {on_unknown!r}.")

  def pick(path, leaf):
    key = _path_key(path)
    if key not in specs and key[-1:] == ("value",):   # an nnx.Variable's array
      key = key[:-1]
    if key in specs:
      return specs[key]
    if key not in unknown and np.ndim(leaf) >= 2:
      unknown[key] = tuple(np.shape(leaf))
    return None

  tree = jax.tree_util.tree_map_with_path(pick, params)
  if unknown and on_unknown == "raise":
    listed = ", ".join(f"{'/'.join(k)} {s}" for k, s in sorted(unknown.items()))
    raise ValueError(
        f"{what}: no layer that Flax knows how to read owns these parameters of rank >= 2, "
        f"so their axes are unknown: {listed}. Give them dimension numbers by hand (edit the "
        "returned tree), or pass on_unknown='none' to leave them to each method's default.")
  return tree


def dimension_numbers_from_nnx(model: Any, *, stack_axis: int = 0, wrt: Any = None,
                               on_unknown: str = "raise") -> Any:
  r"""`weight_dimension_numbers` for a Flax NNX model, read from its layers.

  Every kernel of a layer whose layout Flax defines gets a `MuonDimensionNumbers`:
  `nnx.Linear` ``[in, out]`` -> ``(0, 1)``; `nnx.LinearGeneral` (and so
  `nnx.MultiHeadAttention`'s query/key/value ``[d, heads, head_dim]`` -> ``(0, (1, 2))`` and
  output ``[heads, head_dim, d]`` -> ``((0, 1), 2)``) ``[*batch, *in, *out]`` -> its in and
  out axes, its `batch_axis` axes being batch axes; `nnx.Conv` ``[*kernel_size, in, out]``
  -> ``((*spatial, in), out)``, the convolution as the ``(k·in) × out`` matrix it applies;
  `nnx.Embed` ``[num_embeddings, features]`` -> ``(0, 1)``. A stored kernel with more axes
  than its layer's (layers created under `nnx.vmap` and run with `nnx.scan`) has them as
  batch axes, at `stack_axis`.

  A stacked 1-D parameter of those layers and of the norms (`nnx.LayerNorm`, `RMSNorm`,
  `BatchNorm`, `GroupNorm`), a bias or scale ``[L, d]``, gets an empty reduction side,
  ``MuonDimensionNumbers((), 1)``: L independent vectors, which each method treats as it
  treats a 1-D parameter of the unrolled model. Unstacked biases and scales, and those that
  are not vectors in one layer (a `LinearGeneral` bias ``[heads, head_dim]``), get None
  (each method's default). A parameter of rank >= 2 that no known layer owns raises
  (`on_unknown="raise"`) rather than being guessed. (`optax.contrib.muon` reads an empty
  reduction side as L matrices of one row each and orthogonalises them; for Muon, replace
  those specs by None to keep its Adam on the vectors.)

  Args:
    model: the NNX module (not its state: the layers' types and attributes are what is
      read).
    stack_axis: where the stacking transforms put the layer axes (`out_axes` of
      `nnx.vmap`, default 0). Checked against every stacked kernel's shape.
    wrt: the filter of the optimized state (default `nnx.Param`), as in
      `nnx.state(model, wrt)`; the result has that state's structure.
    on_unknown: "raise" (default) or "none" (leave unknown parameters to the defaults).

  Returns:
    A pytree like `nnx.state(model, wrt)` (an `nnx.State` whose variables hold a
    `MuonDimensionNumbers` or None), for any method's `weight_dimension_numbers` when the
    optimized params are that state; `nnx.to_pure_dict` of it matches pure-dict params.

  Raises:
    ValueError: naming the path and shapes, when a kernel does not fit its layer with the
      given `stack_axis`, or (with `on_unknown="raise"`) when a parameter's axes are unknown.

  Example:
    >>> from flax import nnx
    >>> import secondorder as so
    >>> model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    >>> dims = so.dimension_numbers_from_nnx(model)
    >>> dims["kernel"].get_value()
    MuonDimensionNumbers(reduction_axis=0, output_axis=1)
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  specs, unknown = {}, {}
  owned = set()
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Module):
      continue
    path = tuple(str(p) for p in path)
    extra = None  # stack axes of this layer's parameters (None: no kernel to tell)
    for name, (layer_shape, layout) in _nnx_kernel_layouts(node).items():
      shape = tuple(np.shape(getattr(node, name).get_value()))
      specs[path + (name,)] = _stacked_spec(shape, layer_shape, layout, stack_axis,
                                            "/".join(path + (name,)))
      extra = len(shape) - len(layer_shape)
    if _nnx_vector_layer(node):
      for n, v in vars(node).items():
        if not isinstance(v, nnx.Variable) or path + (n,) in specs:
          continue
        owned.add(path + (n,))
        shape = tuple(np.shape(v.get_value()))
        # A norm's own parameters are vectors: every further axis is a stack axis.
        n_extra = len(shape) - 1 if extra is None else extra
        spec = _stacked_vector_spec(shape, n_extra, stack_axis, "/".join(path + (n,)))
        if spec is not None:
          specs[path + (n,)] = spec
  for key in owned - set(specs):
    specs[key] = None
  params = nnx.state(model, nnx.Param if wrt is None else wrt)
  return _specs_like(params, specs, unknown, "dimension_numbers_from_nnx", on_unknown)


def _linen_kernel_layout(module: Any, variables: dict
                         ) -> tuple[str, tuple[int, ...], _KernelLayout] | None:
  """(param name, the layer's own kernel shape, layout) of a known linen layer."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  params = variables.get("params", {})
  if isinstance(module, nn.Embed) and "embedding" in params:
    return "embedding", tuple(params["embedding"].shape), (0, 1, 1)
  if "kernel" not in params:
    return None
  shape = tuple(params["kernel"].shape)
  if isinstance(module, nn.Dense):
    return "kernel", shape, (0, 1, 1)
  if isinstance(module, nn.DenseGeneral):
    count = lambda x: len(x) if isinstance(x, (tuple, list)) else 1
    n_out = count(module.features)
    n_batch = len(module.batch_dims) if isinstance(module.batch_dims, (tuple, list)) else 1
    return "kernel", shape, (n_batch, len(shape) - n_batch - n_out, n_out)
  if isinstance(module, nn.Conv):
    return "kernel", shape, (0, len(shape) - 1, 1)
  return None


def dimension_numbers_from_linen(module: Any, variables: Any, *args: Any,
                                 stack_axis: int = 0, rngs: Any = None,
                                 on_unknown: str = "raise", **kwargs: Any) -> Any:
  r"""`weight_dimension_numbers` for a Flax linen model's params, read from its layers.

  linen params are plain arrays, so the layers are found by tracing one call of the model
  (`jax.eval_shape`, nothing is computed) and recording, for every `nn.Dense`,
  `nn.DenseGeneral` (and so `nn.MultiHeadDotProductAttention`), `nn.Conv` and `nn.Embed`
  that runs, its kernel's own shape. Inside `nn.scan` / `nn.vmap` a layer sees one slice of
  the stored kernel; the stored kernel's extra axes are the stacked layers, batch axes at
  `stack_axis` (where `variable_axes={'params': 0}` puts them). The specs are those of
  `dimension_numbers_from_nnx`: dense ``(0, 1)``, attention ``(0, (1, 2))`` and
  ``((0, 1), 2)``, convolution ``((*spatial, in), out)``, embedding ``(0, 1)``; a stacked
  bias or norm scale that is a vector in each layer gets ``MuonDimensionNumbers((), 1)``
  (independent vectors), an unstacked one None, and so do the parameters of modules that
  have no kernel (LayerNorm, BatchNorm) as long as they have rank <= 1 in each layer.

  Args:
    module: the linen module.
    variables: its variables (`{"params": ..., "batch_stats": ...}`) as `init` returns them.
    *args: example inputs of its call (shapes are what matter).
    stack_axis: where the stacking transforms put the layer axes (`variable_axes`).
    rngs: the call's PRNG keys (`{"dropout": key}`) if it needs any.
    on_unknown: "raise" (default) or "none", for params of rank >= 2 that no known layer
      owns.
    **kwargs: keyword arguments of the call (`train=True`).

  Returns:
    A pytree like `variables["params"]` with a `MuonDimensionNumbers` or None per leaf.

  Raises:
    ValueError: naming the path and shapes, as `dimension_numbers_from_nnx`.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import secondorder as so
    >>> model, x = nn.Dense(4), jnp.ones((2, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> so.dimension_numbers_from_linen(model, variables, x)["kernel"]
    MuonDimensionNumbers(reduction_axis=0, output_axis=1)
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  layers, layer_ranks, vector_shapes = {}, {}, {}

  def record(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    mod = context.module
    if mod.scope is None or "params" not in mod.variables:
      return out
    path = tuple(mod.scope.path)
    known = isinstance(mod, (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed, nn.LayerNorm,
                             nn.RMSNorm, nn.BatchNorm, nn.GroupNorm))
    for name, value in mod.variables["params"].items():
      if hasattr(value, "shape"):
        # A known layer's other params are its vectors (an attention bias is [heads, dim]).
        layer_ranks[path + (name,)] = 0 if known else len(value.shape)
        if known:
          vector_shapes[path + (name,)] = tuple(value.shape)  # as one layer sees it
    found = _linen_kernel_layout(mod, mod.variables)
    if found is not None:
      name, shape, layout = found
      layers[path + (name,)] = (shape, layout)
    return out

  def call(variables):
    with nn.intercept_methods(record):
      return module.apply(variables, *args, rngs=rngs, mutable=True, **kwargs)

  jax.eval_shape(call, variables)
  params = variables["params"]
  stored = {_path_key(p): tuple(np.shape(x))
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  specs = {}
  for key, (layer_shape, layout) in layers.items():
    if key not in stored:
      raise ValueError(f"dimension_numbers_from_linen: the layer at {'/'.join(key)} has no "
                       "parameter at that path in variables['params'].")
    specs[key] = _stacked_spec(stored[key], layer_shape, layout, stack_axis, "/".join(key))
  unknown = {}
  for key, shape in stored.items():
    if key in specs:
      continue
    # A known layer's vectors, and rank-1 params of any layer, whatever their stacking.
    if layer_ranks.get(key, len(shape)) >= 2:
      unknown[key] = shape
    own = vector_shapes.get(key)
    specs[key] = None if own is None else _stacked_vector_spec(
        shape, len(shape) - len(own), stack_axis, "/".join(key))
  return _specs_like(params, specs, unknown, "dimension_numbers_from_linen", on_unknown)
