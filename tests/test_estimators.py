"""Curvature-diagonal estimators against dense Hessians, Gauss-Newton and Fisher matrices."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from secondorder.curvature.estimators import (
    empirical_fisher_diag, gnb_diag, hutchinson_diag, rademacher_like)

BATCH, D_IN, HIDDEN, CLASSES = 8, 3, 4, 3


def flat(tree):
  return ravel_pytree(tree)[0]


def normal(seed, shape, dtype=None, scale=1.0):
  """Test data from numpy (no per-op XLA compiles at setup); float64 under x64 unless dtype."""
  return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), dtype)


def randint(seed, shape, high):
  return jnp.asarray(np.random.default_rng(seed).integers(0, high, size=shape), jnp.int32)


def test_rademacher_probes_are_signs_balanced_and_uncorrelated():
  tree = {"big": jnp.zeros((100, 41)), "odd": jnp.zeros((7,)), "empty": jnp.zeros((0, 3)),
          "half": jnp.zeros((5,), jnp.bfloat16)}
  draw = jax.jit(rademacher_like)
  z = draw(jax.random.key(0), tree)
  assert z["empty"].shape == (0, 3) and z["half"].dtype == jnp.bfloat16
  assert set(np.unique(np.asarray(flat(z)))) == {-1.0, 1.0}
  big = np.asarray(z["big"], np.float64).reshape(-1)
  n = big.size
  # Mean and lag-1 / lag-32 autocorrelations are 0 for i.i.d. signs, each with std 1/sqrt(n).
  assert abs(big.mean()) < 4.5 / np.sqrt(n)
  for lag in (1, 31, 32, 33):
    assert abs(np.mean(big[:-lag] * big[lag:])) < 4.5 / np.sqrt(n - lag)
  z2 = draw(jax.random.key(1), tree)
  assert abs(np.mean(big * np.asarray(z2["big"]).reshape(-1))) < 4.5 / np.sqrt(n)


def test_hutchinson_is_exact_with_one_sample_on_a_diagonal_hessian():
  params = {"a": jnp.array([0.5, -1.0, 2.0]), "b": {"w": jnp.arange(6.0).reshape(2, 3) / 4}}
  d = {"a": jnp.array([3.0, 0.5, 7.0]), "b": {"w": jnp.array([[1.0, 2.0, 0.1], [4.0, 5.0, 9.0]])}}

  def quadratic(p):
    return 0.5 * sum(jnp.sum(di * pi ** 2) for di, pi in zip(jax.tree.leaves(d), jax.tree.leaves(p)))

  def separable(p):  # diagonal Hessian that depends on the point: cosh'' = cosh
    return jnp.sum(jnp.cosh(p["a"])) + jnp.sum(jnp.exp(p["b"]["w"]))

  est = jax.jit(lambda p, k: (hutchinson_diag(quadratic, p, k),
                              hutchinson_diag(separable, p, k)))
  for seed in range(3):
    quad, sep = est(params, jax.random.key(seed))
    np.testing.assert_allclose(flat(quad), flat(d), rtol=1e-6)
    np.testing.assert_allclose(sep["a"], jnp.cosh(params["a"]), rtol=1e-6)
    np.testing.assert_allclose(sep["b"]["w"], jnp.exp(params["b"]["w"]), rtol=1e-6)


@functools.cache
def dense_problem():
  """A non-quadratic loss with a dense Hessian on a two-leaf pytree.

  f(θ) = Σ log cosh(M θ) + ½ c ‖θ‖², H = Mᵀ diag(sech²(M θ)) M + c I.
  """
  n = 12
  m = normal(0, (20, n), scale=1 / np.sqrt(n))
  params = {"u": normal(1, (4,), scale=0.3), "v": normal(2, (2, 4), scale=0.3)}
  _, unravel = ravel_pytree(params)

  def f(p):
    t = flat(p)
    return jnp.sum(jnp.log(jnp.cosh(m @ t))) + 0.5 * 2.0 * jnp.sum(t * t)

  H = jax.jit(jax.hessian(lambda t: f(unravel(t))))(flat(params))
  return f, params, np.asarray(H, np.float64)


def test_hutchinson_mean_of_4000_samples_is_within_5_percent_of_dense_diagonal():
  f, params, H = dense_problem()
  off = H - np.diag(np.diag(H))
  assert np.abs(off).max() > 0.1 * np.abs(np.diag(H)).min()  # the Hessian is really dense
  # Per-entry std of one probe is sqrt(Σ_{j≠i} H_ij²); with 4000 samples 5% is > 4 std.
  assert np.max(4 * np.sqrt((off ** 2).sum(1) / 4000) / np.diag(H)) < 0.05
  est = jax.jit(lambda k: hutchinson_diag(f, params, k, num_samples=4000, batch_size=500))
  d = flat(est(jax.random.key(42)))
  np.testing.assert_array_less(np.abs(np.asarray(d) - np.diag(H)), 0.05 * np.diag(H))


def test_hutchinson_batch_size_and_vmap_do_not_change_the_estimate_and_dtype_is_kept():
  f, params, _ = dense_problem()
  key = jax.random.key(3)
  keys = jax.random.split(key, 2)
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  f16 = lambda p: f(jax.tree.map(lambda x: x.astype(jnp.float32), p))
  seq, vec, batched, single, d16 = jax.jit(lambda k, ks: (
      hutchinson_diag(f, params, k, 7),
      hutchinson_diag(f, params, k, 7, batch_size=3),  # two chunks of 3 and a rest of 1
      jax.vmap(lambda kk: hutchinson_diag(f, params, kk))(ks),
      hutchinson_diag(f, params, ks[1]),
      hutchinson_diag(f16, p16, k)))(key, keys)
  np.testing.assert_allclose(flat(seq), flat(vec), rtol=1e-5)
  np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[1], batched)), flat(single), rtol=1e-5)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(d16))


def test_hutchinson_rejects_bad_num_samples():
  f, params, _ = dense_problem()
  for bad in (0, -3):
    with pytest.raises(ValueError, match=f"num_samples must be an integer >= 1, got {bad}"):
      hutchinson_diag(f, params, jax.random.key(0), num_samples=bad)
  with pytest.raises(ValueError, match="num_samples must be an integer"):
    hutchinson_diag(f, params, jax.random.key(0), num_samples=2.5)
  with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
    hutchinson_diag(f, params, jax.random.key(0), num_samples=4, batch_size=0)


def test_hutchinson_rejects_non_scalar_loss():
  f, params, _ = dense_problem()
  with pytest.raises(ValueError, match=r"hvp needs f to return a scalar; it returned shape \(2,\)"):
    jax.jit(lambda p, k: hutchinson_diag(lambda q: jnp.stack([f(q), f(q)]), p, k))(
        params, jax.random.key(0))


@functools.cache
def classifier():
  params = {"hidden": {"w": normal(50, (D_IN, HIDDEN)), "b": jnp.zeros(HIDDEN)},
            "out": {"w": normal(51, (HIDDEN, CLASSES)), "b": normal(52, (CLASSES,), scale=0.1)}}
  x = normal(53, (BATCH, D_IN))
  y = randint(54, (BATCH,), CLASSES)

  def logits_fn(p, x=x):
    return jnp.tanh(x @ p["hidden"]["w"] + p["hidden"]["b"]) @ p["out"]["w"] + p["out"]["b"]

  return params, x, y, logits_fn


def test_gnb_mean_matches_gauss_newton_diagonal_within_sampling_error():
  params, _, _, logits_fn = classifier()
  t0, unravel = ravel_pytree(params)

  @jax.jit
  def dense_gauss_newton_diag(t):
    # G = (1/B) Σ_b J_bᵀ (diag p_b − p_b p_bᵀ) J_b, assembled from jacfwd per example.
    J = jax.jacfwd(lambda s: logits_fn(unravel(s)))(t)  # [B, C, n]
    p = jax.nn.softmax(logits_fn(unravel(t)), axis=-1)
    H_L = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
    return jnp.diag(jnp.einsum("bci,bcd,bdj->ij", J, H_L, J)) / BATCH

  g_diag = np.asarray(dense_gauss_newton_diag(t0), np.float64)
  n_draws = 4000
  samples = jax.jit(jax.vmap(lambda k: flat(gnb_diag(logits_fn, params, k))))(
      jax.random.split(jax.random.key(11), n_draws))
  samples = np.asarray(samples, np.float64)
  mean = samples.mean(0)
  stderr = samples.std(0, ddof=1) / np.sqrt(n_draws)
  # Each entry is a mean of 4000 i.i.d. draws: |mean − E| < 5 standard errors (p ≈ 6e-7 per
  # entry under the normal approximation); the bound is far below the entries themselves.
  assert np.all(5 * stderr < 0.2 * g_diag + 1e-6)
  np.testing.assert_array_less(np.abs(mean - g_diag), 5 * stderr + 1e-7)


def test_gnb_flattens_batch_axes_and_matches_one_manual_draw():
  params, _, _, logits_fn = classifier()
  key = jax.random.key(2)
  seq_fn = lambda p: logits_fn(p).reshape(2, BATCH // 2, CLASSES)
  a, b = jax.jit(lambda p: (gnb_diag(logits_fn, p, key), gnb_diag(seq_fn, p, key)))(params)
  np.testing.assert_allclose(flat(a), flat(b), rtol=1e-6)
  # The same labels drawn by hand: B * (grad of the mean CE at those labels)².

  @jax.jit
  def manual(p):
    y_hat = jax.random.categorical(key, logits_fn(p), axis=-1)
    return jax.grad(lambda q: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits_fn(q), y_hat)))(p)

  g = manual(params)
  np.testing.assert_allclose(flat(a), BATCH * flat(g) ** 2, rtol=1e-4, atol=1e-9)


def test_gnb_rejects_scalar_logits():
  params, _, _, logits_fn = classifier()
  with pytest.raises(ValueError, match=r"gnb_diag needs logits_fn to return an array of logits"):
    gnb_diag(lambda p: jnp.sum(logits_fn(p)), params, jax.random.key(0))


def test_empirical_fisher_diag_matches_per_example_jacobian():
  params, x, y, logits_fn = classifier()
  t0, unravel = ravel_pytree(params)

  def example_loss(p, ex):
    xi, yi = ex
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, xi[None]), yi[None])[0]

  @jax.jit
  def reference(t):
    # Rows of the Jacobian of the per-example loss vector are the per-example gradients.
    losses = lambda s: optax.softmax_cross_entropy_with_integer_labels(logits_fn(unravel(s)), y)
    grads = jax.jacrev(losses)(t)  # [B, n]
    return jnp.mean(grads ** 2, axis=0)

  d = jax.jit(lambda p: empirical_fisher_diag(example_loss, p, (x, y)))(params)
  assert jax.tree.structure(d) == jax.tree.structure(params)
  np.testing.assert_allclose(flat(d), reference(t0), rtol=1e-5, atol=1e-9)
