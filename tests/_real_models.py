"""Small Flax models the tests share: what the methods meet in practice, at toy sizes.

- A decoder-only transformer whose blocks are stacked along a leading layer axis (created
  with `nnx.vmap` and run with `nnx.scan`; linen `nn.scan`), with token embeddings, causal
  multi-head attention, LayerNorm and a head tied to the embedding.
- A CNN with BatchNorm and Dropout in training mode, plus `cnn_reference`, the same forward
  written with `jax.lax` and an explicit dropout mask.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

VOCAB, WIDTH, HEADS, LAYERS, SEQ = 11, 8, 2, 3, 5
CHANNELS, CLASSES, IMAGE = 4, 3, (5, 5, 3)
DROPOUT, BN_EPS, BN_MOMENTUM = 0.25, 1e-5, 0.9


# --- Scan-over-layers decoder ------------------------------------------------------------

class NnxBlock(nnx.Module):
  """Pre-norm block: causal self-attention and a two-layer MLP."""

  def __init__(self, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, WIDTH, qkv_features=WIDTH, decode=False,
                                       rngs=rngs)
    self.ln2 = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.up = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
    self.down = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x), mask=nnx.make_causal_mask(x[..., 0]))
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class NnxDecoder(nnx.Module):
  """Embedding, LAYERS blocks stored as one stack, final LayerNorm, tied head."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return NnxBlock(rngs)

    self.blocks = make(rngs)
    self.ln = nnx.LayerNorm(WIDTH, rngs=rngs)

  def __call__(self, tokens):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    x = run(self.embed(tokens), self.blocks)
    return self.embed.attend(self.ln(x))


class LinenBlock(nn.Module):
  """The linen twin of `NnxBlock`, in `nn.scan`'s (carry, x) -> (carry, y) form."""

  @nn.compact
  def __call__(self, x, _):
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(HEADS, qkv_features=WIDTH)(
        y, mask=nn.make_causal_mask(x[..., 0]))
    y = nn.Dense(WIDTH)(nn.gelu(nn.Dense(2 * WIDTH)(nn.LayerNorm()(x))))
    return x + y, None


class LinenDecoder(nn.Module):
  """The linen twin of `NnxDecoder`: the blocks are one `nn.scan` over LAYERS."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, WIDTH)
    blocks = nn.scan(LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=LAYERS)
    x, _ = blocks(name="blocks")(embed(tokens), None)
    return embed.attend(nn.LayerNorm()(x))


def tokens(seed: int = 0):
  return jax.random.randint(jax.random.key(seed), (2, SEQ), 0, VOCAB)


# --- CNN with BatchNorm and Dropout ------------------------------------------------------

class NnxCNN(nnx.Module):
  """conv 3x3 -> BatchNorm -> relu -> Dropout -> global mean -> dense."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(IMAGE[-1], CHANNELS, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(CHANNELS, momentum=BN_MOMENTUM, epsilon=BN_EPS, rngs=rngs)
    self.drop = nnx.Dropout(DROPOUT, rngs=rngs)
    self.head = nnx.Linear(CHANNELS, CLASSES, rngs=rngs)

  def __call__(self, x):
    h = self.drop(nnx.relu(self.bn(self.conv(x))))
    return self.head(h.mean(axis=(1, 2)))


class LinenCNN(nn.Module):
  """The linen twin of `NnxCNN` (training mode)."""

  def setup(self):
    self.conv = nn.Conv(CHANNELS, (3, 3))
    self.bn = nn.BatchNorm(use_running_average=False, momentum=BN_MOMENTUM, epsilon=BN_EPS)
    self.drop = nn.Dropout(DROPOUT, deterministic=False)
    self.head = nn.Dense(CLASSES)

  def __call__(self, x):
    h = self.drop(nn.relu(self.bn(self.conv(x))))
    return self.head(h.mean(axis=(1, 2)))

  def dropout(self, h):
    return self.drop(h)


def cnn_reference(p: dict, x: jax.Array, scaled_mask: jax.Array) -> jax.Array:
  """The CNN's training-mode logits from plain params {conv, bn, head} and a dropout mask
  already divided by the keep rate; BatchNorm normalises with the batch's statistics."""
  h = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = h + p["conv"]["bias"]
  mean = h.mean(axis=(0, 1, 2))
  var = ((h - mean) ** 2).mean(axis=(0, 1, 2))
  h = (h - mean) / jnp.sqrt(var + BN_EPS) * p["bn"]["scale"] + p["bn"]["bias"]
  h = jnp.maximum(h, 0) * scaled_mask
  return h.mean(axis=(1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]


def images(seed: int, batch: int = 4):
  kx, ky = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(kx, (batch, *IMAGE)),
          jax.random.randint(ky, (batch,), 0, CLASSES))
