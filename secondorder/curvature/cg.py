"""Conjugate gradient on pytrees, with Martens' relative-progress stopping rule.

Solves A x = b for a symmetric positive-definite operator `matvec: pytree -> pytree` (a
damped Gauss-Newton, Fisher or Hessian operator from `secondorder.curvature.products`),
never forming A. Equivalently it minimises the quadratic model

  φ(x) = ½ xᵀ A x − bᵀ x,

whose value it tracks at every iterate, so that truncated-Newton methods can stop when the
model stops improving (Martens' rule) rather than when the residual is small. Everything
runs inside one `jax.lax.while_loop`; dot products are sums over all leaves, so under a
sharded `jax.jit` they are global.

CG runs on the system divided by ‖b‖ (A is linear, so x/‖b‖ solves A y = b/‖b‖), with
‖b‖ computed by `tree_norm` (scaled by the largest entry): a right-hand side whose sum of
squares overflows (float32 entries around 1e19 and above) is solved like any other, and
its stopping test compares finite numbers.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from secondorder._validation import check_int, check_range, check_same_structure

PyTree = Any
Operator = Callable[[PyTree], PyTree]


class CGResult(NamedTuple):
  """What `conjugate_gradient` returns.

  Attributes:
    x: the approximate solution, a pytree like `b`.
    ax: A x, accumulated from the products CG made (no extra product).
    iterations: the number of CG iterations run (int32); each costs one product with A.
    model_value: φ(x) = ½ xᵀAx − bᵀx at the returned x.
    negative_curvature: True when a search direction p had pᵀAp <= 0 (A is not positive
      definite); CG stopped there without taking that step.
  """
  x: PyTree
  ax: PyTree
  iterations: jax.Array
  model_value: jax.Array
  negative_curvature: jax.Array


class _Carry(NamedTuple):
  """The loop state of `conjugate_gradient`."""
  i: jax.Array
  x: PyTree
  ax: PyTree
  r: PyTree
  z: PyTree
  p: PyTree
  rz: jax.Array
  phi: jax.Array
  history: jax.Array
  done: jax.Array
  negative: jax.Array


# The look-back buffer of the relative-progress rule when `max_iterations` is traced
# (`optax.inject_hyperparams`): a ring of this many model values, so that the buffer's shape
# does not depend on the traced count. Exact while the look-back k = max(window,
# ⌊fraction·i⌋) stays below it (i below about 10,000 for Martens' fraction 0.1); a longer
# look-back is capped at HISTORY_SIZE − 1.
HISTORY_SIZE = 1024


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Σ over leaves of ⟨a, b⟩, accumulated in float32 or wider."""
  def leaf(x, y):
    acc = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
    return jnp.sum(x.astype(acc) * y.astype(acc))
  leaves = jax.tree.leaves(jax.tree.map(leaf, a, b))
  dtype = jnp.result_type(*leaves) if leaves else jnp.float32
  return sum(leaves, start=jnp.zeros((), dtype))


def tree_norm(a: PyTree) -> jax.Array:
  """‖a‖₂ over all leaves, overflow-safe: m·sqrt(Σ (a/m)²) with m the largest |entry|.

  Finite whenever the norm itself is representable (float32 entries of 1e20 give a finite
  norm where the plain sum of squares is Inf); Inf or NaN when an entry is.
  """
  leaves = jax.tree.leaves(a)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  acc = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
  m = jnp.max(jnp.stack([jnp.max(jnp.abs(x.astype(acc)), initial=0.0) for x in leaves]))
  safe = jnp.where((m > 0) & jnp.isfinite(m), m, jnp.ones((), acc))
  total = sum((jnp.sum(jnp.square(x.astype(acc) / safe)) for x in leaves),
              start=jnp.zeros((), acc))
  return safe * jnp.sqrt(total)


def _scale_tree(tree: PyTree, factor: jax.Array) -> PyTree:
  """factor · tree, leaf by leaf, in each leaf's dtype."""
  return jax.tree.map(lambda v: (factor * v).astype(v.dtype), tree)


def _unscale_tree(tree: PyTree, divisor: jax.Array) -> PyTree:
  """tree / divisor, leaf by leaf, in each leaf's dtype (a division: 1/divisor can overflow
  where the quotients cannot)."""
  return jax.tree.map(lambda v: (v / divisor).astype(v.dtype), tree)


def _axpy(alpha: jax.Array, x: PyTree, y: PyTree) -> PyTree:
  """α x + y, leaf by leaf, in the dtype of y."""
  return jax.tree.map(lambda a, b: (alpha * a + b).astype(b.dtype), x, y)


def _model_value(x: PyTree, ax: PyTree, b: PyTree) -> jax.Array:
  """φ(x) = ½ xᵀ(Ax) − bᵀx."""
  return 0.5 * tree_vdot(x, ax) - tree_vdot(b, x)


def _start(matvec: Operator, b: PyTree, x0: PyTree | None, precondition: Callable,
           history_size: int) -> _Carry:
  """The first iterate: x0, or 0 when φ(x0) > 0 (x0 is then worse than no step at all)."""
  zeros = jax.tree.map(jnp.zeros_like, b)
  if x0 is None:
    x, ax, phi = zeros, zeros, jnp.zeros((), tree_vdot(b, b).dtype)
  else:
    ax0 = jax.tree.map(lambda v, ref: v.astype(ref.dtype), matvec(x0), b)
    phi0 = _model_value(x0, ax0, b)
    keep = phi0 <= 0
    x = jax.tree.map(lambda v: jnp.where(keep, v, 0), x0)
    ax = jax.tree.map(lambda v: jnp.where(keep, v, 0), ax0)
    phi = jnp.where(keep, phi0, 0)
  r = jax.tree.map(jnp.subtract, b, ax)
  z = precondition(r)
  history = jnp.zeros((history_size,), phi.dtype).at[0].set(phi)  # a ring: φ_i at i mod size
  return _Carry(i=jnp.zeros((), jnp.int32), x=x, ax=ax, r=r, z=z, p=z, rz=tree_vdot(r, z),
                phi=phi, history=history, done=jnp.array(False), negative=jnp.array(False))


def _relative_progress_stop(i: jax.Array, phi: jax.Array, history: jax.Array,
                            progress_tol: float, window: int, fraction: float) -> jax.Array:
  """Martens' rule: stop at iteration i when, with k = max(window, ⌊fraction·i⌋),
  i > k, φ(x_i) < 0 and (φ(x_i) − φ(x_{i−k})) / φ(x_i) < k·ε.

  `history` is a ring (φ_j at j mod its size); k is capped at its size − 1.
  """
  size = history.shape[0]
  k = jnp.minimum(jnp.maximum(window, jnp.floor(fraction * i).astype(jnp.int32)), size - 1)
  earlier = history[jnp.maximum(i - k, 0) % size]
  progress = (phi - earlier) / jnp.where(phi < 0, phi, -1.0)
  return (i > k) & (phi < 0) & (progress < k * progress_tol)


def _iterate(matvec: Operator, b: PyTree, precondition: Callable, carry: _Carry,
             threshold: jax.Array, progress: tuple | None) -> _Carry:
  """One CG iteration; a direction of non-positive curvature ends the loop untaken."""
  ap = jax.tree.map(lambda v, ref: v.astype(ref.dtype), matvec(carry.p), b)
  pap = tree_vdot(carry.p, ap)
  negative = pap <= 0
  alpha = jnp.where(negative, 0.0, carry.rz / jnp.where(negative, 1.0, pap))
  # An Inf or NaN curvature (products that overflow) is no step length: NaN, so that the
  # result shows the failure instead of the last iterate passing for a solution.
  alpha = jnp.where(jnp.isfinite(pap), alpha, jnp.nan)
  x = _axpy(alpha, carry.p, carry.x)
  ax = _axpy(alpha, ap, carry.ax)
  r = _axpy(-alpha, ap, carry.r)
  z = precondition(r)
  rz = tree_vdot(r, z)
  beta = rz / jnp.where(carry.rz == 0, 1.0, carry.rz)
  p = _axpy(beta, carry.p, z)
  phi = _model_value(x, ax, b)
  i = carry.i + jnp.where(negative, 0, 1).astype(jnp.int32)
  history = carry.history.at[i % carry.history.size].set(phi)
  done = negative | ~jnp.isfinite(pap) | (tree_norm(r) <= threshold)
  if progress is not None:
    done = done | _relative_progress_stop(i, phi, history, *progress)
  return _Carry(i=i, x=x, ax=ax, r=r, z=z, p=p, rz=rz, phi=phi, history=history, done=done,
                negative=negative)


def conjugate_gradient(
    matvec: Operator,
    b: PyTree,
    x0: PyTree | None = None,
    *,
    max_iterations: int,
    tol: float = 1e-5,
    atol: float = 0.0,
    preconditioner: PyTree | None = None,
    progress_tol: float | None = None,
    progress_window: int = 10,
    progress_fraction: float = 0.1,
) -> CGResult:
  r"""Solves A x = b by (preconditioned) conjugate gradient, products with A only.

  Minimises :math:`\phi(x) = \tfrac12 x^\top A x - b^\top x` over growing Krylov spaces:

  .. math::
    \alpha_i = \frac{r_i^\top z_i}{p_i^\top A p_i},\quad x_{i+1} = x_i + \alpha_i p_i,\quad
    r_{i+1} = r_i - \alpha_i A p_i,\quad z_{i+1} = M^{-1} r_{i+1},\quad
    p_{i+1} = z_{i+1} + \frac{r_{i+1}^\top z_{i+1}}{r_i^\top z_i} p_i,

  from :math:`r_0 = b - A x_0`, :math:`p_0 = z_0 = M^{-1} r_0`. It stops at the first of:

  * :math:`\|r_i\| \le \max(\mathrm{tol}\,\|b\|, \mathrm{atol})` (checked before the first
    iteration too, so a warm start that already solves the system costs no iteration);
  * `max_iterations` iterations;
  * a direction with :math:`p^\top A p \le 0` (A not positive definite): that step is not
    taken and `negative_curvature` is set;
  * with `progress_tol` = ε set, Martens' relative-progress rule: at iteration i, with
    :math:`k = \max(\text{window}, \lfloor \text{fraction}\cdot i \rfloor)`, stop when
    :math:`i > k`, :math:`\phi(x_i) < 0` and
    :math:`(\phi(x_i) - \phi(x_{i-k})) / \phi(x_i) < k\,\varepsilon`.

  A start `x0` with :math:`\phi(x_0) > 0` is worse than x = 0; CG then starts from 0
  (this costs the one product that computes :math:`r_0` anyway). The vectors keep the dtype
  of `b`'s leaves (pass float32 or wider); dot products accumulate in float32 or wider.
  The iteration runs on b/‖b‖ (‖b‖ from the overflow-safe `tree_norm`) and the results are
  scaled back, so a right-hand side whose sum of squares overflows is still solved; a NaN
  or Inf in b runs no iteration and returns NaN (never a finite x as if it had converged).

  Args:
    matvec: the operator `v -> A v`, symmetric positive definite (a damped curvature).
    b: the right-hand side, a pytree.
    x0: the starting point (e.g. the previous solution times a decay); None for 0.
    max_iterations: the most iterations, an int >= 1 (a traced count, as
      `optax.inject_hyperparams` passes, is clamped to >= 1; the progress rule then looks
      back through a ring of `HISTORY_SIZE` model values).
    tol: relative residual tolerance, >= 0.
    atol: absolute residual tolerance, >= 0.
    preconditioner: the diagonal of M (a pytree like `b`, positive entries); None for M = I.
    progress_tol: ε of the relative-progress rule (Martens uses 5e-4); None to turn it off.
    progress_window: the least look-back k of the rule (Martens: 10).
    progress_fraction: the look-back as a fraction of i (Martens: 0.1).

  Returns:
    `CGResult(x, ax, iterations, model_value, negative_curvature)`.

  Example:
    >>> op = gauss_newton_operator(logits_fn, softmax_cross_entropy(y), params)
    >>> damped = lambda v: jax.tree.map(lambda a, x: a + 1e-3 * x, op(v), v)
    >>> res = conjugate_gradient(damped, grads, max_iterations=50, progress_tol=5e-4)
    >>> newton_direction, iterations = res.x, res.iterations

  References:
    Hestenes & Stiefel, "Methods of conjugate gradients for solving linear systems", 1952;
    Martens, "Deep learning via Hessian-free optimization", ICML 2010, §4.4.
  """
  if not isinstance(max_iterations, (jax.Array, np.ndarray)):  # inject_hyperparams: arrays
    check_int("max_iterations", max_iterations, minimum=1)
  check_range("tol", tol, 0.0)
  check_range("atol", atol, 0.0)
  if x0 is not None:
    check_same_structure("x0", b, x0, "b")
  if preconditioner is not None:
    check_same_structure("preconditioner", b, preconditioner, "b")
  progress = None
  if progress_tol is not None:
    check_range("progress_tol", progress_tol, 0.0)
    check_int("progress_window", progress_window, minimum=1)
    check_range("progress_fraction", progress_fraction, 0.0)
    progress = (progress_tol, progress_window, progress_fraction)

  if preconditioner is None:
    precondition = lambda r: r
  else:
    precondition = lambda r: jax.tree.map(lambda v, m: (v / m).astype(v.dtype), r,
                                          preconditioner)
  b_norm = tree_norm(b)
  scale = jnp.where((b_norm > 0) & jnp.isfinite(b_norm), b_norm, jnp.ones_like(b_norm))
  b_hat = _unscale_tree(b, scale)
  x0_hat = None if x0 is None else _unscale_tree(x0, scale)
  carry = _start(matvec, b_hat, x0_hat, precondition, _history_size(max_iterations, progress))
  threshold = jnp.maximum(tol * tree_norm(b_hat), atol / scale)
  finite = jnp.isfinite(b_norm)
  carry = carry._replace(done=(tree_norm(carry.r) <= threshold) | ~finite)

  carry = jax.lax.while_loop(
      lambda c: (c.i < jnp.maximum(max_iterations, 1)) & ~c.done,
      lambda c: _iterate(matvec, b_hat, precondition, c, threshold, progress),
      carry)
  # Back to the scale of b: x = ‖b‖ x̂, Ax = ‖b‖ Ax̂, φ(x) = ‖b‖ (‖b‖ φ̂) (in that order, so
  # that ‖b‖² alone cannot overflow when φ itself is representable).
  # A NaN or Inf in b is no solve at all: NaN results, never a finite x to step on.
  scale = jnp.where(finite, scale, jnp.nan)
  return CGResult(x=_scale_tree(carry.x, scale), ax=_scale_tree(carry.ax, scale),
                  iterations=carry.i, model_value=scale * (scale * carry.phi),
                  negative_curvature=carry.negative)


def _history_size(max_iterations, progress) -> int:
  """The look-back ring's length: every model value for a Python `max_iterations` (the
  rule is then exact), `HISTORY_SIZE` for a traced one, 1 without the progress rule."""
  if progress is None:
    return 1
  if isinstance(max_iterations, (jax.Array, np.ndarray)):
    return HISTORY_SIZE
  return max_iterations + 1
