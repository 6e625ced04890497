"""Shampoo against Adam (and Google's Distributed Shampoo) on the digits MLP / CNN and the
character transformer.

    python3 -m benchmarks.shampoo_bench                 # all three problems, DS if available
    python3 -m benchmarks.shampoo_bench --problems digits_mlp --steps 300 --no-ds
    python3 -m benchmarks.shampoo_bench --update-interval 20 --statistics-interval 5
    python3 -m benchmarks.shampoo_bench --root-bucket-ratio 4 --no-ds   # + padded root calls
    python3 -m benchmarks.shampoo_bench --root-calls tiny   # root calls: scanned vs unrolled LM

For every problem, in one process: a small learning-rate grid per optimizer on seed 0 (the
best setting is the one that reaches the problem's target training loss in the fewest
steps), then the step times measured interleaved across optimizers (rounds of blocks of
`2 * update_interval` steps, so the periodic root computation is in every block; median over
rounds), the optimizer-state bytes and the compile time of the training step. Everything is
reported as a ratio of Adam's from the same process. "Time to target" is steps to target
times the median step time (the training runs themselves also evaluate the full training
loss, which is not optimizer time).

Distributed Shampoo (`optax-shampoo` 0.0.6, the reference JAX implementation) does not run
on current JAX as published; `benchmarks.peers.distributed_shampoo` loads it with a small
load-time patch (nothing in site-packages is edited), and `pip install
optax-shampoo==0.0.6` (in the `bench` extra) adds no other package. When it is installed,
its rows run in the same process: Distributed Shampoo, this library's Shampoo and Adam
timed interleaved, at the same root refresh interval, block size, statistics decay and
start step (`--no-ds` leaves them out).

`--root-calls SIZE` only counts Shampoo's batched root calls per refresh in the compiled
update on the language model's scan-over-layers transformer (`benchmarks.lm`), read through
its dimension numbers, against the same parameters unrolled into one leaf per layer. On
`tiny` (block size 128): the kernels cost 3 calls either way (stacks 14x32x32, 2x96x96,
6x128x128); the stacked norm scales and biases `[layers, d]`, which no
`MuonDimensionNumbers` can declare, are read by their rank and add 2 calls (5 against 3).

Writes `<out>/shampoo_bench.md` and `<out>/shampoo_bench.png` (default `bench_out/`).
"""

from __future__ import annotations

import os

# Multithreaded OpenBLAS (behind jnp.linalg.eigh on CPU) slows down by 10-100x when the
# cores are shared; one LAPACK thread gives stable timings. Set before numpy/jax load it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import dataclasses
import json
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.problems import get_problem
from benchmarks.runner import state_bytes

DEFAULT_PROBLEMS = ("digits_mlp", "digits_cnn", "char_transformer")
LR_GRID = {"adam": (1e-3, 3e-3, 1e-2, 3e-2), "shampoo": (1e-3, 3e-3, 1e-2, 3e-2),
           "dist_shampoo": (1e-4, 3e-4, 1e-3)}  # its normalized-RMSProp graft runs hot
LR_GRID["shampoo_buckets"] = LR_GRID["shampoo"]


# ----------------------------------------------------------------------------- optimizers


def _shampoo(lr, cfg, root_bucket_ratio=None):
  from secondorder.transforms.shampoo import shampoo
  return shampoo(lr, block_size=cfg["block_size"], update_interval=cfg["update_interval"],
                 statistics_interval=cfg["statistics_interval"],
                 start_preconditioning_step=cfg["start"], b2=cfg["b2"],
                 root_bucket_ratio=root_bucket_ratio)


def _shampoo_buckets(lr, cfg):
  """The same Shampoo with factors of nearby sizes padded into shared root calls."""
  return _shampoo(lr, cfg, cfg["root_bucket_ratio"])


def _adam(lr, cfg):
  del cfg
  return optax.adam(lr)


def _dist_shampoo(lr, cfg):
  from benchmarks.peers import distributed_shampoo
  ds = distributed_shampoo()
  return ds.distributed_shampoo(
      learning_rate=lr, block_size=cfg["block_size"], beta1=0.9, beta2=cfg["b2"],
      preconditioning_compute_steps=cfg["update_interval"],
      statistics_compute_steps=cfg["statistics_interval"],
      start_preconditioning_step=cfg["start"], graft_type=ds.GraftingType.RMSPROP_NORMALIZED,
      nesterov=False, generate_training_metrics=False)


OPTIMIZERS: dict[str, Callable] = {"adam": _adam, "shampoo": _shampoo,
                                   "shampoo_buckets": _shampoo_buckets,
                                   "dist_shampoo": _dist_shampoo}


# ----------------------------------------------------------------------------- measurement


class _Compiled:
  """One optimizer on one problem: the step compiled once, the learning rate an argument."""

  def __init__(self, name: str, problem, cfg: dict):
    self.name, self.problem = name, problem
    make = lambda lr: OPTIMIZERS[name](lr, cfg)
    params = problem.init_params(0)
    batch = next(problem.batches(0))
    lr0 = jnp.asarray(LR_GRID[name][0], jnp.float32)

    def init(params, lr):
      return make(lr).init(params)

    def step(params, state, batch, lr):
      loss, grads = jax.value_and_grad(problem.loss)(params, batch)
      updates, state = make(lr).update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

    self.init = jax.jit(init)
    state = self.init(params, lr0)
    t0 = time.perf_counter()
    self.step = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, batch, lr0).compile()
    self.compile_s = time.perf_counter() - t0
    self.state_bytes = state_bytes(state)
    self.param_bytes = state_bytes(params)


def _train(c: _Compiled, lr: float, steps: int, eval_every: int):
  """Steps until the full training loss reaches the target (or `steps`): (steps, curve)."""
  problem = c.problem
  params = problem.init_params(0)
  lr = jnp.asarray(lr, jnp.float32)
  state = c.init(params, lr)
  batches = problem.batches(0)
  train_loss = jax.jit(problem.train_loss)
  curve = [(0, float(train_loss(params)))]
  for t in range(1, steps + 1):
    params, state, _ = c.step(params, state, next(batches), lr)
    if t % eval_every == 0 or t == steps:
      value = float(train_loss(params))
      curve.append((t, value))
      if not np.isfinite(value):
        return None, curve
      if value <= problem.target_loss:
        return t, curve
  return None, curve


def _time_steps(compiled: list[_Compiled], block: int, rounds: int) -> dict[str, float]:
  """Median seconds per step, blocks interleaved across optimizers."""
  runs = {}
  for c in compiled:
    params = c.problem.init_params(0)
    lr = jnp.asarray(LR_GRID[c.name][0], jnp.float32)
    runs[c.name] = [params, c.init(params, lr), lr, c.problem.batches(1)]
  for c in compiled:  # warm-up: one block each
    r = runs[c.name]
    for _ in range(block):
      r[0], r[1], loss = c.step(r[0], r[1], next(r[3]), r[2])
    loss.block_until_ready()
  times: dict[str, list[float]] = {c.name: [] for c in compiled}
  for _ in range(rounds):
    for c in compiled:
      r = runs[c.name]
      batches = [next(r[3]) for _ in range(block)]
      jax.block_until_ready(batches)
      t0 = time.perf_counter()
      for b in batches:
        r[0], r[1], loss = c.step(r[0], r[1], b, r[2])
      loss.block_until_ready()
      times[c.name].append((time.perf_counter() - t0) / block)
  return {k: float(np.median(v)) for k, v in times.items()}


def run_problem(name: str, optimizers: list[str], cfg: dict, steps: int | None,
                rounds: int, eval_every: int, sweep: bool = True,
                target: float | None = None) -> dict[str, Any]:
  problem = get_problem(name)
  if target is not None:
    problem = dataclasses.replace(problem, target_loss=target)
  steps = steps or problem.steps["full"]
  compiled = [_Compiled(o, problem, cfg) for o in optimizers]
  rows = {}
  for c in compiled:
    best = None
    grid = LR_GRID[c.name] if sweep or c.name == "dist_shampoo" else LR_GRID[c.name][1:2]
    for lr in grid:
      n, curve = _train(c, lr, steps, eval_every)
      key = (n if n is not None else steps + 1, curve[-1][1])
      if best is None or key < best[0]:
        best = (key, lr, n, curve)
    rows[c.name] = {"lr": best[1], "steps_to_target": best[2], "curve": best[3],
                    "compile_s": c.compile_s, "state_bytes": c.state_bytes,
                    "param_bytes": c.param_bytes}
  step_s = _time_steps(compiled, block=2 * cfg["update_interval"], rounds=rounds)
  for o in optimizers:
    rows[o]["step_s"] = step_s[o]
    n = rows[o]["steps_to_target"]
    rows[o]["time_to_target_s"] = None if n is None else n * step_s[o]
  return {"problem": name, "target": problem.target_loss, "steps": steps, "rows": rows}


# ----------------------------------------------------------------------------- report


def _ratio(a, b):
  return None if a is None or b is None or b == 0 else a / b


def _f(x, fmt="{:.2f}"):
  return "—" if x is None else fmt.format(x)


def markdown(results: list[dict], cfg: dict) -> str:
  lines = [
      f"Shampoo (block {cfg['block_size']}, roots every {cfg['update_interval']} steps, "
      f"statistics every {cfg['statistics_interval']}, "
      f"start step {cfg['start']}, Adam grafting"
      + (f"; shampoo_buckets: the same with root_bucket_ratio={cfg['root_bucket_ratio']:g}"
         if cfg.get("root_bucket_ratio") else "")
      + ") vs optax.adam; ratios are to Adam in the "
      "same process. Time to target = steps to target × median step time.", "",
      "| problem | optimizer | lr | steps to target | ×Adam | time to target | ×Adam | "
      "step ms | ×Adam | state bytes | ×Adam | ×params | compile s | ×Adam |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for res in results:
    adam = res["rows"].get("adam")
    for name, r in res["rows"].items():
      a = adam if adam is not None else r
      lines.append(
          f"| {res['problem']} | {name} | {r['lr']:g} | {_f(r['steps_to_target'], '{}')} | "
          f"{_f(_ratio(r['steps_to_target'], a['steps_to_target']))} | "
          f"{_f(r['time_to_target_s'], '{:.3f} s')} | "
          f"{_f(_ratio(r['time_to_target_s'], a['time_to_target_s']))} | "
          f"{r['step_s'] * 1e3:.3f} | {_f(_ratio(r['step_s'], a['step_s']))} | "
          f"{r['state_bytes']:,} | {_f(_ratio(r['state_bytes'], a['state_bytes']))} | "
          f"{_f(r['state_bytes'] / r['param_bytes'])} | {r['compile_s']:.2f} | "
          f"{_f(_ratio(r['compile_s'], a['compile_s']))} |")
  return "\n".join(lines)


def markdown_ds(results: list[dict], cfg: dict) -> str:
  lines = [
      f"Distributed Shampoo (optax-shampoo 0.0.6, patched) vs this library's Shampoo, same "
      f"process, both with block {cfg['block_size']}, roots every {cfg['update_interval']} "
      "steps.", "",
      "| problem | DS step ms | Shampoo step ms | Shampoo ÷ DS step | DS state bytes | "
      "Shampoo state bytes | Shampoo ÷ DS state | DS ×params | DS steps to target | "
      "DS compile s | Shampoo compile s |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for res in results:
    d, s = res["rows"]["dist_shampoo"], res["rows"]["shampoo"]
    lines.append(
        f"| {res['problem']} | {d['step_s'] * 1e3:.3f} | {s['step_s'] * 1e3:.3f} | "
        f"{s['step_s'] / d['step_s']:.2f} | {d['state_bytes']:,} | {s['state_bytes']:,} | "
        f"{s['state_bytes'] / d['state_bytes']:.2f} | "
        f"{d['state_bytes'] / d['param_bytes']:.1f} | {_f(d['steps_to_target'], '{}')} | "
        f"{d['compile_s']:.2f} | {s['compile_s']:.2f} |")
  return "\n".join(lines)


def plot(path: str, results: list[dict]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
  for ax, res in zip(axes[0], results):
    for name, r in res["rows"].items():
      steps, losses = zip(*r["curve"])
      ax.plot(np.asarray(steps) * r["step_s"] * 1e3, losses, label=f"{name} (lr {r['lr']:g})")
    ax.axhline(res["target"], color="gray", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer time (ms) = steps × median step time")
    ax.set_ylabel("training loss")
    ax.set_title(res["problem"])
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- entry point


def _ds_rows(args, cfg) -> list[dict] | None:
  try:
    from benchmarks.peers import distributed_shampoo
    distributed_shampoo()
  except ImportError as err:
    print(f"Distributed Shampoo rows skipped ({err}); pip install optax-shampoo==0.0.6")
    return None
  steps = min(args.steps or 10**9, args.ds_steps)
  return [run_problem(p, ["adam", "shampoo", "dist_shampoo"], cfg, steps, args.rounds,
                      args.eval_every, sweep=False, target=args.target.get(p))
          for p in args.problems]


def _targets(text: str) -> dict[str, float]:
  out = {}
  for item in filter(None, text.split(",")):
    name, sep, value = item.partition("=")
    try:
      out[name.strip()] = float(value)
    except ValueError:
      sep = ""
    if not sep:
      raise argparse.ArgumentTypeError(f"--target wants PROBLEM=LOSS[,...], got {item!r}")
  return out


def _compiled_root_calls(tx, params) -> int:
  """Eigendecompositions (LAPACK syevd custom calls) in the compiled update: with
  `update_interval=1` and `method="eigh"`, the batched root calls of one refresh."""
  hlo = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
  return sum("custom-call" in line and "syevd" in line for line in hlo.splitlines())


def root_calls(size: str = "tiny", block_size: int = 128) -> list[dict]:
  """Shampoo's root calls per refresh on the language model's scan-over-layers transformer
  (`benchmarks.lm.DecoderLM`, blocks stacked on a layer axis) against the same parameters
  unrolled into one leaf per layer, counted in the compiled HLO.

  The scanned model reads its block kernels through `lm.weight_dimension_numbers`; the
  stacked norm scales and biases `[layers, d]` have no reduction axis to declare and are
  read by their rank (a `layers x layers` factor each), so the row "kernels only" keeps
  them out of the tree to count what the dimension numbers decide.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from benchmarks import lm  # pylint: disable=g-import-not-at-top
  from secondorder import linalg  # pylint: disable=g-import-not-at-top
  from secondorder.dimension_numbers import resolve_leaf_axes  # pylint: disable=g-import-not-at-top
  from secondorder.transforms._blocks import make_plan  # pylint: disable=g-import-not-at-top
  from secondorder.transforms.shampoo import (  # pylint: disable=g-import-not-at-top
      shampoo_preconditioner)

  config = lm.SIZES[size]
  model = lm.DecoderLM(config, rngs=nnx.Rngs(0))
  scanned = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  layers = config.layers

  def unroll(tree):
    out = {k: v for k, v in tree.items() if k != "blocks"}
    for i in range(layers):
      out[f"block{i}"] = jax.tree.map(lambda x: x[i], tree["blocks"])
    return out

  def kernels_only(tree):
    """The tree without the blocks' stacked vectors (norm scales, biases)."""
    def strip(node):
      if isinstance(node, dict):
        out = {k: strip(v) for k, v in node.items()}
        return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}
      return node if node.ndim == 3 else {}
    return {**tree, "blocks": strip(tree["blocks"])}

  kw = dict(block_size=block_size, update_interval=1, method="eigh")
  rows = []
  old = linalg.CPU_ONE_AT_A_TIME
  linalg.CPU_ONE_AT_A_TIME = 10**9  # one batched call per stack, as on an accelerator
  try:
    for name, params, dims in [
        ("scanned, weight_dimension_numbers", scanned, lm.weight_dimension_numbers),
        ("unrolled, one leaf per layer", unroll(scanned), None),
        ("scanned, read by rank", scanned, None),
        ("scanned kernels only, weight_dimension_numbers", kernels_only(scanned),
         lm.weight_dimension_numbers),
        ("unrolled kernels only", unroll(kernels_only(scanned)), None)]:
      tx = shampoo_preconditioner(weight_dimension_numbers=dims, **kw)
      leaves = jax.tree.leaves(params)
      plan = make_plan(tuple(x.shape for x in leaves), tuple(resolve_leaf_axes(dims, params)),
                       block_size=block_size, max_dim=4096)
      rows.append({"model": name, "root_calls": _compiled_root_calls(tx, params),
                   "factor_stacks": [f"{n}x{s}x{s}" for (s, _), n in
                                     zip(plan.groups, plan.group_sizes)]})
  finally:
    linalg.CPU_ONE_AT_A_TIME = old
  return rows


def markdown_root_calls(rows: list[dict], size: str, block_size: int) -> str:
  lines = [f"Shampoo root calls per refresh, language model `{size}` (block size {block_size}; "
           "compiled HLO, method=eigh)", "",
           "| parameters | root calls | factor stacks [n x s x s] |", "|---|---|---|"]
  lines += [f"| {r['model']} | {r['root_calls']} | {', '.join(r['factor_stacks'])} |"
            for r in rows]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--problems", type=lambda s: s.split(","), default=list(DEFAULT_PROBLEMS))
  parser.add_argument("--steps", type=int, default=None,
                      help="at most; default: the problem's 'full' count (runs stop at the "
                           "target)")
  parser.add_argument("--update-interval", type=int, default=10)
  parser.add_argument("--statistics-interval", type=int, default=1,
                      help="steps between Kronecker statistics updates (a divisor of the "
                           "update interval), for both Shampoos")
  parser.add_argument("--block-size", type=int, default=128)
  parser.add_argument("--start", type=int, default=10)
  parser.add_argument("--root-bucket-ratio", type=float, default=None,
                      help="add a shampoo_buckets row: this library's Shampoo with factors "
                           "of nearby sizes padded into shared root calls (smaller program, "
                           "slower refreshes), timed in the same rounds")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--eval-every", type=int, default=10)
  parser.add_argument("--out", default="bench_out")
  parser.add_argument("--no-ds", action="store_true")
  parser.add_argument("--target", type=_targets, default={},
                      help="training-loss targets instead of the problems' own, e.g. "
                           "digits_mlp=0.01,char_transformer=2.4")
  parser.add_argument("--ds-steps", type=int, default=500,
                      help="step cap for the Distributed Shampoo comparison (3 optimizers)")
  parser.add_argument("--root-calls", default=None, metavar="SIZE",
                      help="only count Shampoo's root calls per refresh on the language "
                           "model of this size (tiny, cpu, gpu), scanned against unrolled")
  args = parser.parse_args(argv)
  if args.root_calls:
    rows = root_calls(args.root_calls, args.block_size)
    print(markdown_root_calls(rows, args.root_calls, args.block_size))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "shampoo_root_calls.json"), "w") as f:
      json.dump(rows, f, indent=1)
    return
  cfg = {"block_size": args.block_size, "update_interval": args.update_interval,
         "statistics_interval": args.statistics_interval, "start": args.start, "b2": 0.999,
         "root_bucket_ratio": args.root_bucket_ratio}

  # A later row reuses JAX's tracing caches of an earlier one: the buckets row is compiled
  # before the default Shampoo, so the comparison does not flatter the buckets.
  ours = ["adam"] + (["shampoo_buckets"] if args.root_bucket_ratio else []) + ["shampoo"]
  results = [run_problem(p, ours, cfg, args.steps, args.rounds,
                         args.eval_every, target=args.target.get(p)) for p in args.problems]
  print(markdown(results, cfg), flush=True)
  report = markdown(results, cfg)
  ds = None if args.no_ds else _ds_rows(args, cfg)
  if ds is not None:
    report += "\n\n" + markdown_ds(ds, cfg)
  print(report if ds is None else markdown_ds(ds, cfg))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "shampoo_bench.md"), "w") as f:
    f.write(report + "\n")
  with open(os.path.join(args.out, "shampoo_bench.json"), "w") as f:
    json.dump({"results": results, "dist_shampoo": ds, "config": cfg}, f)
  plot(os.path.join(args.out, "shampoo_bench.png"), results)


if __name__ == "__main__":
  main()
