"""secondorder.linalg against numpy.linalg in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secondorder import linalg


def _psd(shape, rank, seed):
  rng = np.random.RandomState(seed)
  x = rng.randn(*shape[:-1], rank)
  return (x @ np.swapaxes(x, -1, -2)).astype(np.float32)


def _np_root(a, p, eps):
  w, v = np.linalg.eigh(a.astype(np.float64))
  w = np.maximum(w, 0.0)
  w = w + eps * w[..., -1:]
  return (v * w[..., None, :] ** (-1.0 / p)) @ np.swapaxes(v, -1, -2)


_roots = jax.jit(linalg.inverse_pth_root, static_argnames=("p", "method", "eps"))


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("p", [2, 4, 6])
def test_inverse_pth_root_matches_numpy(method, p):
  a = _psd((3, 12, 12), 30, seed=p)  # full rank, batched
  res = _roots(jnp.asarray(a), p=p, method=method, eps=1e-4)
  ref = _np_root(a, p, 1e-4)
  np.testing.assert_allclose(res.root, ref, rtol=2e-4, atol=2e-5 * np.abs(ref).max())
  assert res.error.shape == (3,)
  assert np.all(np.asarray(res.error) < 1e-3)


def test_newton_and_eigh_agree_rank_deficient():
  a = jnp.asarray(_psd((2, 10, 10), 4, seed=3))
  r_e = _roots(a, p=4, method="eigh", eps=1e-3)
  r_n = _roots(a, p=4, method="newton", eps=1e-3)
  ref = _np_root(np.asarray(a), 4, 1e-3)
  np.testing.assert_allclose(r_e.root, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
  np.testing.assert_allclose(r_n.root, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_absolute_eps_and_fractional_power():
  a = _psd((6, 6), 8, seed=4)
  res = linalg.inverse_pth_root(jnp.asarray(a), 2.5, eps=0.3, relative_eps=False)
  w, v = np.linalg.eigh(a.astype(np.float64))
  ref = (v * (np.maximum(w, 0) + 0.3) ** (-1 / 2.5)) @ v.T
  np.testing.assert_allclose(res.root, ref, rtol=1e-4, atol=1e-5)


def test_zero_matrix_gives_identity_and_nan_gives_infinite_error():
  for method in ("eigh", "newton"):
    res = linalg.inverse_pth_root(jnp.zeros((2, 5, 5)), 4, method=method)
    np.testing.assert_array_equal(res.root, np.broadcast_to(np.eye(5), (2, 5, 5)))
    bad = jnp.asarray(_psd((5, 5), 5, seed=0)).at[1, 2].set(jnp.nan)
    res = linalg.inverse_pth_root(bad, 4, method=method)
    assert not np.isfinite(float(res.error))


def test_one_root_per_matrix():
  a = jnp.asarray(_psd((3, 6, 6), 8, seed=6))
  res = linalg.inverse_pth_root(a, np.array([2.0, 4.0, 6.0]), eps=1e-4)
  for i, p in enumerate((2, 4, 6)):
    np.testing.assert_allclose(res.root[i], linalg.inverse_pth_root(a[i], p, eps=1e-4).root,
                               rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="one root per matrix"):
    linalg.inverse_pth_root(a, np.array([2.0, 4.0]))
  with pytest.raises(ValueError, match="> 0"):
    linalg.inverse_pth_root(a, np.array([2.0, 0.0, 4.0]))
  with pytest.raises(ValueError, match="one number for method='newton'"):
    linalg.inverse_pth_root(a, np.array([2.0, 4.0, 6.0]), method="newton")


def test_newton_needs_integer_p():
  with pytest.raises(ValueError, match="integer"):
    linalg.inverse_pth_root(jnp.eye(3), 2.5, method="newton")
  with pytest.raises(ValueError, match="method"):
    linalg.inverse_pth_root(jnp.eye(3), 2, method="svd")


def test_symmetric_eigh_and_max_eigenvalue():
  a = _psd((2, 7, 7), 9, seed=5) * 1e-30  # tiny scale: no underflow after normalisation
  a[0, 0, 1] += 1e-32  # slight asymmetry: only the symmetric part counts
  w, v = linalg.symmetric_eigh(jnp.asarray(a))
  sym = 0.5 * (a + np.swapaxes(a, -1, -2)).astype(np.float64)
  np.testing.assert_allclose(w, np.linalg.eigvalsh(sym), rtol=1e-4, atol=1e-4 * np.abs(sym).max())
  recon = np.einsum("bij,bj,bkj->bik", v, w, v)
  np.testing.assert_allclose(recon, sym, rtol=1e-4, atol=1e-4 * np.abs(sym).max())
  b = _psd((3, 8, 8), 12, seed=6)
  lam = linalg.max_eigenvalue(jnp.asarray(b), num_iters=200)
  np.testing.assert_allclose(lam, np.linalg.eigvalsh(b.astype(np.float64))[:, -1], rtol=1e-3)


def test_max_eigenvalue_and_newton_root_when_products_overflow():
  """float32 entries around 1e19 (A v and |A v|² overflow): the power iteration runs on the
  matrix scaled by its largest entry, so λ_max is numpy's float64 value, not 0 (which made
  the Newton root return the identity as the root of a zero matrix), and the Newton root
  matches the float64 eigendecomposition's."""
  b = _psd((8, 8), 12, seed=7).astype(np.float64) * 1e19
  lam = linalg.max_eigenvalue(jnp.asarray(b, jnp.float32), num_iters=200)
  np.testing.assert_allclose(float(lam), np.linalg.eigvalsh(b)[-1], rtol=1e-3)
  root = linalg.inverse_pth_root(jnp.asarray(b, jnp.float32), 2, eps=0.0, method="newton")
  w, v = np.linalg.eigh(b)
  want = (v * w ** -0.5) @ v.T
  np.testing.assert_allclose(np.asarray(root.root, np.float64), want, rtol=5e-2,
                             atol=5e-2 * np.abs(want).max())
  assert np.isfinite(float(root.error))


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_damped_inverse(method):
  a = _psd((2, 6, 6), 3, seed=7)
  inv = linalg.damped_inverse(jnp.asarray(a), 0.5, method=method)
  ref = np.linalg.inv(a.astype(np.float64) + 0.5 * np.eye(6))
  np.testing.assert_allclose(inv, ref, rtol=1e-4, atol=1e-5)
  # per-matrix damping
  inv2 = linalg.damped_inverse(jnp.asarray(a), jnp.array([0.5, 2.0]), method=method)
  np.testing.assert_allclose(inv2[1], np.linalg.inv(a[1].astype(np.float64) + 2 * np.eye(6)),
                             rtol=1e-4, atol=1e-5)


_THREE_BATCHED_DECOMPOSITIONS = """
import os
os.environ["OPENBLAS_NUM_THREADS"] = "1"
import jax, jax.numpy as jnp
from secondorder import linalg
ks = jax.random.split(jax.random.key(0), 3)
mk = lambda k: (lambda m: m @ m.swapaxes(1, 2))(jax.random.normal(k, (4, 128, 128)))
a, b, c = (mk(k) for k in ks)
f = jax.jit(lambda a, b, c: (linalg.symmetric_eigh(a),
                             linalg.inverse_pth_root(b, 4, method="eigh").root,
                             linalg.damped_inverse(c, 0.1)))
for i in range(10):
  jax.block_until_ready(f(a + i, b, c))
print("done")
"""


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a jaxlib CPU kernel issue")
def test_batched_decompositions_do_not_hang_on_cpu():
  # With one batched LAPACK call per [4, 128, 128] stack, jaxlib 0.10.2 hangs this program on
  # a 2-core machine (its kernels wait for tasks on the busy intra-op pool); linalg
  # decomposes such batches one matrix at a time on CPU.
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-c", _THREE_BATCHED_DECOMPOSITIONS],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-2000:]


def test_cpu_one_matrix_at_a_time_matches_the_batched_call():
  a = jax.random.normal(jax.random.key(1), (3, 40, 40))
  a = a @ jnp.swapaxes(a, 1, 2) / 40
  got = jax.jit(lambda x: linalg.damped_inverse(x, 0.1))(a)
  ref = np.stack([np.linalg.inv(np.asarray(m, np.float64) + 0.1 * np.eye(40)) for m in a])
  np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-5)
  w, v = jax.jit(linalg.symmetric_eigh)(a)
  np.testing.assert_allclose(w, np.linalg.eigvalsh(np.asarray(a, np.float64)), rtol=1e-4,
                             atol=1e-5)
  if jax.default_backend() == "cpu":
    hlo = jax.jit(linalg.symmetric_eigh).lower(a).compile().as_text()
    calls = [line for line in hlo.splitlines() if "custom-call" in line and "syevd" in line]
    assert calls and all("[3,40,40]" not in line for line in calls), calls
