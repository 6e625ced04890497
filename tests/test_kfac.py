"""scale_by_kfac_factors / kfac against dense references (jax.jacfwd, NumPy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from secondorder import capture
from secondorder.capture import KfacLayer, KfacLayers, LayerStats
from secondorder.transforms.kfac import kfac, scale_by_kfac_factors


# ----------------------------------------------------------------------------- models


class DeepLinear(nn.Module):

  @nn.compact
  def __call__(self, x):
    for width in (4, 3, 2):
      x = nn.Dense(width)(x)
    return x


class ConvDense(nn.Module):
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(3, (2, 2), strides=(2, 1), padding="SAME",
                         param_dtype=self.param_dtype)(x))
    return nn.Dense(4, param_dtype=self.param_dtype)(x.reshape(x.shape[0], -1))


def ce(z, y):
  return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()


def test_deep_linear_kronecker_block_equals_exact_ggn():
  """For a deep linear net with a Gaussian likelihood, Â ⊗ Ŝ is the exact GGN/Fisher block."""
  bsz = 5
  x = jax.random.normal(jax.random.key(0), (bsz, 3))
  m = DeepLinear()
  params = m.init(jax.random.key(1), x)["params"]
  cap = capture.linen_capture(m, lambda z, y: 0.5 * jnp.sum((z - y) ** 2) / z.shape[0],
                              likelihood="gaussian", fisher="exact")
  _, _, stats = jax.jit(cap)(params, x, jnp.zeros((bsz, 2)))
  for name in ("Dense_0", "Dense_1", "Dense_2"):
    kernel, bias = params[name]["kernel"], params[name]["bias"]
    w0 = jnp.concatenate([kernel, bias[None]], axis=0)              # [in + 1, out]

    def outputs(w, name=name):
      p = dict(params)
      p[name] = {"kernel": w[:-1], "bias": w[-1]}
      return m.apply({"params": p}, x)                             # [B, 2]

    jac = jax.jacfwd(outputs)(w0).reshape(bsz, 2, -1)               # row-major vec(W)
    ggn = np.einsum("bci,bcj->ij", jac, jac) / bsz                  # H_L = I
    kron = np.kron(np.asarray(stats[name].a, np.float64), np.asarray(stats[name].s, np.float64))
    np.testing.assert_allclose(kron, ggn, rtol=1e-5, atol=1e-6 * np.abs(ggn).max())


# ----------------------------------------------------------------------------- NumPy reference


def _np_precondition(a, s, g, lam, mode):
  a, s, g = (np.asarray(v, np.float64) for v in (a, s, g))
  if mode == "factored":
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(s) / s.shape[0]))
    return (np.linalg.inv(a + pi * np.sqrt(lam) * np.eye(a.shape[0])) @ g
            @ np.linalg.inv(s + np.sqrt(lam) / pi * np.eye(s.shape[0])))
  alpha, qa = np.linalg.eigh(a)
  sigma, qs = np.linalg.eigh(s)
  alpha, sigma = np.maximum(alpha, 0), np.maximum(sigma, 0)
  return qa @ ((qa.T @ g @ qs) / (np.outer(alpha, sigma) + lam)) @ qs.T


@pytest.fixture(scope="module")
def conv_dense_capture():
  """Statistics captured in float64, so that the factors are PSD to rounding."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (4, 4, 3, 2), jnp.float64)
    y = jnp.array([0, 1, 3, 2])
    m = ConvDense(param_dtype=jnp.float64)
    params = m.init(jax.random.key(1), x)["params"]
    cap = capture.linen_capture(m, ce, likelihood="softmax", fisher="empirical",
                                stats_dtype=jnp.float64)
    layers = cap.layers(params, x)
    loss, grads, stats = jax.jit(cap)(params, x, y)
    return layers, params, grads, stats


def _to64(tree):
  return jax.tree.map(lambda v: jnp.asarray(np.asarray(v, np.float64)), tree)


# pad_ratio 100 stacks all four factors (sizes 19, 9, 4 and 3) into one call, each padded
# to 19 with a decoupled block: the answer must not change.
@pytest.mark.parametrize("pad_ratio", [None, 100.0])
@pytest.mark.parametrize("mode", ["factored", "exact"])
def test_update_matches_numpy_dense_and_conv(conv_dense_capture, mode, pad_ratio):
  layers, params, grads, stats = conv_dense_capture
  lam = 3e-3
  with jax.enable_x64(True):
    tx = scale_by_kfac_factors(layers=layers, damping=lam, damping_mode=mode, decay=0.9,
                               update_interval=1, stats_dtype=jnp.float64,
                               pad_ratio=pad_ratio)
    p64, g64, st64 = _to64(params), _to64(grads), _to64(stats)
    state = tx.init(p64)
    upd, state = jax.jit(tx.update)(g64, state, p64, kfac_stats=st64)
    for layer in layers:
      name = layer.name
      kernel = np.asarray(g64[name]["kernel"])
      g = np.concatenate([kernel.reshape(-1, kernel.shape[-1]), np.asarray(g64[name]["bias"])[None]])
      ref = _np_precondition(st64[name].a, st64[name].s, g, lam, mode)
      got = np.concatenate([np.asarray(upd[name]["kernel"]).reshape(-1, kernel.shape[-1]),
                            np.asarray(upd[name]["bias"])[None]])
      assert upd[name]["kernel"].shape == kernel.shape
      np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


# ----------------------------------------------------------------------------- synthetic layers

SPEC = KfacLayers((KfacLayer("w", "dense", ("w",), ("b",), (3, 2)),
                   KfacLayer("k", "conv", ("k",), None, (2, 2, 1, 2))), ("v",))


def _params(dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 4)
  return {"w": jax.random.normal(keys[0], (3, 2), dtype), "b": jnp.zeros((2,), dtype),
          "k": jax.random.normal(keys[1], (2, 2, 1, 2), dtype),
          "v": jax.random.normal(keys[2], (5,), dtype)}


def _spd(key, n, rank=None):
  m = jax.random.normal(key, (rank or n + 2, n))
  return m.T @ m / m.shape[0]


def _stats(seed):
  k = jax.random.split(jax.random.key(seed), 4)
  return {"w": LayerStats(_spd(k[0], 4), _spd(k[1], 2)),
          "k": LayerStats(_spd(k[2], 4, rank=2), _spd(k[3], 2))}


def _grads(seed, dtype=jnp.float32):
  return jax.tree.map(lambda p, i: jax.random.normal(jax.random.key(seed + i), p.shape, dtype),
                      _params(dtype), {"w": 0, "b": 1, "k": 2, "v": 3})


def test_ema_bias_correction_and_nonfinite_skip():
  beta = 0.8
  tx = scale_by_kfac_factors(layers=SPEC, damping=1e-2, decay=beta, update_interval=1,
                             damping_mode="exact")
  update = jax.jit(tx.update)
  params = _params()
  state = tx.init(params)
  s1, s2 = _stats(1), _stats(2)
  _, state = update(_grads(0), state, params, kfac_stats=s1)
  _, state = update(_grads(10), state, params, kfac_stats=s2)
  for name in ("w", "k"):
    for j, f in ((0, "a"), (1, "s")):
      want = (beta * (1 - beta) * s1[name][j] + (1 - beta) * s2[name][j]) / (1 - beta ** 2)
      got = getattr(state, f)[name] / state.factor_weight
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
      w, v = getattr(state, f + "_eigvals")[name], getattr(state, f + "_eigvecs")[name]
      np.testing.assert_allclose((v * w) @ v.T, want, rtol=1e-4, atol=1e-5)
  before = state
  bad = {"w": LayerStats(s1["w"].a.at[0, 0].set(jnp.nan), s1["w"].s), "k": s1["k"]}
  upd, state = update(_grads(20), state, params, kfac_stats=bad)
  assert int(state.num_skipped) == 1 and int(before.num_skipped) == 0
  for f in ("a", "s", "a_eigvals", "a_eigvecs", "s_eigvals", "s_eigvecs", "a_inverse",
            "s_inverse"):
    jax.tree.map(np.testing.assert_array_equal, getattr(state, f), getattr(before, f))
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(upd))
  # The skipped step still preconditions, with the factors it kept: the same as a step fed
  # the current running averages themselves (which leaves them unchanged).
  kept = {n: LayerStats(before.a[n] / before.factor_weight, before.s[n] / before.factor_weight)
          for n in ("w", "k")}
  ref, _ = update(_grads(20), before, params, kfac_stats=kept)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), upd, ref)


def test_step_without_new_statistics_keeps_the_factors():
  """`kfac_stats=no_new_stats()` (a step that ran no capture): the running factors and
  their weight stay, the refresh schedule runs on, the update is the one of a step fed the
  current running averages (which leave them unchanged), and the state keeps one
  structure, also under optax.inject_hyperparams."""
  for mode in ("exact", "factored"):
    tx = scale_by_kfac_factors(layers=SPEC, damping=1e-2, decay=0.8, update_interval=2,
                               damping_mode=mode)
    update = jax.jit(tx.update)
    params = _params()
    state = tx.init(params)
    _, state = update(_grads(0), state, params, kfac_stats=_stats(1))
    kept = {n: LayerStats(state.a[n] / state.factor_weight, state.s[n] / state.factor_weight)
            for n in ("w", "k")}
    for t in (1, 2):   # one plain step, then one that refreshes (count 2)
      before = state
      upd, state = update(_grads(t), before, params, kfac_stats=capture.no_new_stats())
      ref, ref_state = update(_grads(t), before, params, kfac_stats=kept)
      assert (jax.tree.structure(state) == jax.tree.structure(before)
              == jax.tree.structure(ref_state))
      for f in ("a", "s"):
        jax.tree.map(np.testing.assert_array_equal, getattr(state, f), getattr(before, f))
      assert float(state.factor_weight) == float(before.factor_weight)
      assert int(state.count) == t + 1 and int(state.num_skipped) == 0
      jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
                   upd, ref)
    assert int(state.num_refreshes) == 2
  injected = optax.inject_hyperparams(kfac)(learning_rate=0.1, layers=SPEC)
  st = injected.init(params)
  _, st2 = jax.jit(injected.update)(_grads(0), st, params, kfac_stats=capture.no_new_stats())
  assert jax.tree.structure(st2) == jax.tree.structure(st)


def test_preconditioner_refreshes_every_t_steps():
  for mode, field in (("exact", "a_eigvecs"), ("factored", "a_inverse")):
    tx = scale_by_kfac_factors(layers=SPEC, damping=1e-2, update_interval=3, damping_mode=mode)
    update = jax.jit(tx.update)
    params = _params()
    state = tx.init(params)
    seen = []
    for t in range(7):
      prev = getattr(state, field)["w"]
      _, state = update(_grads(t), state, params, kfac_stats=_stats(t))
      seen.append(not np.array_equal(prev, getattr(state, field)["w"]))
    assert seen == [True, False, False, True, False, False, True]
    assert int(state.num_refreshes) == 3


@pytest.mark.parametrize("lr,kappa", [(1.0, 1e-3), (0.1, 1e-3), (0.01, 10.0), (0.3, 0.05)])
def test_kl_clipping_never_exceeds_budget(lr, kappa):
  """ν² η² Σ⟨v, g⟩ ≤ κ (the step's KL, ½ Δᵀ F Δ, stays within κ/2), with equality when clipped."""
  with jax.enable_x64(True):
    params = _to64(_params())
    plain = scale_by_kfac_factors(layers=SPEC, damping=1e-2, stats_dtype=jnp.float64)
    clipped = scale_by_kfac_factors(layers=SPEC, damping=1e-2, kl_clip=kappa, learning_rate=lr,
                                    stats_dtype=jnp.float64)
    g, st = _to64(_grads(5)), _to64(_stats(5))
    v, _ = plain.update(g, plain.init(params), params, kfac_stats=st)
    c, cstate = clipped.update(g, clipped.init(params), params, kfac_stats=st)
    vg = sum(float(jnp.vdot(v[k], g[k])) for k in ("w", "b", "k"))
    nu = float(c["w"][0, 0] / v["w"][0, 0])
    np.testing.assert_allclose(float(cstate.kl_scale), nu, rtol=1e-12)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, nu * y, rtol=1e-12), c, v)
    assert nu ** 2 * lr ** 2 * vg <= kappa * (1 + 1e-12)
    if lr ** 2 * vg > kappa:
      assert nu < 1
      np.testing.assert_allclose(nu ** 2 * lr ** 2 * vg, kappa, rtol=1e-10)
    else:
      assert nu == 1.0


def test_no_layers_is_the_diagonal_fallback_on_any_pytree():
  params = {"a": jnp.arange(3.0), "b": {"c": jnp.ones((2, 2))}}
  tx = scale_by_kfac_factors(layers=capture.no_layers())
  ref = optax.scale_by_rms(decay=0.999, eps=1e-8, eps_in_sqrt=False, bias_correction=True)
  state, rstate = tx.init(params), ref.init(params)
  for t in range(3):
    g = jax.tree.map(lambda p: jnp.sin(p + t), params)
    u, state = tx.update(g, state, params, kfac_stats=capture.no_stats())
    r, rstate = ref.update(g, rstate, params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), u, r)


def test_kfac_alias_minimises_a_quadratic_without_layers():
  target = {"x": jnp.array([1.0, -2.0, 3.0]), "y": jnp.array([[0.5]])}
  loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)
  params = jax.tree.map(jnp.zeros_like, target)
  tx = kfac(0.05, layers=capture.no_layers())
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p, kfac_stats=capture.no_stats())
    return optax.apply_updates(p, u), s

  for _ in range(300):
    params, state = step(params, state)
  assert float(loss(params)) < 1e-3


def test_uncovered_leaves_use_fallback_and_covered_differ():
  params, g, st = _params(), _grads(3), _stats(3)
  tx = scale_by_kfac_factors(layers=SPEC)
  u, _ = tx.update(g, tx.init(params), params, kfac_stats=st)
  rms = optax.scale_by_rms(decay=0.999, eps=1e-8, eps_in_sqrt=False, bias_correction=True)
  r, _ = rms.update(g, rms.init(params), params)
  np.testing.assert_allclose(u["v"], r["v"], rtol=1e-6)
  assert not np.allclose(u["w"], r["w"])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_keep_dtype(dtype):
  params, g = _params(dtype), _grads(1, dtype)
  tx = kfac(0.1, layers=SPEC)
  u, _ = jax.jit(tx.update)(g, tx.init(params), params, kfac_stats=_stats(1))
  for k in params:
    assert u[k].dtype == dtype and bool(jnp.all(jnp.isfinite(u[k].astype(jnp.float32))))


def test_errors_name_layer_and_shapes():
  params, g, st = _params(), _grads(0), _stats(0)
  tx = scale_by_kfac_factors(layers=SPEC)
  state = tx.init(params)
  with pytest.raises(ValueError, match="kfac_stats"):
    tx.update(g, state, params)
  with pytest.raises(ValueError, match=r"missing K-FAC layer 'k'.*\(2, 2, 1, 2\)"):
    tx.update(g, state, params, kfac_stats={"w": st["w"]})
  bad = dict(st, w=LayerStats(jnp.eye(3), st["w"].s))
  with pytest.raises(ValueError, match=r"layer 'w'.*A \(3, 3\).*expected A \(4, 4\)"):
    tx.update(g, state, params, kfac_stats=bad)
  with pytest.raises(ValueError, match="not built with"):
    tx.update(g, state, params, kfac_stats=dict(st, z=st["w"]))
  with pytest.raises(ValueError, match=r"layer 'w'.*kernel w has shape \(2, 3\).*\(3, 2\)"):
    tx.init(dict(params, w=jnp.zeros((2, 3))))
  partial = {"w": params["w"], "b": params["b"], "v": params["v"]}
  with pytest.raises(ValueError, match=r"layer 'k'.*kernel k is not in the updates"):
    tx.update(partial, tx.init(partial), partial, kfac_stats=st)
  with pytest.raises(ValueError, match="not built with"):
    t0 = scale_by_kfac_factors(layers=capture.no_layers())
    t0.update(g, t0.init(params), params, kfac_stats=st)
  with pytest.raises(ValueError, match="learning_rate"):
    scale_by_kfac_factors(layers=SPEC, kl_clip=1e-3)
  with pytest.raises(ValueError, match="damping"):
    scale_by_kfac_factors(layers=SPEC, damping=0.0)
  with pytest.raises(ValueError, match="decay"):
    scale_by_kfac_factors(layers=SPEC, decay=1.0)
  with pytest.raises(ValueError, match="update_interval"):
    scale_by_kfac_factors(layers=SPEC, update_interval=0)
  with pytest.raises(ValueError, match="damping_mode"):
    scale_by_kfac_factors(layers=SPEC, damping_mode="pi")
  with pytest.raises(ValueError, match="layers"):
    scale_by_kfac_factors(layers=None)
  with pytest.raises(ValueError, match="momentum"):
    kfac(0.1, layers=SPEC, momentum=1.5)


def test_inject_hyperparams_and_damping_schedule():
  params, g, st = _params(), _grads(0), _stats(0)
  tx = optax.inject_hyperparams(kfac)(learning_rate=0.1, damping=1e-2, layers=SPEC)
  u, s = jax.jit(tx.update)(g, tx.init(params), params, kfac_stats=st)
  ref_tx = kfac(0.1, layers=SPEC, damping=optax.constant_schedule(1e-2))
  r, _ = ref_tx.update(g, ref_tx.init(params), params, kfac_stats=st)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5), u, r)


def test_stack_plan_groups_factors_by_size():
  from secondorder.transforms._kfac_stacks import plan_stacks as _plan_stacks
  layers = (KfacLayer("p", "dense", ("p",), ("pb",), (32, 32)),   # A 33, S 32
            KfacLayer("q", "dense", ("q",), ("qb",), (32, 32)),   # A 33, S 32
            KfacLayer("r", "dense", ("r",), None, (8, 4)))        # A 8, S 4
  exact = _plan_stacks(layers, 1.0)
  assert [(st.size, st.members) for st in exact] == [
      (33, (("p", 0, 0), ("q", 0, 0))), (32, (("p", 1, 0), ("q", 1, 0))), (8, (("r", 0, 0),)),
      (4, (("r", 1, 0),))]
  padded = _plan_stacks(layers, 1.25)
  assert [(st.size, st.dims) for st in padded] == [(33, (33, 33, 32, 32)), (8, (8,)), (4, (4,))]
  assert [st.size for st in _plan_stacks(layers, 10.0)] == [33]
  assert [len(st.members) for st in _plan_stacks(layers, None)] == [1] * 6


def test_factor_sharding_and_pad_ratio_errors():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  with pytest.raises(TypeError, match="factor_sharding must be a jax.sharding.NamedSharding"):
    scale_by_kfac_factors(layers=SPEC, factor_sharding=P("data"))
  with pytest.raises(ValueError, match="stack axis only"):
    scale_by_kfac_factors(layers=SPEC, factor_sharding=NamedSharding(mesh, P(None, "data")))
  with pytest.raises(ValueError, match="pad_ratio"):
    scale_by_kfac_factors(layers=SPEC, pad_ratio=0.5)
  tx = optax.inject_hyperparams(kfac)(learning_rate=0.1, layers=SPEC, pad_ratio=2.0)
  params = _params()
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(tx.update)(_grads(0), tx.init(params), params, kfac_stats=_stats(0))
  # On a one-device mesh the sharded refresh gives the unsharded answer.
  params, g, st = _params(), _grads(0), _stats(0)
  ref = scale_by_kfac_factors(layers=SPEC, damping=1e-2)
  got = scale_by_kfac_factors(layers=SPEC, damping=1e-2, pad_ratio=4.0,
                              factor_sharding=NamedSharding(mesh, P("data")))
  r, _ = ref.update(g, ref.init(params), params, kfac_stats=st)
  u, _ = jax.jit(got.update)(g, got.init(params), params, kfac_stats=st)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), u, r)


@pytest.mark.parametrize("hyper", [dict(momentum=0.0), dict(momentum=0.7),
                                   dict(weight_decay=0.0), dict(kl_clip=1e-2)])
def test_state_structure_same_with_and_without_inject_hyperparams(hyper):
  """A Python 0 and an injected 0 give one state structure, so checkpoints load either way."""
  params = _params()
  plain = kfac(0.1, layers=SPEC, **hyper).init(params)
  injected = optax.inject_hyperparams(kfac)(learning_rate=0.1, layers=SPEC, **hyper).init(params)
  assert (jax.tree.structure(plain) == jax.tree.structure(injected.inner_state))
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x.shape, y.shape), plain,
               injected.inner_state)
