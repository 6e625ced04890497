"""Spectral tools on pytree operators against numpy.linalg on the dense matrices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from secondorder.curvature.losses import softmax_cross_entropy
from secondorder.curvature.products import gauss_newton_operator, hessian_operator, hvp
from secondorder.curvature.spectrum import (
    directional_sharpness, hutchinson_trace, newton_decrement, top_eigenvalues)

N = 50


def flat(tree):
  return ravel_pytree(tree)[0]


def normal(seed, shape, dtype=None, scale=1.0):
  """Test data from numpy (no per-op XLA compiles at setup); float64 under x64 unless dtype."""
  return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), dtype)


def randint(seed, shape, high):
  return jnp.asarray(np.random.default_rng(seed).integers(0, high, size=shape), jnp.int32)


def template():
  """A pytree of N = 50 entries spread over three leaves."""
  return {"kernel": jnp.zeros((5, 6)), "bias": jnp.zeros((8,)), "scale": {"g": jnp.zeros((12,))}}


def matrix_operator(A):
  _, unravel = ravel_pytree(template())
  A = jnp.asarray(A, jnp.float32)
  return lambda v: unravel(A @ flat(v))


def random_spd(seed=0):
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(N, N))
  return m @ m.T / N + 0.05 * np.eye(N)


@pytest.mark.parametrize("num_iterations", [None, N])
def test_lanczos_top3_of_random_spd_match_eigvalsh(num_iterations):
  A = random_spd()
  ref_vals, ref_vecs = np.linalg.eigh(A)
  ref_vals, ref_vecs = ref_vals[::-1], ref_vecs[:, ::-1]
  run = jax.jit(lambda k: top_eigenvalues(matrix_operator(A), template(), k, k=3,
                                          num_iterations=num_iterations))
  vals, vecs = run(jax.random.key(0))
  assert vals.shape == (3,)
  np.testing.assert_allclose(vals, ref_vals[:3], rtol=1e-4)
  V = np.asarray(jax.vmap(flat)(vecs), np.float64)  # [3, N], a pytree with leading axis 3
  assert vecs["kernel"].shape == (3, 5, 6)
  np.testing.assert_allclose(np.linalg.norm(V, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.abs(np.sum(V * ref_vecs[:, :3].T, axis=1)), 1.0, atol=1e-3)


def test_lanczos_restarts_on_invariant_subspace_and_finds_multiplicities():
  # Four distinct eigenvalues: the Krylov space is invariant after 4 steps.
  d = np.repeat([5.0, 3.0, 1.0, -2.0], [3, 10, 17, 20])
  # vmapped over two starting keys: the restart branch also runs batched.
  vals, vecs = jax.jit(jax.vmap(lambda k: top_eigenvalues(
      matrix_operator(np.diag(d)), template(), k, k=5, num_iterations=24)))(
          jax.random.split(jax.random.key(1), 2))
  for i in range(2):
    np.testing.assert_allclose(vals[i], [5.0, 5.0, 5.0, 3.0, 3.0], rtol=1e-5)
    V = np.asarray(jax.vmap(flat)(jax.tree.map(lambda x: x[i], vecs)))
    np.testing.assert_allclose(V @ V.T, np.eye(5), atol=1e-4)  # distinct vectors for a repeat


def test_lanczos_on_indefinite_mlp_hessian_float64():
  with jax.enable_x64(True):
    params = {"l1": {"w": normal(30, (3, 4)), "b": jnp.zeros(4)},
              "l2": {"w": normal(31, (4, 2)), "b": jnp.zeros(2)}}
    x = normal(32, (10, 3))
    y = randint(33, (10,), 2)
    loss = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"], y))
    t0, unravel = ravel_pytree(params)
    H = np.asarray(jax.jit(jax.hessian(lambda t: loss(unravel(t))))(t0))
    ref = np.linalg.eigvalsh(H)[::-1]
    assert ref[-1] < 0  # the Hessian is indefinite
    n = t0.size
    vals, _ = jax.jit(lambda p, k: top_eigenvalues(hessian_operator(loss, p), p, k, k=2,
                                                   num_iterations=n))(params, jax.random.key(0))
    assert vals.dtype == jnp.float64
    np.testing.assert_allclose(vals, ref[:2], rtol=1e-10)


def test_lanczos_argument_errors():
  op = matrix_operator(random_spd())
  with pytest.raises(ValueError, match=r"k must be an integer <= 50 \(the number of parameters\), got 51"):
    top_eigenvalues(op, template(), jax.random.key(0), k=51)
  with pytest.raises(ValueError, match=r"num_iterations must lie in \[3, 50\].*got 60"):
    top_eigenvalues(op, template(), jax.random.key(0), k=3, num_iterations=60)
  with pytest.raises(ValueError, match="num_iterations must be an integer >= 3, got 2"):
    top_eigenvalues(op, template(), jax.random.key(0), k=3, num_iterations=2)
  with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
    top_eigenvalues(op, template(), jax.random.key(0), k=0)


def test_hutchinson_trace_exact_on_diagonal_and_unbiased_on_dense():
  d = np.linspace(-1.0, 3.0, N)
  one = jax.jit(lambda k: hutchinson_trace(matrix_operator(np.diag(d)), template(), k))
  np.testing.assert_allclose(one(jax.random.key(0)), d.sum(), rtol=1e-5)

  A = random_spd(1)
  samples = 2000
  est = jax.jit(lambda k: hutchinson_trace(matrix_operator(A), template(), k, samples,
                                           batch_size=250))(jax.random.key(4))
  # Var(zᵀ A z) = 2 Σ_{i≠j} A_ij² for Rademacher z.
  off = A - np.diag(np.diag(A))
  stderr = np.sqrt(2 * np.sum(off ** 2) / samples)
  assert abs(float(est) - np.trace(A)) < 5 * stderr
  assert 5 * stderr < 0.05 * np.trace(A)
  with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got 0"):
    hutchinson_trace(matrix_operator(A), template(), jax.random.key(0), num_samples=0)


def test_directional_sharpness_is_the_rayleigh_quotient_and_vmaps():
  A = random_spd(2)
  U = normal(5, (3, N), jnp.float32)
  _, unravel = ravel_pytree(template())
  us = jax.vmap(unravel)(U)
  s = jax.jit(jax.vmap(lambda u: directional_sharpness(matrix_operator(A), u)))(us)
  Un = np.asarray(U, np.float64)
  ref = np.einsum("ki,ij,kj->k", Un, A, Un) / np.einsum("ki,ki->k", Un, Un)
  np.testing.assert_allclose(s, ref, rtol=1e-5)
  top = np.linalg.eigvalsh(A)[-1]
  assert np.all(np.asarray(s) <= top + 1e-4)


def test_newton_decrement_matches_dense_solve_on_gauss_newton():
  with jax.enable_x64(True):
    params = {"l1": {"w": normal(70, (3, 5)), "b": jnp.zeros(5)},
              "l2": {"w": normal(71, (5, 3)), "b": jnp.zeros(3)}}
    x = normal(72, (12, 3))
    y = randint(73, (12,), 3)
    logits_fn = lambda p: jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"]
    ce = softmax_cross_entropy(y)
    t0, unravel = ravel_pytree(params)

    @jax.jit
    def dense_gauss_newton(t):
      J = jax.jacfwd(lambda s: logits_fn(unravel(s)))(t)  # [B, C, n]
      q = jax.nn.softmax(logits_fn(unravel(t)))
      H_L = jax.vmap(lambda r: jnp.diag(r) - jnp.outer(r, r))(q) / 12
      return jnp.einsum("bci,bcd,bdj->ij", J, H_L, J)

    G = np.asarray(dense_gauss_newton(t0))
    damping = 1e-2

    @jax.jit
    def run(q):
      g = jax.grad(lambda r: ce(logits_fn(r)))(q)
      return g, newton_decrement(gauss_newton_operator(logits_fn, ce, q), g, damping,
                                 tol=1e-12, maxiter=500)

    g, (lam, step) = run(params)
    x_ref = np.linalg.solve(G + damping * np.eye(t0.size), np.asarray(flat(g)))
    np.testing.assert_allclose(flat(step), x_ref, rtol=1e-7)
    np.testing.assert_allclose(lam, np.sqrt(np.asarray(flat(g)) @ x_ref), rtol=1e-9)

  with pytest.raises(ValueError, match=r"damping must lie in \[0.0, inf\], got -1.0"):
    newton_decrement(lambda v: v, {"a": jnp.ones(2)}, damping=-1.0)


def test_spectrum_accepts_plain_hvp_closures():
  f = lambda p: jnp.sum(jnp.cos(p["a"])) + 0.5 * jnp.sum(p["b"] ** 2) * jnp.sum(p["a"] ** 2)
  params = {"a": jnp.array([0.1, 0.7, -0.4]), "b": jnp.array([1.0, -2.0])}
  t0, unravel = ravel_pytree(params)
  H = np.asarray(jax.jit(jax.hessian(lambda t: f(unravel(t))))(t0))
  vals, _ = jax.jit(lambda p: top_eigenvalues(lambda v: hvp(f, p, v), p, jax.random.key(0), k=1,
                                              num_iterations=5))(params)
  np.testing.assert_allclose(vals, np.linalg.eigvalsh(H)[-1:], rtol=1e-5)
