"""Curvature products against dense matrices built with jax.hessian / jax.jacfwd."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from secondorder.curvature.losses import softmax_cross_entropy, squared_error
from secondorder.curvature.products import (
    fisher_operator, fisher_vp, gauss_newton_operator, gnvp, hessian_operator, hvp, jvp,
    value_grad_hvp, vjp)

BATCH, D_IN, HIDDEN, CLASSES = 6, 4, 5, 3
TOL = {"float32": 1e-4, "float64": 1e-10}


def precision(dtype: str):
  return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def normal(seed, shape, dtype=None, scale=1.0):
  """Test data from numpy (no per-op XLA compiles at setup); float64 under x64 unless dtype."""
  return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), dtype)


def randint(seed, shape, high):
  return jnp.asarray(np.random.default_rng(seed).integers(0, high, size=shape), jnp.int32)


_PROBLEMS: dict = {}


def make_problem(dtype: str):
  """A 2-layer tanh MLP with dict-of-layers params, its data, and dense curvature matrices.

  Built once per dtype; the dense references come from one jitted function.
  """
  if dtype in _PROBLEMS:
    return _PROBLEMS[dtype]
  dt = jnp.dtype(dtype)
  params = {
      "dense1": {"w": normal(0, (D_IN, HIDDEN), dt, 0.5), "b": normal(1, (HIDDEN,), dt, 0.1)},
      "dense2": {"w": normal(2, (HIDDEN, CLASSES), dt), "b": jnp.zeros((CLASSES,), dt)},
  }
  x = normal(3, (BATCH, D_IN), dt)
  labels = randint(4, (BATCH,), CLASSES)
  targets = normal(5, (BATCH, CLASSES), dt)

  def logits_fn(p):
    h = jnp.tanh(x @ p["dense1"]["w"] + p["dense1"]["b"])
    return h @ p["dense2"]["w"] + p["dense2"]["b"]

  def loss_fn(p):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), labels))

  def generic_loss(z):
    # A loss with a non-trivial, non-diagonal output Hessian and no closed form here.
    return jnp.sum(jnp.log(jnp.cosh(z - targets))) + 0.3 * jnp.sum(z) ** 2

  def ce_of_flat_logits(zf):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        zf.reshape(BATCH, CLASSES), labels))

  flat0, unravel = ravel_pytree(params)

  @jax.jit
  def dense(t):
    z = logits_fn(unravel(t))
    J = jax.jacfwd(lambda s: logits_fn(unravel(s)))(t).reshape(-1, t.size)
    logp_fn = lambda s: jax.nn.log_softmax(logits_fn(unravel(s)), axis=-1)
    scores = jax.jacfwd(logp_fn)(t)  # [B, C, n]
    prob = jnp.exp(logp_fn(t))
    return dict(
        J=J,
        H=jax.hessian(lambda s: loss_fn(unravel(s)))(t),
        grad=jax.grad(lambda s: loss_fn(unravel(s)))(t),
        # Output Hessians by differentiating the losses (gnvp uses closed forms).
        H_ce=jax.hessian(ce_of_flat_logits)(z.reshape(-1)),
        H_generic=jax.hessian(lambda zf: generic_loss(zf.reshape(z.shape)))(z.reshape(-1)),
        # True Fisher as an exact expectation over model labels:
        # F = (1/B) Σ_b Σ_c p_bc ∇log p_bc ∇log p_bcᵀ.
        F=jnp.einsum("bc,bci,bcj->ij", prob, scores, scores) / BATCH,
    )

  pb = dict(params=params, x=x, labels=labels, targets=targets, logits_fn=logits_fn,
            loss_fn=loss_fn, generic_loss=generic_loss, ce=ce_of_flat_logits, flat=flat0,
            unravel=unravel, **dense(flat0))
  _PROBLEMS[dtype] = pb
  return pb


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def flat(tree):
  return ravel_pytree(tree)[0]


def random_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(
      treedef, [normal(100 * seed + i, l.shape, l.dtype) for i, l in enumerate(leaves)])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_jvp_and_vjp_match_dense_jacobian(dtype):
  with precision(dtype):
    pb = make_problem(dtype)
    v = random_like(pb["params"], 1)
    u = normal(2, (BATCH, CLASSES), jnp.dtype(dtype))
    (out, jv), (out2, jtu) = jax.jit(
        lambda p, v, u: (jvp(pb["logits_fn"], p, v), vjp(pb["logits_fn"], p, u)))(pb["params"], v, u)
    z = pb["logits_fn"](pb["params"])
    assert rel_err(out, z) < TOL[dtype] and rel_err(out2, z) < TOL[dtype]
    assert rel_err(jv.reshape(-1), pb["J"] @ flat(v)) < TOL[dtype]
    assert jax.tree.structure(jtu) == jax.tree.structure(pb["params"])
    assert rel_err(flat(jtu), pb["J"].T @ u.reshape(-1)) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_hvp_and_value_grad_hvp_match_dense_hessian(dtype):
  with precision(dtype):
    pb = make_problem(dtype)
    f, H = pb["loss_fn"], pb["H"]
    v = random_like(pb["params"], 3)
    hv, (value, grad, hv2), hv3, hv4 = jax.jit(lambda p, v: (
        hvp(f, p, v), value_grad_hvp(f, p, v), hessian_operator(f, p)(v),
        hvp(f, p, v, mode="reverse_over_forward")))(pb["params"], v)
    assert jax.tree.structure(hv) == jax.tree.structure(pb["params"])
    assert all(a.dtype == jnp.dtype(dtype) for a in jax.tree.leaves(hv))
    assert rel_err(flat(hv), H @ flat(v)) < TOL[dtype]
    assert rel_err(value, f(pb["params"])) < TOL[dtype]
    assert rel_err(flat(grad), pb["grad"]) < TOL[dtype]
    assert rel_err(flat(hv2), H @ flat(v)) < TOL[dtype]
    assert rel_err(flat(hv3), H @ flat(v)) < TOL[dtype]
    assert rel_err(flat(hv4), H @ flat(v)) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gnvp_softmax_cross_entropy_closed_form(dtype):
  with precision(dtype):
    pb = make_problem(dtype)
    G = pb["J"].T @ pb["H_ce"] @ pb["J"]
    v = random_like(pb["params"], 4)
    loss = softmax_cross_entropy(pb["labels"])
    # The loss object is a pytree: it crosses the jit boundary with its labels as data.
    gv, gv_sum, value = jax.jit(lambda p, v, loss: (
        gnvp(pb["logits_fn"], loss, p, v),
        gnvp(pb["logits_fn"], softmax_cross_entropy(reduction="sum"), p, v),
        loss(pb["logits_fn"](p))))(pb["params"], v, loss)
    assert rel_err(flat(gv), G @ flat(v)) < TOL[dtype]
    assert rel_err(flat(gv_sum), BATCH * (G @ flat(v))) < TOL[dtype]
    # The loss object is also the loss: the value of optax's mean cross-entropy.
    assert rel_err(value, pb["ce"](pb["logits_fn"](pb["params"]).reshape(-1))) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gnvp_squared_error_closed_form(dtype):
  with precision(dtype):
    pb = make_problem(dtype)
    G = pb["J"].T @ pb["J"] / BATCH  # H_L = I / B for the mean over examples
    v = random_like(pb["params"], 5)
    loss = squared_error(pb["targets"])
    gv = jax.jit(lambda p, v, loss: gnvp(pb["logits_fn"], loss, p, v))(pb["params"], v, loss)
    assert rel_err(flat(gv), G @ flat(v)) < TOL[dtype]
    z = pb["logits_fn"](pb["params"])
    assert rel_err(loss(z), 0.5 * jnp.sum((z - pb["targets"]) ** 2) / BATCH) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gnvp_generic_loss_uses_output_space_hessian(dtype):
  with precision(dtype):
    pb = make_problem(dtype)
    G = pb["J"].T @ pb["H_generic"] @ pb["J"]
    v = random_like(pb["params"], 6)
    gv, gv_op, gv_ce = jax.jit(lambda p, v: (
        gnvp(pb["logits_fn"], pb["generic_loss"], p, v),
        gauss_newton_operator(pb["logits_fn"], pb["generic_loss"], p)(v),
        gnvp(pb["logits_fn"], lambda z: pb["ce"](z.reshape(-1)), p, v)))(pb["params"], v)
    assert rel_err(flat(gv), G @ flat(v)) < TOL[dtype]
    assert rel_err(flat(gv_op), G @ flat(v)) < TOL[dtype]
    # Cross-entropy as a plain callable takes the generic path and agrees with the closed form.
    assert rel_err(flat(gv_ce), pb["J"].T @ pb["H_ce"] @ pb["J"] @ flat(v)) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fisher_vp_is_the_true_categorical_fisher(dtype):
  with precision(dtype):
    pb = make_problem(dtype)
    v = random_like(pb["params"], 7)
    fv, fv_op = jax.jit(lambda p, v: (
        fisher_vp(pb["logits_fn"], p, v), fisher_operator(pb["logits_fn"], p)(v)))(pb["params"], v)
    assert rel_err(flat(fv), pb["F"] @ flat(v)) < TOL[dtype]
    assert rel_err(flat(fv_op), pb["F"] @ flat(v)) < TOL[dtype]


def test_batch_axes_are_flattened_for_softmax_cross_entropy():
  pb = make_problem("float32")
  v = random_like(pb["params"], 8)
  seq_logits = lambda p: pb["logits_fn"](p).reshape(2, BATCH // 2, CLASSES)
  a, b = jax.jit(lambda p, v: (gnvp(pb["logits_fn"], softmax_cross_entropy(), p, v),
                               gnvp(seq_logits, softmax_cross_entropy(), p, v)))(pb["params"], v)
  assert rel_err(flat(b), flat(a)) < 1e-5
  assert rel_err(flat(a), pb["J"].T @ pb["H_ce"] @ pb["J"] @ flat(v)) < 1e-4


def test_products_vmap_over_directions_under_jit():
  pb = make_problem("float32")
  f = pb["loss_fn"]
  V = normal(9, (4, pb["flat"].size), jnp.float32)
  vs = jax.vmap(pb["unravel"])(V)
  hvs, fvs = jax.jit(jax.vmap(lambda v: (hvp(f, pb["params"], v),
                                         fisher_vp(pb["logits_fn"], pb["params"], v))))(vs)
  assert rel_err(jax.vmap(flat)(hvs), V @ pb["H"].T) < 1e-4
  assert rel_err(jax.vmap(flat)(fvs), V @ pb["F"].T) < 1e-4


def test_hvp_rejects_non_scalar_function():
  pb = make_problem("float32")
  with pytest.raises(ValueError, match=r"hvp needs f to return a scalar; it returned shape \(3,\)"):
    jax.jit(lambda p: hvp(lambda q: jnp.ones(3) * pb["loss_fn"](q), p, p))(pb["params"])
  with pytest.raises(ValueError, match=r"value_grad_hvp needs f to return a scalar; it returned shape \(6, 3\)"):
    jax.jit(lambda p: value_grad_hvp(pb["logits_fn"], p, p))(pb["params"])


def test_hvp_differentiates_through_custom_vjp_functions():
  @jax.custom_vjp
  def softsign(x):
    return x / (1 + jnp.abs(x))

  def fwd(x):
    return x / (1 + jnp.abs(x)), x

  def bwd(x, ct):
    return (ct / (1 + jnp.abs(x)) ** 2,)

  softsign.defvjp(fwd, bwd)
  params = {"a": jnp.array([0.3, -1.2, 2.0]), "b": jnp.array([[0.5, 0.1]])}
  f = lambda p: jnp.sum(softsign(p["a"]) ** 2) + jnp.sum(softsign(p["b"]) * p["a"][:2])
  ref_f = lambda p: jnp.sum((p["a"] / (1 + jnp.abs(p["a"]))) ** 2) + jnp.sum(
      p["b"] / (1 + jnp.abs(p["b"])) * p["a"][:2])
  t0, unravel = ravel_pytree(params)
  v = random_like(params, 11)
  H = jax.jit(jax.hessian(lambda t: ref_f(unravel(t))))(t0)
  hv = jax.jit(lambda p, v: hvp(f, p, v))(params, v)
  assert rel_err(flat(hv), H @ flat(v)) < 1e-5


def test_hvp_rejects_unknown_mode():
  pb = make_problem("float32")
  with pytest.raises(ValueError, match=r"mode must be one of .*got 'reverse'"):
    hvp(pb["loss_fn"], pb["params"], pb["params"], mode="reverse")


def test_direction_must_match_params():
  pb = make_problem("float32")
  p = pb["params"]
  wrong_shape = {"dense1": p["dense1"], "dense2": {"w": p["dense2"]["w"], "b": jnp.zeros(4)}}
  msg = r"leaf \['dense2'\]\['b'\] has shape \(4,\) in v but \(3,\) in params"
  with pytest.raises(ValueError, match=msg):
    hvp(pb["loss_fn"], p, wrong_shape)
  with pytest.raises(ValueError, match=msg):
    gnvp(pb["logits_fn"], softmax_cross_entropy(), p, wrong_shape)
  with pytest.raises(ValueError, match=msg):
    jvp(pb["logits_fn"], p, wrong_shape)
  wrong_tree = {"dense1": p["dense1"], "dense2": {"kernel": p["dense2"]["w"], "b": p["dense2"]["b"]}}
  with pytest.raises(ValueError, match=r"params has leaf \['dense2'\]\['w'\] where v has \['dense2'\]\['kernel'\]"):
    value_grad_hvp(pb["loss_fn"], p, wrong_tree)
  with pytest.raises(ValueError, match=r"params has leaf .* where v has"):
    fisher_vp(pb["logits_fn"], p, wrong_tree)
  with pytest.raises(ValueError, match=r"leaf <root> has shape \(5, 3\) in u but \(6, 3\) in f\(params\)"):
    vjp(pb["logits_fn"], p, jnp.ones((5, 3)))


def test_closed_form_losses_need_labels_for_their_value_and_check_reduction():
  with pytest.raises(ValueError, match="softmax_cross_entropy needs labels"):
    softmax_cross_entropy()(jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="squared_error needs targets"):
    squared_error()(jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="reduction must be one of"):
    softmax_cross_entropy(reduction="avg")
