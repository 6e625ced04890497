"""K-FAC without silent failure: the KL clip at gradients whose ⟨V, G⟩ overflows float32,
a non-finite clip decision skipped and counted, a donated state, an injected refresh
interval checked.

The clip's decisions are compared with the same step computed in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from secondorder.capture import KfacLayer, KfacLayers, LayerStats, no_new_stats
from secondorder.transforms.kfac import kfac, scale_by_kfac_factors

LAYERS = KfacLayers((KfacLayer("w", "dense", ("w",), ("b",), (3, 2)),), ("v",))


def _spd(rng, n):
  m = rng.normal(size=(n + 2, n))
  return m.T @ m / m.shape[0]


def _problem(magnitude, dtype):
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 2)), "b": np.zeros(2), "v": rng.normal(size=5)}
  grads = {"w": magnitude * rng.normal(size=(3, 2)), "b": magnitude * rng.normal(size=2),
           "v": rng.normal(size=5)}
  stats = {"w": LayerStats(_spd(rng, 4), _spd(rng, 2))}
  cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)
  return cast(params), cast(grads), jax.tree.map(lambda x: jnp.asarray(x, dtype), stats)


def _step(dtype, magnitude, kl_clip=1e-2):
  params, grads, stats = _problem(magnitude, dtype)
  tx = scale_by_kfac_factors(layers=LAYERS, damping=1e-2, kl_clip=kl_clip, learning_rate=0.1,
                             stats_dtype=dtype)
  return jax.jit(lambda g, s: tx.update(g, s, params, kfac_stats=stats))(grads, tx.init(params))


@pytest.mark.parametrize("magnitude", [1.0, 1e19, 1e20])
def test_kl_clip_decides_as_float64_when_the_sum_overflows(magnitude):
  """Covered gradients around 1e19-1e20 in float32: Σ⟨V, G⟩ is beyond float32's range (it
  was Inf or NaN, and the clip then zeroed the step or let a 1e19 step through); now ν and
  the clipped step equal float64's, ν²η²Σ⟨V, G⟩ = κ, nothing counted. (At magnitude 1 the
  sum is ordinary and both agree too.)"""
  u32, s32 = _step(jnp.float32, magnitude)
  with jax.enable_x64(True):
    u64, s64 = _step(jnp.float64, magnitude)
    nu64 = float(s64.kl_scale)
    u64 = jax.tree.map(np.asarray, u64)
    _, grads, _ = _problem(magnitude, jnp.float64)
  vg = sum(float(np.vdot(u64[k], np.asarray(grads[k]))) for k in ("w", "b")) / nu64
  if magnitude > 1:
    assert vg > float(np.finfo(np.float32).max)          # Σ⟨V, G⟩ overflows float32
    assert 0 < nu64 < 1e-10
    np.testing.assert_allclose(nu64 ** 2 * 0.01 * vg, 1e-2, rtol=1e-6)
  np.testing.assert_allclose(float(s32.kl_scale), nu64, rtol=1e-4)
  for k in ("w", "b"):
    np.testing.assert_allclose(np.asarray(u32[k], np.float64), u64[k], rtol=2e-3,
                               atol=2e-3 * np.abs(u64[k]).max())
  assert int(s32.num_clip_skipped) == 0 and int(s64.num_clip_skipped) == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_clip_decision_skips_the_step_and_counts_it(bad):
  """A NaN or Inf in a covered gradient makes ⟨V, G⟩ non-finite: the step is scaled by
  ν = 0 (the uncovered leaves' steps are 0, the covered layer's preconditioned gradient,
  which the fault reaches through A⁻¹, stays NaN: the fault is not hidden), the state counts
  it in num_clip_skipped and stays finite, and the next finite step is clipped as usual.
  (NaN > κ used to read as "not above the budget": ν = 1.)"""
  params, grads, stats = _problem(1.0, jnp.float32)
  tx = scale_by_kfac_factors(layers=LAYERS, damping=1e-2, kl_clip=1e-2, learning_rate=0.1)
  update = jax.jit(lambda g, s: tx.update(g, s, params, kfac_stats=stats))
  state = tx.init(params)
  bad_grads = dict(grads, w=grads["w"].at[0, 0].set(bad))
  u, after = update(bad_grads, state)
  assert float(after.kl_scale) == 0.0 and int(after.num_clip_skipped) == 1
  assert np.isnan(float(u["w"][0, 0]))
  np.testing.assert_array_equal(np.asarray(u["v"]), np.zeros(5))
  scalars = [after.count, after.kl_scale, after.factor_weight]
  assert all(bool(jnp.isfinite(x)) for x in scalars)
  u, again = update(grads, after)
  assert int(again.num_clip_skipped) == 1 and 0 < float(again.kl_scale) <= 1.0
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


def test_jitted_step_with_the_state_donated():
  """Every state leaf of scale_by_kfac_factors and of kfac (plain and under
  inject_hyperparams, with no static_args) is its own buffer: a jitted step donating the
  state and the params runs several steps."""
  params, grads, stats = _problem(1.0, jnp.float32)
  for tx in (scale_by_kfac_factors(layers=LAYERS, damping_mode="exact", update_interval=2),
             kfac(0.1, layers=LAYERS),
             optax.inject_hyperparams(kfac)(learning_rate=0.1, layers=LAYERS)):
    state = tx.init(params)
    leaves = jax.tree.leaves(state)
    assert len({id(x) for x in leaves}) == len(leaves)

    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p, kfac_stats=stats)
      return optax.apply_updates(p, u), s

    step = jax.jit(step, donate_argnums=(0, 1))
    p = jax.tree.map(jnp.copy, params)
    for _ in range(3):
      p, state = step(p, state, grads)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((p, state)))
    assert int(optax.tree.get(state, "num_refreshes")) >= 1


def test_injected_update_interval_is_checked_and_a_traced_one_clamped():
  """update_interval=0 injected by optax.inject_hyperparams is an error naming it when the
  state is built (it used to refresh every step silently); a traced interval below 1 inside
  update is read as 1 (a refresh every step), one above as itself."""
  params, grads, stats = _problem(1.0, jnp.float32)
  injected = optax.inject_hyperparams(scale_by_kfac_factors)
  with pytest.raises(ValueError, match="update_interval"):
    injected(layers=LAYERS, update_interval=0).init(params)
  with pytest.raises(ValueError, match="update_interval"):
    scale_by_kfac_factors(layers=LAYERS, update_interval=jnp.asarray(1.5))

  def refreshes(interval):
    tx = scale_by_kfac_factors(layers=LAYERS, update_interval=interval)
    state = tx.init(params)
    for t in range(4):
      _, state = tx.update(grads, state, params,
                           kfac_stats=stats if t == 0 else no_new_stats())
    return state.num_refreshes

  counts = jax.jit(refreshes)
  assert int(counts(jnp.asarray(0))) == 4
  assert int(counts(jnp.asarray(1))) == 4
  assert int(counts(jnp.asarray(3))) == 2


def test_alias_ranges_and_empty_tree():
  """kfac checks its learning rate and every documented range at construction, each error
  naming the argument (NaN included); an empty parameter tree and all-zero gradients give
  an empty / zero update, not an error or a NaN."""
  from secondorder import capture
  for bad, name in ((dict(learning_rate=-1.0), "learning_rate"),
                    (dict(learning_rate=float("nan")), "learning_rate"),
                    (dict(damping=0.0), "damping"), (dict(decay=1.0), "decay"),
                    (dict(kl_clip=0.0), "kl_clip"), (dict(momentum=1.0), "momentum"),
                    (dict(weight_decay=-1.0), "weight_decay"),
                    (dict(update_interval=0), "update_interval"),
                    (dict(fallback_scale=-1.0), "fallback_scale")):
    with pytest.raises(ValueError, match=name):
      kfac(**dict(dict(learning_rate=0.1, layers=LAYERS), **bad))
  tx = kfac(0.1, layers=capture.no_layers())
  u, _ = jax.jit(lambda s: tx.update({}, s, {}, kfac_stats=capture.no_stats()))(tx.init({}))
  assert u == {}
  params, grads, stats = _problem(1.0, jnp.float32)
  tx = kfac(0.1, layers=LAYERS)
  zeros = jax.tree.map(jnp.zeros_like, grads)
  u, s = jax.jit(lambda g, s: tx.update(g, s, params, kfac_stats=stats))(zeros, tx.init(params))
  for leaf in jax.tree.leaves(u):
    np.testing.assert_array_equal(np.abs(np.asarray(leaf)), np.zeros(leaf.shape))
  assert int(optax.tree.get(s, "num_clip_skipped")) == 0
