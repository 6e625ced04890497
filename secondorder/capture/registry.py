"""What a layer is: the one table of Flax layer classes that K-FAC's capture and the
dimension-number derivation (`secondorder.dimension_numbers`) both read.

Each `Layer` entry names a Flax class, the kind of block its calls get, the parameter the
block calls its kernel, how a call is described for the capture (`describe`), and how the
kernel's own axes split into a reduction (input) side and an output side (`axes`), which is
what the dimension numbers of Shampoo, SOAP and Muon are. A subclass of a class in the table
is that layer: `lookup` tests `isinstance` over the table, most specific class first. A
subclass that overrides a method the block taps (`overriding`) is still covered when its
override calls the base method (the tap sits on the base call, and whatever the override
does around it is ordinary model code, differentiated through); when it never does, the
capture sees no call and says so.

A new layer kind is one entry here (its `Layer`, and its kind in `BLOCKS` and `TAPS`) and
one small block module (as `einsum`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from secondorder.capture import conv, dense, einsum, embed, norm

Axes = tuple[tuple[int, ...], tuple[int, ...]]   # (reduction axes, output axes) of a kernel


@dataclasses.dataclass(frozen=True)
class Layer:
  """One covered Flax layer class.

  Attributes:
    cls: the class (its subclasses are the same layer).
    kind: the kind of block its calls get ("dense", "conv", "embed", "norm", "einsum").
    kernel: the name of the parameter the block calls its kernel.
    describe: `(module, x, method, args, kwargs) -> (kind, description)`; the description
      is a reason string when the call cannot be covered.
    axes: `(module, kernel shape of one layer, call args, call kwargs) -> (reduction,
      output)` axes of the kernel, a reason string, or None for a layer whose parameters are
      vectors (a norm).
    own_shape: NNX only: the shape of the layer's own kernel from its attributes (a stored
      kernel with more axes is a stack); None for linen, whose calls see that shape.
    methods: the methods the capture taps.
  """
  cls: type
  kind: str
  kernel: str
  describe: Callable[..., tuple[str, Any]]
  axes: Callable[..., Axes | str | None]
  own_shape: Callable[[Any], tuple[int, ...]] | None = None
  methods: tuple[str, ...] = ("__call__",)


def lookup(table: tuple[Layer, ...], module: Any) -> Layer | None:
  """The table's entry of `module`'s class or of its most specific covered base class."""
  for layer in table:
    if isinstance(module, layer.cls):
      return layer
  return None


def overriding(layer: Layer, module: Any, method: str) -> type | None:
  """The subclass of `layer.cls` that redefines `method` for `module`, or None."""
  for klass in type(module).__mro__:
    if klass is layer.cls:
      return None
    if method in vars(klass):
      return klass
  return None


def spec_axes(layer: Layer, module: Any, shape: tuple[int, ...], args=(), kwargs=None
              ) -> Axes | str | None:
  """`layer.axes` of `module` whose own kernel has `shape`."""
  return layer.axes(module, tuple(shape), tuple(args), dict(kwargs or {}))


def _sorted(entries) -> tuple[Layer, ...]:
  """Most specific class first, so that `lookup` finds a subclass's own entry."""
  return tuple(sorted(entries, key=lambda l: -len(l.cls.__mro__)))


# ----------------------------------------------------------------------------- describers


def _split(n_red: int, shape: tuple[int, ...], n_batch: int = 0) -> Axes:
  return (tuple(range(n_batch, n_batch + n_red)), tuple(range(n_batch + n_red, len(shape))))


def _equation(module, args, kwargs) -> str | None:
  """The einsum equation of a call: its own argument, else the layer's attribute."""
  eq = args[0] if args and isinstance(args[0], str) else kwargs.get("einsum_str")
  return eq if eq is not None else getattr(module, "einsum_str", None)


def _dense(module, x, method, args, kwargs):
  return dense.KIND, dense.describe(x, -1, ())


def _embed(module, x, method, args, kwargs):
  if method == "attend":
    return embed.ATTEND, embed.describe_attend(x, module.features)
  return embed.KIND, embed.describe(x)


def _layer_norm(module, x, method, args, kwargs):
  return norm.KIND, norm.describe(module, x, True, kwargs)


def _rms_norm(module, x, method, args, kwargs):
  return norm.KIND, norm.describe(module, x, False, kwargs)


def _group_norm(module, x, method, args, kwargs):
  return norm.KIND, norm.describe_group(module, x, kwargs)


def _batch_norm(module, x, method, args, kwargs):
  return norm.KIND, norm.describe_batch(module, x, args, kwargs)


def _conv(module, x, method, args, kwargs):
  return conv.KIND, conv.describe(module, x)


def _einsum(module, x, method, args, kwargs):
  eq = _equation(module, args, kwargs)
  if eq is None:
    return einsum.KIND, "an einsum layer called without an equation"
  kernel = module.kernel[...] if isinstance(module, nnx.Module) else None
  ndim = jnp.ndim(kernel) if kernel is not None else len(module.shape)
  return einsum.KIND, einsum.describe(eq, x, ndim)


def _einsum_axes(module, shape, args, kwargs):
  eq = _equation(module, args, kwargs)
  if eq is None:
    return "an einsum layer whose equation is given only at the call"
  return einsum.kernel_axes(eq, len(shape), batch_ok=True)


def _matrix_axes(module, shape, args, kwargs):
  return _split(len(shape) - 1, shape)


def _first_axis_in(module, shape, args, kwargs):
  return _split(1, shape)


def _vectors(module, shape, args, kwargs):
  return None


def _count(x) -> int:
  return len(x) if isinstance(x, (tuple, list)) else 1


def _nnx_general_axes(module, shape, args, kwargs):
  return _split(len(module.in_features), shape, len(module.batch_axis))


def _linen_general_axes(module, shape, args, kwargs):
  n_batch = _count(module.batch_dims) if module.batch_dims != () else 0
  return _split(len(shape) - n_batch - _count(module.features), shape, n_batch)


def _nnx_general(module, x, method, args, kwargs):
  return dense.KIND, dense.describe(x, module.axis, dict(module.batch_axis))


def _linen_general(module, x, method, args, kwargs):
  return dense.KIND, dense.describe(x, module.axis, module.batch_dims)


def _nnx_conv_shape(module) -> tuple[int, ...]:
  return (*module.kernel_size, module.in_features // module.feature_group_count,
          module.out_features)


# ----------------------------------------------------------------------------- the tables

NNX = _sorted([
    Layer(nnx.Linear, dense.KIND, "kernel", _dense, _first_axis_in,
          lambda m: (m.in_features, m.out_features)),
    Layer(nnx.LinearGeneral, dense.KIND, "kernel", _nnx_general, _nnx_general_axes,
          lambda m: (*m.batch_axis.values(), *m.in_features, *m.out_features)),
    Layer(nnx.Einsum, einsum.KIND, "kernel", _einsum, _einsum_axes,
          lambda m: tuple(m.kernel_shape)),
    Layer(nnx.Conv, conv.KIND, "kernel", _conv, _matrix_axes, _nnx_conv_shape),
    Layer(nnx.Embed, embed.KIND, "embedding", _embed, _first_axis_in,
          lambda m: (m.num_embeddings, m.features), methods=("__call__", "attend")),
    Layer(nnx.LayerNorm, norm.KIND, "scale", _layer_norm, _vectors),
    Layer(nnx.RMSNorm, norm.KIND, "scale", _rms_norm, _vectors),
    Layer(nnx.GroupNorm, norm.KIND, "scale", _group_norm, _vectors),
    Layer(nnx.BatchNorm, norm.KIND, "scale", _batch_norm, _vectors),
])

LINEN = _sorted([
    Layer(nn.Dense, dense.KIND, "kernel", _dense, _first_axis_in),
    Layer(nn.DenseGeneral, dense.KIND, "kernel", _linen_general, _linen_general_axes),
    Layer(nn.Einsum, einsum.KIND, "kernel", _einsum, _einsum_axes),
    Layer(nn.Conv, conv.KIND, "kernel", _conv, _matrix_axes),
    Layer(nn.Embed, embed.KIND, "embedding", _embed, _first_axis_in,
          methods=("__call__", "attend")),
    Layer(nn.LayerNorm, norm.KIND, "scale", _layer_norm, _vectors),
    Layer(nn.RMSNorm, norm.KIND, "scale", _rms_norm, _vectors),
    Layer(nn.GroupNorm, norm.KIND, "scale", _group_norm, _vectors),
    Layer(nn.BatchNorm, norm.KIND, "scale", _batch_norm, _vectors),
])


# ----------------------------------------------------------------------------- the blocks

# Per kind of block (`KfacLayer.kind`): its taps' zero slots and how their cotangents make
# its statistics (`slot_shapes(layer)`, `statistics(layer, first, fisher, m)`).
BLOCKS = {dense.KIND: dense, conv.KIND: dense, einsum.KIND: dense, embed.KIND: embed,
          embed.TIED: embed, norm.KIND: norm}
# The kinds tapped as a plain Kronecker pair (`input_rows`, `positions` of their inputs).
KRONECKER = {dense.KIND: dense, conv.KIND: conv}
# The kinds with their own taps: `tap(described, slots, call, x, with_bias, weights)`.
TAPS = {embed.KIND: embed.tap_lookup, embed.ATTEND: embed.tap_attend, norm.KIND: norm.tap,
        einsum.KIND: einsum.tap}


def describe(layer: Layer, module, x, method: str = "__call__", args=(), kwargs=None):
  """(kind, description) of a call of `module` (an instance of `layer.cls`) on `x`;
  (None, None) for a method the block does not tap."""
  if method not in layer.methods:
    return None, None
  return layer.describe(module, x, method, tuple(args), dict(kwargs or {}))
