"""K-FAC's Einsum blocks (nnx.Einsum, nn.Einsum) against the dense GGN in float64; a scanned
Einsum stack against its unrolled copy; equations the block cannot express fall back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import secondorder as so
from secondorder import capture
from secondorder.dimension_numbers import MuonDimensionNumbers as Dn
from secondorder.transforms.kfac import scale_by_kfac_factors

B, T, D, N, K, H, L = 2, 3, 4, 2, 1, 3, 2
F64 = dict(param_dtype=jnp.float64)
# Multi-head projections as Gemma writes them: q/k/v stacked on a leading axis, a
# grouped-query key/value pair (K < N heads), the output projection over (heads, head_dim).
QKV, KV, OUT = "BTD,SNDH->SBTNH", "BSD,CDKH->CBSKH", "BTNH,NHD->BTD"


def _gauss(z, y):
  """½‖z − y‖² per token, averaged over the B·T tokens."""
  return 0.5 * jnp.sum((z - y) ** 2) / (z.size // z.shape[-1])


class NnxLinearAttention(nnx.Module):
  """Einsum projections in a network linear in every kernel (so that the output gradients
  are the same at every token and Â ⊗ Ŝ is the exact GGN block)."""

  def __init__(self, rngs):
    self.qkv = nnx.Einsum(QKV, (3, N, D, H), rngs=rngs, **F64)
    self.kv = nnx.Einsum(KV, (2, D, K, H), rngs=rngs, **F64)
    self.out = nnx.Einsum(OUT, (N, H, D), (D,), rngs=rngs, **F64)

  def __call__(self, x):
    q, k, v = self.qkv(x)
    kk, vv = self.kv(x)
    return self.out(q + 2 * k - v + kk - 0.5 * vv)     # kk, vv broadcast over the N heads


class LinenLinearAttention(nn.Module):

  @nn.compact
  def __call__(self, x):
    q, k, v = nn.Einsum((3, N, D, H), QKV, use_bias=False, name="qkv", **F64)(x)
    kk, vv = nn.Einsum((2, D, K, H), KV, use_bias=False, name="kv", **F64)(x)
    return nn.Einsum((N, H, D), OUT, name="out", **F64)(q + 2 * k - v + kk - 0.5 * vv)


def _exact_ggn(layer, outputs, kernel, bias):
  """(1/M) Σ_tokens J_mᵀ J_m with J_m = ∂z_m/∂(the kernel matrix, bias as last row)."""
  ax = layer.axes

  def from_matrix(w):
    k = ax.from_matrices(w[None, :ax.matrix_shape[1]])
    return (k, None) if bias is None else (k, w[-1].reshape(bias.shape))

  w0 = ax.to_matrices(kernel)[0]
  if bias is not None:
    w0 = jnp.concatenate([w0, bias.reshape(1, -1)], axis=0)
  jac = jax.jacfwd(lambda w: outputs(*from_matrix(w)))(w0)      # [B, T, out, R(+1), O]
  jac = jac.reshape(-1, jac.shape[2], w0.size)
  return np.einsum("mki,mkj->ij", jac, jac) / jac.shape[0]


def _close(got, want, rtol=1e-8):
  np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_einsum_blocks_are_the_exact_ggn():
  """q/k/v stacked on a leading kernel axis, grouped-query k/v and the output projection:
  each layer's Â ⊗ Ŝ is its exact GGN block (NNX and linen, same weights)."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (B, T, D), jnp.float64)
    y = jnp.zeros((B, T, D), jnp.float64)
    model = NnxLinearAttention(nnx.Rngs(0))
    lin = LinenLinearAttention()
    params = {"qkv": {"kernel": model.qkv.kernel[...]}, "kv": {"kernel": model.kv.kernel[...]},
              "out": {"kernel": model.out.kernel[...], "bias": model.out.bias[...] + 0.3}}
    model.out.bias[...] = params["out"]["bias"]
    kw = dict(likelihood="gaussian", fisher="exact", stats_dtype=jnp.float64)
    cap_n = capture.nnx_capture(_gauss, **kw)
    cap_l = capture.linen_capture(lin, _gauss, **kw)
    want_dims = {"qkv": (D, 3 * N * H, Dn((2,), (0, 1, 3))),
                 "kv": (D, 2 * K * H, Dn((1,), (0, 2, 3))),
                 "out": (N * H + 1, D, Dn((0, 1), (2,)))}
    for layers, stats in ((cap_n.layers(model, x), nnx.jit(cap_n)(model, x, y)[2]),
                          (cap_l.layers(params, x), jax.jit(cap_l)(params, x, y)[2])):
      assert not layers.uncovered
      assert {l.name: (l.a_dim, l.s_dim, l.dimension_numbers) for l in layers} == want_dims
      assert {l.kind for l in layers} == {"einsum"}
      for l in layers:
        p = params[l.name]

        def outputs(kernel, bias, name=l.name):
          q = dict(params, **{name: dict(params[name], kernel=kernel)})
          if bias is not None:
            q[name] = dict(q[name], bias=bias)
          return lin.apply({"params": q}, x)

        ggn = _exact_ggn(l, outputs, p["kernel"], p.get("bias"))
        _close(np.kron(stats[l.name].a, stats[l.name].s), ggn)


def _axes(d):
  """Dimension numbers as (reduction, output) tuples (an int and a 1-tuple read alike)."""
  return tuple(tuple(np.atleast_1d(a)) for a in (d.reduction_axis, d.output_axis))


def test_einsum_dimension_numbers_match_the_capture():
  """dimension_numbers_from_nnx / _from_linen read an Einsum kernel as the capture does."""
  with jax.enable_x64(True):
    x = jnp.ones((B, T, D), jnp.float64)
    model = NnxLinearAttention(nnx.Rngs(0))
    layers = capture.nnx_capture(_gauss, fisher="empirical").layers(model, x)
    dims = so.dimension_numbers_from_nnx(model)
    for l in layers:
      assert _axes(dims[l.name]["kernel"].get_value()) == _axes(l.dimension_numbers)
    lin = LinenLinearAttention()
    variables = lin.init(jax.random.key(0), x)
    dims_l = so.dimension_numbers_from_linen(lin, variables, x)
    assert {k: _axes(v["kernel"]) for k, v in dims_l.items()} == {
        l.name: _axes(l.dimension_numbers) for l in layers}
    assert dims_l["out"]["bias"] is None


class Unexpressible(nnx.Module):

  def __init__(self, rngs):
    self.batched = nnx.Einsum("BTNH,NHD->BTND", (N, H, D), rngs=rngs)   # N kept: a batch axis
    self.summed = nnx.Einsum("BTD,DE->BE", (D, D), rngs=rngs)           # T summed away

  def __call__(self, x):
    return self.summed(self.batched(x).sum(2))


def test_unexpressible_equations_fall_back_with_the_equation():
  x = jnp.ones((B, T, N, H))
  cap = capture.nnx_capture(_gauss, fisher="empirical")
  with pytest.warns(UserWarning, match="K-FAC covers"):
    layers = cap.layers(Unexpressible(nnx.Rngs(0)), x)
  assert not layers.layers
  why = dict(layers.reasons)
  assert "'BTNH,NHD->BTND' keeps kernel axis 'N' in both" in why["batched/kernel"]
  assert "'BTD,DE->BE' sums input axis 'T' without the kernel" in why["summed/kernel"]


# ----------------------------------------------------------------------------- scanned stack


class Block(nnx.Module):

  def __init__(self, rngs):
    self.q = nnx.Einsum("BTD,DNH->BTNH", (D, N, H), (N, H), rngs=rngs, **F64)
    self.o = nnx.Einsum(OUT, (N, H, D), rngs=rngs, **F64)

  def __call__(self, x):
    return x + self.o(jnp.tanh(self.q(x)))


class Stack(nnx.Module):
  """Blocks stacked by nnx.vmap and run by nnx.scan, or the same blocks in a list."""

  def __init__(self, rngs, scan=True):
    self.scan = scan
    if scan:
      @nnx.split_rngs(splits=L)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return Block(rngs)
      self.blocks = make(rngs)
    else:
      self.blocks = nnx.List([Block(rngs) for _ in range(L)])

  def __call__(self, x):
    if self.scan:
      body = lambda h, blk: (blk(h), None)
      return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(x, self.blocks)[0]
    for blk in self.blocks:
      x = blk(x)
    return x


def _update(model, x, y):
  cap = capture.nnx_capture(_gauss, fisher="empirical", stats_dtype=jnp.float64)
  layers = cap.layers(model, x)
  tx = scale_by_kfac_factors(layers=layers, damping=1e-2, damping_mode="exact",
                             update_interval=1, pad_ratio=1.0, stats_dtype=jnp.float64)

  @nnx.jit
  def step(m):
    _, grads, stats = cap(m, x, y)
    params = nnx.state(m, nnx.Param)
    return tx.update(grads, tx.init(params), params, kfac_stats=stats)[0]

  return layers, step(model).to_pure_dict()


def test_scanned_einsum_stack_updates_like_the_unrolled_copy():
  """Einsum blocks built with nnx.vmap and run with nnx.scan: one factor pair per block and
  the same K-FAC update as the same blocks unrolled."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (B, T, D), jnp.float64)
    y = jax.random.normal(jax.random.key(1), (B, T, D), jnp.float64)
    scanned = Stack(nnx.Rngs(0))
    unrolled = Stack(nnx.Rngs(0), scan=False)
    pure = nnx.state(scanned, nnx.Param).to_pure_dict()
    state_u = nnx.state(unrolled, nnx.Param)
    nnx.replace_by_pure_dict(state_u, {"blocks": {
        i: jax.tree.map(lambda a, i=i: a[i], pure["blocks"]) for i in range(L)}})
    nnx.update(unrolled, state_u)
    layers, got = _update(scanned, x, y)
    assert {l.name: (l.factor_shape(l.a_dim), l.factor_shape(l.s_dim)) for l in layers} == {
        "blocks/q": ((L, D + 1, D + 1), (L, N * H, N * H)),
        "blocks/o": ((L, N * H, N * H), (L, D, D))}
    _, want = _update(unrolled, x, y)
    want = {"blocks": jax.tree.map(lambda *a: np.stack(a), *[want["blocks"][i]
                                                             for i in range(L)])}
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13),
                 got, want)


class Shared(nnx.Module):
  """One projection applied twice (weight sharing), as an Einsum or as a LinearGeneral."""

  def __init__(self, rngs, einsum):
    self.einsum = einsum
    if einsum:
      self.proj = nnx.Einsum("BTD,DNH->BTNH", (D, N, H), (N, H), rngs=rngs, **F64)
    else:
      self.proj = nnx.LinearGeneral(D, (N, H), rngs=rngs, **F64)
    self.back = nnx.LinearGeneral((N, H), D, axis=(-2, -1), rngs=rngs, **F64)

  def __call__(self, x):
    return self.proj(jnp.tanh(self.back(self.proj(x))))


def test_einsum_used_twice_is_the_dense_expand_block():
  """K-FAC-expand as for dense layers: an Einsum used twice has the statistics of the
  LinearGeneral with the same kernel used twice."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (B, T, D), jnp.float64)
    y = jnp.zeros((B, T, N, H), jnp.float64)
    ein, lin = Shared(nnx.Rngs(0), True), Shared(nnx.Rngs(1), False)
    lin.proj.kernel[...] = ein.proj.kernel[...]
    lin.proj.bias[...] = ein.proj.bias[...] + 0.1
    ein.proj.bias[...] = lin.proj.bias[...]
    lin.back.kernel[...] = ein.back.kernel[...]
    cap = capture.nnx_capture(_gauss, likelihood="gaussian", fisher="exact",
                              stats_dtype=jnp.float64)
    assert [l.kind for l in cap.layers(ein, x)] == ["einsum", "dense"]
    got, want = nnx.jit(cap)(ein, x, y)[2], nnx.jit(cap)(lin, x, y)[2]
    for name in ("proj", "back"):
      for a, b in zip(got[name], want[name]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
