"""scale_by_hutchinson / adahessian against hand-written NumPy references of the update rule."""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from secondorder.dimension_numbers import MuonDimensionNumbers, leaf_axes
from secondorder.transforms.hutchinson import (
    adahessian, scale_by_hutchinson, spatial_axes, value_grad_and_hessian_diag)

STEPS = 25

# A separable objective: each entry has its own curvature, so the Hessian is diagonal and a
# single Rademacher probe gives it exactly (z * (H z) = diag(H) * z**2 = diag(H)).
# f(x) = sum a (x - c)^2 / 2 + q (x - c)^4 / 12,  g = a d + q d^3 / 3,  diag H = a + q d^2.
SHAPES = {"w": (7,), "k": (2, 2, 2, 3)}   # a vector and a (H, W, in, out) conv kernel


def _separable_problem(seed: int, quartic: bool):
  rng = np.random.default_rng(seed)
  coef = {}
  for name, shape in SHAPES.items():
    a = np.exp(rng.uniform(0.0, np.log(20.0), shape))
    q = rng.uniform(0.5, 2.0, shape) if quartic else np.zeros(shape)
    c = rng.uniform(-1.0, 1.0, shape)
    coef[name] = (a, q, c)
  x0 = {name: rng.uniform(-1.0, 1.0, shape).astype(np.float32) for name, shape in SHAPES.items()}

  def loss(p):
    total = 0.0
    for name, (a, q, c) in coef.items():
      dtype = p[name].dtype
      d = p[name] - jnp.asarray(c, dtype)
      total = total + jnp.sum(jnp.asarray(a, dtype) * d ** 2 / 2 + jnp.asarray(q, dtype) * d ** 4 / 12)
    return total

  def np_grad_and_diag(p):
    g, h = {}, {}
    for name, (a, q, c) in coef.items():
      d = p[name] - c
      g[name] = a * d + q * d ** 3 / 3
      h[name] = a + q * d ** 2
    return g, h

  return x0, loss, np_grad_and_diag


def _np_block_mean(d, block):
  flat = d.reshape(-1)
  out = np.empty_like(flat)
  for start in range(0, flat.size, block):
    out[start:start + block] = flat[start:start + block].mean()
  return out.reshape(d.shape)


def _np_adahessian(x0, np_grad_and_diag, *, lr, b1, b2, eps, power, interval, wd, block,
                   spatial, steps=STEPS):
  """The reference's update rule, written out entry by entry in float64."""
  x = {k: v.astype(np.float64) for k, v in x0.items()}
  m = {k: np.zeros_like(v) for k, v in x.items()}
  v = {k: np.zeros_like(v) for k, v in x.items()}
  n = 0
  trajectory = []
  for t in range(steps):
    g, hdiag = np_grad_and_diag(x)
    if t % interval == 0:
      n += 1
      for k in x:
        dk = np.abs(hdiag[k])
        if spatial and dk.ndim >= 3:
          dk = np.broadcast_to(dk.mean(axis=(0, 1), keepdims=True), dk.shape)
        elif block is not None:
          dk = _np_block_mean(dk, block)
        v[k] = b2 * v[k] + (1 - b2) * dk ** 2
    for k in x:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      m_hat = m[k] / (1 - b1 ** (t + 1))
      v_hat = v[k] / (1 - b2 ** n)
      u = m_hat / (np.sqrt(v_hat) ** power + eps)
      x[k] = x[k] - lr * (u + wd * x[k])
    trajectory.append({k: val.copy() for k, val in x.items()})
  return trajectory


def _run(tx, x0, loss, steps=STEPS, obj_fn_for_step=None):
  @jax.jit
  def step(params, state, t):
    obj_fn = loss if obj_fn_for_step is None else obj_fn_for_step(t)
    updates, state = tx.update(jax.grad(loss)(params), state, params, obj_fn=obj_fn)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.asarray, x0)
  state = tx.init(params)
  trajectory = []
  for t in range(steps):
    params, state = step(params, state, jnp.int32(t))
    trajectory.append(params)
  return trajectory, state


CONFIGS = {
    # name: (quartic, hyperparameters)
    "quadratic_every_step": (False, dict(lr=0.15, b1=0.9, b2=0.999, eps=1e-4, power=1.0,
                                         interval=1, wd=0.0, block=None, spatial=True)),
    "quadratic_every_4": (False, dict(lr=0.1, b1=0.8, b2=0.9, eps=1e-3, power=0.5,
                                      interval=4, wd=0.01, block=3, spatial=True)),
    "quartic_every_5": (True, dict(lr=0.1, b1=0.9, b2=0.95, eps=1e-4, power=1.0,
                                   interval=5, wd=0.0, block=2, spatial=False)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_numpy_reference(name):
  """In float64 (statistics follow float64 params) the trajectory agrees to ~1e-12."""
  quartic, hp = CONFIGS[name]
  x0, loss, np_gd = _separable_problem(seed=len(name), quartic=quartic)
  tx = adahessian(hp["lr"], b1=hp["b1"], b2=hp["b2"], eps=hp["eps"], hessian_power=hp["power"],
                  update_interval=hp["interval"], weight_decay=hp["wd"],
                  block_size=hp["block"], spatial_averaging=hp["spatial"], seed=3)
  with jax.enable_x64(True):
    got, state = _run(tx, {k: v.astype(np.float64) for k, v in x0.items()}, loss)
  want = _np_adahessian(x0, np_gd, **hp)
  for t, (g, w) in enumerate(zip(got, want)):
    for k in SHAPES:
      assert g[k].dtype == np.float64
      np.testing.assert_allclose(np.asarray(g[k]), w[k], rtol=1e-10, atol=1e-12,
                                 err_msg=f"step {t}, leaf {k}")
  inner = optax.tree.get(state, "ScaleByHutchinsonState")
  assert int(inner.count) == STEPS
  assert int(inner.hessian_count) == -(-STEPS // hp["interval"])
  assert int(inner.nonfinite_count) == 0


def test_spatial_averaging_uses_hwio_spatial_axes():
  """The estimate of a (H, W, in, out) kernel is averaged over H and W only, per channel pair;
  a rank-3 leaf (an attention kernel [d, heads, head_dim] has the rank of a 1-D conv) is
  left as it is; a per-leaf mask turns the averaging off for chosen leaves."""
  rng = np.random.default_rng(0)
  scale = {"k": rng.uniform(1.0, 9.0, (3, 2, 2, 4)), "t": rng.uniform(1.0, 9.0, (2, 3, 4))}
  loss = lambda p: sum(0.5 * jnp.sum(jnp.asarray(scale[k], jnp.float32) * p[k] ** 2) for k in p)
  params = {k: jnp.ones(v.shape, jnp.float32) for k, v in scale.items()}
  grads = jax.grad(loss)(params)

  def nu_after_one_step(spatial):
    tx = scale_by_hutchinson(b2=0.0, spatial_averaging=spatial)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, obj_fn=loss))
    _, state = update(grads, tx.init(params), params)
    return {k: np.sqrt(np.asarray(v)) for k, v in state.nu.items()}

  k_averaged = np.broadcast_to(scale["k"].mean((0, 1), keepdims=True), scale["k"].shape)
  d = nu_after_one_step(True)
  np.testing.assert_allclose(d["k"], k_averaged, rtol=1e-6)
  np.testing.assert_allclose(d["t"], scale["t"], rtol=1e-6)
  d = nu_after_one_step({"k": False, "t": True})
  for k, s in scale.items():
    np.testing.assert_allclose(d[k], s, rtol=1e-6)
  d = nu_after_one_step(lambda p: jax.tree.map(lambda _: False, p))
  for k, s in scale.items():
    np.testing.assert_allclose(d[k], s, rtol=1e-6)


@pytest.mark.parametrize("shape,spec,want", [
    ((3, 3, 4, 5), None, (0, 1)),                              # 2-D conv
    ((2, 2, 2, 4, 5), None, (0, 1, 2)),                        # 3-D conv
    ((4, 2, 3), None, ()),                                     # attention / 1-D conv / stack
    ((6, 4, 2, 3), MuonDimensionNumbers(1, (2, 3)), ()),       # stacked attention q/k/v
    ((6, 2, 3, 4), MuonDimensionNumbers((1, 2), 3), ()),       # stacked attention out
    ((6, 3, 3, 4, 5), MuonDimensionNumbers((1, 2, 3), 4), (1, 2)),   # stacked conv
    ((3, 3, 4, 5), MuonDimensionNumbers(2, 3), ()),            # taps read as layers
    ((6, 4, 5), MuonDimensionNumbers(1, 2), ()),               # dense stack
])
def test_spatial_axes_rule(shape, spec, want):
  axes = None if spec is None else leaf_axes(spec, shape)
  assert spatial_axes(shape, axes) == want


def _conv(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_scanned_stack_estimate_equals_unrolled_model():
  """L conv + dense layers stored as [L, 3, 3, c, c] and [L, c, c] leaves and run with
  lax.scan, against the same layers as 2L separate leaves run in a Python loop: the same
  probe gives the same z * Hz (float64), and with the stacks' dimension numbers AdaHessian's
  averaged estimate of layer l is the unrolled layer's (conv averaged over its 3 x 3 taps
  only, per layer). Without them the 5-D stack is read as a 3-D conv and averaged across
  its layers, which the last assertion shows."""
  L, c = 3, 2
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (2, 4, 4, c), jnp.float64)
    stacked = {"conv": 0.5 * jax.random.normal(keys[1], (L, 3, 3, c, c), jnp.float64),
               "dense": 0.5 * jax.random.normal(keys[2], (L, c, c), jnp.float64)}
    unrolled = {f"{name}{l}": stacked[name][l] for name in stacked for l in range(L)}

    def layer(h, conv_k, dense_k):
      return jnp.tanh(jnp.tanh(_conv(h, conv_k)) @ dense_k)

    def scanned_loss(p):
      h, _ = jax.lax.scan(lambda h, w: (layer(h, w["conv"], w["dense"]), None), x, p)
      return jnp.sum(h ** 3)

    def unrolled_loss(p):
      h = x
      for l in range(L):
        h = layer(h, p[f"conv{l}"], p[f"dense{l}"])
      return jnp.sum(h ** 3)

    z = jax.tree.map(lambda a: jnp.where(jax.random.bernoulli(keys[3], 0.5, a.shape), 1., -1.),
                     stacked)
    z_unrolled = {f"{name}{l}": z[name][l] for name in z for l in range(L)}
    hz = jax.jit(lambda p, v: jax.jvp(jax.grad(scanned_loss), (p,), (v,))[1])(stacked, z)
    hz_unrolled = jax.jit(lambda p, v: jax.jvp(jax.grad(unrolled_loss), (p,), (v,))[1])(
        unrolled, z_unrolled)
    raw = jax.tree.map(jnp.multiply, z, hz)
    raw_unrolled = jax.tree.map(jnp.multiply, z_unrolled, hz_unrolled)
    for name in stacked:
      for l in range(L):
        np.testing.assert_allclose(raw[name][l], raw_unrolled[f"{name}{l}"], rtol=1e-12,
                                   atol=1e-14)

    def nu(params, raw_estimate, dims):
      tx = scale_by_hutchinson(b2=0.0, weight_dimension_numbers=dims)
      update = jax.jit(lambda p, s, h: tx.update(p, s, p, hessian_diag=h)[1].nu)
      return update(params, tx.init(params), raw_estimate)

    dims = {"conv": MuonDimensionNumbers((1, 2, 3), 4), "dense": MuonDimensionNumbers(1, 2)}
    got = nu(stacked, raw, dims)
    want = nu(unrolled, raw_unrolled, None)
    for name in stacked:
      for l in range(L):
        np.testing.assert_allclose(got[name][l], want[f"{name}{l}"], rtol=1e-12)
    conv_nu = np.asarray(want["conv0"])
    assert np.allclose(conv_nu, conv_nu[:1, :1]) and conv_nu.std() > 0  # taps share one value
    blind = nu(stacked, raw, None)
    assert not np.allclose(blind["conv"][0], want["conv0"], rtol=1e-3)


def test_block_averaging_stays_inside_each_layer():
  """block_size with dimension numbers averages blocks of each layer's matrix: a [2, 3, 1]
  stack with blocks of 2 is two layers of 3 entries, never a block spanning both."""
  d = jnp.arange(1.0, 7.0).reshape(2, 3, 1)
  tx = scale_by_hutchinson(b2=0.0, block_size=2,
                           weight_dimension_numbers=MuonDimensionNumbers(1, 2))
  _, state = tx.update(d, tx.init(d), d, hessian_diag=d)
  want = np.array([1.5, 1.5, 3.0, 4.5, 4.5, 6.0]).reshape(2, 3, 1)
  np.testing.assert_allclose(np.sqrt(np.asarray(state.nu)), want, rtol=1e-6)


def test_dimension_numbers_that_do_not_fit_name_the_leaf():
  params = {"stack": jnp.ones((2, 3, 4))}
  tx = adahessian(weight_dimension_numbers={"stack": MuonDimensionNumbers(1, 3)})
  with pytest.raises(ValueError, match=r"\['stack'\].*\(2, 3, 4\).*MuonDimensionNumbers"):
    tx.init(params)


def _mlp_problem():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (16, 3))
  y = jax.random.normal(k2, (16, 2))
  params = {"w1": 0.5 * jax.random.normal(k3, (3, 4)), "b1": jnp.zeros(4),
            "w2": 0.5 * jax.random.normal(k1, (4, 2))}

  def loss(p):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] - y) ** 2)

  return params, loss


def test_independent_probe_per_leaf_matches_dense_expectation():
  """E|z * Hz| over seeds equals the exact expectation computed from the dense Hessian by
  enumerating every sign vector. Leaves "a" and "b" have the same shape and are coupled, so
  reusing one key for both (z_a = z_b) would double the estimate of their entries."""
  s = np.array([1.0, 2.0, 3.0])
  r = np.array([[1.0, 2.0], [3.0, 4.0]])

  def loss(p):
    return (0.5 * jnp.sum(s * (p["a"] + p["b"]) ** 2) + 0.25 * (jnp.sum(p["c"]) + p["a"][0]) ** 2
            + 0.5 * jnp.sum(r * p["c"] ** 2))

  params = {"a": jnp.zeros(3), "b": jnp.zeros(3), "c": jnp.zeros((2, 2))}
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  hess = np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat), np.float64)
  n = hess.shape[0]
  signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * n, indexing="ij")).reshape(n, -1).T
  want = np.abs(signs * (signs @ hess)).mean(axis=0)
  grads = jax.grad(loss)(params)
  tx = scale_by_hutchinson(b2=0.0, spatial_averaging=False)

  def one(seed):
    state = tx.init(params)._replace(key=jax.random.PRNGKey(seed))
    _, state = tx.update(grads, state, params, obj_fn=loss)
    return jax.flatten_util.ravel_pytree(jax.tree.map(jnp.sqrt, state.nu))[0]

  got = np.asarray(jax.jit(jax.vmap(one))(jnp.arange(400))).mean(axis=0)
  np.testing.assert_allclose(got, want, rtol=0.15)


def test_one_pass_helper_equals_obj_fn_path():
  """value_grad_and_hessian_diag gives the loss, the gradient and the same probe's estimate,
  so both ways of driving adahessian give the same trajectory."""
  params, loss = _mlp_problem()
  tx = adahessian(0.05, weight_decay=1e-3)

  @jax.jit
  def step_two_pass(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p, obj_fn=loss)
    return optax.apply_updates(p, u), s

  @jax.jit
  def step_one_pass(p, s):
    value, grads, hdiag = value_grad_and_hessian_diag(loss, p, s)
    u, s = tx.update(grads, s, p, hessian_diag=hdiag)
    return optax.apply_updates(p, u), s, value, grads

  pa, sa = params, tx.init(params)
  pb, sb = params, tx.init(params)
  value_and_grad = jax.jit(jax.value_and_grad(loss))
  for _ in range(3):
    want_value, want_grads = value_and_grad(pb)
    pa, sa = step_two_pass(pa, sa)
    pb, sb, value, grads = step_one_pass(pb, sb)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    for k in params:
      np.testing.assert_allclose(grads[k], want_grads[k], rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(pa[k], pb[k], rtol=1e-6, atol=1e-7)


def test_hvp_only_on_refresh_steps():
  """Counted on the host: obj_fn is evaluated only on steps 0, 10, 20 of 30 with k = 10."""
  x0, loss, _ = _separable_problem(seed=0, quartic=False)
  calls = []

  def obj_fn_for_step(t):
    def obj_fn(p):
      jax.debug.callback(lambda s: calls.append(int(s)), t)
      return loss(p)
    return obj_fn

  _run(adahessian(0.1, update_interval=10), x0, loss, steps=30, obj_fn_for_step=obj_fn_for_step)
  assert calls and sorted(set(calls)) == [0, 10, 20]


def test_nonfinite_estimate_is_skipped_and_counted():
  x0, loss, _ = _separable_problem(seed=1, quartic=False)
  poisoned_at = 2

  def obj_fn_for_step(t):
    return lambda p: loss(p) * jnp.where(t == poisoned_at, jnp.nan, 1.0)

  tx = scale_by_hutchinson()
  clean, clean_state = _run(tx, x0, loss, steps=poisoned_at)
  poisoned, state = _run(tx, x0, loss, steps=poisoned_at + 1, obj_fn_for_step=obj_fn_for_step)
  assert int(state.nonfinite_count) == 1
  assert int(state.hessian_count) == poisoned_at
  for k in SHAPES:
    np.testing.assert_array_equal(state.nu[k], clean_state.nu[k])
    assert np.all(np.isfinite(np.asarray(poisoned[-1][k])))


def test_missing_obj_fn_shows_the_call():
  tx = adahessian()
  params = jnp.ones(3)
  with pytest.raises(ValueError, match=r"obj_fn.*tx\.update\(grads, state, params, obj_fn="):
    tx.update(params, tx.init(params), params)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(b1=1.0), "b1"), (dict(b2=-0.1), "b2"), (dict(eps=-1.0), "eps"),
    (dict(hessian_power=1.5), "hessian_power"), (dict(update_interval=0), "update_interval"),
    (dict(update_interval=2.5), "update_interval"), (dict(block_size=0), "block_size"),
    (dict(spatial_averaging="yes"), "spatial_averaging"), (dict(learning_rate=-1.0), "learning_rate"),
    (dict(weight_decay=-1e-3), "weight_decay"),
])
def test_bad_hyperparameters_raise(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    adahessian(**kwargs)


def test_refresh_must_be_a_python_bool():
  tx = adahessian(update_interval=2)
  params = jnp.ones(3)
  loss = lambda p: jnp.sum(p ** 2)
  with pytest.raises(ValueError, match="refresh"):
    tx.update(params, tx.init(params), params, obj_fn=loss, refresh=jnp.array(True))
  # A plain host-scheduled step needs no obj_fn and leaves the curvature untouched.
  state = tx.init(params)
  _, state = tx.update(params, state, params, obj_fn=loss, refresh=True)
  _, after = tx.update(params, state, params, refresh=False)
  np.testing.assert_array_equal(after[0].nu, state[0].nu)
  assert int(after[0].hessian_count) == 1 and int(after[0].count) == 2


@pytest.mark.parametrize("refresh", [False, np.False_])
def test_estimate_on_a_plain_step_is_an_error(refresh):
  # A ready estimate on a step declared plain would be dropped without a word.
  tx = scale_by_hutchinson()
  params = jnp.ones(3)
  with pytest.raises(ValueError, match="hessian_diag= was given with refresh=False"):
    tx.update(params, tx.init(params), params, hessian_diag=jnp.ones(3), refresh=refresh)


def test_one_pass_helper_returns_the_aux_of_the_gradient_pass():
  """has_aux=True: value, gradient and z * Hz as without it, plus obj_fn's aux."""
  params, loss = _mlp_problem()
  tx = adahessian(0.05)
  state = tx.init(params)
  want = value_grad_and_hessian_diag(loss, params, state)
  got = jax.jit(lambda p, s: value_grad_and_hessian_diag(
      lambda q: (loss(q), {"seen": q["b1"] + 1.0}), p, s, has_aux=True))(params, state)
  for a, b in zip(jax.tree.leaves(got[:3]), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got[3]["seen"], params["b1"] + 1.0)
