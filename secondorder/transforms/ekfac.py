"""EK-FAC as an optax transform: K-FAC's eigenbasis with the Fisher's own diagonal in it.

`scale_by_ekfac` keeps K-FAC's running Kronecker factors and their eigenbases (refreshed
every `update_interval` steps, as K-FAC's `damping_mode="exact"`), and in that basis a
running average of the per-example gradients' second moments, which the capture measures
when it is handed the bases (`cap(..., bases=ekfac_bases(opt_state))`); `ekfac` is the
assembled optimizer.

A transform of its own rather than a K-FAC option: its state carries a diagonal per layer
that K-FAC has no use for, its capture needs the optimizer's bases (a K-FAC step runs
without them), and its step differs only in the divisor, so it reuses K-FAC's module-level
steps (accumulation, refresh, KL clip, fallback) instead of branching inside them.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from secondorder._validation import (check_float_leaves, check_range, check_state_shapes,
                                     check_tree_structure, require_extra_arg)
from secondorder.capture import KfacLayer, KfacLayers, NoNewStats
from secondorder.transforms import _kfac_stacks
from secondorder.transforms import kfac as kfac_steps
from secondorder.transforms._float32 import in_float32

__all__ = ["ScaleByEkfacState", "scale_by_ekfac", "ekfac", "ekfac_bases"]

_HIGHEST = jax.lax.Precision.HIGHEST


class ScaleByEkfacState(NamedTuple):
  """State of `scale_by_ekfac`.

  Attributes:
    count, factor_weight, a, s, a_eigvals, a_eigvecs, s_eigvals, s_eigvecs, num_refreshes,
      num_skipped, kl_scale, num_clip_skipped, fallback: as `ScaleByKfacState` with
      `damping_mode="exact"`.
    moments: per dense layer the running sum of E = M Σ_n (Q_Aᵀ G_n Q_S)², `[*stack, in (+1),
      out]`, in the current bases.
    moment_weight: its total EMA weight since the last refresh (0 right after one: the
      moments restart in the new bases).
  """
  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
  factor_weight: jax.Array
  a: dict
  s: dict
  a_eigvals: dict
  a_eigvecs: dict
  s_eigvals: dict
  s_eigvecs: dict
  moments: dict
  moment_weight: jax.Array
  num_refreshes: jax.Array
  num_skipped: jax.Array
  kl_scale: jax.Array
  num_clip_skipped: jax.Array
  fallback: optax.OptState


def projected(layer: KfacLayer) -> bool:
  """Whether EK-FAC measures the layer's diagonal (dense layers); the others keep K-FAC's
  eigenvalue products (convolutions, embeddings, tied embeddings) or their exact blocks
  (norm layers)."""
  return layer.kind == "dense"


def ekfac_bases(opt_state) -> dict:
  """`{layer name: (Q_A, Q_S)}`, the eigenbases to hand the capture (`cap(..., bases=)`).

  Args:
    opt_state: the state of `scale_by_ekfac`, or of any chain, `inject_hyperparams` or
      `MultiSteps` around it (the one `ScaleByEkfacState` inside is used).

  Returns:
    The bases of every dense layer.
  """
  found = [x for x in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, ScaleByEkfacState))
      if isinstance(x, ScaleByEkfacState)]
  if len(found) != 1:
    raise ValueError(f"opt_state must hold exactly one ScaleByEkfacState, found {len(found)}.")
  st = found[0]
  return {name: (st.a_eigvecs[name], st.s_eigvecs[name]) for name in st.moments}


def _check_moments(stats: dict, layers) -> None:
  """Every dense layer's `ProjectedLayerStats.e`, shaped `[*stack, in (+1), out]`."""
  for layer in layers:
    if not projected(layer):
      continue
    e = getattr(stats[layer.name], "e", None)
    want = layer.factor_shape(0)[:-2] + (layer.a_dim, layer.s_dim)
    if e is None:
      raise ValueError(
          f"kfac_stats for dense layer {layer.name!r} has no projected moments "
          "(ProjectedLayerStats.e): "
          "run the capture with the optimizer's bases, cap(model, x, y, key=key, "
          "bases=ekfac_bases(opt_state)).")
    if tuple(jnp.shape(e)) != want:
      raise ValueError(f"kfac_stats[{layer.name!r}].e has shape {tuple(jnp.shape(e))}, "
                       f"expected {want}.")


def accumulate_moments(moments: dict, weight, stats: dict, layers, decay, finite, dtype
                       ) -> tuple[dict, jax.Array, jax.Array]:
  """`E ← βE + (1 − β)Ê` for every dense layer, unless the batch's statistics were not
  finite (`finite`, the factors' decision, extended by the moments' own)."""
  for layer in layers:
    if projected(layer):
      finite &= jnp.all(jnp.isfinite(stats[layer.name].e))
  b = jnp.asarray(decay, dtype)
  new = {n: jnp.where(finite, b * moments[n] + (1 - b) * stats[n].e.astype(dtype), moments[n])
         for n in moments}
  return new, jnp.where(finite, b * weight + (1 - b), weight), finite


def precondition_projected(layer: KfacLayer, g: jax.Array, decomp: tuple, moments: dict,
                           moment_weight, lam) -> jax.Array:
  """`Q_A [(Q_Aᵀ G Q_S) / (E + λ)] Q_Sᵀ`, E the bias-corrected moments; K-FAC's `ασᵀ` in
  place of E while no moment was measured in the current bases (`moment_weight` = 0)."""
  a_w, a_v, s_w, s_v = decomp[:4]
  mm = lambda x, y: jnp.matmul(x, y, precision=_HIGHEST)
  t = lambda x: jnp.swapaxes(x, -1, -2)
  qa = kfac_steps.as_stack(a_v[layer.name], layer, 2)
  qs = kfac_steps.as_stack(s_v[layer.name], layer, 2)
  alpha = kfac_steps.as_stack(a_w[layer.name], layer, 1)
  sigma = kfac_steps.as_stack(s_w[layer.name], layer, 1)
  e = moments[layer.name].reshape((layer.num_stacked, layer.a_dim, layer.s_dim))
  measured = moment_weight > 0
  diag = jnp.where(measured, e / jnp.where(measured, moment_weight, 1.0),
                   alpha[:, :, None] * sigma[:, None, :])
  return mm(mm(qa, mm(mm(t(qa), g), qs) / (diag + lam)), t(qs))


def _precondition_layers(layers, leaves, where, decomp, a, weight, moments, moment_weight,
                         lam, dtype):
  """Every covered layer's preconditioned gradient and the KL sum (`kfac_steps.sum_scaled`)."""
  new_leaves = list(leaves)
  terms = []
  for layer in layers:
    g = kfac_steps.layer_gradient(layer, leaves, where, dtype)
    if layer.exact_diagonal:
      v = kfac_steps.precondition_exact_diagonal(layer, g, a[layer.name], weight, lam)
    elif projected(layer):
      v = precondition_projected(layer, g, decomp, moments, moment_weight, lam)
    else:
      v = kfac_steps.precondition(layer, g, decomp, lam, "exact")
    terms.append(kfac_steps.scaled_product(v, g))
    kfac_steps.write_back(layer, v, leaves, new_leaves, where)
  t, log_scale = kfac_steps.sum_scaled(terms)
  return new_leaves, (t.astype(dtype), log_scale.astype(dtype))


def _init_state(params, layers, dtype, fallback, without_covered) -> ScaleByEkfacState:
  k = kfac_steps.init_state(params, layers, "exact", dtype, fallback, without_covered)
  return ScaleByEkfacState(
      count=k.count, factor_weight=k.factor_weight, a=k.a, s=k.s,
      a_eigvals=k.a_eigvals, a_eigvecs=k.a_eigvecs, s_eigvals=k.s_eigvals,
      s_eigvecs=k.s_eigvecs,
      moments={l.name: jnp.zeros(l.factor_shape(0)[:-2] + (l.a_dim, l.s_dim), dtype)
               for l in layers if projected(l)},
      moment_weight=jnp.zeros([], dtype),
      num_refreshes=k.num_refreshes, num_skipped=k.num_skipped, kl_scale=k.kl_scale,
      num_clip_skipped=k.num_clip_skipped, fallback=k.fallback)


def scale_by_ekfac(
    *,
    layers: KfacLayers,
    damping: kfac_steps.ScalarOrSchedule = 1e-3,
    decay: float = 0.95,
    update_interval: int = 10,
    kl_clip: float | None = None,
    learning_rate: kfac_steps.ScalarOrSchedule | None = None,
    fallback: optax.GradientTransformation | None = None,
    fallback_scale: float = 1.0,
    stats_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions each covered layer's gradient in K-FAC's eigenbasis by the Fisher's
  diagonal there (EK-FAC).

  For a dense layer with gradient G (`[in (+1), out]`, as in `scale_by_kfac_factors`)::

    A ← β A + (1 − β) Â,   S ← β S + (1 − β) Ŝ,   every T steps A = Q_A diag(α) Q_Aᵀ, S = Q_S …
    E ← β E + (1 − β) Ê,   Ê = M Σ_n (Q_Aᵀ G_n Q_S)²   (per example n, in the current bases)
    V = Q_A [(Q_Aᵀ G Q_S) / (E + λ)] Q_Sᵀ               (E bias-corrected)
    KL clip as K-FAC's

  Ê comes from the capture, run with this state's bases (`cap(..., bases=ekfac_bases(
  opt_state))`): the projected per-example gradients, never the per-example gradients
  themselves. E restarts at every refresh of the bases (the moments measured in the old
  bases describe another basis); until the next capture in the new bases, the step
  divides by K-FAC's eigenvalue products ασᵀ (so the first step is K-FAC's exact step).
  Convolutions, embeddings and tied embeddings keep K-FAC's products ασᵀ throughout; norm
  layers keep their exact per-feature blocks. The parameters outside the covered layers
  go through `fallback`, as in `scale_by_kfac_factors`.

  Args:
    layers: the covered layers, `cap.layers(model_or_params, x)`.
    damping: λ > 0 added to the diagonal, a float or a schedule of the step.
    decay: β in [0, 1), the EMA decay of the factors and of the moments.
    update_interval: T >= 1, steps between refreshes of the eigenbases.
    kl_clip: κ > 0 to clip the step's KL divergence, or None. Needs `learning_rate`.
    learning_rate: η (float or schedule), used only by KL clipping.
    fallback: diagonal method for the uncovered parameters (default: RMS scaling).
    fallback_scale: ≥ 0, multiplies the fallback's output.
    stats_dtype: dtype of the factors and moments.

  Extra args of `update`: `kfac_stats`, the capture's statistics with `bases=` (or
  `capture.no_new_stats()`: factors and moments keep their running values).

  Example::

    cap = capture.nnx_capture(loss_fn, likelihood="softmax")
    tx = ekfac(0.1, layers=cap.layers(model, x))
    state = tx.init(params)
    loss, grads, stats = cap(model, x, y, key=key, bases=ekfac_bases(state))
    updates, state = tx.update(grads, state, params, kfac_stats=stats)

  References:
    George, Laurent, Bouthillier, Ballas & Vincent, "Fast Approximate Natural Gradient
    Descent in a Kronecker-factored Eigenbasis", NeurIPS 2018.
  """
  layer_list = kfac_steps.layers_tuple(layers)
  stats_dtype = jnp.dtype(stats_dtype)
  check_range("damping", damping, 0.0, None, low_inclusive=False)
  check_range("decay", decay, 0.0, 1.0, high_inclusive=False)
  kfac_steps.check_update_interval(update_interval)
  if kl_clip is not None:
    check_range("kl_clip", kl_clip, 0.0, None, low_inclusive=False)
    if learning_rate is None:
      raise ValueError("kl_clip needs learning_rate= (the rate the step is scaled by "
                       "afterwards), e.g. scale_by_ekfac(layers=..., kl_clip=1e-3, "
                       "learning_rate=0.1).")
  if learning_rate is not None:
    check_range("learning_rate", learning_rate, 0.0, None)
  check_range("fallback_scale", fallback_scale, 0.0, None)
  stacks = _kfac_stacks.plan_stacks(layer_list, None)
  if fallback is None:
    fallback = in_float32(optax.scale_by_rms(decay=0.999, eps=1e-8, eps_in_sqrt=False,
                                              bias_correction=True))
  owned = {l.kernel for l in layer_list} | {l.bias for l in layer_list if l.bias is not None}
  without_covered = functools.partial(kfac_steps.shrink_covered, owned=owned)

  def init_fn(params):
    check_float_leaves("scale_by_ekfac", params)
    kfac_steps.check_layers_in(params, layer_list, "params", require=False)
    return _init_state(params, layer_list, stats_dtype, fallback, without_covered)

  def update_fn(updates, state, params=None, *, kfac_stats=None, **extra_args):
    del extra_args
    check_tree_structure("scale_by_ekfac", updates, params)
    stats = require_extra_arg(
        "scale_by_ekfac", "kfac_stats", kfac_stats,
        "kfac_stats=stats)  # loss, grads, stats = cap(model, x, y, key=key, "
        "bases=ekfac_bases(opt_state))" if layer_list else "kfac_stats=capture.no_stats()")
    where = kfac_steps.check_layers_in(updates, layer_list, "updates")
    check_state_shapes("scale_by_ekfac", init_fn, updates, state)

    moments, m_weight = state.moments, state.moment_weight
    if isinstance(stats, NoNewStats):
      a, s, weight, finite = state.a, state.s, state.factor_weight, jnp.array(True)
    else:
      kfac_steps.check_stats(stats, layer_list)
      _check_moments(stats, layer_list)
      a, s, weight, finite = kfac_steps.accumulate(state, stats, layer_list, decay,
                                                   stats_dtype)
      moments, m_weight, finite = accumulate_moments(moments, m_weight, stats, layer_list,
                                                     decay, finite, stats_dtype)
      # A batch whose moments were not finite is skipped whole (factors as they were).
      a = {n: jnp.where(finite, v, state.a[n]) for n, v in a.items()}
      s = {n: jnp.where(finite, v, state.s[n]) for n, v in s.items()}
      weight = jnp.where(finite, weight, state.factor_weight)
    lam = jnp.asarray(kfac_steps.value_at(damping, state.count), stats_dtype)
    kept = (state.a_eigvals, state.a_eigvecs, state.s_eigvals, state.s_eigvecs, {}, {})
    interval = jnp.maximum(update_interval, 1)
    due = ((state.count % interval) == 0) | (state.num_refreshes == 0)
    do_refresh = due & (weight > 0)
    if layer_list:
      decomp = jax.lax.cond(
          do_refresh,
          lambda: kfac_steps.refresh(state, a, s, weight, lam, layer_list, stacks, "exact",
                                     stats_dtype, None),
          lambda: kept)
    else:
      decomp = kept
    # New bases: the moments measured in the old ones restart.
    moments = {n: jnp.where(do_refresh, jnp.zeros_like(v), v) for n, v in moments.items()}
    m_weight = jnp.where(do_refresh, jnp.zeros_like(m_weight), m_weight)

    leaves, treedef = jax.tree_util.tree_flatten(updates)
    new_leaves, kl_sum = _precondition_layers(layer_list, leaves, where, decomp, a, weight,
                                              moments, m_weight, lam, stats_dtype)
    fb_state = kfac_steps.fall_back(fallback, fallback_scale, without_covered, updates,
                                    state.fallback, params, where, leaves, new_leaves)

    nu, decided = jnp.ones([], stats_dtype), jnp.array(True)
    if kl_clip is not None and layer_list:
      nu, decided = kfac_steps.kl_clip_scale(kl_sum, kl_clip, learning_rate, state.count,
                                             stats_dtype)
      new_leaves = [(x * nu).astype(x.dtype) for x in new_leaves]

    a_w, a_v, s_w, s_v = decomp[:4]
    new_state = ScaleByEkfacState(
        factor_weight=weight, a=a, s=s,
        a_eigvals=a_w, a_eigvecs=a_v, s_eigvals=s_w, s_eigvecs=s_v,
        moments=moments, moment_weight=m_weight, kl_scale=nu.astype(stats_dtype),
        fallback=fb_state, **kfac_steps.step_counters(state, do_refresh, finite, decided))
    return jax.tree_util.tree_unflatten(treedef, new_leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ekfac(
    learning_rate: kfac_steps.ScalarOrSchedule,
    *,
    layers: KfacLayers,
    damping: kfac_steps.ScalarOrSchedule = 1e-2,
    decay: float = 0.95,
    update_interval: int = 5,
    kl_clip: float | None = 1e-2,
    weight_decay: float = 0.0,
    fallback: optax.GradientTransformation | None = None,
    fallback_scale: float | None = None,
    stats_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
  r"""EK-FAC: `optax.chain(scale_by_ekfac(...), optax.add_decayed_weights(weight_decay),
  optax.scale_by_learning_rate(learning_rate))`::

    v = ν Q [(Qᵀ g) / (E + damping)]      (per layer; see scale_by_ekfac)
    θ ← θ − η (v + weight_decay · θ)

  Args:
    learning_rate: η, a float or a schedule (also used by KL clipping).
    layers: `cap.layers(...)` from `secondorder.capture`, or `capture.no_layers()`.
    damping: λ, a float or a schedule.
    decay: EMA decay of the factors and the moments.
    update_interval: steps between refreshes of the eigenbases.
    kl_clip: κ, the KL budget per step (None: no clipping).
    weight_decay: decoupled weight decay.
    fallback: diagonal method for uncovered parameters (default: RMS scaling).
    fallback_scale: the uncovered parameters' step size as a fraction of η (None: K-FAC's
      `DEFAULT_FALLBACK_SCALE`, or 1 when no layer is covered).
    stats_dtype: dtype of the factors and moments.

  References:
    George et al., NeurIPS 2018.
  """
  check_range("weight_decay", weight_decay, 0.0, None)
  if fallback_scale is None:
    fallback_scale = (kfac_steps.DEFAULT_FALLBACK_SCALE if kfac_steps.layers_tuple(layers)
                      else 1.0)
  return optax.chain(
      scale_by_ekfac(layers=layers, damping=damping, decay=decay,
                     update_interval=update_interval, kl_clip=kl_clip,
                     learning_rate=learning_rate, fallback=fallback,
                     fallback_scale=fallback_scale, stats_dtype=stats_dtype),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate))
