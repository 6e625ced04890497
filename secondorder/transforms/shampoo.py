"""Shampoo: Kronecker-factored preconditioning for tensors of any rank, blocked and grafted.

`shampoo_preconditioner` is the primitive (a `GradientTransformationExtraArgs` that needs no
extra argument); `shampoo` chains it with momentum, weight decay and the learning rate. The
block plan (blocking, merging, the batched factor stacks, root buckets, stacked layers) is
`secondorder.transforms._blocks`; this file holds the update rule as named steps:
`_plan`, `_init_state`, `_statistics`, `_refresh_roots`, `_precondition_leaf`,
`_diagonal_leaf`, with the graft built by `_graft_transform`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from secondorder._validation import (check_choice, check_count, check_float_leaves, check_int,
                                     check_range, check_state_shapes, check_tree_structure)
from secondorder.dimension_numbers import WeightDimensionNumbers, resolve_leaf_axes
from secondorder.transforms import _blocks

__all__ = ["ShampooState", "shampoo_preconditioner", "shampoo", "GRAFTS", "STATIC_ARGS"]

GRAFTS = ("adam", "rmsprop", "rmsprop_normalized", "adagrad", "sgd", "none")

# Arguments that fix the structure of the state when given a value; name them in
# `optax.inject_hyperparams(shampoo_preconditioner, static_args=STATIC_ARGS)` (the same names
# for `shampoo`). Left at their defaults (None) they need no mention.
STATIC_ARGS = ("block_size", "max_preconditioner_dim", "exponent_override", "newton_max_iters",
               "root_bucket_ratio", "weight_dimension_numbers")

_DEFAULT_BLOCK_SIZE = 128
_DEFAULT_MAX_PRECONDITIONER_DIM = 4096
_DEFAULT_NEWTON_MAX_ITERS = 100


class ShampooState(NamedTuple):
  """State of `shampoo_preconditioner`.

  Attributes:
    count: steps taken (int32).
    stats: Kronecker statistics, one stack `[n, s, s]` per group of factors that share a
      size s and a root p (groups sorted by (s, p)); float32 by default. The factors of
      every block of every layer of every leaf with that (s, p) are in one stack.
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

  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
  # One empty array each for a tree without parameters (`_init_state`).
  stats: tuple[jax.Array, ...] | jax.Array
  preconds: tuple[jax.Array, ...] | jax.Array
  diag_stats: tuple[jax.Array, ...] | jax.Array
  graft_state: optax.OptState
  root_failures: jax.Array
  stat_skips: jax.Array


@dataclasses.dataclass(frozen=True)
class _Layout:
  """The Python choices that fix the state's layout (never traced)."""

  block_size: int
  max_dim: int
  merge: bool
  precondition_1d: bool
  exponent_override: float | None
  bucket_ratio: float | None
  method: str
  newton_max_iters: int
  stat_dtype: Any


# ----------------------------------------------------------------------------- grafting


def _normalize_per_leaf() -> optax.GradientTransformation:
  """Divides every leaf by its Frobenius norm (a zero leaf stays zero)."""
  def fn(updates, params=None):
    del params
    def one(u):
      n = jnp.sqrt(jnp.sum(jnp.square(u)))
      return jnp.where(n > 0, u / jnp.where(n > 0, n, 1.0), u)
    return jax.tree.map(one, updates)
  return optax.stateless(fn)


def _graft_transform(graft, b1, b2, eps) -> optax.GradientTransformation | None:
  """The grafted diagonal method, from optax's primitives.

  The structure of its state depends only on Python choices (`graft`, and whether `b1` is
  None), never on a value, so an injected `b1` keeps the state's layout.
  """
  if graft is None or graft == "none":
    return None
  if isinstance(graft, optax.GradientTransformation):
    return graft
  if graft == "adam":
    if b1 is None:
      # Adam without momentum is bias-corrected RMSProp: the same numbers as b1 = 0, one
      # buffer fewer.
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


# ----------------------------------------------------------------------------- the steps


def _plan(layout: _Layout, weight_dimension_numbers: WeightDimensionNumbers, tree: Any
          ) -> _blocks.Plan:
  """The block plan of `tree`'s leaves, read through their dimension numbers (cached)."""
  leaves = jax.tree.leaves(tree)
  shapes = tuple(tuple(int(d) for d in jnp.shape(x)) for x in leaves)
  axes = tuple(resolve_leaf_axes(weight_dimension_numbers, tree)) if leaves else ()
  return _blocks.make_plan(shapes, axes, block_size=layout.block_size, merge=layout.merge,
                           max_dim=layout.max_dim, precondition_1d=layout.precondition_1d,
                           exponent_override=layout.exponent_override,
                           bucket_ratio=layout.bucket_ratio,
                           mixed_roots=layout.method == "eigh")


def _init_state(params: Any, plan: _blocks.Plan | None, graft_tx, stat_dtype) -> ShampooState:
  """Zero statistics, identity roots, the graft's state; `plan=None` for an empty tree.

  With no parameters (or `optax.tree.map_params`' placeholder) the fields whose layout
  depends on the shapes are one empty array, a prefix of any real layout.
  """
  # Every field is its own buffer (no array shared between two fields), so that a step can
  # be jitted with the state donated.
  zero = lambda: jnp.zeros([], jnp.int32)
  if plan is None:
    none = lambda: jnp.zeros((0,), stat_dtype)
    graft_state = optax.EmptyState() if graft_tx is None else graft_tx.init(params)
    return ShampooState(count=zero(), stats=none(), preconds=none(), diag_stats=none(),
                        graft_state=graft_state, root_failures=zero(), stat_skips=zero())
  eye = lambda n, s: jnp.broadcast_to(jnp.eye(s, dtype=stat_dtype), (n, s, s))
  stats = tuple(jnp.zeros((n, s, s), stat_dtype)
                for (s, _), n in zip(plan.groups, plan.group_sizes))
  preconds = tuple(eye(n, s) for (s, _), n in zip(plan.groups, plan.group_sizes))
  diag_stats: tuple[jax.Array, ...] = ()
  if graft_tx is None:
    diag_stats = tuple(jnp.zeros(lp.shape, stat_dtype) for lp in plan.leaves if lp.diagonal)
  graft_state = (optax.EmptyState() if graft_tx is None else
                 graft_tx.init(jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), stat_dtype),
                                            params)))
  return ShampooState(count=zero(), stats=stats, preconds=preconds, diag_stats=diag_stats,
                      graft_state=graft_state, root_failures=zero(), stat_skips=zero())


class _Schedule(NamedTuple):
  """Per-step weights and switches (arrays; the hyperparameters may be traced)."""

  b2: jax.Array  # statistics decay
  weight: jax.Array  # weight of the new contribution: 1 - b2, or 1 when summing
  debias: jax.Array  # bias correction after `count` updates
  stats_due: jax.Array | None  # whether the Kronecker statistics move (None: every step)
  stats_debias: jax.Array  # bias correction of the Kronecker statistics
  roots_due: jax.Array  # whether the roots are recomputed
  active: jax.Array  # whether Shampoo (not the graft alone) gives the update


def _schedule(count, beta2, update_interval, statistics_interval, start, stat_dtype
              ) -> _Schedule:
  """What step `count` (1-based) does.

  The Kronecker statistics move on the steps congruent to `start` modulo
  `statistics_interval` (every root step among them, as the interval divides
  `update_interval`); their bias correction counts those updates, not the steps. Injected
  (traced) intervals and start steps below 1 are read as 1.
  """
  if hasattr(update_interval, "shape"):
    update_interval = jnp.maximum(jnp.asarray(update_interval, jnp.int32), 1)
  if hasattr(start, "shape"):
    start = jnp.maximum(jnp.asarray(start, jnp.int32), 1)
  b2 = jnp.asarray(beta2, stat_dtype)
  ema = b2 < 1  # beta2 = 1 sums the statistics
  weight = jnp.where(ema, 1 - b2, jnp.ones_like(b2))
  debias = jnp.where(ema, 1 / (1 - b2 ** count.astype(stat_dtype)), jnp.ones_like(b2))
  if not hasattr(statistics_interval, "shape") and statistics_interval == 1:
    stats_due, stats_debias = None, debias
  else:
    k = jnp.maximum(jnp.asarray(statistics_interval, jnp.int32), 1)
    first_step = jnp.asarray(start, jnp.int32)
    stats_due = (count - first_step) % k == 0
    first = 1 + (first_step - 1) % k  # the first statistics step
    n_stats = jnp.where(count >= first, (count - first) // k + 1, 0)
    stats_debias = jnp.where(
        ema, 1 / (1 - b2 ** jnp.maximum(n_stats, 1).astype(stat_dtype)), jnp.ones_like(b2))
  active = count >= start
  roots_due = active & ((count - start) % update_interval == 0)
  return _Schedule(b2, weight, debias, stats_due, stats_debias, roots_due, active)


def _statistics(plan: _blocks.Plan, blocks, stats: Sequence[jax.Array], sched: _Schedule
                ) -> tuple[tuple[jax.Array, ...], jax.Array]:
  r"""The Kronecker statistics :math:`H_i \leftarrow \beta_2 H_i + w\, G_{(i)} G_{(i)}^\top`.

  Every factor's Gram matrix goes into its stack; a factor whose contribution is not finite
  keeps its old statistic. On steps where they are not due (`statistics_interval`), the
  products are skipped inside `lax.cond`.

  Returns:
    The new stacks and whether some contribution was skipped.
  """
  if not plan.groups:
    return (), jnp.asarray(False)

  @jax.named_scope("statistics")
  def accumulate(old_stats):
    new_stats, skip = [], jnp.asarray(False)
    for old, c in zip(old_stats, _blocks.factor_stats_per_group(plan, blocks)):
      finite = jnp.all(jnp.isfinite(c), axis=(1, 2))
      new = sched.b2 * old + sched.weight * c
      new_stats.append(jnp.where(finite[:, None, None], new, old))
      skip = skip | ~jnp.all(finite)
    return tuple(new_stats), skip

  if sched.stats_due is None:
    return accumulate(tuple(stats))
  return jax.lax.cond(sched.stats_due, accumulate,
                      lambda old: (tuple(old), jnp.asarray(False)), tuple(stats))


def _refresh_roots(plan: _blocks.Plan, layout: _Layout, stats, preconds, sched: _Schedule,
                   eps, root_tolerance) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """Every `update_interval` steps, the damped inverse roots of the bias-corrected statistics.

  One batched call per root bucket, inside `lax.cond` (`_blocks.inverse_roots`); a root that
  fails keeps the previous one.

  Returns:
    The roots in use and the number of rejected roots this step.
  """
  if not plan.groups:
    return preconds, jnp.zeros([], jnp.int32)

  @jax.named_scope("roots")
  def refresh(stats, preconds):
    return _blocks.inverse_roots(
        plan, [x * sched.stats_debias for x in stats], preconds, eps=eps, method=layout.method,
        max_iters=layout.newton_max_iters, tolerance=root_tolerance)

  def keep(stats, preconds):
    del stats
    return tuple(preconds), jnp.zeros([], jnp.int32)

  return jax.lax.cond(sched.roots_due, refresh, keep, tuple(stats), tuple(preconds))


def _precondition_leaf(lp: _blocks.LeafPlan, blocks, graft_update, preconds,
                       grafted: bool) -> jax.Array:
  r"""One leaf's Shampoo update :math:`G \times_1 \tilde H_1^{-1/p} \cdots`, block by block.

  With a graft each block takes the norm of the grafted update on that block.
  """
  graft_blocks = _blocks.leaf_blocks(graft_update, lp) if grafted else None
  out = []
  for ci, (combo, b) in enumerate(zip(lp.combos, blocks)):
    u = _blocks.contract_blocks(b, _blocks.combo_factors(preconds, lp, combo))
    if graft_blocks is not None:
      u_norm = _blocks.block_norms(u)
      g_norm = _blocks.block_norms(graft_blocks[ci])
      scale = jnp.where(u_norm > 0, g_norm / jnp.where(u_norm > 0, u_norm, 1.0), 0.0)
      u = u * scale.reshape((-1,) + (1,) * (u.ndim - 1))
    out.append(u)
  return _blocks.leaf_from_blocks(out, lp)


def _diagonal_leaf(g, v_old, sched: _Schedule, eps, stat_dtype):
  """The ungrafted diagonal path: AdaGrad / RMSProp from the leaf's own second moment.

  Returns:
    `(update, new second moment, whether the gradient was not finite)`.
  """
  v_new = sched.b2 * v_old + sched.weight * jnp.square(g)
  v_new = jnp.where(jnp.isfinite(v_new), v_new, v_old)
  v_hat = v_new * sched.debias
  v_max = jnp.max(v_hat) if v_hat.size else jnp.zeros([], stat_dtype)
  denom = jnp.sqrt(v_hat + eps * v_max)
  out = jnp.where(denom > 0, g / jnp.where(denom > 0, denom, 1.0), 0.0)
  return out, v_new, ~jnp.all(jnp.isfinite(g))


def _add_saturating(counter: jax.Array, n: jax.Array) -> jax.Array:
  """`counter + n` that stops at int32's maximum (like optax.safe_increment)."""
  return counter + jnp.minimum(n, jnp.iinfo(jnp.int32).max - counter)


# ----------------------------------------------------------------------------- transform


def _static_int(name: str, value: Any, default=None, cast=int):
  """A structural number (None: `default`); a concrete array is accepted, a traced one
  explained."""
  if value is None:
    return default
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
    block_size: int | None = None,
    update_interval: int = 10,
    beta2: float = 0.999,
    eps: float = 1e-6,
    *,
    statistics_interval: int = 1,
    exponent_override: float | None = None,
    start_preconditioning_step: int = 1,
    graft: str | optax.GradientTransformation | None = "adam",
    graft_b1: float | None = None,
    graft_b2: float = 0.999,
    graft_eps: float = 1e-8,
    method: str = "eigh",
    root_tolerance: float = 0.1,
    newton_max_iters: int | None = None,
    merge_small_dims: bool = True,
    precondition_1d: bool = False,
    max_preconditioner_dim: int | None = None,
    root_bucket_ratio: float | None = None,
    statistics_dtype: Any = jnp.float32,
    weight_dimension_numbers: WeightDimensionNumbers = None,
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

  Stacked layers: with `weight_dimension_numbers`, a leaf is read through optax's
  `MuonDimensionNumbers(reduction_axis, output_axis)` as B independent R x O matrices (B the
  product of the other, batch, axes: the layer axis of a scan-stacked model), each blocked
  and preconditioned as a leaf of its own; no factor ever spans a batch axis. Same-shaped
  blocks of all layers share the batched stacks, so a scanned model has the root calls of
  the unrolled one. Several reduction or output axes are flattened into one side
  (attention's `[d, heads, head_dim]` with `MuonDimensionNumbers(0, (1, 2))` is a
  `d x (heads * head_dim)` matrix). An empty reduction side,
  `MuonDimensionNumbers((), 1)` on a `[L, d]` leaf (scan-stacked biases and norm scales),
  is L independent vectors, each treated as a 1-D leaf (the diagonal path, or with
  `precondition_1d` its own d x d factor).

  Grafting: each block's update takes the norm of the grafted diagonal method's update on
  that block, u = ‖u_graft‖ · u_shampoo / ‖u_shampoo‖; diagonal-path parameters get the
  grafted update itself (or, without grafting, diagonal AdaGrad/RMSProp from their own
  statistics). Before `start_preconditioning_step` only the grafted method runs.
  Momentum / Nesterov belong after this transform in the chain (see `shampoo`).

  Args:
    block_size: largest factor side; larger dimensions are blocked (None: 128).
    update_interval: steps between root recomputations (T), >= 1. This, `statistics_interval`
      and `start_preconditioning_step` may be injected arrays: a concrete value below 1 is
      rejected (also at init under `optax.inject_hyperparams`), a traced one is read as 1.
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
    graft_b1: the Adam graft's first-moment decay. None (default) leaves momentum to the
      chain: the graft is then bias-corrected RMSProp (Adam's numbers with b1 = 0, one
      buffer fewer). A number, 0 included, keeps Adam's first moment, so an injected
      `graft_b1` gives the same state structure as a Python one.
    graft_b2: second-moment decay of the Adam/RMSProp grafts, in [0, 1) (1 would never
      move their second moment).
    graft_eps: epsilon of the grafted method.
    method: "eigh" or "newton" (integer p only).
    root_tolerance: a Newton root whose residual max|H^p A - I| exceeds it is rejected.
    newton_max_iters: Newton iterations at most (None: 100).
    merge_small_dims: merge small adjacent dimensions (and drop size-1 ones).
    precondition_1d: give 1-D (and scalar) parameters a full factor instead of the
      diagonal path.
    max_preconditioner_dim: parameters with a larger (merged) dimension go diagonal
      (None: 4096).
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
    weight_dimension_numbers: None (every leaf read by its rank), or a pytree with the
      params' structure of `optax.contrib.MuonDimensionNumbers` (None for a leaf keeps the
      rank-based reading), or a callable of the params returning one. A spec that does
      not fit its leaf raises a ValueError naming the leaf's path, shape and spec. A
      callable must be named in `static_args` under `optax.inject_hyperparams`.

  Every state leaf is its own buffer, so a step can be jitted with the state donated.
  Updates whose tree structure (dict keys included) differs from the params the state was
  initialized with (the ``params`` given to `update`, and the graft's moments) are a
  ValueError naming the first differing path.

  Returns:
    An `optax.GradientTransformationExtraArgs`; its update needs no extra argument and
    returns updates in the gradients' dtypes.

  Example:
    >>> tx = optax.chain(shampoo_preconditioner(block_size=128, update_interval=10),
    ...                  optax.ema(0.9, debias=True), optax.scale_by_learning_rate(1e-3))
    >>> # Four scan-stacked [64, 64] layers, each with its own factors:
    >>> stacked = shampoo_preconditioner(weight_dimension_numbers={
    ...     "layers": optax.contrib.MuonDimensionNumbers(1, 2), "bias": None})

  References:
    Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization", 2018.
    Anil et al., "Scalable Second Order Optimization for Deep Learning", 2020.
  """
  block_size = _static_int("block_size", block_size, _DEFAULT_BLOCK_SIZE)
  max_preconditioner_dim = _static_int("max_preconditioner_dim", max_preconditioner_dim,
                                       _DEFAULT_MAX_PRECONDITIONER_DIM)
  newton_max_iters = _static_int("newton_max_iters", newton_max_iters,
                                 _DEFAULT_NEWTON_MAX_ITERS)
  # The step-counter arguments may be injected arrays: they only enter comparisons.
  check_count("update_interval", update_interval, minimum=1)
  check_count("start_preconditioning_step", start_preconditioning_step, minimum=1)
  check_count("statistics_interval", statistics_interval, minimum=1)
  if not hasattr(statistics_interval, "shape"):
    if not hasattr(update_interval, "shape") and update_interval % statistics_interval:
      raise ValueError(
          f"statistics_interval must divide update_interval, so that every root is taken "
          f"from freshly updated statistics; got statistics_interval={statistics_interval} "
          f"and update_interval={update_interval}.")
  check_range("beta2", beta2, 0.0, 1.0, low_inclusive=False)
  check_range("eps", eps, 0.0, None)
  if graft_b1 is not None:
    check_range("graft_b1", graft_b1, 0.0, 1.0, high_inclusive=False)
  # b2 = 1 would never move the grafted second moment (Adam's bias correction divides by 0).
  check_range("graft_b2", graft_b2, 0.0, 1.0,
              high_inclusive=graft not in ("adam", "rmsprop", "rmsprop_normalized"))
  check_range("graft_eps", graft_eps, 0.0, None)
  check_range("root_tolerance", root_tolerance, 0.0, None, low_inclusive=False)
  check_choice("method", method, ("eigh", "newton"))
  if root_bucket_ratio is not None:
    root_bucket_ratio = _static_int("root_bucket_ratio", root_bucket_ratio, cast=float)
    check_range("root_bucket_ratio", root_bucket_ratio, 1.0, None, low_inclusive=False)
  if exponent_override is not None:
    exponent_override = _static_int("exponent_override", exponent_override, cast=float)
    check_range("exponent_override", exponent_override, 0.0, None, low_inclusive=False)
    if method == "newton" and int(exponent_override) != exponent_override:
      raise ValueError("exponent_override must be an integer for method='newton', got "
                       f"{exponent_override!r}.")
  if not (graft is None or isinstance(graft, optax.GradientTransformation)):
    check_choice("graft", graft, GRAFTS)
  graft_tx = _graft_transform(graft, graft_b1, graft_b2, graft_eps)
  layout = _Layout(block_size=block_size, max_dim=max_preconditioner_dim,
                   merge=bool(merge_small_dims), precondition_1d=bool(precondition_1d),
                   exponent_override=exponent_override, bucket_ratio=root_bucket_ratio,
                   method=method, newton_max_iters=newton_max_iters,
                   stat_dtype=jnp.dtype(statistics_dtype))
  stat_dtype = layout.stat_dtype

  def init_fn(params):
    check_float_leaves("shampoo_preconditioner", params, complex_ok=False)
    if not jax.tree.leaves(params):
      return _init_state(params, None, graft_tx, stat_dtype)
    return _init_state(params, _plan(layout, weight_dimension_numbers, params), graft_tx,
                       stat_dtype)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    check_tree_structure("shampoo_preconditioner", updates, params)
    check_state_shapes("shampoo_preconditioner", init_fn, updates, state)
    leaves, treedef = jax.tree.flatten(updates)
    plan = _plan(layout, weight_dimension_numbers, updates)
    count = optax.safe_increment(state.count)
    sched = _schedule(count, beta2, update_interval, statistics_interval,
                      start_preconditioning_step, stat_dtype)
    grads = [g.astype(stat_dtype) for g in leaves]
    if graft_tx is not None:
      with jax.named_scope("graft"):
        graft_out, graft_state = graft_tx.update(jax.tree.unflatten(treedef, grads),
                                                 state.graft_state, params)
      graft_leaves = treedef.flatten_up_to(graft_out)
    else:
      graft_state, graft_leaves = state.graft_state, grads

    blocks = [None if lp.diagonal else _blocks.leaf_blocks(g, lp)
              for lp, g in zip(plan.leaves, grads)]
    stats, any_skip = _statistics(plan, blocks, state.stats, sched)
    preconds, failures = _refresh_roots(plan, layout, stats, state.preconds, sched, eps,
                                        root_tolerance)

    diag_stats, diag_i, out_leaves = list(state.diag_stats), 0, []
    for lp, g, gu, lb in zip(plan.leaves, grads, graft_leaves, blocks):
      if not lp.diagonal:
        out = _precondition_leaf(lp, lb, gu, preconds, graft_tx is not None)
      elif graft_tx is not None:
        out_leaves.append(gu)  # the grafted method is the diagonal path
        continue
      else:
        out, diag_stats[diag_i], skip = _diagonal_leaf(g, diag_stats[diag_i], sched, eps,
                                                       stat_dtype)
        diag_i += 1
        any_skip = any_skip | skip
      out_leaves.append(jnp.where(sched.active, out, gu))

    out_leaves = [o.astype(x.dtype) for o, x in zip(out_leaves, leaves)]
    if leaves:
      stats, preconds, diag_stats = tuple(stats), tuple(preconds), tuple(diag_stats)
    else:  # keep the placeholder layout of an empty tree
      stats, preconds, diag_stats = state.stats, state.preconds, state.diag_stats
    new_state = ShampooState(
        count=count, stats=stats, preconds=preconds, diag_stats=diag_stats,
        graft_state=graft_state,
        root_failures=_add_saturating(state.root_failures, failures),
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
    block_size: int | None = None,
    update_interval: int = 10,
    start_preconditioning_step: int = 10,
    statistics_interval: int = 1,
    graft: str | optax.GradientTransformation | None = "adam",
    graft_b1: float | None = None,
    graft_eps: float = 1e-8,
    nesterov: bool = False,
    exponent_override: float | None = None,
    method: str = "eigh",
    root_tolerance: float = 0.1,
    newton_max_iters: int | None = None,
    merge_small_dims: bool = True,
    precondition_1d: bool = False,
    max_preconditioner_dim: int | None = None,
    root_bucket_ratio: float | None = None,
    statistics_dtype: Any = jnp.float32,
    weight_dimension_numbers: WeightDimensionNumbers = None,
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

  Every argument is explicit, so `optax.inject_hyperparams(shampoo)(learning_rate=...)`
  works as is; the structural arguments (`STATIC_ARGS`) given a value must be named in
  its `static_args`.

  Args:
    learning_rate: a float >= 0 or an optax schedule.
    b1: momentum (EMA) decay applied to the preconditioned update.
    b2: decay of the Shampoo statistics and of the Adam graft's second moment, in (0, 1)
      with an Adam or RMSProp graft (in (0, 1] otherwise: 1 sums the statistics).
    eps: Shampoo damping relative to each statistic's largest eigenvalue.
    weight_decay: decoupled weight decay (AdamW-style).
    block_size: see `shampoo_preconditioner`.
    update_interval: see `shampoo_preconditioner`.
    start_preconditioning_step: see `shampoo_preconditioner`.
    statistics_interval: see `shampoo_preconditioner`.
    graft: see `shampoo_preconditioner`.
    graft_b1: see `shampoo_preconditioner`.
    graft_eps: see `shampoo_preconditioner`.
    nesterov: Nesterov momentum instead of the EMA.
    exponent_override: see `shampoo_preconditioner`.
    method: see `shampoo_preconditioner`.
    root_tolerance: see `shampoo_preconditioner`.
    newton_max_iters: see `shampoo_preconditioner`.
    merge_small_dims: see `shampoo_preconditioner`.
    precondition_1d: see `shampoo_preconditioner`.
    max_preconditioner_dim: see `shampoo_preconditioner`.
    root_bucket_ratio: see `shampoo_preconditioner`.
    statistics_dtype: see `shampoo_preconditioner`.
    weight_dimension_numbers: see `shampoo_preconditioner` (scan-stacked layers).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> tx = shampoo(1e-3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)

  References:
    Gupta, Koren & Singer 2018; Anil et al., "Scalable Second Order Optimization for Deep
    Learning", 2020.
  """
  check_range("learning_rate", learning_rate, 0.0, None)
  check_range("b1", b1, 0.0, 1.0, high_inclusive=False)
  if graft in ("adam", "rmsprop", "rmsprop_normalized"):
    # b2 is also the graft's decay, which must stay below 1 (see graft_b2).
    check_range("b2", b2, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
  check_range("weight_decay", weight_decay, 0.0, None)
  precond = shampoo_preconditioner(
      block_size=block_size, update_interval=update_interval, beta2=b2, eps=eps,
      statistics_interval=statistics_interval, exponent_override=exponent_override,
      start_preconditioning_step=start_preconditioning_step, graft=graft, graft_b1=graft_b1,
      graft_b2=b2, graft_eps=graft_eps, method=method, root_tolerance=root_tolerance,
      newton_max_iters=newton_max_iters, merge_small_dims=merge_small_dims,
      precondition_1d=precondition_1d, max_preconditioner_dim=max_preconditioner_dim,
      root_bucket_ratio=root_bucket_ratio, statistics_dtype=statistics_dtype,
      weight_dimension_numbers=weight_dimension_numbers)
  if nesterov:
    momentum = optax.chain(optax.trace(decay=b1, nesterov=True), optax.scale(1.0 - b1))
  else:
    momentum = optax.ema(decay=b1, debias=True)
  return optax.chain(precond, momentum, optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(learning_rate))
