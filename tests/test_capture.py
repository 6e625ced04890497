"""secondorder.capture against a hand-written model of the same math (linen and NNX)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

from secondorder import capture

B, H, W, C_IN, CLASSES = 3, 5, 5, 2, 5


class LinenNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(3, (2, 2), padding="SAME")(x))
    x = jnp.tanh(nn.Conv(4, (3, 3), strides=(2, 2), padding="VALID")(x))
    return nn.Dense(CLASSES)(x.reshape(x.shape[0], -1))


class NnxNet(nnx.Module):

  def __init__(self, rngs):
    self.c1 = nnx.Conv(C_IN, 3, (2, 2), padding="SAME", rngs=rngs)
    self.c2 = nnx.Conv(3, 4, (3, 3), strides=(2, 2), padding="VALID", rngs=rngs)
    self.head = nnx.Linear(16, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = jnp.tanh(self.c1(x))
    x = jnp.tanh(self.c2(x))
    return self.head(x.reshape(x.shape[0], -1))


def ce(z, y):
  return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()


def _rows(x, k, stride, pad):
  """im2col by explicit slicing: [B, Ho, Wo, kh*kw*C] ordered (di, dj, c)."""
  xp = jnp.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
  ho = (xp.shape[1] - k[0]) // stride + 1
  wo = (xp.shape[2] - k[1]) // stride + 1
  cols = [xp[:, di:di + stride * (ho - 1) + 1:stride, dj:dj + stride * (wo - 1) + 1:stride, :]
          for di in range(k[0]) for dj in range(k[1])]
  return jnp.concatenate(cols, axis=-1)


def _aug(rows):
  rows = rows.reshape(-1, rows.shape[-1])
  return jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)


def hand_forward(p, x, eps):
  """The same network written out; eps perturbs each layer's output; returns (z, inputs)."""
  r1 = _rows(x, (2, 2), 1, ((0, 1), (0, 1)))      # SAME for an even kernel pads (0, 1)
  s1 = r1 @ p["Conv_0"]["kernel"].reshape(-1, 3) + p["Conv_0"]["bias"] + eps["Conv_0"]
  h1 = jnp.tanh(s1)
  r2 = _rows(h1, (3, 3), 2, ((0, 0), (0, 0)))
  s2 = r2 @ p["Conv_1"]["kernel"].reshape(-1, 4) + p["Conv_1"]["bias"] + eps["Conv_1"]
  h2 = jnp.tanh(s2).reshape(x.shape[0], -1)
  z = h2 @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"] + eps["Dense_0"]
  return z, {"Conv_0": r1, "Conv_1": r2, "Dense_0": h2}


def hand_stats(p, x, y, fisher, key):
  """Â = mean of [a, 1][a, 1]ᵀ over rows; Ŝ = (1/B) Σ_b Σ_t E[g gᵀ], g = ∂ℓ_b/∂s_{b,t}."""
  shapes = {"Conv_0": (B, 5, 5, 3), "Conv_1": (B, 2, 2, 4), "Dense_0": (B, CLASSES)}
  eps0 = {k: jnp.zeros(s) for k, s in shapes.items()}
  z, rows = hand_forward(p, x, eps0)
  a = {k: _aug(r).T @ _aug(r) / _aug(r).shape[0] for k, r in rows.items()}
  per_example = lambda zz, yy: optax.softmax_cross_entropy_with_integer_labels(zz, yy)
  if fisher in ("empirical", "sampled"):
    labels = y if fisher == "empirical" else jax.random.categorical(key, z, axis=-1)
    # Σ_b ℓ_b: the gradient w.r.t. eps_b is example b's own output gradient.
    g = jax.grad(lambda e: per_example(hand_forward(p, x, e)[0], labels).sum())(eps0)
    s = {k: v.reshape(-1, v.shape[-1]).T @ v.reshape(-1, v.shape[-1]) / B for k, v in g.items()}
  else:
    jac = jax.jacrev(lambda e: hand_forward(p, x, e)[0])(eps0)   # [B, C, B, ..., out]
    prob = jax.nn.softmax(z)
    s = {}
    for k, j in jac.items():
      tot = 0.0
      for b in range(B):
        jb = j[b, :, b].reshape(CLASSES, -1, j.shape[-1])           # [C, T, out]
        hb = jnp.diag(prob[b]) - jnp.outer(prob[b], prob[b])
        tot = tot + jnp.einsum("cto,cd,dtp->op", jb, hb, jb)
      s[k] = tot / B
  return a, s


@pytest.fixture(scope="module")
def setup():
  x = jax.random.normal(jax.random.key(0), (B, H, W, C_IN))
  y = jnp.array([0, 3, 1])
  lin = LinenNet()
  params = lin.init(jax.random.key(1), x)["params"]
  net = NnxNet(nnx.Rngs(2))
  net.c1.kernel.value = params["Conv_0"]["kernel"]
  net.c1.bias.value = params["Conv_0"]["bias"]
  net.c2.kernel.value = params["Conv_1"]["kernel"]
  net.c2.bias.value = params["Conv_1"]["bias"]
  net.head.kernel.value = params["Dense_0"]["kernel"]
  net.head.bias.value = params["Dense_0"]["bias"]
  return x, y, lin, params, net


NNX_NAMES = {"Conv_0": "c1", "Conv_1": "c2", "Dense_0": "head"}


@pytest.mark.parametrize("fisher", ["empirical", "sampled", "exact"])
def test_linen_and_nnx_match_hand_written(setup, fisher):
  x, y, lin, params, net = setup
  key = jax.random.key(7)
  a_ref, s_ref = hand_stats(params, x, y, fisher, key)
  loss_ref, g_ref = jax.value_and_grad(lambda p: ce(lin.apply({"params": p}, x), y))(params)

  cap_l = capture.linen_capture(lin, ce, likelihood="softmax", fisher=fisher)
  loss_l, g_l, st_l = jax.jit(functools.partial(cap_l, key=key))(params, x, y)
  cap_n = capture.nnx_capture(ce, likelihood="softmax", fisher=fisher)
  loss_n, g_n, st_n = nnx.jit(lambda m, xx, yy: cap_n(m, xx, yy, key=key))(net, x, y)

  np.testing.assert_allclose(loss_l, loss_ref, rtol=1e-6)
  np.testing.assert_allclose(loss_n, loss_ref, rtol=1e-6)
  for k in a_ref:
    for st in (st_l[k], st_n[NNX_NAMES[k]]):
      np.testing.assert_allclose(st.a, a_ref[k], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(st.s, s_ref[k], rtol=1e-4, atol=1e-8)
    for leaf in ("kernel", "bias"):
      np.testing.assert_allclose(g_l[k][leaf], g_ref[k][leaf], rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(g_n[NNX_NAMES[k]][leaf].value, g_ref[k][leaf], rtol=1e-5,
                                 atol=1e-7)


def test_layers_description(setup):
  x, y, lin, params, net = setup
  lay = capture.linen_capture(lin, ce, likelihood="softmax").layers(params, x)
  assert [l.name for l in lay] == ["Conv_0", "Conv_1", "Dense_0"]
  assert [l.kind for l in lay] == ["conv", "conv", "dense"]
  assert lay.layers[1].kernel_shape == (3, 3, 3, 4) and lay.layers[1].a_dim == 28
  assert lay.uncovered == ()
  lay_n = capture.nnx_capture(ce, likelihood="softmax").layers(net, x)
  assert [l.kernel for l in lay_n] == [("c1", "kernel"), ("c2", "kernel"), ("head", "kernel")]


class Partly(nn.Module):
  """A layer norm (not a Kronecker block), a dense layer applied twice (shared), one more."""

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(x)
    shared = nn.Dense(4)
    x = jnp.tanh(shared(jnp.tanh(shared(x))))
    return nn.Dense(3, use_bias=False)(x)


def test_shared_layer_is_one_expand_block_and_the_rest_is_listed():
  """A layer used twice: Â is the mean of its uses' input moments, Ŝ sums both uses."""
  x = jax.random.normal(jax.random.key(0), (6, 4))
  y = jnp.arange(6) % 3
  m = Partly()
  params = m.init(jax.random.key(1), x)["params"]
  cap = capture.linen_capture(m, ce, fisher="empirical")
  lay = cap.layers(params, x)
  assert [(l.name, l.kind) for l in lay] == [
      ("LayerNorm_0", "norm"), ("Dense_0", "dense"), ("Dense_1", "dense")]
  assert lay.layers[-1].bias is None and not lay.uncovered
  loss, grads, stats = jax.jit(cap)(params, x, y)
  ref = jax.grad(lambda p: ce(m.apply({"params": p}, x), y))(params)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), grads, ref)

  def hand(eps):   # the same network written out; eps[i] perturbs the shared layer's use i
    p = params
    h0 = nn.LayerNorm().apply({"params": p["LayerNorm_0"]}, x)
    d = lambda h: h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    h1 = jnp.tanh(d(h0) + eps[0])
    h2 = jnp.tanh(d(h1) + eps[1])
    return ce(h2 @ p["Dense_1"]["kernel"], y), (h0, h1)

  eps = [jnp.zeros((6, 4))] * 2
  g, (h0, h1) = jax.grad(hand, has_aux=True)(eps)
  rows = [_aug(h0), _aug(h1)]
  a_ref = sum(r.T @ r / 6 for r in rows) / 2
  s_ref = 6 * sum(gi.T @ gi for gi in g)
  np.testing.assert_allclose(stats["Dense_0"].a, a_ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(stats["Dense_0"].s, s_ref, rtol=1e-4, atol=1e-9)


class Small(nn.Module):
  out: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.out)(jnp.tanh(nn.Dense(3)(x)))


@pytest.mark.parametrize("likelihood", ["softmax", "bernoulli", "gaussian"])
def test_sampled_fisher_is_unbiased_for_exact(likelihood):
  """The mean of sampled-label Ŝ over many keys approaches the closed-form expectation."""
  x = jax.random.normal(jax.random.key(0), (4, 3))
  m = Small(4)
  params = m.init(jax.random.key(1), x)["params"]
  loss = lambda z, y: jnp.mean(z)  # the data loss does not enter the Fisher
  exact = capture.linen_capture(m, loss, likelihood=likelihood, fisher="exact")
  _, _, st_exact = jax.jit(exact)(params, x, None)
  sampled = capture.linen_capture(m, loss, likelihood=likelihood, fisher="sampled")
  keys = jax.random.split(jax.random.key(3), 4000)
  st = jax.jit(jax.vmap(lambda k: sampled(params, x, None, key=k)[2]))(keys)
  for name in st_exact:
    mc = st[name].s.mean(0)
    err = np.linalg.norm(mc - st_exact[name].s) / np.linalg.norm(st_exact[name].s)
    assert err < 0.06, (name, err)
    np.testing.assert_allclose(st[name].a[0], st_exact[name].a, rtol=1e-6)


def test_exact_bernoulli_and_gaussian_match_ggn_by_jacobian():
  """Ŝ of the last layer equals (1/B) Σ_b H_b (Jacobian = I there) for each likelihood."""
  x = jax.random.normal(jax.random.key(0), (4, 3))
  m = Small(4)
  params = m.init(jax.random.key(1), x)["params"]
  z = m.apply({"params": params}, x)
  for likelihood, hess in (("bernoulli", jax.vmap(lambda v: jnp.diag(jax.nn.sigmoid(v) * (
      1 - jax.nn.sigmoid(v))))(z)), ("gaussian", jnp.broadcast_to(jnp.eye(4), (4, 4, 4)))):
    cap = capture.linen_capture(m, lambda zz, yy: jnp.mean(zz), likelihood=likelihood,
                                fisher="exact")
    _, _, st = cap(params, x, None)
    np.testing.assert_allclose(st["Dense_0"].s, hess.mean(0), rtol=1e-5, atol=1e-7)


def test_capture_argument_errors():
  with pytest.raises(ValueError, match="likelihood"):
    capture.nnx_capture(ce, fisher="sampled")
  with pytest.raises(ValueError, match="fisher"):
    capture.nnx_capture(ce, likelihood="softmax", fisher="true")
  with pytest.raises(ValueError, match="likelihood"):
    capture.nnx_capture(ce, likelihood="poisson")
  m = Small(2)
  x = jnp.ones((2, 3))
  params = m.init(jax.random.key(0), x)["params"]
  with pytest.raises(ValueError, match="key"):
    capture.linen_capture(m, ce, likelihood="softmax")(params, x, jnp.zeros(2, jnp.int32))


def test_no_layers_helpers():
  assert capture.no_layers().layers == () and capture.no_stats() == {}


class _Cell(nn.Module):

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(nn.Dense(4)(x))


class _Cells(nn.Module):
  remat: bool

  @nn.compact
  def __call__(self, x):
    cell = nn.remat(_Cell) if self.remat else _Cell
    for i in range(2):
      x = cell(name=f"cell{i}")(x)
    return nn.Dense(3)(x)


class _NnxCell(nnx.Module):

  def __init__(self, rngs):
    self.l = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.l(x))


class _NnxCells(nnx.Module):

  def __init__(self, remat, rngs):
    self.remat = remat
    self.cells = nnx.List([_NnxCell(rngs) for _ in range(2)])
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    for c in self.cells:
      x = nnx.remat(lambda c, x: c(x))(c, x) if self.remat else c(x)
    return self.head(x)


def test_remat_around_covered_layers_changes_nothing():
  """nn.remat / nnx.remat around a layer: same layers, same statistics, no leaked tracer."""
  x = jax.random.normal(jax.random.key(0), (5, 4))
  y = jnp.arange(5) % 3
  key = jax.random.key(4)
  params = _Cells(False).init(jax.random.key(1), x)["params"]
  got = {}
  for remat in (False, True):
    cap = capture.linen_capture(_Cells(remat), ce, likelihood="softmax")
    assert [l.name for l in cap.layers(params, x)] == ["cell0/Dense_0", "cell1/Dense_0",
                                                       "Dense_0"]
    got[remat] = jax.jit(functools.partial(cap, key=key))(params, x, y)
    net = _NnxCells(remat, nnx.Rngs(0))
    cap_n = capture.nnx_capture(ce, likelihood="softmax")
    assert [l.name for l in cap_n.layers(net, x)] == ["cells/0/l", "cells/1/l", "head"]
    got["nnx", remat] = nnx.jit(lambda m, xx, yy: cap_n(m, xx, yy, key=key))(net, x, y)
  for a, b in ((got[False], got[True]), (got["nnx", False], got["nnx", True])):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-9), a, b)


@pytest.mark.parametrize("tokens", [1, 8])
def test_sequence_outputs_share_one_per_token_scale(tokens):
  """Output [B, T, k] with a Gaussian likelihood: every token is an example (M = B·T), so
  Ŝ of the output layer is exactly I for the exact Fisher, (1/M) Σ εεᵀ for the sampled one
  (ε the sampled noise) and for the empirical one at targets z + ε under the per-token mean
  loss, whatever T (no T or T² factor between them)."""
  x = jax.random.normal(jax.random.key(0), (3, tokens, 4))
  m = Small(2)
  params = m.init(jax.random.key(1), x)["params"]
  z = m.apply({"params": params}, x)
  eps = jax.random.normal(jax.random.key(2), z.shape)
  mean_sq = lambda zz, yy: 0.5 * jnp.sum((zz - yy) ** 2) / (zz.shape[0] * zz.shape[1])
  want = jnp.einsum("btk,btl->kl", eps, eps) / (3 * tokens)
  _, _, exact = capture.linen_capture(m, mean_sq, likelihood="gaussian", fisher="exact")(
      params, x, z)
  np.testing.assert_allclose(exact["Dense_0"].s, np.eye(2), rtol=1e-5, atol=1e-6)
  _, _, emp = capture.linen_capture(m, mean_sq, fisher="empirical")(params, x, z + eps)
  np.testing.assert_allclose(emp["Dense_0"].s, want, rtol=1e-5, atol=1e-6)
  key = jax.random.key(5)
  _, _, smp = capture.linen_capture(m, mean_sq, likelihood="gaussian")(params, x, z, key=key)
  noise = capture.likelihoods.sample("gaussian", key, z) - z
  np.testing.assert_allclose(smp["Dense_0"].s,
                             jnp.einsum("btk,btl->kl", noise, noise) / (3 * tokens),
                             rtol=1e-4, atol=1e-6)


class _Ensemble(nn.Module):
  """Three dense layers stacked by nn.vmap (one kernel [3, 3, 4]), then a shared head."""

  @nn.compact
  def __call__(self, x):
    stacked = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=None, out_axes=1, axis_size=3)
    h = stacked(4)(x)
    return nn.Dense(2)(jnp.tanh(h).reshape(x.shape[0], -1))


def test_linen_vmap_stacked_layers_get_one_factor_pair_each():
  """nn.vmap over layers: factors [3, d, d], member l's from its own inputs and gradients."""
  x = jax.random.normal(jax.random.key(0), (5, 3))
  y = jax.random.normal(jax.random.key(1), (5, 2))
  m = _Ensemble()
  params = m.init(jax.random.key(1), x)["params"]
  loss = lambda z, t: 0.5 * jnp.sum((z - t) ** 2) / z.shape[0]
  cap = capture.linen_capture(m, loss, fisher="empirical")
  layers = cap.layers(params, x)
  assert [(l.name, l.factor_shape(l.a_dim)) for l in layers] == [
      ("VmapDense_0", (3, 4, 4)), ("Dense_0", (13, 13))]
  _, _, st = jax.jit(cap)(params, x, y)
  k, b = params["VmapDense_0"]["kernel"], params["VmapDense_0"]["bias"]
  head = params["Dense_0"]

  def hand(eps):   # eps [5, 3, 4] perturbs each member's output
    h = jnp.einsum("bi,lio->blo", x, k) + b + eps
    return loss(jnp.tanh(h).reshape(5, -1) @ head["kernel"] + head["bias"], y)

  g = jax.grad(hand)(jnp.zeros((5, 3, 4)))
  rows = _aug(x)
  for member in range(3):
    np.testing.assert_allclose(st["VmapDense_0"].a[member], rows.T @ rows / 5, rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(st["VmapDense_0"].s[member], 5 * g[:, member].T @ g[:, member],
                               rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("padding", ["CIRCULAR", "REFLECT", "CAUSAL"])
def test_padded_convolutions_match_valid_convolution_of_padded_input(padding):
  """A conv with CIRCULAR / REFLECT / CAUSAL padding has the statistics of the VALID conv of
  the input padded the same way by hand (wrap, reflect, zeros on the left)."""
  one_d = padding == "CAUSAL"
  shape, kernel = ((3, 6, 2), (3,)) if one_d else ((3, 5, 5, 2), (3, 2))
  x = jax.random.normal(jax.random.key(0), shape)
  y = jnp.arange(3) % CLASSES

  class Net(nnx.Module):

    def __init__(self, pad, rngs):
      self.conv = nnx.Conv(2, 3, kernel, padding=pad, rngs=rngs)
      self.head = nnx.Linear(3 * math.prod(shape[1:-1]), CLASSES, rngs=rngs)

    def __call__(self, x):
      return self.head(jnp.tanh(self.conv(x)).reshape(x.shape[0], -1))

  if one_d:
    pads, mode = ((2, 0),), "constant"
  else:
    pads, mode = ((1, 1), (0, 1)), {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
  xp = jnp.pad(x, ((0, 0),) + pads + ((0, 0),), mode=mode)
  padded, valid = Net(padding, nnx.Rngs(0)), Net("VALID", nnx.Rngs(0))
  cap = capture.nnx_capture(ce, fisher="empirical")
  assert [l.name for l in cap.layers(padded, x)] == ["conv", "head"]
  _, _, got = cap(padded, x, y)
  _, _, want = cap(valid, xp, y)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), got, want)
