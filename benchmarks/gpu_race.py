"""The race on one GPU: AdamW, SOAP, K-FAC and Muon at the `gpu` size, at the ladder's rates.

``python -m benchmarks gpu`` trains the language model at its ``gpu`` size (6 layers, width
384, 10,829,952 parameters, batch 64 x context 256) for `STEPS` steps (16.4M tokens: 1.5
tokens per parameter, a thirteenth of the compute-optimal horizon: what fits in 8 minutes
on one H100 with start-up and compilation) and races:

1. AdamW, SOAP, K-FAC and Muon, one run each (seed 0) at the rate (and second setting) the
   size ladder tuned at its largest size (``docs/results/ladder/ladder.jsonl``; a row the
   ladder has not tuned falls back to its registry centre, and the record says so);
2. AdamW at the rate's two neighbours (x 10^-0.25, x 10^0.25), and so the best method
   (lowest held-out loss of the three): a 3-point check that the transferred rates hold;
3. the four rows' step times, interleaved (3 rounds), when the budget allows.

Before each run the script predicts its time from the runs before it (the longest of the
row's, else of any) and skips it when the budget (`BUDGET_S`, counted from the process's
start) would be passed; every finished run is appended to ``docs/results/gpu/gpu.jsonl``
at once (the ladder's record format), so a cut-off run keeps what it finished and a second
call resumes. The corpus must be the ladder's (`benchmarks.corpus`): a GPU machine with
another Python carries the built ``benchmarks/out/corpus`` with the checkout.

Usage::

  python -m benchmarks gpu                              # the race (about 6 minutes on an H100)
  python -m benchmarks gpu --size tiny --steps 8 --dir /tmp/g   # a check on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from benchmarks import ladder

__all__ = ["ROWS", "STEPS", "BUDGET_S", "transferred", "main"]

START = time.perf_counter()
ROWS = ("adamw", "soap", "kfac", "muon")
STEPS = 1000
BUDGET_S = 420.0          # of the 8 minutes: the rest is start-up and compilation
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = os.path.join(os.path.dirname(HERE), "docs", "results", "gpu")


def transferred(record: ladder.Record, row: str) -> tuple[float | None, dict, str | None]:
  """``(lr, overrides, stage)`` of `row`'s tuned setting at the ladder's largest size (at the
  compute-optimal horizon), or ``(None, {}, None)`` when the ladder has not tuned it."""
  best = None
  for info in (e for e in record.entries if e["kind"] == "stage" and e["horizon"] == 1):
    final = record.final(info["stage"], row)
    if final is not None and final["kind"] == "final" and (
        best is None or info["parameters"] > best[0]):
      best = (info["parameters"], final, info["stage"])
  if best is None:
    return None, {}, None
  return float(best[1]["lr"]), dict(best[1]["overrides"]), best[2]


def main(argv=None) -> int:
  from benchmarks import corpus as corpus_module
  from benchmarks import lm
  from benchmarks.optimizers import OPTIMIZERS
  from benchmarks.runner import Trainer, interleaved_step_times

  parser = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="gpu", choices=sorted(lm.SIZES))
  parser.add_argument("--steps", type=int, default=STEPS)
  parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                      help="seconds from the process's start after which no run starts")
  parser.add_argument("--dir", default=DEFAULT_DIR, help="the record's folder")
  parser.add_argument("--ladder", default=os.path.join(ladder.DEFAULT_DIR, ladder.RECORD_NAME),
                      help="the ladder's record (the transferred rates)")
  parser.add_argument("--corpus", default=corpus_module.DEFAULT_PATH)
  parser.add_argument("--rows", default=",".join(ROWS),
                      help="comma-separated rows (default: the four; the first is the baseline)")
  args = parser.parse_args(argv)
  rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
  if not rows or rows[0] != ladder.BASELINE or any(r not in OPTIMIZERS for r in rows):
    raise SystemExit(f"--rows must start with {ladder.BASELINE} and name rows of the "
                     f"registry, got {args.rows!r}")
  if args.steps < 1:
    raise SystemExit(f"--steps must be a positive integer, got {args.steps}")

  import jax

  data = corpus_module.load(args.corpus)
  config = dataclasses.replace(lm.SIZES[args.size], steps=args.steps,
                               eval_every=max(1, args.steps // ladder.EVALS))
  problem = lm.lm_problem(config, data)
  stage = ladder.Stage(args.size, 1)
  stage_name = f"{args.size}@{args.steps}steps"
  record = ladder.Record(os.path.join(args.dir, "gpu.jsonl"))
  source = ladder.Record(args.ladder)
  tokens = config.steps * config.batch_size * config.context
  if record.stage_info(stage_name) is None:
    record.append({
        "kind": "stage", "stage": stage_name, "size": args.size, "horizon": 1,
        "source": args.ladder, "config": dataclasses.asdict(config),
        "parameters": lm.parameter_count(config), "steps": config.steps, "tokens": tokens,
        "tokens_per_param": tokens / lm.parameter_count(config),
        "train_bytes": int(len(data.train)), "epochs": tokens / len(data.train),
        "device": str(jax.devices()[0])})
  say = lambda text: print(f"[{time.perf_counter() - START:5.0f} s] {text}", flush=True)
  settings = {}
  for row in rows:
    lr, overrides, from_stage = transferred(source, row)
    if lr is None:
      lr = OPTIMIZERS[row].lr
    settings[row] = (lr, overrides, from_stage)
    say(f"{row}: lr {lr:.4g} {overrides or ''} "
        f"({'from ' + from_stage if from_stage else 'untuned: the registry centre'})")

  trainers: dict = {}
  spent: dict[str, list[float]] = {}   # seconds of each run, compilation excluded
  first: dict[str, float] = {}          # seconds of each row's first run, compilation included

  def train(row: str, lr: float, purpose: str) -> float | None:
    overrides = settings[row][1]
    done = record.run(stage_name, row, lr, overrides, 0)
    if done is not None:
      return ladder.score(done)
    # A row's next run takes about its last one less compilation; a row's first run about
    # the longest first run so far (compilation included).
    guess = (spent[row][-1] if row in spent else max(first.values(), default=0.0))
    if time.perf_counter() - START + guess > args.budget_s:
      say(f"{row} lr {lr:.4g}: skipped (about {guess:.0f} s left the budget behind)")
      record.append({"kind": "skipped", "stage": stage_name, "row": row, "lr": lr,
                     "overrides": overrides, "reason": "time budget"})
      return None
    if row not in trainers:
      trainers[row] = Trainer(problem, OPTIMIZERS[row], config.steps, overrides)
    t0, compiling = time.perf_counter(), trainers[row].compiled.compile_s
    result, _ = trainers[row].run(lr, 0)
    wall = time.perf_counter() - t0
    compile_s = trainers[row].compiled.compile_s - compiling
    first.setdefault(row, wall)
    spent.setdefault(row, []).append(wall - compile_s)
    entry = record.append(ladder.run_entry(
        stage, stage_name, row, purpose, lr, overrides, 0, config, data, result, wall,
        compile_s, {"transferred_from": settings[row][2]}))
    say(f"{row} lr {lr:.4g}: held-out {entry['final_eval']} ({wall:.0f} s)")
    return ladder.score(entry)

  scores = {row: {} for row in rows}
  for row in rows:
    scores[row][settings[row][0]] = train(row, settings[row][0], "transferred")
  methods = [r for r in rows if r != ladder.BASELINE and scores[r][settings[r][0]] is not None]
  best_method = min(methods, key=lambda r: scores[r][settings[r][0]], default=None)
  for row in [ladder.BASELINE] + ([best_method] if best_method else []):
    centre = settings[row][0]
    if scores[row].get(centre) is None:  # skipped: no neighbours either
      continue
    for lr in (centre / ladder.FINE, centre * ladder.FINE):
      scores[row][lr] = train(row, lr, "neighbour")
  for row in rows:
    tried = {lr: s for lr, s in scores[row].items() if s is not None}
    previous = record.final(stage_name, row)
    if tried:
      lr = min(tried, key=lambda v: (tried[v], v))
      if previous is None or previous["lr"] != ladder.round_value(lr) or (
          previous["runs"] != len(tried)):
        record.append({"kind": "final", "stage": stage_name, "row": row, "lr": lr,
                       "overrides": settings[row][1], "edge": None,
                       "centre": settings[row][0], "seeds": 1, "runs": len(tried),
                       "run_s": sum(spent.get(row, []))})
  timing_path = os.path.join(args.dir, ladder.TIMING_NAME)
  timed = [r for r in rows if record.final(stage_name, r) is not None]
  timed = [r for r in timed if (args.size, r) not in ladder.read_timing(timing_path)]
  # Three rounds of blocks of at least 20 steps and 20 ms, each row warmed up once more; a
  # row not compiled in this call compiles first (about its first run's time, or 60 s).
  guess = sum(4 * max(20 * min(spent[r]) / config.steps, 0.02) if r in spent
              else first.get(r, 60.0) for r in timed) + 5.0
  if timed and time.perf_counter() - START + guess < args.budget_s:
    finals = {r: record.final(stage_name, r) for r in timed}
    for r in timed:
      if r not in trainers:
        trainers[r] = Trainer(problem, OPTIMIZERS[r], config.steps, settings[r][1])
    samples = interleaved_step_times([(r, trainers[r], float(finals[r]["lr"])) for r in timed],
                                     rounds=3, block=20)
    ladder.append_timing(timing_path, args.size, samples,
                         {r: finals[r]["overrides"] for r in timed}, rounds=3)
  elif timed:
    say("step times: skipped (time budget)")
  summary = ladder.summarize(record, ladder.read_timing(timing_path))
  text = ladder.markdown(summary)
  with open(os.path.join(args.dir, "results.md"), "w") as f:
    f.write(text)
  print(text)
  say(f"wrote {args.dir}/gpu.jsonl, {args.dir}/results.md")
  return 0


if __name__ == "__main__":
  # As `python -m benchmarks` does: synchronous CPU dispatch (a batched eigendecomposition
  # inside an asynchronously dispatched step can deadlock a 2-core machine's pool).
  import jax
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  sys.exit(main())
