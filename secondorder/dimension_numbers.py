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
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import numpy as np
from optax.contrib import MuonDimensionNumbers

__all__ = ["MuonDimensionNumbers", "LeafAxes", "leaf_axes", "plain_reading", "resolve_leaf_axes",
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
  treedef: Any = jax.tree.structure(params)  # jaxlib ships no stub for PyTreeDef
  try:
    specs = treedef.flatten_up_to(spec_tree)
  except (ValueError, TypeError) as e:
    raise ValueError("weight_dimension_numbers must have the structure of the params "
                     f"(with MuonDimensionNumbers or None at each leaf): {e}") from None
  out: list[LeafAxes | None] = []
  for (path, leaf), spec in zip(paths_leaves, specs):
    if spec is None:
      out.append(None)
      continue
    out.append(leaf_axes(spec, np.shape(leaf), jax.tree_util.keystr(path) or "<root>"))
  return out


# --- Deriving dimension numbers from a Flax model ------------------------------------------
#
# Flax records no stacking in a parameter's metadata (an `nnx.vmap` / `nnx.scan` / `nn.scan`
# leaf is a plain array with one more axis), but each layer knows its own kernel's layout.
# Which classes are layers, and how each one's kernel splits into a reduction side and an
# output side, is the table the K-FAC capture reads too (`secondorder.capture.registry`:
# `Linear` / `Dense` `[in, out]`, `LinearGeneral` / `DenseGeneral`
# `[*batch, *in_features, *out_features]`, `Einsum` by its equation, `Conv`
# `[*kernel_size, in, out]`, `Embed` `[num_embeddings, features]`; subclasses included). A
# stored kernel with more axes than its layer's own kernel is a stack; where the stack axes
# sit is declared by `stack_axis` (default 0, where `nnx.vmap`, `nnx.scan` and `nn.scan` put
# them unless told otherwise) and checked against the shapes, never searched for.

_Axes = tuple[tuple[int, ...], tuple[int, ...]]   # (reduction, output) axes of one layer


def _stacked_spec(shape: tuple[int, ...], layer_shape: tuple[int, ...], axes: _Axes,
                  stack_axis: int, path: str) -> MuonDimensionNumbers:
  """The spec of a stored kernel of `shape` whose layer's own kernel is `layer_shape`, read
  as `axes` (its reduction and output axes; any other axis of the layer is a batch axis)."""
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
  red = tuple(kept[a] for a in axes[0])
  out = tuple(kept[a] for a in axes[1])
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
                       ((), (0,)), stack_axis, path)


def _in_stack(axis: int, extra: int, stack_axis: int) -> bool:
  """Whether ``axis`` of a stored parameter with one own axis is one of its stack axes."""
  start = stack_axis if stack_axis >= 0 else 2 + stack_axis
  return start <= axis < start + extra


def _nnx_kernel_layouts(module: Any
                        ) -> tuple[Any, dict[str, tuple[tuple[int, ...], _Axes]]]:
  """(`module`'s entry of the layer table or None, {kernel attribute: (the layer's own
  kernel shape, its axes)}); no kernel for a norm, or for an Einsum whose equation is given
  only at its call or cannot be read (its kernel then gets the plain reading)."""
  from secondorder.capture import registry  # pylint: disable=g-import-not-at-top
  layer = registry.lookup(registry.NNX, module)
  if layer is None:
    return None, {}
  own = tuple(layer.own_shape(module)) if layer.own_shape is not None else None
  axes = None if own is None else registry.spec_axes(layer, module, own)
  if own is None or axes is None or isinstance(axes, str):
    return layer, {}
  return layer, {layer.kernel: (own, axes)}


def _path_key(path) -> tuple[str, ...]:
  """A key path of jax.tree_util as a tuple of names (attribute, key or index)."""
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
  return tuple(names)


_ON_UNKNOWN = ("plain", "raise", "none")


def plain_reading(shape: Sequence[int], own_shape: Sequence[int] | None = None,
                  stack_axis: int = 0) -> tuple[MuonDimensionNumbers, str]:
  """The dimension numbers of a parameter of rank >= 2 that no known layer owns, and why.

  A free matrix ``[m, n]`` is read as its own two axes, ``MuonDimensionNumbers(0, 1)``. A
  free parameter of rank >= 3 (a position table ``[1, N, D]``, a stack whose layout no
  layer declares) gets no matrix reading: ``MuonDimensionNumbers((), ndim - 1)``, vectors
  over its last axis, which each method treats as it treats a 1-D parameter (Adam's step in
  SOAP, the diagonal path in Shampoo). With `own_shape`, the shape one layer of a stack
  sees (linen's `nn.scan`), the reading is that of one layer, the extra axes at
  `stack_axis` being the stack.
  """
  own = tuple(shape if own_shape is None else own_shape)
  axes = ((0,), (1,)) if len(own) == 2 else ((), (len(own) - 1,))
  why = ("a free matrix, read as its own two axes" if len(own) == 2 else
         f"a free parameter of rank {len(own)}, no matrix reading (vectors over its last axis)")
  if len(own) < len(shape):
    try:
      spec = _stacked_spec(tuple(shape), own, axes, stack_axis, "")
      return spec, why + f", in each of the stacked layers (one layer sees {own})"
    except ValueError:
      own, axes = tuple(shape), ((), (len(shape) - 1,))
      why = f"a free parameter of rank {len(shape)}, no matrix reading (vectors over its last axis)"
  if not axes[0]:
    return MuonDimensionNumbers((), axes[1][0]), why
  return MuonDimensionNumbers(0, 1), why


def _specs_like(params: Any, specs: dict, unknown: dict, what: str, on_unknown: str,
                with_summary: bool, own_shapes: dict | None = None, stack_axis: int = 0
                ) -> Any:
  """`params` with each leaf replaced by its spec (None where none applies); with
  `with_summary`, also the text saying what was read plainly (`plain_reading`)."""
  if on_unknown not in _ON_UNKNOWN:
    raise ValueError(f"on_unknown must be one of {_ON_UNKNOWN}, got {on_unknown!r}.")
  plain = {}

  def pick(path, leaf):
    key = _path_key(path)
    if key not in specs and key[-1:] == ("value",):   # an nnx.Variable's array
      key = key[:-1]
    if key not in specs and key not in unknown and np.ndim(leaf) >= 2:
      unknown[key] = tuple(np.shape(leaf))
    if key in unknown and on_unknown == "plain":
      spec, why = plain_reading(unknown[key], (own_shapes or {}).get(key), stack_axis)
      plain[key] = why
      return spec
    return specs.get(key)

  tree = jax.tree_util.tree_map_with_path(pick, params)
  if unknown and on_unknown == "raise":
    listed = ", ".join(f"{'/'.join(k)} {s}" for k, s in sorted(unknown.items()))
    raise ValueError(
        f"{what}: no layer that Flax knows how to read owns these parameters of rank >= 2, "
        f"so their axes are unknown: {listed}. Give them dimension numbers by hand (edit the "
        "returned tree), or pass on_unknown='plain' (the default: a free matrix is its own "
        "two axes, anything else has no matrix reading) or 'none' (each method's default).")
  lines = [f"{what}: {len(plain)} parameters of rank >= 2 outside every known layer"
           + (", read plainly:" if plain else ".")]
  lines += [f"  {'/'.join(k)} {unknown[k]}: {why}" for k, why in sorted(plain.items())]
  summary = "\n".join(lines)
  if plain:
    logging.getLogger(__name__).info(summary)
  return (tree, summary) if with_summary else tree


def dimension_numbers_from_nnx(model: Any, *, stack_axis: int = 0, wrt: Any = None,
                               on_unknown: str = "plain", with_summary: bool = False) -> Any:
  r"""`weight_dimension_numbers` for a Flax NNX model, read from its layers.

  Every kernel of a layer whose layout Flax defines gets a `MuonDimensionNumbers`:
  `nnx.Linear` ``[in, out]`` -> ``(0, 1)``; `nnx.LinearGeneral` (and so
  `nnx.MultiHeadAttention`'s query/key/value ``[d, heads, head_dim]`` -> ``(0, (1, 2))`` and
  output ``[heads, head_dim, d]`` -> ``((0, 1), 2)``) ``[*batch, *in, *out]`` -> its in and
  out axes, its `batch_axis` axes being batch axes; `nnx.Conv` ``[*kernel_size, in, out]``
  -> ``((*spatial, in), out)``, the convolution as the ``(k·in) × out`` matrix it applies;
  `nnx.Embed` ``[num_embeddings, features]`` -> ``(0, 1)``; `nnx.Einsum` by its equation
  (the kernel letters contracted with the input on the reduction side, those emitted into
  the output on the output side, in the output's order, those kept in both batch axes:
  ``BTD,NDH->BTNH`` -> ``(1, (0, 2))``). Subclasses of these layers are these layers
  (the table of `secondorder.capture.registry`). A stored kernel with more axes
  than its layer's (layers created under `nnx.vmap` and run with `nnx.scan`) has them as
  batch axes, at `stack_axis`.

  A stacked 1-D parameter of those layers and of the norms (`nnx.LayerNorm`, `RMSNorm`,
  `BatchNorm`, `GroupNorm`), a bias or scale ``[L, d]``, gets an empty reduction side,
  ``MuonDimensionNumbers((), 1)``: L independent vectors, which each method treats as it
  treats a 1-D parameter of the unrolled model. Unstacked biases and scales, and those that
  are not vectors in one layer (a `LinearGeneral` bias ``[heads, head_dim]``), get None
  (each method's default). A parameter of rank >= 2 that no known layer owns is read
  plainly by default (`plain_reading`: a free matrix is its own two axes, a free parameter
  of rank >= 3 such as a position table has no matrix reading, vectors over its last
  axis); `with_summary=True` also returns the text listing what was read that way, and
  `on_unknown="raise"` raises instead, naming every such parameter. A kernel its layer
  cannot read (an `nnx.Einsum` whose equation is given only at the call) is read plainly
  too. (`optax.contrib.muon` reads an empty
  reduction side as L matrices of one row each and orthogonalises them; for Muon, replace
  those specs by None to keep its Adam on the vectors.)

  Args:
    model: the NNX module (not its state: the layers' types and attributes are what is
      read).
    stack_axis: where the stacking transforms put the layer axes (`out_axes` of
      `nnx.vmap`, default 0). Checked against every stacked kernel's shape.
    wrt: the filter of the optimized state (default `nnx.Param`), as in
      `nnx.state(model, wrt)`; the result has that state's structure.
    on_unknown: for parameters of rank >= 2 that no known layer owns: "plain" (default,
      `plain_reading`), "raise" (a ValueError naming them) or "none" (each method's
      default).
    with_summary: also return the text saying which parameters were read plainly.

  Returns:
    A pytree like `nnx.state(model, wrt)` (an `nnx.State` whose variables hold a
    `MuonDimensionNumbers` or None), for any method's `weight_dimension_numbers` when the
    optimized params are that state; `nnx.to_pure_dict` of it matches pure-dict params.
    With `with_summary`, the pair `(tree, summary)`.

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
  specs: dict[tuple, Any] = {}
  unknown: dict[tuple, Any] = {}
  owned = set()
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Module):
      continue
    path = tuple(str(p) for p in path)
    extra = None  # stack axes of this layer's parameters (None: no kernel to tell)
    layer, kernels = _nnx_kernel_layouts(node)
    for name, (layer_shape, axes) in kernels.items():
      shape = tuple(np.shape(getattr(node, name).get_value()))
      specs[path + (name,)] = _stacked_spec(shape, layer_shape, axes, stack_axis,
                                            "/".join(map(str, path + (name,))))
      extra = len(shape) - len(layer_shape)
    if layer is not None:
      for n, v in vars(node).items():
        if not isinstance(v, nnx.Variable) or path + (n,) in specs:
          continue
        if n == layer.kernel and layer.axes(node, (), (), {}) is not None:
          continue   # a kernel its layer cannot read: the plain reading
        owned.add(path + (n,))
        shape = tuple(np.shape(v.get_value()))
        # A norm's own parameters are vectors: every further axis is a stack axis.
        n_extra = len(shape) - 1 if extra is None else extra
        spec = _stacked_vector_spec(shape, n_extra, stack_axis, "/".join(map(str, path + (n,))))
        if spec is not None:
          specs[path + (n,)] = spec
  for key in owned - set(specs):
    specs[key] = None
  params = nnx.state(model, nnx.Param if wrt is None else wrt)
  return _specs_like(params, specs, unknown, "dimension_numbers_from_nnx", on_unknown,
                     with_summary)


def _linen_kernel_layout(module: Any, variables: dict, args: tuple, kwargs: dict
                         ) -> tuple[Any, tuple[str, tuple[int, ...], _Axes] | str | None]:
  """(`module`'s entry of the layer table or None, (param name, the layer's own kernel
  shape as its call sees it, its axes), or the name of a kernel it cannot read, or None)."""
  from secondorder.capture import registry  # pylint: disable=g-import-not-at-top
  layer = registry.lookup(registry.LINEN, module)
  if layer is None:
    return None, None
  params = variables.get("params", {})
  if layer.kernel not in params:
    return layer, None
  shape = tuple(params[layer.kernel].shape)
  axes = registry.spec_axes(layer, module, shape, args, kwargs)
  if axes is None:
    return layer, None
  if isinstance(axes, str):
    return layer, layer.kernel
  return layer, (layer.kernel, shape, axes)


def dimension_numbers_from_linen(module: Any, variables: Any, *args: Any,
                                 stack_axis: int = 0, rngs: Any = None,
                                 on_unknown: str = "plain", with_summary: bool = False,
                                 **kwargs: Any) -> Any:
  r"""`weight_dimension_numbers` for a Flax linen model's params, read from its layers.

  linen params are plain arrays, so the layers are found by tracing one call of the model
  (`jax.eval_shape`, nothing is computed) and recording, for every layer of the capture's
  table that runs (`nn.Dense`, `nn.DenseGeneral` and so `nn.MultiHeadDotProductAttention`,
  `nn.Einsum` by the equation of its call, `nn.Conv`, `nn.Embed`, the norms, and their
  subclasses), its kernel's own shape. Inside `nn.scan` / `nn.vmap` a layer sees one slice of
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
    on_unknown: "plain" (default), "raise" or "none", for params of rank >= 2 that no
      known layer owns, as in `dimension_numbers_from_nnx` (a free parameter inside a
      stacked layer is read as one layer sees it, the stack axes at `stack_axis`).
    with_summary: also return the text saying which parameters were read plainly.
    **kwargs: keyword arguments of the call (`train=True`).

  Returns:
    A pytree like `variables["params"]` with a `MuonDimensionNumbers` or None per leaf
    (with `with_summary`, the pair `(tree, summary)`).

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
  layers, layer_ranks, vector_shapes, own_shapes = {}, {}, {}, {}

  def record(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    mod = context.module
    if mod.scope is None or "params" not in mod.variables:
      return out
    path = tuple(mod.scope.path)
    layer, found = _linen_kernel_layout(mod, mod.variables, tuple(call_args[1:]),
                                        dict(call_kwargs))
    unreadable = found if isinstance(found, str) else None
    known = layer is not None
    for name, value in mod.variables["params"].items():
      if hasattr(value, "shape"):
        # A known layer's other params are its vectors (an attention bias is [heads, dim]).
        layer_ranks[path + (name,)] = (0 if known and name != unreadable
                                       else len(value.shape))
        if known and name != unreadable:
          vector_shapes[path + (name,)] = tuple(value.shape)  # as one layer sees it
        own_shapes[path + (name,)] = tuple(value.shape)
    if isinstance(found, tuple):
      name, shape, axes = found
      layers[path + (name,)] = (shape, axes)
    return out

  def call(variables):
    with nn.intercept_methods(record):
      return module.apply(variables, *args, rngs=rngs, mutable=True, **kwargs)

  jax.eval_shape(call, variables)
  params = variables["params"]
  stored = {_path_key(p): tuple(np.shape(x))
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  specs = {}
  for key, (layer_shape, axes) in layers.items():
    if key not in stored:
      raise ValueError(f"dimension_numbers_from_linen: the layer at {'/'.join(key)} has no "
                       "parameter at that path in variables['params'].")
    specs[key] = _stacked_spec(stored[key], layer_shape, axes, stack_axis, "/".join(key))
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
  return _specs_like(params, specs, unknown, "dimension_numbers_from_linen", on_unknown,
                     with_summary, own_shapes, stack_axis)
