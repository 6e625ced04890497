"""The methods on Flax models as people write them: scan-stacked layers, attention, tied
embeddings, BatchNorm and Dropout in training mode, in NNX and in linen.

- `dimension_numbers_from_nnx` / `dimension_numbers_from_linen` return the expected spec for
  every leaf of a scan-over-layers decoder and of a CNN.
- AdaHessian (one pass, `has_aux`), Sophia-H, Sophia-G, Shampoo and gradient accumulation
  train the CNN for 20 jitted steps through `nnx_forward` / `linen_forward`. After every
  step the model state (running statistics, and NNX's RNG counter) equals the state a plain
  `optax.adam` step written in the framework's own idiom gives from the same params, state,
  batch and key. The curvature estimates equal those of `cnn_reference`, the same forward
  written with `jax.lax`, the batch statistics of the batch and the dropout mask read off the
  model's own Dropout layer.
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
from secondorder.dimension_numbers import MuonDimensionNumbers as D
from tests import _real_models as rm

STEPS = 20


def _flat(tree):
  is_leaf = lambda x: x is None or isinstance(x, D)
  return {jax.tree_util.keystr(p).replace(".value", ""): v
          for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


# Every kernel of one decoder block, stacked on axis 0; every other leaf None.
_BLOCK_KERNELS = {"['up']['kernel']": D(1, 2), "['down']['kernel']": D(1, 2),
                  "['attn']['query']['kernel']": D(1, (2, 3)),
                  "['attn']['key']['kernel']": D(1, (2, 3)),
                  "['attn']['value']['kernel']": D(1, (2, 3)),
                  "['attn']['out']['kernel']": D((1, 2), 3)}
# The stacked vectors (biases and norm parameters [L, d]); the attention projections'
# biases [L, heads, head_dim] are not vectors in one layer and keep None.
_BLOCK_VECTORS = {k: D((), 1) for k in (
    "['up']['bias']", "['down']['bias']", "['attn']['out']['bias']", "['ln1']['scale']",
    "['ln1']['bias']", "['ln2']['scale']", "['ln2']['bias']")}


@functools.cache
def _nnx_decoder():
  return rm.NnxDecoder(nnx.Rngs(0))


def test_dimension_numbers_of_the_nnx_decoder():
  model = _nnx_decoder()
  got = _flat(so.dimension_numbers_from_nnx(model))
  want = {"['embed']['embedding']": D(0, 1)}
  want.update({"['blocks']" + k: v for k, v in {**_BLOCK_KERNELS, **_BLOCK_VECTORS}.items()})
  assert {k: v for k, v in got.items() if v is not None} == want
  assert len(got) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
  so.dimension_numbers.resolve_leaf_axes(so.dimension_numbers_from_nnx(model),
                                         nnx.state(model, nnx.Param))


def test_dimension_numbers_of_the_linen_decoder():
  model, tokens = rm.LinenDecoder(), rm.tokens()
  variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
  got = _flat(so.dimension_numbers_from_linen(model, variables, tokens))
  renamed = {"['up']": "['Dense_0']", "['down']": "['Dense_1']",
             "['attn']": "['MultiHeadDotProductAttention_0']", "['ln1']": "['LayerNorm_0']",
             "['ln2']": "['LayerNorm_1']"}
  want = {"['Embed_0']['embedding']": D(0, 1)}
  for k, v in {**_BLOCK_KERNELS, **_BLOCK_VECTORS}.items():
    for old, new in renamed.items():
      k = k.replace(old, new)
    want["['blocks']" + k] = v
  assert {k: v for k, v in got.items() if v is not None} == want
  assert len(got) == len(jax.tree.leaves(variables["params"]))


def test_dimension_numbers_of_the_cnns():
  want = {"['conv']['kernel']": D((0, 1, 2), 3), "['head']['kernel']": D(0, 1)}
  got = _flat(so.dimension_numbers_from_nnx(rm.NnxCNN(nnx.Rngs(0))))
  assert {k: v for k, v in got.items() if v is not None} == want and len(got) == 6
  x, _ = rm.images(0)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  variables = jax.eval_shape(rm.LinenCNN().init, rngs, x)
  got = _flat(so.dimension_numbers_from_linen(rm.LinenCNN(), variables, x, rngs=rngs))
  assert {k: v for k, v in got.items() if v is not None} == want and len(got) == 6


def test_derivation_says_what_it_cannot_read():
  """A stack axis other than the declared one raises with the path and the shapes. A
  parameter no known layer owns is read plainly by default (this used to raise: the common
  model has free parameters such as a position table, and the error sent users to drop the
  dimension numbers altogether); on_unknown="raise" keeps the error."""
  model = _nnx_decoder()
  with pytest.raises(ValueError, match=r"blocks/attn/key/kernel: stored shape \(3, 8, 2, 4\)"
                                       r".*\(8, 2, 4\).*stack_axis=1"):
    so.dimension_numbers_from_nnx(model, stack_axis=1)

  class Custom(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((2, 3, 4)))
      self.m = nnx.Param(jnp.ones((3, 5)))
      self.lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

  with pytest.raises(ValueError, match=r"m \(3, 5\), w \(2, 3, 4\).*on_unknown='plain'"):
    so.dimension_numbers_from_nnx(Custom(), on_unknown="raise")
  got = _flat(so.dimension_numbers_from_nnx(Custom(), on_unknown="none"))
  assert got == {"['lin']['bias']": None, "['lin']['kernel']": D(0, 1), "['m']": None,
                 "['w']": None}
  tree, summary = so.dimension_numbers_from_nnx(Custom(), with_summary=True)
  assert _flat(tree) == {"['lin']['bias']": None, "['lin']['kernel']": D(0, 1),
                         "['m']": D(0, 1), "['w']": D((), 2)}
  assert "2 parameters of rank >= 2 outside every known layer" in summary
  assert "m (3, 5): a free matrix, read as its own two axes" in summary
  assert "w (2, 3, 4): a free parameter of rank 3, no matrix reading" in summary
  with pytest.raises(ValueError, match="on_unknown must be one of"):
    so.dimension_numbers_from_nnx(Custom(), on_unknown="guess")


def test_linen_free_parameter_in_a_scanned_layer_is_read_per_layer():
  """A free self.param matrix inside nn.scan is L matrices; a position table [1, N, D]
  outside has no matrix reading; the summary says both."""

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      w = self.param("mix", nn.initializers.normal(), (x.shape[-1], x.shape[-1]))
      return x @ w, None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      pos = self.param("pos", nn.initializers.normal(), (1,) + x.shape[1:])
      x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)(name="blocks")(x + pos, None)
      return nn.Dense(2)(x)

  x = jnp.ones((2, 5, 4))
  variables = Net().init(jax.random.key(0), x)
  tree, summary = so.dimension_numbers_from_linen(Net(), variables, x, with_summary=True)
  assert tree["blocks"]["mix"] == D(1, 2) and tree["pos"] == D((), 2)
  assert tree["Dense_0"]["kernel"] == D(0, 1)
  assert "blocks/mix (3, 4, 4): a free matrix, read as its own two axes, in each" in summary


# --- Training the CNN with BatchNorm and Dropout ----------------------------------------

def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


class _Nnx:
  """The NNX CNN as (params, state) and its two ways of running a step."""

  def __init__(self):
    self.graphdef, self.params, self.state = nnx.split(rm.NnxCNN(nnx.Rngs(0)), nnx.Param, ...)

  def forward(self, params, state, x, key):
    del key   # the dropout key comes from the RNG counter in `state`
    return so.nnx_forward(self.graphdef, state, x)

  def adam_step_state(self, params, state, x, y, key):
    """A plain training step in NNX's idiom: nnx.grad on the model, nnx.Optimizer."""
    del key
    model = nnx.merge(self.graphdef, params, state, copy=True)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    grads = nnx.grad(lambda m: _ce(m(x), y))(model)
    optimizer.update(model, grads)
    return nnx.split(model, nnx.Param, ...)[2]

  def reference_logits(self, params, state, x, key):
    del key
    mask = nnx.merge(self.graphdef, params, state, copy=True).drop(
        jnp.ones((x.shape[0], *rm.IMAGE[:2], rm.CHANNELS)))
    return lambda p: rm.cnn_reference(p.to_pure_dict(), x, mask)


class _Linen:
  """The linen CNN as (params, batch_stats) and its two ways of running a step."""

  def __init__(self):
    x, _ = rm.images(0)
    self.net = rm.LinenCNN()
    variables = self.net.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    self.params = variables["params"]
    self.state = {"batch_stats": variables["batch_stats"]}

  def forward(self, params, state, x, key):
    return so.linen_forward(self.net.apply, state, x, rngs={"dropout": key})

  def adam_step_state(self, params, state, x, y, key):
    """A plain training step in linen's idiom: apply with mutable batch_stats."""
    def loss(p):
      logits, updates = self.net.apply({"params": p, **state}, x, rngs={"dropout": key},
                                       mutable=["batch_stats"])
      return _ce(logits, y), updates
    (_, updates), grads = jax.value_and_grad(loss, has_aux=True)(params)
    optax.adam(1e-2).update(grads, optax.adam(1e-2).init(params), params)
    return dict(updates)

  def reference_logits(self, params, state, x, key):
    mask = self.net.apply({"params": params, **state},
                          jnp.ones((x.shape[0], *rm.IMAGE[:2], rm.CHANNELS)),
                          rngs={"dropout": key}, method=rm.LinenCNN.dropout)
    return lambda p: rm.cnn_reference(p, x, mask)


_METHODS = {
    "adahessian": so.adahessian(0.05),
    "sophia_h": so.sophia(1e-2, update_interval=2),
    "sophia_g": so.sophia(1e-2, estimator="gnb", update_interval=2),
    "shampoo": so.shampoo(1e-2, update_interval=2, start_preconditioning_step=2),
    "accumulation": so.accumulated_adamw(1e-2, k=2),
}


def _numeric(tree):
  """The leaves of a model state as float arrays (NNX's RNG keys as their key data)."""
  return [(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
           ).astype(jnp.float32) for x in jax.tree.leaves(tree)]


def _method_step(name, tx, fw, params, state, opt_state, x, y, key):
  """One training step of a method: the gradient pass writes the state once; the curvature
  passes run `frozen`."""
  fwd = fw.forward(params, state, x, key)
  train_loss = lambda p: (lambda out, s: (_ce(out, y), s))(*fwd.train(p))
  if name == "adahessian":
    _, grads, hdiag, new_state = so.value_grad_and_hessian_diag(
        train_loss, params, opt_state, has_aux=True)
    updates, opt_state = tx.update(grads, opt_state, params, hessian_diag=hdiag)
  else:
    (_, new_state), grads = jax.value_and_grad(train_loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   obj_fn=lambda p: _ce(fwd.frozen(p), y),
                                   logits_fn=fwd.frozen)
  return optax.apply_updates(params, updates), new_state, opt_state


def _train(fw):
  """Every method for STEPS steps in one jitted scan; per step, the largest difference
  between the method's new model state and the plain adam step's from the same point."""
  xs, ys = jax.vmap(lambda s: rm.images(s))(jnp.arange(STEPS))
  keys = jax.random.split(jax.random.key(7), STEPS)

  def body(carry, batch):
    x, y, key = batch
    new_carry, diffs = {}, {}
    for name, tx in _METHODS.items():
      params, state, opt_state = carry[name]
      want = fw.adam_step_state(params, state, x, y, key)
      params, state, opt_state = _method_step(name, tx, fw, params, state, opt_state, x, y,
                                              key)
      diffs[name] = jnp.stack([jnp.max(jnp.abs(a - b)) for a, b in
                               zip(_numeric(state), _numeric(want))])
      new_carry[name] = (params, state, opt_state)
    return new_carry, diffs

  init = {name: (fw.params, fw.state, tx.init(fw.params)) for name, tx in _METHODS.items()}
  # One program for all methods, compiled at XLA's lowest CPU level: it runs in well under
  # a second, so a third of the compile time buys nothing here.
  with jax.check_tracer_leaks():
    run = jax.jit(lambda c: jax.lax.scan(body, c, (xs, ys, keys)), compiler_options=_LOW)
    return run(init)


_LOW = {"xla_backend_optimization_level": 0}


def _curvature_checks(fw):
  """One compiled function: the loss and, for a probe / label key, the Hutchinson and GNB
  estimates through `frozen` and through `cnn_reference`."""
  def check(params, state, x, y, key, probe):
    fwd = fw.forward(params, state, x, key)
    reference = fw.reference_logits(params, state, x, key)
    return (_ce(fwd.frozen(params), y), fwd.frozen(params), reference(params),
            so.hutchinson_diag(lambda q: _ce(fwd.frozen(q), y), params, probe),
            so.hutchinson_diag(lambda q: _ce(reference(q), y), params, probe),
            so.gnb_diag(fwd.frozen, params, probe), so.gnb_diag(reference, params, probe))
  return jax.jit(check, compiler_options=_LOW)


@pytest.mark.parametrize("framework", ["nnx", "linen"])
def test_methods_train_a_cnn_with_batchnorm_and_dropout(framework):
  fw = _Nnx() if framework == "nnx" else _Linen()
  final, diffs = _train(fw)
  check = _curvature_checks(fw)
  x, y = rm.images(3)
  key, probe = jax.random.key(5), jax.random.key(6)
  loss0, *estimates0 = check(fw.params, fw.state, x, y, key, probe)
  for name, (params, state, _) in final.items():
    np.testing.assert_allclose(np.asarray(diffs[name]), 0.0, atol=1e-5, err_msg=name)
    for a, b in zip(_numeric(state), _numeric(fw.state)):
      if a.size > 2:   # running statistics (and the RNG counter) moved
        assert not np.array_equal(a, b), name
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params)), name
    loss, *estimates = check(params, state, x, y, key, probe)
    assert np.isfinite(loss) and loss < 2 * loss0, (name, loss, loss0)
    if name != "sophia_h":
      continue
    # The curvature the methods see, against the lax-written forward with the batch's
    # statistics and the model's own dropout mask, at the start and after training.
    for logits, logits_ref, *pairs in [estimates0, estimates]:
      np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-6)
      for got, want in [pairs[:2], pairs[2:]]:
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
          np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
