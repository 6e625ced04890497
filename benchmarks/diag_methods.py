"""Step time of the diagonal curvature methods against optax.adamw, measured in the same run.

Rows (each a full jitted training step: loss and gradient, curvature, optimizer update):

  * ``adamw``: `jax.value_and_grad` + `optax.adamw` (the baseline of every ratio);
  * ``sophia_h`` / ``sophia_g``: Sophia with a Hutchinson / Gauss-Newton-Bartlett estimate
    every k = 10 steps (`lax.cond`), amortised over whole 10-step cycles;
  * ``sophia_h_host`` / ``sophia_g_host``: the same schedule decided on the host
    (`update(..., refresh=t % 10 == 0)`, a refresh step and a plain step compiled apart);
  * ``sophia_h_one_pass`` / ``sophia_g_one_pass``: host-scheduled, and the refresh step takes
    its loss, gradient and estimate from one pass (`value_grad_and_hutchinson_estimate`:
    one forward-over-reverse pass; `value_grad_and_gnb_estimate`: one forward pass and a
    double-width backward pass), then `update(..., hessian_diag=..., refresh=True)`;
  * ``optax_sophia``: `optax.contrib.sophia` (Hutchinson every 10 steps), for comparison;
  * ``adahessian_two_pass``: `jax.value_and_grad`, then `update(..., obj_fn=...)`, which
    computes its HVP with a second forward-over-reverse pass (the reference's pattern);
  * ``adahessian_one_pass``: `value_grad_and_hessian_diag` (loss, gradient and z * Hz from one
    forward-over-reverse pass), then `update(..., hessian_diag=...)`;
  * ``grad_only``: `jax.value_and_grad` alone (no optimizer), for scale.

Inside one `jax.jit`, XLA's common-subexpression elimination already removes most of the
gradient that the two-pass row computes twice, so the two AdaHessian rows come out close;
the one-pass helper makes the saving explicit and keeps it when the gradient and the HVP
would otherwise be compiled apart.

Timing: every row runs `--block` consecutive steps (a multiple of 10, so each block holds
the same number of Sophia refreshes) on a fixed batch, rows interleaved, `--repeats`
rounds; the table gives the median time per step and its ratio to adamw's median.
Targets (issue 5): Sophia (k = 10) <= 1.10x AdamW, AdaHessian (HVP every step) <= 2.3x.

  python -m benchmarks.diag_methods                        # both problems, PNG in bench_out/
  python -m benchmarks.diag_methods --problems digits_cnn --repeats 5 --out /tmp/b
  # on a machine busy with other work: one XLA thread, CPU time of this process
  python -m benchmarks.diag_methods --single-thread --clock cpu
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from typing import Any, Callable

import jax
import optax
import optax.contrib

from benchmarks.problems import get_problem
from secondorder.transforms.hutchinson import adahessian, value_grad_and_hessian_diag
from secondorder.transforms.sophia import (sophia, value_grad_and_gnb_estimate,
                                           value_grad_and_hutchinson_estimate)

TARGETS = {"sophia_h": 1.10, "sophia_g": 1.10, "sophia_h_host": 1.10, "sophia_g_host": 1.10,
           "sophia_h_one_pass": 1.10, "sophia_g_one_pass": 1.10,
           "adahessian_one_pass": 2.3, "adahessian_two_pass": 2.3}


def _rows(problem) -> dict[str, Callable[[], Callable]]:
  """name -> factory of (init(params), step(params, state, batch) -> (params, state, loss))."""

  def two_pass(tx, extra: Callable[[Any], dict]):
    def step(params, state, batch):
      loss, grads = jax.value_and_grad(problem.loss)(params, batch)
      updates, state = tx.update(grads, state, params, **extra(batch))
      return optax.apply_updates(params, updates), state, loss
    return tx.init, jax.jit(step)

  def host_scheduled(tx, extra: Callable[[Any], dict], k: int = 10, one_pass=None):
    # Two compiled steps, chosen on the host: update(..., refresh=True/False). With
    # `one_pass(params, state, batch) -> (loss, grads, estimate)` the refresh step takes its
    # gradient and estimate from that one pass (update(..., hessian_diag=...)).
    def make(refresh: bool):
      def step(params, state, batch):
        if refresh and one_pass is not None:
          loss, grads, h = one_pass(params, state, batch)
          updates, state = tx.update(grads, state, params, refresh=True, hessian_diag=h)
          return optax.apply_updates(params, updates), state, loss
        loss, grads = jax.value_and_grad(problem.loss)(params, batch)
        kw = extra(batch) if refresh else {}
        updates, state = tx.update(grads, state, params, refresh=refresh, **kw)
        return optax.apply_updates(params, updates), state, loss
      return jax.jit(step)
    refresh_step, plain_step = make(True), make(False)
    counter = itertools.count()

    def step(params, state, batch):
      return (refresh_step if next(counter) % k == 0 else plain_step)(params, state, batch)
    return tx.init, step

  obj = lambda b: {"obj_fn": lambda p: problem.loss(p, b)}
  logits = lambda b: {"logits_fn": lambda p: problem.logits_fn(p, b)}

  def h_one_pass(params, state, batch):
    return value_grad_and_hutchinson_estimate(lambda p: problem.loss(p, batch), params, state)

  def g_one_pass(params, state, batch):
    return value_grad_and_gnb_estimate(
        lambda p: problem.logits_fn(p, batch),
        lambda z: problem.output_loss(z, problem.labels(batch)), params, state)

  def adahessian_one_pass():
    tx = adahessian(0.15)

    def step(params, state, batch):
      loss, grads, hdiag = value_grad_and_hessian_diag(
          lambda p: problem.loss(p, batch), params, state)
      updates, state = tx.update(grads, state, params, hessian_diag=hdiag)
      return optax.apply_updates(params, updates), state, loss
    return tx.init, jax.jit(step)

  def grad_only():
    def step(params, state, batch):
      loss, grads = jax.value_and_grad(problem.loss)(params, batch)
      # Keep the gradient live without an optimizer: a negligible SGD step.
      return jax.tree.map(lambda p, g: p - 1e-6 * g, params, grads), state, loss
    return (lambda params: ()), jax.jit(step)

  rows = {
      "adamw": lambda: two_pass(optax.adamw(1e-3, weight_decay=1e-4), lambda b: {}),
      "grad_only": grad_only,
      "sophia_h": lambda: two_pass(sophia(1e-3, update_interval=10), obj),
      "sophia_h_host": lambda: host_scheduled(sophia(1e-3, update_interval=10), obj),
      "sophia_h_one_pass": lambda: host_scheduled(sophia(1e-3, update_interval=10), obj,
                                                  one_pass=h_one_pass),
      "optax_sophia": lambda: two_pass(optax.contrib.sophia(1e-3, update_interval=10), obj),
      "adahessian_two_pass": lambda: two_pass(adahessian(0.15), obj),
      "adahessian_one_pass": adahessian_one_pass,
  }
  if problem.logits_fn is not None:
    rows["sophia_g"] = lambda: two_pass(sophia(1e-3, update_interval=10, estimator="gnb"), logits)
    rows["sophia_g_host"] = lambda: host_scheduled(
        sophia(1e-3, update_interval=10, estimator="gnb"), logits)
    rows["sophia_g_one_pass"] = lambda: host_scheduled(
        sophia(1e-3, update_interval=10, estimator="gnb"), logits, one_pass=g_one_pass)
  return rows


def _time_block(step, carry, batch, block: int, clock=time.perf_counter):
  params, state = carry
  jax.block_until_ready(params)
  start = clock()
  for _ in range(block):
    params, state, loss = step(params, state, batch)
  jax.block_until_ready((params, state, loss))
  return (clock() - start) / block, (params, state)


def bench_problem(name: str, repeats: int, block: int, only: list[str] | None,
                  clock=time.perf_counter):
  problem = get_problem(name)
  params = problem.init_params(0)
  batch = next(problem.batches(0))
  rows = _rows(problem)
  if only:
    rows = {k: v for k, v in rows.items() if k in only or k == "adamw"}
  compiled, carries = {}, {}
  for row, factory in rows.items():
    init, step = factory()
    compiled[row] = step
    carries[row] = (params, init(params))
    # Compile and warm up over one whole block (so Sophia's refresh branch ran too).
    _, carries[row] = _time_block(compiled[row], carries[row], batch, block)
  times: dict[str, list[float]] = {row: [] for row in rows}
  for _ in range(repeats):
    for row in rows:                       # interleaved: load drifts hit every row alike
      t, carries[row] = _time_block(compiled[row], carries[row], batch, block, clock)
      times[row].append(t)
  medians = {row: statistics.median(ts) for row, ts in times.items()}
  return {row: (medians[row], medians[row] / medians["adamw"],
                min(ts) / min(times["adamw"])) for row, ts in times.items()}


def _table(results: dict[str, dict]) -> str:
  lines = ["| problem | row | ms / step (median) | x adamw (median) | x adamw (best) | target |",
           "|---|---|---:|---:|---:|---|"]
  for problem, rows in results.items():
    for row, (t, ratio, best) in rows.items():
      target = TARGETS.get(row)
      verdict = "" if target is None else f"<= {target} {'ok' if ratio <= target else 'MISSED'}"
      lines.append(f"| {problem} | {row} | {1e3 * t:.2f} | {ratio:.2f} | {best:.2f} | {verdict} |")
  return "\n".join(lines)


def _plot(results: dict[str, dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  problems = list(results)
  rows = [r for r in results[problems[0]] if r != "adamw"]
  fig, ax = plt.subplots(figsize=(8, 3.5))
  width = 0.8 / max(len(problems), 1)
  for i, problem in enumerate(problems):
    ratios = [results[problem].get(r, (0, float("nan"), 0))[1] for r in rows]
    ax.bar([j + i * width for j in range(len(rows))], ratios, width, label=problem)
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set_xticks([j + width * (len(problems) - 1) / 2 for j in range(len(rows))], rows,
                rotation=20, fontsize=8)
  ax.set_ylabel("step time / adamw")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--problems", default="char_transformer,digits_cnn")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--block", type=int, default=20, help="steps per timed block (multiple of 10)")
  parser.add_argument("--only", default="", help="comma-separated rows (adamw always runs)")
  parser.add_argument("--out", default="bench_out")
  parser.add_argument("--no-plot", action="store_true")
  parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                      help="wall time, or CPU time of this process (with --single-thread: the "
                           "compute itself, unaffected by other processes on the machine)")
  parser.add_argument("--single-thread", action="store_true",
                      help="run XLA's CPU kernels on one thread (less sensitive to other load)")
  args = parser.parse_args(argv)
  if args.single_thread:   # before the first computation initialises the backend
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  clock = time.perf_counter if args.clock == "wall" else time.process_time
  if args.block % 10:
    parser.error("--block must be a multiple of 10 (Sophia's refresh interval)")
  only = [s for s in args.only.split(",") if s] or None
  results = {}
  for name in args.problems.split(","):
    results[name] = bench_problem(name, args.repeats, args.block, only, clock)
  print(f"device: {jax.devices()[0].device_kind}, {args.repeats} rounds of {args.block} steps, "
        f"{args.clock} clock{', single-threaded XLA' if args.single_thread else ''}\n")
  print(_table(results))
  if not args.no_plot:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "diag_methods_step_time.png")
    _plot(results, path)
    print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
