"""Hessian-free, natural gradient and L-BFGS against K-FAC and Adam: steps, time and passes.

Problems (from `benchmarks.problems`): the digits autoencoder (mini-batches of 100, and
`autoencoder_full`, every step on all 1500 training images), the ill-conditioned 16x8 matrix
quadratic, the 8-dimensional chained Rosenbrock and the digits MLP classifier. Every
optimizer starts from the same parameters and sees the same batches; a run stops at its
step budget or as soon as the full training loss reaches the problem's target.

Rows, each tuned by the same rule (`bracketed`: a 3-point grid spaced by 10^0.5 around a
centre, extended by up to 4 points while the best is at an edge; best = fewest steps to
the target, then the lowest loss; a run is stopped once it has taken as many steps as the
best run so far, which cannot change the choice):
  * adam: `optax.adam`, its learning rate bracketed;
  * kfac: this library's K-FAC through the harness's registry entry (capture of the
    model's layers), its learning rate bracketed, then its damping on a 3-point grid (0.01,
    0.001, 0.1) at that rate;
  * hessian_free: `secondorder.hessian_free` (Gauss-Newton curvature; the autoencoder's
    Bernoulli pixels as 2-class softmax logits, so H_ℓ has its closed form), its initial λ
    bracketed around 1, then its CG budget on a 3-point grid (50, 5, 500) at that λ: the
    same number of runs as K-FAC's; newton_cg: `curvature="hessian"` on the quadratic and
    Rosenbrock;
  * natural_gradient: `secondorder.natural_gradient`, its KL budget bracketed;
  * lbfgs: `optax.lbfgs` with its zoom line search, through
    `optax.value_and_grad_from_state`, on the deterministic problems only (full-batch
    autoencoder, quadratic, Rosenbrock).

Columns: steps to the target, wall time to the target (every step timed to
`block_until_ready`, after two discarded calls that compile), and
forward+backward passes to the target in units of one gradient, counted as: a gradient 1; a
forward pass alone 1/3; a curvature-vector product (one CG iteration, or the warm start's
product) 1.5; so a Hessian-free step costs 1 + 1/3 (the forward pass the curvature is
linearised around) + 1.5 (CG iterations + 1) + 1/3 (the loss at the candidate), a natural
gradient step 1 + 1/3 + 1.5 CG iterations (+1.5 with a warm start), a K-FAC step 5/3 (the
capture: one forward and two backward passes), an L-BFGS step the number of value-and-
gradient evaluations of its line search. The quadratic's Newton-CG row also runs in float64
and reports the loss after each step (its minimum is 0).

Writes OUT/results.md (the tables), OUT/results.json (every run, with its curve) and
OUT/<section>.png (training loss against steps and against passes).

Usage::

  python -m benchmarks.hessian_free_bench [--out bench_out/hessian_free] [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import secondorder as so
from benchmarks import optimizers as registry
from benchmarks.problems import get_problem

GRID_FACTOR = 10 ** 0.5


# ----------------------------------------------------------------------------- runs


def run(step: Callable, params, state, batches, steps: int, full_loss: Callable,
        target: float, passes: Callable[[Any], float]) -> dict:
  """Runs `step(params, state, batch) -> (params, state)` until the target or `steps`.

  Returns the full-loss curve, the per-step times and passes, and the figures to target.
  """
  losses, times, cost = [], [], []
  first = next(batches)
  # Two calls on the first batch, discarded: the compile, and any recompile for a state whose
  # dtypes settle after one step (weakly typed scalars), stay out of the timings.
  warm = step(params, state, first)
  jax.block_until_ready(step(*warm, first))
  for t in range(steps):
    batch = first if t == 0 else next(batches)
    t0 = time.perf_counter()
    params, state = step(params, state, batch)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - t0)
    cost.append(float(passes(state)))
    losses.append(float(full_loss(params)))
    if not np.isfinite(losses[-1]) or losses[-1] <= target:
      break
  med = statistics.median(times)
  hit = len(losses) if losses[-1] <= target else None
  return dict(final=losses[-1], best=min(losses), steps_to_target=hit, curve=losses,
              cumulative_passes=np.cumsum(cost).tolist(),
              wall_to_target=None if hit is None else sum(times[:hit]),
              passes_to_target=None if hit is None else sum(cost[:hit]),
              median_step_s=med, passes_per_step=float(np.mean(cost)), steps_run=len(losses),
              params=params)


def _score(result: dict) -> tuple:
  """Order runs: reaching the target first, then fewer steps, then the lower loss."""
  hit = result["steps_to_target"]
  final = result["final"] if np.isfinite(result["final"]) else np.inf
  return (hit is None, hit if hit is not None else 0, final)


def _limit(results: dict) -> int | None:
  """The fewest steps to the target so far (None: none reached it).

  A later run is stopped there: taking more steps it could not rank above the best, so the
  choice is the one full-length runs would give, at a fraction of the cost.
  """
  hits = [r["steps_to_target"] for r in results.values() if r["steps_to_target"] is not None]
  return min(hits) if hits else None


def bracketed(run_at: Callable[[float, int | None], dict], centre: float, points: int = 3,
              max_extend: int = 4) -> tuple[float, dict, dict]:
  """The best learning rate of a grid around `centre`, extended while the best is at an edge.

  `run_at(value, limit)` runs at most `limit` steps (None: the full budget). The centre
  runs first. Returns (best rate, its result, every rate's result).
  """
  grid = [centre * GRID_FACTOR ** (i - points // 2) for i in range(points)]
  results = {}
  for lr in sorted(grid, key=lambda v: abs(np.log(v / centre))):
    results[lr] = run_at(lr, _limit(results))
  for _ in range(max_extend):
    best = min(results, key=lambda lr: _score(results[lr]))
    rates = sorted(results)
    if best == rates[0]:
      new = rates[0] / GRID_FACTOR
    elif best == rates[-1]:
      new = rates[-1] * GRID_FACTOR
    else:
      break
    results[new] = run_at(new, _limit(results))
  best = min(results, key=lambda lr: _score(results[lr]))
  return best, results[best], results


def _log(problem: str, row: str, result: dict) -> None:
  """One line per finished row (the curves stay in results.json)."""
  brief = {k: v for k, v in result.items() if k not in ("curve", "cumulative_passes", "grid")}
  print(problem, row, brief, flush=True)


# ----------------------------------------------------------------------------- steps


def plain_step(tx, loss: Callable) -> Callable:
  """A jitted step of an optimizer that needs only the gradient."""
  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def kfac_step(tx, problem) -> Callable:
  """A jitted K-FAC step through the harness's capture (`value_grad` of its registry row)."""
  spec = registry.OPTIMIZERS["kfac"]

  @jax.jit
  def step(params, carry, batch):
    state, key = carry
    key, sub = jax.random.split(key)
    _, grads, extra = spec.value_grad(problem, params, batch, state, sub)
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), (state, key)
  return step


def curvature_closures(problem, batch) -> dict:
  """`logits_fn=` (categorical logits) and `loss_fn=` (their softmax cross-entropy, equal to
  the problem's loss) of one batch."""
  logits_fn = lambda p: problem.logits_fn(p, batch)
  if problem.kind == "autoencoder":
    # Pixels in [0, 1] as the probabilities of the 2-class logits (0, z).
    x = problem.labels(batch)
    labels = jnp.stack([1.0 - x, x], axis=-1)
  else:
    labels = problem.labels(batch)
  return {"logits_fn": logits_fn, "loss_fn": so.softmax_cross_entropy(labels)}


def closure_step(tx, problem, keys: tuple[str, ...]) -> Callable:
  """A jitted step of a method that reads `logits_fn` / `loss_fn` / `obj_fn`."""
  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(problem.loss)(params, batch)
    if problem.logits_fn is not None:
      extra = curvature_closures(problem, batch)
    else:
      extra = {}
    extra["obj_fn"] = lambda p: problem.loss(p, batch)
    updates, state = tx.update(grads, state, params, **{k: extra[k] for k in keys})
    return optax.apply_updates(params, updates), state
  return step


def lbfgs_step(tx, problem) -> Callable:
  """A jitted L-BFGS step with its zoom line search on the deterministic objective."""
  objective = problem.train_loss if problem.kind != "synthetic" else problem.eval_loss
  value_and_grad = optax.value_and_grad_from_state(objective)

  @jax.jit
  def step(params, state, batch):
    del batch
    value, grads = value_and_grad(params, state=state)
    updates, state = tx.update(grads, state, params, value=value, grad=grads,
                               value_fn=objective)
    return optax.apply_updates(params, updates), state
  return step


def hf_passes(state) -> float:
  hf = optax.tree.get(state, "cg_iterations")
  return 1.0 + 1.0 / 3.0 + 1.5 * (float(hf) + 1.0) + 1.0 / 3.0


def ng_passes(state) -> float:
  return 1.0 + 1.0 / 3.0 + 1.5 * float(optax.tree.get(state, "cg_iterations"))


def lbfgs_passes(state) -> float:
  return float(optax.tree.get(state, "num_linesearch_steps"))


# ----------------------------------------------------------------------------- problems


def second_grid(run_with: Callable[[Any, int | None], dict], values: tuple,
                first: dict) -> tuple:
  """The best of `values` (a 3-point grid; `first` is values[0]'s result, already run).

  `run_with(value, limit)` as `run_at` of `bracketed`. Returns (best value, its result,
  every value's steps to target).
  """
  results = {values[0]: first}
  for value in values[1:]:
    results[value] = run_with(value, _limit(results))
  best = min(results, key=lambda v: _score(results[v]))
  return best, results[best], {f"{k:.3g}": v["steps_to_target"] for k, v in results.items()}


def _grid_summary(grid: dict) -> dict:
  return {f"{k:.3g}": v["steps_to_target"] for k, v in grid.items()}


def network_rows(problem, steps: int, lbfgs: bool, adam_centre: float, kfac_centre: float,
                 ng_centre: float, hf_cg: int, hf_reject: bool = False) -> dict:
  """Adam, K-FAC, Hessian-free, natural gradient (and L-BFGS) on a network problem.

  Tuning, the same rule for the two methods the target compares: K-FAC's learning rate and
  Hessian-free's initial λ are bracketed (`bracketed`: 3 points spaced by 10^0.5, up to 4
  more beyond a winning edge), then at that value K-FAC's damping and Hessian-free's CG
  budget each take a 3-point grid (the default, a tenth, ten times). Adam's learning rate
  and the natural gradient's KL budget are bracketed too. The `hessian_free` row takes every
  finite step (`min_rho=None`, Martens' rule); with `hf_reject`, a second row with the
  library's default rule (a step that raises the batch's loss is rejected) is tuned the same
  way.
  """
  params0 = problem.init_params(0)
  target = problem.target_loss
  full = jax.jit(problem.train_loss)
  out = {}

  def go(step, state, passes, limit=None):
    n = steps if limit is None else limit
    res = run(step, params0, state, problem.batches(0), n, full, target, passes)
    res.pop("params")
    return res

  def adam_at(lr, limit=None):
    tx = optax.adam(lr)
    return go(plain_step(tx, problem.loss), tx.init(params0), lambda s: 1.0, limit)

  lr, res, grid = bracketed(adam_at, adam_centre)
  out["adam"] = dict(res, lr=lr, grid=_grid_summary(grid))
  _log(problem.name, "adam", out["adam"])

  def kfac_at(lr, limit=None, damping=0.01):
    tx = registry.OPTIMIZERS["kfac"].build(lr, steps, problem, damping=damping)
    return go(kfac_step(tx, problem), (tx.init(params0), jax.random.key(0)),
              lambda s: 5.0 / 3.0, limit)

  lr, res, grid = bracketed(kfac_at, kfac_centre)
  damping, res, dgrid = second_grid(lambda d, n: kfac_at(lr, n, d), (0.01, 0.001, 0.1),
                                   res)
  out["kfac"] = dict(res, lr=lr, damping=damping, grid=_grid_summary(grid),
                     damping_grid=dgrid)
  _log(problem.name, "kfac", out["kfac"])

  for reject in (False, True) if hf_reject else (False,):

    def hf_at(initial_damping, limit=None, cg_max_iterations=hf_cg):
      config = dict(initial_damping=initial_damping, cg_max_iterations=cg_max_iterations,
                    min_rho=0.0 if reject else None)
      tx = so.hessian_free(**config)
      res = go(closure_step(tx, problem, ("logits_fn", "loss_fn")), tx.init(params0),
               hf_passes, limit)
      return dict(res, config=config)

    lam, res, grid = bracketed(hf_at, 1.0)
    _, res, cgrid = second_grid(lambda c, n: hf_at(lam, n, int(c)),
                                (hf_cg, hf_cg // 10, hf_cg * 10), res)
    name = "hessian_free_reject" if reject else "hessian_free"
    out[name] = dict(res, grid=_grid_summary(grid), cg_grid=cgrid)
    _log(problem.name, name, out[name])

  def ng_at(delta, limit=None):
    tx = so.natural_gradient(delta, damping=1e-3, cg_max_iterations=20)
    return go(closure_step(tx, problem, ("logits_fn",)), tx.init(params0), ng_passes, limit)

  delta, res, grid = bracketed(ng_at, ng_centre)
  out["natural_gradient"] = dict(res, kl_budget=delta, grid=_grid_summary(grid))
  _log(problem.name, "natural_gradient", out["natural_gradient"])

  if lbfgs:
    tx = optax.lbfgs()
    out["lbfgs"] = go(lbfgs_step(tx, problem), tx.init(params0), lbfgs_passes)
    _log(problem.name, "lbfgs", out["lbfgs"])
  return out


def synthetic_rows(problem, steps: int) -> dict:
  """Newton-CG, L-BFGS and Adam on a deterministic problem; Newton-CG also in float64."""
  params0 = problem.init_params(0)
  target = problem.target_loss
  full = jax.jit(problem.eval_loss)
  out = {}
  n = sum(x.size for x in jax.tree.leaves(params0))

  def go(step, state, passes, params=params0, n_steps=steps, tgt=target):
    res = run(step, params, state, problem.batches(0), n_steps, full, tgt, passes)
    return res

  def adam_at(lr, limit=None):
    tx = optax.adam(lr)
    res = go(plain_step(tx, problem.loss), tx.init(params0), lambda s: 1.0,
             n_steps=steps if limit is None else limit)
    res.pop("params")
    return res

  lr, res, grid = bracketed(adam_at, 0.03)
  out["adam"] = dict(res, lr=lr)
  _log(problem.name, "adam", out["adam"])

  tx = optax.lbfgs()
  res = go(lbfgs_step(tx, problem), tx.init(params0), lbfgs_passes)
  res.pop("params")
  out["lbfgs"] = res
  _log(problem.name, "lbfgs", res)

  newton = dict(curvature="hessian", initial_damping=1.0 if problem.name == "rosenbrock"
                else 0.0, cg_max_iterations=2 * n, cg_tol=1e-10, progress_tol=None)
  tx = so.hessian_free(**newton)
  res = go(closure_step(tx, problem, ("obj_fn",)), tx.init(params0), hf_passes)
  res.pop("params")
  out["newton_cg"] = dict(res, config=newton)
  _log(problem.name, "newton_cg", out["newton_cg"])

  if problem.name == "quadratic":
    with jax.enable_x64(True):
      p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params0)
      tx = so.hessian_free(**newton)
      step = closure_step(tx, problem, ("obj_fn",))
      state = tx.init(p64)
      gaps = []
      p = p64
      for _ in range(3):
        p, state = step(p, state, ())
        gaps.append(float(problem.eval_loss(p)))   # the minimum is 0
      out["newton_cg_float64"] = dict(loss_after_steps=gaps,
                                      cg_iterations=int(optax.tree.get(state, "cg_iterations")))
      _log(problem.name, "newton_cg float64", out["newton_cg_float64"])
  return out


# ----------------------------------------------------------------------------- report


def _fmt(v, spec="{:.3g}"):
  return "—" if v is None else spec.format(v)


def _setting(r: dict) -> str:
  """The tuned hyperparameters of a row, in words."""
  parts = []
  if "lr" in r:
    parts.append(f"lr {r['lr']:.3g}")
  if "damping" in r:
    parts.append(f"damping {r['damping']:.3g}")
  if "kl_budget" in r:
    parts.append(f"δ {r['kl_budget']:.3g}")
  config = r.get("config", {})
  if "initial_damping" in config:
    parts.append(f"λ₀ {config['initial_damping']:.3g}")
  if "cg_max_iterations" in config:
    parts.append(f"CG ≤ {config['cg_max_iterations']}")
  return ", ".join(parts)


def table(name: str, rows: dict, target: float) -> str:
  lines = [f"### {name} (target {target:g})", "",
           "| optimizer | steps to target | wall to target (s) | passes to target | "
           "passes / step | final loss | setting |",
           "|---|---|---|---|---|---|---|"]
  for row, r in rows.items():
    if "steps_to_target" not in r:
      continue
    setting = _setting(r)
    lines.append(
        f"| {row} | {_fmt(r['steps_to_target'], '{}')} | {_fmt(r['wall_to_target'])} | "
        f"{_fmt(r['passes_to_target'], '{:.0f}')} | {r['passes_per_step']:.1f} | "
        f"{r['final']:.4g} | {setting} |")
  return "\n".join(lines)


def plot(name: str, rows: dict, target: float, path: str) -> None:
  """Full training loss against steps and against passes, one line per row."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for row, r in rows.items():
    if "curve" not in r:
      continue
    style = dict(label=row, marker="o", markersize=3)
    axes[0].semilogy(np.arange(1, len(r["curve"]) + 1), r["curve"], **style)
    axes[1].semilogy(r["cumulative_passes"], r["curve"], **style)
  for ax, xlabel in zip(axes, ("steps", "forward+backward passes (gradients)")):
    ax.axhline(target, color="k", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss")
  axes[0].legend(fontsize=8)
  fig.suptitle(name)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="bench_out/hessian_free")
  parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
  parser.add_argument("--only", default="", help="comma-separated subset of sections: "
                      "autoencoder,autoencoder_full,quadratic,rosenbrock,digits_mlp")
  args = parser.parse_args()
  only = set(filter(None, args.only.split(",")))
  os.makedirs(args.out, exist_ok=True)
  scale = 0.25 if args.quick else 1.0
  results, report = {}, []

  sections = [
      ("quadratic", lambda: synthetic_rows(get_problem("quadratic"), int(200 * scale))),
      ("rosenbrock", lambda: synthetic_rows(get_problem("rosenbrock"), int(1000 * scale))),
      ("autoencoder_full", lambda: network_rows(
          get_problem("autoencoder_full"), int(800 * scale), True, 3e-3, 0.1, 1e-2, 50)),
      ("autoencoder", lambda: network_rows(
          get_problem("autoencoder"), int(1200 * scale), False, 3e-3, 0.1, 1e-2, 50)),
      ("digits_mlp", lambda: network_rows(
          get_problem("digits_mlp"), int(800 * scale), False, 3e-3, 0.1, 3e-2, 50, True)),
  ]
  for name, fn in sections:
    if only and name not in only:
      continue
    t0 = time.perf_counter()
    rows = fn()
    results[name] = rows
    target = get_problem(name).target_loss
    report.append(table(name, rows, target))
    plot(name, rows, target, os.path.join(args.out, f"{name}.png"))
    print(report[-1], f"\n({time.perf_counter() - t0:.0f} s)\n", flush=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=str)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write("\n\n".join(report) + "\n")


if __name__ == "__main__":
  main()
