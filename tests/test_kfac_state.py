"""K-FAC's capture on models with state and randomness, and on every kind of convolution.

- The BatchNorm + Dropout CNN of `tests/_real_models.py` in training mode (NNX and linen):
  the capture's one training forward leaves the batch statistics (and NNX's RNG counter)
  exactly where a plain `optax.adam` step on the same batch and key leaves them; its
  factors equal those of the same forward written out by hand (explicit patches, the
  batch's statistics, the model's own dropout mask, labels sampled with the same key); a
  few jitted K-FAC steps train.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import secondorder as so
from secondorder import capture
from tests import _real_models as rm

STEPS = 6
# The tests' programs run in milliseconds: compile them at XLA's lowest CPU level.
_LOW = {"xla_backend_optimization_level": 0}


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _numeric(tree):
  """The leaves of a model state as float arrays (NNX's RNG keys as their key data)."""
  return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                     else x, np.float64) for x in jax.tree.leaves(tree)]


# --- The CNN written out by hand --------------------------------------------------------

def _patches(x):
  """3x3 SAME im2col by explicit slicing: `[B·H·W, 9·C]`, ordered (di, dj, c)."""
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = [xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)]
  return jnp.concatenate(cols, axis=-1).reshape(-1, 9 * x.shape[-1])


def _aug(rows):
  return jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)


def _hand_stats(p, x, scaled_mask, key):
  """Â and Ŝ of the conv and the head, from the forward written with explicit patches, the
  batch's statistics and a given dropout mask, at labels sampled from its logits with `key`.

  Ŝ = B Σ_rows ĝ ĝᵀ with ĝ the gradient of the mean loss with respect to the layer's
  output (perturbed by `eps`), Â the mean of [a, 1][a, 1]ᵀ over the layer's input rows.
  """
  b = x.shape[0]
  rows = _patches(x)

  def forward(eps):
    h = rows @ p["conv"]["kernel"].reshape(-1, rm.CHANNELS) + p["conv"]["bias"] + eps["conv"]
    mean = h.mean(0)
    var = ((h - mean) ** 2).mean(0)
    h = (h - mean) / jnp.sqrt(var + rm.BN_EPS) * p["bn"]["scale"] + p["bn"]["bias"]
    h = jnp.maximum(h, 0).reshape(b, *rm.IMAGE[:2], rm.CHANNELS) * scaled_mask
    pooled = h.mean(axis=(1, 2))
    return pooled @ p["head"]["kernel"] + p["head"]["bias"] + eps["head"], pooled

  eps = {"conv": jnp.zeros((rows.shape[0], rm.CHANNELS)), "head": jnp.zeros((b, rm.CLASSES))}
  logits, pooled = forward(eps)
  labels = jax.random.categorical(key, logits, axis=-1)
  g = jax.grad(lambda e: _ce(forward(e)[0], labels))(eps)
  a = {"conv": _aug(rows), "head": _aug(pooled)}
  return {k: capture.LayerStats(a=a[k].T @ a[k] / a[k].shape[0], s=b * g[k].T @ g[k])
          for k in a}


class _Nnx:
  """The NNX CNN: a K-FAC step through `nnx_capture` and a plain adam step, side by side."""

  def __init__(self):
    x, _ = rm.images(0)
    self.cap = capture.nnx_capture(_ce, likelihood="softmax")
    # Built under nnx.jit: one compiled program instead of one per initialiser op.
    self.model = nnx.jit(lambda: rm.NnxCNN(nnx.Rngs(0)))()
    tx = so.kfac(0.1, layers=self.cap.layers(self.model, x))
    self.optimizer = nnx.jit(lambda m: nnx.Optimizer(m, tx, wrt=nnx.Param))(self.model)

    def step(model, optimizer, x, y, key):
      graphdef, params, state = nnx.split(model, nnx.Param, ...)
      want_state = self._adam_step_state(graphdef, params, state, x, y)
      mask = nnx.merge(graphdef, params, state, copy=True).drop(
          jnp.ones((x.shape[0], *rm.IMAGE[:2], rm.CHANNELS)))
      want = _hand_stats(params.to_pure_dict(), x, mask, key)
      loss, grads, stats = self.cap(model, x, y, key=key)
      optimizer.update(model, grads, kfac_stats=stats)
      return loss, stats, want, nnx.state(model, nnx.Not(nnx.Param)), want_state

    @functools.partial(jax.jit, compiler_options=_LOW)
    def pure_step(graph_state, x, y, key):
      model, optimizer = nnx.merge(*graph_state)
      out = step(model, optimizer, x, y, key)
      return nnx.split((model, optimizer))[1], out

    self._graphdef = nnx.split((self.model, self.optimizer))[0]
    self._step = pure_step

  @staticmethod
  def _adam_step_state(graphdef, params, state, x, y):
    """A plain training step in NNX's idiom: nnx.grad on the model, nnx.Optimizer."""
    model = nnx.merge(graphdef, params, state, copy=True)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    optimizer.update(model, nnx.grad(lambda m: _ce(m(x), y))(model))
    return nnx.split(model, nnx.Param, ...)[2]

  def step(self, x, y, key):
    state, out = self._step((self._graphdef, nnx.state((self.model, self.optimizer))), x, y,
                            key)
    nnx.update((self.model, self.optimizer), state)
    return out

  def eval_loss(self, x, y):
    ones = jnp.ones((x.shape[0], *rm.IMAGE[:2], rm.CHANNELS))
    return _ce(rm.cnn_reference(nnx.state(self.model, nnx.Param).to_pure_dict(), x, ones), y)


class _Linen:
  """The linen CNN: a K-FAC step through `linen_capture(state=, rngs=)` and a plain adam
  step (apply with mutable batch_stats), side by side."""

  def __init__(self):
    x, _ = rm.images(0)
    net = rm.LinenCNN()
    variables = jax.jit(net.init)({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                                  x)
    self.params, self.state = variables["params"], {"batch_stats": variables["batch_stats"]}
    cap = capture.linen_capture(net, _ce, likelihood="softmax")
    tx = so.kfac(0.1, layers=cap.layers(self.params, x, state=self.state,
                                        rngs={"dropout": jax.random.key(2)}))
    self.opt_state = jax.jit(tx.init)(self.params)

    @functools.partial(jax.jit, compiler_options=_LOW)
    def step(params, opt_state, state, x, y, key):
      dropout_key, label_key = jax.random.split(key)
      rngs = {"dropout": dropout_key}

      def adam_loss(p):
        logits, new = net.apply({"params": p, **state}, x, rngs=rngs, mutable=["batch_stats"])
        return _ce(logits, y), new

      _, want_state = jax.grad(adam_loss, has_aux=True)(params)
      ones = jnp.ones((x.shape[0], *rm.IMAGE[:2], rm.CHANNELS))
      mask = net.apply({"params": params, **state}, ones, rngs=rngs,
                       method=rm.LinenCNN.dropout)
      want = _hand_stats(params, x, mask, label_key)
      loss, grads, stats, new_state = cap(params, x, y, key=label_key, state=state, rngs=rngs)
      updates, opt_state = tx.update(grads, opt_state, params, kfac_stats=stats)
      return (optax.apply_updates(params, updates), opt_state, new_state, loss, stats, want,
              dict(want_state))

    self._step = step

  def step(self, x, y, key):
    self.params, self.opt_state, self.state, *out = self._step(
        self.params, self.opt_state, self.state, x, y, key)
    loss, stats, want, want_state = out
    return loss, stats, want, self.state, want_state

  def eval_loss(self, x, y):
    ones = jnp.ones((x.shape[0], *rm.IMAGE[:2], rm.CHANNELS))
    return _ce(rm.cnn_reference(self.params, x, ones), y)


@pytest.mark.parametrize("framework", ["nnx", "linen"])
def test_kfac_trains_a_cnn_with_batchnorm_and_dropout(framework):
  """Every step: the new model state equals the plain adam step's, and the captured factors
  equal the hand-written forward's with the same batch statistics, mask and labels."""
  fw = _Nnx() if framework == "nnx" else _Linen()
  x, y = rm.images(1, batch=8)
  start = fw.eval_loss(x, y)
  first_state = _numeric(nnx.state(fw.model, nnx.Not(nnx.Param)) if framework == "nnx"
                         else fw.state)
  for i in range(STEPS):
    loss, stats, want, state, want_state = fw.step(x, y, jax.random.key(10 + i))
    assert np.isfinite(loss)
    for got, ref in zip(_numeric(state), _numeric(want_state)):
      np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6, err_msg=f"step {i}")
    for name in ("conv", "head"):
      np.testing.assert_allclose(stats[name].a, want[name].a, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(stats[name].s, want[name].s, rtol=1e-4, atol=1e-7)
  moved = [not np.array_equal(a, b) for a, b in zip(_numeric(state), first_state)]
  assert any(moved)
  assert fw.eval_loss(x, y) < 0.7 * start, (fw.eval_loss(x, y), start)
