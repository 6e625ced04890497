"""The fault matrix: every public transform against every fault class.

Each cell asserts one of three outcomes, never a silent failure:
  * a clear error that names the argument or the parameter path;
  * a documented result: finite state and parameters (a counter records what was skipped);
  * a non-finite update that `optax.apply_if_finite` removes without trace (the inner state
    after the skipped step is bit-identical to the state before it, training then resumes).
No cell may leave non-finite or exploding parameters behind silently.

Fault classes: NaN, Inf and 1e30 gradients for one step followed by normal steps; a jitted
step with the state (and the parameters) donated; gradients whose keys differ from init's;
the documented boundary values of the hyperparameters (in range: they run; out of range: a
clear error at construction, also when injected with `optax.inject_hyperparams`); empty
trees. The transforms come from the shared contract's cases (tests/test_contract.py).
Boundary values that lie in range are injected as traced hyperparameters into one compiled
step per transform, so the matrix compiles a few functions per transform, not one per cell.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import secondorder as so
from secondorder import capture
from tests import contract as C
from tests.test_faults import METHOD_CASES, _extra_args, _safe_stepper, _stepper

_PARAMS = {"a": jnp.linspace(0.5, 1.5, 3), "b": jnp.linspace(-1.0, 1.0, 4).reshape(2, 2)}
_GOOD = jax.tree.map(lambda x: 0.5 * x, _PARAMS)
# Parameters may move by a bounded amount in the few steps of a cell (lr 0.1): "exploding"
# is anything beyond this.
_BOUND = 100.0


def _ids(cases):
  return [pytest.param(c, id=c.name) for c in cases]


def _finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact))


def _bounded(params) -> bool:
  return _finite(params) and all(float(jnp.max(jnp.abs(x))) < _BOUND
                                 for x in jax.tree.leaves(params) if x.size)


# ------------------------------------------------------------- completeness of the matrix

# Public transforms that run inside another case rather than under a name of their own.
_COVERED_BY = {"every_k_gate": "every_k_accumulate", "sophia_clip": "sophia_clip_hutchinson",
               "hutchinson_estimator": "sophia_clip_hutchinson",
               "gnb_estimator": "sophia_clip_gnb"}


def _public_transforms() -> list[str]:
  """Every name in `secondorder.__all__` that builds a GradientTransformation."""
  out = []
  for name in so.__all__:
    fn = getattr(so, name)
    if inspect.isfunction(fn) and "GradientTransformation" in str(
        inspect.signature(fn).return_annotation):
      out.append(name)
  return out


def test_matrix_covers_every_public_transform():
  names = {c.name for c in METHOD_CASES}
  public = _public_transforms()
  assert "soap" in public and "natural_gradient" in public  # the discovery works
  missing = [n for n in public if _COVERED_BY.get(n, n) not in names]
  assert not missing, f"public transforms with no case in the fault matrix: {missing}"


# ------------------------------------------------------------- NaN, Inf, 1e30 gradients


# Methods whose step is linear in the gradient, as optax.sgd's: SGD itself, and AdaHessian's
# m / D (the curvature D comes from obj_fn, not from the gradient). A finite 1e30 gradient
# is then a finite step of about lr * 1e30 / D, which is the documented rule, not a fault.
_STEP_LINEAR_IN_GRADIENT = {"accumulated_sgd", "scale_by_hutchinson", "adahessian",
                            "adahessian_stacked"}


@pytest.mark.parametrize("case", _ids(METHOD_CASES))
def test_bad_gradient_then_normal_steps(case):
  """One NaN, Inf or 1e30 gradient entry, then normal steps. Either every update stays
  finite and the parameters stay bounded (1e30 is finite: the methods normalise it away or
  skip it), or the bad step's update is non-finite and `optax.apply_if_finite` skips it
  without trace."""
  tx, update = _stepper(case)
  safe, safe_update = _safe_stepper(case)
  for bad in (jnp.nan, jnp.inf, 1e30):
    poisoned = {"a": _GOOD["a"].at[0].set(bad), "b": _GOOD["b"]}
    params, state, nonfinite = _PARAMS, tx.init(_PARAMS), False
    for g in (_GOOD, poisoned, _GOOD, _GOOD, _GOOD, _GOOD):
      u, state = update(g, state, params)
      if _finite(u):
        params = optax.apply_updates(params, u)
      else:
        nonfinite = True
    if not nonfinite:
      assert _finite(params), f"{bad}: finite updates took the params to {params}"
      if case.name not in _STEP_LINEAR_IN_GRADIENT:
        assert _bounded(params), f"{bad}: finite updates took the params to {params}"
    elif bad == 1e30:
      raise AssertionError("a finite 1e30 gradient produced a non-finite update")

    # Under apply_if_finite: the skipped step leaves no trace, training resumes.
    params, s = _PARAMS, safe.init(_PARAMS)
    u, s = safe_update(_GOOD, s, params)
    params = optax.apply_updates(params, u)
    before = s.inner_state
    u, s = safe_update(poisoned, s, params)
    if nonfinite:
      assert int(s.notfinite_count) == 1
      C.assert_trees_equal(before, s.inner_state, f"inner state after a skipped {bad} step")
    params = optax.apply_updates(params, u)
    for _ in range(4):
      u, s = safe_update(_GOOD, s, params)
      assert _finite(u), f"{bad}: a normal step after the fault is not finite"
      params = optax.apply_updates(params, u)
    assert _finite(params), f"{bad}: the params are not finite after the fault: {params}"
    if case.name not in _STEP_LINEAR_IN_GRADIENT:
      assert _bounded(params), f"{bad}: the params exploded after the fault: {params}"


# ------------------------------------------------------------- donation


@pytest.mark.parametrize("case", _ids(METHOD_CASES))
def test_donated_jitted_steps(case):
  """A training step jitted with the optimizer state and the parameters donated (every state
  leaf its own buffer) runs and gives the numbers of the undonated step."""
  tx = case.make(0.1)

  def step(params, state, grads):
    u, state = tx.update(grads, state, params, **_extra_args(case, params))
    return optax.apply_updates(params, u), state

  donated = jax.jit(step, donate_argnums=(0, 1))
  plain = jax.jit(step)
  p_ref, s_ref = _PARAMS, tx.init(_PARAMS)
  p, s = jax.tree.map(jnp.copy, _PARAMS), tx.init(_PARAMS)
  for _ in range(3):
    p_ref, s_ref = plain(p_ref, s_ref, _GOOD)
    p, s = donated(p, s, _GOOD)
  C.assert_trees_equal(p_ref, p, "donated vs plain params")
  assert _finite((p, s))


# ------------------------------------------------------------- structure drift


@pytest.mark.parametrize("case", _ids(METHOD_CASES))
def test_renamed_keys_are_an_error_naming_the_path(case):
  """Gradients whose keys differ from init's (same shapes, same order) are an error naming
  the first differing path, with or without jit."""
  tx, update = _stepper(case)
  state = tx.init(_PARAMS)
  renamed = {"a": _GOOD["a"], "c": _GOOD["b"]}
  with pytest.raises(ValueError, match=r"\['b'\]|\['c'\]"):
    update(renamed, state, _PARAMS)
  with pytest.raises(ValueError, match=r"\['b'\]|\['c'\]"):
    tx.update(renamed, state, _PARAMS, **_extra_args(case, _PARAMS))


# ------------------------------------------------------------- empty trees


@pytest.mark.parametrize("case", _ids(METHOD_CASES))
def test_empty_tree(case):
  """An empty parameter tree: empty updates and a finite state, or a clear ValueError."""
  tx = case.make(0.1)
  # The closures of an empty tree return float zeros (a sum over no leaves is int 0).
  extra = {k: (lambda p, f=f: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), f(p)))
           if callable(f) else f for k, f in _extra_args(case, {}).items()}
  try:
    state = tx.init({})
    u, state = tx.update({}, state, {}, **extra)
    u, state = tx.update({}, state, {}, **extra)
  except ValueError as e:
    assert "empty" in str(e) or "no param" in str(e), f"unclear error for an empty tree: {e}"
    return
  assert u == {}
  assert _finite(state)


# ------------------------------------------------------------- learning rates, inject


def _no_layers():
  return capture.no_layers()


def _rate_name(name):
  return next(iter(inspect.signature(getattr(so, name)).parameters))


# Every alias in secondorder.__all__: a public transform whose first argument is the
# learning rate (the KL budget for natural_gradient), found by its signature.
_ALIASES = sorted(n for n in _public_transforms() if not n.startswith("scale_by_")
                  and _rate_name(n) in ("learning_rate", "kl_budget"))
# The other arguments an alias requires (and natural_gradient the damping of its contract
# case: the generic problem's Fisher has rank 1, so the default 1e-3 takes steps of ~100
# along its null space, as documented, which this matrix would read as exploding).
_ALIAS_REQUIRED = {"accumulated_adamw": dict(k=2), "accumulated_sgd": dict(k=2),
                   "kfac": dict(layers=_no_layers), "ekfac": dict(layers=_no_layers),
                   "natural_gradient": dict(damping=1e-2)}


def _alias_kwargs(name):
  return {k: (v() if callable(v) else v) for k, v in _ALIAS_REQUIRED.get(name, {}).items()}


def test_aliases_are_found():
  assert {"soap", "shampoo", "sophia", "adahessian", "kfac", "hessian_free",
          "natural_gradient", "accumulated_adamw", "accumulated_sgd"} <= set(_ALIASES)
  cases = {c.name for c in METHOD_CASES}
  assert not [n for n in _ALIASES if n not in cases], "an alias without a contract case"


@pytest.mark.parametrize("name", _ALIASES)
def test_negative_learning_rate_is_an_error(name):
  alias, rate = getattr(so, name), _rate_name(name)
  with pytest.raises(ValueError, match=rate):
    alias(-1e-3, **_alias_kwargs(name))
  # A concrete negative array (optax.inject_hyperparams' init) is rejected too.
  with pytest.raises(ValueError, match=rate):
    optax.inject_hyperparams(alias)(**{rate: -1e-3}, **_alias_kwargs(name)).init(_PARAMS)
  # Schedules are accepted, and a learning rate of 0 (a KL budget must be positive).
  alias(optax.constant_schedule(1e-3), **_alias_kwargs(name))
  if rate == "learning_rate":
    alias(0.0, **_alias_kwargs(name))


@pytest.mark.parametrize("name", _ALIASES)
def test_inject_hyperparams_without_static_args(name):
  """`optax.inject_hyperparams(alias)(learning_rate=...)`, every numeric default injected,
  runs jitted and takes finite steps."""
  case = next(c for c in METHOD_CASES if c.name == name)
  tx = optax.inject_hyperparams(getattr(so, name))(**{_rate_name(name): 0.1},
                                                   **_alias_kwargs(name))
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, **_extra_args(case, p)))
  params, state = _PARAMS, tx.init(_PARAMS)
  for _ in range(3):
    u, state = update(_GOOD, state, params)
    params = optax.apply_updates(params, u)
  assert _bounded(params) and _finite(state)


# ------------------------------------------------------------- hyperparameter boundaries

# Per transform: (factory, keyword arguments it is built with, static_args, in-range boundary
# values to inject, out-of-range values that must be rejected naming the argument).
_BOUNDARIES = {
    "scale_by_soap": (
        so.scale_by_soap, dict(b1=0.9, b2=0.9, eps=1e-8, precondition_frequency=2,
                               shampoo_beta=0.9), (),
        dict(b1=[0.0], b2=[0.0], eps=[0.0], precondition_frequency=[1],
             shampoo_beta=[0.0, 1.0]),
        dict(b1=[1.0, -0.1], b2=[1.0], eps=[-1e-8], precondition_frequency=[0],
             shampoo_beta=[1.5])),
    "soap": (
        so.soap, dict(learning_rate=0.1, weight_decay=0.01, precondition_frequency=2), (),
        dict(learning_rate=[0.0], weight_decay=[0.0]),
        dict(learning_rate=[-0.1], weight_decay=[-0.1], precondition_frequency=[0])),
    "scale_by_kl_shampoo": (
        so.scale_by_kl_shampoo, dict(b1=0.9, b2=0.9, eps=1e-8, precondition_frequency=2,
                                     shampoo_beta=0.9, init_factor=0.1,
                                     inverse_sqrt_cap=4000.0), (),
        dict(b1=[0.0], b2=[0.0], eps=[0.0], precondition_frequency=[1], shampoo_beta=[0.0],
             init_factor=[1e-30], inverse_sqrt_cap=[1e-30]),
        dict(b1=[1.0, -0.1], b2=[1.0], eps=[-1e-8], precondition_frequency=[0],
             shampoo_beta=[1.0, 1.5], init_factor=[0.0, -0.1], inverse_sqrt_cap=[0.0])),
    "kl_shampoo": (
        so.kl_shampoo, dict(learning_rate=0.1, weight_decay=0.01, precondition_frequency=2),
        (), dict(learning_rate=[0.0], weight_decay=[0.0]),
        dict(learning_rate=[-0.1], weight_decay=[-0.1], precondition_frequency=[0])),
    "shampoo_preconditioner": (
        so.shampoo_preconditioner,
        dict(beta2=0.9, eps=1e-6, update_interval=2, graft_b2=0.9, graft_eps=1e-8,
             root_tolerance=0.1, start_preconditioning_step=1), (),
        dict(beta2=[1.0], eps=[0.0], update_interval=[1], graft_b2=[0.0],
             graft_eps=[0.0], start_preconditioning_step=[1, 100]),
        dict(beta2=[0.0, 1.5], eps=[-1.0], update_interval=[0], graft_b2=[1.0, 1.5],
             graft_eps=[-1.0], root_tolerance=[0.0], start_preconditioning_step=[0])),
    "shampoo": (
        so.shampoo, dict(learning_rate=0.1, b1=0.9, update_interval=2, weight_decay=0.0), (),
        dict(learning_rate=[0.0], b1=[0.0], weight_decay=[0.0]),
        dict(learning_rate=[-0.1], b1=[1.0], weight_decay=[-0.1], update_interval=[0])),
    "sophia_clip": (
        so.sophia_clip, dict(b1=0.9, b2=0.9, gamma=0.01, eps=1e-12, update_interval=2), (),
        dict(b1=[0.0], b2=[0.0], eps=[0.0], update_interval=[1]),
        dict(b1=[1.0], b2=[-0.1], gamma=[0.0], eps=[-1.0], update_interval=[0])),
    "sophia": (
        so.sophia, dict(learning_rate=0.1, weight_decay=0.0, update_interval=2), (),
        dict(learning_rate=[0.0]),
        dict(learning_rate=[-0.1], weight_decay=[-0.1], update_interval=[0])),
    "scale_by_hutchinson": (
        so.scale_by_hutchinson, dict(b1=0.9, b2=0.9, eps=1e-4, hessian_power=1.0,
                                     update_interval=2), (),
        dict(b1=[0.0], b2=[0.0], eps=[1e-30], hessian_power=[0.0, 1.0], update_interval=[1]),
        dict(b1=[1.0], b2=[1.0], eps=[0.0, -1.0], hessian_power=[1.5], update_interval=[0])),
    "adahessian": (
        so.adahessian, dict(learning_rate=0.1, weight_decay=0.0), (),
        dict(learning_rate=[0.0]),
        dict(learning_rate=[-0.1], weight_decay=[-0.1])),
    "every_k_accumulate": (
        so.every_k_accumulate, dict(k=2, b1=0.9, b2=0.9, eps=1e-8, eps_root=0.0), (),
        dict(b1=[0.0], b2=[0.0], eps=[0.0], k=[1]),
        dict(k=[0], b1=[1.0], b2=[1.0], eps=[-1.0], eps_root=[-1.0])),
    "accumulated_adamw": (
        so.accumulated_adamw, dict(learning_rate=0.1, k=2, weight_decay=0.0), (),
        dict(learning_rate=[0.0], k=[1]),
        dict(learning_rate=[-0.1], k=[0], weight_decay=[-0.1])),
    "accumulated_sgd": (
        so.accumulated_sgd, dict(learning_rate=0.1, k=2), (),
        dict(learning_rate=[0.0], k=[1]),
        dict(learning_rate=[-0.1], k=[0])),
    "hessian_free": (
        so.hessian_free, dict(learning_rate=1.0), (),
        dict(learning_rate=[0.0]),
        dict(learning_rate=[-0.1])),
    "natural_gradient": (
        so.natural_gradient, dict(kl_budget=0.1, damping=1e-2), (),
        dict(kl_budget=[1e-8]),
        dict(kl_budget=[0.0, -0.1])),
    "kfac": (
        so.kfac, dict(learning_rate=0.1, layers=_no_layers), ("layers",),
        dict(learning_rate=[0.0]),
        dict(learning_rate=[-0.1])),
}

_BOUNDARY_CASE = {"scale_by_soap": "scale_by_soap", "soap": "soap",
                  "scale_by_kl_shampoo": "scale_by_kl_shampoo", "kl_shampoo": "kl_shampoo",
                  "shampoo_preconditioner": "shampoo_preconditioner", "shampoo": "shampoo",
                  "sophia_clip": "sophia_clip_hutchinson", "sophia": "sophia",
                  "scale_by_hutchinson": "scale_by_hutchinson", "adahessian": "adahessian",
                  "every_k_accumulate": "every_k_accumulate",
                  "accumulated_adamw": "accumulated_adamw", "accumulated_sgd": "accumulated_sgd",
                  "hessian_free": "hessian_free", "natural_gradient": "natural_gradient",
                  "kfac": "kfac"}


def _built(kwargs):
  return {k: (v() if callable(v) and k == "layers" else v) for k, v in kwargs.items()}


@pytest.mark.parametrize("name", sorted(_BOUNDARIES))
def test_out_of_range_hyperparameters_are_rejected(name):
  """A value outside its documented range is a ValueError naming the argument: as a Python
  number at construction, and injected (`optax.inject_hyperparams`) at init."""
  factory, kwargs, static, _, bad = _BOUNDARIES[name]
  for arg, values in bad.items():
    for value in values:
      with pytest.raises(ValueError, match=arg):
        factory(**{**_built(kwargs), arg: value}).init(_PARAMS)
      if arg in static:
        continue
      with pytest.raises(ValueError, match=arg):
        optax.inject_hyperparams(factory, static_args=static)(
            **{**_built(kwargs), arg: value}).init(_PARAMS)


@pytest.mark.parametrize("name", sorted(_BOUNDARIES))
def test_boundary_hyperparameters_run_finite(name):
  """Every in-range boundary value, injected into one compiled step, gives finite updates
  and state; an out-of-range value injected into a running state (after init) is read at
  the nearest bound, as documented, and stays finite too."""
  factory, kwargs, static, good, bad = _BOUNDARIES[name]
  case = next(c for c in METHOD_CASES if c.name == _BOUNDARY_CASE[name])
  tx = optax.inject_hyperparams(factory, static_args=static)(**_built(kwargs))
  if name in ("scale_by_soap", "scale_by_kl_shampoo", "shampoo_preconditioner", "sophia_clip",
              "scale_by_hutchinson", "every_k_accumulate"):
    tx = optax.chain(tx, optax.scale_by_learning_rate(0.1))
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, **_extra_args(case, p)))
  hp = lambda s: s.hyperparams if hasattr(s, "hyperparams") else s[0].hyperparams

  def run(arg, value):
    params, state = _PARAMS, tx.init(_PARAMS)
    hyper = hp(state)
    if arg not in hyper:
      return
    hyper[arg] = jnp.asarray(value, hyper[arg].dtype)
    for g in (_GOOD, jax.tree.map(jnp.zeros_like, _GOOD), _GOOD, _GOOD):
      u, state = update(g, state, params)
      assert _finite(u), f"{name}: {arg}={value} gave a non-finite update"
      params = optax.apply_updates(params, u)
    assert _bounded(params), f"{name}: {arg}={value} took the params to {params}"
    assert _finite(state), f"{name}: {arg}={value} left a non-finite state"

  for arg, values in good.items():
    for value in values:
      run(arg, value)
  # Integer intervals injected below their bound after init: clamped, documented.
  for arg in ("precondition_frequency", "update_interval", "k"):
    if arg in bad:
      run(arg, 0)


# ------------------------------------------------------------- public functions' edges


def test_directional_sharpness_edges():
  """A zero direction has sharpness 0 (documented), jitted too; a huge one does not
  overflow (the quotient does not depend on the direction's scale); an empty tree gives 0."""
  h = jnp.array([1.0, 2.0, 4.0])
  matvec = lambda v: {"w": h * v["w"]}
  for fn in (so.directional_sharpness, jax.jit(so.directional_sharpness, static_argnums=0)):
    assert float(fn(matvec, {"w": jnp.zeros(3)})) == 0.0
    huge = float(fn(matvec, {"w": jnp.array([1e30, 0.0, 1e30])}))
    np.testing.assert_allclose(huge, (1.0 + 4.0) / 2.0, rtol=1e-6)
  assert float(so.directional_sharpness(lambda v: v, {})) == 0.0


def test_sophia_on_an_empty_tree():
  for tx in (so.sophia(0.1), so.sophia_clip()):
    state = tx.init({})
    u, state = tx.update({}, state, {}, obj_fn=lambda p: jnp.zeros([]))
    assert u == {}
    assert _finite(state)


def test_sophia_helpers_on_an_empty_tree():
  tx = so.sophia(0.1)
  state = tx.init({})
  loss, grads, _ = so.value_grad_and_hutchinson_estimate(lambda p: jnp.zeros([]), {}, state)
  assert grads == {} and float(loss) == 0.0


def test_sophia_eps_zero_on_a_flat_direction():
  """eps = 0 (documented as allowed) and a parameter with zero curvature: a zero momentum
  entry stays (never 0 / 0), a nonzero one takes the clipped step of exactly lr."""
  loss = lambda p: 0.5 * jnp.sum(p["w"] ** 2) + jnp.sum(p["lin"])  # "lin": no curvature
  params = {"w": jnp.ones(2), "lin": jnp.ones(2), "dead": jnp.ones(2)}
  tx = so.sophia(0.1, eps=0.0, weight_decay=0.0, update_interval=1)
  state = tx.init(params)
  for _ in range(2):
    g = jax.grad(lambda p: loss(p) + 0.0 * jnp.sum(p["dead"]))(params)
    u, state = tx.update(g, state, params, obj_fn=loss)
    assert _finite(u)
    np.testing.assert_array_equal(np.asarray(u["dead"]), 0.0)
    np.testing.assert_allclose(np.asarray(u["lin"]), -0.1, rtol=1e-6)
    params = optax.apply_updates(params, u)


def test_curvature_functions_on_empty_trees():
  """The public curvature functions on an empty tree: empty results, zeros, or (for the
  eigenvalues, which do not exist) a clear error."""
  key = jax.random.key(0)
  zero = lambda p: jnp.zeros([])
  logits = lambda p: jnp.zeros((4, 3))
  assert so.hutchinson_diag(zero, {}, key) == {}
  assert so.gnb_diag(logits, {}, key) == {}
  assert so.empirical_fisher_diag(lambda p, x: jnp.zeros([]), {}, jnp.zeros((3, 2))) == {}
  assert float(so.hutchinson_trace(lambda v: v, {}, key)) == 0.0
  dec = so.newton_decrement(lambda v: v, {})
  assert float(dec.decrement) == 0.0 and dec.direction == {}
  with pytest.raises(ValueError, match="empty"):
    so.top_eigenvalues(lambda v: v, {}, key)


@pytest.mark.parametrize("make,extra", [
    (lambda: so.every_k_gate(2), {}),
    (lambda: so.every_k_gate(2, optax.adam(0.1)), {}),
    (lambda: so.hutchinson_estimator(), {"obj_fn": lambda p: jnp.sum(p["a"] ** 2)}),
    (lambda: so.gnb_estimator(), {"logits_fn": lambda p: jnp.zeros((4, 3)) + jnp.sum(p["a"])}),
], ids=["every_k_gate", "every_k_gate_adam", "hutchinson_estimator", "gnb_estimator"])
def test_standalone_pieces_reject_renamed_keys(make, extra):
  """The public transforms that run inside others, used alone: renamed keys are an error
  naming the path (checked against the params given to update)."""
  tx = make()
  state = tx.init(_PARAMS)
  tx.update(_GOOD, state, _PARAMS, **extra)
  with pytest.raises(ValueError, match=r"\['b'\].*\['c'\]"):
    tx.update({"a": _GOOD["a"], "c": _GOOD["b"]}, state, _PARAMS, **extra)


_INTERVALS = [
    ("scale_by_soap", so.scale_by_soap, dict(precondition_frequency=2), "precondition_frequency"),
    ("scale_by_kl_shampoo", so.scale_by_kl_shampoo, dict(precondition_frequency=2),
     "precondition_frequency"),
    ("shampoo_preconditioner", so.shampoo_preconditioner, dict(update_interval=2),
     "update_interval"),
    ("shampoo_preconditioner", so.shampoo_preconditioner, dict(update_interval=2),
     "statistics_interval"),
    ("shampoo_preconditioner", so.shampoo_preconditioner,
     dict(update_interval=2, start_preconditioning_step=3), "start_preconditioning_step"),
    ("sophia_clip_hutchinson", so.sophia_clip, dict(update_interval=2), "update_interval"),
    ("scale_by_hutchinson", so.scale_by_hutchinson, dict(update_interval=2), "update_interval"),
    ("every_k_accumulate", so.every_k_accumulate, dict(k=2), "k"),
]


@pytest.mark.parametrize("case_name,factory,kwargs,arg", _INTERVALS,
                         ids=[f"{f.__name__}-{a}" for _, f, _, a in _INTERVALS])
def test_traced_interval_below_one_is_read_as_one(case_name, factory, kwargs, arg):
  """An interval injected as 0 or -2 into a running state takes exactly the steps of 1 (the
  documented reading), not `count % 0` (backend-dependent) or `count % -2` (every other
  step)."""
  case = next(c for c in METHOD_CASES if c.name == case_name)
  tx = optax.inject_hyperparams(factory)(**kwargs)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, **_extra_args(case, p)))
  runs = []
  for value in (0, -2, 1):
    params, state = _PARAMS, tx.init(_PARAMS)
    state.hyperparams[arg] = jnp.asarray(value, state.hyperparams[arg].dtype)
    out = []
    for i in range(4):
      u, state = update(jax.tree.map(lambda x: x * (1 + i), _GOOD), state, params)
      out.append(u)
    runs.append(out)
  C.assert_trees_equal(runs[0], runs[2], f"{arg}=0 vs {arg}=1")
  C.assert_trees_equal(runs[1], runs[2], f"{arg}=-2 vs {arg}=1")
