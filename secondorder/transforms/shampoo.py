"""Shampoo: Kronecker-factored preconditioning for tensors of any rank, blocked and grafted.

`shampoo_preconditioner` is the primitive (a `GradientTransformationExtraArgs` that needs no
extra argument); `shampoo` chains it with momentum, weight decay and the learning rate.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from secondorder._validation import (check_choice, check_float_leaves, check_int, check_range,
                                     check_state_shapes)
from secondorder.transforms import _blocks

__all__ = ["ShampooState", "shampoo_preconditioner", "shampoo", "GRAFTS", "STATIC_ARGS"]

GRAFTS = ("adam", "rmsprop", "rmsprop_normalized", "adagrad", "sgd", "none")

# Arguments that fix the structure of the state; name them in
# `optax.inject_hyperparams(shampoo_preconditioner, static_args=STATIC_ARGS)`.
STATIC_ARGS = ("block_size", "max_preconditioner_dim", "exponent_override", "newton_max_iters",
               "root_bucket_ratio")


class ShampooState(NamedTuple):
  """State of `shampoo_preconditioner`.

  Attributes:
    count: steps taken (int32).
    stats: Kronecker statistics, one stack `[n, s, s]` per group of factors that share a
      size s and a root p (groups sorted by (s, p)); float32 by default.
    preconds: the inverse p-th roots in use, stacked like `stats`.
    diag_stats: second moments of the diagonal-path parameters (one per such leaf, in leaf
      order) when there is no grafting; empty otherwise (the grafted method is the diagonal
      path).
    graft_state: state of the grafted diagonal method (`optax.EmptyState()` without one).
    root_failures: number of inverse roots that failed (non-finite, or residual above
      `root_tolerance`) and were not installed; the previous root stayed in use.
    stat_skips: number of steps on which some statistic was left unchanged because its
      update was not finite.
  """

  count: jax.Array
  stats: tuple[jax.Array, ...]
  preconds: tuple[jax.Array, ...]
  diag_stats: tuple[jax.Array, ...]
  graft_state: optax.OptState
  root_failures: jax.Array
  stat_skips: jax.Array


# ----------------------------------------------------------------------------- grafting


def _normalize_per_leaf() -> optax.GradientTransformation:
  def fn(updates, params=None):
    del params
    def one(u):
      n = jnp.sqrt(jnp.sum(jnp.square(u)))
      return jnp.where(n > 0, u / jnp.where(n > 0, n, 1.0), u)
    return jax.tree.map(one, updates)
  return optax.stateless(fn)


def _graft_transform(graft, b1, b2, eps) -> optax.GradientTransformation | None:
  if graft is None or graft == "none":
    return None
  if isinstance(graft, optax.GradientTransformation):
    return graft
  if graft == "adam":
    if isinstance(b1, (int, float)) and b1 == 0:
      # Adam without momentum is bias-corrected RMSProp: same numbers, one buffer fewer.
      return optax.scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True)
    return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  if graft == "rmsprop":
    return optax.scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False)
  if graft == "rmsprop_normalized":
    return optax.chain(_normalize_per_leaf(),
                       optax.scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False))
  if graft == "adagrad":
    return optax.scale_by_rss(initial_accumulator_value=0.0, eps=eps)
  if graft == "sgd":
    return optax.identity()
  raise AssertionError(graft)


# ----------------------------------------------------------------------------- transform


def _static_int(name: str, value: Any, cast=int) -> int:
  """A structural number; a concrete array is accepted, a traced one explained."""
  if hasattr(value, "shape"):
    try:
      value = cast(value)
    except jax.errors.ConcretizationTypeError:
      raise ValueError(
          f"{name} fixes the shape of the Shampoo state and cannot be an injected "
          "hyperparameter: use optax.inject_hyperparams(shampoo_preconditioner, "
          "static_args=secondorder.transforms.shampoo.STATIC_ARGS).") from None
  if cast is int:
    check_int(name, value, minimum=1)
  return value


def shampoo_preconditioner(
    block_size: int = 128,
    update_interval: int = 10,
    beta2: float = 0.999,
    eps: float = 1e-6,
    *,
    statistics_interval: int = 1,
    exponent_override: float | None = None,
    start_preconditioning_step: int = 1,
    graft: str | optax.GradientTransformation | None = "adam",
    graft_b1: float = 0.0,
    graft_b2: float = 0.999,
    graft_eps: float = 1e-8,
    method: str = "eigh",
    root_tolerance: float = 0.1,
    newton_max_iters: int = 100,
    merge_small_dims: bool = True,
    precondition_1d: bool = False,
    max_preconditioner_dim: int = 4096,
    root_bucket_ratio: float | None = None,
    statistics_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  r"""Shampoo: precondition each tensor with one Kronecker factor per dimension.

  For a parameter of order k with gradient G, every dimension i keeps a statistic
  H_i (the mode-i unfolding G_(i) of G gives G_(i) G_(i)^T), and the update contracts G
  with a root of every H_i:

  .. math::
    H_i \leftarrow \beta_2 H_i + (1 - \beta_2) G_{(i)} G_{(i)}^\top
      \quad(\text{or } H_i + G_{(i)} G_{(i)}^\top \text{ when } \beta_2 = 1),\qquad
    U = G \times_1 \tilde H_1^{-1/p} \times_2 \cdots \times_k \tilde H_k^{-1/p},

  with p = 2k (a matrix: L^{-1/4} G R^{-1/4}) unless `exponent_override` sets it, and
  \tilde H = \hat H + \epsilon \lambda_{max}(\hat H) I the bias-corrected statistic damped
  relative to its own scale. The statistics can be updated every `statistics_interval`
  steps instead of every step. The roots are recomputed every `update_interval` steps inside
  `lax.cond` (eigendecomposition or coupled Newton iteration, `secondorder.linalg`);
  a root that fails (not finite, or residual above `root_tolerance`) is not installed: the
  previous one stays and `root_failures` counts it. A non-finite statistic update is
  skipped and counted in `stat_skips`.

  Practical Shampoo (Anil et al.): size-1 dimensions are dropped and small adjacent ones
  merged (product <= block_size); a dimension above `block_size` is split into blocks of
  `block_size` (the last one smaller), each block with its own factors, so no factor is
  larger than block_size²; parameters with a dimension above `max_preconditioner_dim`, and
  1-D and 0-D parameters (unless `precondition_1d`), take the diagonal path; a small matrix
  merged into one dimension gets one full-matrix factor (p = 2). Blocks of one shape
  are stacked, so each group of same-sized factors is one batched root computation; with
  `root_bucket_ratio`, groups of nearby sizes share one.

  Grafting: each block's update takes the norm of the grafted diagonal method's update on
  that block, u = ‖u_graft‖ · u_shampoo / ‖u_shampoo‖; diagonal-path parameters get the
  grafted update itself (or, without grafting, diagonal AdaGrad/RMSProp from their own
  statistics). Before `start_preconditioning_step` only the grafted method runs.
  Momentum / Nesterov belong after this transform in the chain (see `shampoo`).

  Args:
    block_size: largest factor side; larger dimensions are blocked.
    update_interval: steps between root recomputations (T).
    statistics_interval: steps between updates of the Kronecker statistics, a divisor of
      T (Distributed Shampoo's `statistics_compute_steps`). They are updated on the steps
      congruent to `start_preconditioning_step` modulo this interval, which include every
      root step; the other steps only precondition, skipping the `G G^T` products inside
      `lax.cond`. `beta2` applies per statistics update (a horizon of
      statistics_interval / (1 - beta2) steps) and the bias correction counts updates.
      The diagonal path and the graft still see every gradient. (The divisibility is
      checked when both intervals are Python ints; with an injected interval that does
      not divide T, a root uses the statistics of the last statistics step.)
    beta2: statistics EMA decay; 1.0 sums them (original Shampoo).
    eps: damping relative to each statistic's largest eigenvalue.
    exponent_override: p for all factors (roots -1/p) instead of 2·order.
    start_preconditioning_step: first step (1-based) that uses Shampoo; the roots are first
      computed at this step.
    graft: "adam", "rmsprop", "rmsprop_normalized" (per-leaf normalised gradients into
      RMSProp), "adagrad", "sgd" (the gradient's norm), "none"/None, or any optax
      `GradientTransformation`. Built from optax's `scale_by_adam`, `scale_by_rms`,
      `scale_by_rss`, `identity`.
    graft_b1: the Adam graft's first-moment decay (0: momentum is left to the chain).
    graft_b2: second-moment decay of the Adam/RMSProp grafts.
    graft_eps: epsilon of the grafted method.
    method: "eigh" or "newton" (integer p only).
    root_tolerance: a Newton root whose residual max|H^p A - I| exceeds it is rejected.
    newton_max_iters: Newton iterations at most.
    merge_small_dims: merge small adjacent dimensions (and drop size-1 ones).
    precondition_1d: give 1-D (and scalar) parameters a full factor instead of the
      diagonal path.
    max_preconditioner_dim: parameters with a larger (merged) dimension go diagonal.
    root_bucket_ratio: r > 1 to let factors of nearby sizes share one batched root
      computation, which makes the compiled program smaller: with the largest factor side
      S, each factor is padded (block-diagonally, so its root is unchanged) to the smallest
      of S, S/r, S/r², ... (rounded up) that holds it, and with "eigh" factors of
      different roots p share a call too. The state keeps every factor at its own size.
      Padded roots cost more per refresh: on the benchmarks' CPU, r = 4 compiled the digits
      CNN's step 12-15% faster (seven root calls became two) and the MLP's and the
      transformer's 4-12% faster, while the MLP's steps ran 15-22% slower (its 64-sided
      factors padded to 128) and the others' within noise (0.93-1.04x). So it pays for
      short runs and notebooks rather than long training. None (default): one call per size
      and root, the layout to use when the factor stacks are sharded (a shared call
      concatenates them).
    statistics_dtype: dtype of statistics and roots (float32 whatever the params' dtype).

  Returns:
    An `optax.GradientTransformationExtraArgs`; its update needs no extra argument and
    returns updates in the gradients' dtypes.

  Example:
    >>> tx = optax.chain(shampoo_preconditioner(block_size=128, update_interval=10),
    ...                  optax.ema(0.9, debias=True), optax.scale_by_learning_rate(1e-3))

  References:
    Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization", 2018.
    Anil et al., "Scalable Second Order Optimization for Deep Learning", 2020.
  """
  block_size = _static_int("block_size", block_size)
  max_preconditioner_dim = _static_int("max_preconditioner_dim", max_preconditioner_dim)
  newton_max_iters = _static_int("newton_max_iters", newton_max_iters)
  # The step-counter arguments may be injected arrays: they only enter comparisons.
  if not hasattr(update_interval, "shape"):
    check_int("update_interval", update_interval, minimum=1)
  if not hasattr(start_preconditioning_step, "shape"):
    check_int("start_preconditioning_step", start_preconditioning_step, minimum=1)
  if not hasattr(statistics_interval, "shape"):
    check_int("statistics_interval", statistics_interval, minimum=1)
    if not hasattr(update_interval, "shape") and update_interval % statistics_interval:
      raise ValueError(
          f"statistics_interval must divide update_interval, so that every root is taken "
          f"from freshly updated statistics; got statistics_interval={statistics_interval} "
          f"and update_interval={update_interval}.")
  check_range("beta2", beta2, 0.0, 1.0, low_inclusive=False)
  check_range("eps", eps, 0.0, None)
  check_range("graft_b1", graft_b1, 0.0, 1.0, high_inclusive=False)
  check_range("graft_b2", graft_b2, 0.0, 1.0)
  check_range("graft_eps", graft_eps, 0.0, None)
  check_range("root_tolerance", root_tolerance, 0.0, None, low_inclusive=False)
  check_choice("method", method, ("eigh", "newton"))
  if root_bucket_ratio is not None:
    root_bucket_ratio = _static_int("root_bucket_ratio", root_bucket_ratio, float)
    check_range("root_bucket_ratio", root_bucket_ratio, 1.0, None, low_inclusive=False)
  if exponent_override is not None:
    exponent_override = _static_int("exponent_override", exponent_override, float)
    check_range("exponent_override", exponent_override, 0.0, None, low_inclusive=False)
    if method == "newton" and int(exponent_override) != exponent_override:
      raise ValueError("exponent_override must be an integer for method='newton', got "
                       f"{exponent_override!r}.")
  if not (graft is None or isinstance(graft, optax.GradientTransformation)):
    check_choice("graft", graft, GRAFTS)
  graft_tx = _graft_transform(graft, graft_b1, graft_b2, graft_eps)
  stat_dtype = jnp.dtype(statistics_dtype)

  def plan_for(leaves) -> _blocks.Plan:
    shapes = tuple(tuple(int(d) for d in jnp.shape(x)) for x in leaves)
    return _blocks.make_plan(shapes, block_size=block_size, merge=bool(merge_small_dims),
                             max_dim=max_preconditioner_dim,
                             precondition_1d=bool(precondition_1d),
                             exponent_override=exponent_override,
                             bucket_ratio=root_bucket_ratio, mixed_roots=method == "eigh")

  def init_fn(params):
    check_float_leaves("shampoo_preconditioner", params, complex_ok=False)
    leaves = jax.tree.leaves(params)
    if not leaves:
      # No parameters, or optax.tree.map_params' placeholder: the fields whose layout
      # depends on the shapes become one empty array, a prefix of any real layout.
      none = jnp.zeros((0,), stat_dtype)
      zero = jnp.zeros([], jnp.int32)
      graft_state = optax.EmptyState() if graft_tx is None else graft_tx.init(params)
      return ShampooState(count=zero, stats=none, preconds=none, diag_stats=none,
                          graft_state=graft_state, root_failures=zero, stat_skips=zero)
    plan = plan_for(leaves)
    eye = lambda n, s: jnp.broadcast_to(jnp.eye(s, dtype=stat_dtype), (n, s, s))
    stats = tuple(jnp.zeros((n, s, s), stat_dtype)
                  for (s, _), n in zip(plan.groups, plan.group_sizes))
    preconds = tuple(eye(n, s) for (s, _), n in zip(plan.groups, plan.group_sizes))
    diag_stats = ()
    if graft_tx is None:
      diag_stats = tuple(jnp.zeros(lp.shape, stat_dtype) for lp in plan.leaves if lp.diagonal)
    graft_state = (optax.EmptyState() if graft_tx is None else
                   graft_tx.init(jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), stat_dtype),
                                              params)))
    zero = jnp.zeros([], jnp.int32)
    return ShampooState(count=zero, stats=stats, preconds=preconds, diag_stats=diag_stats,
                        graft_state=graft_state, root_failures=zero, stat_skips=zero)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    check_state_shapes("shampoo_preconditioner", init_fn, updates, state)
    leaves, treedef = jax.tree.flatten(updates)
    plan = plan_for(leaves)
    count = optax.safe_increment(state.count)
    grads = [g.astype(stat_dtype) for g in leaves]
    b2 = jnp.asarray(beta2, stat_dtype)
    weight = jnp.where(b2 < 1, 1 - b2, jnp.ones_like(b2))
    debias = jnp.where(b2 < 1, 1 / (1 - b2 ** count.astype(stat_dtype)), jnp.ones_like(b2))
    # The Kronecker statistics move on the steps congruent to the start step modulo
    # `statistics_interval` (every root step among them, as the interval divides
    # `update_interval`); their bias correction counts those updates, not the steps.
    every_step = not hasattr(statistics_interval, "shape") and statistics_interval == 1
    if every_step:
      stats_due, stats_debias = None, debias
    else:
      k = jnp.asarray(statistics_interval, jnp.int32)
      start = jnp.asarray(start_preconditioning_step, jnp.int32)
      stats_due = (count - start) % k == 0
      first = 1 + (start - 1) % k  # the first statistics step
      n_stats = jnp.where(count >= first, (count - first) // k + 1, 0)
      stats_debias = jnp.where(
          b2 < 1, 1 / (1 - b2 ** jnp.maximum(n_stats, 1).astype(stat_dtype)),
          jnp.ones_like(b2))

    if graft_tx is not None:
      with jax.named_scope("graft"):
        graft_out, graft_state = graft_tx.update(jax.tree.unflatten(treedef, grads),
                                                 state.graft_state, params)
      graft_leaves = treedef.flatten_up_to(graft_out)
    else:
      graft_state, graft_leaves = state.graft_state, grads

    blocks = [None if lp.diagonal else _blocks.leaf_blocks(g, lp)
              for lp, g in zip(plan.leaves, grads)]

    @jax.named_scope("statistics")
    def accumulate(old_stats):
      """Every factor's new contribution, gathered per group in slot order, added in."""
      contribs = _blocks.factor_stats_per_group(plan, blocks)
      new_stats, skip = [], jnp.asarray(False)
      for old, c in zip(old_stats, contribs):
        finite = jnp.all(jnp.isfinite(c), axis=(1, 2))
        new = b2 * old + weight * c
        new_stats.append(jnp.where(finite[:, None, None], new, old))
        skip = skip | ~jnp.all(finite)
      return tuple(new_stats), skip

    if not plan.groups:
      new_stats, any_skip = (), jnp.asarray(False)
    elif stats_due is None:
      new_stats, any_skip = accumulate(state.stats)
    else:
      new_stats, any_skip = jax.lax.cond(
          stats_due, accumulate, lambda old: (tuple(old), jnp.asarray(False)),
          tuple(state.stats))

    # Roots, every `update_interval` steps from `start_preconditioning_step` on.
    @jax.named_scope("roots")
    def refresh(stats, preconds):
      return _blocks.inverse_roots(plan, [x * stats_debias for x in stats], preconds, eps=eps,
                                   method=method, max_iters=newton_max_iters,
                                   tolerance=root_tolerance)

    def keep(stats, preconds):
      del stats
      return tuple(preconds), jnp.zeros([], jnp.int32)

    active = count >= start_preconditioning_step
    due = active & ((count - start_preconditioning_step) % update_interval == 0)
    if plan.groups:
      preconds, failures = jax.lax.cond(due, refresh, keep, tuple(new_stats), state.preconds)
    else:
      preconds, failures = state.preconds, jnp.zeros([], jnp.int32)

    # Diagonal path without grafting: AdaGrad / RMSProp from the parameters' own statistics.
    diag_stats = list(state.diag_stats)
    diag_i = 0
    out_leaves = []
    for lp, g, gu, lb in zip(plan.leaves, grads, graft_leaves, blocks):
      if lp.diagonal:
        if graft_tx is not None:
          out = gu
        else:
          v_old = diag_stats[diag_i]
          v_new = b2 * v_old + weight * jnp.square(g)
          v_new = jnp.where(jnp.isfinite(v_new), v_new, v_old)
          any_skip = any_skip | ~jnp.all(jnp.isfinite(g))
          diag_stats[diag_i] = v_new
          diag_i += 1
          v_hat = v_new * debias
          v_max = jnp.max(v_hat) if v_hat.size else jnp.zeros([], stat_dtype)
          denom = jnp.sqrt(v_hat + eps * v_max)
          out = jnp.where(denom > 0, g / jnp.where(denom > 0, denom, 1.0), 0.0)
          out = jnp.where(active, out, g)
        out_leaves.append(out)
        continue
      pre_blocks = []
      graft_blocks = _blocks.leaf_blocks(gu, lp) if graft_tx is not None else None
      for ci, (combo, b) in enumerate(zip(lp.combos, lb)):
        u = _blocks.contract_blocks(b, _blocks.combo_factors(preconds, lp, combo))
        if graft_tx is not None:
          u_norm = _blocks.block_norms(u)
          g_norm = _blocks.block_norms(graft_blocks[ci])
          scale = jnp.where(u_norm > 0, g_norm / jnp.where(u_norm > 0, u_norm, 1.0), 0.0)
          u = u * scale.reshape((-1,) + (1,) * (u.ndim - 1))
        pre_blocks.append(u)
      out = _blocks.leaf_from_blocks(pre_blocks, lp)
      out_leaves.append(jnp.where(active, out, gu))

    out_leaves = [o.astype(x.dtype) for o, x in zip(out_leaves, leaves)]
    if leaves:
      new_stats, preconds, diag_stats = tuple(new_stats), tuple(preconds), tuple(diag_stats)
    else:  # keep the placeholder layout of an empty tree
      new_stats, preconds, diag_stats = state.stats, state.preconds, state.diag_stats
    new_state = ShampooState(
        count=count, stats=new_stats, preconds=preconds,
        diag_stats=diag_stats, graft_state=graft_state,
        # Saturating counters (like optax.safe_increment): they never wrap negative.
        root_failures=state.root_failures + jnp.minimum(
            failures, jnp.iinfo(jnp.int32).max - state.root_failures),
        stat_skips=jnp.where(any_skip, optax.safe_increment(state.stat_skips),
                             state.stat_skips))
    return jax.tree.unflatten(treedef, out_leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    block_size: int = 128,
    update_interval: int = 10,
    start_preconditioning_step: int = 10,
    graft: str | optax.GradientTransformation | None = "adam",
    graft_eps: float = 1e-8,
    nesterov: bool = False,
    **kwargs,
) -> optax.GradientTransformationExtraArgs:
  r"""Shampoo with Adam grafting, momentum, decoupled weight decay and a learning rate.

  .. math::
    u_t = \mathrm{shampoo\_preconditioner}(g_t),\quad
    m_t = b_1 m_{t-1} + (1 - b_1) u_t,\quad
    \theta_{t+1} = \theta_t - \eta_t \left(\hat m_t + \lambda \theta_t\right)

  with \hat m_t the bias-corrected EMA (or the Nesterov variant). With Adam grafting a
  learning rate that suits Adam suits this optimizer. Where the step time matters more
  than the last bit of curvature, `update_interval=20, statistics_interval=5` (statistics
  every fifth step) is what beat Adam's wall time to target on the CNN and transformer
  benchmarks (`python -m benchmarks.shampoo_bench`).

  Args:
    learning_rate: a float or an optax schedule.
    b1: momentum (EMA) decay applied to the preconditioned update.
    b2: decay of the Shampoo statistics and of the Adam graft's second moment.
    eps: Shampoo damping relative to each statistic's largest eigenvalue.
    weight_decay: decoupled weight decay (AdamW-style).
    block_size, update_interval, start_preconditioning_step, graft, graft_eps: see
      `shampoo_preconditioner`.
    nesterov: Nesterov momentum instead of the EMA.
    **kwargs: any other `shampoo_preconditioner` argument.

  Example:
    >>> tx = shampoo(1e-3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)

  References:
    Gupta, Koren & Singer 2018; Anil et al., "Scalable Second Order Optimization for Deep
    Learning", 2020.
  """
  check_range("b1", b1, 0.0, 1.0, high_inclusive=False)
  check_range("weight_decay", weight_decay, 0.0, None)
  precond = shampoo_preconditioner(
      block_size=block_size, update_interval=update_interval, beta2=b2, eps=eps,
      start_preconditioning_step=start_preconditioning_step, graft=graft, graft_b2=b2,
      graft_eps=graft_eps, **kwargs)
  if nesterov:
    momentum = optax.chain(optax.trace(decay=b1, nesterov=True), optax.scale(1.0 - b1))
  else:
    momentum = optax.ema(decay=b1, debias=True)
  return optax.chain(precond, momentum, optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(learning_rate))
