"""KL-Shampoo: Shampoo's Kronecker factors fitted jointly under a KL divergence, no grafting.

`scale_by_kl_shampoo` is the primitive; `kl_shampoo` chains it with decoupled weight decay
and the learning rate. Both sit on the block plan Shampoo and SOAP use
(`secondorder.transforms._blocks`): the same blocking, stacking of same-sized factors into
batched decompositions, dimension numbers for scan-stacked layers, and sharding of the
stacks. The update reads as named steps: `momentum`, `precondition`, `kl_statistics`
(through `accumulate_statistics`) and `refresh`; the eigenbases, their rotation and their
refresh are the steps SOAP shares (`secondorder.transforms._eigenbasis`).
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from secondorder._validation import (check_count, check_float_leaves, check_range,
                                     check_state_shapes)
from secondorder.dimension_numbers import WeightDimensionNumbers
from secondorder.transforms import _blocks
from secondorder.transforms import _eigenbasis

__all__ = ["ScaleByKlShampooState", "scale_by_kl_shampoo", "kl_shampoo", "STATIC_ARGS"]

# Arguments that fix the structure of the state. Left at their defaults (None) they stay
# static under `optax.inject_hyperparams`; set explicitly, name them in
# `optax.inject_hyperparams(kl_shampoo, static_args=STATIC_ARGS)`.
STATIC_ARGS = ("block_size", "max_precond_dim")

# The smallest cap on an inverse square root eigenvalue, whatever the factor's side.
_MIN_CAP = 10.0


class ScaleByKlShampooState(NamedTuple):
  """State of `scale_by_kl_shampoo`.

  Attributes:
    count: calls so far (int32). The first call only collects statistics.
    factors: the Kronecker factors L, R, ... of every block, one stack ``[n, s, s]`` per
      factor side s (the plan's groups, sorted by side), in ``statistics_dtype``.
    bases: the factors' eigenbases in use, stacked like ``factors``.
    eigenvalues: the running estimates of the factors' eigenvalues in those bases, one
      ``[n, s]`` per group; they start at ``init_factor``, or at 0 (not set yet) when it
      is None.
    mu: the momentum of the gradient, a tree like the params (in the original
      coordinates, so a basis refresh leaves it as it is).
    nu: Adam's second moment of each leaf without factors (vectors, scalars), in leaf order.
    refresh_failures: eigenbases that came out non-finite and were not installed (the
      previous basis stayed in use).
    stat_skips: steps on which some factor kept its previous value because the gradient's
      contribution was not finite.
  """

  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
  factors: tuple[jax.Array, ...]
  bases: tuple[jax.Array, ...]
  eigenvalues: tuple[jax.Array, ...]
  mu: Any
  nu: tuple[jax.Array, ...]
  refresh_failures: jax.Array
  stat_skips: jax.Array


# ----------------------------------------------------------------------------- block math


def scale_axes(blocks: jax.Array, scales: Sequence[jax.Array | None]) -> jax.Array:
  """Multiplies every block axis i of ``blocks [n, *block]`` by ``scales[i] [n, s_i]``
  (None: that axis is left as it is)."""
  for i, s in enumerate(scales):
    if s is None:
      continue
    shape = [s.shape[0]] + [1] * (blocks.ndim - 1)
    shape[1 + i] = s.shape[1]
    blocks = blocks * s.reshape(shape)
  return blocks


def inverse_sqrt(eigenvalues: jax.Array, cap) -> jax.Array:
  r"""The inverse square roots :math:`r = d^{-1/2}` of eigenvalue estimates ``[n, s]``, 0
  where d is not positive, each at most :math:`\max(10, \min(s, \text{cap}))` (no cap when
  ``cap`` is None)."""
  r = jnp.where(eigenvalues > 0,
                jax.lax.rsqrt(jnp.where(eigenvalues > 0, eigenvalues, 1.0)), 0.0)
  if cap is None:
    return r
  side = eigenvalues.shape[-1]
  bound = jnp.maximum(_MIN_CAP, jnp.minimum(side, jnp.asarray(cap, r.dtype)))
  return jnp.minimum(r, bound.astype(r.dtype))


def kl_statistics(blocks: jax.Array, bases: Sequence[jax.Array | None],
                  scales: Sequence[jax.Array | None]):
  r"""Every factor's KL contribution and its diagonal in the factor's basis.

  For factor i of a block G with N entries and side :math:`s_i`, the other factors enter
  through their inverses :math:`\hat H_j^{-1} = Q_j \operatorname{diag}(r_j^2) Q_j^\top`:

  .. math::
    C_i = \frac{s_i}{N}\, G_{(i)} \Big(\bigotimes_{j \ne i} \hat H_j^{-1}\Big) G_{(i)}^\top,
    \qquad c_i = \operatorname{diag}(Q_i^\top C_i Q_i),

  (:math:`C_L = G \hat R^{-1} G^\top / n`, :math:`C_R = G^\top \hat L^{-1} G / m` for
  a matrix G [m, n]) computed from G rotated into the other bases and scaled by their r.

  Args:
    blocks: ``[n, *block]``.
    bases: per block axis, ``[n, s, s]``, or None for an axis without a factor.
    scales: per block axis, the inverse square roots r ``[n, s]`` (None with the basis).

  Returns:
    ``(grams, diagonals)``: per axis ``[n, s, s]`` and ``[n, s]`` (None without a factor).
  """
  size = blocks[0].size
  squared = None  # the squares of G rotated along every axis, taken once
  grams: list[jax.Array | None] = []
  diagonals: list[jax.Array | None] = []
  for i, q in enumerate(bases):
    if q is None:
      grams.append(None)
      continue
    others = [None if j == i else b for j, b in enumerate(bases)]
    others_r = [None if j == i else r for j, r in enumerate(scales)]
    rotated_others = _eigenbasis.rotate(blocks, others)
    if squared is None:
      own = [q if j == i else None for j in range(len(bases))]
      squared = jnp.square(_eigenbasis.rotate(rotated_others, own))
    grams.append(q.shape[-1] / size
                 * _blocks.factor_stats(scale_axes(rotated_others, others_r), i))
  for i, q in enumerate(bases):
    if q is None:
      diagonals.append(None)
      continue
    assert squared is not None  # set by the first loop, at this axis at the latest
    others_r2 = [None if j == i or r is None else jnp.square(r) for j, r in enumerate(scales)]
    axes = tuple(a for a in range(1, blocks.ndim) if a != i + 1)
    diagonals.append(q.shape[-1] / size * jnp.sum(scale_axes(squared, others_r2), axis=axes))
  return grams, diagonals


def precondition_blocks(blocks: jax.Array, bases: Sequence[jax.Array | None],
                        scales: Sequence[jax.Array | None], eps) -> jax.Array:
  r"""KL-Shampoo's direction of a stack of blocks:
  :math:`\hat L^{-1/2} M \hat R^{-1/2}` with the damping ε on the product of the roots,

  .. math::
    U = Q_L \Big[ (Q_L^\top M Q_R) \oslash \big(\sqrt{d_L d_R^\top} + \epsilon\big) \Big]
        Q_R^\top,

  written as :math:`P / (1 + \epsilon P)` with :math:`P = r_L r_R^\top` (zero where an r
  is zero; at most 1/ε).
  """
  rotated = _eigenbasis.rotate(blocks, bases)
  product = scale_axes(jnp.ones_like(rotated), scales)  # r_L r_R^T (1 without a factor)
  return _eigenbasis.rotate(rotated * (product / (1 + eps * product)), bases, back=True)


# ----------------------------------------------------------------------------- plan steps


def _group_scales(eigenvalues: Sequence[jax.Array], cap) -> tuple[jax.Array, ...]:
  """Every group's inverse square roots r, from its eigenvalue estimates."""
  return tuple(inverse_sqrt(d, cap) for d in eigenvalues)


def isotropic_fit(diagonals: Sequence[jax.Array | None]) -> list[jax.Array | None]:
  r"""The KL-optimal multiple of the identity for a block's statistics, split evenly
  between its k factors: :math:`(\operatorname{tr} C_i / s_i)^{1/k}` per factor, ``[n]``.

  With the other factors at the identity every contribution has the same mean eigenvalue
  :math:`\sigma^2 = \lVert G \rVert^2 / N` (the mean square entry of the block), and
  :math:`\sigma^2 I_N` is the closest isotropic Gaussian to the gradient's under KL; each
  factor takes :math:`\sigma^{2/k}`, so that their Kronecker product is :math:`\sigma^2
  I_N`."""
  k = sum(c is not None for c in diagonals)
  return [None if c is None else jnp.mean(c, axis=1) ** (1.0 / k) for c in diagonals]


def accumulate_statistics(plan: _blocks.Plan, blocks, factors, eigenvalues, bases, scales,
                          beta, first, from_statistics: bool):
  r"""Moves every factor and its eigenvalue estimates towards the gradient's KL
  contribution (`kl_statistics`):

  .. math::
    H_i \leftarrow \beta H_i + (1 - \beta) C_i,\qquad
    d_i \leftarrow \beta d_i + (1 - \beta) c_i .

  On the first call (no basis yet) the other factors' inverses are the identity and the
  eigenvalue estimates stay at their initial value. With ``from_statistics``, estimates
  that are not set yet (all zero: the initial value) are set instead to `isotropic_fit` of
  this call's contributions, computed with the other factors' inverses at the identity (a
  zero gradient leaves them unset, for a later call). A factor whose contribution is not
  finite keeps its value and its estimates.

  Returns:
    ``(factors, eigenvalues, skipped)``: the new stacks and whether any factor was left
    unchanged.
  """
  # Per factor: its estimates are still to be set (from_statistics only), [n].
  unset = tuple(jnp.all(d <= 0, axis=1) if from_statistics else jnp.zeros(d.shape[:1], bool)
                for d in eigenvalues)
  grams: list[list[Any]] = [[] for _ in plan.groups]
  diags: list[list[Any]] = [[] for _ in plan.groups]
  fits: list[list[Any]] = [[] for _ in plan.groups]
  for lp, leaf in zip(plan.leaves, blocks):
    if lp.diagonal:
      continue
    for combo, b in zip(lp.combos, leaf):
      q = _blocks.combo_factors(bases, lp, combo)
      r = [None if x is None or u is None else jnp.where(first | u[:, None], jnp.ones_like(x), x)
           for x, u in zip(_blocks.combo_factors(scales, lp, combo),
                           _blocks.combo_factors(unset, lp, combo))]
      g, c = kl_statistics(b, q, r)
      for slot, gi, ci, fi in zip(combo.slots, g, c, isotropic_fit(c)):
        if slot is not None:
          grams[slot[0]].append(gi)
          diags[slot[0]].append(ci)
          fits[slot[0]].append(fi)
  join = lambda parts: parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
  new_factors, new_values, skipped = [], [], jnp.asarray(False)
  for old_h, old_d, g, c, fit, u in zip(factors, eigenvalues, grams, diags, fits, unset):
    g, c, fit = join(g), join(c), join(fit)
    finite = _eigenbasis.finite_stacks(g) & jnp.all(jnp.isfinite(c), axis=1)
    new_factors.append(_eigenbasis.decay_if_finite(old_h, g, beta, finite))
    moved = finite & ~first & ~u
    d = jnp.where(moved[:, None], beta * old_d + (1 - beta) * c, old_d)
    new_values.append(jnp.where((finite & u)[:, None], fit[:, None], d))
    skipped = skipped | ~jnp.all(finite)
  return tuple(new_factors), tuple(new_values), skipped


def momentum(grads: Sequence[jax.Array], mu: Sequence[jax.Array], b1):
  r""":math:`m \leftarrow b_1 m + (1 - b_1) g` on every leaf."""
  return optax.tree.update_moment(list(grads), list(mu), b1, 1)


def precondition(plan: _blocks.Plan, mu, nu, grads, bases, scales, b1, b2, eps, first, k):
  r"""Every leaf's direction: KL-Shampoo's :math:`\hat L^{-1/2} m \hat R^{-1/2}` block by
  block (no bias correction, as the authors' implementation); a leaf without factors takes
  Adam's bias-corrected step :math:`\hat m / (\sqrt{\hat v} + \epsilon)`.

  On the first call, which only collects statistics, the update is zero (0·d, NaN where
  a NaN or Inf gradient reached the direction, so that the fault is not hidden) and the
  second moments keep their value.

  Returns:
    ``(directions, nu)``: per leaf, and the diagonal leaves' second moments.
  """
  directions, new_nu, i = [], [], 0
  kf = k.astype(b1.dtype)
  for lp, m, g in zip(plan.leaves, mu, grads):
    if lp.diagonal:
      v = optax.tree.update_moment_per_elem_norm(g, nu[i], b2, 2)
      new_nu.append(jnp.where(first, nu[i], v))
      i += 1
      m_hat = m / (1 - b1 ** kf)
      denominator = jnp.sqrt(v / (1 - b2 ** kf)) + eps
      directions.append(_eigenbasis.safe_divide(m_hat, denominator))
      continue
    parts = [precondition_blocks(b, _blocks.combo_factors(bases, lp, c),
                                 _blocks.combo_factors(scales, lp, c), eps)
             for c, b in zip(lp.combos, _blocks.leaf_blocks(m, lp))]
    directions.append(_blocks.leaf_from_blocks(parts, lp))
  directions = [jnp.where(first, 0 * d, d) for d in directions]
  return directions, tuple(new_nu)


def _power_iteration_bases(factors, bases):
  r"""A later refresh: one step of power iteration, :math:`Q \leftarrow
  \operatorname{qr}(H Q)`, columns kept in their order (so each eigenvalue estimate stays
  with its column)."""
  candidates = [_eigenbasis.power_step(f, q) for f, q in zip(factors, bases)]
  return _eigenbasis.install_bases(candidates, bases,
                                   [_eigenbasis.finite_stacks(q) for q in candidates])


def refresh(plan: _blocks.Plan, due, first, factors, bases):
  """The basis refresh inside `lax.switch`: eigh on the first call, power iteration + QR
  when ``due``, nothing otherwise (a step without a refresh does not pay for it).

  Returns:
    ``(bases, failures)``.
  """
  return _eigenbasis.switch_refresh(plan, due, first, _eigenbasis.first_bases,
                                    _power_iteration_bases, factors, bases)


# ----------------------------------------------------------------------------- transform


def _check_number(name: str, value: Any, optional: bool = False) -> None:
  """Raises a TypeError unless ``value`` is a real number or an array (an injected
  hyperparameter), or None where ``optional``."""
  if value is None and optional:
    return
  if isinstance(value, bool) or not (isinstance(value, numbers.Real) or hasattr(value, "shape")):
    raise TypeError(f"{name} must be a real number{' or None' if optional else ''}, got "
                    f"{value!r} of type {type(value).__name__}.")


def scale_by_kl_shampoo(
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_beta: float | None = None,
    eps: float = 1e-8,
    precondition_frequency: int = 10,
    max_precond_dim: int | None = None,
    block_size: int | None = None,
    *,
    init_factor: float | None = None,
    inverse_sqrt_cap: float | None = 4000.0,
    merge_small_dims: bool = False,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    statistics_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  r"""KL-Shampoo's direction: Shampoo's factors fitted jointly under a KL divergence.

  For every block G ``[m, n]`` (a tensor has one factor per dimension, each fitted with
  the inverses of all the others), with the eigenbases :math:`Q_L, Q_R` of the factors
  and running estimates :math:`d_L, d_R` of their eigenvalues in those bases
  (:math:`\hat L = Q_L \operatorname{diag}(d_L) Q_L^\top`, likewise :math:`\hat R`):

  .. math::
    M \leftarrow b_1 M + (1-b_1) G,\qquad
    U = Q_L \Big[(Q_L^\top M Q_R) \oslash \big(\sqrt{d_L d_R^\top} + \epsilon\big)\Big]
    Q_R^\top \;\approx\; \hat L^{-1/2} M \hat R^{-1/2},

  .. math::
    L \leftarrow \beta L + \tfrac{1-\beta}{n}\, G \hat R^{-1} G^\top,\quad
    R \leftarrow \beta R + \tfrac{1-\beta}{m}\, G^\top \hat L^{-1} G,\quad
    d_L \leftarrow \beta d_L + (1-\beta) \operatorname{diag}\big(Q_L^\top
      \tfrac{1}{n} G \hat R^{-1} G^\top Q_L\big)

  (and :math:`d_R` likewise): the two-sided fit of a matrix-normal covariance, where
  Shampoo fits each factor alone. The direction uses the state before this step's
  statistics. The first call only collects statistics (the plain Gram matrices, scaled
  the same way), takes the eigenbases by an eigendecomposition and sets the eigenvalue
  estimates of a block with k factors to :math:`(\lVert G \rVert^2 / N)^{1/k}`, the
  closest isotropic fit under KL to its gradient split evenly between its factors (the
  authors' implementation sets them to a constant, ``init_factor=0.1``); its update is
  zero. A block whose first gradient is zero keeps zero estimates and a zero direction
  until a call with a non-zero gradient sets them the same way. Every ``precondition_frequency`` calls
  each basis moves by one step of power iteration, :math:`Q \leftarrow
  \operatorname{qr}(H Q)`, its columns (and their estimates d) kept in order. Every
  :math:`d^{-1/2}` is capped at :math:`\max(10, \min(s, \text{inverse\_sqrt\_cap}))`
  for a factor of side s, and the damping ε bounds every entry of the scaling by 1/ε.
  This is the order of operations of the authors' implementation, which needs no Adam
  grafting.

  Blocking, stacking and dimension numbers are SOAP's plan: dimensions above
  ``block_size`` are split into blocks (each with its own factors), factors of one side
  are decomposed in one batched call, and a leaf with ``weight_dimension_numbers`` is read
  as independent ``[reduction, output]`` matrices (the layers of a scan-stacked parameter).
  A dimension above ``max_precond_dim`` has no factor (the identity, r = 1: the other
  factors are fitted against it) while the leaf's other dimensions keep theirs; vectors and
  scalars (a stack of vectors declared with an empty ``reduction_axis`` included), and
  leaves with no dimension at or below ``max_precond_dim``, take Adam's bias-corrected step
  with ``b1``, ``b2`` and ``eps`` (also skipping the first call). A basis that comes out
  non-finite is not installed (``refresh_failures``); a non-finite contribution to a
  factor is skipped (``stat_skips``).

  Args:
    b1: the momentum's decay.
    b2: Adam's second-moment decay on the leaves without factors.
    shampoo_beta: the factors' decay β; None (or a negative number) uses ``b2``.
    eps: the damping ε of the scaling (and Adam's ε on the leaves without factors), >= 0.
      With 0, an entry of such a leaf whose second moment is exactly 0 gets a zero
      direction (never 0/0).
    precondition_frequency: calls between basis refreshes, >= 1 (an injected array is
      fine; a concrete value below 1 is rejected, also at init under
      `optax.inject_hyperparams`, and a traced value below 1 is read as 1).
    max_precond_dim: a (merged) dimension above it gets no factor (the other dimensions of
      the leaf still do); None: 10000.
    block_size: the largest factor side, larger dimensions are blocked; None: no blocking
      below ``max_precond_dim``.
    init_factor: the eigenvalue estimates after the first call (> 0), as the authors'
      implementation (0.1 there); None: set from the first call's statistics (see above).
    inverse_sqrt_cap: see above; None: no cap.
    merge_small_dims: drop size-1 dimensions and merge small adjacent ones (product up to
      ``block_size``) before blocking.
    weight_dimension_numbers: per leaf `optax.contrib.MuonDimensionNumbers` (a pytree, or
      a callable of the params), see `secondorder.dimension_numbers`; None reads every
      leaf as one tensor of its own shape.
    statistics_dtype: dtype of the factors, bases, estimates and moments (float32 whatever
      the params' dtype by default).

  Returns:
    An `optax.GradientTransformationExtraArgs`; its update needs no extra argument and
    returns updates in the gradients' dtypes.

  Example:
    >>> import optax, jax.numpy as jnp
    >>> tx = optax.chain(scale_by_kl_shampoo(precondition_frequency=10),
    ...                  optax.scale_by_learning_rate(3e-3))
    >>> params = {"w": jnp.ones((4, 3))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)

  References:
    Lin, Lowe, Dangel, Eschenhagen, Xu & Grosse, "Understanding and Improving Shampoo and
    SOAP via Kullback-Leibler Minimization", ICLR 2026 (arXiv 2509.03378).
  """
  max_precond_dim, block_size = _eigenbasis.structural_sizes(
      max_precond_dim, block_size, "KL-Shampoo", "secondorder.transforms.kl_shampoo")
  check_count("precondition_frequency", precondition_frequency, minimum=1)
  for name, value in (("b1", b1), ("b2", b2), ("eps", eps)):
    _check_number(name, value)
  _check_number("init_factor", init_factor, optional=True)
  _check_number("shampoo_beta", shampoo_beta, optional=True)
  _check_number("inverse_sqrt_cap", inverse_sqrt_cap, optional=True)
  check_range("b1", b1, 0.0, 1.0, high_inclusive=False)
  check_range("b2", b2, 0.0, 1.0, high_inclusive=False)
  check_range("shampoo_beta", shampoo_beta, None, 1.0, high_inclusive=False)
  check_range("eps", eps, 0.0, None)
  check_range("init_factor", init_factor, 0.0, None, low_inclusive=False)
  check_range("inverse_sqrt_cap", inverse_sqrt_cap, 0.0, None, low_inclusive=False)
  stat_dtype = jnp.dtype(statistics_dtype)
  merge = bool(merge_small_dims)
  from_statistics = init_factor is None

  def plan_for(tree):
    return _eigenbasis.one_sided_plan(tree, weight_dimension_numbers, block_size,
                                      max_precond_dim, merge)

  def init_fn(params):
    check_float_leaves("scale_by_kl_shampoo", params, complex_ok=False)
    zero = jnp.zeros([], jnp.int32)
    mu = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), stat_dtype), params)
    if not jax.tree.leaves(params):
      # No parameters, or optax.tree.map_params' placeholder: the fields whose layout
      # depends on the shapes become one empty array, a prefix of any real layout.
      none = lambda: jnp.zeros((0,), stat_dtype)
      return ScaleByKlShampooState(count=zero, factors=none(), bases=none(),
                                   eigenvalues=none(), mu=mu, nu=none(),
                                   refresh_failures=jnp.zeros([], jnp.int32),
                                   stat_skips=jnp.zeros([], jnp.int32))
    plan = plan_for(params)
    sizes = list(zip(plan.groups, plan.group_sizes))
    # Every leaf its own buffer (a donated state must not alias): no array is reused.
    return ScaleByKlShampooState(
        count=zero, factors=_eigenbasis.zero_factors(plan, stat_dtype),
        bases=_eigenbasis.identity_bases(plan, stat_dtype),
        eigenvalues=tuple(jnp.full((n, s), 0.0 if from_statistics else init_factor,
                                   stat_dtype) for (s, _), n in sizes),
        mu=mu,
        nu=tuple(jnp.zeros(lp.shape, stat_dtype) for lp in plan.leaves if lp.diagonal),
        refresh_failures=jnp.zeros([], jnp.int32), stat_skips=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    check_state_shapes("scale_by_kl_shampoo", init_fn, updates, state)
    leaves, treedef = jax.tree.flatten(updates)
    if not leaves:
      return updates, state._replace(count=optax.safe_increment(state.count))
    plan = plan_for(updates)
    grads = [g.astype(stat_dtype) for g in leaves]
    b1_, b2_, eps_ = (jnp.asarray(x, stat_dtype) for x in (b1, b2, eps))
    beta = _eigenbasis.factor_decay(shampoo_beta, b2_)
    # k: Adam's step on the leaves without factors.
    first, due, k = _eigenbasis.refresh_schedule(state.count, precondition_frequency)
    scales = _group_scales(state.eigenvalues, inverse_sqrt_cap)

    blocks = [None if lp.diagonal else _blocks.leaf_blocks(g, lp)
              for lp, g in zip(plan.leaves, grads)]
    old_mu = treedef.flatten_up_to(state.mu)
    mu = momentum(grads, old_mu, b1_)
    with jax.named_scope("precondition"):
      directions, nu = precondition(plan, mu, state.nu, grads, state.bases, scales, b1_,
                                    b2_, eps_, first, k)
    with jax.named_scope("statistics"):
      factors, eigenvalues, skipped = accumulate_statistics(
          plan, blocks, state.factors, state.eigenvalues, state.bases, scales, beta, first,
          from_statistics)
    with jax.named_scope("refresh"):
      bases, failures = refresh(plan, due, first, factors, state.bases)

    out = [d.astype(g.dtype) for d, g in zip(directions, leaves)]
    # The first call collects statistics only: the momentum keeps its value.
    mu = [jnp.where(first, old, m) for old, m in zip(old_mu, mu)]
    new_state = ScaleByKlShampooState(
        count=optax.safe_increment(state.count), factors=factors, bases=bases,
        eigenvalues=eigenvalues, mu=jax.tree.unflatten(treedef, mu), nu=nu,
        refresh_failures=_eigenbasis.add_failures(state.refresh_failures, failures),
        stat_skips=_eigenbasis.count_skip(state.stat_skips, skipped))
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def kl_shampoo(
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
    init_factor: float | None = None,
    inverse_sqrt_cap: float | None = 4000.0,
    merge_small_dims: bool = False,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    statistics_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  r"""KL-Shampoo with decoupled weight decay and a learning rate (a float or a schedule).

  .. math::
    \theta_{t+1} = \theta_t - \eta_t \left(u_t + \lambda \theta_t\right)

  with :math:`u_t` the direction of `scale_by_kl_shampoo` (zero on the first step, which
  only collects statistics; the weight decay applies from the first step on). No Adam
  grafting: the KL fit sets the scale of the factors.

  Args:
    learning_rate: a float >= 0 or an optax schedule.
    b1: as in `scale_by_kl_shampoo`.
    b2: as in `scale_by_kl_shampoo`.
    shampoo_beta: as in `scale_by_kl_shampoo`.
    eps: as in `scale_by_kl_shampoo`.
    weight_decay: decoupled weight decay λ (AdamW-style).
    precondition_frequency: as in `scale_by_kl_shampoo`.
    max_precond_dim: as in `scale_by_kl_shampoo`.
    block_size: as in `scale_by_kl_shampoo`.
    init_factor: as in `scale_by_kl_shampoo`.
    inverse_sqrt_cap: as in `scale_by_kl_shampoo`.
    merge_small_dims: as in `scale_by_kl_shampoo`.
    weight_dimension_numbers: as in `scale_by_kl_shampoo`.
    statistics_dtype: as in `scale_by_kl_shampoo`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = kl_shampoo(3e-3)
    >>> params = {"w": jnp.ones((4, 3))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)

  References:
    Lin et al., "Understanding and Improving Shampoo and SOAP via Kullback-Leibler
    Minimization", ICLR 2026 (arXiv 2509.03378).
  """
  check_range("learning_rate", learning_rate, 0.0, None)
  check_range("weight_decay", weight_decay, 0.0, None)
  return optax.chain(
      scale_by_kl_shampoo(b1=b1, b2=b2, shampoo_beta=shampoo_beta, eps=eps,
                          precondition_frequency=precondition_frequency,
                          max_precond_dim=max_precond_dim, block_size=block_size,
                          init_factor=init_factor, inverse_sqrt_cap=inverse_sqrt_cap,
                          merge_small_dims=merge_small_dims,
                          weight_dimension_numbers=weight_dimension_numbers,
                          statistics_dtype=statistics_dtype),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate))
