"""Spectral quantities of symmetric linear operators on pytrees.

An operator is any function `matvec: pytree -> pytree` that is linear and symmetric, e.g.
`hessian_operator(f, params)`, `gauss_newton_operator(f, loss, params)`,
`fisher_operator(logits_fn, params)` from `secondorder.curvature.products`, or a plain
`lambda v: hvp(f, params, v)`. Nothing here forms the matrix: only products with vectors.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from secondorder._validation import check_int, check_range, check_same_structure
from secondorder.curvature.cg import conjugate_gradient
from secondorder.curvature.estimators import rademacher_like, sample_mean

PyTree = Any
Operator = Callable[[PyTree], PyTree]


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Σ over leaves of ⟨a, b⟩, accumulated in float32 or wider."""
  def leaf(x, y):
    acc = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
    return jnp.sum(x.astype(acc) * y.astype(acc))
  return sum(jax.tree.leaves(jax.tree.map(leaf, a, b)), start=jnp.zeros((), jnp.float32))


def hutchinson_trace(
    matvec: Operator,
    params: PyTree,
    key: jax.Array,
    num_samples: int = 1,
    *,
    batch_size: int | None = None,
) -> jax.Array:
  """Hutchinson estimate of tr(A): the mean over Rademacher probes z of zᵀ A z.

  Unbiased; each leaf gets its own probe.

  Args:
    matvec: the operator `v -> A v` (e.g. `hessian_operator(loss_fn, params)`).
    params: a pytree with the structure and shapes of the operator's vectors.
    key: a PRNG key.
    num_samples: the number of probes (>= 1).
    batch_size: how many probes to evaluate at once (None: one at a time).

  Example:
    >>> tr = hutchinson_trace(hessian_operator(loss_fn, params), params, key, 100)

  Reference: Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1990.
  """
  check_int("num_samples", num_samples, minimum=1)

  def one(k):
    z = rademacher_like(k, params)
    return _vdot(z, matvec(z))

  return sample_mean(one, key, num_samples, batch_size)


def directional_sharpness(matvec: Operator, u: PyTree) -> jax.Array:
  """The curvature along a direction, uᵀ A u / ‖u‖² (a Rayleigh quotient).

  With A the Hessian and u the update (or the gradient) this is the sharpness the step
  sees; it lies between the smallest and the largest eigenvalue of A.

  The quotient does not depend on the scale of u, so u is first divided by its largest
  entry: a direction whose squared norm would overflow float32 (entries around 1e20) gives
  the same finite value as a small one. A zero direction (or an empty tree) has sharpness
  0 by definition, jitted or not; a direction with a NaN or an Inf gives NaN.

  Example:
    >>> s = directional_sharpness(hessian_operator(loss_fn, params), grads)
  """
  scale = _max_abs(u)
  safe_scale = jnp.where(scale > 0, scale, 1.0)
  v = jax.tree.map(lambda x: (x / safe_scale.astype(x.dtype)).astype(x.dtype), u)
  norm2 = _vdot(v, v)
  quotient = _vdot(v, matvec(v)) / jnp.where(norm2 > 0, norm2, 1.0)
  return jnp.where(scale == 0, jnp.zeros_like(quotient), quotient)


def _max_abs(tree: PyTree) -> jax.Array:
  """The largest |entry| over every leaf (0 for an empty tree), in float32 or wider."""
  leaves = [jnp.max(jnp.abs(x)).astype(jnp.promote_types(jnp.result_type(x), jnp.float32))
            for x in jax.tree.leaves(tree) if jnp.size(x)]
  return jnp.max(jnp.stack(leaves)) if leaves else jnp.zeros((), jnp.float32)


class Eigenpairs(NamedTuple):
  """Top eigenvalues (descending) and their unit eigenvectors (a pytree, leading axis k)."""
  eigenvalues: jax.Array
  eigenvectors: PyTree


def top_eigenvalues(
    matvec: Operator,
    params: PyTree,
    key: jax.Array,
    k: int = 1,
    num_iterations: int | None = None,
) -> Eigenpairs:
  """The k largest (algebraic) eigenvalues and eigenvectors of a symmetric operator, by Lanczos.

  Runs m Lanczos steps from a random start, with full reorthogonalisation of every new
  Krylov vector against all previous ones (twice, for stability), then takes the Ritz pairs
  of the m×m tridiagonal matrix T: A V = V T + r eₘᵀ, eigenvalues of T approximate the
  extreme eigenvalues of A. If the Krylov space becomes invariant (an exact eigenspace was
  found), it continues from a new random direction orthogonal to it, so repeated eigenvalues
  are found with their multiplicity. Memory is m + 1 vectors the size of `params` (never n×n).
  Computations run in float32 or wider, whatever the dtype of `params`.

  Args:
    matvec: the operator `v -> A v` (symmetric).
    params: a pytree with the structure and shapes of the operator's vectors.
    key: a PRNG key for the starting vector.
    k: how many eigenpairs (1 <= k <= n).
    num_iterations: Lanczos steps m (k <= m <= n); default min(n, max(2k + 20, 30)).

  Returns:
    `Eigenpairs(eigenvalues [k] descending, eigenvectors)`; `eigenvectors` is a pytree like
    `params` with a leading axis of size k, each vector of unit norm.

  Example:
    >>> vals, vecs = top_eigenvalues(hessian_operator(loss_fn, params), params, key, k=3)

  Reference: Lanczos, 1950; Golub & Van Loan, "Matrix Computations", §10.1;
  Ghorbani, Krishnan & Xiao, "An investigation into neural net optimization via Hessian
  eigenvalue density", ICML 2019.
  """
  flat0, unravel = ravel_pytree(params)
  n = flat0.size
  if n == 0:
    raise ValueError("top_eigenvalues needs params with at least one entry (an operator on "
                     "an empty tree has no eigenvalues); got an empty params tree.")
  check_int("k", k, minimum=1)
  if k > n:
    raise ValueError(f"k must be an integer <= {n} (the number of parameters), got {k}.")
  if num_iterations is None:
    num_iterations = min(n, max(2 * k + 20, 30))
  check_int("num_iterations", num_iterations, minimum=k)
  if num_iterations > n:
    raise ValueError(
        f"num_iterations must lie in [{k}, {n}] (k to the number of parameters), "
        f"got {num_iterations}.")
  m = num_iterations
  dtype = jnp.promote_types(flat0.dtype, jnp.float32)

  def flat_matvec(x):
    out = matvec(unravel(x.astype(flat0.dtype)))
    check_same_structure("matvec(v)", params, out)
    return ravel_pytree(out)[0].astype(dtype)

  def orthogonalize(w, basis):
    # Rows of `basis` not yet filled are zero and contribute nothing.
    for _ in range(2):
      w = w - basis.T @ (basis @ w)
    return w

  # Start vector and a spare for restarts. The n cyclic shifts of a Gaussian vector span
  # R^n almost surely (its circulant matrix has the DFT of the vector as eigenvalues), so
  # shift j of the spare serves as the fresh direction at step j without drawing again.
  v0, spare = jax.random.normal(key, (2, n), dtype)
  basis = jnp.zeros((m + 1, n), dtype).at[0].set(v0 / jnp.linalg.norm(v0))
  alphas = jnp.zeros((m,), dtype)
  betas = jnp.zeros((m + 1,), dtype)  # betas[j] couples basis[j - 1] and basis[j]
  tiny = jnp.finfo(dtype).eps ** 0.75

  def step(j, carry):
    basis, alphas, betas = carry
    v = basis[j]
    w = flat_matvec(v)
    alpha = jnp.vdot(v, w)
    w = w - alpha * v - betas[j] * basis[jnp.maximum(j - 1, 0)]
    w = orthogonalize(w, basis)
    beta = jnp.linalg.norm(w)
    # Breakdown: the Krylov space is invariant. Continue from a fresh random vector
    # orthogonal to it, and decouple the tridiagonal matrix there (beta = 0).
    scale = jnp.maximum(jnp.abs(alpha), jnp.max(jnp.abs(alphas)))
    broke = beta <= tiny * scale
    w = jax.lax.cond(broke, lambda: orthogonalize(jnp.roll(spare, j), basis), lambda: w)
    basis = basis.at[j + 1].set(w / jnp.linalg.norm(w))
    betas = betas.at[j + 1].set(jnp.where(broke, 0.0, beta))
    return basis, alphas.at[j].set(alpha), betas

  basis, alphas, betas = jax.lax.fori_loop(0, m, step, (basis, alphas, betas))
  basis = basis[:m]
  tridiagonal = jnp.diag(alphas) + jnp.diag(betas[1:m], 1) + jnp.diag(betas[1:m], -1)
  theta, s = jnp.linalg.eigh(tridiagonal)
  order = jnp.argsort(-theta)[:k]
  vectors = (basis.T @ s[:, order]).T  # [k, n]
  vectors = vectors / jnp.linalg.norm(vectors, axis=1, keepdims=True)
  eigenvectors = jax.vmap(lambda x: unravel(x.astype(flat0.dtype)))(vectors)
  return Eigenpairs(theta[order], eigenvectors)


class NewtonDecrement(NamedTuple):
  """λ = sqrt(gᵀ (A + δI)⁻¹ g) and the Newton direction (A + δI)⁻¹ g that gives it."""
  decrement: jax.Array
  direction: PyTree


def newton_decrement(
    matvec: Operator,
    grads: PyTree,
    damping: float = 0.0,
    *,
    tol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
) -> NewtonDecrement:
  """Newton decrement λ = sqrt(gᵀ (A + δ I)⁻¹ g) by conjugate gradient on the damped operator.

  Solves (A + δ I) x = g with `conjugate_gradient` (pytrees, products only), then
  λ = sqrt(⟨g, x⟩). ½λ² is the decrease a Newton step predicts on the local quadratic model,
  and x is the (damped) Newton direction. CG needs A + δ I positive definite: for a Hessian
  that may be indefinite, use a Gauss-Newton operator or enough damping.

  Args:
    matvec: the operator `v -> A v` (e.g. the Hessian or Gauss-Newton operator).
    grads: the gradient g, a pytree.
    damping: δ >= 0 added to the diagonal.
    tol, atol: CG stopping tolerances (relative and absolute residual norms).
    maxiter: the most CG iterations (default 10 n, n the number of parameters).

  Returns:
    `NewtonDecrement(decrement, direction)`.

  Example:
    >>> lam, step = newton_decrement(gauss_newton_operator(f, loss, params), grads, 1e-3)

  Reference: Boyd & Vandenberghe, "Convex Optimization", §9.5.1; Martens, "Deep learning via
  Hessian-free optimization", 2010.
  """
  check_range("damping", damping, 0.0)
  if maxiter is not None:
    check_int("maxiter", maxiter, minimum=1)

  def damped(x):
    return jax.tree.map(lambda ax, xx: ax + damping * xx, matvec(x), x)

  if maxiter is None:
    maxiter = max(10 * sum(jnp.size(g) for g in jax.tree.leaves(grads)), 1)
  direction = conjugate_gradient(damped, grads, max_iterations=maxiter, tol=tol, atol=atol).x
  return NewtonDecrement(jnp.sqrt(jnp.maximum(_vdot(grads, direction), 0.0)), direction)
