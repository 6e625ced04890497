"""Flax NNX's tree mode (`graph=False`, `nnx.set_graph_mode(False)`): the K-FAC capture and
the dimension numbers read a model written in it as they read the same model in the default
graph mode.

A model in tree mode builds its stacked layers with `nnx.vmap(..., graph=False)`, runs them
with `nnx.scan(..., graph=False)` and trains under `nnx.jit(..., graph=False)`; every NNX
call made inside `nnx.set_graph_mode(False)` (the capture's `nnx.iter_modules`, `nnx.split`,
`nnx.state`, ...) defaults to tree mode. Tree mode first shipped in a Flax newer than the
lowest version this package supports (0.12.1), so these tests skip where it is absent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import secondorder as so

if not hasattr(nnx, "set_graph_mode"):
  pytest.skip("this Flax has no tree mode (nnx.set_graph_mode)", allow_module_level=True)

LAYERS, WIDTH, D_IN, D_OUT, BATCH = 2, 4, 3, 2, 8


class Block(nnx.Module):

  def __init__(self, rngs):
    self.lin = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.norm = nnx.BatchNorm(WIDTH, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.norm(self.lin(x)))


class Net(nnx.Module):
  """A dense layer, `LAYERS` blocks stacked by `nnx.vmap` and run by `nnx.scan`, a dense head;
  `graph` picks the mode of the two transforms."""

  def __init__(self, rngs, *, graph):
    self.graph = graph
    self.inp = nnx.Linear(D_IN, WIDTH, rngs=rngs)

    @nnx.vmap(in_axes=0, out_axes=0, graph=graph)
    def make(key):
      return Block(nnx.Rngs(key))

    self.blocks = make(jax.random.split(rngs.params(), LAYERS))
    self.out = nnx.Linear(WIDTH, D_OUT, rngs=rngs)

  def __call__(self, x):
    body = lambda h, block: (block(h), None)
    h, _ = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                    graph=self.graph)(self.inp(x), self.blocks)
    return self.out(h)


def _mse(outputs, targets):
  return 0.5 * jnp.mean(jnp.sum((outputs - targets) ** 2, axis=-1))


def _data():
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=(BATCH, D_IN)), jnp.float32),
          jnp.asarray(rng.normal(size=(BATCH, D_OUT)), jnp.float32))


def _read(graph):
  """What the capture and the dimension numbers make of the model built in one mode."""
  x, y = _data()
  with nnx.set_graph_mode(graph):
    model = Net(nnx.Rngs(0), graph=graph)
    cap = so.nnx_capture(_mse, likelihood="gaussian", fisher="exact")
    layers = [(l.name, l.kernel_shape, l.a_dim, l.s_dim) for l in cap.layers(model, x)]
    numbers = nnx.to_pure_dict(so.dimension_numbers_from_nnx(model))
    loss, grads, stats = nnx.jit(cap, graph=graph)(model, x, y)
    batch_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  return layers, numbers, (loss, nnx.to_pure_dict(grads), stats), batch_stats


def test_capture_and_dimension_numbers_read_a_tree_mode_model_as_a_graph_mode_one():
  graph_layers, graph_numbers, graph_out, graph_stats = _read(True)
  tree_layers, tree_numbers, tree_out, tree_stats = _read(False)
  # Every layer is covered, the stacked ones as LAYERS blocks: the dense one's of
  # WIDTH(+1) x WIDTH, BatchNorm's per-channel (scale, shift) blocks.
  assert graph_layers == [("inp", (D_IN, WIDTH), D_IN + 1, WIDTH),
                          ("blocks/lin", (LAYERS, WIDTH, WIDTH), WIDTH + 1, WIDTH),
                          ("blocks/norm", (LAYERS, WIDTH), 2, WIDTH),
                          ("out", (WIDTH, D_OUT), WIDTH + 1, D_OUT)]
  assert tree_layers == graph_layers
  assert graph_numbers["blocks"]["lin"]["kernel"] == so.MuonDimensionNumbers(1, 2)
  assert tree_numbers == graph_numbers
  # The same loss, gradients and statistics, and the same batch statistics written back
  # into the model by the capture's training forward.
  assert jax.tree.structure(tree_out) == jax.tree.structure(graph_out)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               tree_out, graph_out)
  assert not np.allclose(graph_stats["blocks"]["norm"]["mean"], 0.0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               tree_stats, graph_stats)


def test_kfac_trains_a_tree_mode_model_in_an_nnx_optimizer():
  x, y = _data()
  with nnx.set_graph_mode(False):
    model = Net(nnx.Rngs(0), graph=False)
    cap = so.nnx_capture(_mse, likelihood="gaussian", fisher="exact")
    tx = so.kfac(0.3, layers=cap.layers(model, x))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit(graph=False)
    def step(model, optimizer):
      loss, grads, stats = cap(model, x, y)
      optimizer.update(model, grads, kfac_stats=stats)
      return loss

    losses = [float(step(model, optimizer)) for _ in range(12)]
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.3 * losses[0], losses
