"""Where a capture meets the model: method interception for linen and NNX.

During a capture's traced forward pass, calls of the covered layer classes are routed to a
`Recorder`. In discovery it notes each call (`Call`: path, kind, shapes, configuration, or
why it cannot be covered); in capture it wraps the call's input and output in the taps of
`secondorder.capture.taps`. The user's modules are never edited: linen calls go through
`flax.linen.intercept_methods`; for NNX the covered classes' `__call__` is wrapped for the
duration of the traced call, and the layers are found by a path attribute set on the
capture's own copy of the model (it travels with the graph through `nnx.remat`,
`nnx.scan`, `nnx.vmap`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from secondorder.capture import conv, dense, embed, norm, padding, taps

KINDS = {dense.KIND: dense, conv.KIND: conv}
# Per kind of block (`KfacLayer.kind`): its taps' zero slots and how their cotangents make
# its statistics (`slot_shapes(layer)`, `statistics(layer, first, fisher, m)`).
BLOCKS = {dense.KIND: dense, conv.KIND: dense, embed.KIND: embed, embed.TIED: embed,
          norm.KIND: norm}
# The layer kinds whose taps are not the Kronecker pair of `kronecker_tap`.
TAPS = {embed.KIND: embed.tap_lookup, embed.ATTEND: embed.tap_attend, norm.KIND: norm.tap}
# The parameter a kind calls its kernel (default "kernel").
KERNEL_NAMES = {embed.KIND: "embedding", embed.ATTEND: "embedding", norm.KIND: "scale"}


@dataclasses.dataclass(frozen=True)
class Call:
  """What discovery learns about one call of a covered layer class.

  Attributes:
    name: the layer's path, "/"-joined.
    kind: "dense" or "conv".
    kernel, bias: parameter paths (bias None when absent).
    kernel_shape: the kernel's shape as the call sees it.
    reduction_ndim: the kernel's number of input axes.
    config: the kind's hashable input configuration (`dense.describe`, `conv.describe`).
    problem: why the call cannot be covered, or None.
    groups: a convolution's feature groups (each its own block); 1 otherwise.
  """
  name: str
  kind: str
  kernel: tuple[str, ...]
  bias: tuple[str, ...] | None
  kernel_shape: tuple[int, ...]
  reduction_ndim: int
  config: Any
  problem: str | None
  groups: int = 1


SLOT_NAMES = ("_secondorder_kfac_a", "_secondorder_kfac_s", "_secondorder_kfac_uses",
              "_secondorder_kfac_3", "_secondorder_kfac_4", "_secondorder_kfac_5")


def kronecker_tap(described, slots, call, x, with_bias: bool, weights) -> jax.Array:
  """A dense or convolution call tapped for Â (its input rows) and Ŝ (its outputs).

  `weights(positions)` gives the rows' padding weights, or None without a mask."""
  slot_a, slot_s, uses = slots[:3]
  kind, config = described
  rows = functools.partial(KINDS[kind].input_rows, config)
  w = weights(KINDS[kind].positions(config, x))
  x = taps.tap_inputs(x, slot_a, uses, rows, with_bias, w)
  return taps.tap_outputs(call(x), slot_s)


class Recorder:
  """Routes the covered layers' calls of one traced forward pass.

  Args:
    capture: False for discovery (record every call); True to tap the layers that carry
      slots (`SLOT_NAMES`, placed beside their parameters by the capture).
    mask: the padding mask's weights over the output's examples
      (`secondorder.capture.padding`), or None.
  """

  def __init__(self, capture: bool = False, mask: jax.Array | None = None):
    self.capture = capture
    self.mask = mask
    self.calls: list[Call] = []

  def _weights(self, name: str):
    """`positions -> row weights` of layer `name` (None throughout without a mask)."""
    if self.mask is None:
      return lambda positions: None
    return functools.partial(padding.row_weights, self.mask, name)

  def handle(self, name: str, kind: str, described, kernel_path, bias_path,
             call: Callable[[jax.Array], jax.Array], kernel_shape: Callable[[], tuple],
             slots: Callable[[], tuple | None], x):
    """Runs `call(x)`: tapped in capture mode, recorded in discovery."""
    if not self.capture:
      y = call(x)
      problem = described if isinstance(described, str) else None
      config, nin = (None, 0) if problem else described
      groups = conv.num_groups(config) if kind == conv.KIND and not problem else 1
      self.calls.append(Call(name, kind, kernel_path, bias_path, tuple(kernel_shape()), nin,
                             config, problem, groups))
      return y
    found = None if isinstance(described, str) else slots()
    if found is None:
      return call(x)
    weights = self._weights(name)
    if kind in TAPS:
      return TAPS[kind](described, found, call, x, bias_path is not None, weights)
    return kronecker_tap((kind, described[0]), found, call, x, bias_path is not None, weights)


class _Active(threading.local):
  def __init__(self):
    self.recorder = None


_ACTIVE = _Active()


@contextlib.contextmanager
def recording(rec: Recorder):
  """Makes `rec` receive the covered layers' calls inside the block."""
  prev = _ACTIVE.recorder
  _ACTIVE.recorder = rec
  try:
    yield rec
  finally:
    _ACTIVE.recorder = prev


# ----------------------------------------------------------------------------- layer kinds


@dataclasses.dataclass(frozen=True)
class _Layers:
  """One API's covered layer classes, by the kind of block each gets, and how its
  multi-axis dense layer names the kernel's batch axes."""
  embed: type
  layer_norm: type
  rms_norm: type
  group_norm: type
  batch_norm: type
  dense: type
  dense_general: type
  conv: type
  batch_axes: Callable[[Any], Any]

  def classes(self) -> tuple[type, ...]:
    """Every covered class of the API."""
    return tuple(getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name != "batch_axes")


def _describe(layers: _Layers, module, x, method="__call__", kwargs=None, args=()):
  """(kind, description) of a call of `module` on `x`; (None, None) when not covered."""
  kwargs = kwargs or {}
  cls = type(module)
  if cls is layers.embed:
    if method == "attend":
      return embed.ATTEND, embed.describe_attend(x, module.features)
    return embed.KIND, embed.describe(x)
  if cls in (layers.layer_norm, layers.rms_norm):
    return norm.KIND, norm.describe(module, x, cls is layers.layer_norm, kwargs)
  if cls is layers.group_norm:
    return norm.KIND, norm.describe_group(module, x, kwargs)
  if cls is layers.batch_norm:
    return norm.KIND, norm.describe_batch(module, x, args, kwargs)
  if method != "__call__":
    return None, None
  if cls is layers.dense:
    return dense.KIND, dense.describe(x, -1, ())
  if cls is layers.dense_general:
    return dense.KIND, dense.describe(x, module.axis, layers.batch_axes(module))
  if cls is layers.conv:
    return conv.KIND, conv.describe(module, x)
  return None, None


# ----------------------------------------------------------------------------- linen

_LINEN = _Layers(nn.Embed, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm, nn.Dense,
                 nn.DenseGeneral, nn.Conv, batch_axes=lambda m: m.batch_dims)


def linen_interceptor(next_fun, args, kwargs, context):
  """`flax.linen.intercept_methods` hook sending covered layers' calls to the recorder."""
  rec = _ACTIVE.recorder
  module = context.module
  if rec is None or context.method_name not in ("__call__", "attend") or not args:
    return next_fun(*args, **kwargs)
  kind, described = _describe(_LINEN, module, args[0], context.method_name, kwargs,
                               args[1:])
  if kind is None:
    return next_fun(*args, **kwargs)
  path = tuple(str(p) for p in module.path)
  bias = path + ("bias",) if getattr(module, "use_bias", False) else None
  kernel = KERNEL_NAMES.get(kind, "kernel")

  def slots():
    if not module.has_variable("params", SLOT_NAMES[0]):
      return None
    return tuple(module.get_variable("params", n) for n in SLOT_NAMES
                 if module.has_variable("params", n))

  return rec.handle(
      "/".join(path), kind, described, path + (kernel,), bias,
      lambda x: next_fun(x, *args[1:], **kwargs),
      lambda: jnp.shape(module.get_variable("params", kernel)), slots, args[0])


@contextlib.contextmanager
def linen_intercept():
  """Routes linen's covered layers to the active recorder inside the block."""
  with nn.intercept_methods(linen_interceptor):
    yield


# ----------------------------------------------------------------------------- NNX

_PATH_ATTR = "_secondorder_capture_path"
_NNX = _Layers(nnx.Embed, nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm, nnx.BatchNorm,
               nnx.Linear, nnx.LinearGeneral, nnx.Conv, batch_axes=lambda m: dict(m.batch_axis))

_NNX_ORIGINAL = {(cls, "__call__"): cls.__call__ for cls in _NNX.classes()}
_NNX_ORIGINAL[(nnx.Embed, "attend")] = nnx.Embed.attend
_NNX_CLASSES = {cls for cls, _ in _NNX_ORIGINAL}


def _nnx_wrapped(cls, method):
  original = _NNX_ORIGINAL[(cls, method)]

  @functools.wraps(original)
  def call(self, x, *args, **kwargs):
    rec = _ACTIVE.recorder
    path = getattr(self, _PATH_ATTR, None)
    if rec is None or path is None or type(self) is not cls:
      return original(self, x, *args, **kwargs)
    kind, described = _describe(_NNX, self, x, method, kwargs, args)
    bias = path + ("bias",) if getattr(self, "bias", None) is not None else None
    kernel = KERNEL_NAMES.get(kind, "kernel")

    def slots():
      if getattr(self, SLOT_NAMES[0], None) is None:
        return None
      return tuple(getattr(self, n)[...] for n in SLOT_NAMES
                   if getattr(self, n, None) is not None)

    return rec.handle("/".join(path), kind, described, path + (kernel,), bias,
                      lambda xx: original(self, xx, *args, **kwargs),
                      lambda: jnp.shape(getattr(self, kernel)[...]), slots, x)
  return call


_NNX_LOCK = threading.RLock()


class KfacSlot(nnx.Param):
  """A capture's zero slot placed beside a layer's parameters (so stacked layers slice it)."""


def nnx_place_slots(model, slots: dict) -> None:
  """Sets each covered layer's slots (`{module path: (a, s, uses)}`) on the capture's copy."""
  modules = {tuple(str(p) for p in path): m for path, m in nnx.iter_modules(model)}
  for path, values in slots.items():
    for n, v in zip(SLOT_NAMES, values):
      setattr(modules[path], n, KfacSlot(v))


def linen_place_slots(params, slots: dict):
  """`params` with each covered layer's slots added beside its kernel (a new dict tree)."""
  out = dict(params)
  for path, values in slots.items():
    node = out
    for key in path:
      node[key] = dict(node[key])
      node = node[key]
    node.update(zip(SLOT_NAMES, values))
  return out


@contextlib.contextmanager
def nnx_intercept(model):
  """Marks `model`'s covered layers with their paths and routes their calls inside the block.

  `model` must be the capture's own copy (from `nnx.merge`), never the user's module.
  """
  for path, m in nnx.iter_modules(model):
    if type(m) in _NNX_CLASSES:
      setattr(m, _PATH_ATTR, tuple(str(p) for p in path))
  with _NNX_LOCK:
    for cls, method in _NNX_ORIGINAL:
      setattr(cls, method, _nnx_wrapped(cls, method))
    try:
      yield
    finally:
      for (cls, method), fn in _NNX_ORIGINAL.items():
        setattr(cls, method, fn)
