"""One method of each family, run from an installed copy of secondorder (tests/test_packaging.py
runs this file with the Python of a fresh virtual environment, in a folder outside the
checkout). Each trains a small softmax classifier for a few jitted steps; the script fails
unless every loss falls, and prints one line per method.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

import secondorder as so

STEPS = 8
rng = np.random.default_rng(0)
X = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
LABELS = jnp.asarray(np.argmax(np.asarray(X) @ rng.normal(size=(4, 3)), axis=1), jnp.int32)
PARAMS = {"w": jnp.asarray(rng.normal(size=(4, 3)) * 0.1, jnp.float32),
          "b": jnp.zeros(3, jnp.float32)}


def logits_fn(p):
  return X @ p["w"] + p["b"]


def loss(p):
  return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), LABELS).mean()


def train(name, tx, **extra):
  """`STEPS` steps of `tx` on the classifier; the loss must fall."""
  state = tx.init(PARAMS)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params, **extra)
    return optax.apply_updates(params, updates), state

  params = PARAMS
  for _ in range(STEPS):
    params, state = step(params, state)
  first, last = float(loss(PARAMS)), float(loss(params))
  assert np.isfinite(last) and last < 0.9 * first, (name, first, last)
  print(f"{name}: {first:.3f} -> {last:.3f}")


def check_curvature():
  """The toolkit: a Hessian-vector product and the exact diagonal against the dense Hessian."""
  flat, unravel = ravel_pytree(PARAMS)
  dense = jax.hessian(lambda v: loss(unravel(v)))(flat)
  v = jnp.asarray(rng.normal(size=flat.shape), jnp.float32)
  hv = ravel_pytree(so.hvp(loss, PARAMS, unravel(v)))[0]
  np.testing.assert_allclose(hv, dense @ v, rtol=1e-3, atol=1e-5)
  diag = so.hessian_diag(lambda p, x, y: loss(p), PARAMS, None, None)
  np.testing.assert_allclose(diag, jnp.diag(dense), rtol=1e-3, atol=1e-6)
  print("curvature toolkit: hvp and hessian_diag match the dense Hessian")


def train_kfac():
  """K-FAC from an unmodified NNX model in nnx.Optimizer."""
  model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.tanh,
                         nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
  ce = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  cap = so.nnx_capture(ce, likelihood="softmax")
  optimizer = nnx.Optimizer(model, so.kfac(0.1, layers=cap.layers(model, X)), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, key):
    value, grads, stats = cap(model, X, LABELS, key=key)
    optimizer.update(model, grads, kfac_stats=stats)
    return value

  losses = [float(step(model, optimizer, jax.random.key(t))) for t in range(STEPS)]
  assert np.isfinite(losses).all() and losses[-1] < 0.9 * losses[0], losses
  print(f"kfac: {losses[0]:.3f} -> {losses[-1]:.3f}")


def main():
  assert "site-packages" in so.__file__, f"not the installed copy: {so.__file__}"
  check_curvature()
  train("adahessian", so.adahessian(0.1), obj_fn=loss)
  train("sophia", so.sophia(0.05, update_interval=1), obj_fn=loss)
  train("shampoo", so.shampoo(0.05, start_preconditioning_step=1, update_interval=1))
  train("soap", so.soap(0.05, precondition_frequency=1))
  train("hessian_free", so.hessian_free(), logits_fn=logits_fn,
        loss_fn=so.softmax_cross_entropy(LABELS))
  train("natural_gradient", so.natural_gradient(0.05), logits_fn=logits_fn)
  train("accumulated_adamw", so.accumulated_adamw(0.05, k=2))
  train_kfac()
  print(f"secondorder {so.__version__} from {so.__file__}", file=sys.stderr)


if __name__ == "__main__":
  main()
