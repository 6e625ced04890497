"""Conjugate gradient on pytrees, with Martens' relative-progress stopping rule.

Solves A x = b for a symmetric positive-definite operator `matvec: pytree -> pytree` (a
damped Gauss-Newton, Fisher or Hessian operator from `secondorder.curvature.products`),
never forming A. Equivalently it minimises the quadratic model

  φ(x) = ½ xᵀ A x − bᵀ x,

whose value it tracks at every iterate, so that truncated-Newton methods can stop when the
model stops improving (Martens' rule) rather than when the residual is small. Everything
runs inside one `jax.lax.while_loop`; dot products are sums over all leaves, so under a
sharded `jax.jit` they are global.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

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


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Σ over leaves of ⟨a, b⟩, accumulated in float32 or wider."""
  def leaf(x, y):
    acc = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
    return jnp.sum(x.astype(acc) * y.astype(acc))
  leaves = jax.tree.leaves(jax.tree.map(leaf, a, b))
  dtype = jnp.result_type(*leaves) if leaves else jnp.float32
  return sum(leaves, start=jnp.zeros((), dtype))


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
  history = jnp.zeros((history_size,), phi.dtype).at[0].set(phi)
  return _Carry(i=jnp.zeros((), jnp.int32), x=x, ax=ax, r=r, z=z, p=z, rz=tree_vdot(r, z),
                phi=phi, history=history, done=jnp.array(False), negative=jnp.array(False))


def _relative_progress_stop(i: jax.Array, phi: jax.Array, history: jax.Array,
                            progress_tol: float, window: int, fraction: float) -> jax.Array:
  """Martens' rule: stop at iteration i when, with k = max(window, ⌊fraction·i⌋),
  i > k, φ(x_i) < 0 and (φ(x_i) − φ(x_{i−k})) / φ(x_i) < k·ε."""
  k = jnp.maximum(window, jnp.floor(fraction * i).astype(jnp.int32))
  earlier = history[jnp.maximum(i - k, 0)]
  progress = (phi - earlier) / jnp.where(phi < 0, phi, -1.0)
  return (i > k) & (phi < 0) & (progress < k * progress_tol)


def _iterate(matvec: Operator, b: PyTree, precondition: Callable, carry: _Carry,
             threshold: jax.Array, progress: tuple | None) -> _Carry:
  """One CG iteration; a direction of non-positive curvature ends the loop untaken."""
  ap = jax.tree.map(lambda v, ref: v.astype(ref.dtype), matvec(carry.p), b)
  pap = tree_vdot(carry.p, ap)
  negative = pap <= 0
  alpha = jnp.where(negative, 0.0, carry.rz / jnp.where(negative, 1.0, pap))
  x = _axpy(alpha, carry.p, carry.x)
  ax = _axpy(alpha, ap, carry.ax)
  r = _axpy(-alpha, ap, carry.r)
  z = precondition(r)
  rz = tree_vdot(r, z)
  beta = rz / jnp.where(carry.rz == 0, 1.0, carry.rz)
  p = _axpy(beta, carry.p, z)
  phi = _model_value(x, ax, b)
  i = carry.i + jnp.where(negative, 0, 1).astype(jnp.int32)
  history = carry.history.at[jnp.minimum(i, carry.history.size - 1)].set(phi)
  done = negative | ~jnp.isfinite(pap) | (jnp.sqrt(tree_vdot(r, r)) <= threshold)
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

  Args:
    matvec: the operator `v -> A v`, symmetric positive definite (a damped curvature).
    b: the right-hand side, a pytree.
    x0: the starting point (e.g. the previous solution times a decay); None for 0.
    max_iterations: the most iterations (a static Python int >= 1).
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
  history_size = max_iterations + 1 if progress is not None else 1
  carry = _start(matvec, b, x0, precondition, history_size)
  threshold = jnp.maximum(tol * jnp.sqrt(tree_vdot(b, b)), atol)
  carry = carry._replace(done=jnp.sqrt(tree_vdot(carry.r, carry.r)) <= threshold)

  carry = jax.lax.while_loop(
      lambda c: (c.i < max_iterations) & ~c.done,
      lambda c: _iterate(matvec, b, precondition, c, threshold, progress),
      carry)
  return CGResult(x=carry.x, ax=carry.ax, iterations=carry.i, model_value=carry.phi,
                  negative_curvature=carry.negative)
