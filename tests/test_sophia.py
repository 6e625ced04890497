"""sophia_clip / sophia against NumPy references, a hand-computed Sophia-G estimate, and
optax.contrib.sophia (whose two start-up flaws this implementation fixes)."""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

from secondorder.transforms.sophia import sophia, sophia_clip

STEPS = 25
SHAPES = {"w": (6,), "m": (3, 4)}


def _separable_problem(seed: int, quartic: bool):
  """f = sum a d^2/2 + q d^4/12 with d = x - c: diagonal Hessian a + q d^2, so one
  Rademacher probe is exact."""
  rng = np.random.default_rng(seed)
  coef = {}
  for name, shape in SHAPES.items():
    a = np.exp(rng.uniform(0.0, np.log(20.0), shape))
    q = rng.uniform(0.5, 2.0, shape) if quartic else np.zeros(shape)
    coef[name] = (a, q, rng.uniform(-1.0, 1.0, shape))
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


def _np_sophia(x0, np_grad_and_diag, *, lr, b1, b2, gamma, eps, interval, wd, bias_correction,
               steps=STEPS):
  """The update rule of sophia_clip's docstring, entry by entry in float64."""
  x = {k: v.astype(np.float64) for k, v in x0.items()}
  m = {k: np.zeros_like(v) for k, v in x.items()}
  h = {k: np.zeros_like(v) for k, v in x.items()}
  n = 0
  trajectory, win_rates = [], []
  for t in range(steps):
    g, hdiag = np_grad_and_diag(x)
    if t % interval == 0:          # refresh before the update of the same step
      n += 1
      for k in x:
        h[k] = b2 * h[k] + (1 - b2) * hdiag[k]
    not_clipped, size = 0, 0
    for k in x:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      m_hat = m[k] / (1 - b1 ** (t + 1)) if bias_correction else m[k]
      h_hat = h[k] / (1 - b2 ** n) if bias_correction else h[k]
      ratio = m_hat / np.maximum(gamma * h_hat, eps)
      not_clipped += int(np.sum(np.abs(ratio) < 1))
      size += ratio.size
      x[k] = x[k] - lr * wd * x[k] - lr * np.clip(ratio, -1, 1)
    trajectory.append({k: v.copy() for k, v in x.items()})
    win_rates.append(not_clipped / size)
  return trajectory, win_rates


def _run(tx, x0, loss, steps=STEPS, obj_fn_for_step=None):
  @jax.jit
  def step(params, state, t):
    obj_fn = loss if obj_fn_for_step is None else obj_fn_for_step(t)
    updates, state = tx.update(jax.grad(loss)(params), state, params, obj_fn=obj_fn)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.asarray, x0)
  state = tx.init(params)
  trajectory, states = [], []
  for t in range(steps):
    params, state = step(params, state, jnp.int32(t))
    trajectory.append(params)
    states.append(state)
  return trajectory, states


CONFIGS = {
    # name: (quartic, hyperparameters); gamma chosen so that some entries clip and some not.
    "quadratic_k5": (False, dict(lr=0.1, b1=0.965, b2=0.99, gamma=0.5, eps=1e-12, interval=5,
                                 wd=0.0, bias_correction=True)),
    "quartic_k3_wd": (True, dict(lr=0.05, b1=0.9, b2=0.9, gamma=0.3, eps=1e-12, interval=3,
                                 wd=0.1, bias_correction=True)),
    "quartic_k4_paper_rule": (True, dict(lr=0.05, b1=0.9, b2=0.8, gamma=0.2, eps=1e-12,
                                         interval=4, wd=0.0, bias_correction=False)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_numpy_reference(name):
  """Float64 trajectory and per-step win rate equal the NumPy reference over 25 steps."""
  quartic, hp = CONFIGS[name]
  x0, loss, np_gd = _separable_problem(seed=len(name), quartic=quartic)
  tx = sophia(hp["lr"], b1=hp["b1"], b2=hp["b2"], gamma=hp["gamma"], eps=hp["eps"],
              update_interval=hp["interval"], weight_decay=hp["wd"],
              bias_correction=hp["bias_correction"], seed=5)
  with jax.enable_x64(True):
    got, states = _run(tx, {k: v.astype(np.float64) for k, v in x0.items()}, loss)
  want, want_win = _np_sophia(x0, np_gd, **hp)
  for t, (g, w) in enumerate(zip(got, want)):
    for k in SHAPES:
      assert g[k].dtype == np.float64
      np.testing.assert_allclose(np.asarray(g[k]), w[k], rtol=1e-10, atol=1e-12,
                                 err_msg=f"step {t}, leaf {k}")
    np.testing.assert_allclose(float(optax.tree.get(states[t], "win_rate")), want_win[t],
                               atol=1e-6, err_msg=f"win rate at step {t}")
  assert any(0.0 < w < 1.0 for w in want_win), "gamma should leave some entries unclipped"
  last = optax.tree.get(states[-1], "SophiaClipState")
  assert int(last.hessian_count) == -(-STEPS // hp["interval"])
  assert int(last.nonfinite_count) == 0


def _softmax_model():
  """logits = x W + b with two batch axes: 2 x 3 = 6 examples, 4 features, 3 classes."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4))
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  labels = jnp.asarray(rng.integers(0, 3, size=(2, 3)))
  xj = jnp.asarray(x, jnp.float32)
  logits_fn = lambda p: xj @ p["w"] + p["b"]
  loss = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), labels))
  return x, params, logits_fn, loss


def test_sophia_g_estimate_equals_hand_computed_gnb():
  """After the refresh at step 0, h holds (1 - b2) B g_hat^2 (and its bias-corrected value
  B g_hat^2 sets the first update), g_hat computed by hand in NumPy from labels sampled
  with the estimator's key."""
  x, params, logits_fn, loss = _softmax_model()
  seed, b2, gamma = 7, 0.99, 0.05
  tx = sophia_clip(b2=b2, gamma=gamma, estimator="gnb", seed=seed)
  grads = jax.grad(loss)(params)
  updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, logits_fn=logits_fn))(
      grads, tx.init(params), params)

  _, sub = jax.random.split(jax.random.PRNGKey(seed))
  z = np.asarray(logits_fn(params), np.float64).reshape(6, 3)
  sampled = np.asarray(jax.random.categorical(sub, jnp.asarray(z, jnp.float32), axis=-1))
  assert len(set(sampled.tolist())) > 1, "degenerate sample; pick another seed"
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  delta = (p - np.eye(3)[sampled]) / 6            # d mean-CE / d logits
  g_hat = {"w": x.reshape(6, 4).T @ delta, "b": delta.sum(0)}
  h_hat = {k: 6 * v ** 2 for k, v in g_hat.items()}
  for k in params:
    np.testing.assert_allclose(state.hessian[k], (1 - b2) * h_hat[k], rtol=1e-5, atol=1e-9)
    want = np.clip(np.asarray(grads[k], np.float64) / np.maximum(gamma * h_hat[k], 1e-12), -1, 1)
    np.testing.assert_allclose(updates[k], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("estimator", ["hutchinson", "gnb"])
def test_estimate_only_on_refresh_steps(estimator):
  """Counted on the host: the estimator's function is evaluated on steps 0, 10, 20 only."""
  _, params, logits_fn, loss = _softmax_model()
  calls = []

  def traced(fn, t):
    def wrapped(p):
      jax.debug.callback(lambda s: calls.append(int(s)), t)
      return fn(p)
    return wrapped

  tx = sophia(0.01, update_interval=10, estimator=estimator)
  kw = "obj_fn" if estimator == "hutchinson" else "logits_fn"
  fn = loss if estimator == "hutchinson" else logits_fn

  @jax.jit
  def step(p, s, t):
    u, s = tx.update(jax.grad(loss)(p), s, p, **{kw: traced(fn, t)})
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  for t in range(30):
    params, state = step(params, state, jnp.int32(t))
  jax.effects_barrier()
  assert calls and sorted(set(calls)) == [0, 10, 20]


def test_step0_not_all_clipped_unlike_optax_contrib():
  """optax.contrib.sophia starts from h = 0 and so clips every entry on step 0 (a sign
  update); sophia estimates h first and takes the preconditioned step."""
  x0, loss, np_gd = _separable_problem(seed=1, quartic=False)
  params = jax.tree.map(jnp.asarray, x0)
  gamma = 2.0     # |g / (gamma diag H)| = |x - c| / 2 < 1: nothing should clip
  ours = sophia(1.0, gamma=gamma, weight_decay=0.0)
  theirs = optax.contrib.sophia(1.0, gamma=gamma, weight_decay=0.0)
  grads = jax.grad(loss)(params)
  u_ours, s_ours = jax.jit(lambda g, s, p: ours.update(g, s, p, obj_fn=loss))(
      grads, ours.init(params), params)
  u_theirs, _ = jax.jit(lambda g, s, p: theirs.update(g, s, p, obj_fn=loss))(
      grads, theirs.init(params), params)
  g, h = np_gd({k: v.astype(np.float64) for k, v in x0.items()})
  for k in SHAPES:
    np.testing.assert_allclose(np.abs(u_theirs[k]), 1.0)          # all clipped
    np.testing.assert_allclose(u_ours[k], -g[k] / (gamma * h[k]), rtol=1e-5)
    assert np.all(np.abs(np.asarray(u_ours[k])) < 1.0)
  assert float(optax.tree.get(s_ours, "win_rate")) == 1.0


def test_h_bias_corrected_unlike_optax_contrib():
  """After its first refresh optax.contrib.sophia's h is (1 - b2) = 1% of the estimate, so
  its step 1 is 100x the preconditioned step; sophia's bias-corrected h is the estimate."""
  x0, loss, np_gd = _separable_problem(seed=2, quartic=False)
  params = jax.tree.map(jnp.asarray, x0)
  b1, b2, gamma = 0.965, 0.99, 500.0     # gamma large: neither clips, the ratio shows
  ours = sophia(1.0, b1=b1, b2=b2, gamma=gamma, weight_decay=0.0)
  theirs = optax.contrib.sophia(1.0, b1=b1, b2=b2, gamma=gamma, weight_decay=0.0)
  s_ours, s_theirs = ours.init(params), theirs.init(params)

  @jax.jit
  def both(g, s_ours, s_theirs):
    u_ours, s_ours = ours.update(g, s_ours, params, obj_fn=loss)
    u_theirs, s_theirs = theirs.update(g, s_theirs, params, obj_fn=loss)
    return u_ours, s_ours, u_theirs, s_theirs

  p1 = params
  for _ in range(2):
    u_ours, s_ours, u_theirs, s_theirs = both(jax.grad(loss)(p1), s_ours, s_theirs)
    p1 = optax.apply_updates(p1, u_ours)
  _, h = np_gd({k: v.astype(np.float64) for k, v in x0.items()})
  h_ours = optax.tree.get(s_ours, "SophiaClipState").hessian
  nu_theirs = optax.tree.get(s_theirs, "SophiaState").nu
  for k in SHAPES:
    np.testing.assert_allclose(nu_theirs[k], (1 - b2) * h[k], rtol=1e-5)
    np.testing.assert_allclose(h_ours[k] / (1 - b2), h[k], rtol=1e-5)   # bias-corrected: h
    np.testing.assert_allclose(u_theirs[k], u_ours[k] / (1 - b2), rtol=1e-4)


def test_nonfinite_estimate_is_skipped_and_counted():
  x0, loss, _ = _separable_problem(seed=3, quartic=True)
  poisoned_at = 2

  def obj_fn_for_step(t):
    return lambda p: loss(p) * jnp.where(t == poisoned_at, jnp.inf, 1.0)

  tx = sophia_clip(update_interval=1)
  _, clean = _run(tx, x0, loss, steps=poisoned_at)
  traj, poisoned = _run(tx, x0, loss, steps=poisoned_at + 1, obj_fn_for_step=obj_fn_for_step)
  state = poisoned[-1]
  assert int(state.nonfinite_count) == 1 and int(state.hessian_count) == poisoned_at
  for k in SHAPES:
    np.testing.assert_array_equal(state.hessian[k], clean[-1].hessian[k])
    assert np.all(np.isfinite(np.asarray(traj[-1][k])))


def test_user_supplied_estimator_gets_extra_args():
  """Any GradientTransformation returning a diagonal: here the exact diag of the dense
  Hessian, from a keyword only it reads."""
  x0, loss, np_gd = _separable_problem(seed=4, quartic=True)
  params = jax.tree.map(jnp.asarray, x0)

  def exact_diag():
    def update(updates, state, params=None, *, exact_loss=None, **_):
      flat, unravel = jax.flatten_util.ravel_pytree(params)
      return unravel(jnp.diag(jax.hessian(lambda f: exact_loss(unravel(f)))(flat))), state
    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

  b2 = 0.9
  tx = sophia_clip(b2=b2, gamma=0.1, estimator=exact_diag())
  _, state = jax.jit(lambda g, s, p: tx.update(g, s, p, exact_loss=loss, unrelated=1))(
      jax.grad(loss)(params), tx.init(params), params)
  _, h = np_gd({k: v.astype(np.float64) for k, v in x0.items()})
  for k in SHAPES:
    np.testing.assert_allclose(state.hessian[k], (1 - b2) * h[k], rtol=1e-5)


@pytest.mark.parametrize("estimator,keyword", [("hutchinson", "obj_fn"), ("gnb", "logits_fn")])
def test_missing_keyword_shows_the_call(estimator, keyword):
  tx = sophia(0.01, estimator=estimator)
  params = jnp.ones(3)
  with pytest.raises(ValueError, match=rf"{keyword}.*tx\.update\(grads, state, params, {keyword}="):
    tx.update(params, tx.init(params), params, some_other=1)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(b1=1.0), "b1"), (dict(b2=1.5), "b2"), (dict(gamma=0.0), "gamma"),
    (dict(eps=-1e-3), "eps"), (dict(update_interval=0), "update_interval"),
    (dict(update_interval=1.5), "update_interval"), (dict(estimator="newton"), "estimator"),
    (dict(estimator=3), "estimator"), (dict(learning_rate=-0.1), "learning_rate"),
    (dict(weight_decay=-1.0), "weight_decay"),
])
def test_bad_hyperparameters_raise(kwargs, needle):
  kwargs = {"learning_rate": 0.01, **kwargs}
  with pytest.raises(ValueError, match=needle):
    sophia(**kwargs)


@pytest.mark.parametrize("estimator", ["hutchinson", "gnb"])
def test_host_scheduled_refresh_equals_lax_cond_schedule(estimator):
  """refresh=(t % k == 0) chosen on the host gives the lax.cond trajectory; plain steps need
  no obj_fn / logits_fn."""
  _, params, logits_fn, loss = _softmax_model()
  k = 3
  tx = sophia(0.05, gamma=0.05, update_interval=k, estimator=estimator)
  kw = {"obj_fn": loss} if estimator == "hutchinson" else {"logits_fn": logits_fn}

  @jax.jit
  def scheduled(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p, **kw)
    return optax.apply_updates(p, u), s

  @jax.jit
  def refresh_step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p, refresh=True, **kw)
    return optax.apply_updates(p, u), s

  @jax.jit
  def plain_step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p, refresh=False)
    return optax.apply_updates(p, u), s

  pa, sa = params, tx.init(params)
  pb, sb = params, tx.init(params)
  for t in range(7):
    pa, sa = scheduled(pa, sa)
    pb, sb = (refresh_step if t % k == 0 else plain_step)(pb, sb)
    for name in params:
      np.testing.assert_allclose(pa[name], pb[name], rtol=1e-6, atol=1e-7, err_msg=f"step {t}")
  assert int(optax.tree.get(sb, "hessian_count")) == 3


@pytest.mark.parametrize("estimator", ["hutchinson", "gnb"])
def test_one_pass_refresh_step_equals_two_pass(estimator):
  """A refresh step that takes its loss, gradient and estimate from one pass
  (value_grad_and_*_estimate, then update(hessian_diag=..., refresh=True)) follows the
  same trajectory as one that calls the estimator after jax.grad."""
  from secondorder.transforms.sophia import (value_grad_and_gnb_estimate,
                                             value_grad_and_hutchinson_estimate)
  x, params, logits_fn, loss = _softmax_model()
  labels = jnp.argmax(logits_fn(params), axis=-1)  # the model's own loss: CE at fixed labels
  ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()
  obj = lambda p: ce(logits_fn(p))
  k = 3
  tx = sophia(0.05, gamma=0.05, update_interval=k, estimator=estimator)
  kw = {"obj_fn": obj} if estimator == "hutchinson" else {"logits_fn": logits_fn}

  @jax.jit
  def two_pass(p, s):
    u, s = tx.update(jax.grad(obj)(p), s, p, refresh=True, **kw)
    return optax.apply_updates(p, u), s

  @jax.jit
  def one_pass(p, s):
    if estimator == "hutchinson":
      value, g, h = value_grad_and_hutchinson_estimate(obj, p, s)
    else:
      value, g, h = value_grad_and_gnb_estimate(logits_fn, ce, p, s)
    u, s = tx.update(g, s, p, hessian_diag=h, refresh=True)
    return optax.apply_updates(p, u), s, value

  @jax.jit
  def plain(p, s):
    u, s = tx.update(jax.grad(obj)(p), s, p, refresh=False)
    return optax.apply_updates(p, u), s

  pa, sa = params, tx.init(params)
  pb, sb = params, tx.init(params)
  for t in range(7):
    if t % k == 0:
      want = obj(pb)
      pa, sa = two_pass(pa, sa)
      pb, sb, value = one_pass(pb, sb)
      np.testing.assert_allclose(value, want, rtol=1e-6)
    else:
      pa, sa = plain(pa, sa)
      pb, sb = plain(pb, sb)
    for name in params:
      np.testing.assert_allclose(pa[name], pb[name], rtol=1e-6, atol=1e-7, err_msg=f"step {t}")
      np.testing.assert_allclose(optax.tree.get(sa, "hessian")[name],
                                 optax.tree.get(sb, "hessian")[name], rtol=1e-5, atol=1e-9)
  assert int(optax.tree.get(sb, "hessian_count")) == 3
  # The helpers advanced the estimator's key as the estimator itself would.
  np.testing.assert_array_equal(optax.tree.get(sa, "estimator_state").key,
                                optax.tree.get(sb, "estimator_state").key)


def test_value_grad_and_gnb_diag_matches_separate_passes():
  from secondorder.curvature.estimators import gnb_diag, value_grad_and_gnb_diag
  x, params, logits_fn, _ = _softmax_model()
  labels = jnp.array([0, 2, 1, 1, 0, 2])
  ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z.reshape(6, 3), labels).mean()
  key = jax.random.key(3)
  value, grads, est = jax.jit(lambda p: value_grad_and_gnb_diag(logits_fn, ce, p, key))(params)
  ref_value, ref_grads = jax.value_and_grad(lambda p: ce(logits_fn(p)))(params)
  ref_est = gnb_diag(logits_fn, params, key)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  for k in params:
    np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(est[k], ref_est[k], rtol=1e-5, atol=1e-10)
  with pytest.raises(ValueError, match="scalar"):
    value_grad_and_gnb_diag(logits_fn, lambda z: z.sum(-1), params, key)


def test_one_pass_helpers_need_a_builtin_sophia_state():
  from secondorder.transforms.sophia import value_grad_and_hutchinson_estimate
  _, params, _, loss = _softmax_model()
  with pytest.raises(ValueError, match="exactly one SophiaClipState"):
    value_grad_and_hutchinson_estimate(loss, params, optax.adam(1e-3).init(params))
  user = sophia_clip(estimator=optax.scale_by_rms())
  with pytest.raises(ValueError, match="user-supplied estimator"):
    value_grad_and_hutchinson_estimate(loss, params, user.init(params))
  tx = sophia_clip()
  with pytest.raises(ValueError, match="hessian_diag"):
    tx.update(params, tx.init(params), params, hessian_diag={"w": jnp.ones(3)}, refresh=True)


def test_estimate_on_a_plain_step_is_an_error():
  # A ready estimate on a step declared plain would be dropped without a word.
  _, params, _, _ = _softmax_model()
  tx = sophia_clip()
  h = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError, match="hessian_diag= was given with refresh=False"):
    tx.update(params, tx.init(params), params, hessian_diag=h, refresh=False)


def test_one_pass_helper_returns_the_aux_of_the_gradient_pass():
  """has_aux=True: the same loss, gradient and estimate as without, and obj_fn's aux (a
  model's new state, here a running mean of the activations) from the same single pass."""
  from secondorder.transforms.sophia import value_grad_and_hutchinson_estimate
  x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
  params = {"w": jnp.array([[0.5, -0.2], [0.1, 0.3], [-0.4, 0.2]]), "b": jnp.array([0.1, -0.1])}

  def with_aux(p):
    h = jnp.tanh(x @ p["w"] + p["b"])
    return jnp.mean(h ** 2), {"running_mean": 0.9 * jnp.ones(2) + 0.1 * h.mean(axis=0)}

  tx = sophia(1e-2)
  state = tx.init(params)
  value, grads, h = value_grad_and_hutchinson_estimate(lambda p: with_aux(p)[0], params, state)
  got = jax.jit(lambda p, s: value_grad_and_hutchinson_estimate(with_aux, p, s, has_aux=True))(
      params, state)
  np.testing.assert_allclose(got[0], value, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got[1:3]), jax.tree.leaves((grads, h))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got[3]["running_mean"], with_aux(params)[1]["running_mean"],
                             rtol=1e-6)
