"""kfac-jax's adaptive Optimizer on the digits autoencoder (run by benchmarks.kfac_bench).

kfac-jax needs an older JAX than secondorder, so this script runs in its own virtual
environment and imports neither secondorder nor flax. The environment (the versions this
benchmark was measured with)::

  python3 -m venv /work/envs/kfac
  /work/envs/kfac/bin/pip install "jax==0.9.1" "jaxlib==0.9.1" "flax==0.12.6" \\
      "kfac-jax==0.0.8" "optax==0.2.8" scikit-learn

Usage (normally launched by `python3 -m benchmarks.kfac_bench`)::

  /work/envs/kfac/bin/python benchmarks/kfac_jax_digits.py SETUP.npz RESULT.json

SETUP.npz holds the data `x` [N, 64], the batch indices `idx` [steps, batch] and the initial
parameters `W0, b0, W1, b1, ...` (the same ones the in-process runs start from). RESULT.json
gets the full-data loss after every step and the wall time of every step.
"""

from __future__ import annotations

import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import kfac_jax

CODE_LAYER = 2  # no tanh after the 8-unit code layer


def forward(params, x):
  n = len(params) // 2
  for i in range(n):
    x = jnp.dot(x, params[f"W{i}"]) + params[f"b{i}"]
    if i < n - 1 and i != CODE_LAYER:
      x = jnp.tanh(x)
  return x


def bernoulli_nll(logits, x):
  """Bernoulli-logit loss summed over pixels, averaged over the batch."""
  per = jnp.logaddexp(0.0, logits) - x * logits
  return jnp.sum(per) / x.shape[0]


def loss_fn(params, batch):
  logits = forward(params, batch)
  kfac_jax.register_sigmoid_cross_entropy_loss(logits, batch)
  return bernoulli_nll(logits, batch)


def main(setup_path: str, out_path: str) -> None:
  setup = np.load(setup_path)
  x = jnp.asarray(setup["x"])
  idx = setup["idx"]
  params = {k: jnp.asarray(setup[k]) for k in setup.files if k[0] in "Wb"}
  optimizer = kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(loss_fn),
      l2_reg=0.0,
      use_adaptive_learning_rate=True,
      use_adaptive_momentum=True,
      use_adaptive_damping=True,
      initial_damping=1.0,
      multi_device=False,
  )
  full_loss = jax.jit(lambda p: bernoulli_nll(forward(p, x), x))
  rng = jax.random.PRNGKey(0)
  state = optimizer.init(params, rng, x[idx[0]])
  # kfac-jax's default 10 curvature-only burn-in passes at the first step read their batches
  # from the iterator (the first 10 of the schedule); the 500 steps then take the next ones,
  # cycling through the schedule.
  batches = (x[idx[i % idx.shape[0]]] for i in itertools.count())
  losses, times = [], []
  for step in range(idx.shape[0]):
    rng, key = jax.random.split(rng)
    t0 = time.perf_counter()
    params, state, _ = optimizer.step(params, state, key, data_iterator=batches,
                                      global_step_int=step)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - t0)
    losses.append(float(full_loss(params)))
  with open(out_path, "w") as f:
    json.dump({"loss": losses, "step_time": times, "jax": jax.__version__,
               "kfac_jax": getattr(kfac_jax, "__version__", "?")}, f)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
