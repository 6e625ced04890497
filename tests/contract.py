"""The shared contract every secondorder transform and alias must satisfy.

A `Case` describes one public transform: how to build it for a learning rate (a float or a
schedule), which keyword extra arguments it needs on a given `Problem`, and the learning rate
and step count that make it converge. The `check_*` functions each take a `Case` and assert
one clause of the contract; `tests/test_contract.py` applies all of them to every case.

Problems are small, so that compilation (not arithmetic) dominates, and each `check_*`
compiles at most one function per case; compiled functions are cached per (case, problem,
wrapper) so checks that only need a plain step share one executable.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
ExtraArgsFn = Callable[["Problem", PyTree], Mapping[str, Any]]


# ----------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
  """A deterministic objective with a known (or reference-computed) minimum.

  Attributes:
    name: identifier used by `Case.problems`.
    params: initial parameters (float32 pytree).
    loss: params -> scalar loss.
    f_min: the minimum value of `loss`.
    tol: convergence means `loss <= f_min + tol * (loss(params) - f_min)`.
    logits_fn: params -> logits [B, C] with `loss = mean softmax-CE(logits, labels)`, for
      problems that are classification problems (Sophia-G needs it); None otherwise.
    labels: the integer labels [B] that `logits_fn`'s logits are trained on, for the
      Gauss-Newton methods' `loss_fn`; None means the shared classification data's labels
      (those of every classification problem built here).
  """
  name: str
  params: PyTree
  loss: Callable[[PyTree], jax.Array]
  f_min: float
  tol: float
  logits_fn: Callable[[PyTree], jax.Array] | None = None
  labels: jax.Array | None = None

  def threshold(self) -> float:
    f0 = float(self.loss(self.params))
    return self.f_min + self.tol * (f0 - self.f_min)


def _spd(key, n: int, log10_cond: float) -> np.ndarray:
  """A random symmetric positive-definite matrix with eigenvalues logspaced over 10**cond."""
  q, _ = np.linalg.qr(np.asarray(jax.random.normal(key, (n, n)), np.float64))
  eig = np.logspace(0.0, log10_cond, n)
  return (q * eig) @ q.T


def quadratic() -> Problem:
  """Separable quadratic ½ Σ h_i (x_i − c_i)², curvatures logspaced over a factor 10."""
  h = jnp.logspace(0.0, 1.0, 8, dtype=jnp.float32)
  c = jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32)

  def loss(x):
    return 0.5 * jnp.sum(h * (x.astype(jnp.float32) - c) ** 2)

  return Problem("quadratic", jnp.zeros(8, jnp.float32), loss, 0.0, 1e-6)


def matrix_quadratic() -> Problem:
  """½‖L (W − W*) R‖²_F: a Kronecker-structured quadratic with condition number 100."""
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  left = jnp.asarray(_spd(k1, 4, 0.5), jnp.float32)    # L² has condition 10
  right = jnp.asarray(_spd(k2, 3, 0.5), jnp.float32)   # R² has condition 10
  w_star = jax.random.normal(k3, (4, 3), jnp.float32)

  def loss(w):
    r = left @ (w.astype(jnp.float32) - w_star) @ right
    return 0.5 * jnp.sum(r * r)

  return Problem("matrix_quadratic", jnp.zeros((4, 3), jnp.float32), loss, 0.0, 1e-6)


def _mixed_params(dtype=jnp.float32) -> dict:
  return {
      "s": jnp.zeros((), dtype),             # 0-D
      "b": jnp.zeros((3,), dtype),           # 1-D
      "w": jnp.zeros((2, 3), dtype),         # 2-D
      "t": jnp.zeros((2, 2, 2), dtype),      # 3-D
  }


def mixed_pytree() -> Problem:
  """A dict with 0-D, 1-D, 2-D and 3-D leaves; per-leaf curvature plus a weak coupling."""
  key = jax.random.key(2)
  target = {}
  scale = {}
  for i, (name, leaf) in enumerate(sorted(_mixed_params().items())):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    target[name] = jax.random.normal(k1, leaf.shape, jnp.float32)
    scale[name] = jnp.exp(jax.random.uniform(k2, leaf.shape, jnp.float32, 0.0, jnp.log(10.0)))

  def loss(p):
    diff = jax.tree.map(lambda x, t: x.astype(jnp.float32) - t, p, target)
    sep = sum(0.5 * jnp.sum(scale[k] * diff[k] ** 2) for k in diff)
    coupling = 0.05 * sum(jnp.sum(d) for d in diff.values()) ** 2
    return sep + coupling

  return Problem("mixed_pytree", _mixed_params(), loss, 0.0, 1e-6)


def stacked_dimension_numbers(params: PyTree) -> PyTree:
  """`weight_dimension_numbers` of `stacked_layers` (a function of params, so that it also
  fits the partial trees `optax.masked` passes): every 3-D leaf is `[L, m, n]`, L layers."""
  from secondorder.dimension_numbers import MuonDimensionNumbers  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: MuonDimensionNumbers(1, 2) if jnp.ndim(x) == 3 else None,
                      params)


def stacked_layers() -> Problem:
  """Three scan-stacked layers `[3, 4, 3]` (one leaf, read with `stacked_dimension_numbers`)
  and a bias: ½ Σ_l ‖A_l (W_l − W*_l) B_l‖²_F with a different Kronecker quadratic per layer."""
  keys = jax.random.split(jax.random.key(4), 7)
  left = jnp.stack([jnp.asarray(_spd(keys[l], 4, 0.5), jnp.float32) for l in range(3)])
  right = jnp.stack([jnp.asarray(_spd(keys[3 + l], 3, 0.5), jnp.float32) for l in range(3)])
  w_star = jax.random.normal(keys[6], (3, 4, 3), jnp.float32)
  b_star = jnp.linspace(-1.0, 1.0, 3, dtype=jnp.float32)

  def loss(p):
    r = left @ (p["stack"].astype(jnp.float32) - w_star) @ right
    return 0.5 * jnp.sum(r * r) + 0.5 * jnp.sum((p["b"].astype(jnp.float32) - b_star) ** 2)

  params = {"stack": jnp.zeros((3, 4, 3), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}
  return Problem("stacked_layers", params, loss, 0.0, 1e-6)


def rosenbrock() -> Problem:
  """(1 − x)² + 100 (y − x²)² from the classic start (−1.2, 1)."""

  def loss(z):
    z = z.astype(jnp.float32)
    return (1.0 - z[0]) ** 2 + 100.0 * (z[1] - z[0] ** 2) ** 2

  return Problem("rosenbrock", jnp.array([-1.2, 1.0], jnp.float32), loss, 0.0, 1e-3)


def _classification_data(num_classes=3, batch=128, seed=3):
  key = jax.random.key(seed)
  kx, kz, kf, kw, kl = jax.random.split(key, 5)
  x = jax.random.normal(kx, (batch, 3), jnp.float32)
  z = jax.random.normal(kz, (batch, 2, 2), jnp.float32)
  f = jax.random.normal(kf, (batch, num_classes), jnp.float32)
  w_true = jax.random.normal(kw, (3, num_classes), jnp.float32)
  # Labels drawn from a teacher's softmax: not separable, so the minimum is finite.
  labels = jax.random.categorical(kl, x @ w_true)
  return x, z, f, labels


def _reference_minimum(loss, params, iterations: int = 30) -> float:
  """The minimum of a convex loss, by Newton's method on the flattened parameters (with a
  tiny ridge for the softmax's flat directions)."""
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  f = lambda v: loss(unravel(v))

  @jax.jit
  def newton(v):
    g = jax.grad(f)(v)
    h = jax.hessian(f)(v)
    return v - jnp.linalg.solve(h + 1e-6 * jnp.eye(v.size, dtype=v.dtype), g)

  for _ in range(iterations):
    flat = newton(flat)
  return float(f(flat))


def _ce(logits, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels))


@functools.cache
def softmax_regression() -> Problem:
  """Multinomial logistic regression: W [3, 3] and bias [3], mean cross-entropy."""
  x, _, _, labels = _classification_data()
  params = {"w": jnp.zeros((3, 3), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}

  def logits_fn(p):
    return x @ p["w"].astype(jnp.float32) + p["b"].astype(jnp.float32)

  def loss(p):
    return _ce(logits_fn(p), labels)

  f_min = _reference_minimum(loss, params)
  return Problem("softmax_regression", params, loss, f_min, 1e-3, logits_fn)


@functools.cache
def mixed_classifier() -> Problem:
  """A linear classifier whose parameters are a dict with 0-D, 1-D, 2-D and 3-D leaves."""
  x, z, f, labels = _classification_data()

  def logits_fn(p):
    p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
    return x @ p["w"] + jnp.einsum("bij,ijc->bc", z, p["t"]) + p["b"] + p["s"] * f

  def loss(p):
    return _ce(logits_fn(p), labels)

  params = {
      "s": jnp.zeros((), jnp.float32),
      "b": jnp.zeros((3,), jnp.float32),
      "w": jnp.zeros((3, 3), jnp.float32),
      "t": jnp.zeros((2, 2, 3), jnp.float32),
  }
  f_min = _reference_minimum(loss, params)
  return Problem("mixed_classifier", params, loss, f_min, 1e-3, logits_fn)


DEFAULT_STEPS = {"quadratic": 200, "matrix_quadratic": 200, "mixed_pytree": 200,
                 "rosenbrock": 1000, "softmax_regression": 300, "mixed_classifier": 300,
                 "dense_softmax": 300}
def _dense_setup():
  """A linen Dense(3) softmax regression with its K-FAC capture (exact Fisher, no key)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from secondorder import capture  # pylint: disable=g-import-not-at-top
  x, _, _, labels = _classification_data()
  model = nn.Dense(3)
  params = jax.tree.map(jnp.zeros_like, model.init(jax.random.key(0), x)["params"])
  cap = capture.linen_capture(
      model, lambda logits, y: _ce(logits, y), likelihood="softmax", fisher="exact")
  return model, x, labels, params, cap


_DENSE = None


def _dense():
  global _DENSE
  if _DENSE is None:
    _DENSE = _dense_setup()
  return _DENSE


def dense_softmax() -> Problem:
  """Softmax regression written as a flax.linen Dense layer, so K-FAC covers it."""
  model, x, labels, params, _ = _dense()

  def logits_fn(p):
    p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
    return model.apply({"params": p}, x)

  def loss(p):
    return _ce(logits_fn(p), labels)

  return Problem("dense_softmax", params, loss, _reference_minimum(loss, params), 1e-3, logits_fn)


def dense_layers():
  """The K-FAC layer description of `dense_softmax` (one covered Dense layer)."""
  _, x, _, params, cap = _dense()
  return cap.layers(params, x)


def kfac_capture_args(problem: Problem, params: PyTree) -> dict:
  """`kfac_stats=` from the capture of the `dense_softmax` model at the current params."""
  del problem
  _, x, labels, _, cap = _dense()
  _, _, stats = cap(params, x, labels)
  return {"kfac_stats": stats}


def ekfac_capture_args(problem: Problem, params: PyTree, opt_state=None) -> dict:
  """`kfac_stats=` with EK-FAC's projected moments for `dense_softmax`, measured in the
  eigenbases of `opt_state` (`ekfac_bases`), as a training loop does (`call_extra_args`
  hands it the state). Without `opt_state`, in the eigenbases of this batch's own factors:
  the plumbing is checked, not the moments' basis."""
  del problem
  from secondorder.transforms.ekfac import ekfac_bases  # pylint: disable=g-import-not-at-top
  _, x, labels, _, cap = _dense()
  if opt_state is not None:
    _, _, stats = cap(params, x, labels, bases=ekfac_bases(opt_state))
    return {"kfac_stats": stats}
  _, _, stats = cap(params, x, labels)
  bases = {n: (jnp.linalg.eigh(st.a)[1], jnp.linalg.eigh(st.s)[1]) for n, st in stats.items()}
  _, _, stats = cap(params, x, labels, bases=bases)
  return {"kfac_stats": stats}


def call_extra_args(extra_args: ExtraArgsFn, problem: Problem, params: PyTree, opt_state
                    ) -> Mapping[str, Any]:
  """`extra_args(problem, params)`, also handed `opt_state=` (the state before the step)
  when it takes one."""
  if "opt_state" in inspect.signature(extra_args).parameters:
    return extra_args(problem, params, opt_state=opt_state)
  return extra_args(problem, params)


REGRESSION_PROBLEMS = ("quadratic", "matrix_quadratic", "mixed_pytree", "rosenbrock")
CLASSIFICATION_PROBLEMS = ("softmax_regression", "mixed_classifier")

_PROBLEM_BUILDERS = {
    "quadratic": quadratic,
    "matrix_quadratic": matrix_quadratic,
    "mixed_pytree": mixed_pytree,
    "rosenbrock": rosenbrock,
    "softmax_regression": softmax_regression,
    "mixed_classifier": mixed_classifier,
    "dense_softmax": dense_softmax,
    "stacked_layers": stacked_layers,
}


@functools.cache
def get_problem(name: str) -> Problem:
  return _PROBLEM_BUILDERS[name]()


# ----------------------------------------------------------------------------------------
# Extra arguments
# ----------------------------------------------------------------------------------------


def no_extra_args(problem: Problem, params: PyTree) -> dict:
  del problem, params
  return {}


def obj_fn_args(problem: Problem, params: PyTree) -> dict:
  """`obj_fn=` for Hessian-based methods (Hutchinson, Sophia-H)."""
  del params
  return {"obj_fn": problem.loss}


def logits_fn_args(problem: Problem, params: PyTree) -> dict:
  """`logits_fn=` for Gauss-Newton-Bartlett methods (Sophia-G); needs a classification problem."""
  del params
  if problem.logits_fn is None:
    raise ValueError(f"problem {problem.name} has no logits_fn")
  return {"logits_fn": problem.logits_fn}


def gauss_newton_args(problem: Problem, params: PyTree) -> dict:
  """`logits_fn=` and `loss_fn=` (softmax cross-entropy on the problem's labels) for
  Gauss-Newton methods (Hessian-free); needs a classification problem. A problem with its
  own batch (`Problem.labels`) is trained on those labels, any other on the shared ones."""
  from secondorder.curvature.losses import softmax_cross_entropy  # pylint: disable=g-import-not-at-top
  labels = _classification_labels() if problem.labels is None else problem.labels
  return {**logits_fn_args(problem, params), "loss_fn": softmax_cross_entropy(labels)}


@functools.cache
def _classification_labels():
  """The labels every classification problem here is trained on (concrete, even when first
  asked for inside a trace)."""
  with jax.ensure_compile_time_eval():
    return _classification_data()[3]


# ----------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
  """One public transform under the contract.

  Attributes:
    name: test id.
    make: learning_rate (float or schedule) -> GradientTransformation; must take the
      argument by the name `learning_rate` (optax.inject_hyperparams calls it by keyword).
      For a primitive without a learning rate use
      `lambda learning_rate: optax.chain(primitive(...), optax.scale_by_learning_rate(learning_rate))`.
    extra_args: (problem, params) -> dict of keyword extra arguments for `update`. Called
      inside the traced step with the current params; one that takes `opt_state=` is also
      handed the optimizer state before the step (`call_extra_args`).
    lr: learning rate for convergence, a float or a dict problem name -> float.
    steps: number of steps for convergence, an int or a dict problem name -> int.
    problems: the convergence problems that apply to this case.
    check_problem: the problem the non-convergence checks run on.
    primitive: optional (factory, kwargs) or (factory, kwargs, static_args): checks that
      `optax.inject_hyperparams(factory, static_args)(**kwargs)` (numbers, defaults
      included, become injected arrays) gives the same updates as `factory(**kwargs)`,
      and a state of the same structure.
    alias: optional (factory, kwargs): the alias itself under
      `optax.inject_hyperparams(factory)(**kwargs)` without `static_args` (every default
      injected, so no `**kwargs` in its signature and no state-shaping number left as a
      default) gives the updates and the state structure of `factory(**kwargs)`.
    lr_is_last: the learning rate only scales the final update (state evolution does not
      depend on it) and a schedule is evaluated at the call count, so a schedule's updates
      are the constant-lr ones times schedule/lr.
    converge_lr: problem name -> learning rate (float or schedule) for convergence only,
      overriding `lr` there (e.g. a cosine decay for methods whose clipped or normalised
      steps oscillate at a constant rate).
    skip: check name -> the reason this check does not apply to the case.
    xfail: check name -> a known defect of the transform (strict xfail: the test fails
      loudly once the defect is fixed, so the entry can go).
  """
  name: str
  make: Callable[[Any], optax.GradientTransformation]
  extra_args: ExtraArgsFn = no_extra_args
  lr: float | Mapping[str, float] = 1e-2
  steps: int | Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_STEPS))
  problems: tuple[str, ...] = REGRESSION_PROBLEMS
  check_problem: str = "mixed_pytree"
  primitive: tuple | None = None
  alias: tuple | None = None
  lr_is_last: bool = True
  converge_lr: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  skip: Mapping[str, str] = dataclasses.field(default_factory=dict)
  xfail: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def lr_for(self, problem: str) -> float:
    return self.lr[problem] if isinstance(self.lr, Mapping) else self.lr

  def steps_for(self, problem: str) -> int:
    return self.steps[problem] if isinstance(self.steps, Mapping) else self.steps

  def __repr__(self) -> str:  # short pytest ids / messages
    return f"Case({self.name})"


def generic_method_cases(cases):
  """The library's cases (optax baselines dropped) that run on any params pytree: the
  K-FAC cases with a covered layer need the `dense_softmax` model and are left out."""
  return [c for c in cases
          if not c.name.startswith("optax_")
          and c.extra_args not in (kfac_capture_args, ekfac_capture_args)]


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def cast_tree(tree: PyTree, dtype) -> PyTree:
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def grads_of(problem: Problem, params: PyTree) -> PyTree:
  return jax.grad(problem.loss)(params)


def _masked_subproblem(problem: Problem, full_params: PyTree) -> Problem:
  """The problem seen by a transform under optax.masked: loss of the masked params only.

  Masked-out leaves (optax.MaskedNode) are filled in from `full_params`.
  """
  is_masked = lambda x: isinstance(x, optax.MaskedNode)

  def merge(sub):
    return jax.tree.map(lambda s, f: jax.lax.stop_gradient(f) if is_masked(s) else s,
                        sub, full_params, is_leaf=is_masked)

  logits_fn = None if problem.logits_fn is None else (lambda sub: problem.logits_fn(merge(sub)))
  return dataclasses.replace(problem, loss=lambda sub: problem.loss(merge(sub)),
                             logits_fn=logits_fn)


def mask_tree(mask: PyTree, params: PyTree) -> PyTree:
  return jax.tree.map(lambda m, p: p if m else optax.MaskedNode(), mask, params)


class TraceCounter:
  """Counts how many times a Python function is traced by jax.jit."""

  def __init__(self):
    self.count = 0

  def __call__(self, fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
      self.count += 1
      return fn(*args, **kwargs)
    return wrapped


def make_update_fn(case: Case, tx: optax.GradientTransformation, problem: Problem,
                   *, masked: PyTree | None = None, unexpected: Mapping[str, Any] | None = None,
                   counter: TraceCounter | None = None):
  """jit(update(grads, state, params)) with the case's extra args built inside the trace."""

  def update(grads, state, params):
    if masked is not None:
      extra = call_extra_args(case.extra_args, _masked_subproblem(problem, params),
                              mask_tree(masked, params), state)
    else:
      extra = call_extra_args(case.extra_args, problem, params, state)
    extra = dict(extra)
    if unexpected:
      extra.update(unexpected)
    return tx.update(grads, state, params, **extra)

  if counter is not None:
    update = counter(update)
  return jax.jit(update)


_CACHE: dict = {}


def plain_update_fn(case: Case, problem_name: str | None = None):
  """The cached (update_fn, tx, TraceCounter) of `case` on its check problem, lr = case lr."""
  problem_name = problem_name or case.check_problem
  key = ("plain", case.name, problem_name)
  if key not in _CACHE:
    problem = get_problem(problem_name)
    tx = case.make(case.lr_for(problem_name))
    counter = TraceCounter()
    _CACHE[key] = (make_update_fn(case, tx, problem, counter=counter), tx, counter)
  return _CACHE[key]


def assert_trees_close(a, b, rtol=1e-6, atol=1e-6, msg="", leaf_scale=False):
  """Leafwise `assert_allclose`; with `leaf_scale`, entries near zero of a leaf are held
  to `rtol` times the leaf's largest entry (float32 rounding of two compilations of one
  computation is relative to the values it combined, not to each result)."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb, f"{msg}: tree structures differ: {ta} vs {tb}"
  for i, (x, y) in enumerate(zip(la, lb)):
    if jnp.issubdtype(jnp.asarray(x).dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    x = np.asarray(x, np.float64) if np.asarray(x).dtype.kind == "V" else np.asarray(x)
    y = np.asarray(y)
    tol = atol
    if leaf_scale and y.size and np.issubdtype(y.dtype, np.inexact):
      tol = max(atol, rtol * float(np.max(np.abs(y.astype(np.float64)))))
    np.testing.assert_allclose(x, y, rtol=rtol, atol=tol, err_msg=f"{msg}: leaf {i}")


def assert_trees_equal(a, b, msg=""):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb, f"{msg}: tree structures differ: {ta} vs {tb}"
  for i, (x, y) in enumerate(zip(la, lb)):
    if jnp.issubdtype(jnp.asarray(x).dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{msg}: leaf {i}")


def _assert_finite(tree, msg):
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = jnp.asarray(leaf)
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      assert bool(jnp.all(jnp.isfinite(leaf))), f"{msg}: non-finite leaf {jax.tree_util.keystr(path)}"


def _nonzero(tree) -> bool:
  return any(bool(jnp.any(jnp.asarray(x) != 0)) for x in jax.tree.leaves(tree))


def _grads_sequence(problem: Problem, n: int, seed: int = 0):
  """n distinct gradient-shaped pytrees near the initial params' gradient."""
  g0 = grads_of(problem, problem.params)
  out = []
  for i in range(n):
    leaves, treedef = jax.tree.flatten(g0)
    keys = jax.random.split(jax.random.key(seed + i), len(leaves))
    leaves = [g + 0.1 * jax.random.normal(k, jnp.shape(g), jnp.float32).astype(jnp.asarray(g).dtype)
              for g, k in zip(leaves, keys)]
    out.append(jax.tree.unflatten(treedef, leaves))
  return out


# ----------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------


def check_jit_no_recompile(case: Case) -> None:
  """jit works, updates are finite and in the params' dtype, the 2nd call does not retrace."""
  fn, tx, counter = plain_update_fn(case)
  problem = get_problem(case.check_problem)
  params = problem.params
  state = tx.init(params)
  g1, g2 = _grads_sequence(problem, 2)
  u1, state1 = fn(g1, state, params)
  p1 = optax.apply_updates(params, u1)
  u2, state2 = fn(g2, state1, p1)
  jax.block_until_ready(u2)
  assert counter.count == 1, f"update retraced: traced {counter.count} times for 2 calls"
  _assert_finite((u1, u2), "updates")
  assert _nonzero((u1, u2)), "both updates are all zero"
  assert jax.tree.structure(state2) == jax.tree.structure(state)


def check_state_roundtrip(case: Case) -> None:
  """The state is a pytree of arrays; jnp.asarray (and a numpy round trip of its leaves)
  give a state that the same compiled update accepts without retracing and with the same
  result."""
  fn, tx, counter = plain_update_fn(case)
  problem = get_problem(case.check_problem)
  params = problem.params
  (g1, g2) = _grads_sequence(problem, 2)
  _, state = fn(g1, tx.init(params), params)
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    assert isinstance(leaf, (jax.Array, np.ndarray)), (
        f"state leaf {jax.tree_util.keystr(path)} is {type(leaf).__name__}, not an array")
  before = counter.count
  again = jax.tree.map(jnp.asarray, state)
  u_ref, s_ref = fn(g2, state, params)
  u_rt, s_rt = fn(g2, again, params)
  assert_trees_equal(u_ref, u_rt, "updates after jnp.asarray round trip")
  assert_trees_equal(s_ref, s_rt, "state after jnp.asarray round trip")

  def through_numpy(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(jnp.asarray(np.asarray(jax.random.key_data(x))),
                                      impl=jax.random.key_impl(x))
    return jnp.asarray(np.asarray(x))

  u_np, _ = fn(g2, jax.tree.map(through_numpy, state), params)
  assert_trees_equal(u_ref, u_np, "updates after numpy round trip")
  assert counter.count == before, "a round-tripped state made the update retrace"


def check_unexpected_kwargs(case: Case) -> None:
  """Unknown keyword extra arguments are ignored."""
  fn, tx, _ = plain_update_fn(case)
  problem = get_problem(case.check_problem)
  params = problem.params
  (g1,) = _grads_sequence(problem, 1)
  state = tx.init(params)
  other = make_update_fn(case, tx, problem,
                         unexpected={"not_an_arg": jnp.ones(3), "another_one": "text",
                                     "batch_stats": {"x": jnp.zeros(())}})
  u_ref, s_ref = fn(g1, state, params)
  u, s = other(g1, state, params)
  assert_trees_equal(u_ref, u, "updates with unknown kwargs")
  assert_trees_equal(s_ref, s, "state with unknown kwargs")


def check_dtype(case: Case, dtype) -> None:
  """Updates come back in the params' dtype (bf16, f32; f64 under x64); finite state."""
  problem = get_problem(case.check_problem)

  def run():
    params = cast_tree(problem.params, dtype)
    if jnp.dtype(dtype) == jnp.float32:
      fn, tx, _ = plain_update_fn(case)
    else:
      tx = case.make(case.lr_for(problem.name))
      fn = make_update_fn(case, tx, problem)
    state = tx.init(params)
    grads = cast_tree(_grads_sequence(problem, 1)[0], dtype)
    u, state = fn(grads, state, params)
    p = optax.apply_updates(params, u)
    u2, state = fn(cast_tree(grads_of(problem, p), dtype), state, p)
    for name, tree in (("first", u), ("second", u2)):
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        assert leaf.dtype == jnp.dtype(dtype), (
            f"{name} update leaf {jax.tree_util.keystr(path)} has dtype {leaf.dtype}, params {dtype}")
    _assert_finite((u, u2, state), f"{jnp.dtype(dtype).name} step")
    assert _nonzero((u, u2)), "both updates are all zero"

  if jnp.dtype(dtype) == jnp.float64:
    with jax.enable_x64(True):
      run()
  else:
    run()


def check_inject_hyperparams(case: Case) -> None:
  """optax.inject_hyperparams(make)(learning_rate=lr) matches make(lr); lr=0 gives 0 updates."""
  problem = get_problem(case.check_problem)
  lr = case.lr_for(problem.name)
  fn, tx, _ = plain_update_fn(case)
  injected = optax.inject_hyperparams(case.make)(learning_rate=lr)
  fn_inj = make_update_fn(case, injected, problem)
  params = problem.params
  g1, g2 = _grads_sequence(problem, 2)
  s_ref, s_inj = tx.init(params), injected.init(params)
  u_ref, s_ref = fn(g1, s_ref, params)
  u_inj, s_inj = fn_inj(g1, s_inj, params)
  assert_trees_close(u_ref, u_inj, rtol=1e-5, atol=1e-7, msg="injected vs plain, step 1")
  u_ref, s_ref = fn(g2, s_ref, params)
  u_inj, s_inj = fn_inj(g2, s_inj, params)
  assert_trees_close(u_ref, u_inj, rtol=1e-5, atol=1e-7, msg="injected vs plain, step 2")
  # The injected value is the one used.
  s_inj.hyperparams["learning_rate"] = jnp.zeros_like(s_inj.hyperparams["learning_rate"])
  u_zero, _ = fn_inj(g1, s_inj, params)
  assert not _nonzero(u_zero), "learning_rate injected as 0 still moves the params"

  factories = []
  if case.primitive is not None:
    factory, kwargs, *static = case.primitive
    factories.append((factory, kwargs, static[0] if static else ()))
  if case.alias is not None:
    factories.append((*case.alias, ()))
  for factory, kwargs, static in factories:
    plain = factory(**kwargs)
    inj = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
    f_plain = make_update_fn(case, plain, problem)
    f_inj = make_update_fn(case, inj, problem)
    sp, si = plain.init(params), inj.init(params)
    # Checkpoints load either way: numbers and injected arrays give one state structure.
    assert jax.tree.structure(si.inner_state) == jax.tree.structure(sp), (
        f"inject_hyperparams({factory.__name__}) changes the state structure:\n"
        f"{jax.tree.structure(si.inner_state)}\nvs\n{jax.tree.structure(sp)}")
    for g in (g1, g2):
      up, sp = f_plain(g, sp, params)
      ui, si = f_inj(g, si, params)
      assert_trees_close(up, ui, rtol=1e-5, atol=1e-7,
                         msg=f"inject_hyperparams({factory.__name__}) vs plain")
    assert jax.tree.structure(si.inner_state) == jax.tree.structure(sp)


def check_multisteps(case: Case) -> None:
  """Inside optax.MultiSteps(every_k=2), two mini-steps with gradient g equal one step with g."""
  problem = get_problem(case.check_problem)
  fn, tx, _ = plain_update_fn(case)
  multi = optax.MultiSteps(tx, every_k_schedule=2)
  fn_multi = make_update_fn(case, multi, problem)
  params = problem.params
  (g,) = _grads_sequence(problem, 1)
  state = multi.init(params)
  u0, state = fn_multi(g, state, params)
  assert not _nonzero(u0), "MultiSteps emitted a non-zero update on the first mini-step"
  u1, state = fn_multi(g, state, params)
  u_ref, s_ref = fn(g, tx.init(params), params)
  assert_trees_close(u_ref, u1, rtol=1e-5, atol=1e-7, msg="MultiSteps(2) vs one step",
                     leaf_scale=True)
  assert_trees_close(s_ref, state.inner_opt_state, rtol=1e-5, atol=1e-7,
                     msg="MultiSteps inner state vs one step", leaf_scale=True)


def check_apply_if_finite(case: Case) -> None:
  """Inside optax.apply_if_finite, a NaN gradient gives zero updates and an untouched state."""
  problem = get_problem(case.check_problem)
  tx = optax.apply_if_finite(case.make(case.lr_for(problem.name)), max_consecutive_errors=3)
  fn = make_update_fn(case, tx, problem)
  params = problem.params
  g1, g2 = _grads_sequence(problem, 2)
  u1, s1 = fn(g1, tx.init(params), params)
  p1 = optax.apply_updates(params, u1)
  leaves, treedef = jax.tree.flatten(g2)
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
  bad = jax.tree.unflatten(treedef, leaves)
  u_bad, s_bad = fn(bad, s1, p1)
  assert not _nonzero(u_bad), "a NaN gradient produced a non-zero update"
  assert_trees_equal(s1.inner_state, s_bad.inner_state, "inner state after a NaN gradient")
  assert int(s_bad.notfinite_count) == 1 and int(s_bad.total_notfinite) == 1
  u2, s2 = fn(g2, s_bad, p1)
  _assert_finite(u2, "update after a skipped step")
  assert _nonzero((u1, u2)), "no update moved the params"
  assert int(s2.notfinite_count) == 0


MIXED_MASK = {"s": False, "b": False, "w": True, "t": True}


def _mask_for(problem: Problem):
  if isinstance(problem.params, dict) and set(problem.params) == set(MIXED_MASK):
    return MIXED_MASK
  raise ValueError(f"no mask defined for problem {problem.name}")


def _submask_reference(case, problem, params, mask, g):
  """The case's transform applied to the masked-in leaves alone (a dict of those keys).

  Cached per case: check_masked and check_multi_transform ask for the same one.
  """
  key = ("submask", case.name, problem.name)
  if key in _CACHE:
    return _CACHE[key]
  keys = [k for k, m in mask.items() if m]
  sub = {k: params[k] for k in keys}
  sub_problem = dataclasses.replace(
      problem,
      loss=lambda s: problem.loss({**params, **s}),
      logits_fn=None if problem.logits_fn is None else (lambda s: problem.logits_fn({**params, **s})))
  tx = case.make(case.lr_for(problem.name))
  fn = make_update_fn(case, tx, sub_problem)
  u, _ = fn({k: g[k] for k in keys}, tx.init(sub), sub)
  _CACHE[key] = u
  return u


def check_masked(case: Case) -> None:
  """optax.masked: masked-out leaves pass through, masked-in ones equal the transform applied
  to those leaves alone."""
  problem = get_problem(case.check_problem)
  mask = _mask_for(problem)
  tx = optax.masked(case.make(case.lr_for(problem.name)), mask)
  fn = make_update_fn(case, tx, problem, masked=mask)
  params = problem.params
  (g,) = _grads_sequence(problem, 1)
  u, _ = fn(g, tx.init(params), params)
  ref = _submask_reference(case, problem, params, mask, g)
  for k, m in mask.items():
    if m:
      assert_trees_close(ref[k], u[k], rtol=1e-5, atol=1e-7, msg=f"masked-in leaf {k}",
                         leaf_scale=True)
    else:
      assert_trees_equal(g[k], u[k], f"masked-out leaf {k} must pass through")


def check_multi_transform(case: Case) -> None:
  """optax.multi_transform: the case on some leaves, SGD on the others."""
  problem = get_problem(case.check_problem)
  mask = _mask_for(problem)
  labels = {k: ("so" if m else "sgd") for k, m in mask.items()}
  sgd_lr = 0.1
  tx = optax.multi_transform({"so": case.make(case.lr_for(problem.name)),
                              "sgd": optax.sgd(sgd_lr)}, labels)
  fn = make_update_fn(case, tx, problem, masked=mask)
  params = problem.params
  (g,) = _grads_sequence(problem, 1)
  u, _ = fn(g, tx.init(params), params)
  ref = _submask_reference(case, problem, params, mask, g)
  for k, m in mask.items():
    if m:
      assert_trees_close(ref[k], u[k], rtol=1e-5, atol=1e-7, msg=f"leaf {k} (transform)",
                         leaf_scale=True)
    else:
      assert_trees_close(-sgd_lr * g[k], u[k], rtol=1e-6, atol=0, msg=f"leaf {k} (sgd)")


def check_map_params(case: Case) -> None:
  """optax.tree.map_params can walk the state (init accepts the params placeholder) and
  maps the params-shaped parts of it."""
  problem = get_problem(case.check_problem)
  tx = case.make(case.lr_for(problem.name))
  params = problem.params
  state = tx.init(params)
  same = optax.tree.map_params(tx, lambda x: x, state)
  assert_trees_equal(state, same, "map_params with the identity")
  # The canonical use: a spec tree for the state from a spec tree for the params.
  specs = jax.tree.map(lambda p: "param", params)
  state_specs = optax.tree.map_params(tx, lambda _, s: s, state, specs,
                                      transform_non_params=lambda _: None)
  assert jax.tree.structure(state_specs, is_leaf=lambda x: x is None) is not None
  # Mapping a conversion: params-shaped leaves get it, the state still updates.
  halved = optax.tree.map_params(tx, lambda x: x.astype(jnp.float32), state)
  fn, _, _ = plain_update_fn(case)
  (g,) = _grads_sequence(problem, 1)
  u, _ = fn(g, halved, params)
  _assert_finite(u, "update from a map_params-converted state")


def check_schedule(case: Case) -> None:
  """A schedule for learning_rate: lr(0) = 0 gives a zero update; with lr_is_last the
  updates are the constant-lr ones times schedule(t) / lr."""
  problem = get_problem(case.check_problem)
  lr = case.lr_for(problem.name)
  sched = optax.linear_schedule(0.0, lr, transition_steps=4)
  tx = case.make(sched)
  fn_s = make_update_fn(case, tx, problem)
  fn, tx_c, _ = plain_update_fn(case)
  params = problem.params
  gs = _grads_sequence(problem, 4)
  ss, sc = tx.init(params), tx_c.init(params)
  moved = False
  for t, g in enumerate(gs):
    us, ss = fn_s(g, ss, params)
    uc, sc = fn(g, sc, params)
    _assert_finite(us, f"scheduled update {t}")
    if t == 0:
      assert not _nonzero(us), "learning_rate schedule at 0 still moves the params"
    else:
      moved = moved or _nonzero(us)
      if case.lr_is_last:
        factor = float(sched(t)) / lr
        assert_trees_close(jax.tree.map(lambda x: factor * x.astype(jnp.float32), uc),
                           jax.tree.map(lambda x: x.astype(jnp.float32), us),
                           rtol=1e-5, atol=1e-7, msg=f"scheduled update {t}")
  assert moved, "a schedule with lr > 0 after step 0 never moved the params"


@functools.cache
def _converge_fn(case: Case, problem_name: str):
  problem = get_problem(problem_name)
  tx = case.make(case.converge_lr.get(problem_name, case.lr_for(problem_name)))
  steps = case.steps_for(problem_name)

  @jax.jit
  def run(params):
    def body(carry, _):
      p, s = carry
      g = jax.grad(problem.loss)(p)
      u, s = tx.update(g, s, p, **call_extra_args(case.extra_args, problem, p, s))
      p = optax.apply_updates(p, u)
      return (p, s), problem.loss(p)
    (p, s), losses = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
    return p, losses

  return run


def check_converges(case: Case, problem_name: str) -> None:
  """The loss falls below f_min + tol·(f0 − f_min) within case.steps jitted steps."""
  problem = get_problem(problem_name)
  _, losses = _converge_fn(case, problem_name)(problem.params)
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses)), f"non-finite loss at step {int(np.argmin(np.isfinite(losses)))}"
  threshold = problem.threshold()
  assert losses[-1] <= threshold, (
      f"{case.name} on {problem_name}: final loss {losses[-1]:.3g} > threshold {threshold:.3g} "
      f"(f0={float(problem.loss(problem.params)):.3g}, f_min={problem.f_min:.3g}, "
      f"best {losses.min():.3g} after {case.steps_for(problem_name)} steps)")


CHECKS: dict[str, Callable[[Case], None]] = {
    "jit_no_recompile": check_jit_no_recompile,
    "state_roundtrip": check_state_roundtrip,
    "unexpected_kwargs": check_unexpected_kwargs,
    "dtype_bf16": functools.partial(check_dtype, dtype=jnp.bfloat16),
    "dtype_f32": functools.partial(check_dtype, dtype=jnp.float32),
    "dtype_f64": functools.partial(check_dtype, dtype=jnp.float64),
    "inject_hyperparams": check_inject_hyperparams,
    "multisteps": check_multisteps,
    "apply_if_finite": check_apply_if_finite,
    "masked": check_masked,
    "multi_transform": check_multi_transform,
    "map_params": check_map_params,
    "schedule": check_schedule,
}
