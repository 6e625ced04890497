"""Gradient accumulation folded into the optimizer's moments, with no gradient buffer.

Accumulating k mini-batch gradients before one optimizer step is usually done by
`optax.MultiSteps`, which keeps a parameter-sized buffer of summed gradients beside the
inner optimizer's state. For momentum methods the buffer is redundant: the momentum
itself can absorb the k gradients one at a time (Su, 2021; the derivation is on the
documentation's gradient-accumulation page). With
χ_{t/k} = 1 when k divides t and 0 otherwise,

    m_t = [(β − 1) χ_{(t−1)/k} + 1] m_{t−1} + (1 − β) g_t / k,
    θ_t = θ_{t−1} − χ_{t/k} α m_t,

which is "average k gradients, then one momentum step", to the last rounding.

This module holds:
  * `every_k_accumulate`: the primitive (momentum form and Adam form);
  * `every_k_gate`: passes updates only on every k-th step, optionally running a wrapped
    transformation only then (so its step counter, schedules and weight decay count real
    updates);
  * `beta_tilde` and `scale_by_adam_beta_tilde`: the β̃ = 1 − (1 − β)/k approximation;
  * `accumulated_adamw`, `accumulated_sgd`: assembled optimizers.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from secondorder._validation import (check_count, check_float_leaves, check_range,
                                     check_same_structure, check_tree_structure)
from secondorder.transforms._float32 import in_float32

KSchedule = Union[int, Callable[[jax.Array], jax.typing.ArrayLike]]
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


def _check_k(k: Any) -> None:
  """k: a Python integer >= 1, a schedule (callable), or an array (inject_hyperparams: a
  concrete one is checked, a traced one below 1 counts as 1)."""
  check_count("k", k, minimum=1)


def _in_float32(tx: optax.GradientTransformation,
                method: str) -> optax.GradientTransformationExtraArgs:
  """`in_float32(tx)` that checks the params' dtypes at init and the updates' shapes."""
  inner = in_float32(tx)

  def update_fn(updates, state, params=None, **extra_args):
    mu = getattr(state, "mu", None)  # optax.scale_by_adam's state: mu is params-shaped
    if mu is not None:
      check_same_structure("updates", mu, updates, "the state")
    return inner.update(updates, state, params, **extra_args)

  def init_fn(params):
    check_float_leaves(method, params)
    return inner.init(params)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _k_fn(k: KSchedule) -> Callable[[jax.Array], Any]:
  return k if callable(k) else (lambda _: k)


def _cycle(k_fn, mini_step: jax.Array, count: jax.Array):
  """Where this mini-step sits in its accumulation cycle.

  Returns (k, emit, next_mini_step, next_count): k for the current cycle (the schedule is
  read at the number of completed real updates, like `optax.MultiSteps`; values below 1
  count as 1), whether this mini-step closes the cycle, and the counters after it.
  """
  k = jnp.maximum(jnp.asarray(k_fn(count)).astype(jnp.int32), 1)
  emit = mini_step + 1 >= k
  next_mini_step = jnp.where(emit, jnp.zeros_like(mini_step), mini_step + 1)
  next_count = jnp.where(emit, optax.safe_increment(count), count)
  return k, emit, next_mini_step, next_count


def _stat_dtype(leaf: jax.Array, dtype: Any) -> jnp.dtype:
  if dtype is not None:
    return jnp.dtype(dtype)
  return jnp.promote_types(leaf.dtype, jnp.float32)


def _zeros_stats(params: Any, dtype: Any) -> Any:
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _stat_dtype(p, dtype)), params)


def _fold(moments: Any, grads: Any, start: jax.Array, beta: Any, k: jax.Array, order: int,
          ema: bool) -> Any:
  """One mini-step of m ← [(β − 1)·start + 1]·m + c·g^order / k, with c = 1 − β (EMA) or 1."""

  def one(g, m):
    g = g.astype(m.dtype)
    # A Python beta keeps 1 - beta in double precision, as optax's own moments do.
    b = beta if isinstance(beta, numbers.Number) else jnp.asarray(beta, m.dtype)
    decay = jnp.where(start, b, 1).astype(m.dtype)
    weight = ((1 - b) if ema else 1) / k.astype(m.dtype)
    gp = g if order == 1 else g * g
    return (decay * m + weight * gp).astype(m.dtype)

  return jax.tree.map(one, grads, moments)


class EveryKAccumulateState(NamedTuple):
  """State of `every_k_accumulate`: two scalar counters and the moments, nothing else.

  mini_step: mini-steps taken since the last real update (0 ≤ mini_step < k).
  count: real updates so far (t/k in the update rule above; the bias-correction exponent).
  mu: first moment, one array per parameter.
  nu: second moment, one array per parameter (Adam form); `()` in the momentum form.
  """
  mini_step: jax.Array
  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
  mu: optax.Updates
  nu: optax.Updates


def every_k_accumulate(
    k: KSchedule,
    b1: float = 0.9,
    b2: Optional[float] = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    ema: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Accumulates k gradients inside the moments; emits an update every k-th step only.

  Each call is one mini-step t with gradient g_t. The moments absorb g_t / k at once, so
  no gradient buffer is kept; the k − 1 mini-steps between boundaries return zeros and
  every k-th returns the real update (χ_{t/k} = 1 when k divides t, else 0; n = t/k
  counts real updates).

  Momentum form (``b2=None``)::

    m_t = [(β₁ − 1) χ_{(t−1)/k} + 1] m_{t−1} + c g_t / k,    c = 1 − β₁ (ema) or 1,
    u_t = χ_{t/k} m_t.

  With ``ema=True`` this equals ``optax.MultiSteps(optax.ema(b1, debias=False), k)``
  exactly; with ``ema=False`` it equals ``optax.MultiSteps(optax.trace(b1), k)``, the
  momentum of ``optax.sgd``. Nesterov momentum is not offered: its update needs the mean
  gradient of the cycle separately from the momentum, i.e. the buffer this avoids.

  Adam form (``b2`` a float; ``ema`` must stay True)::

    m_t = [(β₁ − 1) χ_{(t−1)/k} + 1] m_{t−1} + (1 − β₁) g_t / k,
    v_t = [(β₂ − 1) χ_{(t−1)/k} + 1] v_{t−1} + (1 − β₂) g_t² / k,
    u_t = χ_{t/k} m̂ / (sqrt(v̂ + eps_root) + eps),   m̂ = m_t / (1 − β₁ⁿ),  v̂ = v_t / (1 − β₂ⁿ).

  m is exact: it equals the first moment of ``optax.MultiSteps(optax.scale_by_adam(...))``.
  v is an approximation: Adam over the averaged gradient ḡ needs ḡ² = (Σ g_i / k)², which
  cannot be built one gradient at a time without keeping the running sum, the buffer this
  transform exists to avoid. The mean of squares Σ g_i² / k stands in for it. The two are
  equal when the k gradients of a cycle are equal (e.g. full-batch gradients, since the
  parameters do not move inside a cycle); otherwise the mean of squares is larger by the
  within-cycle variance of the gradients (Jensen), so v̂ reflects the mini-batch noise
  level, and the step is somewhat smaller than MultiSteps(adam)'s where noise dominates.

  The learning rate, weight decay and sign are applied after this transform; use
  `every_k_gate(k, inner)` around them so that they act once per real update, or take the
  assembled `accumulated_adamw` / `accumulated_sgd`.

  Args:
    k: mini-steps per real update: an int ≥ 1, or a schedule ``n -> k`` of the number n of
      real updates so far, like ``optax.MultiSteps``'s ``every_k_schedule`` (values below
      1 count as 1). Under ``optax.inject_hyperparams`` pass a schedule k with
      ``static_args="k"``; an injected number below 1 is rejected at init (and counts as
      1 if traced).
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment, in [0, 1); ``None`` selects the momentum form.
    eps: added to the root of the second moment (Adam form), ≥ 0.
    eps_root: added to the second moment inside the root (Adam form), ≥ 0.
    ema: momentum form only: True for m ← β m + (1 − β) ḡ, False for m ← β m + ḡ.
    mu_dtype, nu_dtype: dtypes of the moments; default: the params' dtype promoted to at
      least float32 (bfloat16 params keep float32 moments).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; updates come back in the gradients' dtype.

  Example::

    tx = optax.chain(every_k_accumulate(4, b1=0.9, b2=0.999),
                     every_k_gate(4, optax.scale_by_learning_rate(1e-3)))
    # or in one line: tx = accumulated_adamw(1e-3, k=4, weight_decay=1e-4)

  References:
    Su, "Gradient accumulation hidden in momentum", kexue.fm/archives/8634 (2021);
    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
  """
  _check_k(k)
  check_range("b1", b1, 0.0, 1.0, high_inclusive=False)
  if b2 is not None:
    check_range("b2", b2, 0.0, 1.0, high_inclusive=False)
    if not ema:
      raise ValueError("ema=False (the optax.trace momentum) is only available in the momentum "
                       "form; pass b2=None, or keep ema=True for the Adam form.")
  check_range("eps", eps, 0.0)
  check_range("eps_root", eps_root, 0.0)
  k_fn = _k_fn(k)
  adam = b2 is not None

  def init_fn(params):
    # The Adam form's g**2 would drop the imaginary part of a complex gradient.
    check_float_leaves("every_k_accumulate", params, complex_ok=not adam)
    return EveryKAccumulateState(
        mini_step=jnp.zeros([], jnp.int32),
        count=jnp.zeros([], jnp.int32),
        mu=_zeros_stats(params, mu_dtype),
        nu=_zeros_stats(params, nu_dtype) if adam else (),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    # Shapes are static: a broadcastable mismatch is an error, not a free broadcast.
    check_same_structure("updates", state.mu, updates, "the state")
    kk, emit, mini_step, count = _cycle(k_fn, state.mini_step, state.count)
    start = state.mini_step == 0
    mu = _fold(state.mu, updates, start, b1, kk, 1, ema)

    if not adam:
      out = jax.tree.map(lambda g, m: jnp.where(emit, m, 0).astype(g.dtype), updates, mu)
      return out, EveryKAccumulateState(mini_step, count, mu, ())

    nu = _fold(state.nu, updates, start, b2, kk, 2, True)

    def emit_update(mu, nu, count):
      mu_hat = optax.tree.bias_correction(mu, b1, count)
      nu_hat = optax.tree.bias_correction(nu, b2, count)
      return jax.tree.map(
          lambda g, m, v: (m / (jnp.sqrt(v + eps_root) + eps)).astype(g.dtype),
          updates, mu_hat, nu_hat)

    def hold(mu, nu, count):
      del mu, nu, count
      return jax.tree.map(jnp.zeros_like, updates)

    out = jax.lax.cond(emit, emit_update, hold, mu, nu, count)
    return out, EveryKAccumulateState(mini_step, count, mu, nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class EveryKGateState(NamedTuple):
  """State of `every_k_gate`: its counters and the wrapped transformation's state."""
  mini_step: jax.Array
  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
  inner_state: Any


def every_k_gate(
    k: KSchedule,
    inner: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Lets updates through on every k-th step only (the learning rate times χ_{t/k}).

  ::

    u_t = χ_{t/k} · inner(g_t),

  where ``inner`` (identity when omitted) runs only on the steps that pass, so its own
  step counter, learning-rate schedule and weight decay count real updates; on the other
  steps it is skipped (``jax.lax.cond``) and zeros are returned.

  Alone after an optimizer, ``optax.chain(optax.adam(lr), every_k_gate(k))`` is Su's (2021)
  "update the parameters only every k steps" with the moments still updated every
  mini-step. Wrapped around the post-processing of `every_k_accumulate`
  it makes weight decay and schedules act once per real update, as inside
  ``optax.MultiSteps``.

  Args:
    k: an int ≥ 1 or a schedule of the number of real updates so far (as in
      `every_k_accumulate`; give both the same k so that their boundaries agree).
    inner: optional transformation run only on the steps that pass.

  Example::

    tx = optax.chain(every_k_accumulate(4, b2=None),
                     every_k_gate(4, optax.chain(optax.add_decayed_weights(1e-4),
                                                 optax.scale_by_learning_rate(sched))))

  Reference:
    Su, "Gradient accumulation hidden in momentum", kexue.fm/archives/8634 (2021).
  """
  _check_k(k)
  k_fn = _k_fn(k)
  inner_tx = optax.with_extra_args_support(inner) if inner is not None else None

  def init_fn(params):
    return EveryKGateState(
        mini_step=jnp.zeros([], jnp.int32),
        count=jnp.zeros([], jnp.int32),
        inner_state=inner_tx.init(params) if inner_tx is not None else optax.EmptyState(),
    )

  def update_fn(updates, state, params=None, **extra_args):
    check_tree_structure("every_k_gate", updates, params)
    _, emit, mini_step, count = _cycle(k_fn, state.mini_step, state.count)
    if inner_tx is None:
      out = jax.tree.map(lambda u: jnp.where(emit, u, jnp.zeros_like(u)), updates)
      return out, EveryKGateState(mini_step, count, state.inner_state)

    def run(u, s):
      return inner_tx.update(u, s, params, **extra_args)

    out_shape, _ = jax.eval_shape(run, updates, state.inner_state)

    def hold(u, s):
      del u
      return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), out_shape), s

    out, inner_state = jax.lax.cond(emit, run, hold, updates, state.inner_state)
    return out, EveryKGateState(mini_step, count, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def beta_tilde(beta: Any, k: Any) -> Any:
  r"""β̃ = 1 − (1 − β) / k: the decay whose k mini-steps roughly make one step of decay β.

  β̃ᵏ ≈ 1 − k(1 − β̃) = β and β̃^{i} ≈ 1 for i < k, so an EMA with β̃ over mini-steps
  approximates an EMA with β over averages of k gradients (Su, 2021). Accepts
  Python numbers or arrays (k must be fixed, not a schedule).
  """
  if isinstance(beta, numbers.Number):
    check_range("beta", beta, 0.0, 1.0, high_inclusive=False)
  if callable(k):
    raise ValueError("beta_tilde needs a fixed k (an int or an array), got a schedule.")
  _check_k(k)
  return 1 - (1 - beta) / k


def scale_by_adam_beta_tilde(
    k: int,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
  r"""``optax.scale_by_adam`` with β₁, β₂ replaced by β̃ = 1 − (1 − β)/k.

  Su's (2021) cheap stand-in for accumulation::

    m_t = β̃₁ m_{t−1} + (1 − β̃₁) g_t,   v_t = β̃₂ v_{t−1} + (1 − β̃₂) g_t²,
    u_t = m̂_t / (sqrt(v̂_t + eps_root) + eps)   (bias correction in mini-steps t),

  updating every mini-step. Follow it with `every_k_gate(k)` for the full variant (β̃ and
  updates every k steps); without the gate it only lengthens the moments' memory.

  Args:
    k: a fixed int ≥ 1.
    b1, b2, eps, eps_root, mu_dtype: as in ``optax.scale_by_adam``.

  Example::

    tx = optax.chain(scale_by_adam_beta_tilde(4), every_k_gate(4),
                     optax.scale_by_learning_rate(1e-3))

  Reference:
    Su, "Gradient accumulation hidden in momentum", kexue.fm/archives/8634 (2021).
  """
  check_range("b1", b1, 0.0, 1.0, high_inclusive=False)
  check_range("b2", b2, 0.0, 1.0, high_inclusive=False)
  # Moments in float32 at least (g**2 overflows float16 for |g| > 256).
  return _in_float32(
      optax.scale_by_adam(beta_tilde(b1, k), beta_tilde(b2, k), eps, eps_root, mu_dtype),
      "scale_by_adam_beta_tilde")


def accumulated_adamw(
    learning_rate: ScalarOrSchedule,
    k: KSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 1e-4,
    mask: Any = None,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW over k accumulated mini-steps, keeping only Adam's state (no gradient buffer).

  ::

    u = χ_{t/k} · −α_n (m̂ / (sqrt(v̂ + eps_root) + eps) + λ θ),

  with m, v, m̂, v̂ as in `every_k_accumulate` (Adam form) and n the number of real
  updates: the schedule α_n and the decoupled weight decay λθ act once per real update,
  as in ``optax.MultiSteps(optax.adamw(...), k)``. The trajectory equals that of
  MultiSteps(adamw) whenever the k gradients of each cycle are equal (full-batch
  training); with mini-batch noise v uses the mean of squares in place of the square of
  the mean, the approximation explained in `every_k_accumulate`.

  Args:
    learning_rate: a float or a schedule of the number of real updates.
    k: an int ≥ 1 or a schedule (see `every_k_accumulate`).
    b1, b2, eps, eps_root, weight_decay, mask: as in ``optax.adamw``.
    mu_dtype, nu_dtype: dtypes of the moments (default: at least float32).

  Example::

    tx = accumulated_adamw(optax.cosine_decay_schedule(1e-3, 1000), k=8, weight_decay=1e-2)

  References:
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019;
    Su, "Gradient accumulation hidden in momentum", kexue.fm/archives/8634 (2021).
  """
  check_range("learning_rate", learning_rate, 0.0)
  check_range("weight_decay", weight_decay, 0.0)
  return optax.chain(
      every_k_accumulate(k, b1, b2, eps, eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
      every_k_gate(k, optax.chain(optax.add_decayed_weights(weight_decay, mask),
                                  optax.scale_by_learning_rate(learning_rate))),
  )


def accumulated_sgd(
    learning_rate: ScalarOrSchedule,
    k: KSchedule,
    momentum: Optional[float] = 0.9,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    ema: bool = False,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SGD with momentum over k accumulated mini-steps, with no gradient buffer.

  ::

    m_t = [(β − 1) χ_{(t−1)/k} + 1] m_{t−1} + c g_t / k,   c = 1 (default) or 1 − β (ema),
    u_t = χ_{t/k} · −α_n (m_t + λ θ).

  Exactly ``optax.MultiSteps(optax.chain(optax.trace(momentum), optax.add_decayed_weights(
  weight_decay, mask), optax.scale_by_learning_rate(learning_rate)), k)``; with
  ``weight_decay=0`` that is ``optax.MultiSteps(optax.sgd(learning_rate, momentum), k)``.
  The schedule α_n and the decoupled weight decay count real updates n. For coupled (L2)
  decay, put ``optax.add_decayed_weights`` in front instead: the parameters do not move
  inside a cycle, so it is also exact.

  Args:
    learning_rate: a float or a schedule of the number of real updates.
    k: an int ≥ 1 or a schedule (see `every_k_accumulate`).
    momentum: β in [0, 1); ``None`` or 0 for plain averaged SGD.
    weight_decay: decoupled weight decay λ ≥ 0, applied once per real update.
    mask: as in ``optax.add_decayed_weights``.
    ema: use m ← β m + (1 − β) ḡ instead of optax.sgd's m ← β m + ḡ.
    mu_dtype: dtype of the momentum (default: at least float32).

  Example::

    tx = accumulated_sgd(0.1, k=4, momentum=0.9, weight_decay=5e-4)

  Reference:
    Su, "Gradient accumulation hidden in momentum", kexue.fm/archives/8634 (2021).
  """
  check_range("learning_rate", learning_rate, 0.0)
  check_range("weight_decay", weight_decay, 0.0)
  return optax.chain(
      every_k_accumulate(k, 0.0 if momentum is None else momentum, None, ema=ema,
                         mu_dtype=mu_dtype),
      every_k_gate(k, optax.chain(optax.add_decayed_weights(weight_decay, mask),
                                  optax.scale_by_learning_rate(learning_rate))),
  )
