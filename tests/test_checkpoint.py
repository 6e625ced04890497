"""Every transform's state survives an orbax checkpoint, and a resumed run is bit-identical.

For each method: train 12 steps without a break; separately train 3 steps, save params and
optimizer state with `orbax.checkpoint.StandardCheckpointer`, drop them, restore into the
structure `jax.eval_shape(tx.init, params)` describes (what a fresh process has), and train
the remaining 9. Step 3 sits inside an accumulation cycle (k = 4) and before the periodic
curvature refreshes (every 5 steps), so the counters, PRNG keys and statistics restored
decide what happens next.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import _training_setups as ts

METHODS = ["adam", "adahessian", "sophia_h", "sophia_g", "shampoo", "kfac", "every_k_adamw"]
TOTAL_STEPS = 12
SAVE_AT = 3


@pytest.fixture(scope="module")
def setups():
  return ts.available_setups()


@pytest.fixture(scope="module")
def data():
  batches = ts.make_batches(TOTAL_STEPS)
  return ([jax.tree.map(lambda x, t=t: x[t], batches) for t in range(TOTAL_STEPS)],
          jax.random.split(jax.random.key(3), TOTAL_STEPS))


def _make_step(setup, tx):
  @jax.jit
  def step(params, state, batch, key):
    grads, extra_args = setup.grads_and_args(params, batch, key)
    updates, state = tx.update(grads, state, params, **extra_args)
    return optax.apply_updates(params, updates), state
  return step


def _bits(tree):
  """Leaves as numpy arrays, PRNG keys as their raw key data."""
  def one(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return [one(x) for x in jax.tree.leaves(tree)]


def _assert_bit_identical(a, b, what):
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  for i, (x, y) in enumerate(zip(_bits(a), _bits(b))):
    assert x.dtype == y.dtype and x.shape == y.shape, (what, i, x.dtype, y.dtype)
    assert np.array_equal(x, y, equal_nan=True), (what, i, np.max(np.abs(
        x.astype(np.float64) - y.astype(np.float64))) if x.size else None)


@pytest.mark.parametrize("name", METHODS)
def test_resume_from_checkpoint_is_bit_identical(name, setups, data, tmp_path):
  if name not in setups:
    pytest.skip(f"{name}: its module is not in the library")
  setup = setups[name]
  batches, keys = data
  tx = setup.make()
  step = _make_step(setup, tx)
  params0 = ts.init_params()

  params, state = params0, jax.jit(tx.init)(params0)
  for t in range(TOTAL_STEPS):
    params, state = step(params, state, batches[t], keys[t])
  reference = (params, state)

  params, state = params0, jax.jit(tx.init)(params0)
  for t in range(SAVE_AT):
    params, state = step(params, state, batches[t], keys[t])
  saved = {"params": params, "opt_state": state}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", saved)
  checkpointer.wait_until_finished()
  del params, state

  # A fresh process knows only the transform and the parameters' shapes.
  tx_again = setup.make()
  abstract_params = jax.eval_shape(ts.init_params)
  target = {"params": abstract_params,
            "opt_state": jax.eval_shape(tx_again.init, abstract_params)}
  restored = checkpointer.restore(tmp_path / "ckpt", target)
  _assert_bit_identical(restored, saved, "restored vs saved")
  assert type(restored["opt_state"]) is type(saved["opt_state"])

  params, state = restored["params"], restored["opt_state"]
  for t in range(SAVE_AT, TOTAL_STEPS):
    params, state = step(params, state, batches[t], keys[t])
  _assert_bit_identical((params, state), reference, "resumed vs uninterrupted")
  # The run did move: a resume that ignored the checkpoint could not pass.
  assert not np.array_equal(np.asarray(params["hidden"]["kernel"]),
                            np.asarray(params0["hidden"]["kernel"]))


def test_checkpoint_keeps_typed_prng_keys(tmp_path):
  """A state holding a new-style typed key restores to the same typed key."""
  state = {"key": jax.random.key(7), "count": jnp.int32(5)}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "ckpt", jax.eval_shape(lambda: state))
  assert jnp.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored["key"]),
                                jax.random.key_data(state["key"]))
  assert int(restored["count"]) == 5
