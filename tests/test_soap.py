"""scale_by_soap / soap against the NumPy transcription in tests/_soap_reference.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from optax.contrib import MuonDimensionNumbers

from secondorder.transforms.soap import ScaleBySoapState, scale_by_soap, soap
from tests import _soap_reference as R

STEPS = 20
BLOCK = 128
MAX_DIM = 350
# One pytree holds every case, so each precondition frequency compiles one program.
SHAPES = {
    "matrix": (6, 6),
    "tensor": (3, 4, 5),
    "blocked": (300, 70),
    "stacked": (3, 5, 5),
    "vector": (7,),
    # A dimension above max_precond_dim is not rotated, the other one is (one-sided SOAP);
    # in the second leaf that other dimension is blocked (128 + 12).
    "wide": (400, 3),
    "wide_blocked": (360, 140),
    "stacked_vectors": (3, 7),  # three vectors: each as the 1-D "vector" leaf
}
DIMS = {name: None for name in SHAPES}
DIMS["stacked"] = MuonDimensionNumbers(1, 2)
DIMS["stacked_vectors"] = MuonDimensionNumbers((), 1)
# With eps well above float64's rounding, the rotated coordinates that carry no gradient
# (the blocked leaf's, below) stay at zero instead of 0/0.
EPS = 1e-5


def _gradients(seed=0):
  """STEPS gradients per leaf. The blocked leaf's lie in fixed 6-dimensional row and
  column spaces: a rectangular block's factor starts rank-deficient, where its eigenbasis
  (SOAP's, and the authors' too) is any basis of the null space, and a gradient with no
  part there makes the update independent of that choice."""
  rng = np.random.RandomState(seed)
  left, right = rng.randn(300, 6), rng.randn(6, 70)
  out = []
  for _ in range(STEPS):
    g = {k: rng.randn(*s) for k, s in SHAPES.items()}
    g["blocked"] = left @ rng.randn(6, 6) @ right / 6
    out.append(g)
  return out


def _reference(grads, frequency):
  """Per leaf, the reference's updates: blocks and layers run as independent arrays."""
  kw = dict(b1=0.95, b2=0.95, eps=EPS, precondition_frequency=frequency,
            max_precond_dim=MAX_DIM)
  seq = lambda name: [g[name] for g in grads]
  out = {name: R.run(seq(name), **kw) for name in ("matrix", "tensor", "vector", "wide")}
  wide = [np.zeros(SHAPES["wide_blocked"]) for _ in grads]
  for lo, hi in ((0, 128), (128, 140)):
    for full, part in zip(wide, R.run([g[:, lo:hi] for g in seq("wide_blocked")], **kw)):
      full[:, lo:hi] = part
  out["wide_blocked"] = wide
  vectors = [np.zeros(SHAPES["stacked_vectors"]) for _ in grads]
  for layer in range(SHAPES["stacked_vectors"][0]):
    for full, part in zip(vectors, R.run([g[layer] for g in seq("stacked_vectors")], **kw)):
      full[layer] = part
  out["stacked_vectors"] = vectors
  blocked = [np.zeros(SHAPES["blocked"]) for _ in grads]
  for lo, hi in ((0, 128), (128, 256), (256, 300)):
    for full, part in zip(blocked, R.run([g[lo:hi] for g in seq("blocked")], **kw)):
      full[lo:hi] = part
  out["blocked"] = blocked
  stacked = [np.zeros(SHAPES["stacked"]) for _ in grads]
  for layer in range(SHAPES["stacked"][0]):
    for full, part in zip(stacked, R.run([g[layer] for g in seq("stacked")], **kw)):
      full[layer] = part
  out["stacked"] = stacked
  return out


@functools.lru_cache(maxsize=None)
def _float64_transform():
  """One compiled update for both frequencies: the frequency is an injected array."""
  tx = optax.inject_hyperparams(scale_by_soap, static_args=("block_size", "max_precond_dim"))(
      eps=EPS, precondition_frequency=1, block_size=BLOCK, max_precond_dim=MAX_DIM,
      weight_dimension_numbers=DIMS, statistics_dtype=jnp.float64)
  return tx, jax.jit(tx.update)


@functools.lru_cache(maxsize=None)
def _float64_run(frequency):
  with jax.enable_x64(True):
    tx, update = _float64_transform()
    params = {k: jnp.zeros(s, jnp.float64) for k, s in SHAPES.items()}
    state = tx.init(params)
    state.hyperparams["precondition_frequency"] = jnp.asarray(frequency, jnp.int64)
    outs = []
    for g in _gradients():
      u, state = update(jax.tree.map(jnp.asarray, g), state, params)
      outs.append(jax.tree.map(np.asarray, u))
    return outs, state.inner_state


@pytest.mark.parametrize("frequency", [1, 3])
@pytest.mark.parametrize("leaf", list(SHAPES))
def test_matches_reference(leaf, frequency):
  outs, state = _float64_run(frequency)
  ref = _reference(_gradients(), frequency)[leaf]
  assert not np.any(outs[0][leaf]), "the first step only collects statistics"
  # The blocked leaf's empty directions carry rounding noise / (noise + eps).
  tol = 1e-6 if leaf == "blocked" else 1e-9
  for t, (u, r) in enumerate(zip(outs, ref)):
    np.testing.assert_allclose(u[leaf], r, rtol=tol, atol=tol * np.abs(r).max(),
                               err_msg=f"{leaf}, step {t}")
  assert int(state.refresh_failures) == 0


def test_frequency_changes_the_trajectory():
  """The two frequencies really differ (the refresh is exercised, not skipped)."""
  one, _ = _float64_run(1)
  three, _ = _float64_run(3)
  assert np.abs(one[5]["matrix"] - three[5]["matrix"]).max() > 1e-3


def test_state_layout():
  """Factors stacked per side (the blocked leaf's 44, 70, 128 beside the others'), moments
  per block shape, the unrotated leaves' moments in their own shape, no factor along a
  one-sided leaf's long dimension."""
  _, state = _float64_run(1)
  sides = [f.shape[-1] for f in state.factors]
  assert sides == sorted(sides) and {44, 70, 128, 3, 4, 5, 6} <= set(sides)
  assert [f.shape for f in state.factors] == [b.shape for b in state.bases]
  shapes = [m.shape for m in state.mu]
  assert (7,) in shapes and (3, 5, 5) in shapes  # 3 layers of 5x5
  assert (2, 128, 70) in shapes and (1, 44, 70) in shapes
  # One-sided leaves: their long dimension kept whole (never blocked), with no factor.
  assert (1, 400, 3) in shapes and (1, 360, 128) in shapes and (1, 360, 12) in shapes
  assert not {400, 360} & set(sides) and {3, 12} <= set(sides)
  assert (3, 7) in shapes  # the stacked vectors: Adam on the leaf as it is


@functools.lru_cache(maxsize=None)
def _float32_transform():
  """The float32 transform the orthonormality, fault and checkpoint tests share (one
  compiled update): QR refreshes every step on blocks of 128 x 40 and 72 x 40."""
  tx = scale_by_soap(precondition_frequency=1, block_size=BLOCK)
  return tx, jax.jit(tx.update)


def _float32_grads(seed, n):
  rng = np.random.RandomState(seed)
  return [{"w": jnp.asarray(rng.randn(200, 40), jnp.float32)} for _ in range(n)]


F32_PARAMS = {"w": jnp.zeros((200, 40), jnp.float32)}


def test_bases_stay_orthonormal_in_float32():
  """Power iteration + QR every step keeps every basis orthonormal in float32."""
  tx, update = _float32_transform()
  state = tx.init(F32_PARAMS)
  for g in _float32_grads(1, STEPS):
    _, state = update(g, state, F32_PARAMS)
  for q in state.bases:
    assert q.dtype == jnp.float32
    gram = np.einsum("nij,nik->njk", np.asarray(q, np.float64), np.asarray(q, np.float64))
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(q.shape[-1]), gram.shape),
                               atol=1e-6)
  assert int(state.refresh_failures) == 0


def test_soap_alias_is_decoupled_weight_decay_and_a_schedule():
  """soap = -lr_t (u_t + wd * params), with the schedule read at the call count."""
  with jax.enable_x64(True):
    rng = np.random.RandomState(2)
    schedule = optax.linear_schedule(0.5, 0.25, 4)  # float32-exact values
    tx = soap(schedule, weight_decay=0.1, precondition_frequency=2,
              statistics_dtype=jnp.float64)
    params = jnp.asarray(rng.randn(4, 4))
    state = tx.init(params)
    update = jax.jit(tx.update)
    ref = R.SoapReference((4, 4), precondition_frequency=2)
    for t in range(6):
      g = rng.randn(4, 4)
      u, state = update(jnp.asarray(g), state, params)
      expected = -float(schedule(t)) * (ref.step(g) + 0.1 * np.asarray(params))
      np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-9, atol=1e-12)
      params = params + u


# optax.inject_hyperparams on soap itself (no static_args), with the same updates and the
# same state structure as without it, is the shared contract's check (tests/contract.py).
def test_injected_structural_argument_is_explained():
  tx = optax.inject_hyperparams(scale_by_soap)(block_size=4)
  params = jnp.ones((6, 6))
  state = tx.init(params)
  with pytest.raises(ValueError, match="block_size.*static_args"):
    jax.jit(tx.update)(params, state, params)


def test_nonfinite_factor_keeps_the_basis():
  """A NaN factor at a refresh: its basis stays, the failure is counted, updates finite."""
  tx, update = _float32_transform()
  state = tx.init(F32_PARAMS)
  g1, g2, g3 = _float32_grads(4, 3)
  for g in (g1, g2):
    _, state = update(g, state, F32_PARAMS)
  # Stack of side 40 holds the two blocks' R factors; poison the first.
  side = [f.shape[-1] for f in state.factors].index(40)
  factors = list(state.factors)
  factors[side] = factors[side].at[0, 0, 0].set(jnp.nan)
  u, after = update(g3, state._replace(factors=tuple(factors)), F32_PARAMS)
  assert int(after.refresh_failures) == 1
  np.testing.assert_array_equal(np.asarray(after.bases[side][0]),
                                np.asarray(state.bases[side][0]))
  assert not np.array_equal(np.asarray(after.bases[side][1]), np.asarray(state.bases[side][1]))
  assert np.all(np.isfinite(np.asarray(u["w"])))
  assert np.all(np.isfinite(np.asarray(after.mu[0]))) and np.all(np.isfinite(np.asarray(after.nu[0])))


def test_nonfinite_gradient_leaves_the_factors():
  tx, update = _float32_transform()
  state = tx.init(F32_PARAMS)
  (g,) = _float32_grads(5, 1)
  _, state = update(g, state, F32_PARAMS)
  bad = {"w": g["w"].at[3, 3].set(jnp.inf)}
  _, after = update(bad, state, F32_PARAMS)
  # The first block (rows 0-127) keeps L (side 128) and R (slot 0 of side 40); the second
  # block's R (slot 1) moves.
  sides = [f.shape[-1] for f in state.factors]
  left, right = sides.index(128), sides.index(40)
  np.testing.assert_array_equal(np.asarray(after.factors[left]), np.asarray(state.factors[left]))
  np.testing.assert_array_equal(np.asarray(after.factors[right][0]),
                                np.asarray(state.factors[right][0]))
  assert not np.array_equal(np.asarray(after.factors[right][1]),
                            np.asarray(state.factors[right][1]))
  assert int(after.stat_skips) == 1


def test_orbax_resume_is_bit_identical(tmp_path):
  """Save after 4 of 9 steps (between refreshes of every kind), restore into the abstract
  state a fresh process builds, finish: the same bits as the uninterrupted run."""
  tx, update = _float32_transform()
  grads = _float32_grads(6, 9)

  def run(params, state, gs):
    for g in gs:
      u, state = update(g, state, params)
      params = optax.apply_updates(params, u)
    return params, state

  reference = run(F32_PARAMS, tx.init(F32_PARAMS), grads)
  params, state = run(F32_PARAMS, tx.init(F32_PARAMS), grads[:4])
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "soap", {"params": params, "opt_state": state})
  ckpt.wait_until_finished()
  target = {"params": jax.eval_shape(lambda: F32_PARAMS),
            "opt_state": jax.eval_shape(tx.init, F32_PARAMS)}
  restored = ckpt.restore(tmp_path / "soap", target)
  assert isinstance(restored["opt_state"], ScaleBySoapState)
  resumed = run(restored["params"], restored["opt_state"], grads[4:])
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(reference[0]["w"]), np.asarray(F32_PARAMS["w"]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(b1=1.0), "b1"), (dict(b2=-0.1), "b2"), (dict(eps=-1.0), "eps"),
    (dict(precondition_frequency=0), "precondition_frequency"),
    (dict(block_size=0), "block_size"), (dict(max_precond_dim=2.5), "max_precond_dim"),
    (dict(shampoo_beta=1.5), "shampoo_beta"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    scale_by_soap(**kwargs)


def test_bad_dimension_numbers_name_the_leaf():
  tx = scale_by_soap(weight_dimension_numbers={"w": MuonDimensionNumbers(0, 3)})
  with pytest.raises(ValueError, match=r"\['w'\]"):
    tx.init({"w": jnp.ones((2, 3, 4))})


def test_integer_params_are_a_type_error():
  with pytest.raises(TypeError, match="w"):
    scale_by_soap().init({"w": jnp.ones((2, 2), jnp.int32)})


def test_eps_zero_reads_zero_over_zero_as_zero():
  """eps = 0 (documented as allowed): an entry whose second moment is exactly 0 gets a zero
  direction, the others Adam's (checked against NumPy, with 0/0 read as 0)."""
  b1, b2 = 0.9, 0.99
  tx = scale_by_soap(b1=b1, b2=b2, eps=0.0)
  params = {"v": jnp.zeros(4), "w": jnp.zeros((2, 3))}
  g = {"v": jnp.array([1.0, 0.0, -2.0, 0.0]), "w": jnp.ones((2, 3)).at[0].set(0.0)}
  state = tx.init(params)
  m = np.zeros(4)
  v = np.zeros(4)
  for k in range(4):
    u, state = tx.update(g, state, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    if k == 0:  # the first call only collects statistics
      continue
    gv = np.asarray(g["v"], np.float64)
    m, v = b1 * m + (1 - b1) * gv, b2 * v + (1 - b2) * gv ** 2
    scale = np.sqrt(1 - b2 ** k) / (1 - b1 ** k)
    expected = np.where(v == 0, 0.0, scale * m / np.where(v == 0, 1.0, np.sqrt(v)))
    np.testing.assert_allclose(np.asarray(u["v"]), expected, rtol=1e-5)


def test_renamed_keys_name_the_path_and_donation_works():
  tx = soap(1e-2)
  params = {"a": jnp.ones((2, 3)), "b": jnp.ones(3)}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"\['b'\].*\['c'\]"):
    tx.update({"a": params["a"], "c": params["b"]}, state, params)
  step = jax.jit(lambda p, s: (lambda u_s: (optax.apply_updates(p, u_s[0]), u_s[1]))(
      tx.update(p, s, p)), donate_argnums=(0, 1))
  p, s = jax.tree.map(jnp.copy, params), state
  for _ in range(3):
    p, s = step(p, s)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((p, s)))


def test_negative_learning_rate_and_zero_frequency_are_errors():
  with pytest.raises(ValueError, match="learning_rate"):
    soap(-1e-3)
  with pytest.raises(ValueError, match="precondition_frequency"):
    optax.inject_hyperparams(scale_by_soap)(precondition_frequency=0).init({"w": jnp.ones(2)})
