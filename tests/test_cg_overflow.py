"""Conjugate gradient at the edges: right-hand sides whose sum of squares overflows float32,
non-finite right-hand sides, and an iteration cap passed as a traced array.

Every decision is compared with the same solve in float64, where nothing overflows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secondorder.curvature.cg import HISTORY_SIZE, conjugate_gradient, tree_norm


def _spd(rng, n, log10_cond):
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  return (q * np.logspace(0.0, log10_cond, n)) @ q.T


@pytest.mark.parametrize("magnitude", [1e19, 1e20])
def test_tree_norm_does_not_overflow_where_the_norm_is_representable(magnitude):
  """float32 entries of 1e19-1e20: Σx² overflows (Inf) but the norm (about 3e20) does not;
  tree_norm equals numpy's float64 norm. Zeros give 0, an Inf or NaN entry gives Inf / NaN,
  an empty tree gives 0."""
  rng = np.random.default_rng(0)
  tree = {"w": (magnitude * rng.normal(size=(3, 4))).astype(np.float32),
          "b": (magnitude * rng.normal(size=5)).astype(np.float32)}
  want = np.sqrt(sum(np.sum(np.float64(x) ** 2) for x in tree.values()))
  with np.errstate(over="ignore"):
    assert not np.isfinite(np.sum(np.square(tree["w"]), dtype=np.float32))
  got = tree_norm(jax.tree.map(jnp.asarray, tree))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  assert float(tree_norm({"a": jnp.zeros(3), "b": jnp.zeros((2, 2))})) == 0.0
  assert float(tree_norm({})) == 0.0
  assert float(tree_norm(jnp.array([1.0, jnp.inf]))) == np.inf
  assert np.isnan(float(tree_norm(jnp.array([1.0, jnp.nan]))))


@pytest.mark.parametrize("magnitude", [1e19, 1e20])
def test_overflowing_right_hand_side_is_solved_as_in_float64(magnitude):
  """b of float32 entries around 1e19-1e20 (‖b‖² is Inf in float32): CG no longer stops at
  iteration 0 with x = 0; it runs the iterations float64 runs on the same system and
  returns float64's solution (to float32's accuracy), with A x and φ(x) = −½ bᵀx scaled
  back. (Before the scaled norms the stopping test read ‖r‖ ≤ tol·Inf and stopped at once.)"""
  rng = np.random.default_rng(1)
  n = 6
  a = _spd(rng, n, 1.0)
  b = magnitude * rng.normal(size=n)
  solve = lambda a, b: conjugate_gradient(lambda v: a @ v, b, max_iterations=3 * n, tol=1e-5)
  res32 = jax.jit(solve)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  with jax.enable_x64(True):
    res64 = jax.jit(solve)(jnp.asarray(a), jnp.asarray(b))
    it64 = int(res64.iterations)
  x = np.linalg.solve(a, b)
  assert it64 > 0 and int(res32.iterations) == it64
  np.testing.assert_allclose(np.asarray(res32.x, np.float64), x, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(res32.ax, np.float64), b, rtol=1e-4,
                             atol=1e-4 * magnitude)
  # φ = −½ bᵀA⁻¹b is about 1e38-1e40: representable for 1e19, Inf for 1e20 (like float64's
  # value cast to float32), never NaN.
  phi = -0.5 * b @ x
  if abs(phi) < np.finfo(np.float32).max:
    np.testing.assert_allclose(float(res32.model_value), phi, rtol=1e-4)
  else:
    assert float(res32.model_value) == -np.inf


def test_nonfinite_right_hand_side_gives_a_nonfinite_solution():
  """A NaN or Inf in b is not a converged solve at x = 0 (which a caller would step on):
  the solution is non-finite, which Hessian-free and the natural gradient count as a
  skipped step."""
  a = jnp.asarray(_spd(np.random.default_rng(2), 4, 1.0), jnp.float32)
  for bad in (jnp.inf, jnp.nan):
    b = jnp.array([1.0, bad, 0.0, 2.0])
    res = conjugate_gradient(lambda v: a @ v, b, jnp.zeros(4), max_iterations=8)
    assert not bool(jnp.all(jnp.isfinite(res.x)))


def test_zero_right_hand_side_returns_zero():
  a = jnp.asarray(_spd(np.random.default_rng(3), 4, 1.0))
  res = conjugate_gradient(lambda v: a @ v, jnp.zeros(4), jnp.ones(4), max_iterations=8)
  np.testing.assert_array_equal(np.asarray(res.x), np.zeros(4))
  assert int(res.iterations) == 0 and float(res.model_value) == 0.0


def test_traced_iteration_cap_equals_the_python_one():
  """max_iterations as a traced array (what optax.inject_hyperparams passes): one compile
  serves every cap, and each cap gives the iterations and iterate of the Python-int cap,
  with the relative-progress rule on (its look-back then reads a ring of HISTORY_SIZE
  values) and off; a traced cap of 0 is clamped to 1."""
  rng = np.random.default_rng(4)
  n = 120
  a, b = _spd(rng, n, 2.0), rng.normal(size=n)
  with jax.enable_x64(True):
    a, b = jnp.asarray(a), jnp.asarray(b)
    for progress_tol in (5e-4, None):
      traced = jax.jit(lambda m: conjugate_gradient(lambda v: a @ v, b, max_iterations=m,
                                                    tol=0.0, progress_tol=progress_tol))
      for cap in (3, 40, n):
        want = conjugate_gradient(lambda v: a @ v, b, max_iterations=cap, tol=0.0,
                                  progress_tol=progress_tol)
        got = traced(jnp.asarray(cap))
        assert int(got.iterations) == int(want.iterations)
        np.testing.assert_allclose(np.asarray(got.x), np.asarray(want.x), rtol=1e-6,
                                   atol=1e-9)
      assert int(traced(jnp.asarray(0)).iterations) == 1
      assert traced._cache_size() == 1
  assert HISTORY_SIZE > 10 * n / 10


def test_overflowing_curvature_products_give_a_nonfinite_solution():
  """Products with A that overflow (pᵀAp = Inf) are no solve: the solution is NaN, which
  Hessian-free and the natural gradient count as a skipped step, rather than the starting
  point returned as if CG had converged."""
  a = jnp.diag(jnp.array([1.0, 3e38, 2.0], jnp.float32))
  res = conjugate_gradient(lambda v: 10.0 * (a @ v), jnp.array([1.0, 1.0, 1.0]),
                           max_iterations=5)
  assert not bool(jnp.all(jnp.isfinite(res.x)))
