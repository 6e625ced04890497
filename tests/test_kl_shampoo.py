"""KL-Shampoo against a NumPy transcription of the authors' algorithm, and its own checks.

The shared contract (tests/test_contract.py) and the 8-device mesh (tests/test_sharding.py)
cover the transform's behaviour under optax's wrappers and under sharding; here: the
numbers (20 float64 steps against `_kl_shampoo_reference`), the input checks, donation,
checkpoints, stacked layers and non-finite gradients.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import _kl_shampoo_reference as ref
from secondorder.dimension_numbers import MuonDimensionNumbers, resolve_leaf_axes
from secondorder.transforms import _blocks
from secondorder.transforms.kl_shampoo import (ScaleByKlShampooState, kl_shampoo,
                                               scale_by_kl_shampoo)

HYPER = dict(b1=0.9, b2=0.97, shampoo_beta=0.8, eps=1e-3, precondition_frequency=3)
REF_STEPS = 20
# Every block is square, or fat enough that the first Gram matrices have full rank, so the
# first eigenbases are unique up to the signs of their columns (which KL-Shampoo's numbers
# do not depend on).
SHAPES = {"w": (4, 4), "t": (3, 4, 4), "tall": (8, 4), "stack": (2, 3, 3), "wide": (3, 12),
          "b": (3,), "s": ()}
DIMS = {k: (MuonDimensionNumbers(1, 2) if k == "stack" else None) for k in SHAPES}


def _gradients(steps: int, seed: int = 0):
  """A sequence of gradient trees (float64 NumPy), of varied scale per step and leaf."""
  rng = np.random.default_rng(seed)
  return [{k: rng.normal(size=s) * rng.uniform(0.2, 3.0) for k, s in SHAPES.items()}
          for _ in range(steps)]


def _reference_blocks(init):
  """The reference state per leaf: a list of blocks in the plan's order, or a Diagonal."""
  factored_4 = (True, True)
  return {
      "w": [ref.Block((4, 4), factored_4, init)],
      "t": [ref.Block((3, 4, 4), (True, True, True), init)],
      "tall": [ref.Block((4, 4), factored_4, init) for _ in range(2)],  # rows 0-3, 4-7
      "stack": [ref.Block((3, 3), factored_4, init) for _ in range(2)],  # layers 0, 1
      "wide": [ref.Block((3, 12), (True, False), init)],  # 12 > max_precond_dim: no factor
      "b": ref.Diagonal((3,)),
      "s": ref.Diagonal(()),
  }


def _split(name, g):
  """A leaf cut into the reference's blocks (the plan's order)."""
  if name == "tall":
    return [g[:4], g[4:]]
  if name == "stack":
    return [g[0], g[1]]
  return [g]


def _join(name, parts):
  if name == "tall":
    return np.concatenate(parts, axis=0)
  if name == "stack":
    return np.stack(parts)
  return parts[0]


@pytest.mark.parametrize("init", [0.1, None], ids=["authors_init_factor", "from_statistics"])
def test_matches_the_numpy_transcription_over_20_steps(init):
  """Updates, factors, eigenvalue estimates and bases (up to column signs) of 20 float64
  steps with refreshes every 3 calls equal the dense NumPy transcription to 1e-9: the
  authors' algorithm with its constant initial estimates (0.1), and the default estimates
  set from the first call's statistics. The first gradient of the leaf "w" is zero, so
  its estimates are set on the second call."""
  with jax.enable_x64(True):
    tx = scale_by_kl_shampoo(**HYPER, max_precond_dim=10, block_size=4, init_factor=init,
                             weight_dimension_numbers=DIMS, statistics_dtype=jnp.float64)
    params = {k: jnp.zeros(s, jnp.float64) for k, s in SHAPES.items()}
    state = tx.init(params)
    step = jax.jit(tx.update)
    blocks = _reference_blocks(init)
    kw = dict(b1=HYPER["b1"], beta=HYPER["shampoo_beta"], eps=HYPER["eps"],
              frequency=HYPER["precondition_frequency"], cap=4000.0)
    leaves = jax.tree.leaves(params)
    names = sorted(SHAPES)
    plan = _blocks.make_plan(tuple(tuple(x.shape) for x in leaves),
                             tuple(resolve_leaf_axes(DIMS, params)),
                             block_size=4, merge=False, max_dim=10, exponent_override=1.0,
                             one_sided=True)
    gradients = _gradients(REF_STEPS)
    gradients[0]["w"] = np.zeros(SHAPES["w"])
    for t, g in enumerate(gradients):
      u, state = step({k: jnp.asarray(v) for k, v in g.items()}, state)
      for name in names:
        b = blocks[name]
        if isinstance(b, ref.Diagonal):
          expected = b.step(g[name], b1=HYPER["b1"], b2=HYPER["b2"], eps=HYPER["eps"])
        else:
          expected = _join(name, [blk.step(x, **kw) for blk, x in zip(b, _split(name, g[name]))])
        np.testing.assert_allclose(np.asarray(u[name]), expected, rtol=1e-9,
                                   atol=1e-9 * max(1.0, np.abs(expected).max()),
                                   err_msg=f"update of {name} at step {t}")
      _assert_state_matches(plan, state, blocks, names, t)


def _assert_state_matches(plan, state, blocks, names, t):
  for name, lp in zip(names, plan.leaves):
    if lp.diagonal:
      continue
    assert len(lp.combos) == 1, name
    combo = lp.combos[0]
    h = _blocks.combo_factors(state.factors, lp, combo)
    q = _blocks.combo_factors(state.bases, lp, combo)
    d = _blocks.combo_factors(state.eigenvalues, lp, combo)
    for bi, blk in enumerate(blocks[name]):
      for axis, hi in enumerate(h):
        if hi is None:
          assert blk.h[axis] is None
          continue
        where = f"{name} block {bi} axis {axis} after step {t}"
        scale = np.abs(blk.h[axis]).max()
        np.testing.assert_allclose(np.asarray(hi[bi]), blk.h[axis], rtol=1e-9,
                                   atol=1e-9 * scale, err_msg=f"factor of {where}")
        np.testing.assert_allclose(np.asarray(d[axis][bi]), blk.d[axis], rtol=1e-9,
                                   err_msg=f"eigenvalue estimates of {where}")
        overlap = np.abs(np.asarray(q[axis][bi]).T @ blk.q[axis])
        np.testing.assert_allclose(overlap, np.eye(overlap.shape[0]), atol=1e-9,
                                   err_msg=f"basis of {where} (up to column signs)")


def test_the_fit_is_not_shampoos():
  """After the first call the factors are the scaled Gram matrices (L = (1-β) G Gᵀ / n);
  the second call's contribution uses the other factor's inverse, so it differs from
  Shampoo's Gram matrix (a test that the KL coupling is there at all)."""
  beta = 0.5
  tx = scale_by_kl_shampoo(shampoo_beta=beta)
  rng = np.random.default_rng(1)
  g1, g2 = (jnp.asarray(rng.normal(size=(3, 3)), jnp.float32) for _ in range(2))
  state = tx.init({"w": g1})
  _, state = tx.update({"w": g1}, state)
  left = state.factors[0][0]
  np.testing.assert_allclose(left, (1 - beta) * g1 @ g1.T / 3, rtol=1e-5)
  _, state = tx.update({"w": g2}, state)
  shampoo_like = beta * left + (1 - beta) * g2 @ g2.T / 3
  assert not np.allclose(state.factors[0][0], shampoo_like, rtol=1e-2)


def test_stacked_layers_equal_separate_leaves():
  """A [3, 4, 4] leaf read as three layers gives the updates of three [4, 4] leaves."""
  rng = np.random.default_rng(2)
  stacked = scale_by_kl_shampoo(precondition_frequency=2,
                                weight_dimension_numbers={"x": MuonDimensionNumbers(1, 2)})
  separate = scale_by_kl_shampoo(precondition_frequency=2)
  s1 = stacked.init({"x": jnp.zeros((3, 4, 4))})
  s2 = separate.init({f"x{i}": jnp.zeros((4, 4)) for i in range(3)})
  for _ in range(5):
    g = jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32)
    u1, s1 = stacked.update({"x": g}, s1)
    u2, s2 = separate.update({f"x{i}": g[i] for i in range(3)}, s2)
    np.testing.assert_allclose(u1["x"], jnp.stack([u2[f"x{i}"] for i in range(3)]),
                               rtol=2e-5, atol=1e-7)


def test_a_non_finite_contribution_is_skipped_and_counted():
  tx = scale_by_kl_shampoo(precondition_frequency=1)
  params = {"w": jnp.zeros((3, 3))}
  state = tx.init(params)
  rng = np.random.default_rng(3)
  for _ in range(2):
    _, state = tx.update({"w": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)}, state)
  bad = jnp.asarray(rng.normal(size=(3, 3)), jnp.float32).at[0, 0].set(jnp.nan)
  _, after = tx.update({"w": bad}, state)
  assert int(after.stat_skips) == 1
  np.testing.assert_array_equal(after.factors[0], state.factors[0])
  np.testing.assert_array_equal(after.eigenvalues[0], state.eigenvalues[0])
  assert np.all(np.isfinite(after.bases[0]))


@pytest.mark.parametrize("name,value,error", [
    ("b1", 1.0, ValueError), ("b1", "0.9", TypeError), ("b2", -0.1, ValueError),
    ("shampoo_beta", 1.0, ValueError), ("eps", -1.0, ValueError),
    ("precondition_frequency", 0, ValueError), ("precondition_frequency", 2.5, ValueError),
    ("max_precond_dim", 0, ValueError), ("block_size", 0, ValueError),
    ("init_factor", 0.0, ValueError), ("init_factor", "big", TypeError),
    ("inverse_sqrt_cap", 0.0, ValueError), ("inverse_sqrt_cap", "big", TypeError),
    ("weight_decay", -1.0, ValueError),
])
def test_bad_arguments_are_named(name, value, error):
  with pytest.raises(error, match=name):
    kl_shampoo(1e-3, **{name: value})


def test_a_non_finite_first_gradient_leaves_the_estimates_unset():
  """The default estimates come from the first finite statistics: a NaN first gradient is
  skipped and counted, and the next gradient G [4, 3] sets both factors' estimates to
  (||G||^2 / 12)^(1/2)."""
  tx = scale_by_kl_shampoo()
  state = tx.init({"w": jnp.zeros((4, 3))})
  np.testing.assert_array_equal(state.eigenvalues[0], 0.0)
  g = jnp.asarray(np.random.default_rng(5).normal(size=(4, 3)), jnp.float32)
  u, state = tx.update({"w": g.at[1, 2].set(jnp.nan)}, state)
  assert int(state.stat_skips) == 1 and not np.all(np.isfinite(u["w"]))
  for d in state.eigenvalues:
    np.testing.assert_array_equal(d, 0.0)
  u, state = tx.update({"w": g}, state)
  np.testing.assert_array_equal(u["w"], 0.0)  # no estimates yet: a zero direction
  sigma = np.sqrt(np.mean(np.square(np.asarray(g, np.float64))))
  for d in state.eigenvalues:
    np.testing.assert_allclose(d, sigma, rtol=1e-5)
  u, state = tx.update({"w": g}, state)
  assert np.all(np.isfinite(u["w"])) and np.any(u["w"] != 0)


def test_an_injected_frequency_below_one_reads_as_one():
  """precondition_frequency injected as 0 or -2 into a running state takes exactly the steps
  of 1 (a refresh every call), not `count % 0` (whose value depends on the backend) or
  `count % -2` (a refresh every other call)."""
  tx = optax.inject_hyperparams(scale_by_kl_shampoo)(precondition_frequency=2)
  step = jax.jit(tx.update)
  g = jnp.asarray(np.random.default_rng(7).normal(size=(4, 3)), jnp.float32)
  runs = []
  for value in (0, -2, 1, 2):
    state = tx.init({"w": jnp.zeros((4, 3))})
    state.hyperparams["precondition_frequency"] = jnp.asarray(value, jnp.int32)
    out = []
    for i in range(4):
      u, state = step({"w": g * (1 + i) + i}, state)
      out.append(np.asarray(u["w"]))
    runs.append(np.stack(out))
  np.testing.assert_array_equal(runs[0], runs[2])
  np.testing.assert_array_equal(runs[1], runs[2])
  assert not np.allclose(runs[2], runs[3])  # the frequency does change the steps


@pytest.mark.parametrize("rate", [-1e-3, float("nan")])
def test_a_negative_learning_rate_is_named(rate):
  with pytest.raises(ValueError, match="learning_rate"):
    kl_shampoo(rate)
  kl_shampoo(optax.constant_schedule(1e-3))  # a schedule is not checked at construction
  kl_shampoo(0.0)


def test_mismatched_updates_are_rejected():
  tx = scale_by_kl_shampoo()
  state = tx.init({"w": jnp.zeros((4, 3))})
  with pytest.raises(ValueError, match="do not match"):
    tx.update({"w": jnp.zeros((3, 4))}, state)


def test_state_is_donatable():
  """Every state leaf is its own buffer, at init and after jitted steps with the state
  donated (no leaf aliases another, so donation neither fails nor warns)."""
  tx = kl_shampoo(1e-2, precondition_frequency=2)
  params = {"w": jnp.ones((4, 3)), "t": jnp.ones((2, 2, 3)), "b": jnp.zeros(3)}

  def pointers(state):
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]

  state = tx.init(params)
  assert len(set(pointers(state))) == len(jax.tree.leaves(state))
  step = jax.jit(lambda g, s: tx.update(g, s, params), donate_argnums=1)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # "Some donated buffers were not usable" fails the test
    for t in range(4):
      g = jax.tree.map(lambda x, t=t: jnp.full_like(x, 0.1 * (t + 1)) + x, params)
      old = state
      _, state = step(g, state)
      assert all(x.is_deleted() for x in jax.tree.leaves(old))
      assert len(set(pointers(state))) == len(jax.tree.leaves(state))


def test_checkpoint_resume_is_bit_identical(tmp_path):
  """Save the state after 3 of 9 steps with orbax, restore it into the structure
  `jax.eval_shape(tx.init, params)` gives, and finish: the same bits as without a break."""
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = kl_shampoo(1e-2, precondition_frequency=2, weight_decay=0.0)
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  grads = [jax.tree.map(lambda x, t=t: jnp.sin(jnp.arange(x.size, dtype=jnp.float32)
                                               .reshape(x.shape) + t), params)
           for t in range(9)]
  step = jax.jit(lambda g, s: tx.update(g, s, params))

  def run(state, ts):
    for t in ts:
      _, state = step(grads[t], state)
    return state

  straight = run(tx.init(params), range(9))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "state", run(tx.init(params), range(3)))
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "state", jax.eval_shape(tx.init, params))
  resumed = run(restored, range(3, 9))
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert isinstance(resumed[0], ScaleByKlShampooState)


def test_trains_a_small_classifier_without_grafting():
  """Softmax regression on a fixed, separable batch: KL-Shampoo (no graft, no Adam on the
  kernel) lowers the loss by more than half in 30 steps."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(64, 6)), jnp.float32)
  y = jnp.argmax(x @ jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), axis=1)  # separable
  params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)}

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()

  tx = kl_shampoo(0.05, weight_decay=0.0)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  start = float(loss(params))
  for _ in range(30):
    params, state = step(params, state)
  assert float(loss(params)) < 0.5 * start
