"""K-FAC as an optax transform: Kronecker-factored natural-gradient preconditioning.

`scale_by_kfac_factors` keeps, for every covered layer (dense or convolution), running
estimates of the two Kronecker factors of its Fisher block and preconditions the layer's
gradient with them; `kfac` is the assembled optimizer. The per-batch factor contributions
come from `secondorder.capture` through the `kfac_stats` extra argument.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from secondorder._validation import (check_choice, check_float_leaves, check_int,
                                     check_range, check_state_shapes, check_tree_structure,
                                     require_extra_arg)
from secondorder.capture import KfacLayer, KfacLayers, NoNewStats, param_path
from secondorder.transforms import _kfac_stacks
from secondorder.transforms._float32 import in_float32

__all__ = ["ScaleByKfacState", "scale_by_kfac_factors", "kfac", "DEFAULT_FALLBACK_SCALE"]

_HIGHEST = jax.lax.Precision.HIGHEST
# The `kfac` alias's step size of the uncovered parameters, as a fraction of its learning
# rate (see `kfac`'s `fallback_scale`).
DEFAULT_FALLBACK_SCALE = 0.01
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


class ScaleByKfacState(NamedTuple):
  """State of `scale_by_kfac_factors`.

  Attributes:
    count: number of `update` calls.
    factor_weight: total EMA weight Σ(1 − β)βᵏ of the accepted statistics; the factors used
      are `a / factor_weight`, `s / factor_weight` (bias-corrected running averages).
    a, s: per layer (keyed by layer name) the running sums of Â and Ŝ.
    a_eigvals, a_eigvecs, s_eigvals, s_eigvecs: damping_mode="exact": per layer the
      eigendecompositions of the factors at the last refresh (empty dicts otherwise).
    a_inverse, s_inverse: damping_mode="factored": per layer the damped inverses
      (A + π√λ I)⁻¹ and (S + √λ/π I)⁻¹ at the last refresh (empty dicts otherwise).
    num_refreshes: number of eigendecomposition refreshes done.
    num_skipped: number of steps whose statistics were non-finite and were not accumulated.
    kl_scale: the KL-clipping scale ν of the last step (1 when not clipped, 0 when skipped).
    num_clip_skipped: number of steps whose KL-clip decision was not finite (a NaN or Inf in
      a gradient or preconditioned gradient of a covered layer): the step was scaled by
      ν = 0 (its NaN entries stay NaN, the others are zero).
    fallback: state of the diagonal method for the uncovered parameters.
  """
  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
  factor_weight: jax.Array
  a: dict
  s: dict
  a_eigvals: dict
  a_eigvecs: dict
  s_eigvals: dict
  s_eigvecs: dict
  a_inverse: dict
  s_inverse: dict
  num_refreshes: jax.Array
  num_skipped: jax.Array
  kl_scale: jax.Array
  num_clip_skipped: jax.Array
  fallback: optax.OptState


def value_at(v: ScalarOrSchedule, count: jax.Array) -> jax.Array | float:
  return v(count) if callable(v) else v


def layers_tuple(layers) -> tuple[KfacLayer, ...]:
  if isinstance(layers, KfacLayers):
    return layers.layers
  if isinstance(layers, (tuple, list)) and all(isinstance(l, KfacLayer) for l in layers):
    return tuple(layers)
  raise ValueError(
      "layers must be the KfacLayers of the model (capture.linen_capture(...).layers(params, x) "
      "or capture.nnx_capture(...).layers(model, x)), or capture.no_layers() for a pytree "
      f"with no covered layer; got {type(layers).__name__}.")


def _leaf_index(tree) -> dict[tuple[str, ...], int]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {param_path(p): i for i, (p, _) in enumerate(leaves)}


def check_layers_in(tree, layers: tuple[KfacLayer, ...], what: str,
                     require: bool = True) -> dict:
  """Leaf indices of each layer's kernel and bias, raising when one is absent or misshapen.

  With `require=False` (init) an absent leaf is let through: `optax.tree.map_params` calls
  init with a placeholder in place of the params; `update` then checks every layer.
  """
  index = _leaf_index(tree)
  leaves = jax.tree_util.tree_leaves(tree)
  known = ", ".join("/".join(p) for p in list(index)[:8]) + (", ..." if len(index) > 8 else "")
  out = {}
  for layer in layers:
    for role, path, shape in (("kernel", layer.kernel, layer.kernel_shape),
                              ("bias", layer.bias, layer.bias_shape)):
      if path is None:
        continue
      if path not in index:
        if not require:
          continue
        raise ValueError(
            f"K-FAC layer {layer.name!r}: its {role} {'/'.join(path)} is not in the {what} "
            f"(which has {known}). Build the transform from the same params tree that the "
            "optimizer updates.")
      got = tuple(jnp.shape(leaves[index[path]]))
      if got != tuple(shape):
        raise ValueError(
            f"K-FAC layer {layer.name!r}: {role} {'/'.join(path)} has shape {got} in the {what}, "
            f"expected {tuple(shape)}.")
    if require:
      out[layer.name] = (index[layer.kernel], None if layer.bias is None else index[layer.bias])
  return out


def check_stats(stats, layers: tuple[KfacLayer, ...]) -> None:
  if not isinstance(stats, dict):
    raise ValueError(
        "kfac_stats must be the dict of LayerStats returned by a secondorder.capture call "
        f"(or capture.no_stats()), got {type(stats).__name__}.")
  names = {l.name for l in layers}
  extra = sorted(set(stats) - names)
  if extra:
    raise ValueError(
        f"kfac_stats has statistics for layers {extra} that the transform was not built with "
        f"(it covers {sorted(names)}); build it with layers=cap.layers(...) of the same model.")
  for layer in layers:
    if layer.name not in stats:
      raise ValueError(
          f"kfac_stats is missing K-FAC layer {layer.name!r} (kernel {'/'.join(layer.kernel)}, "
          f"shape {layer.kernel_shape}); it has {sorted(stats)}.")
    st = stats[layer.name]
    want_a, want_s = layer.stat_shapes()
    got_a = tuple(jnp.shape(st[0]))
    got_s = None if st[1] is None else tuple(jnp.shape(st[1]))
    if got_a != want_a or got_s != want_s:
      raise ValueError(
          f"kfac_stats for layer {layer.name!r} (kernel {'/'.join(layer.kernel)}, shape "
          f"{layer.kernel_shape}) have shapes A {got_a}, S {got_s}; expected A {want_a}, "
          f"S {want_s}.")


# ----------------------------------------------------------------------------- steps of update


def as_stack(x: jax.Array, layer: KfacLayer, side: int) -> jax.Array:
  """A layer's factor (or eigendecomposition part) with its stack axis, `[L, ...]`."""
  return x.reshape((layer.num_stacked,) + x.shape[x.ndim - side:])


def accumulate(state: ScaleByKfacState, stats: dict, layers: tuple[KfacLayer, ...], decay,
                dtype) -> tuple[dict, dict, jax.Array, jax.Array]:
  """Running factors: `A ← βA + (1 − β)Â`, likewise S, unless a statistic is not finite.

  Returns:
    `(a, s, factor_weight, finite)`: the running sums, their total EMA weight, and whether
    this batch's statistics were accepted.
  """
  finite = jnp.array(True)
  for layer in layers:
    for st in stats[layer.name]:
      if st is not None:
        finite &= jnp.all(jnp.isfinite(st))
  b = jnp.asarray(decay, dtype)
  ema = lambda old, new: jnp.where(finite, b * old + (1 - b) * new.astype(dtype), old)
  a = {l.name: ema(state.a[l.name], stats[l.name][0]) for l in layers}
  s = {l.name: ema(state.s[l.name], stats[l.name][1]) for l in layers
       if not l.exact_diagonal}
  weight = jnp.where(finite, b * state.factor_weight + (1 - b), state.factor_weight)
  return a, s, weight, finite


def _factor_members(a: dict, s: dict, weight: jax.Array, layers) -> dict:
  """`{(name, 0 for A / 1 for S, i): bias-corrected factor [d, d]}` over every stack index
  (full-matrix factors only: `KfacLayer.matrix_factors`)."""
  out = {}
  for layer in layers:
    for role, f, side in ((0, a, 2), (1, s, 2)):
      if role not in layer.matrix_factors:
        continue
      mats = as_stack(f[layer.name], layer, side) / weight
      for i in range(layer.num_stacked):
        out[(layer.name, role, i)] = mats[i]
  return out


def _pi_damping(mats: dict, diagonals: dict, lam: jax.Array, layers) -> dict:
  """Factored Tikhonov damping: `π√λ` for A and `√λ/π` for S, π² = (tr A/dim A)/(tr S/dim S).

  `diagonals` holds the diagonal A factors (`{(name, 0, i): vector}`) of embeddings.
  """
  out = {}
  for layer in layers:
    if layer.exact_diagonal:
      continue
    for i in range(layer.num_stacked):
      sm = mats[(layer.name, 1, i)]
      ta = (jnp.mean(diagonals[(layer.name, 0, i)]) if layer.a_diagonal
            else jnp.trace(mats[(layer.name, 0, i)]) / layer.a_dim)
      ts = jnp.trace(sm) / sm.shape[0]
      pi = jnp.where((ta > 0) & (ts > 0), jnp.sqrt(ta / jnp.where(ts > 0, ts, 1.0)), 1.0)
      sl = jnp.sqrt(lam)
      out[(layer.name, 0, i)], out[(layer.name, 1, i)] = pi * sl, sl / pi
  return out


def _restack(per_member: dict, layer: KfacLayer, role: int, like: jax.Array) -> jax.Array:
  """The members of one layer's factor back in the state's layout (`like`'s shape)."""
  return jnp.stack([per_member[(layer.name, role, i)]
                    for i in range(layer.num_stacked)]).reshape(like.shape)


def refresh(state: ScaleByKfacState, a: dict, s: dict, weight, lam, layers, stacks,
             damping_mode: str, dtype, sharding) -> tuple[dict, ...]:
  """New eigendecompositions (exact) or damped inverses (factored) of every factor.

  Returns:
    `(a_eigvals, a_eigvecs, s_eigvals, s_eigvecs, a_inverse, s_inverse)` in the state's
    layout; an inverse whose Cholesky failed keeps its previous value.
  """
  mats = _factor_members(a, s, weight, layers)
  diag = {(l.name, 0, i): v for l in layers if l.a_diagonal
          for i, v in enumerate(as_stack(a[l.name], l, 1) / weight)}
  out: tuple[dict[Any, Any], ...] = ({}, {}, {}, {}, {}, {})
  if damping_mode == "exact":
    dec = _kfac_stacks.eigh_stacks(mats, stacks, dtype, sharding)
    dec.update({k: (jnp.maximum(v, 0.0), None) for k, v in diag.items()})
    vals = {k: v[0] for k, v in dec.items()}
    vecs = {k: v[1] for k, v in dec.items()}
    for layer in layers:
      if layer.exact_diagonal:
        continue
      for role, j, old_vals, old_vecs in ((0, 0, state.a_eigvals, state.a_eigvecs),
                                          (1, 2, state.s_eigvals, state.s_eigvecs)):
        out[j][layer.name] = _restack(vals, layer, role, old_vals[layer.name])
        if role in layer.matrix_factors:
          out[j + 1][layer.name] = _restack(vecs, layer, role, old_vecs[layer.name])
    return out
  damp = _pi_damping(mats, diag, lam, layers)
  inv = _kfac_stacks.inverse_stacks(mats, damp, stacks, dtype, sharding)
  inv.update({k: 1.0 / (v + damp[k]) for k, v in diag.items()})
  for layer in layers:
    if layer.exact_diagonal:
      continue
    for role, j, old in ((0, 4, state.a_inverse), (1, 5, state.s_inverse)):
      new = _restack(inv, layer, role, old[layer.name])
      out[j][layer.name] = jnp.where(jnp.all(jnp.isfinite(new)), new, old[layer.name])
  return out


def layer_gradient(layer: KfacLayer, leaves: list, where: dict, dtype) -> jax.Array:
  """The layer's gradient as `[L, in (+1), out]`: kernel matrices with the bias as last row."""
  ki, bi = where[layer.name]
  g = layer.axes.to_matrices(leaves[ki]).astype(dtype)
  if bi is not None:
    bias = leaves[bi].reshape(layer.num_stacked, 1, layer.s_dim).astype(dtype)
    g = jnp.concatenate([g, bias], axis=1)
  return g


def write_back(layer: KfacLayer, v: jax.Array, leaves: list, new_leaves: list,
                where: dict) -> None:
  """Puts the preconditioned `[L, in (+1), out]` back into the kernel's (and bias's) leaves."""
  ki, bi = where[layer.name]
  if bi is not None:
    new_leaves[bi] = v[:, -1].reshape(leaves[bi].shape).astype(leaves[bi].dtype)
    v = v[:, :-1]
  new_leaves[ki] = layer.axes.from_matrices(v).astype(leaves[ki].dtype)


def precondition(layer: KfacLayer, g: jax.Array, decomp: tuple[dict, ...], lam,
                  damping_mode: str) -> jax.Array:
  """`(A + π√λ)⁻¹ G (S + √λ/π)⁻¹` (factored) or `Q_A[(Q_Aᵀ G Q_S)/(ασᵀ + λ)]Q_Sᵀ` (exact).

  A diagonal A (an embedding's) is its own eigenbasis: `Q_A = I`, its inverse a vector.
  """
  a_w, a_v, s_w, s_v, a_inv, s_inv = decomp
  mm = lambda x, y: jnp.matmul(x, y, precision=_HIGHEST)
  t = lambda x: jnp.swapaxes(x, -1, -2)
  if damping_mode == "factored":
    if layer.a_diagonal:
      left = as_stack(a_inv[layer.name], layer, 1)[:, :, None] * g
    else:
      left = mm(as_stack(a_inv[layer.name], layer, 2), g)
    return mm(left, as_stack(s_inv[layer.name], layer, 2))
  qs = as_stack(s_v[layer.name], layer, 2)
  alpha, sigma = as_stack(a_w[layer.name], layer, 1), as_stack(s_w[layer.name], layer, 1)
  denom = alpha[:, :, None] * sigma[:, None, :] + lam
  if layer.a_diagonal:
    return mm(mm(g, qs) / denom, t(qs))
  qa = as_stack(a_v[layer.name], layer, 2)
  return mm(mm(qa, mm(mm(t(qa), g), qs) / denom), t(qs))


def precondition_exact_diagonal(layer: KfacLayer, g: jax.Array, blocks: jax.Array,
                                 weight: jax.Array, lam) -> jax.Array:
  """A norm layer's `(F_j + λI)⁻¹ g_j` per feature j, from the running exact blocks.

  Args:
    layer: the norm layer.
    g: its gradient `[L, k, features]` (scale row, then shift row).
    blocks: the running sums of its blocks, `[*stack, features, k, k]`.
    weight: their total EMA weight (the gradient passes unchanged while it is 0).
    lam: λ.

  Returns:
    The preconditioned `[L, k, features]`.
  """
  k = layer.a_dim
  f = blocks.reshape((layer.num_stacked, layer.s_dim, k, k)) / jnp.where(weight > 0, weight, 1)
  f = f + lam * jnp.eye(k, dtype=f.dtype)
  v = jnp.linalg.solve(f, jnp.swapaxes(g, 1, 2)[..., None])[..., 0]
  return jnp.where(weight > 0, jnp.swapaxes(v, 1, 2), g)


def scaled_product(v: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """⟨v, g⟩ as `(t, log_scale)` with ⟨v, g⟩ = t·exp(log_scale), |t| <= v.size.

  v and g are divided by their largest |entry| before the sum, so that a product of entries
  around 1e19-1e20 (float32: v·g overflows) is still represented; a NaN or Inf entry gives
  a non-finite t.
  """
  mv, mg = jnp.max(jnp.abs(v), initial=0.0), jnp.max(jnp.abs(g), initial=0.0)
  usable = lambda m: (m > 0) & jnp.isfinite(m)
  sv, sg = (jnp.where(usable(m), m, jnp.ones_like(m)) for m in (mv, mg))
  t = jnp.sum((v / sv) * (g / sg))
  return t, jnp.log(sv) + jnp.log(sg)


def sum_scaled(terms: list) -> tuple[jax.Array, jax.Array]:
  """Σ tᵢ·exp(sᵢ) as `(T, S)` with the sum = T·exp(S), S the largest sᵢ."""
  if not terms:
    return jnp.zeros([]), jnp.zeros([])
  top = functools.reduce(jnp.maximum, [s for _, s in terms])
  return sum(t * jnp.exp(s - top) for t, s in terms), top


def _precondition_layers(layers, leaves: list, where: dict, decomp: tuple, a: dict, weight,
                         lam, damping_mode: str, dtype) -> tuple[list, tuple]:
  """Every covered layer's preconditioned gradient, and the KL sum `Σ_layers ⟨V, G⟩`.

  Returns:
    `(new_leaves, (t, log_scale))`: the gradient's leaves with every covered kernel and bias
    replaced by its preconditioned value (the others unchanged), and the KL sum as
    t·exp(log_scale) (`sum_scaled`), so that its overflow cannot decide the clip.
  """
  new_leaves = list(leaves)
  terms = []
  for layer in layers:
    g = layer_gradient(layer, leaves, where, dtype)
    if layer.exact_diagonal:
      v = precondition_exact_diagonal(layer, g, a[layer.name], weight, lam)
    else:
      v = precondition(layer, g, decomp, lam, damping_mode)
    terms.append(scaled_product(v, g))
    write_back(layer, v, leaves, new_leaves, where)
  t, log_scale = sum_scaled(terms)
  return new_leaves, (t.astype(dtype), log_scale.astype(dtype))


def fall_back(fallback, fallback_scale, without_covered, updates, fallback_state, params,
               where: dict, leaves: list, new_leaves: list) -> optax.OptState:
  """The fallback's step, times `fallback_scale`, for every parameter outside the blocks.

  Writes those leaves of `new_leaves` in place and returns the fallback's new state.
  """
  fb_updates, fb_state = fallback.update(without_covered(updates), fallback_state,
                                         without_covered(params))
  covered_idx = {i for pair in where.values() for i in pair if i is not None}
  for i, x in enumerate(jax.tree_util.tree_leaves(fb_updates)):
    if i not in covered_idx:
      new_leaves[i] = (x * jnp.asarray(fallback_scale, x.dtype)).astype(leaves[i].dtype)
  return fb_state


def kl_clip_scale(kl_sum, kl_clip, learning_rate, count, dtype) -> tuple[jax.Array, jax.Array]:
  """ν = min(1, sqrt(κ / (η² Σ⟨V, G⟩))), decided in logarithms, and whether it is finite.

  `kl_sum` = (t, s) stands for t·exp(s) (`_precondition_layers`): the clip binds when
  log(η²t) + s > log κ, and then ν = exp(½(log κ − log(η²t) − s)), so that a sum beyond the
  dtype's range still gives the right ν. A non-finite t or s (a NaN or Inf entry) is no
  decision: ν = 0 and `finite` is False (never NaN read as "not above κ").
  """
  t, s = kl_sum
  eta = jnp.asarray(value_at(learning_rate, count), dtype)
  finite = jnp.isfinite(t) & jnp.isfinite(s)
  positive = (t > 0) & (eta != 0)
  log_denom = (2.0 * jnp.log(jnp.where(positive, jnp.abs(eta), 1.0))
               + jnp.log(jnp.where(positive, t, 1.0)) + s)
  log_kappa = jnp.log(jnp.asarray(kl_clip, dtype))
  binds = positive & (log_denom > log_kappa)
  nu = jnp.where(binds, jnp.exp(0.5 * (log_kappa - jnp.where(binds, log_denom, log_kappa))),
                 1.0)
  return jnp.where(finite, nu, 0.0).astype(dtype), finite


def step_counters(state, do_refresh, finite, decided) -> dict:
  """The state's saturating counters after a step (`optax.safe_increment`, as for `count`):
  the step, the refreshes, the statistics skipped as non-finite and the KL clips skipped as
  undecidable."""
  return dict(
      count=optax.safe_increment(state.count),
      num_refreshes=jnp.where(do_refresh, optax.safe_increment(state.num_refreshes),
                              state.num_refreshes),
      num_skipped=jnp.where(finite, state.num_skipped, optax.safe_increment(state.num_skipped)),
      num_clip_skipped=jnp.where(decided, state.num_clip_skipped,
                                 optax.safe_increment(state.num_clip_skipped)))


def check_update_interval(update_interval) -> None:
  """T >= 1: a Python int, or a concrete array (what `optax.inject_hyperparams` passes at
  init, so an injected 0 is an error there). A traced T (update under `jit`) is clamped to
  >= 1 in `update`."""
  if isinstance(update_interval, (jax.Array, np.ndarray)):
    try:
      value = int(update_interval)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError,
            TypeError):
      return
    if value < 1 or value != update_interval:
      raise ValueError(f"update_interval must be an integer >= 1, got {update_interval!r} "
                       "(an injected hyperparameter is checked when the state is built).")
    return
  check_int("update_interval", update_interval, minimum=1)


def init_state(params, layers, damping_mode, dtype, fallback, without_covered):
  """Zero factors, identity inverses / eigenvectors, and the fallback's state."""
  eye = lambda l, d: jnp.broadcast_to(jnp.eye(d, dtype=dtype), l.factor_shape(d))
  vals = lambda l, d: jnp.zeros(l.factor_shape(d)[:-1], dtype)
  # The A-side inverse: a matrix, or for a diagonal A a vector of ones.
  a_eye = lambda l: jnp.ones(l.stat_shapes()[0], dtype) if l.a_diagonal else eye(l, l.a_dim)
  kron = tuple(l for l in layers if not l.exact_diagonal)
  exact = kron if damping_mode == "exact" else ()
  factored = kron if damping_mode == "factored" else ()
  return ScaleByKfacState(
      count=jnp.zeros([], jnp.int32),
      factor_weight=jnp.zeros([], dtype),
      a={l.name: jnp.zeros(l.stat_shapes()[0], dtype) for l in layers},
      s={l.name: jnp.zeros(l.stat_shapes()[1], dtype) for l in kron},
      a_eigvals={l.name: vals(l, l.a_dim) for l in exact},
      a_eigvecs={l.name: eye(l, l.a_dim) for l in exact if not l.a_diagonal},
      s_eigvals={l.name: vals(l, l.s_dim) for l in exact},
      s_eigvecs={l.name: eye(l, l.s_dim) for l in exact},
      a_inverse={l.name: a_eye(l) for l in factored},
      s_inverse={l.name: eye(l, l.s_dim) for l in factored},
      num_refreshes=jnp.zeros([], jnp.int32),
      num_skipped=jnp.zeros([], jnp.int32),
      kl_scale=jnp.ones([], dtype),
      num_clip_skipped=jnp.zeros([], jnp.int32),
      fallback=fallback.init(without_covered(params)))


def shrink_covered(tree, owned: set):
  """The tree with each covered leaf shrunk to a one-entry placeholder (for the fallback).

  The fallback's state keeps the params' structure (`optax.tree.map_params`) at no memory
  cost. Not zero entries: orbax refuses to save zero-size arrays.
  """
  if tree is None:
    return None
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros((1,), x.dtype) if param_path(p) in owned else x, tree)


def scale_by_kfac_factors(
    *,
    layers: KfacLayers,
    damping: ScalarOrSchedule = 1e-3,
    damping_mode: str = "factored",
    decay: float = 0.95,
    update_interval: int = 10,
    kl_clip: float | None = None,
    learning_rate: ScalarOrSchedule | None = None,
    fallback: optax.GradientTransformation | None = None,
    fallback_scale: float = 1.0,
    stats_dtype: Any = "float32",
    pad_ratio: float | None = None,
    factor_sharding: jax.sharding.NamedSharding | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions each covered layer's gradient by its damped Kronecker-factored Fisher.

  For a layer with gradient G (the kernel flattened to `[in, out]`, the bias appended as a
  last row) and factors A ([in+1, in+1]) and S ([out, out])::

    A ← β A + (1 − β) Â,   S ← β S + (1 − β) Ŝ          (bias-corrected; non-finite Â, Ŝ skipped)
    factored: V = (A + π√λ I)⁻¹ G (S + √λ/π I)⁻¹,  π = sqrt((tr A / dim A) / (tr S / dim S))
    exact:    A = Q_A diag(α) Q_Aᵀ, S = Q_S diag(σ) Q_Sᵀ,  V = Q_A [(Q_Aᵀ G Q_S) / (α σᵀ + λ)] Q_Sᵀ
    KL clip:  ν = min(1, sqrt(κ / (η² Σ_layers ⟨V, G⟩))),  every update scaled by ν

  The damped inverses (Cholesky; factored) or the eigendecompositions (exact) are
  recomputed every `update_interval` steps under `lax.cond`, so the other steps cost two
  (factored) or four (exact) small matmuls per layer. By default each factor is decomposed
  in its own call. With `pad_ratio` or `factor_sharding` the refresh stacks the factors of
  all layers by size (every A and S of one size, or within `pad_ratio` of it, padded with a
  decoupled diagonal block) and decomposes each stack in one batched call; with
  `factor_sharding` each stack is split over devices along its stack axis, so on a mesh
  every device decomposes its share of the factors instead of all of them (on CPU, stacks
  of side 32 or more are decomposed one factor at a time: `secondorder.linalg`). A damping
  schedule is read at every step in exact mode and at the refresh steps in factored mode.
  Convolutions use the KFC approximation (see `secondorder.capture`). Parameters outside
  the covered layers go through `fallback` (default: RMS scaling with bias correction,
  `optax.scale_by_rms(0.999, 1e-8, eps_in_sqrt=False, bias_correction=True)` with its second
  moment in float32 at least), scaled by `fallback_scale`, and are left out of the KL sum.

  Besides the Kronecker pairs of dense and convolution layers, two kinds of block come from
  the capture: an embedding's A is diagonal (token frequencies, a vector: its inverse and
  eigenvalues are vectors, its eigenbasis the identity), and a norm layer's scale and shift
  have the exact per-feature Fisher `F_j` (`[features, 2, 2]`), applied every step as
  `(F_j + λI)⁻¹ g_j` from the running average (no refresh needed) and counted in the KL sum.

  Args:
    layers: the covered layers, `cap.layers(model_or_params, x)` from `secondorder.capture`,
      or `capture.no_layers()` when no layer is covered (every parameter on the fallback).
    damping: λ > 0, a float or a schedule of the step.
    damping_mode: "factored" (π-split Tikhonov damping) or "exact" (λ added to the
      eigenvalues of A ⊗ S).
    decay: β in [0, 1), the EMA decay of the factors.
    update_interval: T >= 1, inverses / eigendecompositions are refreshed every T steps
      (an injected T is checked when the state is built; a traced T below 1 is read as 1).
    kl_clip: κ > 0 to clip the step's KL divergence, or None. Needs `learning_rate`.
    learning_rate: η (float or schedule), the rate the step is later scaled by; used only
      by KL clipping.
    fallback: diagonal method for the uncovered parameters.
    fallback_scale: ≥ 0, multiplies the fallback's output: the uncovered parameters' step
      size relative to the covered layers' (1: the same learning rate).
    stats_dtype: dtype of the factors (a name such as "float32", or a dtype).
    pad_ratio: None (every factor alone, or with `factor_sharding` equal sizes stacked) or
      a number ≥ 1: factors whose size is within this ratio of the largest in a stack are
      padded to its size and decomposed with it (1: equal sizes only). Padding a factor of
      size d to D costs (D/d)³ of its own decomposition, and merges stacks: use it with
      `factor_sharding`, where fewer, taller stacks spread better. It fixes the program's
      structure, so under `optax.inject_hyperparams` name it in `static_args`.
    factor_sharding: None, or a `NamedSharding` whose spec names mesh axes for the stack
      axis only (e.g. `NamedSharding(mesh, P(("data", "model")))`): every stack of two or
      more factors is padded to a multiple of those axes' size and sharded along them for
      the refresh. The decomposed factors are gathered back afterwards; the state keeps
      its layout. The path to large models under data parallelism.

  Extra args of `update`: `kfac_stats`, the dict of `LayerStats` from a capture call (or
  `capture.no_stats()` without covered layers, or `capture.no_new_stats()` on a step that
  ran no capture: the factors then keep their running values).

  Example::

    cap = capture.nnx_capture(loss_fn, likelihood="softmax")
    tx = optax.chain(scale_by_kfac_factors(layers=cap.layers(model, x), damping=1e-3),
                     optax.trace(0.9), optax.scale_by_learning_rate(0.1))
    loss, grads, stats = cap(model, x, y, key=key)
    updates, state = tx.update(grads, state, params, kfac_stats=stats)

  References:
    Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
    Curvature", ICML 2015; Grosse & Martens, "A Kronecker-factored approximate Fisher matrix
    for convolution layers", ICML 2016; Ba, Grosse & Martens, "Distributed Second-Order
    Optimization using Kronecker-Factored Approximations", ICLR 2017.
  """
  layer_list = layers_tuple(layers)
  # A dtype name, not jnp.float32: inject_hyperparams would take a callable for a schedule.
  stats_dtype = jnp.dtype(stats_dtype)
  check_range("damping", damping, 0.0, None, low_inclusive=False)
  check_choice("damping_mode", damping_mode, ("factored", "exact"))
  check_range("decay", decay, 0.0, 1.0, high_inclusive=False)
  check_update_interval(update_interval)
  if kl_clip is not None:
    check_range("kl_clip", kl_clip, 0.0, None, low_inclusive=False)
    if learning_rate is None:
      raise ValueError(
          "kl_clip needs learning_rate= (the rate the step is scaled by afterwards), e.g. "
          "scale_by_kfac_factors(layers=..., kl_clip=1e-3, learning_rate=0.1).")
  if learning_rate is not None:
    check_range("learning_rate", learning_rate, 0.0, None)
  check_range("fallback_scale", fallback_scale, 0.0, None)
  if pad_ratio is not None:
    try:
      pad_ratio = float(pad_ratio)
    except jax.errors.ConcretizationTypeError:
      raise ValueError(
          "pad_ratio fixes how the factors are stacked and cannot be an injected "
          "hyperparameter: pass it in optax.inject_hyperparams(..., "
          "static_args=('pad_ratio',)).") from None
    check_range("pad_ratio", pad_ratio, 1.0, None)
  _kfac_stacks.check_factor_sharding(factor_sharding)
  if pad_ratio is None and factor_sharding is not None:
    pad_ratio = 1.0
  stacks = _kfac_stacks.plan_stacks(layer_list, pad_ratio)
  if fallback is None:
    # Second moment in float32 at least (g**2 overflows float16 for |g| > 256).
    fallback = in_float32(optax.scale_by_rms(decay=0.999, eps=1e-8, eps_in_sqrt=False,
                                              bias_correction=True))
  owned = {l.kernel for l in layer_list} | {l.bias for l in layer_list if l.bias is not None}
  without_covered = functools.partial(shrink_covered, owned=owned)

  def init_fn(params):
    check_float_leaves("scale_by_kfac_factors", params)
    check_layers_in(params, layer_list, "params", require=False)
    return init_state(params, layer_list, damping_mode, stats_dtype, fallback,
                       without_covered)

  def update_fn(updates, state, params=None, *, kfac_stats=None, **extra_args):
    del extra_args
    check_tree_structure("scale_by_kfac_factors", updates, params)
    stats = require_extra_arg(
        "scale_by_kfac_factors", "kfac_stats", kfac_stats,
        "kfac_stats=stats)  # loss, grads, stats = cap(model, x, y, key=key"
        if layer_list else "kfac_stats=capture.no_stats()")
    where = check_layers_in(updates, layer_list, "updates")
    check_state_shapes("scale_by_kfac_factors", init_fn, updates, state)

    if isinstance(stats, NoNewStats):     # a step without a capture: factors as they are
      a, s, weight, finite = state.a, state.s, state.factor_weight, jnp.array(True)
    else:
      check_stats(stats, layer_list)
      a, s, weight, finite = accumulate(state, stats, layer_list, decay, stats_dtype)
    lam = jnp.asarray(value_at(damping, state.count), stats_dtype)
    kept = (state.a_eigvals, state.a_eigvecs, state.s_eigvals, state.s_eigvecs,
            state.a_inverse, state.s_inverse)
    interval = jnp.maximum(update_interval, 1)  # a traced T below 1: every step
    due = ((state.count % interval) == 0) | (state.num_refreshes == 0)
    do_refresh = due & (weight > 0)
    if layer_list:
      decomp = jax.lax.cond(
          do_refresh,
          lambda: refresh(state, a, s, weight, lam, layer_list, stacks, damping_mode,
                           stats_dtype, factor_sharding),
          lambda: kept)
    else:
      decomp = kept

    leaves, treedef = jax.tree_util.tree_flatten(updates)
    new_leaves, kl_sum = _precondition_layers(layer_list, leaves, where, decomp, a, weight,
                                              lam, damping_mode, stats_dtype)
    fb_state = fall_back(fallback, fallback_scale, without_covered, updates, state.fallback,
                          params, where, leaves, new_leaves)

    nu, decided = jnp.ones([], stats_dtype), jnp.array(True)
    if kl_clip is not None and layer_list:
      nu, decided = kl_clip_scale(kl_sum, kl_clip, learning_rate, state.count, stats_dtype)
      new_leaves = [(x * nu).astype(x.dtype) for x in new_leaves]

    a_w, a_v, s_w, s_v, a_inv, s_inv = decomp
    new_state = ScaleByKfacState(
        factor_weight=weight, a=a, s=s,
        a_eigvals=a_w, a_eigvecs=a_v, s_eigvals=s_w, s_eigvecs=s_v,
        a_inverse=a_inv, s_inverse=s_inv, kl_scale=nu.astype(stats_dtype),
        fallback=fb_state, **step_counters(state, do_refresh, finite, decided))
    return jax.tree_util.tree_unflatten(treedef, new_leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def kfac(
    learning_rate: ScalarOrSchedule,
    *,
    layers: KfacLayers,
    damping: ScalarOrSchedule = 1e-2,
    damping_mode: str = "factored",
    decay: float = 0.95,
    update_interval: int = 5,
    kl_clip: float | None = 1e-2,
    momentum: float = 0.7,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    fallback: optax.GradientTransformation | None = None,
    fallback_scale: float | None = None,
    stats_dtype: Any = "float32",
    pad_ratio: float | None = None,
    factor_sharding: jax.sharding.NamedSharding | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""K-FAC: the natural gradient with Kronecker-factored curvature, momentum and KL clipping.

  `optax.chain(scale_by_kfac_factors(...), optax.trace(momentum), optax.add_decayed_weights(
  weight_decay), optax.scale_by_learning_rate(learning_rate))`::

    v = ν (F̂ + damping)⁻¹ g          (per layer, Kronecker-factored; see scale_by_kfac_factors)
    m ← μ m + v
    θ ← θ − η (m + weight_decay · θ)

  Args:
    learning_rate: η, a float or a schedule (also used by KL clipping). While the KL
      budget binds, the step length is set by `kl_clip` rather than η. The defaults with
      η = 0.3 train the benchmarks' digits autoencoder (loss summed over pixels) and digits
      CNN well; damping 3e-3 with κ = 2e-2 is faster on the autoencoder but overshoots late
      on the CNN.
    layers: `cap.layers(...)` from `secondorder.capture`, or `capture.no_layers()`.
    damping: λ, a float or a schedule.
    damping_mode: "factored" or "exact".
    decay: EMA decay of the factors.
    update_interval: steps between eigendecompositions.
    kl_clip: κ, the KL budget per step (None: no clipping).
    momentum: μ, momentum on the natural gradient (0 for none).
    nesterov: Nesterov momentum.
    weight_decay: decoupled weight decay.
    fallback: diagonal method for uncovered parameters (default: RMS scaling, an
      Adam-like step without momentum of its own).
    fallback_scale: the uncovered parameters' step size as a fraction of η. K-FAC's
      learning rates (0.1 to 1) are far above what an RMS-scaled step tolerates (about
      1e-3), so by default (None) the fallback moves at `DEFAULT_FALLBACK_SCALE` · η
      (0.01: η = 0.3 gives the fallback 3e-3), and at η itself when no layer is covered
      (`capture.no_layers()`: the fallback is then the whole method).
    stats_dtype: dtype of the factors.
    pad_ratio, factor_sharding: how the refresh stacks the factors and spreads the stacks
      over devices (see `scale_by_kfac_factors`).

  Example::

    cap = capture.nnx_capture(loss_fn, likelihood="bernoulli")
    tx = kfac(0.1, layers=cap.layers(model, x))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    loss, grads, stats = cap(model, x, y, key=key)
    opt.update(model, grads, kfac_stats=stats)

  References:
    Martens & Grosse 2015; Ba, Grosse & Martens 2017 (KL clipping).
  """
  check_range("momentum", momentum, 0.0, 1.0, high_inclusive=False)
  check_range("weight_decay", weight_decay, 0.0, None)
  if fallback_scale is None:
    fallback_scale = DEFAULT_FALLBACK_SCALE if layers_tuple(layers) else 1.0
  parts = [scale_by_kfac_factors(
      layers=layers, damping=damping, damping_mode=damping_mode, decay=decay,
      update_interval=update_interval, kl_clip=kl_clip, learning_rate=learning_rate,
      fallback=fallback, fallback_scale=fallback_scale, stats_dtype=stats_dtype,
      pad_ratio=pad_ratio,
      factor_sharding=factor_sharding)]
  # Always present (a zero momentum makes it the identity): the state's structure must not
  # depend on whether momentum is a Python 0 or an injected array (checkpoints load either way).
  parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)
