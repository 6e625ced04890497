"""SOAP: Adam run in the slowly rotating eigenbasis of Shampoo's Kronecker factors.

`scale_by_soap` is the primitive; `soap` chains it with decoupled weight decay and the
learning rate. Both sit on the block plan Shampoo uses (`secondorder.transforms._blocks`):
the same blocking, stacking of same-sized factors into batched decompositions, dimension
numbers for scan-stacked layers, and sharding of the stacks. The eigenbases, their rotation
and their refresh are the steps KL-Shampoo shares (`secondorder.transforms._eigenbasis`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from secondorder._validation import (check_count, check_float_leaves, check_range,
                                     check_state_shapes, check_tree_structure)
from secondorder.dimension_numbers import WeightDimensionNumbers
from secondorder.transforms import _blocks
from secondorder.transforms import _eigenbasis

__all__ = ["ScaleBySoapState", "scale_by_soap", "soap", "STATIC_ARGS"]

# Arguments that fix the structure of the state. Left at their defaults (None) they stay
# static under `optax.inject_hyperparams`; set explicitly, name them in
# `optax.inject_hyperparams(soap, static_args=STATIC_ARGS)`.
STATIC_ARGS = ("block_size", "max_precond_dim")

_HIGHEST = jax.lax.Precision.HIGHEST


class ScaleBySoapState(NamedTuple):
  """State of `scale_by_soap`.

  Attributes:
    count: calls so far (int32). The first call only collects statistics.
    factors: the Kronecker factors L, R, ... of every block, one stack ``[n, s, s]`` per
      factor side s (the plan's groups, sorted by side), in ``statistics_dtype``.
    bases: their eigenbases in use, stacked like ``factors`` (columns in the order of
      decreasing estimated eigenvalue).
    mu: Adam's first moment, per leaf: for a preconditioned leaf one ``[n, *block]`` stack
      per block shape, in the rotated coordinates; for a diagonal leaf the leaf's shape.
    nu: Adam's second moment, laid out like ``mu``.
    refresh_failures: eigenbases that came out non-finite and were not installed (the
      previous basis stayed in use).
    stat_skips: steps on which some factor kept its previous value because the gradient's
      contribution was not finite.
  """

  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
  factors: tuple[jax.Array, ...]
  bases: tuple[jax.Array, ...]
  mu: tuple[jax.Array, ...]
  nu: tuple[jax.Array, ...]
  refresh_failures: jax.Array
  stat_skips: jax.Array


# ----------------------------------------------------------------------------- block math


def adam_direction(rotated: Sequence[jax.Array], mu: Sequence[jax.Array],
                   nu: Sequence[jax.Array], b1, b2, eps, k: jax.Array):
  r"""Adam's moments and bias-corrected direction for every stack (rotated coordinates).

  .. math::
    m \leftarrow b_1 m + (1 - b_1) G',\quad v \leftarrow b_2 v + (1 - b_2) G'^2,\quad
    N' = \frac{\sqrt{1 - b_2^k}}{1 - b_1^k} \cdot \frac{m}{\sqrt{v} + \epsilon}

  (epsilon added before the bias correction, as the authors' implementation does).

  Args:
    rotated: the rotated gradients (any list of arrays).
    mu: first moments, like ``rotated``.
    nu: second moments, like ``rotated``.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to sqrt(v).
    k: the Adam step, from 1.

  Returns:
    ``(directions, mu, nu)`` as lists.
  """
  mu = optax.tree.update_moment(list(rotated), list(mu), b1, 1)
  nu = optax.tree.update_moment_per_elem_norm(list(rotated), list(nu), b2, 2)
  kf = k.astype(mu[0].dtype) if mu else k
  scale = jnp.sqrt(1 - b2 ** kf) / (1 - b1 ** kf)
  directions = [scale * _eigenbasis.safe_divide(m, jnp.sqrt(v) + eps) for m, v in zip(mu, nu)]
  return directions, mu, nu


def power_iteration_bases(factors: jax.Array, bases: jax.Array
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""One step of power iteration and QR towards each factor's eigenbasis.

  The columns of the basis in use are sorted by their estimated eigenvalues
  :math:`\operatorname{diag}(Q^\top H Q)`, largest first, and :math:`Q \leftarrow
  \operatorname{qr}(H Q_{sorted})`. A basis that comes out non-finite is not installed.

  Args:
    factors: ``[n, s, s]``.
    bases: the bases in use, ``[n, s, s]``.

  Returns:
    ``(bases, order, ok)``: the new bases (the old ones where not ok), the column order
    ``[n, s]`` applied (to be applied to the second moment too; the identity where not
    ok) and ``ok [n]``.
  """
  estimates = jnp.einsum("nij,nik,nkj->nj", bases, factors, bases, precision=_HIGHEST)
  order = jnp.argsort(-estimates, axis=-1, stable=True)
  ordered = jnp.take_along_axis(bases, order[:, None, :], axis=2)
  new = _eigenbasis.power_step(factors, ordered)
  ok = _eigenbasis.finite_stacks(new) & _eigenbasis.finite_stacks(factors)
  identity = jnp.broadcast_to(jnp.arange(order.shape[-1]), order.shape)
  return (jnp.where(ok[:, None, None], new, bases), jnp.where(ok[:, None], order, identity),
          ok)


def permute_axes(x: jax.Array, orders: Sequence[jax.Array]) -> jax.Array:
  """Reorders every block axis i of ``x [n, *block]`` by ``orders[i] [n, s_i]`` (an axis
  whose order is None, one that is not rotated, stays as it is)."""
  for i, order in enumerate(orders):
    if order is None:
      continue
    shape = [order.shape[0]] + [1] * (x.ndim - 1)
    shape[1 + i] = order.shape[1]
    x = jnp.take_along_axis(x, order.reshape(shape), axis=1 + i)
  return x


# ----------------------------------------------------------------------------- plan steps


def _moment_shapes(plan: _blocks.Plan) -> list[tuple[int, ...]]:
  """The shape of every moment array: per leaf, one per block shape (or the leaf's)."""
  out = []
  for lp in plan.leaves:
    if lp.diagonal:
      out.append(lp.shape)
    else:
      out.extend((lp.factors(c),) + c.block for c in lp.combos)
  return out


def _split_gradients(plan: _blocks.Plan, grads: Sequence[jax.Array]):
  """Per leaf its block stacks (None for a diagonal leaf), and the flat list of arrays
  laid out like the moments."""
  blocks: list[list[jax.Array] | None] = []
  flat: list[jax.Array] = []
  for lp, g in zip(plan.leaves, grads):
    if lp.diagonal:
      blocks.append(None)
      flat.append(g)
    else:
      b = _blocks.leaf_blocks(g, lp)
      blocks.append(b)
      flat.extend(b)
  return blocks, flat


def _combo_slots(plan: _blocks.Plan):
  """Per moment array, ``(leaf plan, combo)`` (combo None for a diagonal leaf)."""
  out: list[tuple[_blocks.LeafPlan, _blocks.Combo | None]] = []
  for lp in plan.leaves:
    if lp.diagonal:
      out.append((lp, None))
    else:
      out.extend((lp, c) for c in lp.combos)
  return out


def accumulate_factors(plan: _blocks.Plan, blocks, factors: Sequence[jax.Array], beta
                       ) -> tuple[tuple[jax.Array, ...], jax.Array]:
  r"""Moves every factor towards its block's Gram matrix: :math:`H \leftarrow \beta H +
  (1 - \beta) G_{(i)} G_{(i)}^\top`.

  A factor whose contribution is not finite keeps its value.

  Args:
    plan: the plan.
    blocks: per leaf, its block stacks (None for a diagonal leaf).
    factors: one ``[n, s, s]`` stack per group.
    beta: the factors' decay.

  Returns:
    ``(factors, skipped)``: the new stacks and whether any factor was left unchanged.
  """
  contribs = _blocks.factor_stats_per_group(plan, blocks)
  out, skipped = [], jnp.asarray(False)
  for old, c in zip(factors, contribs):
    finite = _eigenbasis.finite_stacks(c)
    out.append(_eigenbasis.decay_if_finite(old, c, beta, finite))
    skipped = skipped | ~jnp.all(finite)
  return tuple(out), skipped


def precondition(plan: _blocks.Plan, flat_grads, bases, mu, nu, b1, b2, eps, k):
  """Rotates every block's gradient into its eigenbasis, takes Adam's step there and
  rotates the direction back; diagonal leaves take Adam's step as they are.

  Returns:
    ``(directions, mu, nu)``, laid out like the moments.
  """
  slots = _combo_slots(plan)
  rotated = [g if c is None else _eigenbasis.rotate(g, _blocks.combo_factors(bases, lp, c))
             for g, (lp, c) in zip(flat_grads, slots)]
  directions, mu, nu = adam_direction(rotated, mu, nu, b1, b2, eps, k)
  directions = [d if c is None
                else _eigenbasis.rotate(d, _blocks.combo_factors(bases, lp, c), back=True)
                for d, (lp, c) in zip(directions, slots)]
  return directions, mu, nu


def _first_bases(factors, bases, mu, nu):
  """The first refresh: an eigendecomposition of every factor (the moments are still 0)."""
  new, failures = _eigenbasis.first_bases(factors, bases)
  return new, tuple(mu), tuple(nu), failures


def _refreshed_bases(plan, factors, bases, mu, nu):
  """A later refresh: power iteration + QR for every factor; the second moment permuted
  like the basis' columns and the first moment carried over to the new basis."""
  new, orders, failures = [], [], jnp.zeros([], jnp.int32)
  for f, old in zip(factors, bases):
    q, order, ok = power_iteration_bases(f, old)
    new.append(q)
    orders.append(order)
    failures = failures + jnp.sum(~ok).astype(jnp.int32)
  mu_out, nu_out = [], []
  for m, v, (lp, c) in zip(mu, nu, _combo_slots(plan)):
    if c is None:
      mu_out.append(m)
      nu_out.append(v)
      continue
    old_q = _blocks.combo_factors(bases, lp, c)
    new_q = _blocks.combo_factors(new, lp, c)
    mu_out.append(_eigenbasis.rotate(_eigenbasis.rotate(m, old_q, back=True), new_q))
    nu_out.append(permute_axes(v, _blocks.combo_factors(orders, lp, c)))
  return tuple(new), tuple(mu_out), tuple(nu_out), failures


def refresh(plan, due, first, factors, bases, mu, nu):
  """The basis refresh inside `lax.switch`: eigh on the first call, power iteration + QR
  when ``due``, nothing otherwise (a skipped step does not pay for it).

  Returns:
    ``(bases, mu, nu, failures)``.
  """
  return _eigenbasis.switch_refresh(plan, due, first, _first_bases,
                                    lambda *a: _refreshed_bases(plan, *a), factors, bases,
                                    tuple(mu), tuple(nu))


# ----------------------------------------------------------------------------- transform


def scale_by_soap(
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_beta: float | None = None,
    eps: float = 1e-8,
    precondition_frequency: int = 10,
    max_precond_dim: int | None = None,
    block_size: int | None = None,
    *,
    merge_small_dims: bool = False,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    statistics_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  r"""SOAP's direction: Adam in the eigenbasis of Shampoo's factors, block by block.

  For every block G (a matrix, or a tensor with one factor per dimension):

  .. math::
    L \leftarrow \beta L + (1-\beta) G G^\top,\quad R \leftarrow \beta R + (1-\beta) G^\top G,
    \qquad G' = Q_L^\top G Q_R,

  .. math::
    m \leftarrow b_1 m + (1-b_1) G',\quad v \leftarrow b_2 v + (1-b_2) G'^{\odot 2},\quad
    u = \frac{\sqrt{1-b_2^k}}{1-b_1^k}\; Q_L \frac{m}{\sqrt{v}+\epsilon} Q_R^\top .

  The eigenbases Q_L, Q_R come from an eigendecomposition on the first call, which only
  collects statistics (its update is zero, so no step uses its own gradient in its
  rotation; k counts the calls after it; a NaN or Inf gradient still shows there as NaN
  in the update, as on every other step). Every ``precondition_frequency`` steps each
  basis moves by one step of power iteration and QR, :math:`Q \leftarrow
  \operatorname{qr}(H Q)`, its columns first sorted by the estimated eigenvalues
  :math:`\operatorname{diag}(Q^\top H Q)` and v's entries permuted to match; m is kept in
  the rotated coordinates and carried over to the new basis. This is the order of
  operations of the authors' implementation.

  Blocking, stacking and dimension numbers are Shampoo's plan: dimensions above
  ``block_size`` are split into blocks (each with its own factors), factors of one side
  are decomposed in one batched call, and a leaf with ``weight_dimension_numbers`` is read
  as independent ``[reduction, output]`` matrices (the layers of a scan-stacked parameter).
  A dimension above ``max_precond_dim`` is not rotated (one-sided SOAP: its basis is the
  identity, it is never blocked) while the leaf's other dimensions are; vectors and
  scalars (a stack of vectors declared with an empty ``reduction_axis`` included), and
  leaves with no dimension at or below ``max_precond_dim``, take Adam's step unrotated
  (with the same skipped first step). A basis that comes out non-finite is
  not installed (the previous one stays, ``refresh_failures`` counts it); a non-finite
  contribution to a factor is skipped (``stat_skips``).

  Args:
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    shampoo_beta: the factors' decay β, at most 1; None (or a negative number) uses ``b2``.
    eps: added to sqrt(v) in the rotated coordinates; >= 0. With 0, an entry whose second
      moment is exactly 0 gets a zero direction (never 0/0).
    precondition_frequency: steps between basis refreshes, >= 1 (an injected array is
      fine; a concrete value below 1 is rejected, also at init under
      `optax.inject_hyperparams`, and a traced one is read as 1).
    max_precond_dim: a (merged) dimension above it is not rotated along (the other
      dimensions of the leaf still are); None: 10000.
    block_size: the largest factor side, larger dimensions are blocked; None: no blocking
      below ``max_precond_dim``.
    merge_small_dims: drop size-1 dimensions and merge small adjacent ones (product up to
      ``block_size``) before blocking.
    weight_dimension_numbers: per leaf `optax.contrib.MuonDimensionNumbers` (a pytree, or
      a callable of the params), see `secondorder.dimension_numbers`; None reads every
      leaf as one tensor of its own shape.
    statistics_dtype: dtype of the factors, bases and moments (float32 whatever the
      params' dtype by default).

  Every state leaf is its own buffer, so a step can be jitted with the state donated.
  Updates whose tree structure (dict keys included) differs from the ``params`` given to
  `update` are a ValueError naming the first differing path (the state is laid out by
  shapes only, so without ``params`` a renamed tree of the same shapes cannot be told).

  Returns:
    An `optax.GradientTransformationExtraArgs`; its update needs no extra argument and
    returns updates in the gradients' dtypes.

  Example:
    >>> import optax, jax.numpy as jnp
    >>> tx = optax.chain(scale_by_soap(precondition_frequency=10),
    ...                  optax.scale_by_learning_rate(3e-3))
    >>> params = {"w": jnp.ones((4, 3))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)

  References:
    Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson & Kakade, "SOAP: Improving
    and Stabilizing Shampoo using Adam", ICLR 2025.
  """
  max_precond_dim, block_size = _eigenbasis.structural_sizes(
      max_precond_dim, block_size, "SOAP", "secondorder.transforms.soap")
  check_count("precondition_frequency", precondition_frequency, minimum=1)
  check_range("b1", b1, 0.0, 1.0, high_inclusive=False)
  check_range("b2", b2, 0.0, 1.0, high_inclusive=False)
  check_range("shampoo_beta", shampoo_beta, None, 1.0)
  check_range("eps", eps, 0.0, None)
  stat_dtype = jnp.dtype(statistics_dtype)
  merge = bool(merge_small_dims)

  def plan_for(tree):
    return _eigenbasis.one_sided_plan(tree, weight_dimension_numbers, block_size,
                                      max_precond_dim, merge)

  def init_fn(params):
    check_float_leaves("scale_by_soap", params, complex_ok=False)
    # Every field is its own buffer (no array shared between two fields), so that a step
    # can be jitted with the state donated.
    zero = lambda: jnp.zeros([], jnp.int32)
    if not jax.tree.leaves(params):
      # No parameters, or optax.tree.map_params' placeholder: the fields whose layout
      # depends on the shapes become one empty array, a prefix of any real layout.
      none = lambda: jnp.zeros((0,), stat_dtype)
      return ScaleBySoapState(count=zero(), factors=none(), bases=none(), mu=none(),
                              nu=none(), refresh_failures=zero(), stat_skips=zero())
    plan = plan_for(params)
    moments = lambda: tuple(jnp.zeros(s, stat_dtype) for s in _moment_shapes(plan))
    return ScaleBySoapState(
        count=zero(), factors=_eigenbasis.zero_factors(plan, stat_dtype),
        bases=_eigenbasis.identity_bases(plan, stat_dtype),
        mu=moments(), nu=moments(), refresh_failures=zero(), stat_skips=zero())

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    check_tree_structure("scale_by_soap", updates, params)
    check_state_shapes("scale_by_soap", init_fn, updates, state)
    leaves, treedef = jax.tree.flatten(updates)
    plan = plan_for(updates)
    grads = [g.astype(stat_dtype) for g in leaves]
    b1_, b2_, eps_ = (jnp.asarray(x, stat_dtype) for x in (b1, b2, eps))
    beta = _eigenbasis.factor_decay(shampoo_beta, b2_)
    # k: the Adam step (calls after the first).
    first, due, k = _eigenbasis.refresh_schedule(state.count, precondition_frequency)

    blocks, flat = _split_gradients(plan, grads)
    with jax.named_scope("statistics"):
      factors, skipped = accumulate_factors(plan, blocks, state.factors, beta)
    with jax.named_scope("precondition"):
      directions, mu, nu = precondition(plan, flat, state.bases, state.mu, state.nu,
                                        b1_, b2_, eps_, k)
    # The first call collects statistics only: moments untouched, a zero update (0·d: NaN
    # where a NaN or Inf gradient reached the direction, so that the fault is not hidden).
    mu = [jnp.where(first, old, new) for old, new in zip(state.mu, mu)]
    nu = [jnp.where(first, old, new) for old, new in zip(state.nu, nu)]
    directions = [jnp.where(first, 0 * d, d) for d in directions]
    with jax.named_scope("refresh"):
      bases, mu, nu, failures = refresh(plan, due, first, factors, state.bases, mu, nu)

    out, i = [], 0
    for lp, g in zip(plan.leaves, leaves):
      if lp.diagonal:
        out.append(directions[i].astype(g.dtype))
        i += 1
      else:
        parts = directions[i:i + len(lp.combos)]
        i += len(lp.combos)
        out.append(_blocks.leaf_from_blocks(parts, lp).astype(g.dtype))
    factors, bases, mu, nu = tuple(factors), tuple(bases), tuple(mu), tuple(nu)
    if not leaves:  # keep the placeholder layout of an empty tree
      factors, bases, mu, nu = state.factors, state.bases, state.mu, state.nu
    new_state = ScaleBySoapState(
        count=optax.safe_increment(state.count), factors=factors, bases=bases, mu=mu, nu=nu,
        refresh_failures=_eigenbasis.add_failures(state.refresh_failures, failures),
        stat_skips=_eigenbasis.count_skip(state.stat_skips, skipped))
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def soap(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_beta: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    max_precond_dim: int | None = None,
    block_size: int | None = None,
    *,
    merge_small_dims: bool = False,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    statistics_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  r"""SOAP with decoupled weight decay and a learning rate (a float or a schedule).

  .. math::
    \theta_{t+1} = \theta_t - \eta_t \left(u_t + \lambda \theta_t\right)

  with :math:`u_t` the direction of `scale_by_soap` (zero on the first step, which only
  collects statistics; the weight decay applies from the first step on).

  Args:
    learning_rate: a float >= 0 or an optax schedule.
    b1: as in `scale_by_soap`.
    b2: as in `scale_by_soap`.
    shampoo_beta: as in `scale_by_soap`.
    eps: as in `scale_by_soap`.
    precondition_frequency: as in `scale_by_soap`.
    max_precond_dim: as in `scale_by_soap`.
    block_size: as in `scale_by_soap`.
    merge_small_dims: as in `scale_by_soap`.
    weight_dimension_numbers: as in `scale_by_soap`.
    statistics_dtype: as in `scale_by_soap`.
    weight_decay: decoupled weight decay λ >= 0 (AdamW-style).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = soap(3e-3)
    >>> params = {"w": jnp.ones((4, 3))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)

  References:
    Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam", ICLR 2025.
  """
  check_range("learning_rate", learning_rate, 0.0, None)
  check_range("weight_decay", weight_decay, 0.0, None)
  return optax.chain(
      scale_by_soap(b1=b1, b2=b2, shampoo_beta=shampoo_beta, eps=eps,
                    precondition_frequency=precondition_frequency,
                    max_precond_dim=max_precond_dim, block_size=block_size,
                    merge_small_dims=merge_small_dims,
                    weight_dimension_numbers=weight_dimension_numbers,
                    statistics_dtype=statistics_dtype),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate))
