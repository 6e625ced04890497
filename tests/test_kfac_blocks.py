"""K-FAC's embedding, tied-head and norm blocks against dense references (float64), and the
fallback at K-FAC's learning rate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

from secondorder import capture
from secondorder.transforms.kfac import kfac, scale_by_kfac_factors

V, D, K, B, T = 6, 3, 2, 2, 5
F64 = dict(param_dtype=jnp.float64)
# Repeated tokens (0 three times, 4 twice, ...) and one token (5) never used.
TOKENS = jnp.array([[0, 1, 0, 4, 2], [4, 3, 0, 1, 1]])


def _gauss(z, y):
  """½‖z − y‖² per token, averaged over the B·T tokens (M = B·T examples)."""
  return 0.5 * jnp.sum((z - y) ** 2) / (z.size // z.shape[-1])


def _ggn(outputs, w):
  """(1/M) Σ_m J_mᵀ J_m, J_m = ∂z_m/∂vec(w) for every token m: the exact GGN block."""
  jac = jax.jacfwd(outputs)(w)
  z_ndim = jac.ndim - w.ndim
  jac = jac.reshape(-1, jac.shape[z_ndim - 1], w.size)      # [M, K, |w|]
  return np.einsum("mki,mkj->ij", jac, jac) / jac.shape[0]


def _close(got, want, rtol=1e-8):
  np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=rtol * np.abs(want).max())


# ----------------------------------------------------------------------------- embeddings


class NnxEmbed(nnx.Module):

  def __init__(self, rngs, tied=False):
    self.tied = tied
    self.embed = nnx.Embed(V, D, rngs=rngs, **F64)
    self.mix = nnx.Linear(D, D if tied else K, use_bias=False, rngs=rngs, **F64)

  def __call__(self, tokens):
    h = self.mix(self.embed(tokens))
    return self.embed.attend(h) if self.tied else h


class LinenEmbed(nn.Module):
  tied: bool = False

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(V, D, name="embed", **F64)
    h = nn.Dense(D if self.tied else K, use_bias=False, name="mix", **F64)(embed(tokens))
    return embed.attend(h) if self.tied else h


def _both(tied):
  """(NNX model, linen module, linen params) with the same weights; (NNX captured stats,
  linen captured stats) of the exact Fisher (= GGN) of the Gaussian likelihood."""
  model = NnxEmbed(nnx.Rngs(0), tied)
  model.embed.embedding.value = jax.random.normal(jax.random.key(3), (V, D), jnp.float64)
  lin = LinenEmbed(tied)
  params = {"embed": {"embedding": model.embed.embedding.value},
            "mix": {"kernel": model.mix.kernel.value}}
  y = jnp.zeros(TOKENS.shape + ((V,) if tied else (K,)), jnp.float64)
  cap_n = capture.nnx_capture(_gauss, likelihood="gaussian", fisher="exact",
                              stats_dtype=jnp.float64)
  cap_l = capture.linen_capture(lin, _gauss, likelihood="gaussian", fisher="exact",
                                stats_dtype=jnp.float64)
  kind = "tied" if tied else "embed"
  for layers in (cap_n.layers(model, TOKENS), cap_l.layers(params, TOKENS)):
    assert [l.kind for l in layers] == [kind, "dense"] and not layers.uncovered
  st_n = nnx.jit(cap_n)(model, TOKENS, y)[2]
  st_l = jax.jit(cap_l)(params, TOKENS, y)[2]
  return model, lin, params, st_n, st_l


def test_embedding_block_is_the_exact_ggn_with_repeated_tokens():
  """Embed → linear: diag(token frequencies) ⊗ S is the embedding's exact GGN block; A is
  stored as a vector (NNX and linen alike)."""
  with jax.enable_x64(True):
    model, lin, params, st_n, st_l = _both(tied=False)
    out = lambda e: lin.apply({"params": dict(params, embed={"embedding": e})}, TOKENS)
    ggn = _ggn(out, params["embed"]["embedding"])
    counts = np.bincount(np.asarray(TOKENS).ravel(), minlength=V) / TOKENS.size
    for st in (st_n["embed"], st_l["embed"]):
      assert st.a.shape == (V,)
      _close(st.a, counts)
      _close(np.kron(np.diag(np.asarray(st.a)), np.asarray(st.s)), ggn)


def _partial_traces(k):
  """(vocabulary-side, feature-side) partial traces of a [V·D, V·D] block."""
  k4 = k.reshape(V, D, V, D)
  return np.einsum("adbd->ab", k4), np.einsum("vavb->ab", k4)


def test_tied_embedding_head_is_kfac_expand_of_the_exact_use_blocks():
  """A tied embedding/head: each use alone (the untied copies) has an exact Kronecker GGN
  block; the captured pair is their K-FAC-expand combination (NumPy transcription)."""
  with jax.enable_x64(True):
    model, lin, params, st_n, st_l = _both(tied=True)
    e0 = params["embed"]["embedding"]

    def untied(e_lookup, e_head):
      h = jnp.take(e_lookup, TOKENS, axis=0) @ params["mix"]["kernel"]
      return h @ e_head.T

    blocks = [_ggn(lambda e: untied(e, e0), e0), _ggn(lambda e: untied(e0, e), e0)]
    left, right = 0.0, 0.0
    for k in blocks:
      lv, rd = _partial_traces(k)
      # Each use's block is exactly one Kronecker pair ...
      _close(np.kron(lv, rd) / np.trace(k), k)
      # ... put on the common scale (vocabulary side of mean eigenvalue 1).
      left = left + V * lv / np.trace(k) / len(blocks)
      right = right + rd / V
    for st in (st_n["embed"], st_l["embed"]):
      assert st.a.shape == (V, V) and st.s.shape == (D, D)
      _close(st.a, left)
      _close(st.s, right)


def test_embedding_updates_are_the_numpy_preconditioner():
  """The transform applies a diagonal A as a vector: exact and factored damping against
  the dense NumPy formulas (float64)."""
  with jax.enable_x64(True):
    model = NnxEmbed(nnx.Rngs(0))
    cap = capture.nnx_capture(_gauss, likelihood="gaussian", fisher="exact",
                              stats_dtype=jnp.float64)
    layers = cap.layers(model, TOKENS)
    y = jax.random.normal(jax.random.key(1), TOKENS.shape + (K,), jnp.float64)
    _, grads, stats = nnx.jit(cap)(model, TOKENS, y)
    params = nnx.state(model, nnx.Param)
    g = np.asarray(grads["embed"]["embedding"].value)
    a, s = np.asarray(stats["embed"].a), np.asarray(stats["embed"].s)
    lam = 1e-2
    sigma, qs = np.linalg.eigh(s)
    want = {"exact": ((g @ qs) / (np.outer(a, np.maximum(sigma, 0)) + lam)) @ qs.T}
    pi = np.sqrt(a.mean() / (np.trace(s) / D))
    want["factored"] = (g / (a + pi * np.sqrt(lam))[:, None]) @ np.linalg.inv(
        s + np.sqrt(lam) / pi * np.eye(D))
    for mode, ref in want.items():
      tx = scale_by_kfac_factors(layers=layers, damping=lam, damping_mode=mode,
                                 stats_dtype=jnp.float64)
      upd, _ = jax.jit(tx.update)(grads, tx.init(params), params, kfac_stats=stats)
      _close(upd["embed"]["embedding"].value, ref, rtol=1e-9)


# ----------------------------------------------------------------------------- norms


class NnxNorms(nnx.Module):

  def __init__(self, rngs):
    self.ln = nnx.LayerNorm(D, rngs=rngs, **F64)
    self.rms = nnx.RMSNorm(D, rngs=rngs, **F64)
    self.out = nnx.Linear(D, K, rngs=rngs, **F64)

  def __call__(self, x):
    return self.out(self.rms(jnp.tanh(self.ln(x))))


class LinenNorms(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.RMSNorm(name="rms", **F64)(jnp.tanh(nn.LayerNorm(name="ln", **F64)(x)))
    return nn.Dense(K, name="out", **F64)(h)


def test_norm_blocks_are_the_exact_per_feature_fisher():
  """LayerNorm (scale and shift: 2×2 per feature) and RMSNorm (scale: 1×1) blocks equal the
  per-feature diagonal blocks of the exact GGN over their parameters (NNX and linen)."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (B, T, D), jnp.float64)
    y = jnp.zeros((B, T, K), jnp.float64)
    model = NnxNorms(nnx.Rngs(0))
    model.ln.scale.value = 1 + 0.3 * jax.random.normal(jax.random.key(1), (D,), jnp.float64)
    model.ln.bias.value = 0.2 * jax.random.normal(jax.random.key(2), (D,), jnp.float64)
    model.rms.scale.value = 1 + 0.3 * jax.random.normal(jax.random.key(3), (D,), jnp.float64)
    pure = nnx.state(model, nnx.Param).to_pure_dict()
    lin = LinenNorms()
    cap_n = capture.nnx_capture(_gauss, likelihood="gaussian", fisher="exact",
                                stats_dtype=jnp.float64)
    cap_l = capture.linen_capture(lin, _gauss, likelihood="gaussian", fisher="exact",
                                  stats_dtype=jnp.float64)
    for layers in (cap_n.layers(model, x), cap_l.layers(pure, x)):
      assert [(l.name, l.kind, l.a_dim) for l in layers] == [
          ("ln", "norm", 2), ("rms", "norm", 1), ("out", "dense", D + 1)]
    stats = [nnx.jit(cap_n)(model, x, y)[2], jax.jit(cap_l)(pure, x, y)[2]]

    def out(theta):
      p = dict(pure, ln={"scale": theta[0], "bias": theta[1]}, rms={"scale": theta[2]})
      return lin.apply({"params": p}, x)

    theta0 = jnp.stack([pure["ln"]["scale"], pure["ln"]["bias"], pure["rms"]["scale"]])
    ggn = _ggn(out, theta0).reshape(3, D, 3, D)
    ln_ref = np.stack([ggn[:2, j][:, :2, j] for j in range(D)])      # [D, 2, 2]
    rms_ref = np.stack([ggn[2:, j][:, 2:, j] for j in range(D)])     # [D, 1, 1]
    for st in stats:
      assert st["ln"].s is None
      _close(st["ln"].a, ln_ref)
      _close(st["rms"].a, rms_ref)


class NnxGroupNorm(nnx.Module):

  def __init__(self, rngs):
    self.gn = nnx.GroupNorm(4, num_groups=2, rngs=rngs, **F64)
    self.out = nnx.Linear(4, K, rngs=rngs, **F64)

  def __call__(self, x):
    return self.out(jnp.tanh(self.gn(x)))


class LinenGroupNorm(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(K, name="out", **F64)(jnp.tanh(nn.GroupNorm(2, name="gn", **F64)(x)))


def test_group_norm_block_is_the_exact_per_feature_fisher():
  """GroupNorm (2 groups of 2 channels, statistics over the image and the group) gets the
  exact 2×2 block per channel, like LayerNorm (NNX and linen): each equals the per-channel
  diagonal block of the exact GGN over its scale and shift."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (B, 3, 3, 4), jnp.float64)
    y = jnp.zeros((B, 3, 3, K), jnp.float64)
    model = NnxGroupNorm(nnx.Rngs(0))
    model.gn.scale.value = 1 + 0.3 * jax.random.normal(jax.random.key(1), (4,), jnp.float64)
    model.gn.bias.value = 0.2 * jax.random.normal(jax.random.key(2), (4,), jnp.float64)
    pure = nnx.state(model, nnx.Param).to_pure_dict()
    lin = LinenGroupNorm()
    kw = dict(likelihood="gaussian", fisher="exact", stats_dtype=jnp.float64)
    cap_n, cap_l = capture.nnx_capture(_gauss, **kw), capture.linen_capture(lin, _gauss, **kw)
    for layers in (cap_n.layers(model, x), cap_l.layers(pure, x)):
      assert [(l.name, l.kind, l.a_dim) for l in layers] == [
          ("gn", "norm", 2), ("out", "dense", 5)] and not layers.uncovered
    stats = [nnx.jit(cap_n)(model, x, y)[2], jax.jit(cap_l)(pure, x, y)[2]]

    def out(theta):
      return lin.apply({"params": dict(pure, gn={"scale": theta[0], "bias": theta[1]})}, x)

    theta0 = jnp.stack([pure["gn"]["scale"], pure["gn"]["bias"]])
    ggn = _ggn(out, theta0).reshape(2, 4, 2, 4)
    want = np.stack([ggn[:, j][:, :, j] for j in range(4)])            # [4, 2, 2]
    for st in stats:
      _close(st["gn"].a, want)


class GroupNormCNN(nnx.Module):
  """conv 3x3 (8) -> GroupNorm (4 groups) -> relu -> conv 3x3 stride 2 (8) -> GroupNorm ->
  relu -> mean over the image -> dense (4 classes)."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.gn1 = nnx.GroupNorm(8, num_groups=4, rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), strides=2, rngs=rngs)
    self.gn2 = nnx.GroupNorm(8, num_groups=4, rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.gn1(self.conv1(x)))
    x = jax.nn.relu(self.gn2(self.conv2(x)))
    return self.head(x.mean(axis=(1, 2)))


def test_group_norm_cnn_trains_fully_covered():
  """A CNN whose convolutions are followed by GroupNorm is covered whole (two conv, two norm
  and one dense block) and K-FAC trains it in a plain loop: the loss falls below a third of
  its start in 15 steps and never rises more than 5% above it."""
  model = GroupNormCNN(nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(0), (32, 8, 8, 1))
  labels = jnp.argmax(images[:, ::4, ::4, 0].reshape(32, 4), axis=-1)   # learnable
  cap = capture.nnx_capture(_ce, likelihood="softmax")
  layers = cap.layers(model, images)
  assert sorted((l.name, l.kind) for l in layers) == [
      ("conv1", "conv"), ("conv2", "conv"), ("gn1", "norm"), ("gn2", "norm"),
      ("head", "dense")]
  assert not layers.uncovered
  tx = kfac(0.3, layers=layers, update_interval=5)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    loss, grads, stats = cap(nnx.merge(graphdef, params, rest), images, labels, key=key)
    updates, state = tx.update(grads, state, params, kfac_stats=stats)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for i in range(15):
    params, state, loss = step(params, state, jax.random.key(i))
    losses.append(float(loss))
  losses = np.array(losses)
  assert np.all(np.isfinite(losses)) and losses.max() <= losses[0] * 1.05
  assert losses[-1] < losses[0] / 3, losses


def test_norm_update_solves_each_feature_block():
  """The transform's norm update is (F_j + λI)⁻¹ g_j per feature (NumPy solve)."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (B, T, D), jnp.float64)
    y = jax.random.normal(jax.random.key(1), (B, T, K), jnp.float64)
    model = NnxNorms(nnx.Rngs(0))
    cap = capture.nnx_capture(_gauss, likelihood="gaussian", fisher="exact",
                              stats_dtype=jnp.float64)
    layers = cap.layers(model, x)
    _, grads, stats = nnx.jit(cap)(model, x, y)
    params = nnx.state(model, nnx.Param)
    lam = 1e-3
    tx = scale_by_kfac_factors(layers=layers, damping=lam, stats_dtype=jnp.float64)
    upd, _ = jax.jit(tx.update)(grads, tx.init(params), params, kfac_stats=stats)
    g = np.stack([np.asarray(grads["ln"]["scale"].value), np.asarray(grads["ln"]["bias"].value)])
    f = np.asarray(stats["ln"].a) + lam * np.eye(2)
    want = np.stack([np.linalg.solve(f[j], g[:, j]) for j in range(D)], axis=1)
    _close(np.stack([upd["ln"]["scale"].value, upd["ln"]["bias"].value]), want, rtol=1e-9)
    g_rms = np.asarray(grads["rms"]["scale"].value)
    _close(upd["rms"]["scale"].value, g_rms / (np.asarray(stats["rms"].a)[:, 0, 0] + lam),
           rtol=1e-9)


# ----------------------------------------------------------------------------- the fallback


class TiedDecoder(nnx.Module):
  """Embed, causal attention, LayerNorm and MLP blocks in a Python loop, a tied head."""

  def __init__(self, rngs, vocab=16, dim=8, layers=1):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.blocks = nnx.List([
        nnx.Dict(ln1=nnx.LayerNorm(dim, rngs=rngs), ln2=nnx.LayerNorm(dim, rngs=rngs),
                 attn=nnx.MultiHeadAttention(2, dim, decode=False, rngs=rngs),
                 up=nnx.Linear(dim, 2 * dim, rngs=rngs), down=nnx.Linear(2 * dim, dim, rngs=rngs))
        for _ in range(layers)])
    self.ln = nnx.LayerNorm(dim, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    mask = nnx.make_causal_mask(tokens)
    for b in self.blocks:
      x = x + b["attn"](b["ln1"](x), mask=mask)
      x = x + b["down"](jax.nn.gelu(b["up"](b["ln2"](x))))
    return self.embed.attend(self.ln(x))


def _tied_trainer(layers_of):
  """`run(fallback_scale, steps) -> losses` of K-FAC at learning rate 0.3 on a next-token
  task; one compiled step for every fallback_scale (an injected hyperparameter)."""
  model = nnx.jit(lambda: TiedDecoder(nnx.Rngs(0)))()
  cap = capture.nnx_capture(_ce, likelihood="softmax")
  tokens = (jnp.arange(8)[None, :] * 3 + jnp.arange(4)[:, None] * 5) % 16
  x, y = tokens[:, :-1], tokens[:, 1:]
  layers = layers_of(cap.layers(model, x))
  names = {l.name for l in layers}
  tx = optax.inject_hyperparams(kfac)(learning_rate=0.3, layers=layers, fallback_scale=0.01)
  graphdef, params0, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def step(params, state, key):
    loss, grads, stats = cap(nnx.merge(graphdef, params, rest), x, y, key=key)
    stats = {k: v for k, v in stats.items() if k in names}
    updates, state = tx.update(grads, state, params, kfac_stats=stats)
    return optax.apply_updates(params, updates), state, loss

  def run(fallback_scale, steps):
    params, state = params0, tx.init(params0)
    state.hyperparams["fallback_scale"] = jnp.asarray(fallback_scale, jnp.float32)
    losses = []
    for i in range(steps):
      params, state, loss = step(params, state, jax.random.key(i))
      losses.append(float(loss))
    return np.array(losses)

  return layers, run


def _ce(z, y):
  return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()


def test_tied_head_transformer_trains_at_kfac_learning_rate():
  """The tied-head transformer at lr 0.3 trains without diverging, fully covered and with
  embeddings and norms left to the fallback (the previous coverage)."""
  layers, full = _tied_trainer(lambda l: l)
  assert {l.kind for l in layers} == {"tied", "norm", "dense"} and not layers.uncovered
  previous_layers, previous = _tied_trainer(lambda l: l.only("dense"))
  assert "embed/embedding" in previous_layers.uncovered
  for losses in (full(0.01, 10), previous(0.01, 10)):
    assert np.all(np.isfinite(losses)) and losses.max() < 1.1 * losses[0]
    assert losses[-1] < 0.5 * losses[0]


def test_fallback_has_its_own_step_size():
  """kfac moves uncovered parameters by fallback_scale · η times the RMS-scaled gradient
  (0.01 by default when some layer is covered, 1 when none is)."""
  model = NnxEmbed(nnx.Rngs(0))
  cap = capture.nnx_capture(_gauss, likelihood="gaussian", fisher="exact")
  layers = cap.layers(model, TOKENS).only("dense")
  assert layers.uncovered == ("embed/embedding",)
  y = jax.random.normal(jax.random.key(1), TOKENS.shape + (K,))
  _, grads, stats = nnx.jit(cap)(model, TOKENS, y)
  params = nnx.state(model, nnx.Param)
  g = grads["embed"]["embedding"].value
  rms = optax.scale_by_rms(decay=0.999, eps=1e-8, eps_in_sqrt=False, bias_correction=True)
  r, _ = rms.update(g, rms.init(g))
  for tx, scale, st in (
      (kfac(0.3, layers=layers, kl_clip=None), 0.01, {"mix": stats["mix"]}),
      (kfac(0.3, layers=capture.no_layers(), kl_clip=None), 1.0, {})):
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params, kfac_stats=st)
    np.testing.assert_allclose(u["embed"]["embedding"].value, -0.3 * scale * r, rtol=1e-5)
  with pytest.raises(ValueError, match="fallback_scale"):
    kfac(0.3, layers=layers, fallback_scale=-1.0)


# ----------------------------------------------------------------------------- the benchmark LM


def test_language_model_coverage_lists_every_parameter():
  """benchmarks/lm.py's scan-over-layers model (tiny): every parameter is listed, all in
  Kronecker or exact-diagonal blocks (embedding tied to the head, position table, stacked
  norms and kernels); the previous coverage (dense kernels only) leaves the rest listed."""
  from benchmarks import lm

  config = lm.SIZES["tiny"]
  model = nnx.eval_shape(lambda: lm.DecoderLM(config, rngs=nnx.Rngs(0)))
  layers = capture.nnx_capture(_ce, likelihood="softmax", strict=True).layers(
      model, jnp.zeros((2, config.context), jnp.int32))
  text = str(layers)
  paths = ["/".join(capture.param_path(p)) for p, _ in
           jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]]
  assert len(paths) == 11 and all(f" {p} " in text for p in paths)
  assert layers.covered_fraction >= 0.95 and not layers.uncovered
  kinds = {"/".join(l.kernel): l.kind for l in layers}
  assert kinds["embed/embedding"] == "tied" and kinds["pos/embedding"] == "embed"
  assert kinds["blocks/norm1/scale"] == "norm" and kinds["blocks/fc1/kernel"] == "dense"
  previous = layers.only("dense")
  assert set(previous.uncovered) == {"embed/embedding", "pos/embedding", "blocks/norm1/scale",
                                     "blocks/norm2/scale", "norm/scale"}
  assert previous.covered_fraction < layers.covered_fraction
  assert all(f"fallback   {p} " in str(previous) for p in previous.uncovered)


class RawKernel(nnx.Module):
  """A covered embedding and norm, and a hand-applied matrix no layer kind covers."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.ln = nnx.LayerNorm(D, rngs=rngs)
    self.w = nnx.Param(jnp.zeros((D, K)))

  def __call__(self, tokens):
    return self.ln(self.embed(tokens)) @ self.w


def test_uncovered_kernel_warns_and_strict_raises():
  """Only the hand-applied matrix falls back: a warning names it, strict=True raises."""
  model = nnx.eval_shape(lambda: RawKernel(nnx.Rngs(0)))
  with pytest.warns(UserWarning, match=r"fall back.*: w \(not inside a covered layer"):
    layers = capture.nnx_capture(_gauss, likelihood="gaussian").layers(model, TOKENS)
  assert layers.uncovered == ("w",) and layers.fallback_kernels() == ("w",)
  assert [l.kind for l in layers] == ["embed", "norm"]
  with pytest.raises(ValueError, match=r": w \(not inside.*strict=True"):
    capture.nnx_capture(_gauss, likelihood="gaussian", strict=True).layers(model, TOKENS)
