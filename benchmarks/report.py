"""Tables, raw curves and figures from the runner's results.

* `markdown(rows, problems)`: one table per problem (best learning rate per optimizer;
  median over seeds, with the min-max spread when there are several);
* `write_jsonl(path, runs, rows)`: every run of the sweep (curves included), one JSON object a
  line, then one summary object per row;
* `plot_problem(path, problem, rows)`: training and held-out loss against steps and against
  seconds for the best setting of every optimizer (seed 0);
* `plot_speedups(path, rows, problems)`: every method's speed-up over the baseline, steps and
  seconds, median and [min, max] over seeds, across the problems.

Every figure draws an optimizer with `style(name)`: one colour and marker per optimizer.
"""

from __future__ import annotations

import json
import math
import zlib
from typing import Iterable

import numpy as np

__all__ = ["markdown", "write_jsonl", "read_jsonl", "plot_problem", "plot_speedups",
           "row_summary", "race", "to_target_ratios", "baseline_row", "style"]


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


def _median(values) -> float | None:
  finite = [v for v in values if v is not None and math.isfinite(v)]
  return float(np.median(finite)) if finite else None


def race(row, baseline) -> dict:
  """Steps and seconds to the baseline's final held-out loss, per seed, and their ratios.

  The target is the median over the baseline's seeds of its final held-out loss. A run
  reaches it at the first held-out evaluation at or below it (evaluations every
  `Problem.eval_every` steps); seconds are the run's optimizer-step seconds at that point.
  Ratios divide by the baseline's median steps (seconds) to the same target: below 1 is
  faster than the baseline.

  Args:
    row: a `RowResult` of a race problem.
    baseline: the baseline's `RowResult` on the same problem (None: no race).

  Returns:
    ``{"target", "steps", "seconds", "steps_ratio", "time_ratio"}`` (lists over seeds, None
    where a seed never reached the target).
  """
  if baseline is None:
    return {"target": None, "steps": [], "seconds": [], "steps_ratio": [], "time_ratio": []}
  target = _median([r.final_eval for r in baseline.runs])

  def reach(run):
    if target is None or run.diverged:
      return None, None
    for step, seconds, _, held_out in run.evals:
      if held_out <= target:
        return step, seconds
    return None, None

  mine = [reach(r) for r in row.runs]
  base = [reach(r) for r in baseline.runs]
  base_steps = _median([float(s) for s, _ in base if s is not None])
  base_time = _median([t for _, t in base if t is not None])
  ratio = lambda v, b: v / b if v is not None and b else None
  return {"target": target, "steps": [s for s, _ in mine], "seconds": [t for _, t in mine],
          "steps_ratio": [ratio(s, base_steps) for s, _ in mine],
          "time_ratio": [ratio(t, base_time) for _, t in mine]}


def to_target_ratios(row, baseline) -> dict:
  """Steps and seconds to the problem's training-loss target as multiples of the baseline's.

  Args:
    row: a `RowResult`; baseline: the baseline's `RowResult` (None: no ratios).

  Returns:
    ``{"steps_ratio": [...], "time_ratio": [...]}`` over the row's seeds (None where a seed
    did not reach the target), each divided by the baseline's median over its seeds.
  """
  if baseline is None:
    return {"steps_ratio": [], "time_ratio": []}
  base_steps = _median([float(r.steps_to_target) if r.steps_to_target else None
                        for r in baseline.runs])
  base_time = _median([r.time_to_target for r in baseline.runs])
  ratio = lambda v, b: v / b if v is not None and b else None
  return {"steps_ratio": [ratio(r.steps_to_target, base_steps) for r in row.runs],
          "time_ratio": [ratio(r.time_to_target, base_time) for r in row.runs]}


def row_summary(row, baseline, problem=None) -> dict:
  """The numbers of one table row (medians over seeds, ratios to the baseline in the same run).

  Args:
    row: a `RowResult`.
    baseline: the `RowResult` of the problem's baseline (`Problem.baseline`) or None.
    problem: the `Problem` (its `target_loss` None: the race's numbers are added).

  Returns:
    A JSON-ready dict.
  """
  runs = row.runs
  step_ratio = (row.step_s / baseline.step_s
                if baseline is not None and baseline.step_s and row.step_s else None)
  mem_ratio = (row.state_bytes / baseline.state_bytes
               if baseline is not None and baseline.state_bytes else None)
  out = {
      "problem": row.problem, "optimizer": row.optimizer, "family": row.family,
      "baseline": baseline.optimizer if baseline is not None else None,
      "best_lr": row.best_lr, "edge": row.edge, "runs_spent": row.runs_spent,
      "second": (None if row.second is None else
                 {**row.second, "sweep": {f"{k:.4g}": v for k, v in row.second["sweep"].items()}}),
      "seeds": len(runs),
      "final_train": [r.final_train for r in runs],
      "final_eval": [r.final_eval for r in runs],
      "steps_to_target": [r.steps_to_target for r in runs],
      "time_to_target": [r.time_to_target for r in runs],
      "step_s": row.step_s, "step_ratio": step_ratio,
      "state_bytes": row.state_bytes, "state_ratio": mem_ratio,
      "compile_s": row.compile_s, "sweep": {f"{k:.4g}": v for k, v in row.sweep.items()},
  }
  if problem is not None and problem.target_loss is None:
    out["race"] = race(row, baseline)
  else:
    out["to_target"] = to_target_ratios(row, baseline)
  return out


def baseline_row(rows, name: str = "adam"):
  """The row of optimizer `name` among `rows` (None when it did not run)."""
  return next((r for r in rows if r.optimizer == name), None)


def _lr_cell(row) -> str:
  text = f"{row.best_lr:.3g}" + (f" ({_EDGE_MARK} {row.edge})" if row.edge else "")
  if row.second is not None:
    text += f"; {row.second['name']} {row.second['best']:.3g}"
  return text


_EDGE_MARK = "edge"


def markdown(rows: list, problems: dict, timing: str = "") -> str:
  """One markdown table per problem, in the order the rows were run.

  Args:
    rows: every `RowResult`.
    problems: name -> `Problem`.
    timing: one sentence saying how step time was measured (repeated under every table).

  Returns:
    The tables as markdown text.
  """
  out = []
  for name in dict.fromkeys(r.problem for r in rows):
    prob_rows = [r for r in rows if r.problem == name]
    problem = problems[name]
    base = baseline_row(prob_rows, problem.baseline)
    n_steps = max(len(r.loss) for row in prob_rows for r in row.runs)
    out.append(f"### {name}: {problem.description}\n")
    is_race = problem.target_loss is None
    goal = ("race: steps and seconds to the baseline's final held-out loss "
            f"(held-out loss every {problem.eval_every} steps)" if is_race
            else f"target training loss {problem.target_loss:g}")
    out.append(f"{goal}; {n_steps} steps; seeds per row: {len(prob_rows[0].runs)}; "
               f"ratios are multiples of {problem.baseline}'s in the same run (below 1: less "
               f"than {problem.baseline}); best lr marked '{_EDGE_MARK} low/high' is still the "
               "smallest/largest rate tried after the grid's extensions (under-tuned); "
               f"{timing}\n")
    held = "held-out loss" if problem.held_out else "held-out loss (= objective)"
    if is_race:
      out.append(f"| optimizer | best lr | runs | final held-out loss | steps (x "
                 f"{problem.baseline}) | seconds (x {problem.baseline}) | train loss | "
                 f"step time (x {problem.baseline}) | state (x {problem.baseline}) | "
                 "compile s |")
    else:
      out.append(f"| optimizer | best lr | runs | train loss | {held} | steps to target | "
                 f"s to target | step time (x {problem.baseline}) | "
                 f"state (x {problem.baseline}) | compile s |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for row in prob_rows:
      s = row_summary(row, base, problem)
      seeds = s["seeds"]
      tail = [_fmt(s["step_ratio"], 3) if s["step_ratio"] is not None else "-",
              _fmt(s["state_ratio"], 3) if s["state_ratio"] is not None else "-",
              f"{row.compile_s:.2f}"]
      if is_race:
        cells = [_cell(s["final_eval"]),
                 _cell(s["race"]["steps_ratio"], 3, seeds),
                 _cell(s["race"]["time_ratio"], 3, seeds),
                 _cell(s["final_train"])]
      else:
        cells = [_cell(s["final_train"]),
                 _cell(s["final_eval"]) if problem.held_out else "-",
                 _cell([float(v) if v is not None else None for v in s["steps_to_target"]],
                       4, seeds),
                 _cell(s["time_to_target"], 3, seeds)]
      out.append("| " + " | ".join([row.optimizer, _lr_cell(row), str(row.runs_spent)]
                                   + cells + tail) + " |")
    if is_race and base is not None:
      target = race(base, base)["target"]
      out.append(f"\nRace target ({problem.baseline}'s median final held-out loss): "
                 f"{_fmt(target)}.")
    if base is not None and base.step_s:
      out.append(f"\n{problem.baseline}: {base.step_s * 1e3:.3g} ms per step, "
                 f"{base.state_bytes / 1024:.1f} KiB of optimizer state.")
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


def write_jsonl(path, runs: Iterable, rows: list, problems: dict | None = None) -> None:
  """Every run (kind "run", curves included), then every row (kind "row").

  Args:
    path: the file to write.
    runs: every `RunResult`; rows: every `RowResult`.
    problems: name -> `Problem` (for each problem's baseline and race); None: Adam is the
      baseline everywhere.
  """
  by_problem = {}
  for row in rows:
    by_problem.setdefault(row.problem, []).append(row)
  with open(path, "w") as f:
    for run in runs:
      f.write(json.dumps(_clean({"kind": "run", **run.as_json()})) + "\n")
    for name, prob_rows in by_problem.items():
      problem = (problems or {}).get(name)
      base = baseline_row(prob_rows, problem.baseline if problem is not None else "adam")
      for row in prob_rows:
        f.write(json.dumps(_clean({"kind": "row", **row_summary(row, base, problem)})) + "\n")


def read_jsonl(path) -> tuple[list, list]:
  """The rows and runs of a `runs.jsonl`, as the runner's `RowResult` / `RunResult` objects.

  Redraws figures or tables of an earlier run without training again::

    rows, runs = read_jsonl("bench_out/runs.jsonl")
    plot_speedups("speedups.png", rows, {r.problem: get_problem(r.problem) for r in rows})

  Args:
    path: a file written by `write_jsonl`.

  Returns:
    ``(rows, runs)``; each row's ``runs`` are its best setting's runs, seed by seed.
  """
  from benchmarks.runner import RowResult, RunResult

  def number(v):
    return {"inf": math.inf, "-inf": -math.inf, None: math.nan}.get(v, v) \
        if not isinstance(v, (int, float)) else v

  runs, rows = [], []
  fields = set(RunResult.__dataclass_fields__)
  with open(path) as f:
    records = [json.loads(line) for line in f]
  for rec in records:
    if rec["kind"] == "run":
      data = {k: v for k, v in rec.items() if k in fields}
      data["final_train"], data["final_eval"] = (number(data["final_train"]),
                                                 number(data["final_eval"]))
      data["evals"] = [tuple(e) for e in data["evals"]]
      runs.append(RunResult(**data))
  for rec in records:
    if rec["kind"] != "row":
      continue
    second = rec.get("second")
    # The best setting's runs carry the second hyperparameter as an override, unless its
    # default (the first value the sweep tried) won: those runs were built without one.
    default_won = second and float(second["best"]) == float(next(iter(second["sweep"])))
    overrides = {second["name"]: second["best"]} if second and not default_won else {}
    mine = [r for r in runs if r.problem == rec["problem"] and r.optimizer == rec["optimizer"]
            and r.lr == rec["best_lr"] and (r.overrides or {}) == overrides]
    by_seed = {r.seed: r for r in mine}
    if second:
      second = {**second, "sweep": {float(k): v for k, v in second["sweep"].items()}}
    rows.append(RowResult(
        rec["problem"], rec["optimizer"], rec["family"], rec["best_lr"],
        {float(k): number(v) for k, v in rec["sweep"].items()},
        [by_seed[s] for s in sorted(by_seed)], rec["compile_s"], rec["state_bytes"],
        rec["step_s"], rec.get("edge"), rec.get("runs_spent", 0), second))
  return rows, runs


# ----------------------------------------------------------------------------- figures

_LINESTYLE = {"optax": "--", "secondorder": "-", "peer": ":"}
_MARKERS = "osD^vP*Xh<>p8d"


def _palette() -> list:
  """24 colours: tab10, then Dark2, then tab20's light shades (distinct neighbours first)."""
  import matplotlib

  tab10, dark2, tab20 = (matplotlib.colormaps[n] for n in ("tab10", "Dark2", "tab20"))
  return ([tab10(i) for i in range(10)] + [dark2(i) for i in range(8)]
          + [tab20(i) for i in (1, 3, 5, 9, 13, 17)])


def style(name: str) -> dict:
  """The one colour and marker of optimizer `name`, used by every figure.

  Registered optimizers (`benchmarks.optimizers.OPTIMIZERS`) take colours and markers in
  registration order, so no two share both; a name outside the registry gets a fixed choice
  from a hash of its name.

  Args:
    name: the optimizer's row name.

  Returns:
    ``{"color": (r, g, b, a), "marker": str}``.
  """
  from benchmarks.optimizers import OPTIMIZERS

  names = list(OPTIMIZERS)
  palette = _palette()
  i = names.index(name) if name in names else zlib.crc32(name.encode())
  return {"color": palette[i % len(palette)],
          "marker": _MARKERS[(i + i // len(palette)) % len(_MARKERS)]}


def _line_kw(row) -> dict:
  return dict(linestyle=_LINESTYLE.get(row.family, "-"), linewidth=1.5, markevery=0.1,
              markersize=4, **style(row.optimizer))


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
  if window <= 1 or len(y) < window:
    return y
  kernel = np.ones(window) / window
  head = np.cumsum(y[: window - 1]) / np.arange(1, window)
  return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def _label(row) -> str:
  label = f"{row.optimizer} (lr {row.best_lr:.2g}{', edge ' + row.edge if row.edge else ''})"
  return label + (" diverged" if row.runs[0].diverged else "")


def plot_problem(path, problem, rows: list):
  """Training and held-out loss against steps and against seconds, one PNG per problem.

  Top: the minibatch training loss (10-step mean on stochastic problems) of seed 0 at the
  best learning rate; bottom: the held-out loss at its evaluation points. Each optimizer has
  its `style` everywhere; a best rate still on the grid's edge says so in the legend.

  Args:
    path: the PNG to write.
    problem: the `Problem`; rows: its `RowResult`s.

  Returns:
    The matplotlib figure (closed after saving).
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 2, figsize=(15, 9), constrained_layout=True)
  window = 10 if problem.stochastic else 1
  all_y = []
  for row in rows:
    run = row.runs[0]
    y = _smooth(np.asarray(run.loss, dtype=np.float64), window)
    if not len(y):
      continue
    kw = _line_kw(row)
    axes[0, 0].plot(np.arange(1, len(y) + 1), y, label=_label(row), **kw)
    axes[0, 1].plot(np.maximum(np.asarray(run.time), 1e-5), y, **kw)
    all_y.append(y[np.isfinite(y)])
    if run.evals:
      steps, seconds, _, held_out = (np.asarray(v, dtype=np.float64) for v in zip(*run.evals))
      kw = dict(kw, markevery=1)
      axes[1, 0].plot(steps, held_out, **kw)
      timed = seconds > 0  # the evaluation before the first step has no seconds
      axes[1, 1].plot(seconds[timed], held_out[timed], **kw)
  target = problem.target_loss
  for (i, j), ax in np.ndenumerate(axes):
    ax.set_yscale("log")
    ax.set_xlabel("step" if j == 0 else "seconds of optimizer steps (log scale)")
    if j == 1:
      ax.set_xscale("log")
    ax.set_ylabel(("training loss" + (" (minibatch, 10-step mean)" if window > 1 else ""))
                  if i == 0 else "held-out loss")
    if target is not None and i == 0:
      ax.axhline(target, color="k", linewidth=0.8, alpha=0.5)
    ax.grid(True, which="both", alpha=0.3)
  if all_y:
    ys = np.concatenate(all_y)
    ys = ys[ys > 0]
    if len(ys):
      lo = np.percentile(ys, 1) * 0.8
      lo = min(lo, target * 0.8) if target is not None else lo
      for ax in axes[0]:
        ax.set_ylim(lo, np.percentile(ys, 99.5) * 1.2)
  fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
  fig.suptitle(f"{problem.name}: {problem.description}\n"
               "dashed: optax baselines, solid: secondorder, dotted: other libraries"
               + ("; black line: target loss" if target is not None else ""), fontsize=10)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return fig


def plot_speedups(path, rows: list, problems: dict):
  """Every method's speed-up over its problem's baseline, in steps and in seconds.

  Speed-up is the baseline's median steps (seconds) to the target divided by the row's, per
  seed (the race problems: to the baseline's final held-out loss); markers are the median
  over seeds, bars the seeds' [min, max]. Each method has its own line on the vertical
  axis, named there (grouped by problem, the problem named above its group); rows that
  never reached the target are left out and named under the figure.

  Args:
    path: the PNG to write.
    rows: every `RowResult`; problems: name -> `Problem`.

  Returns:
    The matplotlib figure (closed after saving).
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(dict.fromkeys(r.problem for r in rows))
  drawn, missing = [], []   # drawn: (problem, row, {key: speed-ups})
  for name in names:
    problem = problems[name]
    prob_rows = [r for r in rows if r.problem == name]
    base = baseline_row(prob_rows, problem.baseline)
    for row in prob_rows:
      s = row_summary(row, base, problem)
      ratios = s["race"] if "race" in s else s["to_target"]
      speeds = {key: [1.0 / v for v in ratios[key] if v]
                for key in ("steps_ratio", "time_ratio")}
      if not speeds["steps_ratio"]:
        missing.append(f"{name}/{row.optimizer}")
        continue
      drawn.append((name, row, speeds))
  fig, axes = plt.subplots(1, 2, figsize=(15, 0.28 * max(len(drawn), 6) + 2.5),
                           constrained_layout=True)
  ys, labels, y = [], [], 0
  for i, (name, row, speeds) in enumerate(drawn):
    if i and drawn[i - 1][0] != name:
      y += 1  # a gap between problems
    ys.append(y)
    labels.append(row.optimizer)
    st = style(row.optimizer)
    for ax, key in zip(axes, ("steps_ratio", "time_ratio")):
      speed = speeds[key]
      if not speed:
        continue
      med, lo, hi = np.median(speed), min(speed), max(speed)
      ax.errorbar([med], [y], xerr=[[med - lo], [hi - med]], fmt=st["marker"],
                  color=st["color"], markersize=6, capsize=2, label=row.optimizer)
    y += 1
  for ax, what in zip(axes, ("steps", "seconds")):
    ax.set_xscale("log")
    ax.axvline(1.0, color="k", linewidth=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(max(ys, default=0) + 0.7, -1.3)
    for name in names:
      first = next((yy for yy, (n, _, _) in zip(ys, drawn) if n == name), None)
      if first is not None:
        ax.text(0.0, first - 0.75, f"{name} (vs {problems[name].baseline})",
                transform=ax.get_yaxis_transform(), fontsize=8, fontweight="bold",
                ha="left", va="center")
    ax.set_xlabel(f"speed-up over the baseline in {what} (>1: faster; median and [min, max] "
                  "over seeds)")
    ax.grid(True, which="both", axis="x", alpha=0.3)
  handles = {}
  for h, label in zip(*axes[0].get_legend_handles_labels()):
    handles.setdefault(label, h)
  fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=8)
  fig.suptitle("Speed-up to target over each problem's baseline", fontsize=10)
  if missing:
    import textwrap

    fig.text(0.01, 0.0, textwrap.fill("never reached the target (not drawn): "
                                      + ", ".join(missing), 200),
             fontsize=7, va="top", ha="left")
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return fig
