"""shampoo_preconditioner / shampoo against NumPy references (float64 eigh, explicit blocks)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from secondorder.transforms.shampoo import STATIC_ARGS, shampoo, shampoo_preconditioner
from tests import contract as C
from tests.contract import Case

EPS = 1e-4


def _np_root(h, p, eps=EPS):
  """(H + eps λ_max I)^(-1/p) in float64."""
  w, v = np.linalg.eigh(h.astype(np.float64))
  w = np.maximum(w, 0.0)
  w = w + eps * w[-1]
  return (v * w ** (-1.0 / p)) @ v.T


def _np_precondition(g, stats, p):
  """Contract every axis i of g with the root of stats[i]."""
  out = g.astype(np.float64)
  for i, h in enumerate(stats):
    out = np.moveaxis(np.tensordot(_np_root(h, p), out, axes=([1], [i])), 0, i)
  return out


def _np_unfold_stats(g):
  stats = []
  for i in range(g.ndim):
    x = np.moveaxis(g.astype(np.float64), i, 0).reshape(g.shape[i], -1)
    stats.append(x @ x.T)
  return stats


def _grads(shape, n, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randn(*shape).astype(np.float32) for _ in range(n)]


@functools.lru_cache(maxsize=None)
def _jitted(**kwargs):
  tx = shampoo_preconditioner(**kwargs)
  return tx, jax.jit(tx.update)


def _plain(**kwargs):
  base = dict(update_interval=1, beta2=1.0, eps=EPS, graft=None, merge_small_dims=False,
              start_preconditioning_step=1)
  base.update(kwargs)
  return _jitted(**base)


def _rel_close(a, b, rtol):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


# ----------------------------------------------------------------------------- NumPy references


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_matrix_update_is_l_quarter_g_r_quarter(method):
  tx, update = _plain(method=method)
  params = jnp.zeros((6, 4))
  state = tx.init(params)
  left, right = np.zeros((6, 6)), np.zeros((4, 4))
  for g in _grads((6, 4), 5):
    u, state = update(jnp.asarray(g), state, params)
    left += g.astype(np.float64) @ g.T
    right += g.T.astype(np.float64) @ g
    ref = _np_root(left, 4) @ g @ _np_root(right, 4)
    _rel_close(u, ref, 2e-3)
  assert int(state.root_failures) == 0 and int(state.stat_skips) == 0


def test_eigh_and_newton_agree_on_a_tensor():
  shape = (5, 4, 3)
  (tx_e, up_e), (tx_n, up_n) = _plain(), _plain(method="newton")
  params = jnp.zeros(shape)
  s_e, s_n = tx_e.init(params), tx_n.init(params)
  for g in _grads(shape, 4, seed=1):
    u_e, s_e = up_e(jnp.asarray(g), s_e, params)
    u_n, s_n = up_n(jnp.asarray(g), s_n, params)
    _rel_close(u_n, u_e, 2e-3)
  for pe, pn in zip(s_e.preconds, s_n.preconds):
    _rel_close(pn, pe, 2e-3)


def test_order3_tensor_uses_minus_one_sixth_per_dimension():
  shape = (5, 4, 3)
  tx, update = _plain()
  params = jnp.zeros(shape)
  state = tx.init(params)
  stats = [np.zeros((d, d)) for d in shape]
  for g in _grads(shape, 5, seed=1):
    u, state = update(jnp.asarray(g), state, params)
    stats = [s + c for s, c in zip(stats, _np_unfold_stats(g))]
    _rel_close(u, _np_precondition(g, stats, 6), 2e-3)


def test_exponent_override_and_ema_statistics():
  tx, update = _plain(exponent_override=2, beta2=0.9)
  params = jnp.zeros((5, 3))
  state = tx.init(params)
  stats = [np.zeros((5, 5)), np.zeros((3, 3))]
  for t, g in enumerate(_grads((5, 3), 3, seed=2), start=1):
    u, state = update(jnp.asarray(g), state, params)
    stats = [0.9 * s + 0.1 * c for s, c in zip(stats, _np_unfold_stats(g))]
    debiased = [s / (1 - 0.9 ** t) for s in stats]
    _rel_close(u, _np_precondition(g, debiased, 2), 2e-3)


@pytest.mark.parametrize("beta2", [1.0, 0.9])
def test_statistics_every_k_steps(beta2):
  # Statistics on steps 2, 4, 6, ... (congruent to the start step 2 mod 2), roots on steps
  # 2, 6, 10; before step 2 only the (absent) graft runs, i.e. the gradient itself.
  k, every, start = 2, 4, 2
  tx, update = _plain(statistics_interval=k, update_interval=every,
                      start_preconditioning_step=start, beta2=beta2)
  params = jnp.zeros((5, 3))
  state = tx.init(params)
  stats, n, roots = [np.zeros((5, 5)), np.zeros((3, 3))], 0, None
  for t, g in enumerate(_grads((5, 3), 11, seed=4), start=1):
    u, state = update(jnp.asarray(g), state, params)
    if (t - start) % k == 0:
      decay, weight = (beta2, 1 - beta2) if beta2 < 1 else (1.0, 1.0)
      stats = [decay * s + weight * c for s, c in zip(stats, _np_unfold_stats(g))]
      n += 1
    if t >= start and (t - start) % every == 0:
      debias = 1 / (1 - beta2 ** n) if beta2 < 1 else 1.0
      roots = [_np_root(s * debias, 4) for s in stats]
    ref = g if roots is None else roots[0] @ g @ roots[1]
    _rel_close(u, ref, 2e-3)
  assert n == 5 and int(state.root_failures) == 0


def test_blocking_300x70_equals_per_block_answer():
  tx, update = _plain(block_size=128)
  params = jnp.zeros((300, 70))
  state = tx.init(params)
  assert max(s.shape[-1] for s in state.stats) <= 128
  bounds = [(0, 128), (128, 256), (256, 300)]
  stats = {b: [np.zeros((b[1] - b[0],) * 2), np.zeros((70, 70))] for b in bounds}
  for g in _grads((300, 70), 3, seed=3):
    u, state = update(jnp.asarray(g), state, params)
    for (lo, hi) in bounds:
      blk = g[lo:hi]
      stats[(lo, hi)] = [s + c for s, c in zip(stats[(lo, hi)], _np_unfold_stats(blk))]
      _rel_close(u[lo:hi], _np_precondition(blk, stats[(lo, hi)], 4), 2e-3)


def test_state_shapes_blocking_merging_and_diagonal_path():
  params = {"conv": jnp.zeros((3, 3, 16, 32)), "bias": jnp.zeros((70,)), "s": jnp.zeros(()),
            "emb": jnp.zeros((5000, 8)), "w": jnp.zeros((300, 70)), "row": jnp.zeros((1, 20)),
            "small": jnp.zeros((5, 4))}
  state = shampoo_preconditioner(block_size=128, max_preconditioner_dim=4096).init(params)
  sizes = sorted((s.shape[-1], s.shape[0]) for s in state.stats)
  # conv merges to (9, 16, 32); w blocks to 128, 128, 44 rows x 70 columns; the [1, 20] row
  # and the [5, 4] matrix merge to one dimension with one full factor; emb (5000 > 4096),
  # bias and the scalar take the diagonal path.
  assert sizes == [(9, 1), (16, 1), (20, 2), (32, 1), (44, 1), (70, 3), (128, 2)]
  assert all(s.dtype == jnp.float32 for s in state.stats + state.preconds)
  # The 1-D leaves take a full factor on request, blocked like any other dimension.
  state = shampoo_preconditioner(block_size=32, precondition_1d=True).init({"b": jnp.zeros(70)})
  assert sorted(s.shape for s in state.stats) == [(1, 6, 6), (2, 32, 32)]


# ----------------------------------------------------------------------------- failures


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_failed_root_keeps_previous_preconditioner(method):
  tx, update = _plain(method=method, update_interval=2)
  params = jnp.zeros((6, 4))
  state = tx.init(params)
  gs = _grads((6, 4), 4, seed=4)
  for g in gs[:2]:  # roots computed at step 1; step 2 uses them
    u, state = update(jnp.asarray(g), state, params)
  before = [np.asarray(p) for p in state.preconds]
  # A NaN in the 6x6 statistic: the refresh at step 3 fails for that factor only.
  group = [i for i, s in enumerate(state.stats) if s.shape[-1] == 6][0]
  stats = list(state.stats)
  stats[group] = stats[group].at[0, 2, 3].set(jnp.nan)
  state = state._replace(stats=tuple(stats))
  u, state = update(jnp.asarray(gs[2]), state, params)
  assert int(state.root_failures) == 1
  np.testing.assert_array_equal(state.preconds[group], before[group])
  other = 1 - group
  assert not np.array_equal(state.preconds[other], before[other])  # refreshed normally
  assert np.all(np.isfinite(u))
  expected = (np.asarray(state.preconds[group][0]) @ gs[2] @ np.asarray(state.preconds[other][0]))
  _rel_close(u, expected, 1e-5)
  u, state = update(jnp.asarray(gs[3]), state, params)
  assert np.all(np.isfinite(u)) and int(state.root_failures) == 1  # no refresh at step 4


def test_non_finite_gradient_leaves_statistics_unchanged():
  tx, update = _plain()
  params = jnp.zeros((6, 4))
  state = tx.init(params)
  g0, g1 = _grads((6, 4), 2, seed=5)
  _, state = update(jnp.asarray(g0), state, params)
  bad = jnp.asarray(g1).at[1, 1].set(jnp.inf)
  _, state2 = update(bad, state, params)
  for a, b in zip(state.stats, state2.stats):
    np.testing.assert_array_equal(a, b)
  assert int(state2.stat_skips) == 1 and int(state2.root_failures) == 0
  assert all(np.all(np.isfinite(p)) for p in state2.preconds)


# ----------------------------------------------------------------------------- grafting


def _reference_graft(name):
  return {
      "adam": optax.scale_by_adam(b1=0.0, b2=0.999, eps=1e-8),
      "rmsprop_normalized": optax.chain(
          optax.stateless(lambda u, p=None: jax.tree.map(lambda x: x / jnp.linalg.norm(x), u)),
          optax.scale_by_rms(decay=0.999, eps=1e-8, eps_in_sqrt=False)),
      "adagrad": optax.scale_by_rss(initial_accumulator_value=0.0, eps=1e-8),
      "sgd": optax.identity(),
  }[name]


@pytest.mark.parametrize("graft", ["adam", "rmsprop_normalized", "adagrad", "sgd"])
def test_grafting_per_block_norm_equals_grafted_method(graft):
  tx, update = _jitted(block_size=128, update_interval=1, beta2=0.99, graft=graft,
                       start_preconditioning_step=2)
  ref = _reference_graft(graft)
  params = {"w": jnp.zeros((300, 70)), "b": jnp.zeros((70,))}
  state, ref_state = tx.init(params), ref.init(params)
  rng = np.random.RandomState(6)
  rows = [(0, 128), (128, 256), (256, 300)]
  for step in range(1, 4):
    g = {"w": jnp.asarray(rng.randn(300, 70), jnp.float32),
         "b": jnp.asarray(rng.randn(70), jnp.float32)}
    u, state = update(g, state, params)
    r, ref_state = ref.update(g, ref_state, params)
    # 1-D parameters take the diagonal path: the grafted update itself.
    _rel_close(u["b"], r["b"], 1e-5)
    if step == 1:  # before start_preconditioning_step: only the grafted method
      _rel_close(u["w"], r["w"], 1e-5)
      continue
    for lo, hi in rows:
      un, rn = np.linalg.norm(u["w"][lo:hi]), np.linalg.norm(r["w"][lo:hi])
      np.testing.assert_allclose(un, rn, rtol=1e-4)
    # The direction is Shampoo's, not the grafted method's.
    cos = np.sum(np.asarray(u["w"]) * np.asarray(r["w"])) / (
        np.linalg.norm(u["w"]) * np.linalg.norm(r["w"]))
    assert cos < 0.999


# ----------------------------------------------------------------------------- schedule, dtypes


def test_roots_refresh_every_update_interval_from_start_step():
  tx, update = _jitted(update_interval=3, start_preconditioning_step=2, graft="sgd")
  params = jnp.zeros((5, 4))
  state = tx.init(params)
  changed = []
  prev = [np.asarray(p) for p in state.preconds]
  for g in _grads((5, 4), 8, seed=7):
    _, state = update(jnp.asarray(g), state, params)
    now = [np.asarray(p) for p in state.preconds]
    changed.append(any(not np.array_equal(a, b) for a, b in zip(prev, now)))
    prev = now
  assert changed == [False, True, False, False, True, False, False, True]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_keep_float32_statistics(dtype):
  tx, update = _jitted(update_interval=1)
  params = {"w": jnp.zeros((6, 4), dtype), "b": jnp.zeros((4,), dtype)}
  state = tx.init(params)
  g = {"w": jnp.asarray(_grads((6, 4), 1)[0], dtype), "b": jnp.ones((4,), dtype)}
  u, state = update(g, state, params)
  assert u["w"].dtype == dtype and u["b"].dtype == dtype
  assert all(s.dtype == jnp.float32 for s in state.stats + state.preconds)
  assert np.all(np.isfinite(np.asarray(u["w"], np.float32)))


def _eigh_calls(tx, params) -> int:
  """How many eigendecompositions the traced update holds (one per batched root call)."""
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params)
  return str(jaxpr).count("eigh[")


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_root_buckets_share_calls_without_changing_the_update(method):
  # Factor sides 3, 4, 5, 7, 12 and roots p = 4 (matrices) and 6 (the 3-D tensor): with
  # ratio 4 the rungs are 12 and 3, so sides 4..12 are padded to 12 and share a call (eigh:
  # whatever their root; Newton: one call per root); the updates must match one call per
  # (side, p).
  params = {"a": jnp.zeros((5, 12)), "b": jnp.zeros((3, 4, 7)), "c": jnp.zeros((12, 4))}
  kw = dict(update_interval=2, beta2=0.9, eps=EPS, graft=None, merge_small_dims=False,
            start_preconditioning_step=1, method=method)
  tx_each, up_each = _jitted(root_bucket_ratio=None, **kw)
  tx_shared, up_shared = _jitted(root_bucket_ratio=4.0, **kw)
  if method == "eigh":
    assert _eigh_calls(tx_each, params) == 5  # sides 3, 4, 5, 7, 12
    assert _eigh_calls(tx_shared, params) == 2  # sides 3 and 12
  s_each, s_shared = tx_each.init(params), tx_shared.init(params)
  rng = np.random.RandomState(3)
  for _ in range(5):
    g = {k: jnp.asarray(rng.randn(*v.shape).astype(np.float32)) for k, v in params.items()}
    u_each, s_each = up_each(g, s_each, params)
    u_shared, s_shared = up_shared(g, s_shared, params)
    for k in params:
      _rel_close(u_shared[k], u_each[k], 2e-5 if method == "eigh" else 5e-4)
  assert int(s_shared.root_failures) == int(s_each.root_failures) == 0
  for a, b in zip(s_shared.preconds, s_each.preconds):
    assert a.shape == b.shape  # the state keeps every factor at its own size


def test_bucket_sides():
  from secondorder.transforms._blocks import bucket_side as _bucket_side
  assert [_bucket_side(s, 128, 4.0) for s in (1, 2, 8, 9, 32, 33, 128)] == [
      1, 2, 8, 32, 32, 128, 128]
  assert [_bucket_side(s, 100, 2.0) for s in (13, 25, 26, 51)] == [13, 25, 50, 100]
  assert _bucket_side(9, 128, None) == 9


def test_bad_hyperparameters_raise():
  with pytest.raises(ValueError, match="block_size"):
    shampoo_preconditioner(block_size=0)
  with pytest.raises(ValueError, match="beta2"):
    shampoo_preconditioner(beta2=1.5)
  with pytest.raises(ValueError, match="graft"):
    shampoo_preconditioner(graft="lion")
  with pytest.raises(ValueError, match="method"):
    shampoo_preconditioner(method="svd")
  with pytest.raises(ValueError, match="exponent_override"):
    shampoo_preconditioner(exponent_override=2.5, method="newton")
  with pytest.raises(ValueError, match="update_interval"):
    shampoo_preconditioner(update_interval=0)
  with pytest.raises(ValueError, match="statistics_interval"):
    shampoo_preconditioner(statistics_interval=0)
  with pytest.raises(ValueError, match="statistics_interval must divide update_interval"):
    shampoo_preconditioner(statistics_interval=3, update_interval=10)
  with pytest.raises(ValueError, match="root_bucket_ratio"):
    shampoo_preconditioner(root_bucket_ratio=1.0)
  with pytest.raises(ValueError, match="b1"):
    shampoo(1e-3, b1=1.0)


# ------------------------------------------------------- stacked layers (dimension numbers)

MDN = optax.contrib.MuonDimensionNumbers


def _run_float64(tx, grads_seq, params):
  """The updates of `tx` over a sequence of gradient pytrees, jitted once, in float64."""
  update = jax.jit(tx.update)
  state, out = tx.init(params), []
  for g in grads_seq:
    u, state = update(g, state, params)
    out.append(u)
  return out, state


def _random_trees(shapes: dict, steps: int, seed: int):
  rng = np.random.RandomState(seed)
  return [{k: jnp.asarray(rng.randn(*s)) for k, s in shapes.items()} for _ in range(steps)]


def test_stacked_layers_and_attention_kernel_equal_separate_matrices():
  # float64, 10 steps, roots at steps 1, 4, 7, 10, block size 4, in one tree read through
  # dimension numbers, against the same matrices as separate leaves:
  #   a: 2 stacked [4, 3] layers, MuonDimensionNumbers(1, 2)  -> leaves a0, a1 (unblocked);
  #   c: 2 stacked [6, 3] layers                             -> c0, c1 (6 > 4: blocked);
  #   k: attention [d=6, heads=2, head_dim=3], reduction 0, output (1, 2) -> a [6, 6] leaf;
  #   b: a bias read by its rank (None).
  with jax.enable_x64(True):
    kw = dict(block_size=4, update_interval=3, beta2=0.9, eps=EPS,
              start_preconditioning_step=1, statistics_dtype=jnp.float64)
    specs = {"a": MDN(1, 2), "c": MDN(1, 2), "k": MDN(0, (1, 2)), "b": None}
    stacked = shampoo_preconditioner(weight_dimension_numbers=specs, **kw)
    separate = shampoo_preconditioner(**kw)
    trees = _random_trees({"a": (2, 4, 3), "c": (2, 6, 3), "k": (6, 2, 3), "b": (3,)}, 10,
                          seed=11)
    split = [{"a0": t["a"][0], "a1": t["a"][1], "c0": t["c"][0], "c1": t["c"][1],
              "k": t["k"].reshape(6, 6), "b": t["b"]} for t in trees]
    u_stacked, st = _run_float64(stacked, trees, trees[0])
    u_split, su = _run_float64(separate, split, split[0])
    close = functools.partial(np.testing.assert_allclose, rtol=1e-9, atol=1e-12)
    for a, b in zip(u_stacked, u_split):
      for name in ("a", "c"):
        for i in range(2):
          close(a[name][i], b[f"{name}{i}"])
      close(a["k"].reshape(6, 6), b["k"])
      close(a["b"], b["b"])
    # Every factor belongs to one layer: the stacks of the separate leaves, no 2x2 factor
    # over the layer axis.
    assert sorted(x.shape for x in st.stats) == sorted(x.shape for x in su.stats)
    assert int(st.root_failures) == 0


@pytest.mark.parametrize("precondition_1d", [False, True])
def test_stacked_vectors_equal_separate_vectors(precondition_1d):
  # float64, 10 steps, roots at 1, 4, 7, 10: a [3, 5] stack declared as vectors
  # (MuonDimensionNumbers((), 1)) against three [5] leaves; with precondition_1d each layer
  # has its own 5x5 factor, and never a 3x3 one over the layer axis.
  with jax.enable_x64(True):
    kw = dict(block_size=8, update_interval=3, beta2=0.9, eps=EPS, precondition_1d=precondition_1d,
              start_preconditioning_step=1, statistics_dtype=jnp.float64)
    stacked = shampoo_preconditioner(weight_dimension_numbers={"v": MDN((), 1)}, **kw)
    trees = _random_trees({"v": (3, 5)}, 10, seed=5)
    split = [{f"v{i}": t["v"][i] for i in range(3)} for t in trees]
    u_stacked, st = _run_float64(stacked, trees, trees[0])
    u_split, su = _run_float64(shampoo_preconditioner(**kw), split, split[0])
    for a, b in zip(u_stacked, u_split):
      np.testing.assert_allclose(a["v"], np.stack([b[f"v{i}"] for i in range(3)]),
                                 rtol=1e-9, atol=1e-12)
    assert [x.shape for x in st.stats] == [x.shape for x in su.stats]
    assert [x.shape for x in st.stats] == ([(3, 5, 5)] if precondition_1d else [])


def test_block_plan_round_trip_through_dimension_numbers():
  # _blocks.leaf_blocks / leaf_from_blocks invert each other for a stacked, blocked,
  # multi-axis leaf, and its blocks are the NumPy slices of each layer's matrix.
  from secondorder.dimension_numbers import leaf_axes
  from secondorder.transforms import _blocks
  shape = (5, 2, 3, 4)  # output axis 0, batch axis 1, reduction axes (2, 3): 2 x [12, 5]
  axes = leaf_axes(MDN((2, 3), 0), shape, "x")
  plan = _blocks.make_plan((shape,), (axes,), block_size=4, max_dim=4096)
  lp = plan.leaves[0]
  assert (lp.layers, lp.merged) == (2, (12, 5))
  x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  parts = _blocks.leaf_blocks(jnp.asarray(x), lp)
  np.testing.assert_array_equal(_blocks.leaf_from_blocks(parts, lp), x)
  layers = x.transpose(1, 2, 3, 0).reshape(2, 12, 5)
  for combo, blocks in zip(lp.combos, parts):
    (r0, rn, rs), (c0, cn, cs) = [(p.start, p.count, p.size) for p in combo.pieces]
    expect = [layers[b, r0 + i * rs:r0 + (i + 1) * rs, c0 + j * cs:c0 + (j + 1) * cs]
              for b in range(2) for i in range(rn) for j in range(cn)]
    np.testing.assert_array_equal(blocks, np.stack(expect))
  assert sum(lp.factors(c) * 2 for c in lp.combos) == sum(plan.group_sizes)


def test_bad_dimension_numbers_name_the_leaf():
  params = {"layers": {"kernel": jnp.zeros((2, 3, 4))}}
  for spec, what in [(MDN(1, 3), "does not exist"), (MDN(1, 1), "overlap")]:
    tx = shampoo(1e-3, weight_dimension_numbers={"layers": {"kernel": spec}})
    with pytest.raises(ValueError, match=what) as err:
      tx.init(params)
    msg = str(err.value)
    assert "['layers']['kernel']" in msg and "(2, 3, 4)" in msg and repr(spec) in msg
  with pytest.raises(ValueError, match="structure of the params"):
    shampoo_preconditioner(weight_dimension_numbers={"other": MDN(0, 1)}).init(params)


def test_scanned_model_costs_the_root_calls_of_the_unrolled_one():
  # Four [8, 12] layers stacked in one leaf with dimension numbers: one batched call per
  # factor side (8 and 12), as for four separate leaves; read by its rank the stack adds a
  # 4x4 factor and its call. (The traced update; benchmarks/shampoo_bench.py --scan counts
  # the compiled HLO of a scanned transformer.)
  kw = dict(block_size=16, update_interval=1, merge_small_dims=False)
  stacked = {"w": jnp.zeros((4, 8, 12))}
  unrolled = {f"w{i}": jnp.zeros((8, 12)) for i in range(4)}
  n_stacked = _eigh_calls(shampoo_preconditioner(weight_dimension_numbers={"w": MDN(1, 2)},
                                                 **kw), stacked)
  assert n_stacked == _eigh_calls(shampoo_preconditioner(**kw), unrolled) == 2
  assert _eigh_calls(shampoo_preconditioner(**kw), stacked) == 3
  # Their biases [4, 12]: declared as vectors they take the diagonal path as the unrolled
  # [12] biases do; read by rank they are a 4 x 12 matrix with a 4x4 factor.
  stacked["b"] = jnp.zeros((4, 12))
  unrolled.update({f"b{i}": jnp.zeros(12) for i in range(4)})
  dims = {"w": MDN(1, 2), "b": MDN((), 1)}
  n_stacked = _eigh_calls(shampoo_preconditioner(weight_dimension_numbers=dims, **kw), stacked)
  assert n_stacked == _eigh_calls(shampoo_preconditioner(**kw), unrolled) == 2
  dims["b"] = None
  assert _eigh_calls(shampoo_preconditioner(weight_dimension_numbers=dims, **kw), stacked) == 3


# ----------------------------------------------------------------- inject_hyperparams, Newton
# (the shared contract for `shampoo` and `shampoo_preconditioner` runs in tests/test_contract.py)


@pytest.mark.parametrize("statistics_interval", [1, 2])
def test_inject_hyperparams_with_static_args(statistics_interval):
  kwargs = dict(block_size=4, update_interval=2, beta2=0.99, exponent_override=4,
                statistics_interval=statistics_interval)
  plain = shampoo_preconditioner(**kwargs)
  injected = optax.inject_hyperparams(shampoo_preconditioner, static_args=STATIC_ARGS)(**kwargs)
  params = jnp.zeros((6, 3))
  sp, si = plain.init(params), injected.init(params)
  for g in _grads((6, 3), 3, seed=8):
    up, sp = jax.jit(plain.update)(jnp.asarray(g), sp, params)
    ui, si = jax.jit(injected.update)(jnp.asarray(g), si, params)
    _rel_close(ui, up, 1e-5)
  with pytest.raises(ValueError, match="static_args"):
    bad = optax.inject_hyperparams(shampoo_preconditioner)(block_size=4)
    jax.jit(bad.update)(jnp.ones((6, 3)), bad.init(params), params)


@pytest.mark.parametrize("graft_b1", [None, 0.0, 0.9])
def test_graft_state_structure_does_not_depend_on_injection(graft_b1):
  params = jnp.zeros((4, 3))
  plain = shampoo_preconditioner(graft_b1=graft_b1)
  injected = optax.inject_hyperparams(shampoo_preconditioner)(graft_b1=graft_b1)
  sp, si = plain.init(params), injected.init(params)
  assert jax.tree.structure(si.inner_state) == jax.tree.structure(sp)
  kind = "ScaleByRmsWithCountState" if graft_b1 is None else "ScaleByAdamState"
  assert type(sp.graft_state).__name__ == kind


# The coupled-Newton roots, SGD grafting and full factors for vectors, on the problems where
# they matter (the rest of the contract does not depend on the root method).
NEWTON = Case(
    "shampoo_preconditioner_newton",
    lambda learning_rate: optax.chain(
        shampoo_preconditioner(update_interval=1, method="newton", graft="sgd",
                               precondition_1d=True),
        optax.scale_by_learning_rate(learning_rate)),
    lr=0.03, steps=300, problems=("matrix_quadratic", "mixed_pytree"))

# Statistics every other step (the roots every four), on the problems with matrices (the
# quadratic's and Rosenbrock's vectors take the diagonal path, which ignores the interval).
SPARSE_STATS = Case(
    "shampoo_statistics_interval_2",
    lambda learning_rate: shampoo(learning_rate, update_interval=4, statistics_interval=2,
                                  start_preconditioning_step=2),
    lr=0.1, problems=("matrix_quadratic", "mixed_pytree"))


@pytest.mark.parametrize("case,problem",
                         [pytest.param(c, p, id=f"{c.name}-{p}") for c in [NEWTON, SPARSE_STATS]
                          for p in c.problems])
def test_converges(case, problem):
  C.check_converges(case, problem)


@pytest.mark.parametrize("with_params", [True, False])
def test_renamed_keys_name_the_first_differing_path(with_params):
  """Same shapes, different keys: an error naming the path, before the graft sees them
  (with params from the params, without from the graft's moments)."""
  tx = shampoo_preconditioner()
  params = {"a": jnp.ones((2, 3)), "b": jnp.ones(3)}
  state = tx.init(params)
  renamed = {"a": params["a"], "c": params["b"]}
  with pytest.raises(ValueError, match=r"\['b'\].*\['c'\]|\['c'\].*\['b'\]"):
    jax.jit(tx.update)(renamed, state, params if with_params else None)


def test_donated_state_and_interval_checks():
  tx = shampoo(1e-2, update_interval=2, start_preconditioning_step=1)
  params = {"a": jnp.ones((2, 3)), "b": jnp.ones(3)}
  step = jax.jit(lambda p, s: (lambda u_s: (optax.apply_updates(p, u_s[0]), u_s[1]))(
      tx.update(p, s, p)), donate_argnums=(0, 1))
  p, s = jax.tree.map(jnp.copy, params), tx.init(params)
  for _ in range(3):
    p, s = step(p, s)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((p, s)))
  with pytest.raises(ValueError, match="learning_rate"):
    shampoo(-1e-3)
  with pytest.raises(ValueError, match="update_interval"):
    optax.inject_hyperparams(shampoo_preconditioner)(update_interval=0).init(params)
  with pytest.raises(ValueError, match="graft_b2"):
    shampoo_preconditioner(graft_b2=1.0)
