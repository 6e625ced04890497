"""`python -m benchmarks quick|full|list`: every optimizer on every problem, side by side.

  python -m benchmarks list                      # problems and optimizers (and what is missing)
  python -m benchmarks quick                     # small sizes, one seed, a few minutes on a CPU
  python -m benchmarks full                      # longer runs, 3 seeds, 5-point lr sweeps
  python -m benchmarks quick --only digits_mlp,adam,sophia_g --steps 100 --out /tmp/b
  python -m benchmarks full --skip char_transformer,dist_shampoo  # ~45 min on a CPU core

`--only` takes a comma-separated list of problem and optimizer names (each restricts its
kind; Adam always runs, since time and memory are reported as multiples of Adam's); `--skip`
leaves the named problems and optimizers out. On a CPU, `quick` compiles at XLA's backend
optimisation level 2 (`--cpu-opt-level N` sets it; `full` keeps XLA's default, 3).
Writes OUT/results.md (the tables), OUT/runs.jsonl (every run of every sweep with its curves,
then one summary line per row) and OUT/<problem>.png (loss against steps and wall time).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import time

# One OpenBLAS thread per LAPACK call (see README, "A note on CPUs"); set before JAX loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _machine() -> str:
  import jax
  dev = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return (f"{dev.platform} ({getattr(dev, 'device_kind', '')}), {cpu}, {cores} cores, "
          f"Python {platform.python_version()}, jax {jax.__version__}")


def _compile_note(options: dict | None) -> str:
  if not options:
    return ""
  return ("; steps compiled with " + ", ".join(f"{k}={v}" for k, v in options.items())
          + " (XLA's default is 3; `--cpu-opt-level 3` restores it)")


def _parse(argv):
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", choices=["quick", "full", "list"])
  parser.add_argument("--only", default="",
                      help="comma-separated problem and/or optimizer names")
  parser.add_argument("--skip", default="",
                      help="comma-separated problem and/or optimizer names to leave out")
  parser.add_argument("--steps", type=int, default=None, help="steps per run (all problems)")
  parser.add_argument("--seeds", type=int, default=None, help="seeds at the best lr")
  parser.add_argument("--sweep", type=int, default=None,
                      help="learning rates per optimizer (default: 3 quick, 5 full)")
  parser.add_argument("--out", default="bench_out", help="output directory (default bench_out/)")
  parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
  parser.add_argument("--cpu-opt-level", type=int, choices=range(4), default=None,
                      help="XLA backend optimisation level of the compiled steps on a CPU "
                           "(default: 2 quick, XLA's own 3 full)")
  return parser.parse_args(argv)


def _names(text: str, flag: str) -> list[str]:
  from benchmarks.optimizers import OPTIMIZERS
  from benchmarks.problems import problem_names

  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in problem_names() and n not in OPTIMIZERS]
  if unknown:
    raise SystemExit(f"{flag}: unknown name(s) {unknown}; problems: {problem_names()}; "
                     f"optimizers: {list(OPTIMIZERS)}")
  return names


def _select(only: str, skip: str = ""):
  from benchmarks.optimizers import OPTIMIZERS
  from benchmarks.problems import problem_names

  problems, optimizers = problem_names(), list(OPTIMIZERS)
  names, skipped = _names(only, "--only"), set(_names(skip, "--skip"))
  if "adam" in skipped:
    raise SystemExit("--skip: adam is the baseline of every ratio and cannot be skipped")
  chosen_p = [n for n in problems if n in names] or problems
  chosen_o = [n for n in optimizers if n in names] or optimizers
  if "adam" not in chosen_o:
    chosen_o.insert(0, "adam")
  return ([n for n in chosen_p if n not in skipped],
          [n for n in chosen_o if n not in skipped])


def _list() -> None:
  from benchmarks.optimizers import OPTIMIZERS, available, sweep_grid
  from benchmarks.problems import PROBLEMS, get_problem

  print("problems:")
  for name in PROBLEMS:
    p = get_problem(name)
    print(f"  {name:18s} {p.description}  (target {p.target_loss:g}, steps {p.steps})")
  print("optimizers:")
  for name, spec in OPTIMIZERS.items():
    reason = available(spec)
    needs = ",".join(spec.needs) or "-"
    state = "ok" if reason is None else f"SKIPPED ({reason})"
    if spec.in_quick is not None:
      state += " (quick: restricted)"
    grid = ", ".join(f"{lr:.2g}" for lr in sweep_grid(spec, 3))  # the quick grid
    print(f"  {name:20s} [{spec.family:11s}] needs {needs:10s} lr {grid:22s} {state}"
          f"  {spec.note}")


class _NoProgress:
  """Stands in for tqdm when it is not installed."""

  def __init__(self, *args, **kwargs):
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def update(self, n=1):
    pass

  def set_postfix_str(self, text):
    pass

  @staticmethod
  def write(text):
    print(text, file=sys.stderr)


def _synchronous_cpu_dispatch() -> None:
  # jaxlib 0.10.2 on CPU can deadlock when a batched LAPACK call (the eigendecompositions of
  # K-FAC and Shampoo) runs inside an asynchronously dispatched executable: the executable
  # occupies an intra-op pool thread and the LAPACK batch waits for tasks queued on the
  # same, exhausted pool (2 threads on a 2-core machine). Synchronous dispatch runs the
  # executable on the calling thread, which removes that case (two such calls running
  # concurrently inside one step can still block both threads: see the Shampoo row).
  # Step times are taken synchronously anyway.
  import jax
  jax.config.update("jax_cpu_enable_async_dispatch", False)


def main(argv=None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  _synchronous_cpu_dispatch()
  if args.command == "list":
    _list()
    return 0

  try:
    from tqdm.auto import tqdm
  except ImportError:  # tqdm is in the bench extra; without it, no progress bar
    tqdm = _NoProgress

  from benchmarks import report
  from benchmarks.optimizers import OPTIMIZERS, available
  from benchmarks.problems import get_problem
  from benchmarks.runner import PRESETS, compiler_options, lr_grid, run_problem

  preset = PRESETS[args.command]
  if args.cpu_opt_level is not None:
    preset = dataclasses.replace(preset, cpu_opt_level=args.cpu_opt_level)
  problem_names, optimizer_names = _select(args.only, args.skip)
  specs, notes = [], []
  for name in optimizer_names:
    reason = available(OPTIMIZERS[name])
    if reason is None:
      specs.append(OPTIMIZERS[name])
    else:
      notes.append(f"{name} skipped: not available here ({reason})")
      print("[skip] " + notes[-1])
  problems = {name: get_problem(name, args.command) for name in problem_names}
  seeds = args.seeds if args.seeds is not None else preset.seeds
  named = {n.strip() for n in args.only.split(",")}
  plan = [(p, [s for s in specs
               if s.applies_to(problems[p], "full" if s.name in named else args.command)])
          for p in problem_names]
  total = sum(len(lr_grid(problems[p], s, preset, args.sweep)) + max(seeds - 1, 0)
              for p, p_specs in plan for s in p_specs)
  os.makedirs(args.out, exist_ok=True)

  start = time.perf_counter()
  rows, runs = [], []
  with tqdm(total=total, desc=f"benchmarks {args.command}", unit="run",
            file=sys.stderr, dynamic_ncols=True) as bar:
    for name, prob_specs in plan:
      prob_rows, prob_runs, prob_notes = run_problem(
          problems[name], prob_specs, preset, steps=args.steps, seeds=seeds,
          sweep_points=args.sweep, progress=bar, log=tqdm.write)
      rows += prob_rows
      runs += prob_runs
      notes += prob_notes
      if prob_rows and not args.no_plots:
        report.plot_problem(os.path.join(args.out, f"{name}.png"), problems[name], prob_rows)
  elapsed = time.perf_counter() - start

  argv_text = " ".join(sys.argv[1:] if argv is None else argv)
  header = (f"# secondorder benchmarks: `python -m benchmarks {argv_text}`\n\n"
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on "
            f"{_machine()}; total {elapsed:.0f} s. Learning rate: best of a sweep (the same "
            "grid of multiples of each optimizer's centre, see runs.jsonl) by final training "
            "loss on seed 0; "
            "losses are medians over seeds [min, max]; steps/seconds to target use the "
            "10-step running mean of the minibatch loss; seconds count optimizer steps only"
            f"{_compile_note(compiler_options(preset))}.\n")
  table = report.markdown(rows, problems)
  text = header + "\n" + table
  if notes:
    text += "\nNotes:\n" + "".join(f"- {n}\n" for n in notes)
  print(text)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(text)
  report.write_jsonl(os.path.join(args.out, "runs.jsonl"), runs, rows)
  print(f"wrote {args.out}/results.md, {args.out}/runs.jsonl"
        + ("" if args.no_plots else f", {args.out}/<problem>.png") + f" in {elapsed:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
