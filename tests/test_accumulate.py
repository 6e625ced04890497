"""Tests for secondorder.transforms.accumulate (the rule is restated in docs/methods/accumulation.md).

Exact claims are checked in float64 against `optax.MultiSteps` over the matching optimizer
(which keeps a gradient buffer); the Adam form against a NumPy transcription of the published
update rule. Every trajectory runs in one jitted `lax.scan`, so each test compiles once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from secondorder.transforms.accumulate import (
    EveryKAccumulateState,
    accumulated_adamw,
    accumulated_sgd,
    beta_tilde,
    every_k_accumulate,
    every_k_gate,
    scale_by_adam_beta_tilde,
)

K = 3
STEPS = 12  # four boundaries at k = 3


# --- a small non-quadratic regression problem, one mini-batch per step ------------------------

def _problem(dtype, steps=STEPS, batch=4, same_batch=False, seed=0):
  rng = np.random.default_rng(seed)
  params = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=(3,))}
  xs = rng.normal(size=(steps, batch, 4))
  ys = rng.normal(size=(steps, batch, 3))
  if same_batch:
    xs = np.broadcast_to(xs[:1], xs.shape)
    ys = np.broadcast_to(ys[:1], ys.shape)
  cast = lambda a: jnp.asarray(a, dtype)
  return jax.tree.map(cast, params), (cast(xs), cast(ys))


def _loss(params, batch):
  x, y = batch
  pred = jnp.tanh(x @ params["w"]) + params["b"]
  return jnp.mean((pred - y) ** 2)


def _trajectory(tx, params, batches):
  """Params after each step, updates of each step, final state; one jit, one scan."""

  def step(carry, batch):
    p, s = carry
    g = jax.grad(_loss)(p, batch)
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    return (p, s), (p, u)

  @jax.jit
  def run(p, b):
    (p, s), (ps, us) = jax.lax.scan(step, (p, tx.init(p)), b)
    return ps, us, s

  return run(params, batches)


def _assert_trees_close(a, b, rtol, atol=0.0):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=rtol, atol=atol)


def _boundaries(steps, k_of_n):
  """0-based indices of the mini-steps that close a cycle."""
  out, n, t = [], 0, 0
  while True:
    t += k_of_n(n)
    if t > steps:
      return out
    out.append(t - 1)
    n += 1


# --- construction errors --------------------------------------------------------------------

@pytest.mark.parametrize("bad_k", [0, -2, 2.5, 3.0, True, "3", None])
@pytest.mark.parametrize("factory", [
    lambda k: every_k_accumulate(k),
    lambda k: every_k_accumulate(k, b2=None),
    lambda k: every_k_gate(k),
    lambda k: accumulated_adamw(1e-3, k),
    lambda k: accumulated_sgd(1e-2, k),
    lambda k: scale_by_adam_beta_tilde(k),
])
def test_invalid_k_raises_at_construction(factory, bad_k):
  with pytest.raises(ValueError, match="k must be an integer"):
    factory(bad_k)


@pytest.mark.parametrize("kwargs, name", [
    (dict(b1=1.0), "b1"), (dict(b1=-0.1), "b1"), (dict(b2=1.0), "b2"),
    (dict(eps=-1e-8), "eps"), (dict(eps_root=-1.0), "eps_root"),
])
def test_invalid_hyperparameters_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    every_k_accumulate(2, **kwargs)


def test_trace_momentum_only_in_momentum_form():
  with pytest.raises(ValueError, match="ema=False"):
    every_k_accumulate(2, b2=0.999, ema=False)
  with pytest.raises(ValueError, match="weight_decay"):
    accumulated_adamw(1e-3, 2, weight_decay=-1.0)
  with pytest.raises(ValueError, match="schedule"):
    beta_tilde(0.9, lambda n: 2)


def test_valid_k_forms_construct():
  every_k_accumulate(np.int64(4))
  every_k_accumulate(jnp.asarray(4))
  every_k_accumulate(lambda n: 2 + n)


# --- momentum form: exactly MultiSteps over the matching momentum optimizer -----------------

SCHED = optax.exponential_decay(0.2, transition_steps=1, decay_rate=0.7)  # changes every update
WD = 0.3


def _k_schedule(n):
  return jnp.where(n < 2, 2, 3)


_MOMENTUM_CASES = {
    # optax.sgd's momentum (trace), schedule counted in real updates, no decay
    "sgd": (lambda: accumulated_sgd(SCHED, K, momentum=0.9),
            lambda: optax.MultiSteps(optax.sgd(SCHED, momentum=0.9), K,
                                     accumulator_dtype=jnp.float64)),
    # decoupled weight decay applied once per boundary
    "sgd_decoupled_wd": (
        lambda: accumulated_sgd(SCHED, K, momentum=0.9, weight_decay=WD),
        lambda: optax.MultiSteps(optax.chain(optax.trace(0.9), optax.add_decayed_weights(WD),
                                             optax.scale_by_learning_rate(SCHED)), K,
                                 accumulator_dtype=jnp.float64)),
    # coupled (L2) decay in front: exact because params do not move inside a cycle
    "sgd_coupled_wd": (
        lambda: optax.chain(optax.add_decayed_weights(WD), accumulated_sgd(SCHED, K, 0.9)),
        lambda: optax.MultiSteps(optax.chain(optax.add_decayed_weights(WD),
                                             optax.sgd(SCHED, momentum=0.9)), K,
                                 accumulator_dtype=jnp.float64)),
    # the EMA momentum m <- b m + (1 - b) g, built from the primitive and the gate
    "ema_primitive": (
        lambda: optax.chain(every_k_accumulate(K, b1=0.8, b2=None),
                            every_k_gate(K, optax.chain(optax.add_decayed_weights(WD),
                                                        optax.scale_by_learning_rate(SCHED)))),
        lambda: optax.MultiSteps(optax.chain(optax.ema(0.8, debias=False),
                                             optax.add_decayed_weights(WD),
                                             optax.scale_by_learning_rate(SCHED)), K,
                                 accumulator_dtype=jnp.float64)),
    # k as a schedule of the number of real updates
    "k_schedule": (lambda: accumulated_sgd(SCHED, _k_schedule, momentum=0.9, weight_decay=WD),
                   lambda: optax.MultiSteps(
                       optax.chain(optax.trace(0.9), optax.add_decayed_weights(WD),
                                   optax.scale_by_learning_rate(SCHED)), _k_schedule,
                       accumulator_dtype=jnp.float64)),
}


@pytest.mark.parametrize("case", sorted(_MOMENTUM_CASES))
def test_momentum_form_equals_multisteps(case):
  make, make_ref = _MOMENTUM_CASES[case]
  with jax.enable_x64(True):
    params, batches = _problem(jnp.float64)
    ps, us, _ = _trajectory(make(), params, batches)
    ps_ref, us_ref, _ = _trajectory(make_ref(), params, batches)
    _assert_trees_close(ps, ps_ref, rtol=1e-12, atol=1e-14)
    _assert_trees_close(us, us_ref, rtol=1e-10, atol=1e-14)
    # zeros on the mini-steps, a real update on each boundary (at least three of them)
    k_of_n = (lambda n: int(_k_schedule(n))) if case == "k_schedule" else (lambda n: K)
    bounds = _boundaries(STEPS, k_of_n)
    assert len(bounds) >= 3
    moved = np.asarray([float(jnp.abs(u).sum()) for u in jax.tree.leaves(us)[0]]) > 0
    np.testing.assert_array_equal(np.flatnonzero(moved), bounds)


def test_weight_decay_counts_once_per_boundary():
  # zero gradients: only the decay moves the params, by (1 - lr_n * wd) per real update
  with jax.enable_x64(True):
    tx = accumulated_sgd(SCHED, K, momentum=0.9, weight_decay=WD)
    p = {"w": jnp.ones((2,), jnp.float64)}
    s = tx.init(p)
    update = jax.jit(tx.update)
    expected = 1.0
    for t in range(1, STEPS + 1):
      u, s = update({"w": jnp.zeros((2,), jnp.float64)}, s, p)
      p = optax.apply_updates(p, u)
      if t % K == 0:
        expected *= 1 - float(SCHED(t // K - 1)) * WD
      np.testing.assert_allclose(np.asarray(p["w"]), expected, rtol=1e-8)  # lr rounds in f32


# --- Adam form: the published rule, against NumPy ----------------------------------------

def _numpy_seed_adam(grads, k, b1, b2, eps, eps_root):
  """Su (2021)'s rule, transcribed literally with chi(t) = [k divides t]."""
  chi = lambda t: 1.0 if t % k == 0 else 0.0
  m = np.zeros_like(grads[0])
  v = np.zeros_like(grads[0])
  outs, ms, vs = [], [], []
  for t, g in enumerate(grads, start=1):
    m = ((b1 - 1) * chi(t - 1) + 1) * m + (1 - b1) * g / k
    v = ((b2 - 1) * chi(t - 1) + 1) * v + (1 - b2) * g**2 / k
    n = t // k  # t/k at the boundaries, where the update is used
    if chi(t):
      m_hat = m / (1 - b1**n)
      v_hat = v / (1 - b2**n)
      outs.append(m_hat / (np.sqrt(v_hat + eps_root) + eps))
    else:
      outs.append(np.zeros_like(g))
    ms.append(m)
    vs.append(v)
  return np.stack(outs), np.stack(ms), np.stack(vs)


def _run_on_grads(tx, grads):
  """Feeds a fixed gradient sequence (T, ...) through tx; returns updates and state history."""

  def step(s, g):
    u, s = tx.update(g, s)
    return s, (u, s)

  return jax.jit(lambda gs: jax.lax.scan(step, tx.init(gs[0]), gs)[1])(grads)


@pytest.mark.parametrize("k, eps_root", [(3, 0.0), (4, 1e-6), (1, 0.0)])
def test_adam_form_matches_numpy_reference(k, eps_root):
  b1, b2, eps = 0.8, 0.95, 1e-6
  rng = np.random.default_rng(1)
  grads = rng.normal(size=(4 * k, 5)) * rng.uniform(0.1, 3.0, size=(1, 5))
  with jax.enable_x64(True):
    us, states = _run_on_grads(every_k_accumulate(k, b1, b2, eps, eps_root), jnp.asarray(grads))
  ref_u, ref_m, ref_v = _numpy_seed_adam(grads, k, b1, b2, eps, eps_root)
  np.testing.assert_allclose(np.asarray(states.mu), ref_m, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(states.nu), ref_v, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(us), ref_u, rtol=1e-10, atol=1e-14)
  assert np.count_nonzero(np.abs(ref_u).sum(1)) == 4


def test_adam_form_k1_is_adam():
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    grads = jnp.asarray(rng.normal(size=(6, 5)))
    us, _ = _run_on_grads(every_k_accumulate(1, 0.9, 0.99, 1e-8), grads)
    ref, _ = _run_on_grads(optax.scale_by_adam(0.9, 0.99, 1e-8), grads)
  np.testing.assert_allclose(np.asarray(us), np.asarray(ref), rtol=1e-12)


def test_adam_form_first_moment_exact_second_moment_is_mean_of_squares():
  # m equals MultiSteps(adam)'s m; v is at least MultiSteps(adam)'s v (Jensen), and larger
  # exactly by (1 - b2) * within-cycle variance of the gradients at the first boundary.
  rng = np.random.default_rng(3)
  b1, b2 = 0.9, 0.99
  with jax.enable_x64(True):
    grads = jnp.asarray(rng.normal(size=(3 * K, 5)))
    _, ours = _run_on_grads(every_k_accumulate(K, b1, b2), grads)
    _, ref = _run_on_grads(optax.MultiSteps(optax.scale_by_adam(b1, b2), K,
                                            accumulator_dtype=jnp.float64), grads)
  adam_state = ref.inner_opt_state
  at = np.arange(K - 1, 3 * K, K)  # boundaries
  np.testing.assert_allclose(np.asarray(ours.mu)[at], np.asarray(adam_state.mu)[at], rtol=1e-12)
  v_ours, v_ref = np.asarray(ours.nu)[at], np.asarray(adam_state.nu)[at]
  assert np.all(v_ours >= v_ref)
  first = np.asarray(grads)[:K]
  np.testing.assert_allclose(v_ours[0] - v_ref[0], (1 - b2) * first.var(axis=0), rtol=1e-10)


def test_accumulated_adamw_equals_multisteps_adamw_when_cycle_gradients_agree():
  # Full-batch gradients: the params do not move inside a cycle, so the k gradients are
  # equal and the mean of squares is the square of the mean. With a learning-rate schedule
  # and weight decay, the trajectory is MultiSteps(adamw)'s to rounding.
  with jax.enable_x64(True):
    params, batches = _problem(jnp.float64, same_batch=True)
    ps, us, _ = _trajectory(accumulated_adamw(SCHED, K, 0.8, 0.9, weight_decay=WD),
                            params, batches)
    ps_ref, _, _ = _trajectory(
        optax.MultiSteps(optax.adamw(SCHED, 0.8, 0.9, weight_decay=WD), K,
                         accumulator_dtype=jnp.float64), params, batches)
    _assert_trees_close(ps, ps_ref, rtol=1e-10, atol=1e-13)
    assert float(jnp.abs(ps["w"][-1] - params["w"]).max()) > 0.1  # it did move


def test_accumulated_adamw_with_minibatch_noise_is_close_to_multisteps():
  # The documented approximation: same direction, smaller-or-equal step size per coordinate
  # at the first boundary (v larger), and the same sign of every coordinate's update.
  with jax.enable_x64(True):
    params, batches = _problem(jnp.float64)
    _, us, _ = _trajectory(accumulated_adamw(0.01, K, weight_decay=0.0), params, batches)
    _, us_ref, _ = _trajectory(optax.MultiSteps(optax.adamw(0.01, weight_decay=0.0), K,
                                                accumulator_dtype=jnp.float64), params, batches)
  for u, r in zip(jax.tree.leaves(us), jax.tree.leaves(us_ref)):
    u, r = np.asarray(u)[K - 1], np.asarray(r)[K - 1]
    np.testing.assert_array_equal(np.sign(u), np.sign(r))
    assert np.all(np.abs(u) <= np.abs(r) + 1e-15)


# --- the gate and the beta-tilde variant ----------------------------------------------------

def test_gate_alone_passes_adam_update_every_k_steps():
  rng = np.random.default_rng(4)
  grads = jnp.asarray(rng.normal(size=(4 * K, 5)), jnp.float32)
  adam = optax.adam(0.1)
  us, _ = _run_on_grads(optax.chain(adam, every_k_gate(K)), grads)
  ref, _ = _run_on_grads(adam, grads)
  us, ref = np.asarray(us), np.asarray(ref)
  bounds = np.arange(K - 1, 4 * K, K)
  np.testing.assert_array_equal(us[bounds], ref[bounds])
  assert not np.any(np.delete(us, bounds, axis=0))


def test_gate_runs_inner_only_on_boundaries():
  rng = np.random.default_rng(5)
  grads = jnp.asarray(rng.normal(size=(4 * K, 5)), jnp.float32)
  sched = optax.linear_schedule(1.0, 0.0, 4)
  us, states = _run_on_grads(every_k_gate(K, optax.scale_by_learning_rate(sched)), grads)
  counts = np.asarray(states.inner_state.count)
  np.testing.assert_array_equal(counts, (np.arange(1, 4 * K + 1)) // K)
  for n, t in enumerate(range(K - 1, 4 * K, K)):
    np.testing.assert_allclose(np.asarray(us)[t], -float(sched(n)) * np.asarray(grads)[t],
                               rtol=1e-6)


def test_beta_tilde_matches_numpy_adam_with_beta_tilde():
  k, b1, b2 = 4, 0.9, 0.999
  assert beta_tilde(b1, k) == pytest.approx(0.975)
  # the approximation: beta_tilde**k = beta up to O(k^2 (1 - beta_tilde)^2)
  bt = beta_tilde(b1, k)
  assert abs(bt**k - b1) <= k * (k - 1) / 2 * (1 - bt) ** 2
  rng = np.random.default_rng(6)
  grads = rng.normal(size=(10, 5))
  with jax.enable_x64(True):
    us, _ = _run_on_grads(scale_by_adam_beta_tilde(k, b1, b2, 1e-8), jnp.asarray(grads))
  ref, _, _ = _numpy_seed_adam(grads, 1, beta_tilde(b1, k), beta_tilde(b2, k), 1e-8, 0.0)
  np.testing.assert_allclose(np.asarray(us), ref, rtol=1e-10)


# --- state, dtypes, jit, scan, inject_hyperparams ------------------------------------------

def _param_sized_leaves(state, params):
  n = sum(x.size for x in jax.tree.leaves(params))
  sizes = [x.size for x in jax.tree.leaves(state)]
  return sum(s for s in sizes if s > 1) / n, sum(1 for s in sizes if s == 1)


def test_state_holds_only_the_moments():
  params = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32),
            "b": jax.ShapeDtypeStruct((32,), jnp.float32)}
  adam_form = jax.eval_shape(every_k_accumulate(4).init, params)
  momentum_form = jax.eval_shape(every_k_accumulate(4, b2=None).init, params)
  multisteps = jax.eval_shape(optax.MultiSteps(optax.adam(1e-3), 4).init, params)
  adamw = jax.eval_shape(accumulated_adamw(1e-3, 4).init, params)
  assert _param_sized_leaves(adam_form, params)[0] == 2  # m, v
  assert _param_sized_leaves(momentum_form, params)[0] == 1  # m
  assert _param_sized_leaves(multisteps, params)[0] == 3  # m, v, gradient buffer
  assert _param_sized_leaves(adamw, params)[0] == 2


def test_bf16_params_keep_float32_state_and_bf16_updates():
  params, batches = _problem(jnp.bfloat16, steps=2 * K)
  tx = accumulated_adamw(0.05, K, weight_decay=0.1)
  ps, us, state = _trajectory(tx, params, batches)
  acc_state = state[0]
  assert isinstance(acc_state, EveryKAccumulateState)
  assert {x.dtype for x in jax.tree.leaves((acc_state.mu, acc_state.nu))} == {jnp.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves((ps, us))} == {jnp.dtype("bfloat16")}
  # and it follows the float32 run to bfloat16 precision
  ps32, _, _ = _trajectory(tx, jax.tree.map(lambda x: x.astype(jnp.float32), params),
                           jax.tree.map(lambda x: x.astype(jnp.float32), batches))
  _assert_trees_close(ps, ps32, rtol=0.0, atol=0.05)
  s2 = jax.eval_shape(every_k_accumulate(K, mu_dtype=jnp.bfloat16).init, params)
  assert {x.dtype for x in jax.tree.leaves(s2.mu)} == {jnp.dtype("bfloat16")}


def test_jit_does_not_recompile_and_state_is_stable():
  params, batches = _problem(jnp.float32, steps=2)
  tx = accumulated_adamw(SCHED, K, weight_decay=0.1)
  update = jax.jit(tx.update)
  state = tx.init(params)
  g = jax.grad(_loss)(params, jax.tree.map(lambda b: b[0], batches))
  u, state2 = update(g, state, params)
  u, state3 = update(g, state2, params)
  assert update._cache_size() == 1
  assert jax.tree.structure(state2) == jax.tree.structure(state3)
  for a, b in zip(jax.tree.leaves(state2), jax.tree.leaves(state3)):
    assert a.dtype == b.dtype and a.shape == b.shape


def test_scan_equals_python_loop():
  params, batches = _problem(jnp.float32, steps=2 * K)
  tx = accumulated_adamw(0.05, K, weight_decay=0.1)
  ps, _, _ = _trajectory(tx, params, batches)
  update = jax.jit(tx.update)
  p, s = params, tx.init(params)
  for t in range(2 * K):
    g = jax.grad(_loss)(p, jax.tree.map(lambda b: b[t], batches))
    u, s = update(g, s, p, unknown_extra_arg=1.0)  # unknown extra args are ignored
    p = optax.apply_updates(p, u)
  _assert_trees_close(jax.tree.map(lambda x: x[-1], ps), p, rtol=1e-6, atol=1e-7)


def test_inject_hyperparams():
  params, batches = _problem(jnp.float32)
  ref, _, _ = _trajectory(accumulated_adamw(0.05, K, weight_decay=0.1), params, batches)
  injected = optax.inject_hyperparams(accumulated_adamw)(learning_rate=0.05, k=K,
                                                         weight_decay=0.1)
  ps, _, state = _trajectory(injected, params, batches)
  # injected betas are float32 arrays, so 1 - b rounds in float32 rather than in Python
  _assert_trees_close(ps, ref, rtol=1e-4, atol=1e-6)
  assert state.hyperparams["k"].dtype == jnp.int32
  # a schedule k stays a schedule of real updates when marked static
  injected_k = optax.inject_hyperparams(every_k_accumulate, static_args="k")(
      k=_k_schedule, b1=0.9, b2=None)
  _, us, _ = _trajectory(injected_k, params, batches)
  moved = np.flatnonzero(np.abs(np.asarray(us["b"])).sum(1) > 0)
  np.testing.assert_array_equal(moved, _boundaries(STEPS, lambda n: int(_k_schedule(n))))
