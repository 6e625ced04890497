"""Where a capture meets the model: method interception for linen and NNX.

During a capture's traced forward pass, calls of the covered layer classes are routed to a
`Recorder`. In discovery it notes each call (`Call`: path, kind, shapes, configuration, or
why it cannot be covered); in capture it wraps the call's input and output in the taps of
`secondorder.capture.taps`. The user's modules are never edited: linen calls go through
`flax.linen.intercept_methods`; for NNX the covered classes' `__call__` (and a subclass's
override of it, to notice one that never calls the base) is wrapped for the duration of
the traced call, and the layers are found by a path attribute set on the capture's own copy
of the model (it travels with the graph through `nnx.remat`, `nnx.scan`, `nnx.vmap`).
Which classes are covered, and how a call is described, is the table of
`secondorder.capture.registry`; a subclass is tapped at the base call.
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

from secondorder.capture import conv, padding, registry, taps


@dataclasses.dataclass(frozen=True)
class Call:
  """What discovery learns about one call of a covered layer class.

  Attributes:
    name: the layer's path, "/"-joined.
    kind: "dense" or "conv".
    kernel, bias: parameter paths (bias None when absent).
    kernel_shape: the kernel's shape as the call sees it.
    axes: the kernel's reduction (input) axes and output axes as the call sees it (the
      output axes in the order the layer's output holds them).
    config: the kind's hashable input configuration (`dense.describe`, `conv.describe`).
    problem: why the call cannot be covered, or None.
    groups: a convolution's feature groups (each its own block); 1 otherwise.
  """
  name: str
  kind: str
  kernel: tuple[str, ...]
  bias: tuple[str, ...] | None
  kernel_shape: tuple[int, ...]
  axes: tuple[tuple[int, ...], tuple[int, ...]]
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
  rows = functools.partial(registry.KRONECKER[kind].input_rows, config)
  w = weights(registry.KRONECKER[kind].positions(config, x))
  y = call(taps.tap_inputs(x, slot_a, uses, rows, with_bias, w))
  if len(slots) > 3:   # EK-FAC bases (Q_A, Q_S) and the projected moment's slot
    if 0 in config:
      raise ValueError("EK-FAC bases need the layer's input axis 0 to be its examples, but "
                       f"a dense layer contracts axes {config} of its input.")
    y = taps.tap_projected(y, x, slots[3], slots[4], slots[5], rows, with_bias)
  return taps.tap_outputs(y, slot_s)


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
    self.entered: set = set()   # (path, method) of linen overrides running their base call

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
      groups = conv.num_groups(config) if kind == conv.KIND and config is not None else 1
      shape = tuple(kernel_shape())
      axes = nin if isinstance(nin, tuple) else (tuple(range(nin)),
                                                  tuple(range(nin, len(shape))))
      self.calls.append(Call(name, kind, kernel_path, bias_path, shape, axes, config,
                             problem, groups))
      return y
    found = None if isinstance(described, str) else slots()
    if found is None:
      return call(x)
    weights = self._weights(name)
    if kind in registry.TAPS:
      return registry.TAPS[kind](described, found, call, x, bias_path is not None, weights)
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


# ----------------------------------------------------------------------------- linen


def _override_problem(layer: registry.Layer, klass: type, method: str) -> str:
  """Why a subclass whose override never reaches the base method has no block."""
  return (f"{klass.__name__}, a subclass of {layer.cls.__module__.split('.')[1]}."
          f"{layer.cls.__name__}, overrides {method} without calling "
          f"{layer.cls.__name__}.{method}, so the block's inputs are never seen")


def _problem_call(name: str, layer: registry.Layer, path: tuple, shape, problem: str) -> Call:
  return Call(name, layer.kind, path + (layer.kernel,), None, tuple(shape), ((), ()), None,
              problem)


def linen_interceptor(next_fun, args, kwargs, context):
  """`flax.linen.intercept_methods` hook sending covered layers' calls to the recorder.

  A subclass overriding a tapped method is tapped at the base method its override calls
  (`super().__call__`): the outer call passes through, the inner one is the layer's."""
  rec = _ACTIVE.recorder
  module = context.module
  layer = None if rec is None else registry.lookup(registry.LINEN, module)
  if layer is None or context.method_name not in layer.methods or not args:
    return next_fun(*args, **kwargs)
  path = tuple(str(p) for p in module.path)
  key = (path, context.method_name)
  klass = registry.overriding(layer, module, context.method_name)
  if klass is not None and key not in rec.entered:
    rec.entered.add(key)
    before = len(rec.calls)
    try:
      out = next_fun(*args, **kwargs)
    finally:
      rec.entered.discard(key)
    if not rec.capture and not any(c.name == "/".join(path) for c in rec.calls[before:]):
      shape = (jnp.shape(module.get_variable("params", layer.kernel))
               if module.has_variable("params", layer.kernel) else ())
      rec.calls.append(_problem_call("/".join(path), layer, path, shape, _override_problem(
          layer, klass, context.method_name)))
    return out
  kind, described = registry.describe(layer, module, args[0], context.method_name,
                                      args[1:], kwargs)
  if kind is None:
    return next_fun(*args, **kwargs)
  bias = path + ("bias",) if getattr(module, "use_bias", False) else None
  kernel = layer.kernel

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

_NNX_ORIGINAL = {(layer.cls, method): getattr(layer.cls, method)
                 for layer in registry.NNX for method in layer.methods}


def _nnx_wrapped(cls, method):
  original = _NNX_ORIGINAL[(cls, method)]

  @functools.wraps(original)
  def call(self, x, *args, **kwargs):
    rec = _ACTIVE.recorder
    path = getattr(self, _PATH_ATTR, None)
    layer = None if rec is None or path is None else registry.lookup(registry.NNX, self)
    if layer is None or layer.cls is not cls:
      return original(self, x, *args, **kwargs)
    kind, described = registry.describe(layer, self, x, method, args, kwargs)
    bias = path + ("bias",) if getattr(self, "bias", None) is not None else None
    kernel = layer.kernel

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
  marked = {}
  for path, m in nnx.iter_modules(model):
    layer = registry.lookup(registry.NNX, m)
    if layer is not None:
      path = tuple(str(p) for p in path)
      setattr(m, _PATH_ATTR, path)
      marked[path] = (layer, m)
  overrides = {(klass, method): layer for layer, m in marked.values()
               for method in layer.methods
               for klass in [registry.overriding(layer, m, method)] if klass is not None}
  rec = _ACTIVE.recorder
  with _NNX_LOCK:
    patched = {key: getattr(*key) for key in list(_NNX_ORIGINAL) + list(overrides)}
    for cls, method in _NNX_ORIGINAL:
      setattr(cls, method, _nnx_wrapped(cls, method))
    for (klass, method), layer in overrides.items():
      setattr(klass, method, _nnx_override_wrapped(layer, patched[(klass, method)], klass,
                                                   method))
    try:
      yield
    finally:
      for (cls, method), fn in patched.items():
        setattr(cls, method, fn)
  if rec is not None and not rec.capture:
    _note_uncalled(rec, marked)


def _nnx_override_wrapped(layer: registry.Layer, override, klass: type, method: str):
  """A subclass's override of a tapped method, noting (in discovery) a call that never
  reaches the base method: the layer then falls back, since a use of its kernel is unseen."""

  @functools.wraps(override)
  def call(self, *args, **kwargs):
    rec = _ACTIVE.recorder
    path = getattr(self, _PATH_ATTR, None)
    if rec is None or path is None or rec.capture:
      return override(self, *args, **kwargs)
    name, before = "/".join(path), len(rec.calls)
    out = override(self, *args, **kwargs)
    if not any(c.name == name for c in rec.calls[before:]):
      rec.calls.append(_problem_call(name, layer, path,
                                     jnp.shape(getattr(self, layer.kernel)[...]),
                                     _override_problem(layer, klass, method)))
    return out
  return call


def _note_uncalled(rec: Recorder, marked: dict) -> None:
  """Records why a covered layer the forward pass never called has no block."""
  called = {c.name for c in rec.calls}
  for path, (layer, m) in marked.items():
    name = "/".join(path)
    if name in called or getattr(m, layer.kernel, None) is None:
      continue
    rec.calls.append(_problem_call(name, layer, path, jnp.shape(getattr(m, layer.kernel)[...]),
                                   "the forward pass never calls the layer"))
