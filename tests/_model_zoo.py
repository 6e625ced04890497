"""Real-model shapes written the way model zoos write them, tiny: a Gemma-like NNX decoder, a
linen ResNet with BatchNorm, a linen ViT with nn.scan over nn.remat blocks.

- `Gemma`: a subclassed scaled embedding (`ScaledEmbed(nnx.Embed)`) tied to the head,
  attention projections as `nnx.Einsum` (query `BTD,NDH->BTNH`, a grouped-query key/value
  pair `BSD,CKDH->CBSKH` with K < N heads, output `BTNH,NHD->BTD`), RMS norms on the
  queries and keys (qk-norm), rotary positions, a gated MLP whose gate and up projections
  are one `nnx.Einsum` with a leading axis of 2; called as `model(tokens, positions, cache,
  attention_mask)` and returning `(logits, cache)`.
- `ResNet`: the ImageNet ResNet's shape (stem convolution, BatchNorm, residual blocks with a
  projection shortcut) in training mode.
- `ViT`: patch embedding by convolution, a free `self.param` position table `[1, N, D]`,
  `nn.scan` over `nn.remat` encoder blocks, a class head; returns `(logits, extras)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

VOCAB, WIDTH, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, LAYERS, SEQ, BATCH = 32, 16, 4, 2, 4, 32, 2, 8, 4
CLASSES, IMAGE = 5, (8, 8, 3)


# --- Gemma-like decoder (NNX) ----------------------------------------------------------


class ScaledEmbed(nnx.Embed):
  """The lookup scaled by √d (Gemma's embedder); the tied head `attend` is inherited."""

  def __call__(self, tokens):
    x = super().__call__(tokens)
    return x * jnp.sqrt(jnp.asarray(self.features, x.dtype))


def rope(x, positions, base: float = 10_000.0):
  """Rotary position embedding of `x` `[B, T, heads, H]` at `positions` `[B, T]`."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half) / half)
  angle = positions[..., None, None] * freq                       # [B, T, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  a, b = x[..., :half], x[..., half:]
  return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


class Attention(nnx.Module):

  def __init__(self, rngs):
    self.q_einsum = nnx.Einsum("BTD,NDH->BTNH", (HEADS, WIDTH, HEAD_DIM), rngs=rngs)
    self.kv_einsum = nnx.Einsum("BSD,CKDH->CBSKH", (2, KV_HEADS, WIDTH, HEAD_DIM), rngs=rngs)
    self.attn_vec_einsum = nnx.Einsum("BTNH,NHD->BTD", (HEADS, HEAD_DIM, WIDTH), rngs=rngs)
    self.q_norm = nnx.RMSNorm(HEAD_DIM, rngs=rngs)
    self.k_norm = nnx.RMSNorm(HEAD_DIM, rngs=rngs)

  def __call__(self, x, positions, cache, attention_mask):
    q = rope(self.q_norm(self.q_einsum(x)), positions)
    k, v = self.kv_einsum(x)
    k = rope(self.k_norm(k), positions)
    k = jnp.repeat(k, HEADS // KV_HEADS, axis=2)
    v = jnp.repeat(v, HEADS // KV_HEADS, axis=2)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / jnp.sqrt(HEAD_DIM)
    logits = jnp.where(attention_mask[:, None], logits, -1e9)
    enc = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits, axis=-1), v)
    return self.attn_vec_einsum(enc), cache


class FeedForward(nnx.Module):

  def __init__(self, rngs):
    self.gating_einsum = nnx.Einsum("BTD,GDF->GBTF", (2, WIDTH, HIDDEN), rngs=rngs)
    self.linear = nnx.Linear(HIDDEN, WIDTH, use_bias=False, rngs=rngs)

  def __call__(self, x):
    gate, up = self.gating_einsum(x)
    return self.linear(jax.nn.gelu(gate) * up)


class Block(nnx.Module):

  def __init__(self, rngs):
    self.pre_attention_norm = nnx.RMSNorm(WIDTH, rngs=rngs)
    self.attn = Attention(rngs)
    self.pre_ffw_norm = nnx.RMSNorm(WIDTH, rngs=rngs)
    self.mlp = FeedForward(rngs)

  def __call__(self, x, positions, cache, attention_mask):
    h, cache = self.attn(self.pre_attention_norm(x), positions, cache, attention_mask)
    x = x + h
    return x + self.mlp(self.pre_ffw_norm(x)), cache


class Gemma(nnx.Module):
  """`model(tokens, positions, cache, attention_mask) -> (logits, cache)`."""

  def __init__(self, rngs):
    self.embedder = ScaledEmbed(VOCAB, WIDTH, rngs=rngs)
    self.layers = nnx.List([Block(rngs) for _ in range(LAYERS)])
    self.final_norm = nnx.RMSNorm(WIDTH, rngs=rngs)

  def __call__(self, tokens, positions, cache, attention_mask):
    x = self.embedder(tokens)
    for layer in self.layers:
      x, cache = layer(x, positions, cache, attention_mask)
    return self.embedder.attend(self.final_norm(x)), cache


def gemma_batch(seed: int = 0):
  """`(tokens, positions, causal mask, next-token targets)` of a learnable sequence task:
  each sequence counts up by a step of its own, modulo the vocabulary."""
  key = jax.random.key(seed)
  start, step = jax.random.randint(key, (2, BATCH, 1), 1, VOCAB)
  seq = (start + step * jnp.arange(SEQ + 1)) % VOCAB
  positions = jnp.broadcast_to(jnp.arange(SEQ), (BATCH, SEQ))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((SEQ, SEQ), bool)), (BATCH, SEQ, SEQ))
  return seq[:, :-1], positions, mask, seq[:, 1:]


# --- ResNet with BatchNorm (linen) -------------------------------------------------------


class ResNetBlock(nn.Module):
  filters: int
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    norm = lambda: nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    y = nn.relu(norm()(nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)))
    y = norm()(nn.Conv(self.filters, (3, 3), use_bias=False)(y))
    if x.shape != y.shape:
      x = norm()(nn.Conv(self.filters, (1, 1), self.strides, use_bias=False,
                         name="conv_proj")(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Stem convolution and BatchNorm, stages of residual blocks (each stage after the first
  halving the resolution and doubling the filters), mean pool, dense. The defaults are
  tiny; `stage_sizes=(2, 2, 2, 2), num_filters=64, stem=(7, 7)` is ResNet-18's shape."""
  stage_sizes: tuple[int, ...] = (1, 1)
  num_filters: int = 8
  stem: tuple[int, int] = (3, 3)
  classes: int = CLASSES

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.num_filters, self.stem, use_bias=False, name="conv_init")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=False, momentum=0.9, name="bn_init")(x))
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        x = ResNetBlock(self.num_filters * 2 ** i, strides=(2, 2) if i and not j else (1, 1))(x)
    return nn.Dense(self.classes)(x.mean(axis=(1, 2)))


def image_batch(seed: int = 0, batch: int = 8):
  """Images whose class is the quadrant holding a bright spot (learnable by a CNN)."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  y = jax.random.randint(k1, (batch,), 0, CLASSES)
  x = 0.3 * jax.random.normal(k2, (batch, *IMAGE))
  rows, cols = jnp.arange(IMAGE[0])[:, None], jnp.arange(IMAGE[1])[None, :]
  centre = jnp.stack([1 + y % 3 * 2, 1 + y // 3 * 4], -1)
  spot = jnp.exp(-((rows - centre[:, 0, None, None]) ** 2
                   + (cols - centre[:, 1, None, None]) ** 2))
  return x + spot[..., None], y


# --- ViT (linen): nn.scan over nn.remat blocks, a free position table --------------------


class EncoderBlock(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    y = nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x))
    x = x + y
    y = nn.Dense(WIDTH)(nn.gelu(nn.Dense(2 * WIDTH)(nn.LayerNorm()(x))))
    return x + y, None


class ViT(nn.Module):
  """`model(images) -> (logits, {"pre_logits": ...})`, big_vision's shape."""
  patch: int = 4

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(WIDTH, (self.patch, self.patch), strides=self.patch, padding="VALID",
                name="embedding")(images)
    x = x.reshape(x.shape[0], -1, WIDTH)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:])
    blocks = nn.scan(nn.remat(EncoderBlock), variable_axes={"params": 0},
                     split_rngs={"params": True}, length=LAYERS)
    x, _ = blocks(name="encoder")(x + pos, None)
    pre_logits = nn.LayerNorm(name="encoder_norm")(x).mean(axis=1)
    return nn.Dense(CLASSES, name="head")(pre_logits), {"pre_logits": pre_logits}
