"""Long runs: 10,000 steps of every method under lax.scan on an ill-conditioned quadratic.

No NaN/Inf in params, updates or state; step counters equal the number of steps taken;
state dtypes and update dtypes unchanged for bfloat16, float16, float32 and float64 params;
counters near the int32 limit saturate (optax.safe_increment) instead of wrapping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import contract as C
from tests.test_contract import CASES

# Every library case; the K-FAC cases with a covered layer run on their Dense model.
METHOD_CASES = [c for c in CASES if not c.name.startswith("optax_")]
STEPS = 10_000
INT32_MAX = int(jnp.iinfo(jnp.int32).max)

# A 2x2 parameter (Shampoo keeps a full 4x4 statistic for it) on ½ vec(W)ᵀ A vec(W) with
# cond(A) = 100, and one on the logits of a 2-class problem for the GNB and Gauss-Newton cases.
_A = np.asarray(C._spd(jax.random.key(5), 4, 2.0), np.float32)
_TARGET = np.array([[1.0, -2.0], [0.5, 3.0]], np.float32)


def _loss(p):
  d = (p["w"].astype(jnp.float32) - _TARGET).reshape(-1)
  return 0.5 * d @ jnp.asarray(_A) @ d


_X = np.linspace(-1.0, 1.0, 16, dtype=np.float32).reshape(8, 2)
_Y = np.arange(8) % 2


def _logits(p):
  return jnp.asarray(_X) @ p["w"].astype(jnp.float32)


def _ce(p):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_logits(p), jnp.asarray(_Y)))


_CAPTURES = (C.kfac_capture_args, C.ekfac_capture_args)


def _problem(case):
  if case.extra_args in _CAPTURES:
    return C.get_problem("dense_softmax")
  # The Gauss-Newton cases (hessian_free's default curvature) need the logits and the labels
  # of a classification problem: the same 2-class problem, with its labels for `loss_fn`.
  if case.extra_args in (C.logits_fn_args, C.gauss_newton_args):
    return C.Problem("long_logits", {"w": jnp.zeros((2, 2))}, _ce, 0.0, 1.0, _logits,
                     labels=jnp.asarray(_Y))
  return C.Problem("long_quadratic", {"w": jnp.zeros((2, 2))}, _loss, 0.0, 1.0)


def _lr(case):
  name = ("softmax_regression" if case.extra_args in (C.logits_fn_args, C.gauss_newton_args) else
          "dense_softmax" if case.extra_args in _CAPTURES else "matrix_quadratic")
  return 0.5 * case.lr_for(name)


def _run(case, dtype):
  problem = _problem(case)
  tx = case.make(_lr(case))
  params = C.cast_tree(problem.params, dtype)

  @jax.jit
  def run(params):
    state0 = tx.init(params)

    def body(carry, _):
      p, s = carry
      g = jax.grad(problem.loss)(p)
      u, s = tx.update(g, s, p, **C.call_extra_args(case.extra_args, problem, p, s))
      finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(u)]))
      return (optax.apply_updates(p, u), s), finite

    (p, s), finite = jax.lax.scan(body, (params, state0), None, length=STEPS)
    return state0, p, s, jnp.all(finite), problem.loss(params), problem.loss(p)

  return run(params)


def _count_fields(state):
  """(class name, field, value) for every NamedTuple field named `count` in the state."""
  out = []

  def walk(x):
    if isinstance(x, tuple) and hasattr(x, "_fields"):
      for f in x._fields:
        if f == "count":
          out.append((type(x).__name__, int(getattr(x, f))))
      for v in x:
        walk(v)
    elif isinstance(x, (tuple, list)):
      for v in x:
        walk(v)
    elif isinstance(x, dict):
      for v in x.values():
        walk(v)

  walk(state)
  return out


# States whose `count` counts real updates (one per k = 2 calls), not calls.
_PER_REAL_UPDATE = {"EveryKAccumulateState", "EveryKGateState"}


def _long_params():
  out = []
  for c in METHOD_CASES:
    for dtype, did in ((jnp.bfloat16, "bf16"), (jnp.float16, "f16"), (jnp.float32, "f32"),
                       (jnp.float64, "f64")):
      out.append(pytest.param(c, dtype, id=f"{c.name}-{did}"))
  return out


@pytest.mark.parametrize("case,dtype", _long_params())
def test_ten_thousand_steps(case, dtype):
  def check():
    state0, p, s, finite, loss0, loss1 = _run(case, dtype)
    assert bool(finite), "a non-finite update during the run"
    for x in jax.tree.leaves((p, s)):
      if jnp.issubdtype(x.dtype, jnp.inexact):
        assert bool(jnp.all(jnp.isfinite(x))), "non-finite params or state after the run"
    # dtypes: params keep theirs, the state keeps its own (lax.scan would also refuse a change).
    for x in jax.tree.leaves(p):
      assert x.dtype == jnp.dtype(dtype)
    assert [x.dtype for x in jax.tree.leaves(state0)] == [x.dtype for x in jax.tree.leaves(s)]
    counts = _count_fields(s)
    assert counts, "no step counter in the state"
    for cls, value in counts:
      expected = STEPS // 2 if cls in _PER_REAL_UPDATE else STEPS
      assert value == expected, f"{cls}.count = {value} after {STEPS} steps, expected {expected}"
    assert float(loss1) < float(loss0), f"loss did not decrease: {float(loss0)} -> {float(loss1)}"

  if jnp.dtype(dtype) == jnp.float64:
    with jax.enable_x64(True):
      check()
  else:
    check()


_STEP_FIELDS = ("count", "hessian_count", "nonfinite_count", "num_refreshes", "num_skipped",
                "stat_skips", "root_failures")


def _saturate_counters(x, value):
  """Sets the scalar counters named in _STEP_FIELDS to `value`."""
  if isinstance(x, tuple) and hasattr(x, "_fields"):
    return type(x)(*[
        jnp.asarray(value, v.dtype) if f in _STEP_FIELDS and isinstance(v, jax.Array)
        and v.ndim == 0 else _saturate_counters(v, value)
        for f, v in zip(x._fields, x)])
  if isinstance(x, (tuple, list)):
    return type(x)(_saturate_counters(v, value) for v in x)
  if isinstance(x, dict):
    return {k: _saturate_counters(v, value) for k, v in x.items()}
  return x


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in METHOD_CASES])
def test_counters_saturate_at_int32_max(case):
  problem = _problem(case)
  tx = case.make(_lr(case))
  params = problem.params

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(problem.loss)(p), s, p,
                     **C.call_extra_args(case.extra_args, problem, p, s))
    return optax.apply_updates(p, u), s, u

  p, s, _ = step(params, tx.init(params))
  s = _saturate_counters(s, INT32_MAX - 2)
  for _ in range(4):
    p, s, u = step(p, s)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((p, u)))
  for path, leaf in jax.tree_util.tree_flatten_with_path(s)[0]:
    if leaf.dtype == jnp.int32 and leaf.ndim == 0:
      assert int(leaf) >= 0, (
          f"int32 counter {jax.tree_util.keystr(path)} wrapped around to {int(leaf)}")
  for cls, value in _count_fields(s):
    assert value == INT32_MAX, f"{cls}.count = {value}, expected saturation at {INT32_MAX}"
