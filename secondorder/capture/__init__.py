"""Per-layer K-FAC statistics from unmodified Flax models (NNX and linen).

One call returns the loss, the gradients and, for every covered layer, the two Kronecker
factor contributions of the current batch (METHODS.md §3)::

  Â = aᵀ a / N                         a: layer inputs, one row per example and location
  Ŝ = (1/B) Σ_b Σ_t g_{b,t} g_{b,t}ᵀ   g: per-example gradients w.r.t. the layer outputs

with N = B·T rows (T spatial locations for a convolution, or the extra leading axes of a
dense layer; T = 1 for a plain dense layer). A bias is handled by appending a constant 1 to
`a`. The loss is the *mean* over the batch, so the back-propagated output gradient of
example b is g_b / B: the capture multiplies by B (Ŝ = B · ĝᵀ ĝ for the back-propagated ĝ).
The layer's Fisher block is then approximated by Â ⊗ Ŝ; for a convolution this is the KFC
approximation T · Ā ⊗ S̄ (Grosse & Martens 2016), with Ā and S̄ averages over locations.

The statistics are already reduced (the factors are [in+1, in+1] and [out, out]), so the
`kfac_stats` extra argument stays small whatever the batch size.

Covered layers: `flax.linen.Dense`, `flax.linen.Conv`, `flax.nnx.Linear`, `flax.nnx.Conv`
(exact types, each called once per forward pass, no feature groups, no mask, padding
'SAME'/'VALID'/explicit). Layer inputs are read and output gradients obtained by method
interception (`flax.linen.intercept_methods`; for NNX the covered classes' `__call__` is
wrapped for the duration of the traced call): the user's module is never edited. Every
parameter outside a covered layer is listed in `KfacLayers.uncovered` and preconditioned by
the transform's diagonal fallback.

Which Fisher (`fisher=`):
  * ``"sampled"`` (default): the true Fisher, output gradients of the negative
    log-likelihood at labels sampled from the model's predictive distribution; costs one
    backward pass more than `jax.value_and_grad`.
  * ``"empirical"``: output gradients of the user's loss at the data labels; free (the same
    backward pass as the gradient). This is a different matrix from the Fisher.
  * ``"exact"``: the expectation over labels in closed form (S = E_ŷ[g gᵀ], the
    Gauss-Newton matrix for these likelihoods); one backward pass per output unit.

Likelihoods (`likelihood=`), each the negative log-likelihood summed over the output units
of an example and averaged over the batch:
  * ``"softmax"``: categorical over the last axis (integer labels).
  * ``"bernoulli"``: independent sigmoid units (targets in [0, 1]).
  * ``"gaussian"``: unit-variance Gaussian, ½‖z − y‖² per example.

Example (NNX)::

  cap = capture.nnx_capture(loss_fn, likelihood="softmax")   # loss_fn(logits, labels)
  layers = cap.layers(model, x)                                # static, once
  tx = so.kfac(0.1, layers=layers)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y, key):
    loss, grads, stats = cap(model, x, y, key=key)
    opt.update(model, grads, kfac_stats=stats)
    return loss

Example (linen)::

  cap = capture.linen_capture(model, loss_fn, likelihood="bernoulli")
  layers = cap.layers(params, x)
  loss, grads, stats = jax.jit(cap)(params, x, y, key=key)

For a parameter pytree with no Flax model (every parameter on the diagonal fallback), build
the transform with `layers=no_layers()` and pass `kfac_stats=no_stats()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from secondorder._validation import check_choice

__all__ = [
    "LayerStats",
    "KfacLayer",
    "KfacLayers",
    "Capture",
    "linen_capture",
    "nnx_capture",
    "no_layers",
    "no_stats",
    "param_path",
    "LIKELIHOODS",
    "FISHERS",
]

LIKELIHOODS = ("softmax", "bernoulli", "gaussian")
FISHERS = ("sampled", "empirical", "exact")


class LayerStats(NamedTuple):
  """The factor contributions of one batch for one layer.

  Attributes:
    a: Â, `[in (+1 with bias), in (+1)]`, the second moment of the layer inputs.
    s: Ŝ, `[out, out]`, the per-example second moment of the output gradients.
  """
  a: jax.Array
  s: jax.Array


@dataclasses.dataclass(frozen=True)
class KfacLayer:
  """Static description of one covered layer.

  Attributes:
    name: the layer's path in the model, "/"-joined (e.g. "layers/0", "Dense_0").
    kind: "dense" or "conv".
    kernel: path of the kernel in the params tree (tuple of str keys).
    bias: path of the bias, or None.
    kernel_shape: the kernel's shape; the layer is preconditioned as a matrix
      `[prod(kernel_shape[:-1]) (+1 for the bias), kernel_shape[-1]]`.
  """
  name: str
  kind: str
  kernel: tuple[str, ...]
  bias: tuple[str, ...] | None
  kernel_shape: tuple[int, ...]

  @property
  def a_dim(self) -> int:
    n = 1
    for d in self.kernel_shape[:-1]:
      n *= d
    return n + (self.bias is not None)

  @property
  def s_dim(self) -> int:
    return self.kernel_shape[-1]


@dataclasses.dataclass(frozen=True)
class KfacLayers:
  """The covered layers of a model and the parameters left to the diagonal fallback."""
  layers: tuple[KfacLayer, ...] = ()
  uncovered: tuple[str, ...] = ()

  def __iter__(self):
    return iter(self.layers)

  def __len__(self):
    return len(self.layers)


def no_layers() -> KfacLayers:
  """The layer description of a parameter pytree with no covered layer.

  `scale_by_kfac_factors(layers=no_layers())` preconditions every parameter with the
  diagonal fallback; feed it `kfac_stats=no_stats()`.
  """
  return KfacLayers()


def no_stats() -> dict[str, LayerStats]:
  """The (empty) statistics matching `no_layers()`."""
  return {}


def _key_str(k) -> str:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return str(k.name)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def param_path(path) -> tuple[str, ...]:
  """A jax key path as a tuple of strings (an NNX Variable's trailing `.value` dropped)."""
  keys = tuple(_key_str(k) for k in path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and keys[-1] == "value":
    keys = keys[:-1]
  return keys


# ----------------------------------------------------------------------------- likelihoods


def _nll(likelihood: str, z: jax.Array, y: jax.Array) -> jax.Array:
  """Negative log-likelihood summed over an example's outputs, mean over the batch."""
  b = z.shape[0]
  if likelihood == "softmax":
    logp = jax.nn.log_softmax(z, axis=-1)
    per = -jnp.take_along_axis(logp, y[..., None].astype(jnp.int32), axis=-1)
  elif likelihood == "bernoulli":
    per = jnp.logaddexp(0.0, z) - y * z          # softplus(z) - y z = -log p(y|z)
  else:
    per = 0.5 * jnp.square(z - y)
  return jnp.sum(per) / b


def _sample(likelihood: str, key: jax.Array, z: jax.Array) -> jax.Array:
  z = jax.lax.stop_gradient(z)
  if likelihood == "softmax":
    return jax.random.categorical(key, z, axis=-1)
  if likelihood == "bernoulli":
    return jax.random.bernoulli(key, jax.nn.sigmoid(z)).astype(z.dtype)
  return z + jax.random.normal(key, z.shape, z.dtype)


def _sqrt_hessian_cotangents(likelihood: str, z: jax.Array) -> jax.Array:
  """Cotangents `[K, *z.shape]` whose outer products sum to E_ŷ[∇_z nll ∇_z nllᵀ]."""
  z = jax.lax.stop_gradient(z).astype(jnp.float32)
  b = z.shape[0]
  if likelihood == "softmax":
    c = z.shape[-1]
    p = jax.nn.softmax(z, axis=-1)
    sp = jnp.sqrt(p)
    # H = diag(p) - p pᵀ = L Lᵀ with column k of L: sqrt(p_k) (e_k - p).
    eye = jnp.eye(c, dtype=z.dtype)
    cols = sp[..., :, None] * (eye - p[..., None, :])   # [..., k, j]: sqrt(p_k)(δ_kj - p_j)
    out = jnp.moveaxis(cols, -2, 0)                      # [C, ..., C]
    return out / b
  flat = z.reshape(b, -1)
  n = flat.shape[1]
  if likelihood == "bernoulli":
    s = jax.nn.sigmoid(flat)
    d = jnp.sqrt(s * (1.0 - s))
  else:
    d = jnp.ones_like(flat)
  eye = jnp.eye(n, dtype=z.dtype)
  out = eye[:, None, :] * d[None, :, :]                # [n, B, n]
  return out.reshape((n,) + z.shape) / b


# ----------------------------------------------------------------------------- layer math


def _conv_config(module) -> dict | None:
  """Patch-extraction arguments of a Conv module, or None when not covered."""
  ks = module.kernel_size
  ks = (ks,) if isinstance(ks, int) else tuple(ks)
  nd = len(ks)

  def tup(v, default=1):
    if v is None:
      return (default,) * nd
    if isinstance(v, int):
      return (v,) * nd
    return tuple(v)

  if getattr(module, "feature_group_count", 1) != 1 or getattr(module, "mask", None) is not None:
    return None
  pad = module.padding
  if isinstance(pad, str):
    if pad.upper() not in ("SAME", "VALID"):
      return None
    padding = pad.upper()
  elif isinstance(pad, int):
    padding = ((pad, pad),) * nd
  else:
    padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in pad)
  return dict(kernel_size=ks, strides=tup(module.strides), padding=padding,
              lhs_dilation=tup(module.input_dilation), rhs_dilation=tup(module.kernel_dilation))


def _patches(x: jax.Array, cfg: dict) -> jax.Array:
  """im2col rows `[N, prod(kernel_size) * in]`, ordered like the flattened kernel."""
  nd = len(cfg["kernel_size"])
  spatial = "".join("HWDABCEFG"[i] for i in range(nd))
  dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
  p = jax.lax.conv_general_dilated_patches(
      x, cfg["kernel_size"], cfg["strides"], cfg["padding"], lhs_dilation=cfg["lhs_dilation"],
      rhs_dilation=cfg["rhs_dilation"], dimension_numbers=dn,
      precision=jax.lax.Precision.HIGHEST)
  c = x.shape[-1]
  # The feature axis comes out channel-major (c, k1, k2, ...); the kernel is (k1, k2, ..., c).
  p = p.reshape(p.shape[:-1] + (c,) + tuple(cfg["kernel_size"]))
  p = jnp.moveaxis(p, nd + 1, -1)
  return p.reshape(-1, c * _prod(cfg["kernel_size"]))


def _prod(xs) -> int:
  n = 1
  for v in xs:
    n *= v
  return n


@dataclasses.dataclass(frozen=True)
class _Seen:
  """What the discovery pass learns about one call of a covered layer."""
  name: str
  kind: str
  kernel: tuple[str, ...]
  bias: tuple[str, ...] | None
  kernel_shape: tuple[int, ...]
  conv: Any          # hashable conv config (tuple of items) or None
  out_shape: tuple[int, ...]
  out_dtype: Any
  ok: bool


def _freeze(cfg: dict | None):
  return None if cfg is None else tuple(sorted(cfg.items()))


def _a_stat(x: jax.Array, layer: _Seen, dtype) -> jax.Array:
  if layer.kind == "conv":
    rows = _patches(x, dict(layer.conv))
  else:
    rows = x.reshape(-1, x.shape[-1])
  rows = rows.astype(dtype)
  if layer.bias is not None:
    rows = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), dtype)], axis=1)
  return jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST) / rows.shape[0]


def _s_stat(g: jax.Array, batch: int, dtype) -> jax.Array:
  """B · Σ ĝ ĝᵀ over all rows (and over the leading cotangent axis of fisher="exact")."""
  g = g.astype(dtype).reshape(-1, g.shape[-1])
  return batch * jnp.matmul(g.T, g, precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------- interception


class _Tape(threading.local):
  def __init__(self):
    self.active = None


_TAPE = _Tape()


class _Recorder:
  """Collects layer calls during one traced forward pass."""

  def __init__(self, mode: str, perturbations: dict | None = None):
    self.mode = mode
    self.perturbations = perturbations or {}
    self.seen: list[_Seen] = []
    self.inputs: dict[str, jax.Array] = {}

  def handle(self, name: str, kind: str, module, kernel_path, bias_path, call, x):
    y = call()
    if self.mode == "discover":
      cfg = _conv_config(module) if kind == "conv" else None
      ok = jnp.ndim(x) >= 2 and (kind == "dense" or (
          cfg is not None and jnp.ndim(x) == len(cfg["kernel_size"]) + 2))
      self.seen.append(_Seen(name, kind, kernel_path, bias_path, (), _freeze(cfg),
                             tuple(y.shape), y.dtype, ok))
      return y
    if name in self.perturbations:
      self.inputs[name] = x
      y = y + self.perturbations[name].astype(y.dtype)
    return y


@contextlib.contextmanager
def _recording(rec: _Recorder):
  prev = _TAPE.active
  _TAPE.active = rec
  try:
    yield rec
  finally:
    _TAPE.active = prev


def _linen_interceptor(next_fun, args, kwargs, context):
  rec = _TAPE.active
  module = context.module
  kind = {nn.Dense: "dense", nn.Conv: "conv"}.get(type(module))
  if rec is None or kind is None or context.method_name != "__call__" or not args:
    return next_fun(*args, **kwargs)
  path = tuple(str(p) for p in module.path)
  bias = path + ("bias",) if module.use_bias else None
  return rec.handle("/".join(path), kind, module, path + ("kernel",), bias,
                    lambda: next_fun(*args, **kwargs), args[0])


_NNX_ORIGINAL = {nnx.Linear: nnx.Linear.__call__, nnx.Conv: nnx.Conv.__call__}
_NNX_PATHS = threading.local()


def _nnx_wrapped(cls, kind):
  original = _NNX_ORIGINAL[cls]

  @functools.wraps(original)
  def call(self, x, *args, **kwargs):
    rec = _TAPE.active
    paths = getattr(_NNX_PATHS, "value", None)
    if rec is None or paths is None or type(self) is not cls or id(self) not in paths:
      return original(self, x, *args, **kwargs)
    path = paths[id(self)]
    bias = path + ("bias",) if getattr(self, "bias", None) is not None else None
    return rec.handle("/".join(path), kind, self, path + ("kernel",), bias,
                      lambda: original(self, x, *args, **kwargs), x)
  return call


@contextlib.contextmanager
def _nnx_intercept(model):
  _NNX_PATHS.value = {id(m): tuple(str(p) for p in path) for path, m in nnx.iter_modules(model)}
  nnx.Linear.__call__ = _nnx_wrapped(nnx.Linear, "dense")
  nnx.Conv.__call__ = _nnx_wrapped(nnx.Conv, "conv")
  try:
    yield
  finally:
    for cls, fn in _NNX_ORIGINAL.items():
      cls.__call__ = fn
    _NNX_PATHS.value = None


# ----------------------------------------------------------------------------- capture


def _layers_from_seen(seen: Sequence[_Seen], params) -> tuple[KfacLayers, tuple[_Seen, ...]]:
  counts: dict[str, int] = {}
  for s in seen:
    counts[s.name] = counts.get(s.name, 0) + 1
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  shapes = {param_path(p): tuple(jnp.shape(v)) for p, v in leaves}
  covered = tuple(
      dataclasses.replace(s, kernel_shape=shapes[s.kernel]) for s in seen
      if s.ok and counts[s.name] == 1 and s.kernel in shapes
      and (s.bias is None or s.bias in shapes))
  owned = set()
  for s in covered:
    owned.add(s.kernel)
    if s.bias is not None:
      owned.add(s.bias)
  uncovered = tuple("/".join(param_path(p)) for p, _ in leaves if param_path(p) not in owned)
  layers = tuple(KfacLayer(s.name, s.kind, s.kernel, s.bias, s.kernel_shape) for s in covered)
  return KfacLayers(layers, uncovered), covered


class Capture:
  """Loss, gradients and K-FAC statistics in one call; built by `linen_capture`/`nnx_capture`.

  `cap(model_or_params, inputs, targets, key=None)` returns `(loss, grads, kfac_stats)`;
  `cap.layers(model_or_params, inputs)` returns the static `KfacLayers` the transform is
  built with.
  """

  def __init__(self, forward, params_of, grads_of, loss_fn, likelihood, fisher, stats_dtype):
    check_choice("fisher", fisher, FISHERS)
    if fisher != "empirical":
      if likelihood is None:
        raise ValueError(f"fisher={fisher!r} needs likelihood= one of {list(LIKELIHOODS)}.")
    if likelihood is not None:
      check_choice("likelihood", likelihood, LIKELIHOODS)
    self._forward = forward      # (model_or_params, params, recorder, inputs) -> outputs
    self._params_of = params_of
    self._grads_of = grads_of
    self.loss_fn = loss_fn
    self.likelihood = likelihood
    self.fisher = fisher
    self.stats_dtype = stats_dtype

  def _discover(self, obj, inputs):
    params = self._params_of(obj)
    rec = _Recorder("discover")
    jax.eval_shape(lambda p, x: self._forward(obj, p, rec, x), params, inputs)
    return _layers_from_seen(rec.seen, params)

  def layers(self, model_or_params, inputs) -> KfacLayers:
    """The covered layers (and uncovered parameter paths) of the model on these inputs."""
    return self._discover(model_or_params, inputs)[0]

  def __call__(self, model_or_params, inputs, targets, *, key: jax.Array | None = None):
    if self.fisher == "sampled" and key is None:
      raise ValueError("fisher='sampled' needs a PRNG key: call cap(model, x, y, key=key).")
    _, covered = self._discover(model_or_params, inputs)
    params = self._params_of(model_or_params)
    perts = {s.name: jnp.zeros(s.out_shape, s.out_dtype) for s in covered}

    def fwd(p, pt):
      rec = _Recorder("capture", pt)
      out = self._forward(model_or_params, p, rec, inputs)
      return out, rec.inputs

    out, vjp_fn, layer_inputs = jax.vjp(fwd, params, perts, has_aux=True)
    loss, dout = jax.value_and_grad(self.loss_fn)(out, targets)
    grads, out_grads = vjp_fn(dout)
    if self.fisher == "sampled":
      y_hat = _sample(self.likelihood, key, out)
      dsampled = jax.grad(lambda z: _nll(self.likelihood, z, y_hat))(out)
      _, out_grads = vjp_fn(dsampled)
    elif self.fisher == "exact":
      cots = _sqrt_hessian_cotangents(self.likelihood, out).astype(out.dtype)
      _, out_grads = jax.vmap(lambda c: vjp_fn(c))(cots)
    dtype = self.stats_dtype
    stats = {}
    for s in covered:
      x = layer_inputs[s.name]
      stats[s.name] = LayerStats(
          a=_a_stat(jax.lax.stop_gradient(x), s, dtype),
          s=_s_stat(out_grads[s.name], x.shape[0], dtype))
    return loss, self._grads_of(model_or_params, grads), stats


def linen_capture(model: nn.Module, loss_fn: Callable[[Any, Any], jax.Array], *,
                  likelihood: str | None = None, fisher: str = "sampled",
                  variables: dict | None = None, stats_dtype=jnp.float32,
                  **apply_kwargs) -> Capture:
  """K-FAC capture for a linen module: `cap(params, inputs, targets, key=)`.

  Args:
    model: the linen module (unmodified).
    loss_fn: `(outputs, targets) -> scalar`, the mean over the batch.
    likelihood: "softmax", "bernoulli" or "gaussian"; required unless fisher="empirical".
    fisher: "sampled" (true Fisher, default), "empirical" or "exact".
    variables: other collections (e.g. {"batch_stats": ...}) passed to `apply` unchanged.
    stats_dtype: dtype of the statistics.
    **apply_kwargs: forwarded to `model.apply`.

  `params` is the "params" collection (the dict inside {"params": ...}); the gradients and
  the layer paths refer to it.
  """
  extra = dict(variables or {})

  def forward(obj, params, rec, inputs):
    with _recording(rec), nn.intercept_methods(_linen_interceptor):
      return model.apply({"params": params, **extra}, inputs, **apply_kwargs)

  return Capture(forward, lambda p: p, lambda obj, g: g, loss_fn, likelihood, fisher,
                 stats_dtype)


def nnx_capture(loss_fn: Callable[[Any, Any], jax.Array], *, likelihood: str | None = None,
                fisher: str = "sampled", stats_dtype=jnp.float32) -> Capture:
  """K-FAC capture for an NNX module: `cap(model, inputs, targets, key=)`.

  The gradients come back as the `nnx.State` of the model's `nnx.Param`s (what
  `nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads, kfac_stats=stats)` takes);
  the layer paths refer to that state. Other model state (batch statistics, RNG counters)
  is read but not written back.

  Args:
    loss_fn: `(outputs, targets) -> scalar`, the mean over the batch.
    likelihood: "softmax", "bernoulli" or "gaussian"; required unless fisher="empirical".
    fisher: "sampled" (true Fisher, default), "empirical" or "exact".
    stats_dtype: dtype of the statistics.
  """

  def params_of(model):
    return nnx.state(model, nnx.Param)

  def forward(model, params, rec, inputs):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    m = nnx.merge(graphdef, params, rest)
    with _recording(rec), _nnx_intercept(m):
      return m(inputs)

  return Capture(forward, params_of, lambda obj, g: g, loss_fn, likelihood, fisher, stats_dtype)
