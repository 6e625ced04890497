"""Runs (problem, optimizer, learning rate, seed) and measures what the report tabulates.

Per (problem, optimizer) the training step is compiled once ahead of time (the learning rate
is an argument of the compiled step), so the whole sweep and every seed reuse it. For each
row:

* a *bracketed* learning-rate sweep on seed 0: the same grid of multiples of the row's
  centre for every optimizer; while the best rate is the smallest or the largest tried, one
  more rate a grid step beyond it is tried, at most `Preset.extend` extra rates (the same
  rule for every row). A row whose best rate is still on an edge is marked (`RowResult.edge`);
  `RowResult.runs_spent` counts every run the row took.
* the best setting by final training loss (by final held-out loss on the race problems,
  whose `target_loss` is None), then further seeds at that setting.

Every compiled step is called once on a throw-away state before the first clock starts, so no
"seconds" figure contains compilation or a first call's one-off cost. Step times are
measured separately after all rows of a problem have trained, interleaved across optimizers
(rounds of blocks of steps, median over rounds), so the ratios to the baseline compare like
with like on a shared machine. Whatever a row prints or warns while it builds, compiles and
trains is captured and handed to `capture` (the run's log), not to the terminal.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import math
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.optimizers import OptimizerSpec, sweep_grid
from benchmarks.problems import Problem

__all__ = ["Preset", "PRESETS", "RunResult", "RowResult", "compiler_options", "lr_grid",
           "run_problem", "state_bytes", "bracketed_sweep", "TIMING_NOTE", "Trainer",
           "interleaved_step_times"]


@dataclasses.dataclass(frozen=True)
class Preset:
  name: str
  sweep_points: int        # learning rates tried per optimizer (seed 0)
  seeds: int               # seeds at the best learning rate (including seed 0)
  steps: str | None = None  # key into Problem.steps (defaults to `name`)
  timing_rounds: int = 5
  timing_block: int = 20   # steps per timed block (a multiple of every update interval)
  evals: int = 10          # held-out evaluations per run (plus the initial one)
  overlap_compile: bool = False  # compile the next row in a thread while this one trains
  # XLA's backend (LLVM) optimisation level for the rows' compiled steps on a CPU; None
  # keeps XLA's default (3). Level 2 cuts the small problems' compile time by a quarter
  # (by half on the transformer), with step times within noise of level 3 (README,
  # "Benchmarks").
  cpu_opt_level: int | None = None
  extend: int = 2          # extra learning rates at most, beyond the grid's winning edge
  second_sweep: bool = False  # try each row's second hyperparameter grid at its best lr


PRESETS = {
    "quick": Preset("quick", sweep_points=3, seeds=1, timing_rounds=3, timing_block=10,
                    evals=1, cpu_opt_level=2, extend=1),
    "full": Preset("full", sweep_points=5, seeds=3, timing_rounds=7, extend=3,
                   second_sweep=True),
}

TIMING_NOTE = ("seconds count optimizer steps only, after one untimed warm-up call of every "
               "compiled step (no compilation, no first call); step time is the median over "
               "{rounds} interleaved rounds (each optimizer in turn, a block of at least "
               "{block} steps and ~20 ms each) after all runs of the problem")


@dataclasses.dataclass
class RunResult:
  problem: str
  optimizer: str
  lr: float
  seed: int
  loss: list[float]              # minibatch loss before each step
  time: list[float]              # cumulative seconds of optimizer steps after each step
  evals: list[tuple[int, float, float, float]]  # (step, seconds, train loss, held-out loss)
  final_train: float
  final_eval: float
  diverged: bool
  steps_to_target: int | None
  time_to_target: float | None
  overrides: dict = dataclasses.field(default_factory=dict)  # second hyperparameter, if set

  def as_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class RowResult:
  problem: str
  optimizer: str
  family: str
  best_lr: float
  sweep: dict[float, float]      # lr -> final training loss (seed 0)
  runs: list[RunResult]          # the best learning rate, every seed
  compile_s: float
  state_bytes: int
  step_s: float | None = None    # median seconds per step (filled by the timing phase)
  edge: str | None = None        # "low" / "high": the best rate is still the grid's edge
  runs_spent: int = 0            # every run of the row: sweep, extensions and seeds
  second: dict | None = None     # {"name", "best", "sweep": {value: score}} when swept


def state_bytes(tree) -> int:
  total = 0
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    total += int(getattr(leaf, "nbytes", np.asarray(leaf).nbytes))
  return total


def _smoothed(losses: list[float], window: int) -> np.ndarray:
  x = np.asarray(losses, dtype=np.float64)
  if window <= 1 or len(x) == 0:
    return x
  c = np.cumsum(np.insert(x, 0, 0.0))
  out = np.empty_like(x)
  for i in range(len(x)):
    lo = max(0, i + 1 - window)
    out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
  return out


class _Compiled:
  """The jitted init, step and evaluation of one (problem, optimizer)."""

  def __init__(self, problem: Problem, spec: OptimizerSpec, total_steps: int,
               compiler_options: dict | None = None, overrides: dict | None = None):
    self.problem, self.spec, self.total_steps = problem, spec, total_steps
    self.overrides = overrides or {}
    self.compiler_options = compiler_options
    self._by_lr: dict[float, tuple[Callable, Callable]] = {}
    self._warm: set = set()
    self.compile_s = 0.0

  def _functions(self, lr_value: float | None):
    problem, spec, n = self.problem, self.spec, self.total_steps

    def make(lr):
      tx = spec.build(lr_value if spec.static_lr else lr, n, problem, **self.overrides)
      if problem.schedule is None:
        return tx
      # The problem's schedule shape multiplies the update: a learning-rate schedule for
      # every method whose learning rate scales its final update.
      return optax.chain(tx, optax.scale_by_schedule(problem.schedule(n)))

    def init(params, lr):
      return make(lr).init(params)

    def step(params, opt_state, batch, lr, base_key, t, refresh=None):
      # refresh: None for a transform that schedules itself; True/False for the two steps
      # of a host-scheduled row (`OptimizerSpec.host_refresh`). The step's key is folded
      # in here: an eager fold_in per step costs about as much as a small model's step.
      key = jax.random.fold_in(base_key, t)
      tx = make(lr)
      if spec.value_grad is not None and refresh is not False:
        own_state = opt_state if problem.schedule is None else opt_state[0]
        loss, grads, extra = spec.value_grad(problem, params, batch, own_state, key)
      elif "value_fn" in spec.needs:
        # optax's line-search interface: the value and gradient at params are the line
        # search's last evaluation when the state holds one (deterministic problems only).
        objective = lambda p: problem.loss(p, batch)
        loss, grads = optax.value_and_grad_from_state(objective)(params, state=opt_state)
        extra = {"value": loss, "grad": grads, "value_fn": objective}
      else:
        loss, grads = jax.value_and_grad(problem.loss)(params, batch)
        extra = {}
        if "obj_fn" in spec.needs and refresh is not False:
          extra["obj_fn"] = lambda p: problem.loss(p, batch)
        if "logits_fn" in spec.needs and refresh is not False:
          extra["logits_fn"] = lambda p: problem.logits_fn(p, batch)
        if "kfac_stats" in spec.needs and refresh is False:
          from secondorder.capture import no_new_stats
          extra["kfac_stats"] = no_new_stats()
      if refresh is not None:
        extra["refresh"] = refresh
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
      return optax.apply_updates(params, updates), opt_state, loss

    if spec.refresh_every(problem) is None:
      return jax.jit(init), {None: jax.jit(step)}
    return jax.jit(init), {r: jax.jit(functools.partial(step, refresh=r)) for r in (True, False)}

  def get(self, lr: float, params, batch):
    """(compiled init, step) for `lr`; `step(t, params, state, batch, lr, base_key)` runs
    step t with the key `fold_in(base_key, t)`."""
    key = lr if self.spec.static_lr else None
    if key not in self._by_lr:
      init, steps = self._functions(key)
      lr_arr = jnp.asarray(lr, jnp.float32)
      t0 = time.perf_counter()
      options = self.compiler_options
      # The state's init runs once per run: with options set, it compiles unoptimised.
      init_options = options and {**options, "xla_backend_optimization_level": 0}
      init_c = init.lower(params, lr_arr).compile(init_options)
      state = init_c(params, lr_arr)
      compiled = {r: f.lower(params, state, batch, lr_arr, jax.random.key(0),
                             np.int32(0)).compile(options)
                  for r, f in steps.items()}
      self.compile_s += time.perf_counter() - t0
      every = self.spec.refresh_every(self.problem)
      if every is None:
        plain = compiled[None]
        step_c = lambda t, *args: plain(*args, np.int32(t))
      else:
        step_c = lambda t, *args: compiled[t % every == 0](*args, np.int32(t))
      self._by_lr[key] = (init_c, step_c)
    return self._by_lr[key]

  def warm_up(self, lr: float, step_c: Callable, params, opt_state, batch) -> None:
    """Calls every executable behind `step_c` once (results dropped) before any clock.

    A first call pays one-off costs (loading the executable, allocating its buffers) that
    no later step pays; a host-scheduled row has two executables (refresh and plain).
    """
    key = lr if self.spec.static_lr else None
    if key in self._warm:
      return
    lr_arr = jnp.asarray(lr, jnp.float32)
    steps = (0,) if self.spec.refresh_every(self.problem) is None else (0, 1)
    for t in steps:
      jax.block_until_ready(step_c(t, params, opt_state, batch, lr_arr, jax.random.key(0)))
    self._warm.add(key)


def compiler_options(preset: Preset) -> dict | None:
  """The XLA options the rows of `preset` compile with on this backend (None: defaults)."""
  if preset.cpu_opt_level is None or jax.default_backend() != "cpu":
    return None
  return {"xla_backend_optimization_level": preset.cpu_opt_level}


def _run(problem: Problem, compiled: _Compiled, evaluate: Callable, lr: float, seed: int,
         steps: int, n_evals: int, on_step: Callable | None = None):
  params = problem.init_params(seed)
  batches = problem.batches(seed)
  first = next(batches)
  init_c, step_c = compiled.get(lr, params, first)
  lr_arr = jnp.asarray(lr, jnp.float32)
  opt_state = init_c(params, lr_arr)
  compiled.warm_up(lr, step_c, params, opt_state, first)
  if problem.eval_every is not None:
    eval_at = set(range(0, steps, problem.eval_every))
  else:
    eval_at = set(np.linspace(0, steps, n_evals + 1).round().astype(int).tolist())
  losses, times, evals = [], [], []
  elapsed, diverged, batch = 0.0, False, first
  loss0 = None
  base_key = jax.random.key(seed)
  for t in range(steps):
    if t in eval_at:
      tr, ev = evaluate(params)
      evals.append((t, elapsed, float(tr), float(ev)))
    t0 = time.perf_counter()
    params, opt_state, loss = step_c(t, params, opt_state, batch, lr_arr, base_key)
    loss = float(loss)  # waits for the step
    elapsed += time.perf_counter() - t0
    losses.append(loss)
    times.append(elapsed)
    loss0 = loss if loss0 is None else loss0
    if not math.isfinite(loss) or loss > 1e3 * max(abs(loss0), 1e-3):
      diverged = True
      break
    batch = next(batches)
  if diverged:
    final_train = final_eval = math.inf
  else:
    tr, ev = evaluate(params)
    final_train, final_eval = float(tr), float(ev)
    evals.append((steps, elapsed, final_train, final_eval))
    if not (math.isfinite(final_train) and math.isfinite(final_eval)):
      diverged, final_train, final_eval = True, math.inf, math.inf
  steps_to_target = time_to_target = None
  if problem.target_loss is not None:
    window = 10 if problem.stochastic else 1
    smooth = _smoothed(losses, window)
    hit = np.nonzero(smooth <= problem.target_loss)[0]
    steps_to_target = int(hit[0]) + 1 if len(hit) and not diverged else None
    time_to_target = times[hit[0]] if steps_to_target is not None else None
    if steps_to_target is None and not diverged and final_train <= problem.target_loss:
      steps_to_target, time_to_target = steps, elapsed  # reached by the last update
  result = RunResult(problem.name, compiled.spec.name, float(lr), seed, losses, times, evals,
                     final_train, final_eval, diverged, steps_to_target, time_to_target,
                     dict(compiled.overrides))
  return result, opt_state, params


def _time_steps(problem: Problem, rows: list[tuple[RowResult, _Compiled]], preset: Preset):
  """Interleaved step timing: rounds over optimizers, a block of steps each, median."""
  params = problem.init_params(0)
  batch = next(problem.batches(0))
  prepared = []
  for row, compiled in rows:
    init_c, step_c = compiled.get(row.best_lr, params, batch)
    lr_arr = jnp.asarray(row.best_lr, jnp.float32)
    state = init_c(params, lr_arr)
    compiled.warm_up(row.best_lr, step_c, params, state, batch)
    prepared.append((row, step_c, state, lr_arr))
  key = jax.random.key(0)
  samples: dict[str, list[float]] = {row.optimizer: [] for row, *_ in prepared}
  blocks = {}
  for row, *_ in prepared:
    # Blocks of at least ~20 ms, in whole multiples of `timing_block` steps.
    est = float(np.median(np.diff([0.0] + row.runs[0].time))) if row.runs[0].time else 1e-3
    blocks[row.optimizer] = preset.timing_block * max(
        1, int(math.ceil(0.02 / max(est * preset.timing_block, 1e-9))))
  for _ in range(preset.timing_rounds):
    for row, step_c, state, lr_arr in prepared:
      p, s = params, state
      n = blocks[row.optimizer]
      t0 = time.perf_counter()
      for t in range(n):
        p, s, loss = step_c(t, p, s, batch, lr_arr, key)
      jax.block_until_ready((p, s, loss))
      samples[row.optimizer].append((time.perf_counter() - t0) / n)
  for row, *_ in prepared:
    row.step_s = float(np.median(samples[row.optimizer]))


class Trainer:
  """Trains one (problem, row, second setting) at any learning rate and seed.

  The step is compiled once (the rate is an argument of the compiled step) and warmed up
  before any clock starts, as in `run_problem`; the size ladder (`benchmarks.ladder`) and the
  GPU race drive their own sweeps through it, run by run.

  Args:
    problem: the problem.
    spec: the row.
    steps: steps of every run.
    overrides: keyword arguments of `spec.build` (the second hyperparameter's value).
    compiler_options: XLA options of the compiled steps (None: XLA's defaults).
  """

  def __init__(self, problem: Problem, spec: OptimizerSpec, steps: int,
               overrides: dict | None = None, compiler_options: dict | None = None):
    self.problem, self.spec, self.steps = problem, spec, steps
    self.compiled = _Compiled(problem, spec, steps, compiler_options, overrides)
    self.evaluate = jax.jit(lambda p: (problem.train_loss(p), problem.eval_loss(p)),
                            compiler_options=compiler_options)

  def run(self, lr: float, seed: int) -> tuple[RunResult, Any]:
    """One run: ``(result, final optimizer state)``."""
    result, state, _ = _run(self.problem, self.compiled, self.evaluate, lr, seed, self.steps,
                            1)
    return result, state

  def prepared_step(self, lr: float):
    """``(step, params, opt_state, batch, lr_array)`` ready to time: compiled and warm."""
    params = self.problem.init_params(0)
    batch = next(self.problem.batches(0))
    init_c, step_c = self.compiled.get(lr, params, batch)
    lr_arr = jnp.asarray(lr, jnp.float32)
    state = init_c(params, lr_arr)
    self.compiled.warm_up(lr, step_c, params, state, batch)
    return step_c, params, state, batch, lr_arr


def interleaved_step_times(entries: list[tuple[str, Trainer, float]], rounds: int,
                           block: int, min_block_s: float = 0.02) -> dict[str, list[float]]:
  """Seconds per step of each entry, measured in interleaved rounds (no compile, no first call).

  Each round times every entry in turn over a block of steps (at least `block` steps and
  about `min_block_s` seconds, in whole multiples of `block`), so a machine's slow moments
  fall on every entry alike; the same rule as `run_problem`'s timing phase.

  Args:
    entries: ``(name, trainer, learning rate)`` per entry.
    rounds: rounds over the entries.
    block: the smallest block (a multiple of every update interval).
    min_block_s: the shortest a block may take.

  Returns:
    ``{name: [seconds per step, one per round]}``.
  """
  key = jax.random.key(0)
  prepared = [(name, trainer.prepared_step(lr)) for name, trainer, lr in entries]
  sizes = {}
  for name, (step_c, params, state, batch, lr_arr) in prepared:
    t0 = time.perf_counter()
    p, s = params, state
    for t in range(block):
      p, s, loss = step_c(t, p, s, batch, lr_arr, key)
    jax.block_until_ready((p, s, loss))
    est = (time.perf_counter() - t0) / block
    sizes[name] = block * max(1, int(math.ceil(min_block_s / max(est * block, 1e-9))))
  samples: dict[str, list[float]] = {name: [] for name, _ in prepared}
  for _ in range(rounds):
    for name, (step_c, params, state, batch, lr_arr) in prepared:
      p, s, n = params, state, sizes[name]
      t0 = time.perf_counter()
      for t in range(n):
        p, s, loss = step_c(t, p, s, batch, lr_arr, key)
      jax.block_until_ready((p, s, loss))
      samples[name].append((time.perf_counter() - t0) / n)
  return samples


def _grid_shape(problem: Problem, preset: Preset) -> tuple[int, float]:
  """(points, spacing factor) of the initial learning-rate grid on `problem`."""
  if problem.lr_sweep and preset.name in problem.lr_sweep:
    return problem.lr_sweep[preset.name]
  return preset.sweep_points, 10 ** 0.5


def lr_grid(problem: Problem, spec: OptimizerSpec, preset: Preset,
            points: int | None = None) -> list[float]:
  """The initial learning rates `spec` is swept over on `problem` (the same shape for every
  optimizer; `bracketed_sweep` may extend it by up to `preset.extend` rates)."""
  default_points, factor = _grid_shape(problem, preset)
  return sweep_grid(spec, points if points is not None else default_points, factor)


def bracketed_sweep(grid: list[float], factor: float, extend: int,
                    train: Callable[[float], float]) -> tuple[dict[float, float], float,
                                                              str | None]:
  """Tries `grid`, then extends it on the winner's side until the best rate is interior.

  The rule, the same for every row: after the grid, while the best rate (lowest score) is
  the smallest (largest) rate tried, try that rate divided (multiplied) by `factor`; stop
  when the best is interior or after `extend` extra rates.

  Args:
    grid: the initial rates, spaced by `factor`.
    factor: the grid's spacing (> 1).
    extend: the most extra rates to try.
    train: ``lr -> score`` (lower is better; ``inf`` for a diverged run).

  Returns:
    ``(scores, best_lr, edge)``: every rate tried with its score in the order tried, the best
    rate, and "low" / "high" when the best is still the smallest / largest rate tried (only
    possible once the cap is reached), else None.
  """
  scores: dict[float, float] = {}
  for lr in grid:
    scores[lr] = train(lr)
  for _ in range(extend + 1):
    best = min(scores, key=lambda lr: (scores[lr], lr))
    if len(scores) > 1 and best == min(scores):
      edge, nxt = "low", min(scores) / factor
    elif len(scores) > 1 and best == max(scores):
      edge, nxt = "high", max(scores) * factor
    else:
      return scores, best, None
    if len(scores) - len(grid) >= extend:
      return scores, best, edge
    scores[nxt] = train(nxt)
  raise AssertionError("unreachable")


def _second_sweep(spec, best_run, best_state, compiled, prepare, run, all_runs, by_eval,
                  progress):
  """Tries the other values of `spec.second` at the best learning rate (seed 0).

  Returns ``(summary, compiled, run, state)`` of the best value (the default on ties).
  """
  keyword, values = spec.second
  score = lambda r: r.final_eval if by_eval else r.final_train
  best = (score(best_run), values[0], compiled, best_run, best_state)
  sweep = {values[0]: best[0]}
  for value in values[1:]:
    if progress is not None:
      progress.set_postfix_str(f"{best_run.problem}/{spec.name} {keyword}={value:.3g}")
    other = prepare(spec, {keyword: value})
    result, state, _ = run(other)
    all_runs.append(result)
    sweep[value] = score(result)
    if sweep[value] < best[0]:
      best = (sweep[value], value, other, result, state)
    if progress is not None:
      progress.update(1)
  return {"name": keyword, "best": best[1], "sweep": sweep}, best[2], best[3], best[4]


@contextlib.contextmanager
def _captured(capture: Callable[[str], None], label: str):
  """Sends what the body prints or warns to `capture` (prefixed by `label`), not the screen."""
  out = io.StringIO()
  with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
      contextlib.redirect_stderr(out):
    warnings.simplefilter("always")
    try:
      yield
    finally:
      lines = out.getvalue().splitlines()
      lines += [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
      if lines:
        capture("".join(f"[{label}] {line}\n" for line in lines))


def run_problem(problem: Problem, specs: list[OptimizerSpec], preset: Preset, *,
                steps: int | None = None, seeds: int | None = None,
                sweep_points: int | None = None,
                progress: Any = None, log: Callable[[str], None] = print,
                capture: Callable[[str], None] | None = None):
  """Trains every optimizer on `problem`; returns (rows, all runs, notes).

  `log` gets the harness's own messages (a row that failed); `capture` gets what the rows'
  libraries print or warn (default: `log`).
  """
  n_steps = steps if steps is not None else problem.steps[preset.steps or preset.name]
  n_seeds = seeds if seeds is not None else preset.seeds
  capture = capture or log
  options = compiler_options(preset)
  evaluate = jax.jit(lambda p: (problem.train_loss(p), problem.eval_loss(p)),
                     compiler_options=options)
  rows: list[tuple[RowResult, _Compiled]] = []
  all_runs: list[RunResult] = []
  notes: list[str] = []
  params0, batch0 = problem.init_params(0), next(problem.batches(0))
  _, factor = _grid_shape(problem, preset)
  by_eval = problem.target_loss is None  # race problems: tuned on held-out loss

  def prepare(spec, overrides=None):
    compiled = _Compiled(problem, spec, n_steps, options, overrides)
    if not spec.static_lr:
      compiled.get(spec.lr, params0, batch0)
    return compiled

  # With overlap, row i + 1 is traced and compiled in a thread while row i trains (XLA
  # compiles outside the GIL, so a second core hides most of it). Off by default: the
  # compiling thread perturbs the timings of the row that trains beside it.
  pool = concurrent.futures.ThreadPoolExecutor(1) if preset.overlap_compile else None
  pending = pool.submit(prepare, specs[0]) if pool is not None and specs else None
  for i, spec in enumerate(specs):
    grid = lr_grid(problem, spec, preset, sweep_points)
    tried: dict[float, tuple[RunResult, Any]] = {}
    label = f"{problem.name}/{spec.name}"
    try:
      with _captured(capture, label):
        if pool is not None:
          current = pending
          pending = pool.submit(prepare, specs[i + 1]) if i + 1 < len(specs) else None
          compiled = current.result()
        else:
          compiled = prepare(spec)

        def train(lr):
          if progress is not None:
            progress.set_postfix_str(f"{label} lr={lr:.3g}")
          result, opt_state, _ = _run(problem, compiled, evaluate, lr, 0, n_steps,
                                      preset.evals)
          all_runs.append(result)
          tried[lr] = (result, opt_state)
          if progress is not None:
            progress.update(1)
          return result.final_eval if by_eval else result.final_train

        _, best_lr, edge = bracketed_sweep(grid, factor, preset.extend, train)
        best_run, best_state = tried[best_lr]
        second = None
        if spec.second is not None and preset.second_sweep:
          second, compiled, best_run, best_state = _second_sweep(
              spec, best_run, best_state, compiled, prepare,
              lambda c: _run(problem, c, evaluate, best_lr, 0, n_steps, preset.evals),
              all_runs, by_eval, progress)
    except Exception as err:  # a row that fails to build or run is reported, not fatal
      note = f"{label} failed: {type(err).__name__}: {str(err)[:300]}"
      log("[skip] " + note)
      notes.append(note)
      if progress is not None:
        progress.update(max(len(grid) - len(tried), 0) + max(n_seeds - 1, 0))
      continue
    runs = [best_run]
    for seed in range(1, n_seeds):
      if progress is not None:
        progress.set_postfix_str(f"{label} seed={seed}")
      with _captured(capture, label):
        result, _, _ = _run(problem, compiled, evaluate, best_lr, seed, n_steps, preset.evals)
      all_runs.append(result)
      runs.append(result)
      if progress is not None:
        progress.update(1)
    sweep = {lr: (r.final_eval if by_eval else r.final_train) for lr, (r, _) in tried.items()}
    row = RowResult(problem.name, spec.name, spec.family, best_lr, sweep, runs,
                    compiled.compile_s, state_bytes(best_state), edge=edge,
                    runs_spent=len(tried) + n_seeds - 1
                    + (len(second["sweep"]) - 1 if second else 0), second=second)
    rows.append((row, compiled))
  if pool is not None:
    pool.shutdown()
  if rows:
    with _captured(capture, problem.name + "/timing"):
      _time_steps(problem, rows, preset)
  return [row for row, _ in rows], all_runs, notes
