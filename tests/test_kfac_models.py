"""K-FAC on the layers of real models, each block against a dense reference in float64."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pytest
from flax import linen as nn
from flax import nnx

from secondorder import capture
from secondorder.transforms.kfac import scale_by_kfac_factors

B = 5


def _gauss(z, y):
  return 0.5 * jnp.sum((z - y) ** 2) / z.shape[0]


def _ggn_blocks(outputs, weights):
  """(1/B) Σ_b J_bᵀ J_b per weight matrix, J_b = ∂z_b/∂vec(W) (row-major): the exact GGN."""
  out = {}
  for name, w0 in weights.items():
    jac = jax.jacfwd(lambda w, name=name: outputs(name, w))(w0)       # [B, K, R, O]
    jac = jac.reshape(jac.shape[0], jac.shape[1], -1)
    out[name] = np.einsum("bki,bkj->ij", jac, jac) / jac.shape[0]
  return out


def _assert_kron(stats, ggn, rtol=1e-8):
  for name, ref in ggn.items():
    kron = np.kron(np.asarray(stats[name].a), np.asarray(stats[name].s))
    np.testing.assert_allclose(kron, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


# ----------------------------------------------------------------------------- multi-axis dense


class LinenGeneral(nn.Module):
  """[B, 2, 3] -> DenseGeneral over both axes into (2, 2) -> DenseGeneral over both into 3."""

  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((2, 2), axis=(-2, -1), param_dtype=jnp.float64)(x)
    return nn.DenseGeneral(3, axis=(-2, -1), param_dtype=jnp.float64)(h)


class NnxGeneral(nnx.Module):

  def __init__(self, rngs):
    self.first = nnx.LinearGeneral((2, 3), (2, 2), axis=(-2, -1), param_dtype=jnp.float64,
                                   rngs=rngs)
    self.second = nnx.LinearGeneral((2, 2), 3, axis=(-2, -1), param_dtype=jnp.float64,
                                    rngs=rngs)

  def __call__(self, x):
    return self.second(self.first(x))


def _with_bias_row(kernel, bias, rows):
  return jnp.concatenate([kernel.reshape(rows, -1), bias.reshape(1, -1)], axis=0)


def test_multi_axis_dense_blocks_equal_exact_ggn():
  """A deep linear net of multi-axis dense layers: Â ⊗ Ŝ is its exact GGN block (linen, NNX)."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (B, 2, 3), jnp.float64)
    y = jnp.zeros((B, 3), jnp.float64)
    lin = LinenGeneral()
    params = lin.init(jax.random.key(1), x)["params"]
    cap = capture.linen_capture(lin, _gauss, likelihood="gaussian", fisher="exact",
                                stats_dtype=jnp.float64)
    layers = cap.layers(params, x)
    assert [(l.name, l.kernel_shape, l.a_dim, l.s_dim) for l in layers] == [
        ("DenseGeneral_0", (2, 3, 2, 2), 7, 4), ("DenseGeneral_1", (2, 2, 3), 5, 3)]
    _, _, stats = jax.jit(cap)(params, x, y)
    rows = {"DenseGeneral_0": 6, "DenseGeneral_1": 4}
    weights = {n: _with_bias_row(params[n]["kernel"], params[n]["bias"], r)
               for n, r in rows.items()}

    def outputs(name, w):
      p = dict(params)
      shape = params[name]["kernel"].shape
      p[name] = {"kernel": w[:-1].reshape(shape), "bias": w[-1].reshape(params[name]["bias"].shape)}
      return lin.apply({"params": p}, x)

    ggn = _ggn_blocks(outputs, weights)
    _assert_kron(stats, ggn)

    net = NnxGeneral(nnx.Rngs(0))
    net.first.kernel.value = params["DenseGeneral_0"]["kernel"]
    net.first.bias.value = params["DenseGeneral_0"]["bias"]
    net.second.kernel.value = params["DenseGeneral_1"]["kernel"]
    net.second.bias.value = params["DenseGeneral_1"]["bias"]
    cap_n = capture.nnx_capture(_gauss, likelihood="gaussian", fisher="exact",
                                stats_dtype=jnp.float64)
    assert [l.name for l in cap_n.layers(net, x)] == ["first", "second"]
    _, _, st_n = nnx.jit(cap_n)(net, x, y)
    _assert_kron({"first": st_n["first"], "second": st_n["second"]},
                 {"first": ggn["DenseGeneral_0"], "second": ggn["DenseGeneral_1"]})


def test_multi_axis_update_is_the_matrix_update():
  """The transform preconditions a [2, 3, 2, 2] kernel as the 6 x 4 matrix it is (NumPy)."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (B, 2, 3), jnp.float64)
    lin = LinenGeneral()
    params = lin.init(jax.random.key(1), x)["params"]
    cap = capture.linen_capture(lin, _gauss, likelihood="gaussian", fisher="exact",
                                stats_dtype=jnp.float64)
    y = jax.random.normal(jax.random.key(2), (B, 3), jnp.float64)
    _, grads, stats = jax.jit(cap)(params, x, y)
    lam = 1e-2
    tx = scale_by_kfac_factors(layers=cap.layers(params, x), damping=lam, damping_mode="exact",
                               stats_dtype=jnp.float64)
    upd, _ = jax.jit(tx.update)(grads, tx.init(params), params, kfac_stats=stats)
    for name, rows in (("DenseGeneral_0", 6), ("DenseGeneral_1", 4)):
      g = np.asarray(_with_bias_row(grads[name]["kernel"], grads[name]["bias"], rows))
      alpha, qa = np.linalg.eigh(np.asarray(stats[name].a))
      sigma, qs = np.linalg.eigh(np.asarray(stats[name].s))
      alpha, sigma = np.maximum(alpha, 0), np.maximum(sigma, 0)
      ref = qa @ ((qa.T @ g @ qs) / (np.outer(alpha, sigma) + lam)) @ qs.T
      got = np.asarray(_with_bias_row(upd[name]["kernel"], upd[name]["bias"], rows))
      assert upd[name]["kernel"].shape == grads[name]["kernel"].shape
      np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


# ----------------------------------------------------------------------------- transformers
# A tiny decoder (vocabulary V, width D, L blocks of attention and MLP, T tokens) with a
# tied head (`attend`), in NNX (blocks built by nnx.vmap, run by nnx.scan) and linen
# (nn.scan), each beside the same model unrolled into separate blocks.

V, D, L, T, HEADS = 11, 8, 2, 4, 2
F64 = dict(param_dtype=jnp.float64)


def attention_f64(query, key, value, mask=None, **kwargs):
  """Attention whose softmax runs in the inputs' dtype. Flax's default (through
  `jax.nn.dot_product_attention`) takes the softmax in float32 even for float64 inputs,
  which would cap these float64 comparisons at float32's rounding."""
  del kwargs
  weights = nn.dot_product_attention_weights(query, key, mask=mask)
  return jnp.einsum("...hqk,...khd->...qhd", weights, value)


class NnxBlock(nnx.Module):

  def __init__(self, rngs):
    self.ln1 = nnx.LayerNorm(D, rngs=rngs, **F64)
    self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs,
                                       attention_fn=attention_f64, **F64)
    self.ln2 = nnx.RMSNorm(D, rngs=rngs, **F64)
    self.up = nnx.Linear(D, 2 * D, rngs=rngs, **F64)
    self.down = nnx.Linear(2 * D, D, rngs=rngs, **F64)

  def __call__(self, x):
    mask = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class NnxDecoder(nnx.Module):
  """Blocks stacked by nnx.vmap and run by nnx.scan (optionally under nnx.remat), or a list."""

  def __init__(self, rngs, *, scan=True, remat=False):
    self.scan, self.remat = scan, remat
    self.embed = nnx.Embed(V, D, rngs=rngs, **F64)
    if scan:
      @nnx.split_rngs(splits=L)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return NnxBlock(rngs)
      self.blocks = make(rngs)
    else:
      self.blocks = nnx.List([NnxBlock(rngs) for _ in range(L)])
    self.ln = nnx.LayerNorm(D, rngs=rngs, **F64)

  def __call__(self, tokens):
    x = self.embed(tokens)
    if self.scan:
      body = lambda x, blk: (blk(x), None)
      body = nnx.remat(body) if self.remat else body
      x, _ = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(x, self.blocks)
    else:
      for blk in self.blocks:
        x = blk(x)
    return self.embed.attend(self.ln(x))


class LinenBlock(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + nn.MultiHeadDotProductAttention(HEADS, attention_fn=attention_f64, **F64)(
        nn.LayerNorm(**F64)(x), mask=mask)
    h = nn.Dense(2 * D, **F64)(nn.RMSNorm(**F64)(x))
    return x + nn.Dense(D, **F64)(jax.nn.gelu(h)), None


class LinenDecoder(nn.Module):
  scan: bool = True
  remat: bool = False

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(V, D, **F64)
    x = embed(tokens)
    block = nn.remat(LinenBlock) if self.remat else LinenBlock
    if self.scan:
      x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=L)(name="blocks")(x, None)
    else:
      for i in range(L):
        x, _ = block(name=f"block{i}")(x, None)
    return embed.attend(nn.LayerNorm(**F64)(x))


def _ce(z, y):
  return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()


def _tokens():
  toks = np.random.default_rng(0).integers(0, V, (2, T + 1))
  return jnp.asarray(toks[:, :-1]), jnp.asarray(toks[:, 1:])


def _unstack(tree, i):
  return jax.tree.map(lambda a: np.asarray(a)[i], tree)


def _kfac_step(layers, params, grads, stats):
  """One K-FAC step on captured (grads, stats), equal-size factors decomposed together."""
  tx = scale_by_kfac_factors(layers=layers, damping=1e-2, damping_mode="exact",
                             update_interval=1, pad_ratio=1.0, stats_dtype=jnp.float64)
  return tx.update(grads, tx.init(params), params, kfac_stats=stats)[0]


def _stack_blocks(blocks):
  return jax.tree.map(lambda *xs: np.stack(xs), *blocks)


def _assert_trees_close(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13), got, want)


def _nnx_update(model, tokens, targets):
  cap = capture.nnx_capture(_ce, fisher="empirical", stats_dtype=jnp.float64)
  layers = cap.layers(model, tokens)

  @nnx.jit
  def step(m):
    _, grads, stats = cap(m, tokens, targets)
    return _kfac_step(layers, nnx.state(m, nnx.Param), grads, stats)

  return layers, step(model).to_pure_dict()


def test_nnx_scanned_layers_update_like_the_unrolled_model():
  """nnx.vmap-built blocks under nnx.scan (with and without nnx.remat): one factor pair per
  block, and the same K-FAC update as the model unrolled into separate blocks."""
  with jax.enable_x64(True):
    tokens, targets = _tokens()
    # Built under nnx.jit: one compiled program instead of one per initialiser op.
    unrolled = nnx.jit(lambda: NnxDecoder(nnx.Rngs(0), scan=False))()
    pure = nnx.state(nnx.jit(lambda: NnxDecoder(nnx.Rngs(0)))(), nnx.Param).to_pure_dict()
    state_u = nnx.state(unrolled, nnx.Param)
    nnx.replace_by_pure_dict(state_u, dict(pure, blocks={i: _unstack(pure["blocks"], i)
                                                         for i in range(L)}))
    nnx.update(unrolled, state_u)
    _, want = _nnx_update(unrolled, tokens, targets)
    want = dict(want, blocks=_stack_blocks([want["blocks"][i] for i in range(L)]))
    for remat in (False, True):
      scanned = nnx.jit(lambda: NnxDecoder(nnx.Rngs(0), remat=remat))()
      layers, got = _nnx_update(scanned, tokens, targets)
      assert {l.name: l.factor_shape(l.s_dim) for l in layers if l.kind == "dense"} == {
          "blocks/attn/query": (L, D, D), "blocks/attn/key": (L, D, D),
          "blocks/attn/value": (L, D, D), "blocks/attn/out": (L, D, D),
          "blocks/up": (L, 2 * D, 2 * D), "blocks/down": (L, D, D)}
      _assert_trees_close(got, want)


def _linen_update(model, params, tokens, targets):
  cap = capture.linen_capture(model, _ce, fisher="empirical", stats_dtype=jnp.float64)
  layers = cap.layers(params, tokens)

  @jax.jit
  def step(p):
    _, grads, stats = cap(p, tokens, targets)
    return _kfac_step(layers, p, grads, stats)

  return layers, step(params)


def test_linen_scanned_layers_update_like_the_unrolled_model():
  """nn.scan over blocks (with and without nn.remat): one factor pair per block, and the
  same K-FAC update as the model unrolled into separate blocks."""
  with jax.enable_x64(True):
    tokens, targets = _tokens()
    params = jax.jit(LinenDecoder().init)(jax.random.key(1), tokens)["params"]
    unrolled = {k: v for k, v in params.items() if k != "blocks"}
    unrolled.update({f"block{i}": _unstack(params["blocks"], i) for i in range(L)})
    _, want = _linen_update(LinenDecoder(scan=False), unrolled, tokens, targets)
    want = dict({k: v for k, v in want.items() if not k.startswith("block")},
                blocks=_stack_blocks([want[f"block{i}"] for i in range(L)]))
    for remat in (False, True):
      layers, got = _linen_update(LinenDecoder(remat=remat), params, tokens, targets)
      dense = [l for l in layers if l.kind == "dense"]
      assert len(dense) == 6 and all(l.factor_shape(1) == (L, 1, 1) for l in dense)
      _assert_trees_close(got, want)


def test_coverage_summary_lists_every_parameter():
  """The summary lists every parameter of the transformer, each in the block that covers it
  (the embedding and the norms included, so nothing warns); the warning and strict=True for an
  uncovered kernel are tested in test_kfac_blocks.py."""
  with jax.enable_x64(True), warnings.catch_warnings():
    warnings.simplefilter("error")
    model = nnx.eval_shape(lambda: NnxDecoder(nnx.Rngs(0)))
    tokens, _ = _tokens()
    layers = capture.nnx_capture(_ce, likelihood="softmax").layers(model, tokens)
  text = str(layers)
  paths = ["/".join(capture.param_path(p)) for p, _ in
           jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]]
  assert len(paths) == 18 and all(f" {p} " in text for p in paths)
  for line in text.splitlines()[1:]:
    assert line.split()[0] in ("kronecker", "diagonal"), line
  covered = sum(np.prod(s) for p, s in layers.shapes if p not in layers.uncovered)
  total = sum(np.prod(s) for _, s in layers.shapes)
  assert layers.covered_fraction == pytest.approx(covered / total)
  assert f"{100 * covered / total:.1f}%" in text.splitlines()[0]
  assert layers.covered_fraction == 1.0 and not layers.uncovered
  assert layers.fallback_kernels() == ()
