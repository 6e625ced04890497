"""What SOAP and KL-Shampoo share: Kronecker factors kept with their eigenbases.

Both methods sit on Shampoo's block plan (`secondorder.transforms._blocks`) read one-sided
(a dimension above ``max_precond_dim`` keeps no factor) with no matrix roots, keep every
factor side's stack of factors with a stack of eigenbases, rotate gradient blocks into
those bases, and refresh the bases on a schedule: an eigendecomposition on the first call,
one step of power iteration and QR every ``precondition_frequency`` calls after it. A
basis that comes out non-finite is not installed and is counted. The helpers here are
those steps; what each method does in the rotated coordinates stays in its own file.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from secondorder import linalg
from secondorder._validation import check_int
from secondorder.dimension_numbers import WeightDimensionNumbers, resolve_leaf_axes
from secondorder.transforms import _blocks

__all__ = ["one_sided_plan", "structural_sizes", "static_int", "rotate", "safe_divide", "finite_stacks", "eigenbases",
           "power_step", "install_bases", "first_bases", "switch_refresh", "zero_factors",
           "identity_bases", "factor_decay", "refresh_schedule", "decay_if_finite",
           "add_failures", "count_skip"]

_HIGHEST = jax.lax.Precision.HIGHEST
# No matrix roots are taken: one nominal exponent puts every factor of one side into one
# stack of the plan (one batched eigendecomposition or QR per side).
_NO_ROOT = 1.0
_DEFAULT_MAX_PRECOND_DIM = 10000


# ----------------------------------------------------------------------------- plan


def one_sided_plan(tree, weight_dimension_numbers: WeightDimensionNumbers, block_size: int,
                   max_dim: int, merge: bool) -> _blocks.Plan:
  """The block plan of a tree: one-sided, a dimension above ``max_dim`` is kept whole,
  unrotated."""
  leaves = jax.tree.leaves(tree)
  axes = resolve_leaf_axes(weight_dimension_numbers, tree)
  shapes = tuple(tuple(int(d) for d in jnp.shape(x)) for x in leaves)
  return _blocks.make_plan(shapes, tuple(axes), block_size=block_size, merge=merge,
                           max_dim=max_dim, exponent_override=_NO_ROOT, one_sided=True)


def structural_sizes(max_precond_dim, block_size, method: str, module: str
                     ) -> tuple[int, int]:
  """``(max_precond_dim, block_size)`` as Python ints: None reads as 10000 and as
  ``max_precond_dim`` (no blocking below it); see `static_int`."""
  max_precond_dim = (_DEFAULT_MAX_PRECOND_DIM if max_precond_dim is None
                     else static_int("max_precond_dim", max_precond_dim, method, module))
  block_size = (max_precond_dim if block_size is None
                else static_int("block_size", block_size, method, module))
  return max_precond_dim, block_size


def static_int(name: str, value: Any, method: str, module: str) -> int:
  """A structural number; a concrete array is accepted, a traced one explained.

  Args:
    name: the argument's name.
    value: its value.
    method: the method's name, as the message says it ("SOAP").
    module: the module that holds the method's ``STATIC_ARGS``.
  """
  if hasattr(value, "shape"):
    try:
      value = int(value)
    except jax.errors.ConcretizationTypeError:
      raise ValueError(
          f"{name} fixes the shape of the {method} state and cannot be an injected "
          "hyperparameter: leave it at None or use optax.inject_hyperparams(..., "
          f"static_args={module}.STATIC_ARGS).") from None
  check_int(name, value, minimum=1)
  return value


# ----------------------------------------------------------------------------- block math


def rotate(blocks: jax.Array, bases: Sequence[jax.Array | None], back: bool = False
           ) -> jax.Array:
  r"""Rotates a stack of blocks into (or, with ``back``, out of) their eigenbases.

  Forward, every block axis i is contracted with its basis :math:`Q_i`,
  :math:`G' = G \times_1 Q_1^\top \cdots \times_k Q_k^\top` (:math:`Q_L^\top G Q_R` for a
  matrix); back applies :math:`Q_i` instead, the inverse rotation.

  Args:
    blocks: ``[n, *block]``.
    bases: per block axis, ``[n, s, s]`` orthogonal matrices, or None for an axis that
      is not rotated.
    back: rotate back to the original coordinates.

  Returns:
    ``[n, *block]``.
  """
  if back:
    bases = [None if q is None else jnp.swapaxes(q, 1, 2) for q in bases]
  return _blocks.contract_blocks(blocks, bases)


def safe_divide(m: jax.Array, denominator: jax.Array) -> jax.Array:
  """m / denominator, 0 where the denominator is 0 (with eps = 0, an entry whose second
  moment is 0 has a zero first moment too: its direction is 0, not 0/0). A NaN stays NaN."""
  return jnp.where(denominator == 0, jnp.zeros_like(m), m / jnp.where(denominator == 0, 1,
                                                                      denominator))


def finite_stacks(x: jax.Array) -> jax.Array:
  """``[n]``: whether each matrix of a stack ``[n, s, s]`` is finite."""
  return jnp.all(jnp.isfinite(x), axis=(1, 2))


def eigenbases(factors: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigenvectors of a stack of factors, columns by decreasing eigenvalue.

  One batched call (`secondorder.linalg.symmetric_eigh`, one matrix at a time on CPU for
  large sides).

  Args:
    factors: ``[n, s, s]`` symmetric.

  Returns:
    ``(bases, ok)``: ``[n, s, s]`` and ``[n]`` (False where the result is not finite).
  """
  _, vecs = linalg.symmetric_eigh(factors)
  bases = vecs[..., ::-1]
  return bases, finite_stacks(bases)


def power_step(factors: jax.Array, bases: jax.Array) -> jax.Array:
  r"""One step of power iteration towards each factor's eigenbasis, columns kept in their
  order: :math:`Q \leftarrow \operatorname{qr}(H Q)` for stacks ``[n, s, s]``."""
  return linalg.orthonormal_factor(jnp.matmul(factors, bases, precision=_HIGHEST))


def install_bases(candidates: Sequence[jax.Array], previous: Sequence[jax.Array],
                  oks: Sequence[jax.Array]) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """Installs every candidate basis that is ok, keeps the previous one elsewhere.

  Returns:
    ``(bases, failures)``: the stacks in use and how many bases were not installed.
  """
  new, failures = [], jnp.zeros([], jnp.int32)
  for q, old, ok in zip(candidates, previous, oks):
    new.append(jnp.where(ok[:, None, None], q, old))
    failures = failures + jnp.sum(~ok).astype(jnp.int32)
  return tuple(new), failures


def first_bases(factors: Sequence[jax.Array], bases: Sequence[jax.Array]
                ) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """The first refresh: the eigenvectors of every factor, by decreasing eigenvalue.

  Returns:
    ``(bases, failures)``.
  """
  candidates = [eigenbases(f) for f in factors]
  return install_bases([q for q, _ in candidates], bases, [ok for _, ok in candidates])


def switch_refresh(plan: _blocks.Plan, due, first, on_first: Callable, on_due: Callable,
                   factors: Sequence[jax.Array], bases: Sequence[jax.Array], *carried):
  """The basis refresh inside `lax.switch`: ``on_first`` on the first call, ``on_due`` when
  ``due``, nothing otherwise (a step without a refresh does not pay for it).

  Args:
    plan: the plan.
    due: whether the schedule asks for a refresh.
    first: whether this is the first call.
    on_first: ``(factors, bases, *carried) -> (bases, *carried, failures)``.
    on_due: likewise.
    factors: the factors' stacks.
    bases: the bases in use.
    *carried: what the refresh updates along with the bases (tuples of arrays).

  Returns:
    ``(bases, *carried, failures)``.
  """
  if not plan.groups:
    return (tuple(bases), *carried, jnp.zeros([], jnp.int32))

  def keep(factors, bases, *carried):
    del factors
    return (tuple(bases), *carried, jnp.zeros([], jnp.int32))

  branch = jnp.where(first, 1, jnp.where(due, 2, 0))
  return jax.lax.switch(branch, [keep, on_first, on_due], tuple(factors), tuple(bases),
                        *carried)


# ----------------------------------------------------------------------------- state


def zero_factors(plan: _blocks.Plan, dtype) -> tuple[jax.Array, ...]:
  """One stack of zero factors ``[n, s, s]`` per group of the plan."""
  return tuple(jnp.zeros((n, s, s), dtype) for (s, _), n in zip(plan.groups, plan.group_sizes))


def identity_bases(plan: _blocks.Plan, dtype) -> tuple[jax.Array, ...]:
  """One stack of identity bases ``[n, s, s]`` per group, each its own buffer (a donated
  state must not alias)."""
  return tuple(jnp.tile(jnp.eye(s, dtype=dtype), (n, 1, 1))
               for (s, _), n in zip(plan.groups, plan.group_sizes))


# ----------------------------------------------------------------------------- update steps


def factor_decay(shampoo_beta, b2: jax.Array) -> jax.Array:
  """The factors' decay β in ``b2``'s dtype: ``b2`` where ``shampoo_beta`` is None or
  negative."""
  beta = b2 if shampoo_beta is None else jnp.asarray(shampoo_beta, b2.dtype)
  return jnp.where(beta < 0, b2, beta)


def refresh_schedule(count: jax.Array, frequency):
  """``(first, due, k)``: whether this is the first call, whether a basis refresh is due
  (every ``frequency`` calls; an injected frequency below 1 is read as 1, a refresh every
  call, not ``count % 0``), and the step of the moments (the calls after the first)."""
  first = count == 0
  frequency = jnp.maximum(jnp.asarray(frequency, jnp.int32), 1)
  due = (count % frequency) == 0
  return first, due, jnp.maximum(count, 1)


def decay_if_finite(old: jax.Array, contribution: jax.Array, beta, finite: jax.Array
                    ) -> jax.Array:
  r""":math:`H \leftarrow \beta H + (1 - \beta) C` for every factor of a stack whose
  ``finite [n]`` holds; the others keep their value."""
  return jnp.where(finite[:, None, None], beta * old + (1 - beta) * contribution, old)


def add_failures(counter: jax.Array, failures: jax.Array) -> jax.Array:
  """``counter + failures``, saturating (like `optax.safe_increment`: never wraps
  negative)."""
  return counter + jnp.minimum(failures, jnp.iinfo(jnp.int32).max - counter)


def count_skip(counter: jax.Array, skipped: jax.Array) -> jax.Array:
  """``counter + 1`` where ``skipped``, saturating."""
  return jnp.where(skipped, optax.safe_increment(counter), counter)
