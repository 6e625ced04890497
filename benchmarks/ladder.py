"""The size ladder: the language-model race at three sizes and three horizons, resumable.

``python -m benchmarks ladder`` races the rows of `ROWS` on the byte-level language model
(`benchmarks.lm`) at the sizes of `STAGES`, each trained for a multiple of the
compute-optimal 20 tokens per parameter, on the fixed standard-library corpus
(`benchmarks.corpus`, 28.3 MB of training bytes: no run reads it twice). Every finished run
is appended, as one JSON line with its rounded curves, to the record
(``docs/results/ladder/ladder.jsonl`` by default); a restarted ladder reads the record first
and trains only what is not in it, so the ladder runs over as many sittings as it needs and
reaches the same decisions (each decision is a function of the recorded scores).

Sizes (heads of width 16 throughout; context and batch grow with the model, so a run at
20 tokens per parameter is 1,400 to 3,400 steps):

  ======  ==========  ======  =====  =======  =====  ============  ===========
  size    parameters  layers  width  context  batch  tokens/step   steps at 1x
  ======  ==========  ======  =====  =======  =====  ============  ===========
  small   35,296      2       32     64       8      512           1,379
  cpu     119,744     2       64     64       16     1,024         2,339
  large   345,744     2       112    128      16     2,048         3,376
  ======  ==========  ======  =====  =======  =====  ============  ===========

The tuning rule (the same for every row; scores are seed 0's final held-out loss):

* At ``small@1x`` (full tuning): the rate bracket of the ``full`` preset (5 rates spaced by
  sqrt(10) around the row's centre; while the best is an edge, up to 3 more beyond it), then
  the two rates half a grid step either side of the best (x 10^±0.25); then the row's second
  setting on its 3-point grid at the best rate (`OptimizerSpec.second`). AdamW's is the
  strength test: beta2 in {0.95, 0.999} x weight decay in {0.01, 0.1, 1} at its best rate
  (its default, beta2 0.999 and decay 1e-4, stays a candidate); the winner is carried up.
* At every other stage: the rate transferred unchanged from the stage named as its source
  (the next smaller size at the same horizon, or the next shorter horizon), re-bracketed on
  a 3-point grid spaced by 10^0.25 around it, extended up to 2 rates while the best is an
  edge; the second setting stays the source's.
* Then seeds 1 and 2 at the final setting. At ``large``: AdamW and every row whose median
  steps to AdamW's loss came within 10% of the best row's at a smaller size (`WITHIN`).

The target of a stage is AdamW's median final held-out loss over its three seeds; a run
reaches it at its first held-out evaluation at or below it (40 evaluations a run). Steps
are exact on any machine. Seconds are not measured during the ladder (the machine is
shared): ``python -m benchmarks retime`` measures each row's median step time per size in a
separate quiet pass (rows interleaved, compilation and first call excluded), appended to
``timing.jsonl`` beside the record; seconds to the target are steps to the target times
that step time.

Usage::

  python -m benchmarks ladder                         # every stage, resuming from the record
  python -m benchmarks ladder --stages small@1x       # one stage
  python -m benchmarks retime                         # step times of the final settings
  python -m benchmarks ladder --report                # tables from the record (markdown)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import subprocess
import sys
import time
from typing import Callable, Iterable

import numpy as np

__all__ = ["Stage", "STAGES", "ROWS", "Record", "Ladder", "summarize", "markdown",
           "draw_figures", "retime", "stage_config", "TOKENS_PER_PARAM", "WITHIN", "score",
           "reach", "run_entry", "round_value", "append_timing", "read_timing", "steps_ratios",
           "stage_target", "plot_trend", "plot_curves"]

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = os.path.join(os.path.dirname(HERE), "docs", "results", "ladder")
RECORD_NAME, TIMING_NAME = "ladder.jsonl", "timing.jsonl"

ROWS = ("adamw", "soap", "kfac", "shampoo", "muon", "psgd_kron")
BASELINE = "adamw"
TOKENS_PER_PARAM = 20
EVALS = 40               # held-out evaluations a run (plus the initial one)
SEEDS = 3
COARSE = 10 ** 0.5       # the full tuning's grid spacing
FINE = 10 ** 0.25        # the refinement's and the transfers' spacing
FULL_POINTS, FULL_EXTEND = 5, 3
TRANSFER_POINTS, TRANSFER_EXTEND = 3, 2
STRENGTH = (("b2", (0.95, 0.999)), ("weight_decay", (0.01, 0.1, 1.0)))
WITHIN = 1.10            # rows within 10% of the best steps ratio go up to the largest size
DIGITS = 5               # significant digits kept in the record


@dataclasses.dataclass(frozen=True)
class Stage:
  """One rung: a size (a key of `benchmarks.lm.SIZES`) at a multiple of 20 tokens/parameter.

  Attributes:
    size: the model's size.
    horizon: the run's tokens as a multiple of the compute-optimal ``20 x parameters``.
    source: the stage whose tuned settings centre this one's (None: full tuning here).
    close_rows_only: run AdamW and the rows within `WITHIN` of the best at the smaller sizes
      (the largest size); otherwise every row of `ROWS`.
  """

  size: str
  horizon: int
  source: str | None = None
  close_rows_only: bool = False

  @property
  def name(self) -> str:
    return f"{self.size}@{self.horizon}x"


STAGES = (
    Stage("small", 1),
    Stage("cpu", 1, source="small@1x"),
    Stage("large", 1, source="cpu@1x", close_rows_only=True),
    Stage("small", 4, source="small@1x"),
    Stage("small", 8, source="small@4x"),
)


def stage_config(stage: Stage, sizes: dict | None = None,
                 tokens_per_param: float = TOKENS_PER_PARAM, evals: int = EVALS):
  """The `LMConfig` of a stage's runs: its size with the steps of its horizon.

  ``steps = round(horizon x tokens_per_param x parameters / (batch x context))``; a held-out
  evaluation every ``steps // evals`` steps.
  """
  from benchmarks import lm

  base = (sizes or lm.SIZES)[stage.size]
  tokens = stage.horizon * tokens_per_param * lm.parameter_count(base)
  steps = max(1, int(round(tokens / (base.batch_size * base.context))))
  return dataclasses.replace(base, steps=steps, eval_every=max(1, steps // evals))


# ----------------------------------------------------------------------------- record


def _round(x, digits: int = DIGITS):
  if isinstance(x, float):
    if not math.isfinite(x):
      return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return float(f"{x:.{digits}g}")
  if isinstance(x, dict):
    return {k: _round(v, digits) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_round(v, digits) for v in x]
  return x


def round_value(x: float, digits: int = DIGITS) -> float:
  """`x` as the record keeps it (`digits` significant digits)."""
  return _round(float(x), digits)


def _number(v) -> float:
  return {"inf": math.inf, "-inf": -math.inf, None: math.nan}.get(v, v) \
      if not isinstance(v, (int, float)) else float(v)


def _run_key(stage: str, row: str, lr: float, overrides: dict, seed: int) -> tuple:
  # The rate as the record keeps it (`DIGITS` significant digits): a rate computed again
  # on resuming (a grid point, a neighbour of a recorded rate) finds its recorded run.
  return (stage, row, f"{float(lr):.{DIGITS - 1}e}", json.dumps(_round(overrides), sort_keys=True),
          int(seed))


class Record:
  """The ladder's record: one JSON object a line, appended as runs finish.

  Kinds: "stage" (a stage's configuration, once), "run" (one finished run), "final" (a
  row's tuned setting at a stage, written when its seeds are done), "failed" (a row that
  could not be built or run at a stage).
  """

  def __init__(self, path: str):
    self.path = path
    self.entries: list[dict] = []
    if os.path.exists(path):
      with open(path) as f:
        self.entries = [json.loads(line) for line in f if line.strip()]
    self._runs = {_run_key(e["stage"], e["row"], e["lr"], e["overrides"], e["seed"]): e
                  for e in self.entries if e["kind"] == "run"}

  def append(self, entry: dict) -> dict:
    entry = _round(entry)
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    with open(self.path, "a") as f:
      f.write(json.dumps(entry) + "\n")
      f.flush()
      os.fsync(f.fileno())
    self.entries.append(entry)
    if entry["kind"] == "run":
      self._runs[_run_key(entry["stage"], entry["row"], entry["lr"], entry["overrides"],
                          entry["seed"])] = entry
    return entry

  def run(self, stage: str, row: str, lr: float, overrides: dict, seed: int) -> dict | None:
    return self._runs.get(_run_key(stage, row, lr, overrides, seed))

  def runs(self, stage: str | None = None, row: str | None = None) -> list[dict]:
    return [e for e in self.entries if e["kind"] == "run"
            and (stage is None or e["stage"] == stage) and (row is None or e["row"] == row)]

  def final(self, stage: str, row: str) -> dict | None:
    """A row's tuned setting (or failure) at `stage`; the latest when there are several."""
    return next((e for e in reversed(self.entries) if e["kind"] in ("final", "failed")
                 and e["stage"] == stage and e["row"] == row), None)

  def finals(self, stage: str) -> list[dict]:
    """Every row's latest tuned setting at `stage`, in the order the rows were first tuned."""
    rows = dict.fromkeys(e["row"] for e in self.entries
                         if e["kind"] == "final" and e["stage"] == stage)
    return [f for f in (self.final(stage, row) for row in rows) if f["kind"] == "final"]

  def stage_info(self, stage: str) -> dict | None:
    return next((e for e in self.entries if e["kind"] == "stage" and e["stage"] == stage),
                None)


def score(entry: dict) -> float:
  """A run's tuning score: its final held-out loss (inf when it diverged)."""
  value = _number(entry["final_eval"])
  return math.inf if entry["diverged"] or not math.isfinite(value) else value


@functools.lru_cache(maxsize=None)
def _code_version() -> str:
  """The commit the harness runs from: git's, or a ``CODE_VERSION`` file beside the package
  (a copy exported with ``git archive``, so that edits to the checkout do not reach a
  ladder that runs for hours)."""
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                          capture_output=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  try:
    with open(os.path.join(os.path.dirname(HERE), "CODE_VERSION")) as f:
      return f.read().strip()
  except OSError:
    return "unknown"


# ----------------------------------------------------------------------------- racing


def reach(entry: dict, target: float) -> int | None:
  """The step of a run's first held-out evaluation at or below `target` (None: never)."""
  if entry["diverged"]:
    return None
  for step, held_out in entry["evals"]:
    if _number(held_out) <= target:
      return int(step)
  return None


def _median(values) -> float | None:
  finite = [v for v in values if v is not None and math.isfinite(v)]
  return float(np.median(finite)) if finite else None


def stage_target(record: Record, stage: str) -> float | None:
  """AdamW's median final held-out loss over its final setting's seeds at `stage`."""
  final = record.final(stage, BASELINE)
  if final is None or final["kind"] != "final":
    return None
  runs = _final_runs(record, stage, final)
  return _median([score(r) for r in runs])


def _final_runs(record: Record, stage: str, final: dict) -> list[dict]:
  runs = [record.run(stage, final["row"], final["lr"], final["overrides"], s)
          for s in range(final.get("seeds", SEEDS))]
  return [r for r in runs if r is not None]


def steps_ratios(record: Record, stage: str, row: str) -> list[float | None]:
  """Per seed of `row`'s final setting: its steps to the target / AdamW's median steps."""
  target = stage_target(record, stage)
  final, base = record.final(stage, row), record.final(stage, BASELINE)
  if target is None or final is None or final["kind"] != "final":
    return []
  base_steps = _median([reach(r, target) for r in _final_runs(record, stage, base)])
  mine = [reach(r, target) for r in _final_runs(record, stage, final)]
  return [s / base_steps if s is not None and base_steps else None for s in mine]


def run_entry(stage: Stage, stage_name: str, row: str, purpose: str, lr: float,
              overrides: dict, seed: int, config, corpus, result, wall: float,
              compile_s: float, extra: dict | None = None) -> dict:
  """A finished run as a record line: its setting, final losses and curves.

  ``evals``: ``[step, held-out loss]`` at every evaluation; ``train_curve``: the 10-step
  running mean of the minibatch loss at the same steps; ``epochs``: the corpus's training
  bytes the run read (tokens / training bytes); ``step_ms_shared``: its mean step time on
  the machine as it was (shared: indicative only); ``run_s``: the run's wall time,
  ``compile_s`` of it compiling.
  """
  tokens = config.steps * config.batch_size * config.context
  loss = np.asarray(result.loss, dtype=np.float64)
  window = np.convolve(loss, np.ones(10) / 10, mode="valid") if len(loss) >= 10 else loss
  return {
      "kind": "run", "stage": stage_name, "size": stage.size, "horizon": stage.horizon,
      "row": row, "purpose": purpose, "lr": float(lr), "overrides": overrides,
      "seed": seed, "steps": config.steps, "epochs": tokens / len(corpus.train),
      "final_eval": result.final_eval, "final_train": result.final_train,
      "diverged": result.diverged,
      "evals": [[int(s), float(ev)] for s, _, _, ev in result.evals],
      "train_curve": [[int(s), float(window[min(max(s - 10, 0), len(window) - 1)])]
                      for s, _, _, _ in result.evals] if len(window) else [],
      "step_ms_shared": 1e3 * (result.time[-1] / len(result.time)) if result.time else None,
      "run_s": wall, "compile_s": compile_s, "code": _code_version(),
      "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
      **(extra or {})}


class Ladder:
  """Runs stages of the ladder against a record, skipping every run the record holds.

  Args:
    record: the `Record` (appended to as runs finish).
    sizes: the sizes by name (default `benchmarks.lm.SIZES`; the tests pass tiny ones).
    corpus: the data (default `benchmarks.corpus.load()`).
    rows: the rows raced (default `ROWS`).
    stages: the stages by name (default `STAGES`).
    tokens_per_param: the compute-optimal tokens per parameter (the horizon's unit).
    seeds: seeds of a final setting.
    log: receives one line per finished run and per decision.
  """

  def __init__(self, record: Record, sizes: dict | None = None, corpus=None,
               rows: Iterable[str] = ROWS, stages: Iterable[Stage] = STAGES,
               tokens_per_param: float = TOKENS_PER_PARAM, seeds: int = SEEDS,
               evals: int = EVALS, log: Callable[[str], None] = print):
    from benchmarks import lm

    self.record, self.sizes = record, dict(sizes or lm.SIZES)
    self.corpus = corpus
    self.rows, self.stages = tuple(rows), {s.name: s for s in stages}
    self.tokens_per_param, self.seeds, self.evals, self.log = (tokens_per_param, seeds,
                                                                 evals, log)

  # -- one stage --------------------------------------------------------------------------

  def _problem(self, stage: Stage):
    from benchmarks import corpus as corpus_module
    from benchmarks import lm

    if self.corpus is None:
      self.corpus = corpus_module.load()
    config = stage_config(stage, self.sizes, self.tokens_per_param, self.evals)
    if self.record.stage_info(stage.name) is None:
      tokens = config.steps * config.batch_size * config.context
      self.record.append({
          "kind": "stage", "stage": stage.name, "size": stage.size, "horizon": stage.horizon,
          "source": stage.source, "config": dataclasses.asdict(config),
          "parameters": lm.parameter_count(config), "steps": config.steps,
          "tokens": tokens, "tokens_per_param": tokens / lm.parameter_count(config),
          "train_bytes": int(len(self.corpus.train)),
          "epochs": tokens / len(self.corpus.train)})
    return lm.lm_problem(config, self.corpus), config

  def rows_for(self, stage: Stage) -> list[str]:
    """The rows a stage races: every row, or AdamW and the close rows of the sizes below."""
    if not stage.close_rows_only:
      return list(self.rows)
    chosen = {BASELINE}
    below = [s for s in self.stages.values() if s.horizon == stage.horizon
             and s.name != stage.name and not s.close_rows_only]
    for other in below:
      ratios = {row: _median(steps_ratios(self.record, other.name, row))
                for row in self.rows if row != BASELINE}
      reached = {r: v for r, v in ratios.items() if v is not None}
      if not reached:
        continue
      best = min(reached.values())
      chosen |= {r for r, v in reached.items() if v <= WITHIN * best}
    return [r for r in self.rows if r in chosen]

  def run_stage(self, name: str) -> None:
    from benchmarks.optimizers import OPTIMIZERS

    if name not in self.stages:
      raise ValueError(f"stage {name!r} is not one of {sorted(self.stages)}")
    stage = self.stages[name]
    if stage.source is not None:
      missing = [r for r in self.rows_for(stage) if self._source_final(stage, r) is None]
      if missing:
        raise ValueError(f"stage {name}: its source {stage.source} has no tuned setting for "
                         f"{missing}; run {stage.source} first")
    problem, config = self._problem(stage)
    t_stage = time.perf_counter()
    for row in self.rows_for(stage):
      if self.record.final(name, row) is not None:
        continue
      spec = OPTIMIZERS[row]
      trainers: dict = {}
      try:
        self._tune_row(stage, problem, config, spec, trainers)
      except Exception as err:  # a row that cannot run is recorded, not fatal
        self.record.append({"kind": "failed", "stage": name, "row": row,
                            "error": f"{type(err).__name__}: {str(err)[:300]}"})
        self.log(f"[{name}] {row} failed: {type(err).__name__}: {str(err)[:200]}")
    self.log(f"[{name}] done ({time.perf_counter() - t_stage:.0f} s in this sitting)")

  def _source_final(self, stage: Stage, row: str) -> dict | None:
    """The tuned setting a row carries into `stage`: its source's, else the nearest below."""
    name = stage.source
    while name is not None:
      final = self.record.final(name, row)
      if final is not None and final["kind"] == "final":
        return final
      name = self.stages[name].source if name in self.stages else None
    return None

  def _train(self, stage: Stage, problem, config, spec, trainers: dict, lr: float,
             overrides: dict, seed: int, purpose: str) -> float:
    from benchmarks.runner import Trainer

    done = self.record.run(stage.name, spec.name, lr, overrides, seed)
    if done is not None:
      return score(done)
    key = json.dumps(overrides, sort_keys=True)
    if key not in trainers:
      trainers[key] = Trainer(problem, spec, config.steps, overrides)
    t0, compiling = time.perf_counter(), trainers[key].compiled.compile_s
    result, _ = trainers[key].run(lr, seed)
    wall = time.perf_counter() - t0
    compile_s = trainers[key].compiled.compile_s - compiling
    entry = self.record.append(run_entry(stage, stage.name, spec.name, purpose, lr, overrides,
                                         seed, config, self.corpus, result, wall, compile_s))
    self.log(f"[{stage.name}] {spec.name} {purpose} lr={lr:.4g} {overrides or ''} "
             f"seed={seed}: held-out {entry['final_eval']} ({wall:.0f} s)")
    return score(entry)

  def _tune_row(self, stage: Stage, problem, config, spec, trainers: dict) -> None:
    from benchmarks.optimizers import sweep_grid
    from benchmarks.runner import bracketed_sweep

    row = spec.name
    train = lambda lr, overrides, purpose, seed=0: self._train(
        stage, problem, config, spec, trainers, lr, overrides, seed, purpose)
    if stage.source is None:
      overrides: dict = {}
      grid = sweep_grid(spec, FULL_POINTS, COARSE)
      scores, best, edge = bracketed_sweep(grid, COARSE, FULL_EXTEND,
                                           lambda lr: train(lr, {}, "lr"))
      for lr in (best / FINE, best * FINE):
        scores[lr] = train(lr, {}, "refine")
      best = min(scores, key=lambda lr: (scores[lr], lr))
      overrides = self._second(spec, best, scores[best], train)
      centre = None
    else:
      source = self._source_final(stage, row)
      centre, overrides = float(source["lr"]), dict(source["overrides"])
      grid = [centre / FINE, centre, centre * FINE]
      scores, best, edge = bracketed_sweep(grid, FINE, TRANSFER_EXTEND,
                                           lambda lr: train(lr, overrides, "lr"))
    for seed in range(1, self.seeds):
      train(best, overrides, "seed", seed)
    runs = self.record.runs(stage.name, row)
    self.record.append({"kind": "final", "stage": stage.name, "row": row, "lr": float(best),
                        "overrides": overrides, "edge": edge, "centre": centre,
                        "seeds": self.seeds, "runs": len(runs),
                        "run_s": sum(_number(r["run_s"]) for r in runs)})
    self.log(f"[{stage.name}] {row}: lr {best:.4g} {overrides or ''}"
             + (f" (edge {edge})" if edge else "") + f", {len(runs)} runs")

  def _second(self, spec, lr: float, default_score: float, train) -> dict:
    """The second setting at `lr`: AdamW's strength test, or the row's 3-point grid."""
    if spec.name == BASELINE:
      (k1, v1s), (k2, v2s) = STRENGTH
      candidates = [{k1: a, k2: b} for a in v1s for b in v2s]
    elif spec.second is not None:
      keyword, values = spec.second
      candidates = [{keyword: v} for v in values[1:]]
    else:
      return {}
    best, best_score = {}, default_score
    for overrides in candidates:
      score = train(lr, overrides, "strength" if spec.name == BASELINE else "second")
      if score < best_score:
        best, best_score = overrides, score
    return best


# ----------------------------------------------------------------------------- timing


def retime(record: Record, timing_path: str, corpus=None,
           rounds: int = 7, block: int = 20, only_sizes: Iterable[str] | None = None,
           log: Callable[[str], None] = print) -> list[dict]:
  """Measures each row's median step time per size at its final setting; appends to timing.

  Per size, every row with a final setting at some stage of that size (the shortest
  horizon's) is compiled and warmed up, then timed in `rounds` interleaved rounds of
  blocks of at least `block` steps (`benchmarks.runner.interleaved_step_times`).
  """
  from benchmarks import corpus as corpus_module
  from benchmarks import lm
  from benchmarks.optimizers import OPTIMIZERS
  from benchmarks.runner import Trainer, interleaved_step_times

  corpus = corpus or corpus_module.load()
  infos = [e for e in record.entries if e["kind"] == "stage"]
  out = []
  for size in dict.fromkeys(e["size"] for e in infos):
    if only_sizes is not None and size not in only_sizes:
      continue
    stages = sorted((e for e in infos if e["size"] == size), key=lambda e: e["horizon"])
    finals = {}
    for info in stages:
      for final in record.finals(info["stage"]):
        finals.setdefault(final["row"], (info, final))
    if not finals:
      continue
    config = lm.LMConfig(**stages[0]["config"])
    problem = lm.lm_problem(config, corpus)
    entries = [(row, Trainer(problem, OPTIMIZERS[row], config.steps, final["overrides"]),
                float(final["lr"])) for row, (info, final) in finals.items()]
    load_before = os.getloadavg()[0]
    samples = interleaved_step_times(entries, rounds, block)
    load_after = os.getloadavg()[0]
    out += append_timing(timing_path, size, samples,
                         {row: final["overrides"] for row, (_, final) in finals.items()},
                         rounds, (load_before, load_after), log)
  return out


def append_timing(path: str, size: str, samples: dict, overrides: dict, rounds: int,
                  load: tuple | None = None, log: Callable[[str], None] = print) -> list[dict]:
  """Appends one timing line per row (``step_s``: the median of its rounds) to `path`."""
  out = []
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  for row, values in samples.items():
    entry = _round({
        "kind": "timing", "size": size, "row": row, "overrides": overrides.get(row, {}),
        "step_s": float(np.median(values)), "samples": list(values), "rounds": rounds,
        "load": list(load) if load else list(os.getloadavg()[:1]),
        "machine": _machine(), "code": _code_version(),
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"})
    with open(path, "a") as f:
      f.write(json.dumps(entry) + "\n")
    out.append(entry)
    log(f"[timing] {size} {row}: {entry['step_s'] * 1e3:.3g} ms/step")
  return out


def _machine() -> str:
  import platform

  import jax
  cpu = platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  return f"{jax.devices()[0].platform}, {cpu}, {os.cpu_count()} cores"


def read_timing(path: str) -> dict:
  """``{(size, row): step seconds}`` from a timing file, the latest measurement winning."""
  out = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          e = json.loads(line)
          out[(e["size"], e["row"])] = float(e["step_s"])
  return out


# ----------------------------------------------------------------------------- summary


def summarize(record: Record, timing: dict | None = None) -> list[dict]:
  """One dict per (stage, row) with a final setting: losses, ratios, configuration.

  ``steps_ratio``: per seed, steps to AdamW's median final held-out loss over AdamW's
  median steps to it; ``time_ratio``: the same times the row's step time over AdamW's
  (from `timing`, ``{(size, row): seconds}``; None without a measurement).
  """
  timing = timing or {}
  out = []
  for info in (e for e in record.entries if e["kind"] == "stage"):
    stage = info["stage"]
    target = stage_target(record, stage)
    for final in record.finals(stage):
      row = final["row"]
      runs = _final_runs(record, stage, final)
      ratios = steps_ratios(record, stage, row)
      step_s, base_s = timing.get((info["size"], row)), timing.get((info["size"], BASELINE))
      factor = step_s / base_s if step_s and base_s else None
      out.append({
          "stage": stage, "size": info["size"], "horizon": info["horizon"],
          "parameters": info["parameters"], "steps": info["steps"], "row": row,
          "lr": final["lr"], "overrides": final["overrides"], "edge": final["edge"],
          "centre": final["centre"], "runs": final["runs"], "run_s": final.get("run_s"),
          "epochs": info["epochs"], "target": target,
          "final_eval": [score(r) for r in runs],
          "steps_to_target": [reach(r, target) if target is not None else None for r in runs],
          "steps_ratio": ratios,
          "time_ratio": [v * factor if v is not None and factor else None for v in ratios],
          "step_s": step_s})
  return out


_NAMES = {"adamw": "AdamW", "soap": "SOAP", "kfac": "K-FAC", "shampoo": "Shampoo",
          "muon": "Muon", "psgd_kron": "PSGD-Kron"}


def _spread(values) -> str:
  finite = [v for v in values if v is not None and math.isfinite(v)]
  if not finite:
    return "does not reach it"
  text = f"{np.median(finite):.3g}"
  if len(finite) > 1 and max(finite) > min(finite):
    text += f" [{min(finite):.3g}, {max(finite):.3g}]"
  if len(finite) < len(values):
    text += f" ({len(finite)} of {len(values)})"
  return text


def _config_text(s: dict) -> str:
  text = f"{s['lr']:.3g}"
  if s["overrides"]:
    text += "; " + ", ".join(f"{k} {v:g}" for k, v in s["overrides"].items())
  if s["centre"]:
    text += f" ({s['lr'] / s['centre']:.2g}x the transferred {s['centre']:.3g})"
  if s["edge"]:
    text += f" (edge {s['edge']})"
  return text


def markdown(summary: list[dict]) -> str:
  """One table per stage: each row's setting, final loss and speed-ups, medians [min, max]."""
  out = []
  for stage in dict.fromkeys(s["stage"] for s in summary):
    rows = [s for s in summary if s["stage"] == stage]
    first = rows[0]
    target = first["target"]
    runs = sum(s["runs"] for s in rows)
    hours = sum(s["run_s"] or 0.0 for s in rows) / 3600
    out.append(f"#### {stage}: {first['parameters']:,} parameters, {first['steps']:,} steps "
               f"({first['epochs']:.3g} epochs of the corpus); target "
               + (f"{target:.4f}" if target is not None else "not yet set")
               + f"; {len(rows)} rows finished, {runs} runs, {hours:.2f} h of runs\n")
    out.append("| row | learning rate; second setting | runs | final held-out loss | "
               "steps to AdamW's loss (x AdamW) | seconds (x AdamW) |")
    out.append("|---|---|---|---|---|---|")
    for s in sorted(rows, key=lambda s: _median(s["final_eval"]) or math.inf):
      seconds = _spread(s["time_ratio"]) if s["step_s"] else "not timed yet"
      out.append(f"| {_NAMES.get(s['row'], s['row'])} | {_config_text(s)} | {s['runs']} | "
                 f"{_spread(s['final_eval'])} | {_spread(s['steps_ratio'])} | {seconds} |")
    out.append("")
  return "\n".join(out)


# ----------------------------------------------------------------------------- figures


def _speedups(values) -> tuple[float, float, float] | None:
  speed = [1.0 / v for v in values if v]
  if not speed:
    return None
  return float(np.median(speed)), min(speed), max(speed)


def plot_trend(path: str, summary: list[dict], by: str):
  """Speed-up over AdamW (steps, seconds) against model size or horizon, one line a method.

  Args:
    path: the PNG to write.
    summary: `summarize`'s output.
    by: "size" (horizon 1x, x axis parameters) or "horizon" (the stages of the smallest
      size, x axis tokens per parameter).

  Returns:
    The figure (closed); with no finished stage yet, empty panels that say so.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from benchmarks.report import style

  if by == "size":
    chosen = [s for s in summary if s["horizon"] == 1]
    x_of = lambda s: s["parameters"]
    xlabel = "parameters (20 tokens per parameter)"
  else:
    smallest = min((s["parameters"] for s in summary), default=None)
    chosen = [s for s in summary if s["parameters"] == smallest]
    x_of = lambda s: TOKENS_PER_PARAM * s["horizon"]
    xlabel = f"tokens per parameter ({smallest:,} parameters)" if smallest else ""
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
  if not chosen:
    for ax in axes:
      ax.text(0.5, 0.5, "no stage of the ladder has finished yet", transform=ax.transAxes,
              ha="center", va="center")
  rows = list(dict.fromkeys(s["row"] for s in chosen))
  for ax, key, what in zip(axes, ("steps_ratio", "time_ratio"), ("steps", "seconds")):
    for row in rows:
      points = sorted((x_of(s), _speedups(s[key])) for s in chosen if s["row"] == row)
      points = [(x, v) for x, v in points if v is not None]
      if not points:
        continue
      st = style(row)
      xs = [x for x, _ in points]
      med = [v[0] for _, v in points]
      err = [[v[0] - v[1] for _, v in points], [v[2] - v[0] for _, v in points]]
      ax.errorbar(xs, med, yerr=err, color=st["color"], marker=st["marker"], capsize=3,
                  label=_NAMES.get(row, row))
      ax.annotate(_NAMES.get(row, row), (xs[-1], med[-1]), textcoords="offset points",
                  xytext=(6, 0), fontsize=8, color=st["color"], va="center")
    ax.set_xscale("log")
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"speed-up over AdamW in {what} (>1: faster)")
    ax.grid(True, which="both", alpha=0.3)
    if what == "seconds" and not any(s["step_s"] for s in chosen):
      ax.text(0.5, 0.5, "no step times measured yet\n(python -m benchmarks retime)",
              transform=ax.transAxes, ha="center", va="center", fontsize=9)
  if chosen:
    axes[0].legend(fontsize=8)
  fig.suptitle("Speed-up to AdamW's final held-out loss, median and [min, max] over 3 seeds, "
               + ("against model size" if by == "size" else "against horizon"), fontsize=10)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return fig


def plot_curves(path: str, record: Record, stage: str):
  """Held-out loss against steps of every row's final setting at `stage` (seed 0), with
  AdamW's median final loss (the target) as a horizontal line; None without finals."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from benchmarks.report import style

  finals = record.finals(stage)
  if not finals:
    return None
  fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
  for final in finals:
    runs = _final_runs(record, stage, final)
    if not runs:
      continue
    steps, losses = zip(*[(s, _number(v)) for s, v in runs[0]["evals"]])
    st = style(final["row"])
    ax.plot(steps, losses, color=st["color"], marker=st["marker"], markersize=3,
            label=f"{_NAMES.get(final['row'], final['row'])} (lr {final['lr']:.3g})")
  target = stage_target(record, stage)
  if target is not None:
    ax.axhline(target, color="k", linewidth=0.8)
  lows = [min(_number(v) for _, v in r["evals"]) for f in finals
          for r in _final_runs(record, stage, f)[:1]]
  if lows:
    ax.set_ylim(min(lows) - 0.05, min(lows) + 1.5)
  info = record.stage_info(stage) or {}
  ax.set_xlabel("step")
  ax.set_ylabel("held-out loss (nats per byte)")
  ax.set_title(f"{stage}: {info.get('parameters', 0):,} parameters, "
               f"{info.get('steps', 0):,} steps; black line: AdamW's final loss", fontsize=10)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return fig


def draw_figures(folder: str, record_name: str = RECORD_NAME, trends: bool = True) -> list[str]:
  """Draws a folder's figures from its record and timing: ``sizes.png`` and
  ``horizons.png`` (with `trends`) and ``curves-<stage>.png`` for every stage."""
  record_path = os.path.join(folder, record_name)
  if not os.path.exists(record_path):
    return []
  record = Record(record_path)
  summary = summarize(record, read_timing(os.path.join(folder, TIMING_NAME)))
  written = []
  if trends:
    for by, name in (("size", "sizes.png"), ("horizon", "horizons.png")):
      plot_trend(os.path.join(folder, name), summary, by)
      written.append(name)
  for info in (e for e in record.entries if e["kind"] == "stage"):
    name = f"curves-{info['stage'].replace('@', '-')}.png"
    if plot_curves(os.path.join(folder, name), record, info["stage"]) is not None:
      written.append(name)
  return written


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks ladder", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--stages", default=",".join(s.name for s in STAGES),
                      help="comma-separated stages, run in this order")
  parser.add_argument("--dir", default=DEFAULT_DIR,
                      help=f"folder of the record and timing (default {DEFAULT_DIR})")
  parser.add_argument("--report", action="store_true",
                      help="print the tables from the record and write results.md; no runs")
  parser.add_argument("--retime", action="store_true",
                      help="measure step times of the final settings (a quiet machine)")
  parser.add_argument("--sizes", default=None, help="with --retime: only these sizes")
  args = parser.parse_args(argv)
  record = Record(os.path.join(args.dir, RECORD_NAME))
  timing_path = os.path.join(args.dir, TIMING_NAME)
  if args.retime:
    retime(record, timing_path,
           only_sizes=args.sizes.split(",") if args.sizes else None)
    return 0
  if args.report:
    text = markdown(summarize(record, read_timing(timing_path)))
    print(text)
    with open(os.path.join(args.dir, "results.md"), "w") as f:
      f.write(text)
    return 0
  known = {s.name for s in STAGES}
  names = [n.strip() for n in args.stages.split(",") if n.strip()]
  unknown = [n for n in names if n not in known]
  if unknown:
    raise SystemExit(f"--stages: unknown {unknown}; stages: {sorted(known)}")
  ladder = Ladder(record, log=lambda text: print(text, flush=True))
  for name in names:
    t0 = time.perf_counter()
    ladder.run_stage(name)
    print(f"[{name}] finished in {time.perf_counter() - t0:.0f} s", flush=True)
  return 0


if __name__ == "__main__":
  # As `python -m benchmarks` does: synchronous CPU dispatch (a batched eigendecomposition
  # inside an asynchronously dispatched step can deadlock a 2-core machine's pool).
  import jax
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  sys.exit(main())
