"""Matrix functions for preconditioners: symmetric eigh, inverse p-th roots, damped inverses.

Every function takes a symmetric positive semi-definite matrix, or a batch of them stacked
along leading axes, and works under `jax.jit` and `jax.vmap`. Products use
`Precision.HIGHEST` so that accelerators do not silently drop to reduced-precision matmuls.

  * `symmetric_eigh`: eigendecomposition of the symmetric part, scaled to avoid overflow.
  * `max_eigenvalue`: power-iteration estimate of the largest eigenvalue.
  * `inverse_pth_root`: (A + eps I)^(-1/p) by eigendecomposition or by a coupled Newton
    iteration, with a residual that tells a failed root from a good one.
  * `damped_inverse`: (A + damping I)^(-1) by Cholesky or by eigendecomposition.
  * `orthonormal_factor`: the Q of a QR decomposition (a power-iteration step's basis).

On CPU, batches of matrices of side `CPU_ONE_AT_A_TIME` (32) or more are decomposed one
matrix at a time: jaxlib 0.10's batched CPU LAPACK kernels can deadlock inside a larger
program.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from secondorder._validation import check_choice, check_int, check_range

__all__ = [
    "RootResult",
    "symmetric_eigh",
    "max_eigenvalue",
    "inverse_pth_root",
    "damped_inverse",
    "orthonormal_factor",
]

_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def _eye_like(a: jax.Array) -> jax.Array:
  return jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)


def _symmetrize(a: jax.Array) -> jax.Array:
  return 0.5 * (a + jnp.swapaxes(a, -1, -2))


# jaxlib 0.10's CPU LAPACK kernels split a large batch of matrices into tasks on the
# intra-op thread pool and wait for them; inside a larger program that pool can be busy
# with the program itself and the wait never ends (reproduced on 2 cores: three batched
# eigendecompositions of [4, 128, 128] in one jitted function hang, [128, 16, 16] do not).
# On CPU a batch of matrices of side CPU_ONE_AT_A_TIME or more is therefore decomposed one
# matrix at a time (`lax.map`); other platforms, and smaller matrices, keep the single
# batched call. Read when a function is traced: set it higher to keep batched calls on CPU
# where every batch is known to be small (e.g. one matrix per device on a mesh).
CPU_ONE_AT_A_TIME = 32


def _batched(fn, a: jax.Array, *per_matrix: jax.Array):
  """`fn(a, *per_matrix)` over a batch `a [..., n, n]` (`per_matrix` broadcast to `a`'s batch
  shape), one matrix at a time on CPU when that batch could hang jaxlib's kernels."""
  batch = a.shape[:-2]
  if math.prod(batch) <= 1 or a.shape[-1] < CPU_ONE_AT_A_TIME:
    return fn(a, *per_matrix)

  def one_at_a_time(a, *per_matrix):
    flat = a.reshape((-1,) + a.shape[-2:])
    rest = [jnp.broadcast_to(x, batch + x.shape[len(batch):]).reshape(
        (flat.shape[0],) + x.shape[len(batch):]) for x in per_matrix]
    out = jax.lax.map(lambda xs: fn(xs[0], *xs[1:]), (flat, *rest))
    return jax.tree.map(lambda o: o.reshape(batch + o.shape[1:]), out)

  return jax.lax.platform_dependent(a, *per_matrix, cpu=one_at_a_time, default=fn)


def symmetric_eigh(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigendecomposition `a = V diag(w) V^T` of the symmetric part of `a`.

  Robust to the asymmetry that accumulated floating-point statistics pick up (only the
  symmetric part is decomposed) and to their scale: the matrix is divided by its largest
  absolute entry before the decomposition and the eigenvalues are scaled back, so very small
  or very large statistics neither underflow nor overflow. A zero matrix gives zero
  eigenvalues and the identity as eigenvectors.

  Args:
    a: array `[..., n, n]`.

  Returns:
    `(w, v)`: eigenvalues `[..., n]` in ascending order and eigenvectors `[..., n, n]`
    (columns), so that `a ≈ v @ diag(w) @ v^T`.
  """
  a = _symmetrize(a)
  scale = jnp.max(jnp.abs(a), axis=(-2, -1), keepdims=True)
  safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
  w, v = _batched(lambda x: jnp.linalg.eigh(x, symmetrize_input=False), a / safe)
  return w * safe[..., 0], v


def max_eigenvalue(a: jax.Array, num_iters: int = 32) -> jax.Array:
  """Largest eigenvalue of a symmetric PSD matrix (or batch) by power iteration.

  The start vector is a fixed pseudo-random one (so the estimate is deterministic) and the
  result is the Rayleigh quotient after `num_iters` steps: a lower bound that converges to
  the largest eigenvalue. Returns shape `a.shape[:-2]`; zero for a zero matrix. The
  iteration runs on `a` divided by its largest absolute entry and the estimate is scaled
  back, so a matrix whose products overflow (float32 entries around 1e19) is estimated as
  in float64 rather than read as zero.
  """
  check_int("num_iters", num_iters, minimum=1)
  n = a.shape[-1]
  scale = jnp.max(jnp.abs(a), axis=(-2, -1), keepdims=True)
  safe = jnp.where((scale > 0) & jnp.isfinite(scale), scale, jnp.ones_like(scale))
  a = a / safe
  v0 = jax.random.normal(jax.random.PRNGKey(0), (n,), dtype=a.dtype)
  v = jnp.broadcast_to(v0 / jnp.linalg.norm(v0), a.shape[:-1])

  def body(_, v):
    w = jnp.einsum("...ij,...j->...i", a, v, precision=_HIGHEST)
    norm = jnp.linalg.norm(w, axis=-1, keepdims=True)
    return jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1.0), v)

  v = jax.lax.fori_loop(0, num_iters, body, v)
  return safe[..., 0, 0] * jnp.einsum("...i,...ij,...j->...", v, a, v, precision=_HIGHEST)


class RootResult(NamedTuple):
  """Result of `inverse_pth_root`.

  Attributes:
    root: `(A + eps I)^(-1/p)`, shape of the input.
    error: per matrix (shape `A.shape[:-2]`): for "newton" the final residual
      `max |H^p (A + eps I) - I|` of the iteration; for "eigh" zero when the decomposition
      is finite. Infinite whenever the root is not finite.
  """

  root: jax.Array
  error: jax.Array


def _root_eigh(a: jax.Array, exponent: jax.Array, eps: float, relative: bool,
               normalize: bool) -> RootResult:
  if normalize:
    w, v = symmetric_eigh(a)
  else:  # eigh itself decomposes the symmetric part
    w, v = _batched(jnp.linalg.eigh, a)
  w = jnp.maximum(w, 0.0)
  w_max = w[..., -1:]
  damping = eps * w_max if relative else eps
  w_reg = w + damping
  is_zero = (w_max <= 0) if relative else jnp.zeros_like(w_max, dtype=bool)
  powered = jnp.where(is_zero, 1.0, jnp.where(w_reg > 0, w_reg, 1.0) ** exponent)
  root = _mm(v * powered[..., None, :], jnp.swapaxes(v, -1, -2))
  finite = jnp.all(jnp.isfinite(w), axis=-1) & jnp.all(jnp.isfinite(powered), axis=-1)
  error = jnp.where(finite, 0.0, jnp.inf).astype(a.dtype)
  return RootResult(root, error)


def _root_newton_single(a: jax.Array, p: int, eps: float, relative: bool, max_iters: int,
                        tol: float, power_iters: int) -> RootResult:
  """Coupled Newton iteration for one matrix (vmapped for batches).

  With M_0 = z A, H_0 = z^(1/p) I and z = (1 + p) / (2 λ_max(A)), iterate
    T_k = ((p + 1) I - M_k) / p,   M_{k+1} = T_k^p M_k,   H_{k+1} = H_k T_k,
  so that H_k^p A = M_k throughout; M_k -> I and H_k -> A^(-1/p) (Guo & Higham 2006).
  The loop stops when max|M_k - I| < tol or, after the first step, the residual stops
  decreasing.
  """
  n = a.shape[-1]
  eye = jnp.eye(n, dtype=a.dtype)
  a = _symmetrize(a)
  lam = jnp.maximum(max_eigenvalue(a, power_iters), 0.0)
  damping = eps * lam if relative else jnp.asarray(eps, a.dtype)
  a_reg = a + damping * eye
  lam_reg = lam + damping
  is_zero = lam_reg <= 0
  z = (1.0 + p) / (2.0 * jnp.where(is_zero, 1.0, lam_reg))
  m0 = z * a_reg
  h0 = z ** (1.0 / p) * eye
  err0 = jnp.max(jnp.abs(m0 - eye))

  def cond(state):
    i, _, _, err, improving = state
    return (i < max_iters) & (err > tol) & improving

  def body(state):
    i, m, h, err, _ = state
    t = ((p + 1.0) * eye - m) / p
    t_p = t
    for _ in range(p - 1):
      t_p = _mm(t_p, t)
    m_new = _mm(t_p, m)
    h_new = _mm(h, t)
    err_new = jnp.max(jnp.abs(m_new - eye))
    # Exact arithmetic maps every eigenvalue of M into (0, 1] after the first step and then
    # raises it monotonically to 1; after that first step a growing residual means rounding
    # has taken over, so keep the better iterate and stop.
    improving = (err_new < err) | (i == 0)
    m_new = jnp.where(improving, m_new, m)
    h_new = jnp.where(improving, h_new, h)
    return i + 1, m_new, h_new, jnp.where(improving, err_new, err), improving

  init = (jnp.asarray(0), m0, h0, err0, jnp.asarray(True))
  _, _, h, err, _ = jax.lax.while_loop(cond, body, init)
  h = jnp.where(is_zero, eye, _symmetrize(h))
  err = jnp.where(is_zero, 0.0, err)
  finite = jnp.all(jnp.isfinite(h)) & jnp.isfinite(err)
  return RootResult(h, jnp.where(finite, err, jnp.inf).astype(a.dtype))


def inverse_pth_root(
    a: jax.Array,
    p: float | np.ndarray | jax.Array,
    *,
    eps: float = 1e-6,
    relative_eps: bool = True,
    method: str = "eigh",
    max_iters: int = 100,
    tol: float = 1e-6,
    power_iters: int = 32,
    normalize: bool = False,
) -> RootResult:
  """Inverse p-th root `(A + δ I)^(-1/p)` of a symmetric PSD matrix or batch of matrices.

  The damping is δ = eps·λ_max(A) when `relative_eps` (the regularisation follows the
  scale of the statistics) and δ = eps otherwise. A zero matrix (with relative damping)
  gives the identity.

  Two methods:
    * "eigh": A = V diag(w) V^T, root = V diag((max(w, 0) + δ)^(-1/p)) V^T. Any real p > 0.
    * "newton": the coupled Newton iteration (matrix products only, accelerator friendly),
      integer p; λ_max comes from power iteration.

  Args:
    a: `[..., n, n]` symmetric PSD.
    p: the root (the result is the (-1/p)-th power). For "eigh" also an array with one
      root per matrix (shape `a.shape[:-2]`), so matrices of one size but different roots
      share one decomposition call.
    eps: damping, relative to λ_max(A) when `relative_eps`.
    relative_eps: see above.
    method: "eigh" or "newton".
    max_iters: Newton iterations at most.
    tol: Newton stops when max|H^p A - I| < tol.
    power_iters: power-iteration steps for λ_max (Newton only).
    normalize: "eigh" through `symmetric_eigh` (scaled by the largest entry first), for
      statistics near the float range limits; off by default (fewer operations to compile).

  Returns:
    `RootResult(root, error)`; compare `error` with a tolerance to detect a failed root
    (NaN statistics, a non-converged iteration).

  Example:
    >>> a = jnp.array([[4.0, 0.0], [0.0, 16.0]])
    >>> inverse_pth_root(a, 2, eps=0.0).root   # diag(1/2, 1/4)
  """
  check_choice("method", method, ("eigh", "newton"))
  check_range("eps", eps, 0.0, None)
  if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
    raise ValueError(f"inverse_pth_root needs square matrices [..., n, n], got shape {a.shape}.")
  if method == "eigh" and jnp.ndim(p) > 0:
    if jnp.shape(p) != a.shape[:-2]:
      raise ValueError(f"p must be a number or one root per matrix (shape {a.shape[:-2]}), "
                       f"got shape {jnp.shape(p)}.")
    if not isinstance(p, jax.core.Tracer) and not np.all(np.asarray(p) > 0):
      raise ValueError(f"p must be > 0 for every matrix, got {p!r}.")
    exponent = (-1.0 / jnp.asarray(p, a.dtype))[..., None]
    return _root_eigh(a, exponent, eps, relative_eps, normalize)
  if jnp.ndim(p) > 0:
    raise ValueError(f"p must be one number for method={method!r} (one root per matrix "
                     f"needs method='eigh'), got shape {jnp.shape(p)}.")
  check_range("p", p, 0.0, None, low_inclusive=False)
  if method == "eigh":
    return _root_eigh(a, jnp.asarray(-1.0 / p, a.dtype), eps, relative_eps, normalize)
  if isinstance(p, bool) or int(p) != p:
    raise ValueError(f"p must be an integer for method='newton', got {p!r}.")
  check_int("max_iters", max_iters, minimum=1)
  fn = lambda m: _root_newton_single(m, int(p), eps, relative_eps, max_iters, tol, power_iters)
  batch_shape = a.shape[:-2]
  flat = a.reshape((-1,) + a.shape[-2:])
  out = jax.vmap(fn)(flat)
  return RootResult(out.root.reshape(a.shape), out.error.reshape(batch_shape))


def damped_inverse(a: jax.Array, damping: float | jax.Array, *, method: str = "cholesky"
                   ) -> jax.Array:
  """`(A + damping I)^(-1)` of a symmetric PSD matrix or batch of matrices.

  Args:
    a: `[..., n, n]` symmetric PSD.
    damping: a scalar (or an array broadcasting against `a.shape[:-2]`), > 0 for a PSD `a`.
    method: "cholesky" (fast; NaN if `A + damping I` is not positive definite) or "eigh"
      (eigenvalues clipped at 0 before damping, so it stays finite for slightly indefinite
      input).

  Example:
    >>> damped_inverse(jnp.eye(3) * 3.0, 1.0)   # eye(3) / 4
  """
  check_choice("method", method, ("cholesky", "eigh"))
  check_range("damping", damping, 0.0, None)
  damping = jnp.asarray(damping, a.dtype)[..., None, None]
  eye = _eye_like(a)
  if method == "eigh":
    w, v = symmetric_eigh(a)
    w = jnp.maximum(w, 0.0)[..., None, :] + damping
    return _symmetrize(_mm(v / w, jnp.swapaxes(v, -1, -2)))

  def inverse(x):
    return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(x), True), _eye_like(x))

  return _symmetrize(_batched(inverse, _symmetrize(a) + damping * eye))


def orthonormal_factor(a: jax.Array) -> jax.Array:
  """The orthonormal factor Q of `a = Q R`, for a square matrix or a batch `[..., n, n]`.

  One step of power iteration towards the eigenbasis of a factor H is
  `orthonormal_factor(H @ Q)`; on CPU a batch of large matrices is factored one at a time,
  like the decompositions above.
  """
  return _batched(lambda x: jnp.linalg.qr(x)[0], a)
