"""Cost of the curvature products relative to one gradient.

A tanh MLP of about one million parameters (512 -> 1024 -> 512 -> 10) on a batch of 256,
mean softmax cross-entropy. Every function is jitted; each round times each function (the
fastest of `--inner` consecutive calls, which filters out preemption by other processes),
in a shuffled order, so that load on the machine hits all of them alike. The table reports
the median over rounds of (time of the product / time of the gradient in the same round),
the median time, and XLA's flop count of each compiled function relative to the gradient's
(independent of load).

    python3 -m benchmarks.curvature_cost --repeats 30 --out bench_out
    # on a machine busy with other work: one XLA thread, CPU time of this process
    python3 -m benchmarks.curvature_cost --repeats 30 --single-thread --clock cpu
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from secondorder.curvature.estimators import gnb_diag, hutchinson_diag
from secondorder.curvature.losses import softmax_cross_entropy
from secondorder.curvature.products import gnvp, hvp, value_grad_hvp

LAYERS = (512, 1024, 512, 10)
BATCH = 256


def make_problem(seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), len(LAYERS) + 2)
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(LAYERS[:-1], LAYERS[1:])):
    params[f"dense{i}"] = {
        "w": jax.random.normal(keys[i], (fan_in, fan_out)) / np.sqrt(fan_in),
        "b": jnp.zeros((fan_out,)),
    }
  x = jax.random.normal(keys[-2], (BATCH, LAYERS[0]))
  y = jax.random.randint(keys[-1], (BATCH,), 0, LAYERS[-1])

  def logits_fn(p):
    h = x
    for i in range(len(LAYERS) - 1):
      h = h @ p[f"dense{i}"]["w"] + p[f"dense{i}"]["b"]
      if i < len(LAYERS) - 2:
        h = jnp.tanh(h)
    return h

  def loss_fn(p):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), y))

  return params, logits_fn, loss_fn


def candidates(logits_fn, loss_fn):
  """name -> jitted function of (params, v, key)."""
  ce = softmax_cross_entropy()
  return {
      "grad (baseline)": jax.jit(lambda p, v, k: jax.grad(loss_fn)(p)),
      "hvp": jax.jit(lambda p, v, k: hvp(loss_fn, p, v)),
      "hvp (reverse-over-forward)": jax.jit(
          lambda p, v, k: hvp(loss_fn, p, v, mode="reverse_over_forward")),
      "value_grad_hvp": jax.jit(lambda p, v, k: value_grad_hvp(loss_fn, p, v)),
      "gnvp (softmax CE)": jax.jit(lambda p, v, k: gnvp(logits_fn, ce, p, v)),
      "hutchinson_diag": jax.jit(lambda p, v, k: hutchinson_diag(loss_fn, p, k)),
      "gnb_diag": jax.jit(lambda p, v, k: gnb_diag(logits_fn, p, k)),
  }


TARGETS = {"hvp": 2.3, "gnvp (softmax CE)": 1.6, "gnb_diag": 1.1}


def _flops(fn, *args) -> float | None:
  """XLA's flop count of the compiled function (a deterministic cross-check of the timings)."""
  try:
    cost = fn.lower(*args).compile().cost_analysis()
  except Exception:  # cost analysis is optional for a backend
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float(cost.get("flops", 0.0)) or None


def measure(repeats: int, inner: int = 3, warmup: int = 3, seed: int = 0, clock=time.perf_counter):
  params, logits_fn, loss_fn = make_problem(seed)
  v = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape, x.dtype), params)
  fns = candidates(logits_fn, loss_fn)
  key = jax.random.key(2)
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn(params, v, key))
  times = {name: [] for name in fns}
  order = list(fns)
  rng = random.Random(seed)
  for r in range(repeats):
    rng.shuffle(order)
    k = jax.random.fold_in(key, r)
    for name in order:
      best = float("inf")
      for _ in range(inner):
        t0 = clock()
        jax.block_until_ready(fns[name](params, v, k))
        best = min(best, clock() - t0)
      times[name].append(best)
  flops = {name: _flops(fn, params, v, key) for name, fn in fns.items()}
  base = np.asarray(times["grad (baseline)"])
  rows = []
  for name, ts in times.items():
    ts = np.asarray(ts)
    ratios = ts / base
    rows.append(dict(name=name, median_ms=1e3 * float(np.median(ts)),
                     ratio=float(np.median(ratios)),
                     ratio_q25=float(np.quantile(ratios, 0.25)),
                     ratio_q75=float(np.quantile(ratios, 0.75)),
                     flops_ratio=(flops[name] / flops["grad (baseline)"]
                                  if flops[name] and flops["grad (baseline)"] else None),
                     target=TARGETS.get(name)))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  return rows, n_params


def markdown(rows, n_params, repeats, inner, clock_name="wall"):
  lines = [
      f"Curvature cost on a tanh MLP {LAYERS} ({n_params:,} parameters), batch {BATCH}, "
      f"{repeats} interleaved rounds (each the fastest of {inner} calls), {clock_name} clock, "
      f"backend {jax.default_backend()}"
      f"{' (single-threaded XLA)' if 'intra_op_parallelism_threads=1' in os.environ.get('XLA_FLAGS', '') else ''}.",
      "",
      f"| function | median {clock_name} time (ms) | × grad (median) | IQR of ratio | XLA flops × grad | target |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    target = f"≤ {r['target']}×" if r["target"] else ""
    flops = f"{r['flops_ratio']:.2f}" if r["flops_ratio"] else "n/a"
    lines.append(f"| {r['name']} | {r['median_ms']:.2f} | {r['ratio']:.2f} | "
                 f"{r['ratio_q25']:.2f}–{r['ratio_q75']:.2f} | {flops} | {target} |")
  return "\n".join(lines)


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3))
  names = [r["name"] for r in rows]
  ax.barh(names, [r["ratio"] for r in rows],
          xerr=[[r["ratio"] - r["ratio_q25"] for r in rows],
                [r["ratio_q75"] - r["ratio"] for r in rows]], color="tab:blue")
  for i, r in enumerate(rows):
    if r["target"]:
      ax.plot([r["target"]] * 2, [i - 0.4, i + 0.4], color="tab:red")
  ax.set_xlabel("time / time of one gradient (median)")
  ax.invert_yaxis()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=30, help="interleaved rounds (>= 20 advised)")
  parser.add_argument("--inner", type=int, default=3,
                      help="calls per function and round; the round keeps the fastest")
  parser.add_argument("--out", default="bench_out", help="directory for the JSON and PNG")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-plot", action="store_true")
  parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                      help="wall: elapsed time; cpu: CPU time of this process (with "
                           "--single-thread, the compute itself, unaffected by preemption)")
  parser.add_argument("--single-thread", action="store_true",
                      help="run XLA's CPU kernels on one thread (less sensitive to other load)")
  args = parser.parse_args(argv)
  if args.single_thread:
    # Read when the backend starts, i.e. at the first computation below.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  clock = time.perf_counter if args.clock == "wall" else time.process_time
  rows, n_params = measure(args.repeats, inner=args.inner, seed=args.seed, clock=clock)
  table = markdown(rows, n_params, args.repeats, args.inner, args.clock)
  print(table)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "curvature_cost.json"), "w") as fh:
    json.dump(dict(rows=rows, n_params=n_params, repeats=args.repeats, inner=args.inner,
                   clock=args.clock, single_thread=args.single_thread,
                   layers=LAYERS,
                   batch=BATCH, backend=jax.default_backend()), fh, indent=2)
  with open(os.path.join(args.out, "curvature_cost.md"), "w") as fh:
    fh.write(table + "\n")
  if not args.no_plot:
    plot(rows, os.path.join(args.out, "curvature_cost.png"))


if __name__ == "__main__":
  main()
