"""Faults and bad input: non-finite gradients and curvature, degenerate parameters.

What each method does with a NaN/Inf *gradient* (tested below for every case):
  every method propagates it: the update of the affected leaf is non-finite, and the
  first-moment state (momentum / Adam moments / grafted Adam / K-FAC fallback RMS) keeps the
  NaN, exactly like `optax.adam`. SOAP's and KL-Shampoo's first call (statistics only,
  moments untouched, a zero update 0·d computed from this gradient) shows it as NaN too,
  and on later calls the momentum carries it into their direction; Hessian-free and the natural gradient skip the step (`nonfinite_count`
  += 1, λ raised, warm start kept) and their otherwise zero update is NaN in the affected
  entries. Wrap the optimizer in `optax.apply_if_finite` to skip
  such steps with the state untouched (checked for every case by the shared contract,
  tests/contract.py: check_apply_if_finite, and again here after a run of bad steps).

What each method does with a non-finite *curvature estimate* (obj_fn / logits_fn / kfac
statistics returning NaN or Inf, or a NaN gradient feeding Shampoo's statistics): the
long-lived statistic keeps its previous value and a counter in the state records the skip:
  scale_by_hutchinson / adahessian: `nu` kept, `nonfinite_count` += 1;
  sophia_clip / sophia (Hutchinson and GNB estimators): `hessian` kept, `nonfinite_count` += 1;
  shampoo_preconditioner / shampoo: the factor statistics `stats` kept, `stat_skips` += 1;
  scale_by_kl_shampoo / kl_shampoo (a NaN gradient feeding its statistics): the factors
    and eigenvalue estimates kept, `stat_skips` += 1;
  scale_by_kfac_factors / kfac: the factors `a`, `s` kept, `num_skipped` += 1.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from secondorder import capture
from secondorder.curvature.losses import softmax_cross_entropy
from secondorder.transforms.hutchinson import adahessian
from secondorder.transforms.kfac import scale_by_kfac_factors
from secondorder.transforms.shampoo import shampoo
from secondorder.transforms.sophia import sophia
from tests import contract as C
from tests.test_contract import CASES

METHOD_CASES = C.generic_method_cases(CASES)


def _ids(cases):
  return [pytest.param(c, id=c.name) for c in cases]


def _find(state, cls_name: str):
  found = optax.tree.get_all_with_path(state, cls_name)
  assert len(found) == 1, f"expected one {cls_name} in the state, found {len(found)}"
  return found[0][1]


def _all_finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact))


# ---------------------------------------------------------------------- generic problem


def _sum_of_squares(p):
  return sum(0.5 * jnp.sum(jnp.abs(x.astype(jnp.float32)) ** 2) for x in jax.tree.leaves(p)
             if jnp.issubdtype(x.dtype, jnp.inexact))


def _logits(p):
  s = sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(p)
          if jnp.issubdtype(x.dtype, jnp.inexact))
  return s * jnp.arange(12.0).reshape(4, 3) / 12.0


GENERIC = C.Problem("generic", None, _sum_of_squares, 0.0, 1.0, logits_fn=_logits)
_GENERIC_LABELS = jnp.arange(4) % 3  # one per row of _logits


def _extra_args(case, params):
  """The case's closures on the generic problem. Gauss-Newton cases (Hessian-free) also take
  `loss_fn=`, whose labels must match the generic logits' batch of 4 rows (the shared
  C.gauss_newton_args holds the classification problems' labels, a batch of another size)."""
  if case.extra_args is C.gauss_newton_args:
    return {"logits_fn": _logits, "loss_fn": softmax_cross_entropy(_GENERIC_LABELS)}
  return case.extra_args(GENERIC, params)


@functools.cache
def _stepper(case, lr=0.1, jit=True):
  """(tx, update) for the case; cached so that tests with the same shapes share a compile."""
  tx = case.make(lr)

  def update(grads, state, params):
    return tx.update(grads, state, params, **_extra_args(case, params))

  return tx, (jax.jit(update) if jit else update)


@functools.cache
def _safe_stepper(case, lr=0.1):
  safe = optax.apply_if_finite(case.make(lr), max_consecutive_errors=10)
  return safe, jax.jit(lambda g, s, p: safe.update(g, s, p, **_extra_args(case, p)))


# ---------------------------------------------------------------------- NaN / Inf gradients

def _grad_fault_params():
  out = []
  for c in METHOD_CASES:
    for bad, bid in ((jnp.nan, "nan"), (jnp.inf, "inf")):
      out.append(pytest.param(c, bad, id=f"{c.name}-{bid}"))
  return out


@pytest.mark.parametrize("case,bad", _grad_fault_params())
def test_nonfinite_gradient_propagates_and_apply_if_finite_skips(case, bad):
  """A non-finite gradient shows up in the updates (it is not silently hidden); under
  optax.apply_if_finite a run of such steps changes nothing and training then resumes."""
  params = {"a": jnp.linspace(0.5, 1.5, 3), "b": jnp.ones((2, 2))}
  good = jax.tree.map(lambda x: 0.5 * x, params)
  poisoned = {"a": good["a"].at[0].set(bad), "b": good["b"]}
  tx, update = _stepper(case)
  state = tx.init(params)
  outs = []
  for g in (poisoned, good, good):  # accumulate cases emit on every 2nd call
    u, state = update(g, state, params)
    outs.append(u)
  assert not _all_finite(outs), "a non-finite gradient vanished without a trace"
  # The other leaf is unaffected unless the method mixes leaves (none of ours does).
  assert all(_all_finite(u["b"]) for u in outs)

  safe, f = _safe_stepper(case)
  s = safe.init(params)
  u, s = f(good, s, params)
  before = s.inner_state
  for _ in range(3):
    u, s = f(poisoned, s, params)
    assert not any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(u))
  C.assert_trees_equal(before, s.inner_state, "inner state after skipped steps")
  assert int(s.total_notfinite) == 3
  for _ in range(2):
    u, s = f(good, s, params)
    assert _all_finite(u)
  assert _all_finite(s)


# ---------------------------------------------------------------------- curvature faults


def _quadratic(p):
  h = {"w": jnp.linspace(1.0, 4.0, 12).reshape(3, 4), "v": jnp.linspace(1.0, 2.0, 3)}
  return sum(0.5 * jnp.sum(h[k] * p[k] ** 2) for k in p)


def _quad_logits(p):
  x = jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)
  return x @ p["w"][:, :3] + p["v"]


_PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "v": jnp.linspace(0.5, 1.0, 3)}


def _times(f, bad):
  return lambda p: f(p) * bad


# (make tx, good extra args, bad extra args, state class, statistics fields, counter field,
#  bad gradient instead of bad extra args)
CURVATURE = {
    "adahessian": (
        lambda: adahessian(0.1),
        lambda: {"obj_fn": _quadratic},
        lambda bad: {"obj_fn": _times(_quadratic, bad)},
        "ScaleByHutchinsonState", ("nu", "hessian_count"), "nonfinite_count"),
    "sophia_hutchinson": (
        lambda: sophia(0.1, update_interval=1, weight_decay=0.0),
        lambda: {"obj_fn": _quadratic},
        lambda bad: {"obj_fn": _times(_quadratic, bad)},
        "SophiaClipState", ("hessian", "hessian_count"), "nonfinite_count"),
    "sophia_gnb": (
        lambda: sophia(0.1, estimator="gnb", update_interval=1, weight_decay=0.0),
        lambda: {"logits_fn": _quad_logits},
        lambda bad: {"logits_fn": _times(_quad_logits, bad)},
        "SophiaClipState", ("hessian", "hessian_count"), "nonfinite_count"),
}


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("method", list(CURVATURE))
def test_nonfinite_curvature_estimate_is_skipped_and_counted(method, bad):
  make, good_args, bad_args, cls, fields, counter = CURVATURE[method]
  tx = make()
  grads = jax.grad(_quadratic)(_PARAMS)

  @functools.partial(jax.jit, static_argnums=0)
  def update(is_bad, state):
    extra = bad_args(bad) if is_bad else good_args()
    return tx.update(grads, state, _PARAMS, **extra)

  _, state = update(False, tx.init(_PARAMS))
  _, state = update(False, state)
  before = _find(state, cls)
  u, state = update(True, state)
  after = _find(state, cls)
  for field in fields:
    C.assert_trees_equal(getattr(before, field), getattr(after, field),
                         f"{field} after a non-finite estimate")
  assert int(getattr(after, counter)) == int(getattr(before, counter)) + 1
  assert _all_finite(u), "a finite gradient with a non-finite estimate gave a non-finite update"
  assert _all_finite(state)
  # Training goes on with fresh estimates.
  u, state = update(False, state)
  later = _find(state, cls)
  assert _all_finite((u, state))
  assert int(getattr(later, counter)) == int(getattr(after, counter))
  assert not np.array_equal(np.asarray(jax.tree.leaves(getattr(later, fields[0]))[0]),
                            np.asarray(jax.tree.leaves(getattr(after, fields[0]))[0]))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf], ids=["nan", "inf"])
def test_shampoo_nonfinite_gradient_skips_statistics(bad):
  """Shampoo's curvature is built from the gradient: a non-finite gradient leaves the
  Kronecker statistics and roots as they were and is counted in `stat_skips`."""
  tx = shampoo(0.1, update_interval=1, start_preconditioning_step=1)
  grads = jax.grad(_quadratic)(_PARAMS)
  update = jax.jit(lambda g, s: tx.update(g, s, _PARAMS))
  _, state = update(grads, tx.init(_PARAMS))
  _, state = update(grads, state)
  before = _find(state, "ShampooState")
  poisoned = {"w": grads["w"].at[1, 2].set(bad), "v": grads["v"]}
  _, state = update(poisoned, state)
  after = _find(state, "ShampooState")
  C.assert_trees_equal(before.stats, after.stats, "statistics after a non-finite gradient")
  # Roots may be recomputed from the kept statistics (a new bias correction), never from
  # the non-finite ones.
  assert int(after.stat_skips) == int(before.stat_skips) + 1
  assert _all_finite((after.stats, after.preconds))
  _, state = update(grads, state)
  later = _find(state, "ShampooState")
  assert _all_finite((later.stats, later.preconds))
  assert int(later.stat_skips) == int(after.stat_skips)


class _Dense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.tanh(nn.Dense(4)(x)))


@functools.cache
def _kfac_setup():
  model = _Dense()
  x = jnp.linspace(-1.0, 1.0, 40).reshape(8, 5)
  y = jnp.arange(8) % 3
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = lambda logits, labels: jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  cap = capture.linen_capture(model, loss_fn, likelihood="softmax", fisher="exact")
  return params, x, y, cap, cap.layers(params, x)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf], ids=["nan", "inf"])
def test_kfac_nonfinite_factors_are_skipped_and_counted(bad):
  params, x, y, cap, layers = _kfac_setup()
  tx = optax.chain(scale_by_kfac_factors(layers=layers, update_interval=1),
                   optax.scale_by_learning_rate(0.1))

  @functools.partial(jax.jit, static_argnums=0)
  def update(is_bad, state):
    _, grads, stats = cap(params, x, y)
    if is_bad:
      name = sorted(stats)[0]
      a, s = stats[name]
      stats = {**stats, name: type(stats[name])(a.at[0, 0].set(bad), s)}
    return tx.update(grads, state, params, kfac_stats=stats)

  _, state = update(False, tx.init(params))
  before = _find(state, "ScaleByKfacState")
  u, state = update(True, state)
  after = _find(state, "ScaleByKfacState")
  for field in ("a", "s", "a_eigvals", "a_eigvecs", "s_eigvals", "s_eigvecs", "a_inverse",
                "s_inverse", "factor_weight"):
    C.assert_trees_equal(getattr(before, field), getattr(after, field), field)
  assert int(after.num_skipped) == int(before.num_skipped) + 1
  assert _all_finite((u, state))
  u, state = update(False, state)
  assert _all_finite((u, state))
  assert int(_find(state, "ScaleByKfacState").num_skipped) == int(after.num_skipped)


# ---------------------------------------------------------------------- degenerate input


@pytest.mark.parametrize("case", _ids(METHOD_CASES))
def test_all_zero_gradients_give_zero_finite_updates(case):
  params = {"a": jnp.linspace(0.5, 1.5, 3), "b": jnp.ones((2, 2))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx, update = _stepper(case)
  state = tx.init(params)
  for _ in range(3):
    u, state = update(zeros, state, params)
    assert _all_finite(u) and _all_finite(state)
    for x in jax.tree.leaves(u):
      np.testing.assert_array_equal(np.asarray(x), 0.0)


@pytest.mark.parametrize("case", _ids(METHOD_CASES))
def test_zero_size_and_scalar_leaves(case):
  params = {"empty": jnp.ones((0,)), "empty2": jnp.ones((3, 0)), "scalar": jnp.ones(()),
            "v": jnp.linspace(0.5, 1.5, 3), "m": jnp.ones((2, 3))}
  tx, update = _stepper(case)
  state = tx.init(params)
  moved_scalar = moved_v = False
  for _ in range(4):  # accumulating cases emit on every 2nd call
    u, state = update(params, state, params)
    for k in params:
      assert u[k].shape == params[k].shape and u[k].dtype == params[k].dtype, k
    assert _all_finite((u, state))
    moved_scalar |= float(jnp.abs(u["scalar"])) > 0
    moved_v |= float(jnp.max(jnp.abs(u["v"]))) > 0
  # The non-empty leaves move, the scalar included.
  assert moved_scalar and moved_v


# Behaviour on integer leaves: a clear error (TypeError/ValueError naming the dtype) or
# updates in the params' dtype. Every method here raises a TypeError at init.


@pytest.mark.parametrize("case", _ids(METHOD_CASES))
def test_int_leaf_clear_error_or_dtype_kept(case):
  params = {"w": jnp.linspace(0.5, 1.5, 3), "i": jnp.arange(2, dtype=jnp.int32)}
  grads = {"w": params["w"], "i": jnp.zeros(2, jnp.int32)}
  tx, update = _stepper(case, jit=False)
  try:
    state = tx.init(params)
    u, _ = update(grads, state, params)
  except (TypeError, ValueError) as e:
    assert "int" in str(e), f"unclear error for an int leaf: {e}"
    return
  assert u["i"].dtype == jnp.int32, f"int32 leaf got a {u['i'].dtype} update"
  assert u["w"].dtype == params["w"].dtype


@pytest.mark.parametrize("case", _ids(METHOD_CASES))
def test_complex_leaf_clear_error_or_correct_direction(case):
  """Complex leaves: a clear error, or a complex update that keeps the imaginary part (for
  g = (1+1j)·c every method here must step along −(1+1j), real and imaginary parts equal)."""
  params = {"w": jnp.linspace(0.5, 1.5, 3), "c": jnp.ones(2, jnp.complex64) * (1 + 1j)}
  tx, update = _stepper(case, jit=False)
  try:
    state = tx.init(params)
    u, state = update(params, state, params)
    u2, _ = update(params, state, params)
  except (TypeError, ValueError) as e:
    assert "complex" in str(e).lower(), f"unclear error for a complex leaf: {e}"
    return
  for x in (u, u2):
    assert x["c"].dtype == jnp.complex64
  c = u2["c"]
  assert bool(jnp.all(jnp.isfinite(c)))
  np.testing.assert_allclose(np.real(c), np.imag(c), rtol=1e-5, atol=1e-8)
  assert float(jnp.max(jnp.abs(c))) > 0


# Structure and shape mismatches between init and update: a clear error. A shape that
# broadcasts ((1,) against (3,)) must not be silently accepted.

@pytest.mark.parametrize("case", _ids(METHOD_CASES))
def test_mismatched_tree_is_an_error(case):
  params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
  tx, update = _stepper(case, jit=False)
  state = tx.init(params)
  other = {"a": jnp.ones(3)}
  with pytest.raises((ValueError, TypeError), match="(?i)structure|tree|key"):
    update(other, state, other)


@pytest.mark.parametrize("case", _ids(METHOD_CASES))
def test_mismatched_shape_is_an_error(case):
  params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
  tx, update = _stepper(case, jit=False)
  state = tx.init(params)
  other = {"a": jnp.ones(4), "b": jnp.ones((2, 2))}
  with pytest.raises((ValueError, TypeError), match=r"\(4,\)"):
    update(other, state, other)


@pytest.mark.parametrize("case", _ids(METHOD_CASES))
def test_broadcastable_shape_mismatch_is_an_error(case):
  params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
  tx, update = _stepper(case, jit=False)
  state = tx.init(params)
  other = {"a": jnp.ones(1), "b": jnp.ones((2, 2))}
  with pytest.raises((ValueError, TypeError)):
    update(other, state, other)


# Extra arguments of the wrong shape.
@pytest.mark.parametrize("case", _ids([c for c in METHOD_CASES if c.extra_args is C.obj_fn_args]))
def test_obj_fn_not_scalar_is_an_error(case):
  params = {"a": jnp.ones(3)}
  tx = case.make(0.1)
  with pytest.raises((TypeError, ValueError), match="(?i)scalar"):
    tx.update(params, tx.init(params), params, obj_fn=lambda p: p["a"] ** 2)


@pytest.mark.parametrize("case", _ids([c for c in METHOD_CASES if c.extra_args is C.obj_fn_args]))
def test_missing_obj_fn_names_the_keyword(case):
  params = {"a": jnp.ones(3)}
  tx = case.make(0.1)
  with pytest.raises(ValueError, match="obj_fn"):
    tx.update(params, tx.init(params), params)


@pytest.mark.parametrize("case", _ids([c for c in METHOD_CASES if c.extra_args is C.logits_fn_args]))
def test_logits_fn_wrong_shape_is_an_error(case):
  """Logits must be [..., C] with C >= 2 classes; a scalar output is an error."""
  params = {"a": jnp.ones(3)}
  tx = case.make(0.1)
  with pytest.raises((TypeError, ValueError)):
    tx.update(params, tx.init(params), params, logits_fn=lambda p: jnp.sum(p["a"]))


def test_kfac_stats_wrong_shape_is_an_error():
  params, x, y, cap, layers = _kfac_setup()
  tx = scale_by_kfac_factors(layers=layers)
  _, grads, stats = cap(params, x, y)
  name = sorted(stats)[0]
  a, s = stats[name]
  bad = {**stats, name: type(stats[name])(a[:-1, :-1], s)}
  with pytest.raises(ValueError, match=name):
    tx.update(grads, tx.init(params), params, kfac_stats=bad)
  with pytest.raises(ValueError, match="kfac_stats"):
    tx.update(grads, tx.init(params), params)
