"""K-FAC statistics under a padding mask equal those of the same tokens without the padding.

References are computed another way: the padded batch with `mask=` against the real tokens
alone (trimmed, no mask), in float64 with the exact Fisher (no sampling).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from secondorder import capture
from tests import test_kfac_models as f64_models

V, D = 7, 4
F64 = dict(param_dtype=jnp.float64)
TOKENS = jnp.array([[1, 3, 1, 6, 0], [2, 2, 5, 4, 1]])
MASK = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)   # lengths 3 and 5


def _masked_ce(z, target):
  """Cross-entropy averaged over the real tokens (`target = (labels, mask)`)."""
  y, mask = target
  logp = jax.nn.log_softmax(z, axis=-1)
  per = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
  return jnp.sum(per * mask) / jnp.sum(mask)


def _close(got, want, rtol=1e-9):
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(np.abs(want).max(), 1e-30))


class NnxPerToken(nnx.Module):
  """Embedding → LayerNorm → dense → tied head, each token on its own."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs, **F64)
    self.ln = nnx.LayerNorm(D, rngs=rngs, **F64)
    self.mix = nnx.Linear(D, D, rngs=rngs, **F64)

  def __call__(self, tokens):
    return self.embed.attend(self.mix(self.ln(self.embed(tokens))))


class LinenPerToken(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(V, D, name="embed", **F64)
    h = nn.Dense(D, name="mix", **F64)(nn.LayerNorm(name="ln", **F64)(embed(tokens)))
    return embed.attend(h)


def _per_token_captures():
  """[(capture, model or params)] for NNX and linen with the same weights."""
  model = NnxPerToken(nnx.Rngs(0))
  model.ln.scale.value = 1.0 + 0.3 * jax.random.normal(jax.random.key(1), (D,), jnp.float64)
  model.ln.bias.value = 0.2 * jax.random.normal(jax.random.key(2), (D,), jnp.float64)
  params = {"embed": {"embedding": model.embed.embedding.value},
            "ln": {"scale": model.ln.scale.value, "bias": model.ln.bias.value},
            "mix": {"kernel": model.mix.kernel.value, "bias": model.mix.bias.value}}
  kw = dict(likelihood="softmax", fisher="exact", stats_dtype=jnp.float64)
  return [(capture.nnx_capture(_masked_ce, **kw), model),
          (capture.linen_capture(LinenPerToken(), _masked_ce, **kw), params)]


def _stats(cap, obj, tokens, mask, **kw):
  # The labels are the tokens themselves: a label per position, kept by trimming.
  call = lambda o, t, m: cap(o, t, (t, m), mask=None if mask is None else m, **kw)
  run = nnx.jit(call) if isinstance(obj, nnx.Module) else jax.jit(call)
  if mask is None:   # unmasked: every token is real
    return run(obj, tokens, jnp.ones(tokens.shape, bool))[2]
  return run(obj, tokens, mask)[2]


def _assert_stats_close(got, want, rtol=1e-9):
  assert set(got) == set(want)
  for name in got:
    for g, w in zip(got[name], want[name]):
      if w is None:
        assert g is None, name
      else:
        _close(g, w, rtol)


def test_padded_tokens_are_left_out_of_every_block():
  """Embedding (token frequencies and the tied head), LayerNorm and dense blocks of a
  per-token model: the padded batch with its mask gives the statistics of its real tokens
  alone, laid out as one unpadded sequence."""
  real = TOKENS[MASK][None]            # [1, M']
  with jax.enable_x64(True):
    for cap, obj in _per_token_captures():
      masked = _stats(cap, obj, TOKENS, MASK)
      trimmed = _stats(cap, obj, real, None)
      _assert_stats_close(masked, trimmed)
      # Without the mask the padded tokens count, and the frequencies differ.
      unmasked = _stats(cap, obj, TOKENS, jnp.ones(TOKENS.shape, bool))
      assert not np.allclose(unmasked["embed"].a, trimmed["embed"].a)


def test_sampled_fisher_ignores_what_the_padding_holds():
  """With fisher="sampled" and one key, changing the padded tokens changes nothing."""
  other = jnp.where(MASK, TOKENS, (TOKENS + 3) % V)
  key = jax.random.key(4)
  with jax.enable_x64(True):
    model = _per_token_captures()[0][1]
    cap = capture.nnx_capture(_masked_ce, likelihood="softmax", stats_dtype=jnp.float64)
    a = _stats(cap, model, TOKENS, MASK, key=key)
    b = _stats(cap, model, other, MASK, key=key)
    _assert_stats_close(a, b)
    c = _stats(cap, model, other, jnp.ones(TOKENS.shape, bool), key=key)
    assert not np.allclose(c["mix"].a, a["mix"].a)


def _combine(parts):
  """Statistics of several unpadded runs pooled over their tokens: each run's per-token
  averages weighted by its share M_i / M' of the real tokens."""
  total = sum(m for m, _ in parts)
  out = {}
  for name in parts[0][1]:
    fields = []
    for k, field in enumerate(parts[0][1][name]):
      fields.append(None if field is None else
                    sum(m / total * np.asarray(st[name][k]) for m, st in parts))
    out[name] = fields
  return out


@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_scanned_decoder_with_padding_equals_the_sequences_alone(api):
  """The scan-over-layers decoder (causal attention, LayerNorm, stacked layers; the
  empirical Fisher, whose Ŝ the mask reaches through the masked loss): every
  Kronecker and norm block of a right-padded batch with its mask equals the two sequences'
  own statistics, each run unpadded at its own length, pooled over the real tokens."""
  kw = dict(fisher="empirical", stats_dtype=jnp.float64)
  with jax.enable_x64(True):
    tokens, _ = f64_models._tokens()
    lengths = (tokens.shape[1] - 2, tokens.shape[1])
    mask = jnp.arange(tokens.shape[1])[None, :] < jnp.array(lengths)[:, None]
    if api == "nnx":
      obj = nnx.jit(lambda: f64_models.NnxDecoder(nnx.Rngs(0)))()
      cap = capture.nnx_capture(_masked_ce, **kw)
    else:
      module = f64_models.LinenDecoder()
      obj = jax.jit(module.init)(jax.random.key(1), tokens)["params"]
      cap = capture.linen_capture(module, _masked_ce, **kw)
    masked = _stats(cap, obj, tokens, mask)
    alone = [(n, _stats(cap, obj, tokens[i:i + 1, :n], None)) for i, n in enumerate(lengths)]
  # The tied embedding's combined factors are not linear in the token statistics; every
  # other block is, and is compared.
  linear = lambda st: {k: v for k, v in st.items() if "embed" not in k.lower()}
  pooled = _combine([(n, linear(st)) for n, st in alone])
  assert len(pooled) >= 6
  _assert_stats_close(linear(masked), pooled)


class Transposed(nnx.Module):
  """A dense layer applied to time-major inputs: its positions are [T, B]."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.lin = nnx.Linear(D, V, rngs=rngs)

  def __call__(self, tokens):
    return self.lin(self.embed(tokens).swapaxes(0, 1)).swapaxes(0, 1)


def test_mask_that_does_not_fit_is_an_error():
  cap = capture.nnx_capture(_masked_ce, likelihood="softmax", fisher="exact")
  model = NnxPerToken(nnx.Rngs(0))
  target = (TOKENS, MASK)
  with pytest.raises(ValueError, match=r"mask has shape \(2,\); expected .*\(2, 5\)"):
    cap(model, TOKENS, target, mask=MASK[:, 0])
  with pytest.raises(ValueError, match=r"layer lin: .*positions \(5, 2\).*\(2, 5\)"):
    cap(Transposed(nnx.Rngs(0)), TOKENS, target, mask=MASK)
