"""Dimension numbers on the language model: each method with and without them.

The language model (`benchmarks.lm`) stores its blocks as one stack per parameter
(``[layers, d_in, d_out]`` kernels, created with ``nnx.vmap`` and run with ``nnx.scan``).
Read by rank alone, a method that looks inside a leaf treats the layer axis as one more
matrix axis: Shampoo builds a ``layers x layers`` factor and shares its other factors across
the layers; AdaHessian's default averaging no longer applies to 3-D leaves, so it is the
control here. With the dimension numbers derived from the model
(`secondorder.dimension_numbers_from_nnx`), every layer is its own matrix.

For every method the table gives the final held-out loss after ``--steps`` steps (the
problem's warm-up + cosine shape, each method at its registered learning rate), the first
step whose held-out loss reaches AdamW's final one, and for Shampoo the number and shapes of
eigendecomposition calls (``syevd``) in the compiled root refresh (``method="eigh"``,
counted in the HLO, not run).

  python -m benchmarks.dims_bench --size tiny --steps 120
"""

from __future__ import annotations

import argparse
import collections
import time

import jax
import optax
from flax import nnx

import secondorder as so
from benchmarks import lm
from benchmarks.sharding_bench import call_shapes


def derived_dimension_numbers(problem) -> object:
  """The model's dimension numbers from `so.dimension_numbers_from_nnx`, as a pure dict
  like the problem's params."""
  model = problem.make_model(0)
  return nnx.to_pure_dict(so.dimension_numbers_from_nnx(model))


def _methods(dims) -> dict:
  """name -> (transform, learning rate, needs obj_fn)."""
  on_cpu = jax.default_backend() == "cpu"
  root = "newton" if on_cpu else "eigh"
  return {
      "adamw": (optax.adamw(3e-3, weight_decay=1e-4), False),
      "adahessian": (so.adahessian(0.15, weight_dimension_numbers=dims), True),
      "shampoo": (so.shampoo(3e-3, method=root, eps=1e-6, weight_dimension_numbers=dims),
                  False),
  }


def train(problem, tx, needs_obj_fn: bool, steps: int, eval_every: int):
  """The held-out losses every `eval_every` steps (and at the end)."""
  shape = problem.schedule(steps)
  tx = optax.chain(tx, optax.scale_by_schedule(shape))
  params = problem.init_params(0)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    loss_fn = lambda p: problem.loss(p, batch)
    if needs_obj_fn:
      loss, grads, hdiag = so.value_grad_and_hessian_diag(loss_fn, params, opt_state)
      updates, opt_state = tx.update(grads, opt_state, params, hessian_diag=hdiag)
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  evaluate = jax.jit(problem.eval_loss)
  curve = []
  batches = problem.batches(0)
  for t in range(1, steps + 1):
    params, opt_state, _ = step(params, opt_state, next(batches))
    if t % eval_every == 0 or t == steps:
      curve.append((t, float(evaluate(params))))
  return curve


def shampoo_root_calls(problem, dims) -> list[str]:
  """The syevd calls of a Shampoo step that refreshes its roots, from the compiled HLO."""
  tx = so.shampoo(3e-3, method="eigh", update_interval=1, start_preconditioning_step=1,
                  weight_dimension_numbers=dims)
  params = problem.init_params(0)
  batch = next(problem.batches(0))

  def step(params, opt_state):
    grads = jax.grad(lambda p: problem.loss(p, batch))(params)
    return tx.update(grads, opt_state, params)

  compiled = jax.jit(step).lower(params, tx.init(params)).compile()
  return call_shapes(compiled.as_text(), "syevd")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="tiny", choices=sorted(lm.SIZES))
  parser.add_argument("--steps", type=int, default=None)
  args = parser.parse_args(argv)
  problem = lm.lm_problem(args.size)
  config = lm.SIZES[args.size]
  steps = args.steps or config.steps
  dims = derived_dimension_numbers(problem)

  results = {}
  for label, d in (("derived", dims), ("none", None)):
    for name, (tx, needs) in _methods(d).items():
      if name == "adamw" and label == "none":
        continue
      start = time.perf_counter()
      results[(name, label)] = (train(problem, tx, needs, steps, config.eval_every),
                                time.perf_counter() - start)
  target = results[("adamw", "derived")][0][-1][1]

  print(f"language model `{args.size}`, {steps} steps; AdamW's final held-out loss "
        f"{target:.4f}\n")
  print("| method | dimension numbers | final held-out loss | first step at AdamW's final "
        "| seconds |")
  print("|---|---|---|---|---|")
  for (name, label), (curve, seconds) in results.items():
    reached = next((t for t, loss in curve if loss <= target), None)
    print(f"| {name} | {label if name != 'adamw' else '(baseline)'} | {curve[-1][1]:.4f} | "
          f"{reached if reached is not None else 'not reached'} | {seconds:.0f} |")
  print()
  for label, d in (("derived", dims), ("none", None)):
    shapes = shampoo_root_calls(problem, d)
    print(f"Shampoo root refresh, dimension numbers {label}: {len(shapes)} syevd calls "
          f"{dict(collections.Counter(shapes))}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
