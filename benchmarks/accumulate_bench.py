"""Gradient accumulation in the moments vs optax.MultiSteps: memory, speed, and the published comparison.

  python3 -m benchmarks.accumulate_bench                 # all three parts, writes bench_out/
  python3 -m benchmarks.accumulate_bench --only memory,speed --size 1000000
  python3 -m benchmarks.accumulate_bench --only experiment --updates 100 --seeds 1

(a) memory: optimizer-state bytes on a parameter pytree of --size parameters (default 10M),
    summed over the state's leaves from `jax.eval_shape` (nothing is allocated), as ratios
    to plain Adam measured in the same run.
(b) speed: seconds per update call, jitted with the state donated, for MultiSteps and for
    the buffer-free version, interleaved repeats, medians; once on mini-steps only (k so
    large that no boundary occurs) and once averaged over whole cycles of k calls.
(c) the published experiment (docs/methods/accumulation.md): the digits MLP classifier of
    `benchmarks.problems` at a small mini-batch, with no accumulation, MultiSteps(adam),
    every_k_accumulate (accumulated_adamw), the β̃ variant with the gate, β̃ alone, and the
    gate alone; the same examples for all, a small learning-rate sweep, loss on the full
    training set against parameter updates and against examples seen.

Writes OUT/accumulate.md (the tables) and OUT/accumulate.png (the curves).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from secondorder.transforms.accumulate import (
    accumulated_adamw,
    accumulated_sgd,
    every_k_accumulate,
    every_k_gate,
    scale_by_adam_beta_tilde,
)

# ----------------------------------------------------------------------------- (a) memory


def param_tree(size: int) -> dict:
  """Shapes of a transformer-like pytree with `size` parameters (no arrays are created)."""
  d = int(np.sqrt(size / 12.5))  # 4 d^2 + 8 d^2 + d^2/2 ≈ size
  shapes = {"attn": (d, 4 * d), "mlp_in": (d, 4 * d), "mlp_out": (4 * d, d), "head": (d, d // 2)}
  used = sum(int(np.prod(s)) for s in shapes.values())
  shapes["bias"] = (max(size - used, 1),)
  return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}


def state_bytes(tx: optax.GradientTransformation, params) -> int:
  state = jax.eval_shape(tx.init, params)
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


def memory_rows(size: int, k: int) -> list[tuple[str, int]]:
  params = param_tree(size)
  lr = 1e-3
  txs = [
      ("adam", optax.adam(lr)),
      ("MultiSteps(adam)", optax.MultiSteps(optax.adam(lr), k)),
      ("every_k_accumulate (Adam form)", every_k_accumulate(k)),
      ("accumulated_adamw", accumulated_adamw(lr, k)),
      ("sgd(momentum)", optax.sgd(lr, momentum=0.9)),
      ("MultiSteps(sgd(momentum))", optax.MultiSteps(optax.sgd(lr, momentum=0.9), k)),
      ("accumulated_sgd", accumulated_sgd(lr, k, momentum=0.9)),
  ]
  return [(name, state_bytes(tx, params)) for name, tx in txs]


def memory_table(rows, size: int) -> str:
  adam = dict(rows)["adam"]
  msteps = dict(rows)["MultiSteps(adam)"]
  lines = [f"### Optimizer-state bytes, {size:,} float32 parameters",
           "", "| optimizer | state bytes | / adam | / MultiSteps(adam) |", "|---|---:|---:|---:|"]
  for name, b in rows:
    lines.append(f"| {name} | {b:,} | {b / adam:.4f} | {b / msteps:.4f} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- (b) speed


def _timed_block(step, state, grads, params, calls: int):
  t0 = time.perf_counter()
  for _ in range(calls):
    _, state = step(grads, state, params)
  jax.block_until_ready(state)
  return (time.perf_counter() - t0) / calls, state


def speed_rows(size: int, k: int, repeats: int, seed: int = 0) -> list[tuple[str, str, float]]:
  """(setting, optimizer, median seconds per call) with interleaved repeats."""
  shapes = param_tree(size)
  keys = jax.random.split(jax.random.key(seed), 2 * len(shapes))
  params = {n: jax.random.normal(kk, s.shape, s.dtype)
            for kk, (n, s) in zip(keys[::2], shapes.items())}
  grads = {n: jax.random.normal(kk, s.shape, s.dtype)
           for kk, (n, s) in zip(keys[1::2], shapes.items())}
  lr = 1e-3
  never = 10**9  # k with no boundary within the run: every call is a mini-step

  def cases(kk):
    return {
        "adam (no accumulation)": optax.adam(lr),
        "MultiSteps(adamw)": optax.MultiSteps(optax.adamw(lr), kk),
        "accumulated_adamw": accumulated_adamw(lr, kk),
        "MultiSteps(sgd(momentum))": optax.MultiSteps(optax.sgd(lr, momentum=0.9), kk),
        "accumulated_sgd": accumulated_sgd(lr, kk, momentum=0.9),
    }

  results = []
  for setting, kk, calls in (("mini-steps only", never, k), (f"whole cycles (k={k})", k, k)):
    runners = {}
    for name, tx in cases(kk).items():
      step = jax.jit(tx.update, donate_argnums=1)
      state = tx.init(params)
      _, state = _timed_block(step, state, grads, params, calls)  # compile + warm up
      runners[name] = [step, state, []]
    names = list(runners)
    for r in range(repeats):
      for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
        step, state, times = runners[name]
        dt, runners[name][1] = _timed_block(step, state, grads, params, calls)
        times.append(dt)
    results += [(setting, n, statistics.median(runners[n][2])) for n in names]
    del runners
  return results


def speed_table(rows, size: int, repeats: int) -> str:
  lines = [f"### Seconds per update call, {size:,} float32 parameters "
           f"({jax.devices()[0].platform}, median of {repeats} interleaved repeats)", "",
           "| setting | optimizer | s / call | / MultiSteps (same inner) |",
           "|---|---|---:|---:|"]
  by = {(s, n): t for s, n, t in rows}
  base = {"accumulated_adamw": "MultiSteps(adamw)", "accumulated_sgd": "MultiSteps(sgd(momentum))"}
  for s, n, t in rows:
    ref = base.get(n)
    ratio = f"{t / by[(s, ref)]:.3f}" if ref else "-"
    lines.append(f"| {s} | {n} | {t:.3e} | {ratio} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- (c) experiment


def seed_methods(k: int) -> dict[str, Callable[[float], optax.GradientTransformation]]:
  """The published comparison; each entry maps a learning rate to an optimizer over mini-steps."""
  return {
      "adam, no accumulation": lambda lr: optax.adam(lr),
      "MultiSteps(adam)": lambda lr: optax.MultiSteps(optax.adam(lr), k),
      "every_k_accumulate": lambda lr: accumulated_adamw(lr, k, weight_decay=0.0),
      "β̃ + gate": lambda lr: optax.chain(scale_by_adam_beta_tilde(k), every_k_gate(k),
                                         optax.scale_by_learning_rate(lr)),
      "β̃ alone": lambda lr: optax.chain(scale_by_adam_beta_tilde(k),
                                         optax.scale_by_learning_rate(lr)),
      "gate alone": lambda lr: optax.chain(optax.adam(lr), every_k_gate(k)),
  }


def _updates_per_mini_step(name: str, k: int) -> float:
  return 1.0 if name in ("adam, no accumulation", "β̃ alone") else 1.0 / k


def _digits_data():
  from benchmarks.problems import _digits, get_problem
  prob = get_problem("digits_mlp")
  x_train, y_train, _, _ = _digits()
  return prob, x_train, y_train


def run_experiment(*, k: int = 8, mini_batch: int = 8, updates: int = 300,
                   lrs=(1e-3, 3e-3, 1e-2, 3e-2), seeds: int = 2, eval_every: int | None = None,
                   methods: dict | None = None, log: Callable[[str], None] = print) -> dict:
  """Trains every method on the same mini-batches; returns curves and the best lr of each.

  Every method sees `updates * k` mini-batches of `mini_batch` examples, so the accumulating
  ones make `updates` parameter updates at an effective batch of `k * mini_batch`.
  Returns {"k", "mini_batch", "steps", "eval_steps", "methods": {name: {"lr", "train",
  "eval", "sweep"}}} with train/eval losses [seeds, evals] at the best lr.
  """
  prob, x_train, y_train = _digits_data()
  methods = methods if methods is not None else seed_methods(k)
  steps = updates * k
  eval_every = eval_every or k * max(1, updates // 30)
  chunks = steps // eval_every
  eval_steps = np.arange(chunks + 1) * eval_every
  train_loss = jax.jit(prob.train_loss)
  eval_loss = jax.jit(prob.eval_loss)

  def data(seed):
    rng = np.random.RandomState(1000 + seed)
    idx = np.concatenate([rng.permutation(len(x_train))
                          for _ in range(steps * mini_batch // len(x_train) + 1)])
    idx = idx[: steps * mini_batch].reshape(chunks, eval_every, mini_batch)
    return jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])

  datasets = [data(s) for s in range(seeds)]
  inits = [prob.init_params(s) for s in range(seeds)]

  def train(tx, seed):
    @jax.jit
    def chunk(params, state, xs, ys):
      def step(carry, batch):
        p, s = carry
        g = jax.grad(prob.loss)(p, batch)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None
      return jax.lax.scan(step, (params, state), (xs, ys))[0]

    params = inits[seed]
    state = tx.init(params)
    xs, ys = datasets[seed]
    tr, ev = [float(train_loss(params))], [float(eval_loss(params))]
    for c in range(chunks):
      params, state = chunk(params, state, xs[c], ys[c])
      tr.append(float(train_loss(params)))
      ev.append(float(eval_loss(params)))
    return tr, ev

  out = {"k": k, "mini_batch": mini_batch, "steps": steps, "eval_steps": eval_steps,
         "methods": {}}
  for name, make in methods.items():
    sweep = {}
    for lr in lrs:
      runs = [train(make(lr), s) for s in range(seeds)]
      tr = np.asarray([r[0] for r in runs])
      ev = np.asarray([r[1] for r in runs])
      final = float(np.median(_tail_mean(tr)))
      sweep[lr] = (final if np.isfinite(final) else np.inf, tr, ev)
      log(f"  {name:24s} lr={lr:<8g} final train loss {final:.4f}")
    best = min(sweep, key=lambda lr: sweep[lr][0])
    out["methods"][name] = {"lr": best, "train": sweep[best][1], "eval": sweep[best][2],
                            "sweep": {lr: v[0] for lr, v in sweep.items()}}
  return out


def _tail_mean(curves: np.ndarray) -> np.ndarray:
  """Per seed, the mean of the last tenth of the evaluations (single points are noisy)."""
  tail = max(1, curves.shape[1] // 10)
  return curves[:, -tail:].mean(axis=1)


def experiment_table(res: dict) -> str:
  k, b = res["k"], res["mini_batch"]
  lines = [f"### Digits MLP at mini-batch {b}, k = {k} (effective batch {k * b}), "
           f"{res['steps']} mini-steps = {res['steps'] * b:,} examples for every method", "",
           "| method | updates | best lr | final train loss | final held-out loss | "
           "train loss at 1/4 of the examples |", "|---|---:|---:|---:|---:|---:|"]
  tail = max(1, len(res["eval_steps"]) // 10)
  quarter = len(res["eval_steps"]) // 4
  for name, m in res["methods"].items():
    n_upd = int(res["steps"] * _updates_per_mini_step(name, k))
    tr, ev = m["train"], m["eval"]
    spread = lambda a: (f"{np.median(a):.4f}" + (f" [{a.min():.4f}, {a.max():.4f}]"
                                                 if len(a) > 1 else ""))
    lines.append(f"| {name} | {n_upd} | {m['lr']:g} | {spread(_tail_mean(tr))} | "
                 f"{spread(_tail_mean(ev))} | {spread(tr[:, quarter])} |")
  lines.append("")
  lines.append(f"Losses on the full training set and on the held-out images; final = mean of "
               f"the last {tail} of {len(res['eval_steps'])} evaluations; median over seeds "
               "[min, max]; learning rate chosen per method by the median final training "
               "loss over the sweep " +
               ", ".join(f"{lr:g}" for lr in next(iter(res['methods'].values()))['sweep']) + ".")
  return "\n".join(lines)


def plot_experiment(res: dict, path: str | None = None):
  import matplotlib
  if path is not None:
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  k, b = res["k"], res["mini_batch"]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  for name, m in res["methods"].items():
    curve = np.median(m["train"], axis=0)
    label = f"{name} (lr {m['lr']:g})"
    ax1.plot(res["eval_steps"] * _updates_per_mini_step(name, k), curve, label=label)
    ax2.plot(res["eval_steps"] * b, curve, label=label)
  ax1.set_xscale("symlog", linthresh=10)
  ax1.set_xlabel("parameter updates")
  ax2.set_xlabel("examples seen")
  for ax in (ax1, ax2):
    ax.set_yscale("log")
    ax.set_ylabel("training loss (full set)")
    ax.grid(alpha=0.3)
  ax2.legend(fontsize=8)
  fig.suptitle(f"digits MLP, mini-batch {b}, k = {k}")
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=120)
    plt.close(fig)
  return fig


# ----------------------------------------------------------------------------- main


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python3 -m benchmarks.accumulate_bench",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", default="memory,speed,experiment")
  parser.add_argument("--size", type=int, default=10_000_000, help="parameters for (a), (b)")
  parser.add_argument("--k", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=15, help="timing repeats for (b)")
  parser.add_argument("--mini-batch", type=int, default=8)
  parser.add_argument("--updates", type=int, default=300, help="real updates in (c)")
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2")
  parser.add_argument("--out", default="bench_out")
  parser.add_argument("--no-plots", action="store_true")
  args = parser.parse_args(argv)
  parts = set(args.only.split(","))
  os.makedirs(args.out, exist_ok=True)
  sections = [f"## Accumulation benchmarks ({jax.devices()[0].device_kind}, jax {jax.__version__})"]

  if "memory" in parts:
    sections.append(memory_table(memory_rows(args.size, args.k), args.size))
    print(sections[-1], "\n", flush=True)
  if "speed" in parts:
    rows = speed_rows(args.size, args.k, args.repeats)
    sections.append(speed_table(rows, args.size, args.repeats))
    print(sections[-1], "\n", flush=True)
  if "experiment" in parts:
    lrs = tuple(float(x) for x in args.lrs.split(","))
    res = run_experiment(k=args.k, mini_batch=args.mini_batch, updates=args.updates, lrs=lrs,
                         seeds=args.seeds)
    sections.append(experiment_table(res))
    print(sections[-1], "\n", flush=True)
    if not args.no_plots:
      plot_experiment(res, os.path.join(args.out, "accumulate.png"))
  with open(os.path.join(args.out, "accumulate.md"), "w") as f:
    f.write("\n\n".join(sections) + "\n")
  print(f"wrote {os.path.join(args.out, 'accumulate.md')}")


if __name__ == "__main__":
  main()
