"""Sophia: clipped, diagonally preconditioned momentum with a periodic Hessian estimate.

`sophia_clip` is the primitive, `sophia` the assembled optimizer. The Hessian diagonal
comes from Hutchinson's estimator (Sophia-H), the Gauss-Newton-Bartlett estimator
(Sophia-G) or any user-supplied `GradientTransformation` that returns a diagonal.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from secondorder._validation import (check_choice, check_count, check_float_leaves, check_int,
                                     check_range, check_same_structure, check_tree_structure,
                                     require_extra_arg)
from secondorder.curvature.estimators import gnb_diag, hutchinson_diag, value_grad_and_gnb_diag
from secondorder.transforms._refresh import (check_estimate_is_used, maybe_refresh,
                                             one_pass_hutchinson, statistics_dtype,
                                             tree_all_finite)

_ESTIMATORS = ("hutchinson", "gnb")


class EstimatorState(NamedTuple):
  """State of the built-in estimators: the PRNG key (raw uint32[2]) of the probes/labels."""
  key: jax.Array


def _keyed_estimator(method: str, keyword: str, example: str, estimate: Callable,
                     seed: int) -> optax.GradientTransformationExtraArgs:
  """An estimator whose `update` returns `estimate(extra_args[keyword], params, key)`,
  drawing a fresh key from its state each call."""

  def init_fn(params):
    del params
    return EstimatorState(key=jax.random.PRNGKey(seed))

  def update_fn(updates, state, params=None, **extra_args):
    check_tree_structure(method, updates, params)
    fn = require_extra_arg(method, keyword, extra_args.get(keyword), example)
    key, sub = _split_key(state)
    return estimate(fn, params, sub), EstimatorState(key=key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _split_key(estimator_state) -> tuple[jax.Array, jax.Array]:
  """(the built-in estimator's next key, the key it draws this step's probe / labels from)."""
  key, sub = jax.random.split(estimator_state.key)
  return key, sub


def hutchinson_estimator(seed: int = 0) -> optax.GradientTransformationExtraArgs:
  r"""Sophia-H's estimator: :math:`z \odot Hz`, a fresh Rademacher probe per leaf.

  Its `update(grads, state, params, obj_fn=...)` returns the estimate (a pytree like params)
  in place of the updates.
  """
  return _keyed_estimator("sophia_clip(estimator='hutchinson')", "obj_fn",
                          "obj_fn=lambda p: loss_fn(p, batch)", hutchinson_diag, seed)


def gnb_estimator(seed: int = 0) -> optax.GradientTransformationExtraArgs:
  r"""Sophia-G's Gauss-Newton-Bartlett estimator :math:`B\,\hat g \odot \hat g`.

  :math:`\hat g` is the gradient of the mean cross-entropy of the model's logits against
  labels sampled from its own softmax; :math:`B` is the number of logit rows (all batch axes
  flattened, so tokens for a language model). Its `update(grads, state, params,
  logits_fn=...)` returns the estimate in place of the updates.
  """
  return _keyed_estimator("sophia_clip(estimator='gnb')", "logits_fn",
                          "logits_fn=lambda p: model.apply(p, batch['inputs'])", gnb_diag, seed)


class SophiaClipState(NamedTuple):
  """State of `sophia_clip`.

  Attributes:
    count: steps taken (int32).
    hessian_count: curvature refreshes folded into `hessian` (int32); the bias correction
      of `hessian` uses it.
    nonfinite_count: refreshes skipped because the estimate held a NaN or an Inf (int32).
    win_rate: fraction of entries not clipped at the last step (float32); read it with
      `optax.tree.get(state, "win_rate")`. Healthy values lie between 0.1 and 0.5.
    mu: EMA of the gradient.
    hessian: EMA of the Hessian-diagonal estimates.
    estimator_state: the estimator's state (the PRNG key for the built-in ones).
  """
  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
  hessian_count: jax.Array
  nonfinite_count: jax.Array
  win_rate: jax.Array
  mu: optax.Updates
  hessian: optax.Updates
  estimator_state: Any


def sophia_clip(
    b1: float = 0.965,
    b2: float = 0.99,
    gamma: float = 0.01,
    eps: float = 1e-12,
    update_interval: int = 10,
    estimator: str | optax.GradientTransformation = "hutchinson",
    bias_correction: bool = True,
    seed: int = 0,
    stats_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sophia's clipped update: momentum over a periodically refreshed Hessian diagonal.

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
    h_n = \beta_2 h_{n-1} + (1-\beta_2) \hat h \ \text{(refresh steps only)},\\
    u_t = \mathrm{clip}\!\left(\frac{\hat m_t}{\max(\gamma \hat h_n, \epsilon)},\,1\right),
    \quad \hat m_t = \frac{m_t}{1-\beta_1^t},\quad \hat h_n = \frac{h_n}{1-\beta_2^n},

  element-wise, with :math:`t` the step and :math:`n` the number of refreshes so far.
  Refreshes happen on steps 0, k, 2k, ... (k = `update_interval`), inside `jax.lax.cond`,
  so steps in between do not pay for the estimate; a refresh happens before the update of
  its step. `update(..., refresh=True/False)` (a Python bool, static under `jit`) overrides
  the schedule for that call: compile a refresh step and a plain step and choose on the host
  (`refresh=(t % k == 0)` gives the same trajectory); the plain step then carries no
  conditional and needs no `obj_fn` / `logits_fn`. On CPU this host-side choice is the
  faster one: XLA:CPU runs convolution gradients inside a conditional about 10x slower than
  outside (jax-ml/jax#12868), and a conditional holding an HVP slows the steps that skip it.
  The refresh step can also take its gradient and its estimate from one pass:
  `update(..., hessian_diag=h, refresh=True)` with `(loss, grads, h)` from
  `value_grad_and_hutchinson_estimate` (Sophia-H) or `value_grad_and_gnb_estimate`
  (Sophia-G); these draw the probe / labels the built-in estimator would have drawn, so the
  trajectory is the same. Passing `hessian_diag=` with `refresh=False`, where it would go
  unused, is an error.

  Two departures from `optax.contrib.sophia` (and the paper's pseudo-code), both fixes:

  * The first estimate is taken at step 0, before the first update. Starting from
    :math:`h = 0` instead clips every entry for the first k steps (a sign-of-momentum
    update whatever the curvature).
  * :math:`h` is bias-corrected by the number of refreshes. Without it, after the first
    refresh :math:`h` holds only :math:`1-\beta_2` = 1% of the estimate, so the
    preconditioned step is 100x too large and again almost everything is clipped for
    hundreds of steps.

  `bias_correction=False` drops both bias corrections (the paper's rule with an estimate at
  step 0). A refresh whose estimate holds a NaN or an Inf is skipped: `hessian` is kept and
  `nonfinite_count` incremented. A NaN or Inf gradient is not clipped away: the momentum
  keeps it (as in `optax.adam`) and the update of each affected entry is that non-finite
  momentum, never a finite ±1 step; wrap in `optax.apply_if_finite` to skip such steps.
  The fraction of entries with
  :math:`|\hat m / \max(\gamma \hat h, \epsilon)| < 1` is stored as `win_rate` in the state.

  Relation to the official implementation: its Sophia-G step is
  :math:`\mathrm{sign}(m)\min(|m| / (\rho\, B\, h' + 10^{-15}), 1)` with :math:`h'` the
  EMA of :math:`\hat g \odot \hat g` and :math:`B` the number of tokens per step. Here the
  estimate already carries the factor :math:`B` (:math:`\hat h = B \hat g \odot \hat g`), so
  `gamma` equals the official `rho` (0.03 to 0.05 in its GPT-2 runs), provided `logits_fn`
  returns the logits of every token of the batch. Typical values are 0.01 to 0.05; tune
  `gamma` so that the win rate stays in [0.1, 0.5].

  Args:
    b1: decay of the gradient EMA, in [0, 1).
    b2: decay of the Hessian-diagonal EMA per refresh, in [0, 1). Its memory spans
      `update_interval / (1 - b2)` steps.
    gamma: scale of the Hessian in the denominator, > 0.
    eps: floor of the denominator, >= 0. With 0, an entry whose curvature is 0 takes the
      clipped step ±1 (its momentum is not 0) or stays (it is 0): never 0 / 0.
    update_interval: refresh the Hessian estimate every this many steps (int >= 1; an
      injected value below 1 is rejected at init, and read as 1 when traced).
    estimator: "hutchinson" (Sophia-H, needs `obj_fn=` in update: params -> scalar loss on
      the current batch), "gnb" (Sophia-G, needs `logits_fn=`: params -> logits of the
      current batch, classes on the last axis), or a `GradientTransformation` whose
      `update(grads, state, params, **extra_args)` returns a diagonal estimate like params
      (it receives every extra argument given to `update`).
    bias_correction: bias-correct the momentum and the Hessian EMA (default True).
    seed: seed of the PRNG key of the built-in estimators.
    stats_dtype: dtype of `mu` and `hessian`; default float32 (float64 for float64 params).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from secondorder.transforms.sophia import sophia_clip
    >>> loss = lambda p: jnp.sum(jnp.array([1., 10.]) * p ** 2)
    >>> tx = optax.chain(sophia_clip(), optax.scale_by_learning_rate(0.1))
    >>> params = jnp.array([1., 1.])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params, obj_fn=loss)
    >>> win_rate = optax.tree.get(state, "win_rate")

  References:
    Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
    Pre-training", ICLR 2024, https://arxiv.org/abs/2305.14342
  """
  check_range("b1", b1, 0.0, 1.0, high_inclusive=False)
  check_range("b2", b2, 0.0, 1.0, high_inclusive=False)
  check_range("gamma", gamma, 0.0, low_inclusive=False)
  check_range("eps", eps, 0.0)
  check_count("update_interval", update_interval, minimum=1)
  if isinstance(seed, numbers.Number):
    check_int("seed", seed)
  if isinstance(estimator, str):
    check_choice("estimator", estimator, _ESTIMATORS)
    estimator_tx = (hutchinson_estimator(seed) if estimator == "hutchinson"
                    else gnb_estimator(seed))
  elif isinstance(estimator, optax.GradientTransformation):
    estimator_tx = optax.with_extra_args_support(estimator)
  else:
    raise ValueError(
        f"estimator must be one of {list(_ESTIMATORS)!r} or an optax GradientTransformation "
        f"returning a Hessian diagonal, got {estimator!r}.")

  def init_fn(params):
    check_float_leaves("sophia_clip", params)

    def zeros(x):
      return jnp.zeros(jnp.shape(x), statistics_dtype(jnp.result_type(x), stats_dtype))
    return SophiaClipState(
        count=jnp.zeros([], jnp.int32),
        hessian_count=jnp.zeros([], jnp.int32),
        nonfinite_count=jnp.zeros([], jnp.int32),
        win_rate=jnp.zeros([], jnp.float32),
        mu=jax.tree.map(zeros, params),
        hessian=jax.tree.map(zeros, params),
        estimator_state=estimator_tx.init(params),
    )

  def update_fn(updates, state, params=None, *, refresh=None, hessian_diag=None,
                **extra_args):
    # Shapes are static: a broadcastable mismatch is an error, not a free broadcast.
    check_same_structure("updates", state.mu, updates, "the state")
    if params is None:
      raise ValueError("sophia_clip needs params in update(): "
                       "`tx.update(grads, state, params, ...)`.")
    if hessian_diag is not None:
      check_same_structure("hessian_diag", state.hessian, hessian_diag, "the state")
    check_estimate_is_used("sophia_clip", hessian_diag, refresh)

    def refresh_fn(hessian, hessian_count, nonfinite_count, estimator_state):
      if hessian_diag is not None:
        # A ready estimate (one-pass helpers): advance the built-in estimator's key as
        # its own update would; a user estimator's state is left as it is.
        estimate = hessian_diag
        if isinstance(estimator_state, EstimatorState):
          estimator_state = EstimatorState(key=_split_key(estimator_state)[0])
      else:
        estimate, estimator_state = estimator_tx.update(
            updates, estimator_state, params, **extra_args)
      estimate = jax.tree.map(lambda e, h: e.astype(h.dtype), estimate, hessian)
      finite = tree_all_finite(estimate)
      new_hessian = optax.tree.update_moment(estimate, hessian, b2, 1)
      hessian = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_hessian, hessian)
      # Saturating counters (optax.safe_increment), as for `count`.
      return (hessian, jnp.where(finite, optax.safe_increment(hessian_count), hessian_count),
              jnp.where(finite, nonfinite_count, optax.safe_increment(nonfinite_count)),
              estimator_state)

    hessian, hessian_count, nonfinite_count, estimator_state = maybe_refresh(
        refresh_fn,
        (state.hessian, state.hessian_count, state.nonfinite_count, state.estimator_state),
        state.count, update_interval, refresh)

    count = optax.safe_increment(state.count)
    grads = jax.tree.map(lambda g, m: g.astype(m.dtype), updates, state.mu)
    mu = optax.tree.update_moment(grads, state.mu, b1, 1)
    if bias_correction:
      mu_hat = optax.tree.bias_correction(mu, b1, count)
      # max(n, 1): before any finite refresh the EMA is zero and stays zero.
      h_hat = optax.tree.bias_correction(hessian, b2, jnp.maximum(hessian_count, 1))
    else:
      mu_hat, h_hat = mu, hessian

    ratio = jax.tree.map(lambda m, h: _clip_ratio(m, jnp.maximum(gamma * h, eps)),
                         mu_hat, h_hat)
    # (an int32 start, so that an empty tree sums to an array too)
    not_clipped = sum((jnp.sum(jnp.abs(r) < 1) for r in jax.tree.leaves(ratio)),
                      jnp.zeros([], jnp.int32))
    size = max(optax.tree.size(ratio), 1)
    win_rate = (not_clipped / size).astype(jnp.float32)
    # clip(±inf, 1) would be a finite ±1 step: a non-finite momentum entry is returned as it
    # is, so the fault shows in the update (and optax.apply_if_finite can skip the step).
    new_updates = jax.tree.map(
        lambda r, m, u: jnp.where(jnp.isfinite(m), jnp.clip(r, -1, 1), m).astype(
            jnp.result_type(u)), ratio, mu, updates)
    return new_updates, SophiaClipState(
        count=count, hessian_count=hessian_count, nonfinite_count=nonfinite_count,
        win_rate=win_rate, mu=mu, hessian=hessian, estimator_state=estimator_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _clip_ratio(m: jax.Array, denominator: jax.Array) -> jax.Array:
  """m / denominator, with 0 / 0 read as 0: with eps = 0 an entry of zero momentum and
  zero curvature does not move (a nonzero one over 0 is ±inf and clips to ±1)."""
  return jnp.where(m == 0, jnp.zeros_like(m), m / denominator)


def _find_sophia_state(opt_state, helper: str) -> SophiaClipState:
  found = optax.tree.get_all_with_path(opt_state, "SophiaClipState")
  if len(found) != 1:
    raise ValueError(
        f"{helper} needs an optimizer state holding exactly one SophiaClipState (from "
        f"sophia_clip or sophia); found {len(found)}.")
  state = found[0][1]
  if not isinstance(state.estimator_state, EstimatorState):
    raise ValueError(
        f"{helper} draws from the built-in estimator's key; this Sophia state holds a "
        f"user-supplied estimator's state ({type(state.estimator_state).__name__}).")
  return state


def value_grad_and_hutchinson_estimate(
    obj_fn: Callable[[Any], Any], params: Any, opt_state: Any, *, has_aux: bool = False,
) -> tuple:
  r"""Loss, gradient and Sophia-H's estimate :math:`z \odot Hz` from one pass.

  For the refresh steps of a host-scheduled Sophia-H loop: `jvp(grad(obj_fn))` returns the
  gradient as its primal output, so the refresh step costs one forward-over-reverse pass
  instead of a gradient and an HVP. The probe is the one `hutchinson_estimator` would draw
  at this step (from the key in `opt_state`)::

    loss, grads, h = value_grad_and_hutchinson_estimate(lambda p: loss_fn(p, batch),
                                                        params, state)
    updates, state = tx.update(grads, state, params, hessian_diag=h, refresh=True)

  With `has_aux=True`, `obj_fn` returns `(loss, aux)` (for a model with batch statistics,
  the loss composed with `secondorder.closures.nnx_forward(...).train` or
  `linen_forward(...).train`, aux being the new model state) and `aux` comes back fourth.

  Args:
    obj_fn: `params -> loss` on the current batch (or `(loss, aux)` with `has_aux`).
    params: the parameters.
    opt_state: the state of an optimizer holding one `SophiaClipState` with a built-in
      estimator.
    has_aux: whether `obj_fn` returns `(loss, aux)`.

  Returns:
    `(loss, grads, hessian_diag)`, the last two pytrees like params; with `has_aux`,
    `(loss, grads, hessian_diag, aux)`.
  """
  sstate = _find_sophia_state(opt_state, "value_grad_and_hutchinson_estimate")
  value, grads, estimate, aux = one_pass_hutchinson(
      obj_fn, params, _split_key(sstate.estimator_state)[1], has_aux)
  return (value, grads, estimate, aux) if has_aux else (value, grads, estimate)


def value_grad_and_gnb_estimate(
    logits_fn: Callable[[Any], jax.Array], loss_fn: Callable[[jax.Array], jax.Array],
    params: Any, opt_state: Any,
) -> tuple[jax.Array, Any, Any]:
  r"""Loss, gradient and Sophia-G's estimate :math:`B\,\hat g \odot \hat g` from one
  forward pass (`secondorder.curvature.estimators.value_grad_and_gnb_diag`).

  For the refresh steps of a host-scheduled Sophia-G loop; the sampled labels are those
  `gnb_estimator` would draw at this step (from the key in `opt_state`)::

    loss, grads, h = value_grad_and_gnb_estimate(
        lambda p: model.apply(p, x), lambda z: ce(z, y), params, state)
    updates, state = tx.update(grads, state, params, hessian_diag=h, refresh=True)

  Args:
    logits_fn: `params -> logits` of the current batch.
    loss_fn: `logits -> scalar` training loss (labels closed over).
    params: the parameters.
    opt_state: the state of an optimizer holding one `SophiaClipState` with a built-in
      estimator.
  """
  sstate = _find_sophia_state(opt_state, "value_grad_and_gnb_estimate")
  return value_grad_and_gnb_diag(logits_fn, loss_fn, params,
                                 _split_key(sstate.estimator_state)[1])


def sophia(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.965,
    b2: float = 0.99,
    gamma: float = 0.01,
    eps: float = 1e-12,
    update_interval: int = 10,
    estimator: str | optax.GradientTransformation = "hutchinson",
    weight_decay: float = 1e-4,
    weight_decay_mask: Any = None,
    bias_correction: bool = True,
    seed: int = 0,
    stats_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sophia with decoupled weight decay.

  .. math::
    \theta \leftarrow \theta - \eta\,\lambda\,\theta - \eta\, u_t

  with :math:`u_t` from `sophia_clip` (see it for the rule, the estimators, the relation of
  `gamma` to the official `rho` and the two fixes over `optax.contrib.sophia`).

  Args:
    learning_rate: a float or an optax schedule.
    weight_decay: decoupled weight decay rate :math:`\lambda`, >= 0.
    weight_decay_mask: optional mask (pytree or function of params) of leaves to decay.
    (others): as in `sophia_clip`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from secondorder.transforms.sophia import sophia
    >>> loss = lambda p: jnp.sum(jnp.array([1., 10.]) * p ** 2)
    >>> tx = sophia(1e-2)                     # Sophia-H: update(..., obj_fn=loss)
    >>> params = jnp.array([1., 1.])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params, obj_fn=loss)
    >>> # Sophia-G: sophia(1e-3, gamma=0.05, estimator="gnb"), update(..., logits_fn=...)

  References:
    Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
    Pre-training", ICLR 2024, https://arxiv.org/abs/2305.14342
  """
  check_range("learning_rate", learning_rate, 0.0)
  check_range("weight_decay", weight_decay, 0.0)
  return optax.chain(
      sophia_clip(b1=b1, b2=b2, gamma=gamma, eps=eps, update_interval=update_interval,
                  estimator=estimator, bias_correction=bias_correction, seed=seed,
                  stats_dtype=stats_dtype),
      optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )
