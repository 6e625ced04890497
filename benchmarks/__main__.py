"""`python -m benchmarks quick|full|list|ladder|retime|gpu`: every optimizer, side by side.

  python -m benchmarks list                      # problems and optimizers (and what is missing)
  python -m benchmarks quick                     # small sizes, one seed, a few minutes on a CPU
  python -m benchmarks full                      # longer runs, 3 seeds, 5-point lr sweeps
  python -m benchmarks quick --only digits_mlp,adam,sophia_g --steps 100 --out /tmp/b
  python -m benchmarks full --skip char_transformer,dist_shampoo  # about 1 h on 2 CPU cores
  python -m benchmarks full --only lm --size gpu  # the language-model race, GPU-sized
  python -m benchmarks ladder                     # the size ladder, resumable (benchmarks.ladder)
  python -m benchmarks retime                     # the ladder's step times, on a quiet machine
  python -m benchmarks gpu                        # the race on one GPU (benchmarks.gpu_race)

`--only` takes a comma-separated list of problem and optimizer names (each restricts its
kind; each problem's baseline always runs, since time and memory are reported as multiples
of it: Adam, and AdamW on the language model `lm`); `--skip` leaves the named problems and
optimizers out. `--size` sets the language model's size (`benchmarks.lm.SIZES`; default
"tiny" in quick, "cpu" in full). On a CPU, `quick` compiles at XLA's backend
optimisation level 2 (`--cpu-opt-level N` sets it; `full` keeps XLA's default, 3).
Writes OUT/results.md (the tables), OUT/runs.jsonl (every run of every sweep with its curves,
then one summary line per row), OUT/<problem>.png (training and held-out loss against steps
and seconds), OUT/speedups.png (every method's speed-up over the baseline) and OUT/log.txt
(whatever the optimizers' libraries printed or warned, kept off the terminal).
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
  parser.add_argument("--size", default=None,
                      help="the language model's size: tiny, cpu or gpu (default: tiny in "
                           "quick, cpu in full)")
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


def _select(only: str, skip: str = "", preset: str = "full"):
  """(problem names, optimizer names) to run: --only/--skip applied, baselines kept."""
  from benchmarks.optimizers import OPTIMIZERS
  from benchmarks.problems import get_problem, problem_names

  problems, optimizers = problem_names(), list(OPTIMIZERS)
  names, skipped = _names(only, "--only"), set(_names(skip, "--skip"))
  chosen_p = ([n for n in problems if n in names]
              or [n for n in problems if preset != "quick" or get_problem(n, "quick").in_quick])
  chosen_p = [n for n in chosen_p if n not in skipped]
  baselines = list(dict.fromkeys(get_problem(n, "quick").baseline for n in chosen_p))
  for base in baselines:
    if base in skipped:
      raise SystemExit(f"--skip: {base} is the baseline of every ratio and cannot be skipped")
  chosen_o = [n for n in optimizers if n in names] or optimizers
  for base in reversed(baselines):
    if base not in chosen_o:
      chosen_o.insert(0, base)
  return chosen_p, [n for n in chosen_o if n not in skipped]


def _list() -> None:
  from benchmarks.optimizers import OPTIMIZERS, available, sweep_grid
  from benchmarks.problems import PROBLEMS, get_problem

  print("problems (what quick and full run; --only NAME runs a full-only one in quick):")
  for name in PROBLEMS:
    for preset in ("quick", "full"):
      p = get_problem(name, preset)
      if preset == "quick" and not p.in_quick:
        print(f"  {name:18s} quick: not run")
        continue
      goal = (f"race to {p.baseline}'s held-out loss" if p.target_loss is None
              else f"target {p.target_loss:g}")
      print(f"  {name:18s} {preset}: {p.description}  ({goal}, {p.steps[preset]} steps)")
      rows = [n for n, spec in OPTIMIZERS.items() if _runs_on(spec, p, preset, set())]
      print(f"  {'':18s}   rows: {', '.join(rows)}")
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


def _runs_on(spec, problem, preset: str, named: set) -> bool:
  """Whether row `spec` runs on `problem` in `preset` (rows named with --only always apply)."""
  if spec.name == problem.baseline:
    return True
  if preset == "quick" and problem.quick_rows is not None and spec.name not in named:
    return spec.name in problem.quick_rows and spec.applies_to(problem, "full")
  return spec.applies_to(problem, "full" if spec.name in named else preset)


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


# Commands with their own modules: the size ladder, its timing pass and the GPU race.
_DELEGATED = {"ladder": ("benchmarks.ladder", []), "retime": ("benchmarks.ladder", ["--retime"]),
              "gpu": ("benchmarks.gpu_race", [])}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in _DELEGATED:
    import importlib

    module, extra = _DELEGATED[argv[0]]
    _synchronous_cpu_dispatch()
    return importlib.import_module(module).main(extra + argv[1:])
  args = _parse(argv)
  _synchronous_cpu_dispatch()
  if args.command == "list":
    _list()
    return 0

  try:
    from tqdm.auto import tqdm
  except ImportError:  # tqdm is in the bench extra; without it, no progress bar
    tqdm = _NoProgress

  from benchmarks import report, runner
  from benchmarks.optimizers import OPTIMIZERS, available
  from benchmarks.problems import get_problem
  from benchmarks.runner import PRESETS, compiler_options, lr_grid, run_problem

  preset = PRESETS[args.command]
  if args.cpu_opt_level is not None:
    preset = dataclasses.replace(preset, cpu_opt_level=args.cpu_opt_level)
  problem_names, optimizer_names = _select(args.only, args.skip, args.command)
  specs, notes = [], []
  for name in optimizer_names:
    reason = available(OPTIMIZERS[name])
    if reason is None:
      specs.append(OPTIMIZERS[name])
    else:
      notes.append(f"{name} skipped: not available here ({reason})")
      print("[skip] " + notes[-1])
  problems = {name: get_problem(name, args.size if name == "lm" and args.size
                                else args.command) for name in problem_names}
  seeds = args.seeds if args.seeds is not None else preset.seeds
  named = {n.strip() for n in args.only.split(",")}
  plan = [(p, [s for s in specs if _runs_on(s, problems[p], args.command, named)])
          for p in problem_names]
  total = sum(len(lr_grid(problems[p], s, preset, args.sweep)) + max(seeds - 1, 0)
              for p, p_specs in plan for s in p_specs)
  os.makedirs(args.out, exist_ok=True)
  log_path = os.path.join(args.out, "log.txt")
  log_file = open(log_path, "w")

  def capture(text: str) -> None:
    log_file.write(text)
    log_file.flush()

  start = time.perf_counter()
  rows, runs = [], []
  with tqdm(total=total, desc=f"benchmarks {args.command}", unit="run",
            file=sys.stderr, dynamic_ncols=True) as bar:
    for name, prob_specs in plan:
      prob_rows, prob_runs, prob_notes = run_problem(
          problems[name], prob_specs, preset, steps=args.steps, seeds=seeds,
          sweep_points=args.sweep, progress=bar, log=tqdm.write, capture=capture)
      rows += prob_rows
      runs += prob_runs
      notes += prob_notes
      if prob_rows and not args.no_plots:
        report.plot_problem(os.path.join(args.out, f"{name}.png"), problems[name], prob_rows)
  if rows and not args.no_plots:
    report.plot_speedups(os.path.join(args.out, "speedups.png"), rows, problems)
  elapsed = time.perf_counter() - start
  log_file.close()

  argv_text = " ".join(sys.argv[1:] if argv is None else argv)
  header = (f"# secondorder benchmarks: `python -m benchmarks {argv_text}`\n\n"
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on "
            f"{_machine()}; total {elapsed:.0f} s. Learning rate: best of a bracketed sweep "
            f"on seed 0 (the same grid of {preset.sweep_points} multiples of each "
            "optimizer's centre, spaced by sqrt(10) (wider on the sanity problems); while "
            f"the best is the grid's edge, up to {preset.extend} more rates beyond it; runs.jsonl "
            "has every run) by final training loss (the race: final held-out loss); "
            + ("then, at that rate, a second hyperparameter where a method has one (K-FAC's "
               "damping, Sophia's gamma, Shampoo's and SOAP's eps: the default, a tenth and "
               "ten times it, the same 3-point grid for each; shown after the rate); "
               if preset.second_sweep else "") +
            "'runs' counts every run a row spent; losses are medians over seeds [min, max]; "
            "steps/seconds to target use the 10-step running mean of the minibatch loss; "
            + runner.TIMING_NOTE.format(rounds=preset.timing_rounds, block=preset.timing_block)
            + f"{_compile_note(compiler_options(preset))}.\n")
  table = report.markdown(rows, problems, timing="timing as in the header")
  text = header + "\n" + table
  if notes:
    text += "\nNotes:\n" + "".join(f"- {n}\n" for n in notes)
  print(text)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(text)
  report.write_jsonl(os.path.join(args.out, "runs.jsonl"), runs, rows, problems)
  print(f"wrote {args.out}/results.md, {args.out}/runs.jsonl, {log_path}"
        + ("" if args.no_plots else f", {args.out}/<problem>.png, {args.out}/speedups.png")
        + f" in {elapsed:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
