"""One table says what a layer is: the capture and the dimension numbers agree on subclasses
of covered layers; an override that skips the base call falls back, saying so."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import secondorder as so
from secondorder import capture
from secondorder.capture import registry

V, D, B, T = 7, 4, 2, 3
TOKENS = jnp.array([[0, 3, 3], [6, 1, 0]])


def _ce(z, y):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[..., None], -1))


class ScaledEmbed(nnx.Embed):
  """Gemma's pattern: the lookup scaled by √d; the tied head (`attend`) inherited."""

  def __call__(self, tokens):
    return super().__call__(tokens) * jnp.sqrt(jnp.asarray(self.features, jnp.float32))


class MyLinear(nnx.Linear):
  """A plain subclass (a new name, nothing overridden)."""


class RawLookup(nnx.Embed):
  """An override that reads the table itself and never calls `nnx.Embed.__call__`."""

  def __call__(self, tokens):
    return self.embedding[...][tokens]


class Tied(nnx.Module):

  def __init__(self, embed_cls, rngs, scale_outside=False):
    self.scale_outside = scale_outside
    self.embed = embed_cls(V, D, rngs=rngs)
    self.mix = MyLinear(D, D, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens)
    if self.scale_outside:
      h = h * jnp.sqrt(jnp.asarray(D, jnp.float32))
    return self.embed.attend(jnp.tanh(self.mix(h)))


def test_lookup_takes_the_most_specific_entry():
  """isinstance over the table, most specific class first."""
  assert registry.lookup(registry.NNX, ScaledEmbed(V, D, rngs=nnx.Rngs(0))).cls is nnx.Embed
  assert registry.lookup(registry.NNX, MyLinear(2, 2, rngs=nnx.Rngs(0))).cls is nnx.Linear
  assert registry.lookup(registry.NNX, nnx.Dropout(0.1)) is None
  lengths = [len(l.cls.__mro__) for l in registry.NNX]
  assert lengths == sorted(lengths, reverse=True)


def test_subclassed_layers_are_covered_with_the_base_layers_statistics():
  """A scaled-embedding subclass tied to the head and a plain Linear subclass are covered;
  their statistics are those of the base classes with the scaling written outside."""
  sub = Tied(ScaledEmbed, nnx.Rngs(0))
  base = Tied(nnx.Embed, nnx.Rngs(0), scale_outside=True)
  cap = capture.nnx_capture(_ce, fisher="empirical")
  layers = cap.layers(sub, TOKENS)
  assert [(l.name, l.kind) for l in layers] == [("embed", "tied"), ("mix", "dense")]
  assert not layers.uncovered
  y = jnp.array([[1, 2, 3], [4, 5, 6]])
  loss_s, _, st_s = nnx.jit(cap)(sub, TOKENS, y)
  loss_b, _, st_b = nnx.jit(cap)(base, TOKENS, y)
  np.testing.assert_allclose(loss_s, loss_b, rtol=1e-6)
  for name in ("embed", "mix"):
    for got, want in zip(st_s[name], st_b[name]):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  dims = so.dimension_numbers_from_nnx(sub)
  assert dims["embed"]["embedding"].get_value() == so.MuonDimensionNumbers(0, 1)
  assert dims["mix"]["kernel"].get_value() == so.MuonDimensionNumbers(0, 1)


def test_override_that_skips_the_base_call_falls_back_saying_why():
  """A lookup the block cannot see leaves the table (tied to the head, whose use is seen)
  on the fallback, with the subclass named; an untied one likewise."""
  cap = capture.nnx_capture(_ce, fisher="empirical")
  with pytest.warns(UserWarning, match="K-FAC covers"):
    layers = cap.layers(Tied(RawLookup, nnx.Rngs(0)), TOKENS)
  assert [l.name for l in layers] == ["mix"]
  assert "RawLookup, a subclass of nnx.Embed, overrides __call__ without calling" in dict(
      layers.reasons)["embed/embedding"]

  class NoAttend(nnx.Module):
    def __init__(self, rngs):
      self.embed = RawLookup(V, D, rngs=rngs)
      self.head = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, tokens):
      return self.head(self.embed(tokens))

  with pytest.warns(UserWarning, match="K-FAC covers"):
    layers = cap.layers(NoAttend(nnx.Rngs(0)), TOKENS)
  why = dict(layers.reasons)["embed/embedding"]
  assert "RawLookup, a subclass of nnx.Embed, overrides __call__ without calling" in why


class LinenScaledEmbed(nn.Embed):

  def __call__(self, tokens):
    return super().__call__(tokens) * jnp.sqrt(jnp.asarray(self.features, jnp.float32))


class LinenRawEmbed(nn.Embed):

  def __call__(self, tokens):
    return jnp.take(self.embedding, tokens, axis=0)


class LinenTied(nn.Module):
  embed_cls: type = nn.Embed
  scale_outside: bool = False
  tie: bool = True

  @nn.compact
  def __call__(self, tokens):
    embed = self.embed_cls(V, D, name="embed")
    h = embed(tokens)
    if self.scale_outside:
      h = h * jnp.sqrt(jnp.asarray(D, jnp.float32))
    h = jnp.tanh(nn.Dense(D, name="mix")(h))
    return embed.attend(h) if self.tie else nn.Dense(V, name="head")(h)


def test_linen_subclass_is_tapped_once_at_the_base_call():
  """linen routes both the override and its super() call through the interceptor: the
  block is the base call's, once (the statistics equal the base layer's)."""
  y = jnp.array([[1, 2, 3], [4, 5, 6]])
  sub, base = LinenTied(LinenScaledEmbed), LinenTied(nn.Embed, scale_outside=True)
  params = base.init(jax.random.key(0), TOKENS)["params"]
  cap_s = capture.linen_capture(sub, _ce, fisher="empirical")
  cap_b = capture.linen_capture(base, _ce, fisher="empirical")
  layers = cap_s.layers(params, TOKENS)
  assert [(l.name, l.kind) for l in layers] == [("embed", "tied"), ("mix", "dense")]
  _, _, st_s = jax.jit(cap_s)(params, TOKENS, y)
  _, _, st_b = jax.jit(cap_b)(params, TOKENS, y)
  for name in ("embed", "mix"):
    for got, want in zip(st_s[name], st_b[name]):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  dims = so.dimension_numbers_from_linen(sub, {"params": params}, TOKENS)
  assert dims["embed"]["embedding"] == so.MuonDimensionNumbers(0, 1)

  raw = LinenTied(LinenRawEmbed, tie=False)
  p_raw = raw.init(jax.random.key(0), TOKENS)["params"]
  with pytest.warns(UserWarning, match="K-FAC covers"):
    layers = capture.linen_capture(raw, _ce, fisher="empirical").layers(p_raw, TOKENS)
  assert ("LinenRawEmbed, a subclass of linen.Embed, overrides __call__ without calling"
          in dict(layers.reasons)["embed/embedding"])
