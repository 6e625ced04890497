"""Hessian-free Newton, the KL-budget natural gradient and their conjugate gradient.

Every numerical claim is checked in float64 against a reference computed another way: dense
matrices and `numpy.linalg.solve` / `lstsq`, a NumPy transcription of CG with Martens'
stopping rule, a dense Fisher from `jax.jacfwd`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import secondorder as so
from secondorder.curvature.cg import conjugate_gradient
from secondorder.transforms.hessian_free import STATIC_ARGS


def _spd(rng, n, log10_cond):
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  return (q * np.logspace(0.0, log10_cond, n)) @ q.T


def _split(v):
  """A flat vector as a two-leaf pytree (a matrix and a vector), to test pytree CG."""
  return {"w": v[:6].reshape(2, 3), "b": v[6:]}


def _flat(tree):
  return jnp.concatenate([tree["w"].ravel(), tree["b"].ravel()])


def _numpy_cg(a, b, x0, max_iterations, eps, diag=None, window=10, fraction=0.1):
  """CG with Martens' relative-progress rule, transcribed in NumPy; returns (x, iterations)."""
  m_inv = (lambda r: r) if diag is None else (lambda r: r / diag)
  x = x0.copy()
  if 0.5 * x @ a @ x - b @ x > 0:
    x = np.zeros_like(b)
  r = b - a @ x
  z = m_inv(r)
  p = z.copy()
  phis = [0.5 * x @ a @ x - b @ x]
  i = 0
  while i < max_iterations:
    ap = a @ p
    alpha = (r @ z) / (p @ ap)
    x = x + alpha * p
    r_new = r - alpha * ap
    z_new = m_inv(r_new)
    p = z_new + (r_new @ z_new) / (r @ z) * p
    r, z = r_new, z_new
    i += 1
    phi = 0.5 * x @ a @ x - b @ x
    phis.append(phi)
    k = max(window, int(np.floor(fraction * i)))
    if i > k and phi < 0 and (phi - phis[i - k]) / phi < k * eps:
      break
  return x, i


# ----------------------------------------------------------------------------------------
# Conjugate gradient
# ----------------------------------------------------------------------------------------


def test_cg_solves_spd_systems_on_pytrees():
  """Random SPD operators on a two-leaf pytree, plain and diagonally preconditioned."""
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    solve = jax.jit(lambda a, b, m: conjugate_gradient(
        lambda v: _split(a @ _flat(v)), _split(b), max_iterations=40, tol=1e-13,
        preconditioner=_split(m)))
    for seed in range(3):
      a = _spd(np.random.default_rng(seed), 9, 3.0)
      b = rng.normal(size=9)
      m = np.abs(np.diag(a)) ** 0.75
      for precond in (np.ones(9), m):
        res = solve(jnp.asarray(a), jnp.asarray(b), jnp.asarray(precond))
        np.testing.assert_allclose(np.asarray(_flat(res.x)), np.linalg.solve(a, b),
                                   rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(np.asarray(_flat(res.ax)), b, rtol=1e-9, atol=1e-10)
        x = np.linalg.solve(a, b)
        np.testing.assert_allclose(float(res.model_value), -0.5 * b @ x, rtol=1e-9)
        assert 1 <= int(res.iterations) <= 40 and not bool(res.negative_curvature)


def test_cg_warm_start_and_restart():
  """The exact solution as a start costs no iteration; a start worse than zero (φ > 0) is
  replaced by zero and gives the cold-start iterates exactly."""
  # n = 200 with condition 100: CG converges gradually (about 0.8 per iteration), far from
  # its finite termination at n, so a start 20 times closer saves iterations whatever the
  # rounding (at n = 9 both starts end at n, give or take one iteration of rounding).
  n = 200
  rng = np.random.default_rng(1)
  a, b = _spd(rng, n, 2.0), rng.normal(size=n)
  x_star = np.linalg.solve(a, b)
  with jax.enable_x64(True):
    solve = jax.jit(lambda x0: conjugate_gradient(
        lambda v: _split(jnp.asarray(a) @ _flat(v)), _split(jnp.asarray(b)), _split(x0),
        max_iterations=n, tol=1e-10))
    exact = solve(jnp.asarray(x_star))
    assert int(exact.iterations) == 0
    cold = solve(jnp.zeros(n))
    bad = solve(jnp.asarray(-3.0 * x_star))        # φ(−3x*) = 7.5 bᵀx* > 0
    assert int(bad.iterations) == int(cold.iterations) > 0
    np.testing.assert_array_equal(np.asarray(_flat(bad.x)), np.asarray(_flat(cold.x)))
    warm = solve(jnp.asarray(0.95 * x_star + 1e-3 * rng.normal(size=n)))
    assert int(warm.iterations) < int(cold.iterations)
    np.testing.assert_allclose(np.asarray(_flat(warm.x)), x_star, rtol=1e-8, atol=1e-9)


def test_cg_relative_progress_rule_matches_numpy_transcription():
  """On an ill-conditioned system the rule stops CG early, at the iteration (and iterate)
  the NumPy transcription of the rule gives, with and without a preconditioner."""
  rng = np.random.default_rng(2)
  n = 120
  a = _spd(rng, n, 2.0)
  b = rng.normal(size=n)
  x0 = 0.5 * rng.normal(size=n) / np.diag(a)
  with jax.enable_x64(True):
    solve = jax.jit(lambda x0, m: conjugate_gradient(
        lambda v: jnp.asarray(a) @ v, jnp.asarray(b), x0, max_iterations=n, tol=0.0,
        preconditioner=m, progress_tol=5e-4))
    for diag in (None, np.diag(a) ** 0.75):
      x_ref, it_ref = _numpy_cg(a, b, x0, n, 5e-4, diag)
      res = solve(jnp.asarray(x0), jnp.ones(n) if diag is None else jnp.asarray(diag))
      assert 10 < it_ref < n
      assert int(res.iterations) == it_ref
      np.testing.assert_allclose(np.asarray(res.x), x_ref, rtol=1e-9, atol=1e-12)


def test_cg_stops_at_negative_curvature():
  """An indefinite operator: CG stops at the first direction with pᵀAp <= 0, untaken."""
  with jax.enable_x64(True):
    a = jnp.diag(jnp.array([2.0, -1.0]))
    res = conjugate_gradient(lambda v: a @ v, jnp.array([0.0, 1.0]), max_iterations=5)
    assert bool(res.negative_curvature) and int(res.iterations) == 0
    np.testing.assert_array_equal(np.asarray(res.x), [0.0, 0.0])


def test_newton_decrement_uses_the_shared_cg():
  rng = np.random.default_rng(3)
  a, g = _spd(rng, 6, 2.0), rng.normal(size=6)
  with jax.enable_x64(True):
    dec, direction = so.newton_decrement(lambda v: jnp.asarray(a) @ v, jnp.asarray(g), 0.1,
                                         tol=1e-12)
    x = np.linalg.solve(a + 0.1 * np.eye(6), g)
    np.testing.assert_allclose(np.asarray(direction), x, rtol=1e-9)
    np.testing.assert_allclose(float(dec), np.sqrt(g @ x), rtol=1e-9)


# ----------------------------------------------------------------------------------------
# Hessian-free
# ----------------------------------------------------------------------------------------


def test_newton_cg_is_the_newton_step_on_a_quadratic():
  """curvature="hessian", λ = 0, n CG iterations: the update is −A⁻¹g and lands on the
  minimum of ½xᵀAx − bᵀx."""
  rng = np.random.default_rng(4)
  n = 8
  a, b = _spd(rng, n, 2.0), rng.normal(size=n)
  with jax.enable_x64(True):
    obj_fn = lambda x: 0.5 * x @ jnp.asarray(a) @ x - jnp.asarray(b) @ x
    tx = so.hessian_free(curvature="hessian", initial_damping=0.0, adapt_damping=False,
                         cg_max_iterations=n, cg_tol=0.0, progress_tol=None)
    x = jnp.asarray(rng.normal(size=n))
    g = jax.grad(obj_fn)(x)
    updates, state = jax.jit(lambda g, s, x: tx.update(g, s, x, obj_fn=obj_fn))(
        g, tx.init(x), x)
    np.testing.assert_allclose(np.asarray(updates), -np.linalg.solve(a, np.asarray(g)),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.asarray(x + updates), np.linalg.solve(a, b), atol=1e-10)
    hf_state = state[0]
    assert int(hf_state.cg_iterations) == n
    np.testing.assert_allclose(float(hf_state.rho), 1.0, rtol=1e-8)   # an exact model


def test_gauss_newton_lands_on_least_squares_in_one_step():
  """A linear model with squared error: the Gauss-Newton matrix is XᵀX / m, exact, so one
  undamped step reaches numpy's least-squares solution."""
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 3))
  with jax.enable_x64(True):
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    logits_fn = lambda p: jnp.asarray(x) @ p["w"] + p["b"]
    loss_fn = so.squared_error(jnp.asarray(y))
    tx = so.hessian_free(initial_damping=0.0, cg_max_iterations=15, cg_tol=1e-14,
                         progress_tol=None)
    g = jax.grad(lambda p: loss_fn(logits_fn(p)))(params)
    updates, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, logits_fn=logits_fn,
                                                    loss_fn=loss_fn))(g, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    design = np.concatenate([x, np.ones((20, 1))], axis=1)
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    np.testing.assert_allclose(np.asarray(new["w"]), coef[:4], atol=1e-10)
    np.testing.assert_allclose(np.asarray(new["b"]), coef[4], atol=1e-10)


def _quartic_problem(c):
  """½xᵀAx − bᵀx + c‖x‖⁴ from x = 0: its Hessian there is A, so the quartic term only
  changes the loss at the candidate, and with it ρ."""
  rng = np.random.default_rng(6)
  a, b = _spd(rng, 5, 1.0), rng.normal(size=5)
  obj_fn = lambda x: (0.5 * x @ jnp.asarray(a) @ x - jnp.asarray(b) @ x
                      + c * jnp.sum(x * x) ** 2)
  return a, b, obj_fn


@pytest.mark.parametrize("c,factor", [(0.0, 2.0 / 3.0), (10.0, 1.5)])
def test_levenberg_marquardt_damping(c, factor):
  """ρ > ¾ (an exact quadratic) lowers λ by 2/3; ρ < ¼ (a large quartic) raises it by 3/2;
  ρ equals (L(θ + d) − L(θ)) / (gᵀd + ½dᵀAd) computed with numpy. (CG runs preconditioned by
  (g ⊙ g + λ)^0.75 and still lands on the damped Newton step; min_rho=None takes the step
  whatever ρ, so that the update is the step itself.)"""
  a, b, obj_fn = _quartic_problem(c)
  with jax.enable_x64(True):
    tx = so.scale_by_hessian_free(curvature="hessian", initial_damping=0.5,
                                  cg_max_iterations=5, cg_tol=0.0, progress_tol=None,
                                  preconditioner="squared_gradient", min_rho=None)
    x = jnp.zeros(5)
    g = jax.grad(obj_fn)(x)
    p, state = jax.jit(lambda g, s, x: tx.update(g, s, x, obj_fn=obj_fn))(g, tx.init(x), x)
    d = -np.linalg.solve(a + 0.5 * np.eye(5), np.asarray(g))
    np.testing.assert_allclose(-np.asarray(p), d, rtol=1e-9)
    f = lambda v: 0.5 * v @ a @ v - b @ v + c * (v @ v) ** 2
    rho = (f(d) - f(np.zeros(5))) / (np.asarray(g) @ d + 0.5 * d @ a @ d)
    np.testing.assert_allclose(float(state.rho), rho, rtol=1e-9)
    assert (rho > 0.75) if c == 0 else (rho < 0.25)
    np.testing.assert_allclose(float(state.damping), 0.5 * factor, rtol=1e-12)
    np.testing.assert_allclose(float(state.loss), 0.0, atol=0)


def test_reject_increase_keeps_the_parameters_when_the_loss_rises():
  """`reject_increase=True`: where L(θ + d) > L(θ) (the large quartic, ρ < 0, both from
  numpy) the update is zero, λ rises by 3/2 and the rejected step d = −(A + λI)⁻¹g is the
  warm start; where the loss falls (c = 0) the step is taken, as without rejection (the
  rising step without rejection: `test_levenberg_marquardt_damping`)."""
  with pytest.raises(TypeError, match="reject_increase"):
    so.hessian_free(reject_increase=1)
  a, b, _ = _quartic_problem(0.0)
  with jax.enable_x64(True):
    tx = so.scale_by_hessian_free(curvature="hessian", initial_damping=0.5,
                                  cg_max_iterations=5, cg_tol=0.0, progress_tol=None,
                                  reject_increase=True)
    obj_fn = lambda v, c: (0.5 * v @ jnp.asarray(a) @ v - jnp.asarray(b) @ v
                           + c * jnp.sum(v * v) ** 2)
    step = jax.jit(lambda g, s, x, c: tx.update(g, s, x, obj_fn=lambda v: obj_fn(v, c)))
    x = jnp.zeros(5)
    g = jnp.asarray(-b)  # ∇L(0) = −b: the quartic term is flat at 0
    d = -np.linalg.solve(a + 0.5 * np.eye(5), np.asarray(g))
    for c in (10.0, 0.0):
      p, state = step(g, tx.init(x), x, c)
      f = lambda v: 0.5 * v @ a @ v - b @ v + c * (v @ v) ** 2
      rises = f(d) > f(np.zeros(5))
      assert rises == (c > 0)
      assert (float(state.rho) < 0) == rises
      np.testing.assert_allclose(-np.asarray(state.direction), d, rtol=1e-9)
      np.testing.assert_allclose(float(state.damping), 0.5 * (1.5 if rises else 2.0 / 3.0),
                                 rtol=1e-12)
      want = np.zeros(5) if rises else -d
      np.testing.assert_allclose(np.asarray(p), want, rtol=1e-9, atol=0)


def test_nonfinite_curvature_skips_the_step_and_keeps_the_warm_start():
  """A point where the Hessian products are NaN (sqrt at 0) but the loss is finite: the
  update is zero, the skip is counted, λ rises by 3/2 and the warm start is untouched; the
  next finite step proceeds from it."""
  a, _, quad = _quartic_problem(0.0)
  obj_fn = lambda x: quad(x) + 1e-3 * jnp.sqrt(jnp.abs(x[0]))
  with jax.enable_x64(True):
    tx = so.scale_by_hessian_free(curvature="hessian", initial_damping=1.0,
                                  cg_max_iterations=5, progress_tol=None)
    step = jax.jit(lambda g, s, x: tx.update(g, s, x, obj_fn=obj_fn))
    x = jnp.ones(5)
    g = jax.grad(quad)(x)
    _, state = step(g, tx.init(x), x)
    assert int(state.nonfinite_count) == 0
    bad_x = x.at[0].set(0.0)
    u, bad = step(jax.grad(quad)(bad_x), state, bad_x)
    np.testing.assert_array_equal(np.asarray(u), np.zeros(5))
    assert int(bad.nonfinite_count) == 1
    np.testing.assert_allclose(float(bad.damping), 1.5 * float(state.damping))
    np.testing.assert_array_equal(np.asarray(bad.direction), np.asarray(state.direction))
    assert float(bad.rho) == 0.0
    u, after = step(g, bad, x)
    assert bool(jnp.all(jnp.isfinite(u))) and int(after.nonfinite_count) == 1


def test_errors_name_the_argument_and_the_call():
  x = jnp.ones((4, 3))
  params = jnp.zeros((3, 2))
  logits_fn = lambda p: x @ p
  g = jnp.ones((3, 2))
  tx = so.scale_by_hessian_free()
  with pytest.raises(ValueError, match=r"logits_fn.*tx.update\(grads, state, params, "
                                       r"logits_fn=.*loss_fn="):
    tx.update(g, tx.init(params), params)
  with pytest.raises(ValueError, match="loss_fn"):
    tx.update(g, tx.init(params), params, logits_fn=logits_fn)
  with pytest.raises(ValueError, match=r"loss_fn must return a scalar.*\(4,\)"):
    tx.update(g, tx.init(params), params, logits_fn=logits_fn,
              loss_fn=lambda z: jnp.sum(z, axis=-1))
  hess = so.scale_by_hessian_free(curvature="hessian")
  with pytest.raises(ValueError, match=r"obj_fn=lambda p"):
    hess.update(g, hess.init(params), params)
  pre = so.scale_by_hessian_free(preconditioner="empirical_fisher")
  with pytest.raises(ValueError, match=r"fisher_diag=so.empirical_fisher_diag"):
    pre.update(g, pre.init(params), params, logits_fn=logits_fn,
               loss_fn=so.softmax_cross_entropy(jnp.zeros(4, jnp.int32)))
  ng = so.natural_gradient(1e-2)
  with pytest.raises(ValueError, match=r"logits_fn=lambda p"):
    ng.update(g, ng.init(params), params)
  with pytest.raises(ValueError, match="needs params"):
    ng.update(g, ng.init(params))
  for bad, name in ((dict(curvature="newton"), "curvature"),
                    (dict(cg_max_iterations=0), "cg_max_iterations"),
                    (dict(initial_damping=-1.0), "initial_damping"),
                    (dict(damping_decrease=1.5), "damping_decrease"),
                    (dict(preconditioner="adam"), "preconditioner")):
    with pytest.raises(ValueError, match=name):
      so.scale_by_hessian_free(**bad)
  with pytest.raises(ValueError, match="kl_budget"):
    so.natural_gradient(-1.0)
  with pytest.raises(ValueError, match="max_learning_rate"):
    so.natural_gradient(1e-2, max_learning_rate=0.0)


def test_preconditioned_step_solves_the_same_system():
  """With the (diag + λ)^0.75 preconditioner CG converges to the same (C + λI)⁻¹g, C the
  dense Gauss-Newton matrix; the empirical-Fisher diagonal comes from
  so.empirical_fisher_diag (the damping test covers preconditioner="squared_gradient")."""
  rng = np.random.default_rng(7)
  x = rng.normal(size=(12, 3)) * np.array([1.0, 10.0, 0.1])
  y = rng.integers(0, 4, size=12)
  with jax.enable_x64(True):
    params = jnp.asarray(0.1 * rng.normal(size=(3, 4)))
    logits_fn = lambda p: jnp.asarray(x) @ p
    loss_fn = so.softmax_cross_entropy(jnp.asarray(y))
    g = jax.grad(lambda p: loss_fn(logits_fn(p)))(params)
    example_loss = lambda p, ex: optax.softmax_cross_entropy_with_integer_labels(
        ex[0][None] @ p, ex[1][None])[0]
    fisher_diag = jax.jit(so.empirical_fisher_diag, static_argnums=0)(
        example_loss, params, (jnp.asarray(x), jnp.asarray(y)))
    # The Gauss-Newton matrix of softmax cross-entropy, densely: Jᵀ H_ℓ J.
    jac = np.asarray(jax.jacfwd(logits_fn)(params)).reshape(48, 12)
    h_loss = np.asarray(jax.hessian(loss_fn)(logits_fn(params))).reshape(48, 48)
    ref = np.linalg.solve(jac.T @ h_loss @ jac + 0.3 * np.eye(12), np.asarray(g).ravel())
    tx = so.scale_by_hessian_free(initial_damping=0.3, preconditioner="empirical_fisher",
                                  cg_max_iterations=40, cg_tol=1e-12, progress_tol=None)
    p, _ = jax.jit(lambda g, s, p, f: tx.update(g, s, p, logits_fn=logits_fn, loss_fn=loss_fn,
                                                fisher_diag=f))(g, tx.init(params), params,
                                                                fisher_diag)
    np.testing.assert_allclose(np.asarray(p).ravel(), ref, rtol=1e-7, atol=1e-10)


def test_inject_hyperparams_on_the_aliases_keeps_the_state_structure():
  """The aliases under optax.inject_hyperparams with no static_args (every number, the CG
  budget included, becomes a traced array) have a state of the same structure, shapes and
  dtypes as the plain aliases, before and after a step, and the same updates; STATIC_ARGS
  (now empty) is still accepted."""
  x = jax.random.normal(jax.random.key(0), (16, 3))
  y = jnp.arange(16) % 4
  params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
  logits_fn = lambda p: x @ p["w"] + p["b"]
  extra = dict(logits_fn=logits_fn, loss_fn=so.softmax_cross_entropy(y))
  g = jax.grad(lambda p: extra["loss_fn"](logits_fn(p)))(params)
  for factory, kwargs in (
      (so.hessian_free, dict(learning_rate=1.0, initial_damping=0.5, warm_start_decay=0.9,
                             cg_max_iterations=8)),
      (so.natural_gradient, dict(kl_budget=1e-2, damping=1e-3, max_learning_rate=0.5,
                                 cg_max_iterations=8))):
    plain = factory(**kwargs)
    assert STATIC_ARGS == ()
    optax.inject_hyperparams(factory, static_args=STATIC_ARGS)(**kwargs).init(params)
    injected = optax.inject_hyperparams(factory)(**kwargs)
    s_plain, s_inj = plain.init(params), injected.init(params)
    u_plain, _ = jax.jit(lambda g, s: plain.update(g, s, params, **extra))(g, s_plain)
    u_inj, _ = jax.jit(lambda g, s: injected.update(g, s, params, **extra))(g, s_inj)
    for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_inj)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert (jax.tree.structure(s_plain) == jax.tree.structure(s_inj.inner_state))
    assert ([(l.shape, l.dtype) for l in jax.tree.leaves(s_plain)]
            == [(l.shape, l.dtype) for l in jax.tree.leaves(s_inj.inner_state)])
    _, s_plain = jax.eval_shape(lambda g, s: plain.update(g, s, params, **extra), g, s_plain)
    _, s_inj = jax.eval_shape(lambda g, s: injected.update(g, s, params, **extra), g, s_inj)
    assert jax.tree.structure(s_plain) == jax.tree.structure(s_inj.inner_state)
    assert ([(l.shape, l.dtype) for l in jax.tree.leaves(s_plain)]
            == [(l.shape, l.dtype) for l in jax.tree.leaves(s_inj.inner_state)])


def test_runs_in_one_while_loop_under_jit():
  params = jnp.zeros(3)
  tx = so.hessian_free(curvature="hessian")
  obj_fn = lambda p: jnp.sum((p - 1.0) ** 2)
  jaxpr = str(jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p, obj_fn=obj_fn))(
      params, tx.init(params), params))
  assert jaxpr.count("while[") == 1


# ----------------------------------------------------------------------------------------
# Natural gradient
# ----------------------------------------------------------------------------------------


def _softmax_model(rng):
  x = rng.normal(size=(10, 3))
  y = rng.integers(0, 4, size=10)
  return x, y


def _dense_fisher(logits_fn, params):
  """F = (1/B) Σ_b J_bᵀ (diag p_b − p_b p_bᵀ) J_b from jax.jacfwd, on the flat params."""
  logits = logits_fn(params)
  jac = np.asarray(jax.jacfwd(logits_fn)(params)).reshape(logits.shape[0], logits.shape[1], -1)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  f = sum(jac[i].T @ (np.diag(p) - np.outer(p, p)) @ jac[i] for i, p in enumerate(probs))
  return f / logits.shape[0]


def test_natural_gradient_direction_and_kl_budget():
  """The direction is (F + λI)⁻¹g with a dense Fisher; ½uᵀFu of the update u equals δ; the
  state holds that KL, the Newton decrement sqrt(gᵀd) and dᵀFd / ‖d‖²; when η_max binds,
  the realised KL is below δ."""
  rng = np.random.default_rng(8)
  x, y = _softmax_model(rng)
  with jax.enable_x64(True):
    params = jnp.asarray(0.3 * rng.normal(size=(3, 4)))
    logits_fn = lambda p: jnp.asarray(x) @ p
    loss = lambda p: so.softmax_cross_entropy(jnp.asarray(y))(logits_fn(p))
    g = np.asarray(jax.grad(loss)(params)).ravel()
    fisher = _dense_fisher(logits_fn, params)
    lam = 1e-2
    d = np.linalg.solve(fisher + lam * np.eye(12), g)
    for delta, cap in ((1e-3, 10.0), (10.0, 0.5)):
      tx = so.natural_gradient(delta, max_learning_rate=cap, damping=lam, cg_max_iterations=30,
                               cg_tol=1e-13)
      u, state = jax.jit(lambda g, s, p: tx.update(g, s, p, logits_fn=logits_fn))(
          jnp.asarray(g).reshape(3, 4), tx.init(params), params)
      u = np.asarray(u).ravel()
      ng = state[0]
      eta = float(ng.step_size)
      np.testing.assert_allclose(-u / eta, d, rtol=1e-9, atol=1e-12)
      kl = 0.5 * u @ fisher @ u
      np.testing.assert_allclose(float(ng.kl), kl, rtol=1e-9)
      if cap == 10.0:
        np.testing.assert_allclose(kl, delta, rtol=1e-6)
        np.testing.assert_allclose(eta, np.sqrt(2 * delta / (d @ fisher @ d)), rtol=1e-9)
      else:
        assert eta == cap and kl < delta
      np.testing.assert_allclose(float(ng.newton_decrement), np.sqrt(g @ d), rtol=1e-9)
      np.testing.assert_allclose(float(ng.sharpness), d @ fisher @ d / (d @ d), rtol=1e-9)


# ----------------------------------------------------------------------------------------
# Training: convergence on a tiny MLP, orbax resume
# ----------------------------------------------------------------------------------------


def _mlp_problem():
  kx, kw1, kw2 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (32, 4))
  y = (jnp.sum(x[:, :2], axis=1) > 0).astype(jnp.int32) + (x[:, 2] > 0).astype(jnp.int32)
  params = {"w1": 0.5 * jax.random.normal(kw1, (4, 8)), "b1": jnp.zeros(8),
            "w2": 0.5 * jax.random.normal(kw2, (8, 3)), "b2": jnp.zeros(3)}
  logits_fn = lambda p: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  return params, logits_fn, so.softmax_cross_entropy(y)


def _train_step(tx, logits_fn, loss_fn):
  @jax.jit
  def step(params, state):
    loss, g = jax.value_and_grad(lambda p: loss_fn(logits_fn(p)))(params)
    u, state = tx.update(g, state, params, logits_fn=logits_fn, loss_fn=loss_fn)
    return optax.apply_updates(params, u), state, loss
  return step


def test_resume_from_orbax_checkpoint_is_bit_identical(tmp_path):
  """Hessian-free on a tanh MLP: 5 steps straight equal 2 steps, save, restore into the
  abstract state of a fresh transform, 3 more; the loss falls meanwhile."""
  params0, logits_fn, loss_fn = _mlp_problem()
  tx = so.hessian_free(cg_max_iterations=10)
  step = _train_step(tx, logits_fn, loss_fn)
  params, state = params0, tx.init(params0)
  losses = []
  for _ in range(5):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  reference = (params, state)
  assert losses[-1] < 0.7 * losses[0]

  params, state = params0, tx.init(params0)
  for _ in range(2):
    params, state, _ = step(params, state)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
  checkpointer.wait_until_finished()
  fresh = so.hessian_free(cg_max_iterations=10)
  abstract = jax.eval_shape(lambda: {"params": params0, "opt_state": fresh.init(params0)})
  restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  params, state = restored["params"], restored["opt_state"]
  for _ in range(3):
    params, state, _ = step(params, state)
  for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------
# Sharding: a subprocess with 4 simulated CPU devices
# ----------------------------------------------------------------------------------------

_SHARDING_SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import secondorder as so
jax.config.update("jax_enable_x64", True)  # float64: CG's sensitivity to the order of sums
                                           # stays far below the tolerance

kx, ky, k1, k2 = jax.random.split(jax.random.key(0), 4)
x = jax.random.normal(kx, (3, 32, 4)) * jnp.where(jnp.arange(32) < 16, 1.0, 3.0)[None, :, None]
y = jax.random.randint(ky, (3, 32), 0, 3)
params = {"w1": 0.5 * jax.random.normal(k1, (4, 8)), "b1": jnp.zeros(8),
          "w2": 0.5 * jax.random.normal(k2, (8, 3)), "b2": jnp.zeros(3)}
hf = so.hessian_free(cg_max_iterations=8)

def train(params, x, y):
  def body(carry, batch):
    p, s = carry
    xb, yb = batch
    logits_fn = lambda p: jnp.tanh(xb @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    loss_fn = so.softmax_cross_entropy(yb)
    g = jax.grad(lambda p: loss_fn(logits_fn(p)))(p)
    u, s = hf.update(g, s, p, logits_fn=logits_fn, loss_fn=loss_fn)
    return (optax.apply_updates(p, u), s), None
  return jax.lax.scan(body, (params, hf.init(params)), (x, y))[0]

single = jax.jit(train)(params, x, y)
mesh = Mesh(np.array(jax.devices()), ("data",))
xs = jax.device_put(x, NamedSharding(mesh, P(None, "data", None)))
ys = jax.device_put(y, NamedSharding(mesh, P(None, "data")))
sharded = jax.jit(train)(params, xs, ys)
diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
           zip(jax.tree.leaves(single), jax.tree.leaves(sharded)))
moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
            zip(jax.tree.leaves(params), jax.tree.leaves(single[0])))
print(json.dumps({"devices": jax.device_count(), "diff": diff, "moved": moved,
                  "batch_shards": len(xs.sharding.device_set)}))
"""


def test_sharded_jit_equals_one_device():
  """Hessian-free, 3 float64 steps with the batch split over 4 devices by sharded `jit`:
  the CG dot products (the natural gradient's CG is the same function) and the loss at the
  candidate are global, so the result equals one device's up to the order of the sums."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", _SHARDING_SCRIPT], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["devices"] == 4 and report["batch_shards"] == 4
  assert report["moved"] > 1e-2
  assert report["diff"] < 1e-10 * max(1.0, report["moved"]), report


# ----------------------------------------------------------------------------------------
# No silent failure: bounded damping, rejection, overflow, donation, bad input
# ----------------------------------------------------------------------------------------


def _converging_mlp():
  """A 4-16-3 tanh MLP memorising 32 points, on which Hessian-free with Martens' rule (every
  finite step taken) reaches a loss of 1.5e-8 at step 42 and then, λ ≈ 2e-8, takes a step
  along a nearly flat direction of the Gauss-Newton matrix that raises the loss to 0.37
  (ρ = −1.9e5) and diverges to 1e7."""
  kx, kw1, kw2 = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (32, 4))
  y = (jnp.sum(x[:, :2], axis=1) > 0).astype(jnp.int32) + (x[:, 2] > 0).astype(jnp.int32)
  params = {"w1": jax.random.normal(kw1, (4, 16)) / 2.0, "b1": jnp.zeros(16),
            "w2": jax.random.normal(kw2, (16, 3)) / 4.0, "b2": jnp.zeros(3)}
  logits_fn = lambda p: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  return params, logits_fn, so.softmax_cross_entropy(y)


def _scan_losses(tx, params, logits_fn, loss_fn, steps):
  """The loss before each of `steps` steps (one compile, lax.scan), and the final state."""
  def body(carry, _):
    p, s = carry
    loss, g = jax.value_and_grad(lambda p: loss_fn(logits_fn(p)))(p)
    u, s = tx.update(g, s, p, logits_fn=logits_fn, loss_fn=loss_fn)
    return (optax.apply_updates(p, u), s), loss
  (p, s), losses = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None,
                                                  length=steps))(params)
  return np.asarray(losses), p, s


def test_default_rejects_the_step_that_blew_up_a_converged_run():
  """The old default (min_rho=None: every finite step taken, λ unbounded below) reproduces
  the blow-up: after reaching about 1e-8 the loss rises by more than 1e6 times. With the
  defaults (a step that raises the loss is rejected, λ >= 1e-8), and with ρ_min = −1, the
  same 120 steps never raise the loss above 1e-6 after it first gets there, and the
  parameters stay near the solution."""
  params, logits_fn, loss_fn = _converging_mlp()
  old, _, _ = _scan_losses(so.hessian_free(min_rho=None, min_damping=1e-30), params,
                           logits_fn, loss_fn, 120)
  best = int(np.argmin(old))
  assert old[best] < 1e-7 and old[best:].max() > 1e6 * max(old[best], 1e-8)
  for tx in (so.hessian_free(), so.hessian_free(min_rho=-1.0)):
    new, p, s = _scan_losses(tx, params, logits_fn, loss_fn, 120)
    first = int(np.argmax(new < 1e-6))
    assert new[first] < 1e-6 and new[first:].max() < 1e-6
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(p)) < 20.0
    hf = s[0]
    assert int(hf.nonfinite_count) == 0
    assert so.transforms.hessian_free.MIN_DAMPING <= float(hf.damping) <= 1e8


@pytest.mark.parametrize("c,within_one", [(7.0, True), (20.0, False)])
def test_min_rho_decides_from_the_reduction_ratio(c, within_one):
  """On the quartic (ρ from numpy: −0.4 for c = 7, −3.2 for c = 20) both steps raise the
  loss: the default ρ_min = 0 rejects both (zero update, λ × 3/2), as does
  reject_increase=True even with ρ_min = −1; ρ_min = −1 takes the first and rejects the
  second; min_rho=None takes both. λ follows ρ < ¼ in every case."""
  a, b, _ = _quartic_problem(c)
  obj_fn = lambda v: (0.5 * v @ jnp.asarray(a) @ v - jnp.asarray(b) @ v
                      + c * jnp.sum(v * v) ** 2)
  with jax.enable_x64(True):
    x, g = jnp.zeros(5), jnp.asarray(-b)
    d = -np.linalg.solve(a + 0.5 * np.eye(5), -b)
    f = lambda v: 0.5 * v @ a @ v - b @ v + c * (v @ v) ** 2
    rho = (f(d) - f(np.zeros(5))) / (-b @ d + 0.5 * d @ a @ d)
    assert (-1 < rho < 0) if within_one else (rho < -1)
    for kwargs, takes in ((dict(), False), (dict(min_rho=-1.0), within_one),
                          (dict(min_rho=-1.0, reject_increase=True), False),
                          (dict(min_rho=None), True)):
      tx = so.scale_by_hessian_free(curvature="hessian", initial_damping=0.5,
                                    cg_max_iterations=5, cg_tol=0.0, progress_tol=None,
                                    **kwargs)
      p, state = jax.jit(lambda g, s, x: tx.update(g, s, x, obj_fn=obj_fn))(g, tx.init(x), x)
      np.testing.assert_allclose(float(state.rho), rho, rtol=1e-9)
      np.testing.assert_allclose(np.asarray(p), -d if takes else np.zeros(5), rtol=1e-9)
      assert float(state.damping) == pytest.approx(0.75)


def _fixed_point_steps(tx, obj_fn, g, steps):
  """`steps` updates at x = 0 with the same gradient (θ never moves): λ alone evolves."""
  x = jnp.zeros(g.shape, g.dtype)
  def body(s, _):
    _, s = tx.update(g, s, x, obj_fn=obj_fn)
    return s, s[0].damping if isinstance(s, tuple) and hasattr(s[0], "damping") else s.damping
  return jax.jit(lambda s: jax.lax.scan(body, s, None, length=steps))(tx.init(x))


def test_damping_stays_in_its_bounds_and_restarts_from_zero():
  """Every step rejected (a gradient where the loss has none: every step raises it) raises
  λ by 3/2 per step: after 400 steps it sits at λ_max = 1e8 (it reached 3e37 after 300
  before); every step exact (a quadratic, ρ = 1) lowers it by 2/3 to λ_min = 1e-8 and no
  further. initial_damping = 0 stays 0 while steps succeed and its first increase goes to
  DAMPING_FROM_ZERO = 1."""
  from secondorder.transforms import hessian_free as hf_module
  g = jnp.ones(3)
  rising = lambda v: 0.5 * jnp.sum(v * v) + 10.0 * jnp.sum(v * v) ** 2  # ∇ = 0 at 0
  tx = so.scale_by_hessian_free(curvature="hessian", reject_increase=True,
                                cg_max_iterations=3)
  state, lams = _fixed_point_steps(tx, rising, g, 400)
  lams = np.asarray(lams)
  assert np.all(np.isfinite(lams)) and float(state.damping) == np.float32(hf_module.MAX_DAMPING)
  np.testing.assert_allclose(lams[:3], [1.5, 2.25, 3.375], rtol=1e-6)
  quadratic = lambda v: 0.5 * jnp.sum(v * v) - jnp.sum(v)               # ∇ = −1 at 0
  tx = so.scale_by_hessian_free(curvature="hessian", cg_max_iterations=3)
  state, lams = _fixed_point_steps(tx, quadratic, -g, 200)
  assert float(state.damping) == np.float32(hf_module.MIN_DAMPING)
  assert np.all(np.asarray(lams) >= np.float32(hf_module.MIN_DAMPING))
  zero = so.scale_by_hessian_free(curvature="hessian", initial_damping=0.0,
                                  cg_max_iterations=3)
  _, lams = _fixed_point_steps(zero, quadratic, -g, 3)
  np.testing.assert_array_equal(np.asarray(lams), [0.0, 0.0, 0.0])
  _, lams = _fixed_point_steps(zero, rising, g, 2)
  np.testing.assert_allclose(np.asarray(lams), [hf_module.DAMPING_FROM_ZERO,
                                                1.5 * hf_module.DAMPING_FROM_ZERO])


@pytest.mark.parametrize("magnitude", [1e19, 1e20])
def test_overflowing_gradient_decides_as_float64(magnitude):
  """Newton-CG (λ₀ = 0) on ½xᵀAx − bᵀx from 0 with float32 b around 1e19-1e20, where ‖b‖²
  overflows: at 1e19 float32 takes the step float64 takes (A⁻¹b, ρ = 1) instead of a zero
  step from CG stopping at iteration 0 (the old behaviour, with nothing counted); at 1e20 the
  loss at the step (bᵀx about 1e39) overflows float32, so the step is skipped and counted,
  never a silent zero step."""
  rng = np.random.default_rng(11)
  a = _spd(rng, 4, 1.0) * 10.0
  b = magnitude * rng.normal(size=4)
  tx = so.scale_by_hessian_free(curvature="hessian", initial_damping=0.0,
                                cg_max_iterations=12, progress_tol=None)

  def step(a, b):
    obj_fn = lambda v: 0.5 * v @ a @ v - b @ v
    x = jnp.zeros_like(b)
    return tx.update(-b, tx.init(x), x, obj_fn=obj_fn)

  u32, s32 = jax.jit(step)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  with jax.enable_x64(True):
    u64, s64 = jax.jit(step)(jnp.asarray(a), jnp.asarray(b))
    u64, rho64 = np.asarray(u64), float(s64.rho)
  np.testing.assert_allclose(-u64, np.linalg.solve(a, b), rtol=1e-9)
  assert rho64 == pytest.approx(1.0)
  overflows = abs(b @ np.linalg.solve(a, b)) > np.finfo(np.float32).max
  assert overflows == (magnitude == 1e20)
  if not overflows:
    np.testing.assert_allclose(np.asarray(u32, np.float64), u64, rtol=1e-4)
    assert float(s32.rho) == pytest.approx(1.0, rel=1e-3)
    assert int(s32.nonfinite_count) == 0
  else:
    np.testing.assert_array_equal(np.asarray(u32), np.zeros(4))
    assert int(s32.nonfinite_count) == 1


@pytest.mark.parametrize("magnitude", [1e19, 1e20])
def test_natural_gradient_with_overflowing_gradient_decides_as_float64(magnitude):
  """The natural gradient with float32 gradients around 1e19-1e20 (dᵀFd and ‖g‖² overflow
  float32): η and the step u = ηd come from the unit direction and its norm, so the step
  equals float64's (its KL is the budget δ) instead of a zero step from CG stopping at
  iteration 0."""
  rng = np.random.default_rng(12)
  x = rng.normal(size=(8, 3))
  params = 0.1 * rng.normal(size=(3, 4))
  g = magnitude * rng.normal(size=(3, 4))
  tx = so.scale_by_natural_gradient(kl_budget=1e-2, damping=1e-3, cg_max_iterations=30)

  def step(x, params, g):
    return tx.update(g, tx.init(params), params, logits_fn=lambda p: x @ p)

  u32, s32 = jax.jit(step)(*(jnp.asarray(v, jnp.float32) for v in (x, params, g)))
  with jax.enable_x64(True):
    u64, s64 = jax.jit(step)(*(jnp.asarray(v) for v in (x, params, g)))
    u64, kl64 = np.asarray(u64), float(s64.kl)
  assert kl64 == pytest.approx(1e-2, rel=1e-6)
  np.testing.assert_allclose(np.asarray(u32, np.float64), u64, rtol=2e-3,
                             atol=2e-3 * np.abs(u64).max())
  assert float(s32.kl) == pytest.approx(1e-2, rel=1e-3)
  assert int(s32.nonfinite_count) == 0


def test_jitted_step_with_the_state_donated():
  """Every state leaf is its own buffer: a jitted step that donates the state (and the
  params) runs several steps, for both aliases, plain and under inject_hyperparams."""
  params, logits_fn, loss_fn = _mlp_problem()
  for factory, kwargs, extra in (
      (so.hessian_free, dict(cg_max_iterations=5), dict(logits_fn=logits_fn, loss_fn=loss_fn)),
      (so.natural_gradient, dict(kl_budget=1e-2, cg_max_iterations=5),
       dict(logits_fn=logits_fn))):
    for tx in (factory(**kwargs), optax.inject_hyperparams(factory)(**kwargs)):
      state = tx.init(params)
      leaves = jax.tree.leaves(state)
      assert len({id(x) for x in leaves}) == len(leaves)

      def step(p, s, extra=extra, tx=tx):
        g = jax.grad(lambda p: loss_fn(logits_fn(p)))(p)
        u, s = tx.update(g, s, p, **extra)
        return optax.apply_updates(p, u), s

      step = jax.jit(step, donate_argnums=(0, 1))
      p = jax.tree.map(jnp.copy, params)
      for _ in range(3):
        p, state = step(p, state)
      assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((p, state)))
      assert int(optax.tree.get(state, "nonfinite_count")) == 0
      assert float(optax.tree.get(state, "cg_iterations")) > 0


def test_bad_input_gets_a_clear_error_or_a_result():
  """A logits_fn that returns a scalar: a ValueError naming logits_fn and the expected shape
  (natural gradient, and Hessian-free's Fisher curvature); the new ranges are checked at
  construction, each error naming its argument; zero gradients give a zero step and an
  empty parameter tree an empty update, with nothing counted as non-finite."""
  params = jnp.zeros((3, 2))
  scalar = lambda p: jnp.sum(p)
  for tx, extra in ((so.natural_gradient(1e-2), dict(logits_fn=scalar)),
                    (so.hessian_free(curvature="fisher"),
                     dict(logits_fn=scalar, loss_fn=lambda z: z))):
    with pytest.raises(ValueError, match=r"logits_fn must return logits .*\[\.\.\., classes\]"):
      tx.update(jnp.ones((3, 2)), tx.init(params), params, **extra)
  for bad, name in ((dict(min_damping=0.0), "min_damping"),
                    (dict(max_damping=1e-9), "max_damping"),
                    (dict(initial_damping=1e-9), "initial_damping"),
                    (dict(initial_damping=1e9), "initial_damping"),
                    (dict(min_rho=1.0), "min_rho"),
                    (dict(learning_rate=-1.0), "learning_rate"),
                    (dict(cg_max_iterations=1.5), "cg_max_iterations")):
    with pytest.raises(ValueError, match=name):
      so.hessian_free(**bad)
  for factory in (so.hessian_free, so.natural_gradient):   # injected: checked at init
    with pytest.raises(ValueError, match="cg_max_iterations"):
      optax.inject_hyperparams(factory)(1e-2, cg_max_iterations=0).init(params)
  for bad, name in ((dict(kl_budget=0.0), "kl_budget"), (dict(damping=-1.0), "damping"),
                    (dict(kl_budget=1e-2, warm_start_decay=2.0), "warm_start_decay")):
    with pytest.raises(ValueError, match=name):
      so.natural_gradient(**dict(dict(kl_budget=1e-2), **bad))
  x = jnp.ones((4, 3))
  y = jnp.zeros(4, jnp.int32)
  for p, logits_fn in ((params, lambda p: x @ p), ({}, lambda p: jnp.zeros((4, 2)))):
    for tx, extra in ((so.hessian_free(), dict(loss_fn=so.softmax_cross_entropy(y))),
                      (so.natural_gradient(1e-2), {})):
      zeros = jax.tree.map(jnp.zeros_like, p)
      u, s = jax.jit(lambda g, s: tx.update(g, s, p, logits_fn=logits_fn, **extra))(
          zeros, tx.init(p))
      assert jax.tree.structure(u) == jax.tree.structure(p)
      for leaf in jax.tree.leaves(u):
        np.testing.assert_array_equal(np.asarray(leaf), np.zeros(leaf.shape))
      assert int(optax.tree.get(s, "nonfinite_count")) == 0
