"""Tables, raw curves and figures from the runner's results.

* `markdown(rows, problems)`: one table per problem (best learning rate per optimizer;
  median over seeds, with the min-max spread when there are several);
* `write_jsonl(path, runs, rows)`: every run of the sweep (curves included), one JSON object a
  line, then one summary object per row;
* `plot_problem(path, problem, rows)`: loss against steps and against wall time for the best
  setting of every optimizer (seed 0).
"""

from __future__ import annotations

import json
import math
from typing import Iterable

import numpy as np

__all__ = ["markdown", "write_jsonl", "plot_problem", "row_summary"]


def _median_spread(values: list[float | None]) -> tuple[float | None, float | None, float | None,
                                                        int]:
  """(median, min, max, how many) over the finite entries."""
  finite = [v for v in values if v is not None and math.isfinite(v)]
  if not finite:
    return None, None, None, 0
  return float(np.median(finite)), min(finite), max(finite), len(finite)


def _fmt(v: float | None, digits: int = 4) -> str:
  if v is None:
    return "-"
  if not math.isfinite(v):
    return "diverged"
  if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
    return f"{v:.2e}"
  return f"{v:.{digits}g}"


def _cell(values: list[float | None], digits: int = 4, total: int | None = None) -> str:
  med, lo, hi, n = _median_spread(values)
  if med is None:
    return "diverged" if values and all(v is not None and not math.isfinite(v)
                                        for v in values) else "-"
  text = _fmt(med, digits)
  if len(values) > 1:
    if n > 1 and hi > lo:
      text += f" [{_fmt(lo, 3)}, {_fmt(hi, 3)}]"
    if total is not None and n < total:
      text += f" ({n}/{total})"
  return text


def row_summary(row, adam) -> dict:
  """The numbers of one table row (medians over seeds, ratios to Adam in the same run)."""
  runs = row.runs
  step_ratio = (row.step_s / adam.step_s if adam is not None and adam.step_s and row.step_s
                else None)
  mem_ratio = (row.state_bytes / adam.state_bytes if adam is not None and adam.state_bytes
               else None)
  return {
      "problem": row.problem, "optimizer": row.optimizer, "family": row.family,
      "best_lr": row.best_lr, "seeds": len(runs),
      "final_train": [r.final_train for r in runs],
      "final_eval": [r.final_eval for r in runs],
      "steps_to_target": [r.steps_to_target for r in runs],
      "time_to_target": [r.time_to_target for r in runs],
      "step_s": row.step_s, "step_ratio_adam": step_ratio,
      "state_bytes": row.state_bytes, "state_ratio_adam": mem_ratio,
      "compile_s": row.compile_s, "sweep": {f"{k:.4g}": v for k, v in row.sweep.items()},
  }


def _adam(rows):
  return next((r for r in rows if r.optimizer == "adam"), None)


def markdown(rows: list, problems: dict) -> str:
  """One markdown table per problem, in the order the rows were run."""
  out = []
  for name in dict.fromkeys(r.problem for r in rows):
    prob_rows = [r for r in rows if r.problem == name]
    problem = problems[name]
    adam = _adam(prob_rows)
    steps = len(prob_rows[0].runs[0].loss) if prob_rows[0].runs else 0
    out.append(f"### {name}: {problem.description}\n")
    out.append(f"target training loss {problem.target_loss:g}; "
               f"{max(len(r.loss) for row in prob_rows for r in row.runs) if steps else 0} steps; "
               f"seeds per row: {len(prob_rows[0].runs)}; "
               "step time and state size as multiples of Adam's in the same run\n")
    out.append("| optimizer | best lr | train loss | held-out loss | steps to target | "
               "s to target | step time (x Adam) | state (x Adam) | compile s |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for row in prob_rows:
      s = row_summary(row, adam)
      seeds = s["seeds"]
      out.append("| " + " | ".join([
          row.optimizer,
          f"{row.best_lr:.3g}",
          _cell(s["final_train"]),
          _cell(s["final_eval"]),
          _cell([float(v) if v is not None else None for v in s["steps_to_target"]], 4, seeds),
          _cell(s["time_to_target"], 3, seeds),
          _fmt(s["step_ratio_adam"], 3) if s["step_ratio_adam"] is not None else "-",
          _fmt(s["state_ratio_adam"], 3) if s["state_ratio_adam"] is not None else "-",
          f"{row.compile_s:.2f}",
      ]) + " |")
    if adam is not None and adam.step_s:
      out.append(f"\nAdam: {adam.step_s * 1e3:.3g} ms per step, "
                 f"{adam.state_bytes / 1024:.1f} KiB of optimizer state.")
    out.append("")
  return "\n".join(out)


def _clean(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  return x


def write_jsonl(path, runs: Iterable, rows: list) -> None:
  """Every run (kind "run", curves included), then every row (kind "row")."""
  by_problem = {}
  for row in rows:
    by_problem.setdefault(row.problem, []).append(row)
  with open(path, "w") as f:
    for run in runs:
      f.write(json.dumps(_clean({"kind": "run", **run.as_json()})) + "\n")
    for name, prob_rows in by_problem.items():
      adam = _adam(prob_rows)
      for row in prob_rows:
        f.write(json.dumps(_clean({"kind": "row", **row_summary(row, adam)})) + "\n")


_STYLE = {"optax": "--", "secondorder": "-", "peer": ":"}


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
  if window <= 1 or len(y) < window:
    return y
  kernel = np.ones(window) / window
  head = np.cumsum(y[: window - 1]) / np.arange(1, window)
  return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def plot_problem(path, problem, rows: list) -> None:
  """Loss vs steps and vs wall time (best lr, seed 0; minibatch loss smoothed), one PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), constrained_layout=True)
  cmap = plt.get_cmap("tab20")
  # tab20 comes in light/dark pairs: use the dark ones first so neighbours differ.
  color = lambda i: cmap((2 * i) % 20 + (2 * i // 20) % 2)
  window = 10 if problem.stochastic else 1
  all_y = []
  for i, row in enumerate(rows):
    run = row.runs[0]
    y = _smooth(np.asarray(run.loss, dtype=np.float64), window)
    if not len(y):
      continue
    steps = np.arange(1, len(y) + 1)
    style = dict(color=color(i), linestyle=_STYLE.get(row.family, "-"), linewidth=1.6)
    label = f"{row.optimizer} (lr {row.best_lr:.2g})" + (" diverged" if run.diverged else "")
    axes[0].plot(steps, y, label=label, **style)
    axes[1].plot(np.maximum(np.asarray(run.time), 1e-5), y, **style)
    all_y.append(y[np.isfinite(y)])
  axes[1].set_xscale("log")
  for ax, xlabel in zip(axes, ("step", "wall time of optimizer steps (s, log scale)")):
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss" + (" (minibatch, 10-step mean)" if window > 1 else ""))
    ax.axhline(problem.target_loss, color="k", linewidth=0.8, alpha=0.5)
    ax.grid(True, which="both", alpha=0.3)
  if all_y:
    ys = np.concatenate(all_y)
    ys = ys[ys > 0]
    if len(ys):
      lo = min(np.percentile(ys, 1), problem.target_loss) * 0.8
      hi = np.percentile(ys, 99.5) * 1.2
      for ax in axes:
        ax.set_ylim(lo, hi)
  fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
  fig.suptitle(f"{problem.name}: {problem.description}\n"
               "dashed: optax baselines, solid: secondorder, dotted: other libraries; "
               "black line: target loss", fontsize=10)
  fig.savefig(path, dpi=110)
  plt.close(fig)
