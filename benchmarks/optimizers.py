"""The optimizer registry of the benchmark harness: adding a method or a peer is one entry.

An entry is an `OptimizerSpec`: a builder `(learning_rate, total_steps, problem) -> optax
transform`
(imports happen inside it, so a module that is not present only skips that row), the centre
of its learning-rate sweep, and the extra arguments its `update` reads (`obj_fn`,
`logits_fn`, `kfac_stats`, or optax's line-search triple `value`, `grad`, `value_fn`, named
"value_fn"). The runner supplies those from the problem; an entry with a
faster way of getting the loss, gradient and extras together (AdaHessian's single
forward-over-reverse pass, K-FAC's capture) gives a `value_grad` hook. An entry whose
curvature refresh is scheduled on the host (Sophia) sets `host_refresh`: the runner then
compiles a refresh step and a plain step and picks one per step.

The learning rate reaches the builder as a traced scalar inside `jax.jit`, so one
compilation serves the whole sweep; a builder that needs a Python float sets
`static_lr=True` and is compiled once per learning rate.

kfac-jax's `Optimizer` needs an older JAX (0.0.8 fails to trace on jax 0.10: its graph
matcher unpacks `get_bind_params` the old way) and runs in its own environment from
`benchmarks/kfac_bench.py`; the rows here are those that run on the installed JAX,
Google's Distributed Shampoo among them (`benchmarks.peers`).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from typing import Any, Callable

import jax
import optax

__all__ = ["OptimizerSpec", "OPTIMIZERS", "register", "sweep_grid", "available",
           "dimension_numbers_kwargs", "second_grid"]

EXTRA_ARGS = ("obj_fn", "logits_fn", "kfac_stats", "value_fn")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """One row of the benchmark.

  Attributes:
    name: identifier on the command line and in tables.
    build: ``(learning_rate, total_steps, problem) -> GradientTransformation``;
      `learning_rate` is a traced scalar unless `static_lr`.
    lr: centre of the learning-rate sweep (every optimizer gets the same grid of multiples).
    needs: extra keyword arguments of `update` ("obj_fn", "logits_fn", "kfac_stats"), or
      "value_fn": optax's line-search interface, `update(..., value=, grad=, value_fn=)`
      with the value and gradient taken from the state where the line search already
      evaluated them (`optax.value_and_grad_from_state`); such a row applies only to the
      deterministic problems (`Problem.stochastic` False), where every evaluation of the
      objective sees the same function.
    family: "optax" (baseline), "secondorder" (this library) or "peer" (another library).
    note: one line for `python -m benchmarks list`.
    value_grad: optional ``(problem, params, batch, opt_state, key) -> (loss, grads,
      extra)`` replacing the default `jax.value_and_grad` plus the extras named in `needs`
      (`key` is a fresh PRNG key for this step).
    applies: optional ``problem -> bool``; rows that do not apply are left out.
    static_lr: build needs a concrete learning rate.
    in_quick: optional ``problem -> bool`` limiting the row in the `quick` preset (for peers
      too slow to run everywhere in a few minutes).
    host_refresh: refresh every this many steps, scheduled on the host: two compiled steps,
      `update(..., refresh=True)` on steps 0, n, 2n, ... and `update(..., refresh=False)`
      otherwise. `value_grad`, if given, then runs on refresh steps only (the plain steps
      take `jax.value_and_grad` and no extras; a row that needs "kfac_stats" gets
      `capture.no_new_stats()`). Or a ``problem -> int | None`` (None: not host-scheduled
      on that problem).
    second: optional ``(keyword, values)``: a second sensitive hyperparameter, a keyword
      argument of `build`; ``values[0]`` is the default. In `full`, after the learning-rate
      sweep the runner tries the other values at the best learning rate (`second_grid`
      makes every such grid: the default, a tenth of it and ten times it).
  """

  name: str
  build: Callable[[Any, int, Any], optax.GradientTransformation]
  lr: float
  needs: tuple[str, ...] = ()
  family: str = "optax"
  note: str = ""
  value_grad: Callable | None = None
  applies: Callable[[Any], bool] | None = None
  static_lr: bool = False
  in_quick: Callable[[Any], bool] | None = None
  host_refresh: int | Callable[[Any], int | None] | None = None
  second: tuple[str, tuple[float, ...]] | None = None

  def refresh_every(self, problem) -> int | None:
    """`host_refresh` on `problem` (None: the row schedules itself)."""
    if callable(self.host_refresh):
      return self.host_refresh(problem)
    return self.host_refresh

  def applies_to(self, problem, preset: str = "full") -> bool:
    if preset == "quick" and self.in_quick is not None and not self.in_quick(problem):
      return False
    if "logits_fn" in self.needs and problem.logits_fn is None:
      return False
    if "kfac_stats" in self.needs and problem.apply is None and self.value_grad is None:
      return False
    if "value_fn" in self.needs and problem.stochastic:
      return False
    return self.applies is None or bool(self.applies(problem))


OPTIMIZERS: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
  for need in spec.needs:
    if need not in EXTRA_ARGS:
      raise ValueError(f"{spec.name}: unknown extra argument {need!r}; known: {EXTRA_ARGS}")
  if spec.second is not None:
    import inspect

    keyword, values = spec.second
    if keyword not in inspect.signature(spec.build).parameters or len(values) < 2:
      raise ValueError(f"{spec.name}: second={spec.second!r} must name a keyword of build "
                       "and give at least two values")
  OPTIMIZERS[spec.name] = spec
  return spec


def sweep_grid(spec: OptimizerSpec, points: int, factor: float = 10 ** 0.5) -> list[float]:
  """`points` learning rates spaced by `factor` around `spec.lr` (same grid for every row)."""
  half = (points - 1) / 2
  return [float(spec.lr * factor ** (i - half)) for i in range(points)]


def second_grid(keyword: str, default: float) -> tuple[str, tuple[float, ...]]:
  """The grid of a second hyperparameter, one size for every method: default, /10, x10.

  Args:
    keyword: `build`'s keyword for it (K-FAC's damping, Sophia's gamma, Shampoo's eps).
    default: the method's default value (tried first, with the learning-rate sweep).

  Returns:
    ``(keyword, (default, default / 10, default * 10))`` for `OptimizerSpec.second`.
  """
  return keyword, (default, default / 10, default * 10)


def available(spec: OptimizerSpec) -> str | None:
  """None when the row can be built here, else the reason it cannot (import error, ...)."""
  try:
    spec.build(1e-3, 10, None)
  except (ImportError, AttributeError) as err:
    return f"{type(err).__name__}: {err}"
  return None


# ----------------------------------------------------------------------------- optax baselines

# Schedules are built with peak 1 and multiplied by the learning rate, so the learning rate
# may be a traced value (optax's schedule constructors check their peak concretely).
def _warmup_cosine(lr, total_steps: int):
  warmup = max(1, total_steps // 20)
  shape = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, max(total_steps, warmup + 1),
                                             end_value=0.0)
  return lambda count: lr * shape(count)


def _cosine(lr, total_steps: int):
  shape = optax.cosine_decay_schedule(1.0, max(total_steps, 1))
  return lambda count: lr * shape(count)


# The `quick` preset runs the core baselines (sgd, momentum, adam); the other optax
# rows run in `full` (and in `quick` when named with --only).
_FULL_ONLY = lambda problem: False
# Rows with their own schedule are left out where the problem schedules every row (the
# language model): a second schedule on top would not be the row it names.
_UNSCHEDULED = lambda problem: problem.schedule is None

register(OptimizerSpec("sgd", lambda lr, n, p: optax.sgd(lr), 0.3, note="plain SGD"))
register(OptimizerSpec("momentum", lambda lr, n, p: optax.sgd(lr, momentum=0.9), 0.03,
                       note="heavy-ball momentum 0.9"))
register(OptimizerSpec("momentum_cosine",
                       lambda lr, n, p: optax.sgd(_cosine(lr, n), momentum=0.9), 0.03,
                       note="momentum 0.9, cosine decay to 0",
                       in_quick=_FULL_ONLY, applies=_UNSCHEDULED))
register(OptimizerSpec("nesterov", lambda lr, n, p: optax.sgd(lr, momentum=0.9, nesterov=True),
                       0.03, note="Nesterov momentum 0.9",
                       in_quick=_FULL_ONLY))
register(OptimizerSpec("adagrad", lambda lr, n, p: optax.adagrad(lr), 0.03, note="AdaGrad",
                       in_quick=_FULL_ONLY))
register(OptimizerSpec("rmsprop", lambda lr, n, p: optax.rmsprop(lr), 1e-3, note="RMSProp",
                       in_quick=_FULL_ONLY))
register(OptimizerSpec("adam", lambda lr, n, p: optax.adam(lr), 3e-3,
                       note="Adam (the baseline for time and memory ratios)"))
register(OptimizerSpec("adam_cosine", lambda lr, n, p: optax.adam(_warmup_cosine(lr, n)), 3e-3,
                       note="Adam, 5% linear warm-up then cosine decay",
                       in_quick=_FULL_ONLY, applies=_UNSCHEDULED))
def _adamw(lr, n, p, weight_decay=1e-4, b2=0.999):
  # The keywords are the baseline's strength test in the size ladder (benchmarks.ladder):
  # beta2 in {0.95, 0.999} x weight decay in {0.01, 0.1, 1}; the row's default is unchanged.
  return optax.adamw(lr, b2=b2, weight_decay=weight_decay)


register(OptimizerSpec("adamw", _adamw, 3e-3,
                       note="AdamW, weight decay 1e-4", in_quick=_FULL_ONLY))
register(OptimizerSpec("amsgrad", lambda lr, n, p: optax.amsgrad(lr), 3e-3, note="AMSGrad",
                       in_quick=_FULL_ONLY))
# L-BFGS: the learning rate scales the two-loop direction before the zoom line search (1 is
# optax's own default); deterministic objectives only (the sanity rows, autoencoder_full).
register(OptimizerSpec("lbfgs", lambda lr, n, p: optax.lbfgs(lr), 1.0, needs=("value_fn",),
                       note="optax.lbfgs (memory 10, zoom line search); full-batch "
                            "problems only", in_quick=_FULL_ONLY))


# ----------------------------------------------------------------------------- secondorder

def _module(name: str):
  return importlib.import_module(name)


def _adahessian_value_grad(problem, params, batch, opt_state, key):
  # One forward-over-reverse pass gives loss, gradient and z * Hz.
  hutch = _module("secondorder.transforms.hutchinson")
  value, grads, hdiag = hutch.value_grad_and_hessian_diag(
      lambda p: problem.loss(p, batch), params, opt_state)
  return value, grads, {"hessian_diag": hdiag}


register(OptimizerSpec(
    "adahessian",
    lambda lr, n, p: _module("secondorder.transforms.hutchinson").adahessian(lr),
    0.15, needs=("obj_fn",), family="secondorder",
    note="AdaHessian (Hutchinson diagonal, one forward-over-reverse pass per step)",
    value_grad=_adahessian_value_grad))


def _sophia_h_value_grad(problem, params, batch, opt_state, key):
  # Refresh steps: loss, gradient and the Hutchinson estimate from one forward-over-reverse
  # pass, with the probe the built-in estimator would draw.
  sophia = _module("secondorder.transforms.sophia")
  loss, grads, h = sophia.value_grad_and_hutchinson_estimate(
      lambda p: problem.loss(p, batch), params, opt_state)
  return loss, grads, {"hessian_diag": h}


def _sophia_g_value_grad(problem, params, batch, opt_state, key):
  # Refresh steps: loss, gradient and B * g_hat**2 from one vjp of the logits.
  sophia = _module("secondorder.transforms.sophia")
  loss, grads, h = sophia.value_grad_and_gnb_estimate(
      lambda p: problem.logits_fn(p, batch), lambda z: problem.logits_loss(z, batch),
      params, opt_state)
  return loss, grads, {"hessian_diag": h}


register(OptimizerSpec(
    "sophia_h",
    lambda lr, n, p, gamma=0.01: _module("secondorder.transforms.sophia").sophia(
        lr, estimator="hutchinson", gamma=gamma),
    1e-3, needs=("obj_fn",), family="secondorder",
    note="Sophia-H (Hutchinson estimate every 10 steps; host-scheduled, one-pass refresh); "
         "quick: sanity rows only",
    value_grad=_sophia_h_value_grad, host_refresh=10, second=second_grid("gamma", 0.01),
    in_quick=lambda problem: problem.kind == "synthetic"))
register(OptimizerSpec(
    "sophia_g",
    lambda lr, n, p, gamma=0.01: _module("secondorder.transforms.sophia").sophia(
        lr, estimator="gnb", gamma=gamma),
    1e-3, needs=("logits_fn",), family="secondorder",
    note="Sophia-G (Gauss-Newton-Bartlett estimate every 10 steps; host-scheduled, one-pass "
         "refresh)",
    value_grad=_sophia_g_value_grad, host_refresh=10, second=second_grid("gamma", 0.01)))


_KFAC_CAPTURES: dict = {}


def _kfac_capture(problem):
  """(capture, layers) of a problem's model; no layers for problems without a model."""
  capture = _module("secondorder.capture")
  if problem is None or problem.make_model is None or problem.likelihood is None:
    return None, capture.no_layers()
  # Keyed by the problem's description too: the size ladder builds `lm` at several sizes in
  # one process, and a capture's layers belong to one model.
  key = (problem.name, problem.description)
  if key not in _KFAC_CAPTURES:
    cap = capture.nnx_capture(problem.output_loss, likelihood=problem.likelihood)
    params = problem.init_params(0)
    batch = next(problem.batches(0))
    layers = cap.layers(problem.bind(params), problem.inputs(batch))
    if problem.kind == "language_model":   # what K-FAC covers, printed once per run
      print(f"[{problem.name}] {layers}", flush=True)
    _KFAC_CAPTURES[key] = (cap, layers)
  return _KFAC_CAPTURES[key]


def _kfac_value_grad(problem, params, batch, opt_state, key):
  # The capture returns loss, gradients and the per-layer Kronecker statistics (true Fisher,
  # labels sampled from the model) from one forward pass and two backward passes.
  cap, _ = _kfac_capture(problem)
  if cap is None:
    loss, grads = jax.value_and_grad(problem.loss)(params, batch)
    return loss, grads, {"kfac_stats": _module("secondorder.capture").no_stats()}
  from flax import nnx
  loss, grads, stats = cap(problem.bind(params), problem.inputs(batch), problem.labels(batch),
                           key=key)
  return loss, nnx.to_pure_dict(grads), {"kfac_stats": stats}


def _kfac_interval(problem) -> dict:
  # The language model refreshes its inverses every 10 steps (its factors are the largest).
  is_lm = problem is not None and problem.kind == "language_model"
  return {"update_interval": 10} if is_lm else {}


def _kfac_stats_every(problem) -> int | None:
  # On the language model the statistics (a training forward and two backward passes) are
  # captured every other step; the steps between take a plain gradient and
  # `kfac_stats=no_new_stats()`. Elsewhere every step captures.
  return 2 if problem is not None and problem.kind == "language_model" else None


def _kfac(lr, n, problem, damping=0.01):
  return _module("secondorder.transforms.kfac").kfac(lr, layers=_kfac_capture(problem)[1],
                                                      damping=damping, **_kfac_interval(problem))


register(OptimizerSpec(
    "kfac", _kfac, 0.1, needs=("kfac_stats",), family="secondorder",
    note="K-FAC (sampled Fisher via capture, eigendecomposition every 5 steps, KL clipping; "
         "on the language model statistics every 2 steps, eigendecomposition every 10)",
    value_grad=_kfac_value_grad, host_refresh=_kfac_stats_every,
    second=second_grid("damping", 0.01)))


def _ekfac_value_grad(problem, params, batch, opt_state, key):
  # K-FAC's capture, handed the optimizer's eigenbases: the dense layers' statistics then
  # carry the per-example second moments projected into them (EK-FAC's diagonal).
  cap, _ = _kfac_capture(problem)
  if cap is None:
    return _kfac_value_grad(problem, params, batch, opt_state, key)
  from flax import nnx
  bases = _module("secondorder.transforms.ekfac").ekfac_bases(opt_state)
  loss, grads, stats = cap(problem.bind(params), problem.inputs(batch), problem.labels(batch),
                           key=key, bases=bases)
  return loss, nnx.to_pure_dict(grads), {"kfac_stats": stats}


def _ekfac(lr, n, problem, damping=0.01):
  return _module("secondorder.transforms.ekfac").ekfac(lr, layers=_kfac_capture(problem)[1],
                                                        damping=damping,
                                                        **_kfac_interval(problem))


register(OptimizerSpec(
    "ekfac", _ekfac, 0.1, needs=("kfac_stats",), family="secondorder",
    note="EK-FAC (K-FAC's eigenbasis every 5 steps, the diagonal from per-example gradients "
         "projected into it every step, sampled Fisher, KL clipping; on the language model "
         "statistics every 2 steps, eigenbasis every 10)",
    value_grad=_ekfac_value_grad, host_refresh=_kfac_stats_every,
    second=second_grid("damping", 0.01)))


def _kfac_exact(lr, n, problem, damping=0.01):
  return _module("secondorder.transforms.kfac").kfac(lr, layers=_kfac_capture(problem)[1],
                                                      damping=damping, damping_mode="exact",
                                                      **_kfac_interval(problem))


register(OptimizerSpec(
    "kfac_exact", _kfac_exact, 0.1, needs=("kfac_stats",), family="secondorder",
    note="K-FAC with damping_mode=\"exact\" (eigendecompositions; EK-FAC's basis cost)",
    value_grad=_kfac_value_grad, host_refresh=_kfac_stats_every,
    second=second_grid("damping", 0.01)))


def _dense_only(problem):
  """The language model's layers at K-FAC's previous coverage: dense kernels only."""
  return _kfac_capture(problem)[1].only("dense")


def _kfac_prev_value_grad(problem, params, batch, opt_state, key):
  loss, grads, extra = _kfac_value_grad(problem, params, batch, opt_state, key)
  names = {layer.name for layer in _dense_only(problem)}
  return loss, grads, {"kfac_stats": {k: v for k, v in extra["kfac_stats"].items()
                                      if k in names}}


def _kfac_prev(lr, n, problem, damping=0.01):
  return _module("secondorder.transforms.kfac").kfac(lr, layers=_dense_only(problem),
                                                      damping=damping, **_kfac_interval(problem))


register(OptimizerSpec(
    "kfac_prev", _kfac_prev, 0.1, needs=("kfac_stats",), family="secondorder",
    note="K-FAC at its previous coverage on the language model: dense kernels only, the "
         "embeddings, tied head and norms on the fallback (the gain from coverage)",
    value_grad=_kfac_prev_value_grad, applies=lambda p: p.kind == "language_model",
    host_refresh=_kfac_stats_every, second=second_grid("damping", 0.01)))


def _kfac_jax(lr, n, problem):
  raise ImportError(
      "kfac-jax cannot run the language model: attention's parameter reuse is unsupported, "
      "and kfac-jax 0.0.8 does not trace on jax 0.10 (benchmarks/kfac_bench.py runs it on "
      "the digits models in its own environment)")


register(OptimizerSpec(
    "kfac_jax", _kfac_jax, 0.1, family="peer", applies=lambda p: p.kind == "language_model",
    note="kfac-jax on the language model: cannot run (see the skip reason)"))
def dimension_numbers_kwargs(make: Callable, problem) -> dict:
  """``{"weight_dimension_numbers": ...}`` when `problem` has them and `make` takes them.

  The language model's block kernels are stacked ``[layers, d_in, d_out]``: a method that
  reads leaves through dimension numbers gets the problem's, so each layer is its own matrix.
  """
  import inspect

  dims = getattr(problem, "weight_dimension_numbers", None)
  if dims is None or "weight_dimension_numbers" not in inspect.signature(make).parameters:
    return {}
  return {"weight_dimension_numbers": dims}


def _shampoo(lr, n, problem, eps=1e-6):
  # On CPU the roots use the coupled Newton iteration: with jaxlib 0.10.2 the default
  # eigendecompositions (several batched LAPACK calls in one step) deadlock the 2-thread
  # intra-op pool of a 2-core machine (gdb: jax::ParallelBatchMap waiting in both threads).
  method = "newton" if jax.default_backend() == "cpu" else "eigh"
  make = _module("secondorder.transforms.shampoo").shampoo
  return make(lr, method=method, eps=eps, **dimension_numbers_kwargs(make, problem))


register(OptimizerSpec(
    "shampoo", _shampoo, 3e-3, family="secondorder",
    note="Shampoo (blocked, Adam-grafted; coupled-Newton roots on CPU)",
    second=second_grid("eps", 1e-6)))


SOAP_LM_BLOCK_SIZE = 64


def _soap(lr, n, problem, eps=1e-8):
  # Refreshes every 10 steps (the paper's setting); eigh and QR run one matrix at a time on
  # CPU from side 32 on (secondorder.linalg.CPU_ONE_AT_A_TIME). On the language model, blocks
  # of 64 (the cpu model's width): unblocked, the 256-wide factors and bases of the MLP
  # kernels and the tied embedding make the state 5.4x AdamW's; blocked, 3.2x, at the same
  # held-out loss at the best learning rate (docs/methods/soap.md, "Memory").
  make = _module("secondorder.transforms.soap").soap
  blocks = {}
  if problem is not None and getattr(problem, "name", None) == "lm":
    blocks = {"block_size": SOAP_LM_BLOCK_SIZE}
  return make(lr, precondition_frequency=10, eps=eps, **blocks,
              **dimension_numbers_kwargs(make, problem))


register(OptimizerSpec(
    "soap", _soap, 3e-3, family="secondorder",
    note="SOAP (Adam in the eigenbasis of Shampoo's factors, refreshed every 10 steps)",
    second=second_grid("eps", 1e-8)))


def _kl_shampoo(lr, n, problem, eps=1e-8):
  # SOAP's settings: refreshes every 10 steps, and on the language model blocks of
  # SOAP_LM_BLOCK_SIZE, so the two rows keep factors of the same sides. No grafting. The
  # eigenvalue estimates start from the first step's statistics (the library's default);
  # the second hyperparameter is the damping eps, as SOAP's.
  make = _module("secondorder.transforms.kl_shampoo").kl_shampoo
  blocks = {}
  if problem is not None and getattr(problem, "name", None) == "lm":
    blocks = {"block_size": SOAP_LM_BLOCK_SIZE}
  return make(lr, precondition_frequency=10, eps=eps, **blocks,
              **dimension_numbers_kwargs(make, problem))


register(OptimizerSpec(
    "kl_shampoo", _kl_shampoo, 3e-3, family="secondorder",
    note="KL-Shampoo (Shampoo's factors fitted jointly under KL, eigenbases refreshed every "
         "10 steps; no grafting)",
    in_quick=_FULL_ONLY, second=second_grid("eps", 1e-8)))


# Gradient accumulation: k = 4 mini-batches per update, so these rows make a quarter of the
# updates of the others over the same data; `multisteps_adamw_k4` is optax's buffered
# accumulation of the same optimizer (an optax row: `full` only, like the other optax rows
# beyond the core three; `benchmarks.accumulate_bench` compares against it directly).
ACCUMULATE_K = 4


def _accumulate(name):
  return getattr(_module("secondorder.transforms.accumulate"), name)


register(OptimizerSpec(
    "accumulated_adamw_k4",
    lambda lr, n, p: _accumulate("accumulated_adamw")(lr, ACCUMULATE_K), 3e-3,
    family="secondorder",
    note="AdamW accumulating 4 gradients inside its moments (no gradient buffer)"))
register(OptimizerSpec(
    "adam_beta_tilde_k4",
    lambda lr, n, p: optax.chain(
        _accumulate("scale_by_adam_beta_tilde")(ACCUMULATE_K),
        _accumulate("every_k_gate")(ACCUMULATE_K),
        optax.scale_by_learning_rate(lr)), 3e-3, family="secondorder",
    note="Adam with beta~ = 1 - (1 - beta)/4, updating every 4th step; quick: sanity rows only",
    in_quick=lambda problem: problem.kind == "synthetic"))
register(OptimizerSpec(
    "multisteps_adamw_k4",
    lambda lr, n, p: optax.MultiSteps(optax.adamw(lr, weight_decay=1e-4),
                                      ACCUMULATE_K).gradient_transformation(), 3e-3,
    note="optax.MultiSteps(adamw, 4): buffered accumulation", in_quick=_FULL_ONLY))


# ----------------------------------------------------------------------------- peers

def _optax_sophia(lr, n, p, gamma=0.01):
  return optax.contrib.sophia(lr, gamma=gamma)


register(OptimizerSpec(
    "optax_sophia", _optax_sophia, 1e-3, needs=("obj_fn",), family="peer",
    second=second_grid("gamma", 0.01),
    note="optax.contrib.sophia (Sophia-H, Hutchinson every 10 steps); quick: sanity rows "
         "only (the networks in full, and in benchmarks.sophia_lm beside both Sophias)",
    in_quick=lambda problem: problem.kind == "synthetic"))


def _dist_shampoo(lr, n, p):
  # The reference JAX Shampoo (optax-shampoo 0.0.6), loaded with benchmarks.peers' patch;
  # the settings of the `shampoo` row: blocks of 128, roots every 10 steps from step 10,
  # beta2 0.999, momentum 0.9, its own normalized-RMSProp grafting.
  from benchmarks.peers import distributed_shampoo
  ds = distributed_shampoo()
  return ds.distributed_shampoo(
      learning_rate=lr, block_size=128, beta1=0.9, beta2=0.999,
      preconditioning_compute_steps=10, start_preconditioning_step=10,
      graft_type=ds.GraftingType.RMSPROP_NORMALIZED, nesterov=False,
      generate_training_metrics=False)


register(OptimizerSpec(
    "dist_shampoo", _dist_shampoo, 3e-4, family="peer",
    note="Google's Distributed Shampoo (optax-shampoo 0.0.6, load-time patched); quick: "
         "sanity rows only (its step is 8-90x Adam's on the CPU network problems)",
    in_quick=lambda problem: problem.kind == "synthetic"))


def _psgd_kron(lr, n, p):
  # psgd-jax 0.2.9 imports `optax._src.clipping`, which optax >= 0.2.5 moved to
  # `optax.transforms._clipping` (psgd's kron does not use it): alias the module first.
  if "psgd_jax.kron" not in sys.modules:
    import optax._src
    import optax.transforms._clipping as clipping
    optax._src.clipping = clipping
    sys.modules.setdefault("optax._src.clipping", clipping)
  from psgd_jax.kron import kron
  return kron(lr, precond_update_precision=None)


register(OptimizerSpec(
    "psgd_kron", _psgd_kron, 1e-3, family="peer",
    note="PSGD Kron (pip install psgd-jax==0.2.9 --no-deps); quick: sanity rows only",
    in_quick=lambda problem: problem.kind == "synthetic"))


def _muon(lr, n, problem):
  # Matrices (2-D leaves, or the language model's stacked kernels through its dimension
  # numbers) get Newton-Schulz orthogonalised momentum; every other leaf Adam at 0.15 x the
  # learning rate (3e-3 at the grid's centre 0.02).
  dims = getattr(problem, "weight_dimension_numbers", None)
  return optax.contrib.muon(lr, adam_learning_rate=0.15 * lr,
                            muon_weight_dimension_numbers=_matrices_only(dims))


def _matrices_only(dims):
  """`dims` with every stack of vectors (an empty reduction side) replaced by None:
  optax's Muon reads such a spec as matrices of one row and orthogonalises them, where the
  stacked biases and norm scales belong with its Adam."""
  if dims is None:
    return None

  def keep(spec):
    return None if spec is not None and spec.reduction_axis == () else spec

  return lambda params: jax.tree.map(keep, dims(params) if callable(dims) else dims,
                                     is_leaf=lambda x: x is None or isinstance(
                                         x, optax.contrib.MuonDimensionNumbers))


register(OptimizerSpec(
    "muon", _muon, 0.02, family="peer",
    note="optax.contrib.muon (Newton-Schulz momentum on matrices, Adam at 0.15 x lr on the "
         "rest); quick: sanity rows and the language model",
    in_quick=lambda problem: problem.kind in ("synthetic", "language_model")))
