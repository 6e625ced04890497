"""The language-model race's problem: model, data split and a short training run."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from benchmarks import lm


@pytest.fixture(scope="module")
def problem():
  return lm.lm_problem("tiny")


def test_split_is_by_file_and_deterministic():
  corpus = lm.ByteCorpus.load()
  assert corpus.train_files and corpus.validation_files
  assert not set(corpus.train_files) & set(corpus.validation_files)
  assert list(corpus.train_files) == sorted(corpus.train_files)
  # The split depends on the file name only: recomputing it gives the same halves.
  for name in corpus.train_files + corpus.validation_files:
    assert lm._is_validation(name) == (name in corpus.validation_files)
  assert corpus.train.dtype == np.uint8 and len(corpus.train) > 10 * len(corpus.validation) / 2
  assert len(corpus.validation) > 50_000


def test_split_of_a_small_folder(tmp_path):
  names = [f"m{i}.py" for i in range(40)]
  for i, name in enumerate(names):
    (tmp_path / name).write_bytes(bytes([i]) * 100)
  (tmp_path / "notes.txt").write_bytes(b"x" * 100)  # not a .py file: not read
  corpus = lm.ByteCorpus.load(str(tmp_path))
  assert sorted(corpus.train_files + corpus.validation_files) == sorted(names)
  # Every file's bytes land in exactly its own half (each file is one distinct byte value).
  train_values = set(np.unique(corpus.train).tolist()) - {ord("\n")}
  validation_values = set(np.unique(corpus.validation).tolist()) - {ord("\n")}
  assert train_values == {names.index(n) for n in corpus.train_files} - {ord("\n")}
  assert not train_values & validation_values
  with pytest.raises(ValueError, match="too few"):
    lm.ByteCorpus.load(_one_file(tmp_path))


def _one_file(tmp_path):
  folder = tmp_path / "one"
  folder.mkdir()
  (folder / "a.py").write_bytes(b"a = 1\n")
  return str(folder)


def _unrolled_forward(model: lm.DecoderLM, tokens):
  """The same network with each layer's block rebuilt from its slice of the stacked params."""
  config = model.config
  _, blocks_state = nnx.split(model.blocks)
  x = model.embed(tokens) + model.pos(jnp.arange(tokens.shape[1]))
  for i in range(config.layers):
    block = lm.Block(config, param_dtype=jnp.float64, rngs=nnx.Rngs(123))  # replaced below
    graphdef, state = nnx.split(block)
    layer_state = jax.tree.map(lambda a: a[i], blocks_state)
    nnx.replace_by_pure_dict(state, nnx.to_pure_dict(layer_state))
    x = nnx.merge(graphdef, state)(x)
  x = model.norm(x)
  return x @ model.embed.embedding[...].T


def test_scan_forward_equals_unrolled_copy():
  config = lm.SIZES["tiny"]
  with jax.enable_x64(True):
    model = lm.DecoderLM(config, param_dtype=jnp.float64, rngs=nnx.Rngs(3))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, config.context)))
    forward = nnx.jit(lambda m, x: m(x))
    scanned = forward(model, tokens)
    unrolled = nnx.jit(_unrolled_forward)(model, tokens)
    assert scanned.dtype == jnp.float64 and scanned.shape == (2, config.context, 256)
    np.testing.assert_allclose(scanned, unrolled, rtol=1e-10, atol=1e-10)
    # Causal: changing the last token leaves every earlier position's logits unchanged.
    changed = forward(model, tokens.at[:, -1].set((tokens[:, -1] + 1) % 256))
    np.testing.assert_allclose(changed[:, :-1], scanned[:, :-1], rtol=1e-12, atol=1e-12)
    assert not np.allclose(changed[:, -1], scanned[:, -1])


def test_stacked_leaves_and_dimension_numbers(problem):
  from secondorder.dimension_numbers import resolve_leaf_axes

  params = problem.init_params(0)
  layers, dim = lm.SIZES["tiny"].layers, lm.SIZES["tiny"].dim
  assert params["blocks"]["qkv"]["kernel"].shape == (layers, dim, 3 * dim)
  axes = resolve_leaf_axes(problem.weight_dimension_numbers, params)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  by_path = {jax.tree_util.keystr(p): a for (p, _), a in zip(leaves, axes)}
  qkv = by_path["['blocks']['qkv']['kernel']"]
  assert qkv.matrix_shape == (layers, dim, 3 * dim)
  assert by_path["['embed']['embedding']"] is None
  # Every stacked bias and norm scale is `layers` vectors, never a [layers, d] matrix.
  hidden = params["blocks"]["fc1"]["bias"].shape[-1]
  assert by_path["['blocks']['fc1']['bias']"].matrix_shape == (layers, 1, hidden)
  assert by_path["['blocks']['norm1']['scale']"].vectors

  # The blocks' hand-written numbers are those the library reads from the model's layers.
  import secondorder as so
  is_spec = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)
  read = nnx.to_pure_dict(so.dimension_numbers_from_nnx(problem.make_model(0)))
  assert jax.tree.leaves(problem.weight_dimension_numbers(params)["blocks"], is_leaf=is_spec) \
      == jax.tree.leaves(read["blocks"], is_leaf=is_spec)


def test_muon_keeps_adam_on_the_stacked_vectors(problem):
  from benchmarks.optimizers import _matrices_only

  is_spec = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)
  dims = _matrices_only(problem.weight_dimension_numbers)(problem.init_params(0))
  assert dims["blocks"]["fc1"]["bias"] is None and dims["blocks"]["norm1"]["scale"] is None
  assert dims["blocks"]["fc1"]["kernel"] == optax.contrib.MuonDimensionNumbers(1, 2)
  assert sum(d is not None for d in jax.tree.leaves(dims, is_leaf=is_spec)) == 4


def test_schedule_warms_up_then_decays():
  config = lm.SIZES["tiny"]
  shape = lm.schedule(config, 100)
  values = np.asarray(jax.vmap(shape)(jnp.arange(101)))
  assert values[0] == 0.0 and values.max() == pytest.approx(1.0)
  peak = int(values.argmax())
  assert peak == round(config.warmup * 100)
  assert np.all(np.diff(values[:peak + 1]) > 0) and np.all(np.diff(values[peak:]) <= 1e-7)
  assert values[-1] == pytest.approx(config.final_fraction)


def test_loss_at_init_is_log_vocabulary_and_adamw_lowers_the_validation_loss(problem):
  config = lm.SIZES["tiny"]
  tx = optax.chain(optax.adamw(3e-3, weight_decay=1e-4),
                   optax.scale_by_schedule(problem.schedule(30)))
  params = problem.init_params(0)
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(problem.loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  evaluate = jax.jit(problem.eval_loss)
  data = problem.batches(0)
  batch = next(data)
  assert batch[0].shape == (config.batch_size, config.context)
  np.testing.assert_array_equal(batch[0][:, 1:], batch[1][:, :-1])  # next-byte targets
  before = float(evaluate(params))
  params, state, first = step(params, state, batch)
  # Small tied embeddings: the logits start near zero, so the loss is about log(256).
  assert before == pytest.approx(math.log(lm.VOCAB), abs=0.05)
  assert float(first) == pytest.approx(math.log(lm.VOCAB), abs=0.05)
  for _ in range(29):
    params, state, _ = step(params, state, next(data))
  after = float(evaluate(params))
  assert after < before - 0.5


def test_config_validates():
  with pytest.raises(ValueError, match="dim"):
    lm.LMConfig(dim=30, heads=4)
  with pytest.raises(ValueError, match="warmup"):
    lm.LMConfig(warmup=1.5)
  with pytest.raises(ValueError, match="LMConfig.layers"):
    lm.LMConfig(layers=0)
  with pytest.raises(ValueError, match="size"):
    lm.lm_problem("huge")
