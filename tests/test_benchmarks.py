"""Smoke run of `python -m benchmarks` on the cheapest problem, and checks of the problems."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import __main__ as bench_main
from benchmarks.optimizers import OPTIMIZERS, OptimizerSpec, available, sweep_grid
from benchmarks.problems import get_problem, problem_names
from benchmarks.runner import (PRESETS, bracketed_sweep, compiler_options, run_problem,
                               state_bytes)

STEPS = 30


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  code = bench_main.main(["quick", "--only", "quadratic,adam,momentum", "--steps", str(STEPS),
                          "--sweep", "2", "--out", str(out)])
  assert code == 0
  lines = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
  return out, [r for r in lines if r["kind"] == "run"], [r for r in lines if r["kind"] == "row"]


def test_table_written(smoke):
  out, _, _ = smoke
  text = (out / "results.md").read_text()
  assert "| optimizer | best lr |" in text
  table_rows = [line for line in text.splitlines() if line.startswith("| adam |")
                or line.startswith("| momentum |")]
  assert len(table_rows) == 2


def test_every_sweep_run_recorded(smoke):
  _, runs, rows = smoke
  problem = get_problem("quadratic")
  assert {r["optimizer"] for r in rows} == {"adam", "momentum"}
  for name in ("adam", "momentum"):
    grid = sweep_grid(OPTIMIZERS[name], 2, problem.lr_sweep["quick"][1])
    mine = [r for r in runs if r["optimizer"] == name]
    row = next(r for r in rows if r["optimizer"] == name)
    tried = sorted(r["lr"] for r in mine)
    # The 2-point grid, plus at most the quick preset's one extension a grid step beyond it.
    assert len(tried) == row["runs_spent"] <= len(grid) + PRESETS["quick"].extend
    assert tried == pytest.approx(sorted(float(k) for k in row["sweep"]), rel=1e-3)
    for lr in grid:
      assert min(abs(t / lr - 1) for t in tried) < 1e-6
    for r in mine:
      assert len(r["loss"]) == STEPS or r["diverged"]
      assert len(r["time"]) == len(r["loss"])
      assert all(b >= a for a, b in zip(r["time"], r["time"][1:]))
    # The reported setting is the best final training loss of the sweep.
    finals = {r["lr"]: (r["final_train"] if isinstance(r["final_train"], float) else math.inf)
              for r in mine}
    assert row["best_lr"] == pytest.approx(min(finals, key=finals.get))


def test_losses_sane(smoke):
  _, runs, rows = smoke
  problem = get_problem("quadratic")
  initial = float(problem.train_loss(problem.init_params(0)))
  for row in rows:
    (final,) = row["final_train"]
    assert isinstance(final, float) and 0.0 <= final < initial
    (held_out,) = row["final_eval"]
    assert held_out == pytest.approx(final)  # the quadratic's held-out loss is the objective
  for r in runs:
    if not r["diverged"]:
      assert r["loss"][0] == pytest.approx(initial, rel=1e-5)  # loss before the first step


def test_ratios_against_adam(smoke):
  _, _, rows = smoke
  adam = next(r for r in rows if r["optimizer"] == "adam")
  momentum = next(r for r in rows if r["optimizer"] == "momentum")
  assert adam["baseline"] == momentum["baseline"] == "adam"
  assert adam["step_ratio"] == pytest.approx(1.0)
  assert adam["state_ratio"] == pytest.approx(1.0)
  assert momentum["step_s"] > 0 and momentum["step_ratio"] > 0
  params = get_problem("quadratic").init_params(0)
  expected = (state_bytes(optax.sgd(0.1, momentum=0.9).init(params))
              / state_bytes(optax.adam(0.1).init(params)))
  assert momentum["state_ratio"] == pytest.approx(expected)


def test_png_written(smoke):
  import matplotlib.image

  out, _, _ = smoke
  png = out / "quadratic.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  image = matplotlib.image.imread(png)
  assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
  assert image[..., :3].std() > 0.01  # not blank


def test_state_bytes_counts_keys():
  tree = {"w": jnp.zeros((3, 4), jnp.float32), "key": jax.random.key(0),
          "n": jnp.zeros((), jnp.int32)}
  assert state_bytes(tree) == 48 + jax.random.key_data(tree["key"]).nbytes + 4


def test_missing_module_is_skipped_not_fatal():
  spec = OptimizerSpec("missing", lambda lr, n, p: importlib.import_module(
      "secondorder.transforms.not_a_module").make(lr), 1e-3)
  assert "not_a_module" in available(spec)

  def broken(lr, n, p):
    raise RuntimeError("boom")

  rows, runs, notes = run_problem(
      get_problem("quadratic"), [OPTIMIZERS["adam"], OptimizerSpec("broken", broken, 1e-3)],
      PRESETS["quick"], steps=3, sweep_points=1, log=lambda s: None)
  assert [r.optimizer for r in rows] == ["adam"]
  assert len(notes) == 1 and "broken" in notes[0] and "boom" in notes[0]


def test_every_registered_optimizer_builds():
  # Every optax baseline and secondorder method is present: a missing module would silently
  # drop a row. Peers (other libraries) are optional installs.
  missing = {name: available(spec) for name, spec in OPTIMIZERS.items()
             if spec.family != "peer"}
  assert {k: v for k, v in missing.items() if v is not None} == {}


def test_autoencoder_logits_match_loss():
  # Sophia-G reads the Bernoulli loss as a 2-class softmax over (0, z): the same loss.
  prob = get_problem("autoencoder")
  params, batch = prob.init_params(0), next(prob.batches(0))
  logits = prob.logits_fn(params, batch)
  assert logits.shape == batch[0].shape + (2,)
  t = prob.labels(batch)  # pixel intensities in [0, 1]: soft labels (1 - t, t)
  ce = optax.softmax_cross_entropy(logits, jnp.stack([1 - t, t], axis=-1)).mean()
  assert float(ce) == pytest.approx(float(prob.loss(params, batch)), rel=1e-5)


def test_classifier_problem_contract():
  prob = get_problem("digits_mlp")
  params = prob.init_params(0)
  a, b = prob.batches(3), prob.batches(3)
  for _ in range(3):
    x1, y1 = next(a)
    x2, y2 = next(b)
    np.testing.assert_array_equal(x1, x2)  # deterministic given the seed
    assert x1.shape == (64, 64) and y1.shape == (64,)
  logits = prob.logits_fn(params, (x1, y1))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y1).mean()
  assert float(ce) == pytest.approx(float(prob.loss(params, (x1, y1))), rel=1e-6)
  model_out = prob.bind(params)(x1)
  np.testing.assert_allclose(model_out, logits, rtol=1e-6)
  assert 1.5 < float(prob.eval_loss(params)) < 3.5  # about log(10) at initialisation


@pytest.mark.parametrize("name", ["autoencoder", "digits_cnn", "char_transformer"])
def test_logits_loss_is_the_loss_of_the_logits(name):
  # Sophia-G's one-pass refresh differentiates logits_loss(logits_fn(p, b), b) for the loss.
  prob = get_problem(name, "quick")
  params, batch = prob.init_params(1), next(prob.batches(1))
  via_logits = prob.logits_loss(prob.logits_fn(params, batch), batch)
  assert float(via_logits) == pytest.approx(float(prob.loss(params, batch)), rel=1e-6)


@pytest.mark.parametrize("name", ["sophia_g", "sophia_h"])
def test_host_scheduled_row_follows_the_in_step_schedule(name):
  # The harness runs Sophia with the refresh chosen on the host and taken from one pass; its
  # trajectory must be that of the transform scheduling itself (lax.cond, two passes).
  from secondorder.transforms.sophia import sophia

  prob, steps = get_problem("digits_mlp", "quick"), 12  # refreshes at steps 0 and 10
  spec = OPTIMIZERS[name]
  assert spec.host_refresh == 10
  rows, runs, notes = run_problem(prob, [spec], PRESETS["quick"], steps=steps, sweep_points=1,
                                  log=lambda s: None)
  assert notes == [] and len(runs) == 1 and runs[0].lr == pytest.approx(spec.lr)
  tx = sophia(spec.lr, estimator="gnb" if name == "sophia_g" else "hutchinson")
  params = prob.init_params(0)
  state, batches, want = tx.init(params), prob.batches(0), []

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(prob.loss)(params, batch)
    extra = ({"logits_fn": lambda p: prob.logits_fn(p, batch)} if name == "sophia_g" else
             {"obj_fn": lambda p: prob.loss(p, batch)})
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, loss

  for _ in range(steps):
    params, state, loss = step(params, state, next(batches))
    want.append(float(loss))
  np.testing.assert_allclose(runs[0].loss, want, rtol=2e-5)
  # The trajectory moved after the second refresh (a schedule off by one would differ).
  assert want[-1] != want[-2]


def test_kfac_row_captures_every_other_step_on_the_language_model():
  # On the language model the K-FAC row captures statistics on even steps and passes
  # kfac_stats=no_new_stats() on odd ones; its trajectory is that loop's, written out here.
  from benchmarks.optimizers import _kfac_value_grad
  from secondorder.capture import no_new_stats

  prob, steps = get_problem("lm", "quick"), 4
  spec = OPTIMIZERS["kfac"]
  assert spec.refresh_every(prob) == 2
  assert spec.refresh_every(get_problem("digits_mlp", "quick")) is None
  _, runs, notes = run_problem(prob, [spec], PRESETS["quick"], steps=steps, sweep_points=1,
                               log=lambda s: None)
  assert notes == [] and len(runs) == 1
  tx = optax.chain(spec.build(spec.lr, steps, prob),
                   optax.scale_by_schedule(prob.schedule(steps)))
  params = prob.init_params(0)
  state, batches, want = tx.init(params), prob.batches(0), []

  @functools.partial(jax.jit, static_argnames="capture")
  def step(params, state, batch, t, capture):
    if capture:
      key = jax.random.fold_in(jax.random.key(0), t)
      loss, grads, extra = _kfac_value_grad(prob, params, batch, state[0], key)
    else:
      loss, grads = jax.value_and_grad(prob.loss)(params, batch)
      extra = {"kfac_stats": no_new_stats()}
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, loss

  for t in range(steps):
    params, state, loss = step(params, state, next(batches), t, capture=t % 2 == 0)
    want.append(float(loss))
  np.testing.assert_allclose(runs[0].loss, want, rtol=2e-5)


def test_problem_names():
  assert set(problem_names()) == {"lm", "autoencoder", "autoencoder_full", "digits_mlp",
                                  "digits_cnn", "char_transformer", "quadratic", "rosenbrock"}


def test_lbfgs_row_is_optax_line_search_loop_on_deterministic_problems():
  spec = OPTIMIZERS["lbfgs"]
  assert spec.applies_to(get_problem("rosenbrock"))
  assert spec.applies_to(get_problem("autoencoder_full"))
  assert not spec.applies_to(get_problem("autoencoder"))  # mini-batches: no line search
  assert not spec.applies_to(get_problem("quadratic"), "quick")  # full only
  full = get_problem("autoencoder_full")
  assert not full.stochastic and full.in_quick is False
  assert next(full.batches(3))[0].shape == (1500, 64)  # every batch: the training set
  problem = get_problem("rosenbrock")
  # Compiled unoptimised, one timing round: the test checks the trajectory, not speed.
  preset = dataclasses.replace(PRESETS["quick"], cpu_opt_level=0, timing_rounds=1)
  rows, runs, notes = run_problem(problem, [spec], preset, steps=6, seeds=1, sweep_points=1,
                                  log=lambda s: None)
  assert notes == [] and [r.optimizer for r in rows] == ["lbfgs"]
  # Reference: optax's own loop with a fresh value and gradient every step (the row takes
  # them from the line search's state instead).
  tx = optax.lbfgs(1.0)

  def body(carry, _):
    params, state = carry
    value, grad = jax.value_and_grad(problem.eval_loss)(params)
    updates, state = tx.update(grad, state, params, value=value, grad=grad,
                               value_fn=problem.eval_loss)
    return (optax.apply_updates(params, updates), state), value

  loop = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), length=6)[1],
                 compiler_options=compiler_options(preset))
  want = np.asarray(loop(problem.init_params(0)))
  np.testing.assert_allclose(runs[0].loss, want, rtol=1e-5)
  assert want[-1] < 0.5 * want[0]


@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64")  # its own float64 asks
def test_distributed_shampoo_peer_runs_on_this_jax():
  # The load-time patch in benchmarks.peers keeps Google's Distributed Shampoo (optax-shampoo
  # 0.0.6) running on the installed JAX: the harness row traces, runs past its start step
  # (10) and trains the ill-conditioned quadratic.
  pytest.importorskip("optax_shampoo")
  problem = get_problem("quadratic")
  tx = OPTIMIZERS["dist_shampoo"].build(jnp.asarray(3e-2), 60, problem)
  params = problem.init_params(0)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(problem.loss)(p, ())
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state = tx.init(params)
  first = float(problem.loss(params, ()))
  for _ in range(60):
    params, state, loss = step(params, state)
  assert np.isfinite(float(loss)) and float(loss) < 0.5 * first


def test_shampoo_bench_targets_option():
  import argparse

  from benchmarks.shampoo_bench import _targets

  assert _targets("digits_mlp=0.01, char_transformer=2.3") == {
      "digits_mlp": 0.01, "char_transformer": 2.3}
  assert _targets("") == {}
  for bad in ("digits_mlp", "digits_mlp=low"):
    with pytest.raises(argparse.ArgumentTypeError, match="PROBLEM=LOSS"):
      _targets(bad)


def test_shampoo_bench_adds_the_root_bucket_row(tmp_path):
  from benchmarks import shampoo_bench

  shampoo_bench.main(["--problems", "quadratic", "--steps", "4", "--rounds", "1",
                      "--update-interval", "2", "--start", "1", "--no-ds",
                      "--root-bucket-ratio", "4", "--out", str(tmp_path)])
  report = (tmp_path / "shampoo_bench.md").read_text()
  assert "root_bucket_ratio=4" in report
  rows = [line.split("|")[2].strip() for line in report.splitlines()
          if line.startswith("| quadratic")]
  assert rows == ["adam", "shampoo_buckets", "shampoo"]


def test_only_and_skip_select_rows():
  problems, optimizers = bench_main._select("", "char_transformer,dist_shampoo")
  assert "char_transformer" not in problems and "digits_cnn" in problems
  assert "dist_shampoo" not in optimizers and "adam" in optimizers and "kfac" in optimizers
  problems, optimizers = bench_main._select("digits_mlp,sophia_g,kfac", "kfac")
  assert problems == ["digits_mlp"] and optimizers == ["adam", "sophia_g"]
  # The language model's baseline is AdamW: it runs whenever the language model does.
  problems, optimizers = bench_main._select("lm,muon")
  assert problems == ["lm"] and optimizers == ["adamw", "muon"]
  with pytest.raises(SystemExit, match="--skip: unknown name"):
    bench_main._select("", "not_a_row")
  with pytest.raises(SystemExit, match="baseline"):
    bench_main._select("", "adam")
  with pytest.raises(SystemExit, match="adamw is the baseline"):
    bench_main._select("lm", "adamw")
  # quick leaves out the full-only character transformer unless it is named.
  assert "char_transformer" not in bench_main._select("", "", "quick")[0]
  assert "lm" in bench_main._select("", "", "quick")[0]
  assert bench_main._select("char_transformer", "", "quick")[0] == ["char_transformer"]


def test_list_names_what_each_preset_runs(capsys):
  from benchmarks import lm

  bench_main.main(["list"])
  out = capsys.readouterr().out
  assert "char_transformer   quick: not run" in out
  tiny, cpu = lm.SIZES["tiny"], lm.SIZES["cpu"]
  quick_line = next(l for l in out.splitlines() if l.startswith("  lm") and "quick:" in l)
  full_line = next(l for l in out.splitlines() if l.startswith("  lm") and "full:" in l)
  assert f"d={tiny.dim}," in quick_line and f"{tiny.steps} steps" in quick_line
  assert f"d={cpu.dim}," in full_line and f"{cpu.steps} steps" in full_line
  assert "race to adamw's held-out loss" in full_line


def test_quick_compiles_at_cpu_opt_level_2_and_says_so(smoke):
  out, _, _ = smoke
  header = (out / "results.md").read_text().split("\n\n")[1]
  if jax.default_backend() == "cpu":
    assert compiler_options(PRESETS["quick"]) == {"xla_backend_optimization_level": 2}
    assert "xla_backend_optimization_level=2" in header and "--cpu-opt-level 3" in header
  else:  # the level is a CPU-only choice
    assert compiler_options(PRESETS["quick"]) is None
  assert compiler_options(PRESETS["full"]) is None
  assert compiler_options(dataclasses.replace(PRESETS["quick"], cpu_opt_level=None)) is None


def test_cpu_opt_level_moves_trajectories_by_rounding_only():
  # The quick preset's lower XLA backend level changes code generation, not the arithmetic:
  # the same rows trained at XLA's default level follow the same losses. (Shampoo's roots,
  # coupled Newton iterations on a CPU, are among the rows where the README saw last-bit
  # differences; the quadratic's [16, 8] matrix takes that path.)
  prob = get_problem("quadratic", "quick")
  specs = [OPTIMIZERS["adam"], OPTIMIZERS["shampoo"]]
  losses = {}
  for level in (2, 3):
    preset = dataclasses.replace(PRESETS["quick"], cpu_opt_level=level)
    _, runs, notes = run_problem(prob, specs, preset, steps=30, sweep_points=1,
                                 log=lambda s: None)
    assert notes == []
    losses[level] = {r.optimizer: r.loss for r in runs}
  for name in ("adam", "shampoo"):
    assert len(losses[2][name]) == 30 and losses[2][name][-1] < losses[2][name][0]
    np.testing.assert_allclose(losses[2][name], losses[3][name], rtol=1e-5)


def test_compiler_options_reach_the_compiler(monkeypatch):
  import benchmarks.runner as runner

  prob = get_problem("quadratic")
  params, batch = prob.init_params(0), next(prob.batches(0))
  # An option XLA does not know fails the compilation: the options are what XLA is given.
  with pytest.raises(Exception, match="not_an_xla_option"):
    runner._Compiled(prob, OPTIMIZERS["adam"], 2, {"not_an_xla_option": 1}).get(
        1e-3, params, batch)
  # ...and run_problem gives every row the preset's options.
  seen = []

  class Recording(runner._Compiled):
    def __init__(self, *args):
      super().__init__(*args)
      seen.append(self.compiler_options)

  monkeypatch.setattr(runner, "_Compiled", Recording)
  rows, _, notes = run_problem(prob, [OPTIMIZERS["adam"], OPTIMIZERS["momentum"]],
                               PRESETS["quick"], steps=2, sweep_points=1, log=lambda s: None)
  assert notes == [] and len(rows) == 2
  assert seen == [compiler_options(PRESETS["quick"])] * 2


# ----------------------------------------------------------------------------- issue-22 rules


def _scalar_problem(target=None):
  """f(w) = w^2 / 2: SGD's final loss after n steps is (1 - lr)^(2n) f(w0), least at lr = 1."""
  from benchmarks.problems import Problem

  objective = lambda p: 0.5 * jnp.sum(p["w"] ** 2)

  def batches(seed):
    while True:
      yield ()

  return Problem(
      name="scalar", description="w^2/2", init_params=lambda seed: {"w": jnp.ones(4)},
      batches=batches, loss=lambda p, b: objective(p), eval_loss=objective,
      train_loss=objective, target_loss=target, steps={"quick": 6, "full": 6},
      kind="synthetic", stochastic=False, held_out=False, lr_sweep={"quick": (3, 10 ** 0.5)})


_SGD_LOW = OptimizerSpec("sgd_low", lambda lr, n, p: optax.sgd(lr), 0.01)  # grid .003 .. .03


def test_bracketing_extends_the_grid_until_the_best_is_interior():
  prob = _scalar_problem()
  preset = dataclasses.replace(PRESETS["quick"], extend=4)
  (row,), runs, notes = run_problem(prob, [_SGD_LOW], preset, log=lambda s: None)
  assert notes == []
  tried = sorted(row.sweep)
  # The grid .00316, .01, .0316 went up by sqrt(10) until the best (lr 1) was interior.
  np.testing.assert_allclose(tried, [10 ** (k / 2) for k in range(-5, 2)], rtol=1e-6)
  assert row.best_lr == pytest.approx(1.0) and row.edge is None
  assert min(tried) < row.best_lr < max(tried)
  assert row.runs_spent == len(runs) == 7


def test_a_row_that_hits_the_cap_is_marked(tmp_path):
  from benchmarks import report

  prob = _scalar_problem()
  preset = dataclasses.replace(PRESETS["quick"], extend=2)
  rows, runs, _ = run_problem(prob, [_SGD_LOW], preset, log=lambda s: None)
  (row,) = rows
  assert len(row.sweep) == 5 and row.runs_spent == 5  # 3 + the cap of 2
  assert row.edge == "high" and row.best_lr == pytest.approx(max(row.sweep))
  table = report.markdown(rows, {"scalar": prob})
  line = next(l for l in table.splitlines() if l.startswith("| sgd_low |"))
  assert "(edge high)" in line and "| 5 |" in line
  fig = report.plot_problem(tmp_path / "scalar.png", prob, rows)
  assert any("edge high" in t.get_text() for t in fig.legends[0].get_texts())
  # The same rule, read without a training loop: a best on the low edge extends downwards.
  scores, best, edge = bracketed_sweep([1.0, 10.0, 100.0], 10.0, 3,
                                       lambda lr: abs(np.log10(lr) + 1.4))
  assert list(scores) == [1.0, 10.0, 100.0, 0.1, 0.01] and best == 0.1 and edge is None


def test_a_slow_first_call_does_not_change_seconds_to_target(monkeypatch):
  import time

  import benchmarks.runner as runner

  prob = _scalar_problem(target=1e-3)
  spec = OptimizerSpec("sgd_one", lambda lr, n, p: optax.sgd(lr), 0.5)
  preset = dataclasses.replace(PRESETS["quick"], timing_rounds=1)

  def seconds(sleep):
    original = runner._Compiled.get

    def get(self, lr, params, batch):
      init_c, step_c = original(self, lr, params, batch)
      calls = []

      def step(*args):
        if not calls and sleep:
          time.sleep(sleep)
        calls.append(1)
        return step_c(*args)

      return init_c, step

    monkeypatch.setattr(runner._Compiled, "get", get)
    (row,), _, _ = run_problem(prob, [spec], preset, sweep_points=1, log=lambda s: None)
    monkeypatch.undo()
    (run,) = row.runs
    assert run.steps_to_target is not None
    return run.time_to_target, run.time[-1]

  quiet, sleepy = seconds(0.0), seconds(0.5)
  assert sleepy[0] < 0.25 and sleepy[1] < 0.25 and quiet[1] < 0.25


def test_peer_prints_and_warnings_go_to_the_log(capsys):
  import warnings

  def noisy(lr, n, p):
    print("Preconditioners size: 42")
    warnings.warn("a peer's warning")
    return optax.sgd(lr)

  captured = []
  rows, _, notes = run_problem(_scalar_problem(), [OptimizerSpec("noisy", noisy, 0.1)],
                               PRESETS["quick"], sweep_points=1, log=lambda s: None,
                               capture=captured.append)
  assert notes == [] and len(rows) == 1
  out = capsys.readouterr()
  assert "Preconditioners" not in out.out + out.err and "peer's warning" not in out.err
  text = "".join(captured)
  assert "[scalar/noisy] Preconditioners size: 42" in text and "a peer's warning" in text


def test_one_colour_and_marker_per_optimizer_in_every_figure(tmp_path):
  from benchmarks import report

  names = list(OPTIMIZERS)
  styles = [report.style(n) for n in names]
  assert len({(s["color"], s["marker"]) for s in styles}) == len(names)
  assert report.style("adam") == report.style("adam")
  prob = _scalar_problem(target=1e-2)
  specs = [OPTIMIZERS["adam"], OPTIMIZERS["momentum"], OPTIMIZERS["sgd"]]
  rows, _, _ = run_problem(prob, specs, dataclasses.replace(PRESETS["quick"], extend=0),
                           sweep_points=1, log=lambda s: None)
  figures = [report.plot_problem(tmp_path / "p.png", prob, rows),
             report.plot_speedups(tmp_path / "s.png", rows, {"scalar": prob})]
  seen = {}
  for fig in figures:
    for text, handle in zip(fig.legends[0].get_texts(), fig.legends[0].legend_handles):
      name = text.get_text().split(" ")[0]
      colour = matplotlib_colour(handle)
      seen.setdefault(name, set()).add(colour)
      assert colour == tuple(report.style(name)["color"])
  assert set(seen) == {"adam", "momentum", "sgd"}
  assert all(len(c) == 1 for c in seen.values())
  # Every line drawn on the loss panels has one of the rows' colours.
  allowed = {tuple(report.style(n)["color"]) for n in seen}
  for ax in figures[0].axes:
    for line in ax.get_lines():
      if line.get_color() != "k":  # the black target line
        assert matplotlib_colour(line) in allowed


def matplotlib_colour(handle):
  import matplotlib.colors

  get = getattr(handle, "get_color", None) or handle.get_facecolor
  return tuple(matplotlib.colors.to_rgba(get()))


def test_sanity_tables_do_not_repeat_train_loss_as_held_out(smoke):
  out, _, _ = smoke
  text = (out / "results.md").read_text()
  assert "held-out loss (= objective)" in text
  line = next(l for l in text.splitlines() if l.startswith("| adam |"))
  assert line.split("|")[5].strip() == "-"


def test_second_hyperparameter_grid_is_tried_at_the_best_rate():
  from benchmarks.optimizers import register, second_grid

  # Every registered second grid has the same size (default, a tenth, ten times).
  grids = {n: s.second for n, s in OPTIMIZERS.items() if s.second is not None}
  assert {"kfac", "sophia_h", "sophia_g", "shampoo", "soap"} <= set(grids)
  assert {len(values) for _, values in grids.values()} == {3}
  assert second_grid("damping", 0.01) == ("damping", (0.01, 0.001, 0.1))
  with pytest.raises(ValueError, match="second"):
    register(OptimizerSpec("bad", lambda lr, n, p: optax.sgd(lr), 0.1, second=("eps", (1, 2))))

  # SGD's loss on w^2/2 falls faster with a larger `scale`: the grid's x10 value wins.
  spec = OptimizerSpec("sgd_scaled", lambda lr, n, p, scale=0.01: optax.sgd(lr * scale), 0.3,
                       second=second_grid("scale", 0.01))
  preset = dataclasses.replace(PRESETS["quick"], extend=0, second_sweep=True, seeds=1)
  (row,), runs, notes = run_problem(_scalar_problem(), [spec], preset, sweep_points=1,
                                    log=lambda s: None)
  assert notes == [] and row.second["name"] == "scale"
  assert row.second["best"] == pytest.approx(0.1) and len(row.second["sweep"]) == 3
  assert row.runs_spent == len(runs) == 3
  assert [r.overrides for r in runs] == [{}, {"scale": 0.001}, {"scale": 0.1}]
  assert row.runs[0].overrides == {"scale": 0.1}
  assert row.runs[0].final_train == min(r.final_train for r in runs)


def test_runs_jsonl_reads_back_a_row_whose_second_default_won(tmp_path):
  from benchmarks import report

  # The default `scale` (the grid's first value) is the largest here, so it wins and the best
  # setting's runs carry no override; reading the record back must still find them.
  spec = OptimizerSpec("sgd_scaled", lambda lr, n, p, scale=0.1: optax.sgd(lr * scale), 0.3,
                       second=("scale", (0.1, 0.01, 1e-3)))
  preset = dataclasses.replace(PRESETS["quick"], extend=0, second_sweep=True, seeds=2)
  rows, runs, _ = run_problem(_scalar_problem(), [spec], preset, sweep_points=1,
                              log=lambda s: None)
  assert rows[0].second["best"] == pytest.approx(0.1) and rows[0].runs[0].overrides == {}
  report.write_jsonl(tmp_path / "runs.jsonl", runs, rows)
  (row,), _ = report.read_jsonl(tmp_path / "runs.jsonl")
  assert [(r.seed, r.overrides, r.final_train) for r in row.runs] == [
      (r.seed, r.overrides, r.final_train) for r in rows[0].runs]


def test_runs_jsonl_reads_back_into_the_same_tables(smoke):
  from benchmarks import report

  out, written_runs, written_rows = smoke
  rows, runs = report.read_jsonl(out / "runs.jsonl")
  assert [r.optimizer for r in rows] == [r["optimizer"] for r in written_rows]
  assert len(runs) == len(written_runs)
  assert all(len(row.runs) == 1 and row.runs[0].lr == row.best_lr for row in rows)
  again = report.markdown(rows, {"quadratic": get_problem("quadratic", "quick")})
  written = (out / "results.md").read_text()
  table = lambda text: [l for l in text.splitlines() if l.startswith("|")]
  assert table(again) == table(written)


# ----------------------------------------------------------------------------- the size ladder

from benchmarks import corpus as corpus_module  # noqa: E402
from benchmarks import gpu_race, ladder, lm  # noqa: E402
from benchmarks import runner as runner_module  # noqa: E402

LADDER_ROWS = ("adamw", "muon")
LADDER_SIZES = {"small": lm.SIZES["tiny"],
                "cpu": dataclasses.replace(lm.SIZES["tiny"], dim=48, heads=3)}
LADDER_TPP = 0.08  # tokens per parameter: about 11 steps at the tiny size


def _ladder(record, **kwargs):
  return ladder.Ladder(record, sizes=LADDER_SIZES, corpus=lm.ByteCorpus.load(),
                       rows=LADDER_ROWS, stages=ladder.STAGES[:2], tokens_per_param=LADDER_TPP,
                       seeds=2, evals=4, log=lambda text: None, **kwargs)


@pytest.fixture(scope="module")
def tiny_ladder(tmp_path_factory):
  """The first two stages at tiny sizes, with a one-cell strength test (compile time)."""
  path = tmp_path_factory.mktemp("ladder") / ladder.RECORD_NAME
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ladder, "STRENGTH", (("b2", (0.95,)), ("weight_decay", (0.1,))))
    lad = _ladder(ladder.Record(str(path)))
    lad.run_stage("small@1x")
    lad.run_stage("cpu@1x")
  return path


def _kinds(record, kind, **match):
  return [e for e in record.entries if e["kind"] == kind
          and all(e.get(k) == v for k, v in match.items())]


def test_ladder_steps_follow_tokens_per_parameter():
  # The parameter count against the model's own leaves; the steps against the formula.
  for name in ("tiny", "small", "cpu", "large"):
    config = lm.SIZES[name]
    params = lm.lm_problem(config, lm.ByteCorpus.load()).init_params(0)
    assert lm.parameter_count(config) == sum(x.size for x in jax.tree.leaves(params))
  for stage in ladder.STAGES:
    config = ladder.stage_config(stage)
    tokens = stage.horizon * 20 * lm.parameter_count(lm.SIZES[stage.size])
    assert config.steps == round(tokens / (config.batch_size * config.context))
    assert config.eval_every == config.steps // ladder.EVALS
  small, large = (lm.parameter_count(lm.SIZES[n]) for n in ("small", "large"))
  assert large / small >= 8


def test_corpus_build_checks_every_file_and_the_digest(tmp_path):
  stdlib = tmp_path / "lib"
  (stdlib / "pkg").mkdir(parents=True)
  (stdlib / "site-packages").mkdir()
  (stdlib / "site-packages" / "other.py").write_text("x = 1\n")
  names = [f"m{i}.py" for i in range(30)] + ["pkg/inner.py"]
  for i, name in enumerate(names):
    (stdlib / name).write_text(f"value = {i}\n" * (i + 1))
  manifest = tmp_path / "manifest.txt"
  assert corpus_module.write_manifest(str(manifest), str(stdlib)) == len(names)
  assert [rel for _, _, rel in corpus_module.read_manifest(str(manifest))] == sorted(names)
  out = str(tmp_path / "corpus.npz")
  corpus_module.build(out, str(stdlib), str(manifest))
  data = corpus_module.load(out, build_if_missing=False)
  expected = {False: [], True: []}
  for name in sorted(names):
    expected[lm.is_validation_file(name)].append((stdlib / name).read_bytes())
  assert data.train.tobytes() == b"\n".join(expected[False])
  assert data.validation.tobytes() == b"\n".join(expected[True])
  assert set(data.train_files) | set(data.validation_files) == set(names)
  (stdlib / "m3.py").write_text("changed\n")
  with pytest.raises(ValueError, match="m3.py"):
    corpus_module.build(str(tmp_path / "again.npz"), str(stdlib), str(manifest))
  with np.load(out) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["train"] = arrays["train"].copy()
  arrays["train"][0] ^= 1
  np.savez(str(tmp_path / "damaged.npz"), **arrays)
  with pytest.raises(ValueError, match="damaged"):
    corpus_module.load(str(tmp_path / "damaged.npz"), build_if_missing=False)


def test_committed_corpus_manifest_lists_a_large_fixed_corpus():
  entries = corpus_module.read_manifest()
  total = sum(size for _, size, _ in entries)
  assert len(entries) == len({rel for _, _, rel in entries}) > 1000
  assert total > 25e6  # more than 5x the default corpus: the ladder reads it less than once
  assert not any(rel.startswith("site-packages/") for _, _, rel in entries)
  large = ladder.stage_config(ladder.Stage("large", 1))
  assert large.steps * large.batch_size * large.context < 0.9 * total * 0.8


def test_ladder_full_tuning_follows_the_rule(tiny_ladder):
  record = ladder.Record(str(tiny_ladder))
  runs = _kinds(record, "run", stage="small@1x", row="muon")
  plain = {r["lr"]: ladder.score(r) for r in runs if r["seed"] == 0 and not r["overrides"]}
  grid = sweep_grid(OPTIMIZERS["muon"], 5, 10 ** 0.5)
  assert all(any(math.isclose(lr, g, rel_tol=1e-4) for lr in plain) for g in grid)
  assert [r["purpose"] for r in runs].count("refine") == 2
  final = record.final("small@1x", "muon")
  assert final["lr"] == min(plain, key=lambda lr: (plain[lr], lr))
  seeds = sorted(r["seed"] for r in runs if r["lr"] == final["lr"])
  assert seeds == [0, 1]
  # AdamW: the strength test at its best plain rate; the winner is carried.
  adamw = _kinds(record, "run", stage="small@1x", row="adamw")
  strength = [r for r in adamw if r["purpose"] == "strength"]
  plain = {r["lr"]: ladder.score(r) for r in adamw if r["seed"] == 0 and not r["overrides"]}
  best_plain = min(plain, key=lambda lr: (plain[lr], lr))
  assert [(r["lr"], r["overrides"]) for r in strength] == [
      (best_plain, {"b2": 0.95, "weight_decay": 0.1})]
  won = ladder.score(strength[0]) < plain[best_plain]
  assert record.final("small@1x", "adamw")["overrides"] == (strength[0]["overrides"] if won
                                                            else {})


def test_ladder_transfer_rebrackets_around_the_source(tiny_ladder):
  record = ladder.Record(str(tiny_ladder))
  for row in LADDER_ROWS:
    source = record.final("small@1x", row)
    runs = [r for r in _kinds(record, "run", stage="cpu@1x", row=row) if r["seed"] == 0]
    tried = sorted(r["lr"] for r in runs)
    centre = source["lr"]
    assert any(math.isclose(lr, centre, rel_tol=1e-4) for lr in tried)
    for lr in (centre / 10 ** 0.25, centre * 10 ** 0.25):
      assert any(math.isclose(lr, t, rel_tol=1e-4) for t in tried)
    assert len(tried) <= 3 + ladder.TRANSFER_EXTEND
    assert all(r["overrides"] == source["overrides"] for r in runs)
    assert record.final("cpu@1x", row)["centre"] == centre


def test_ladder_resumes_without_training_what_the_record_holds(tiny_ladder, monkeypatch):
  record = ladder.Record(str(tiny_ladder))
  before = len(record.entries)

  def refuse(self, lr, seed):
    raise AssertionError(f"trained again: lr {lr}, seed {seed}")

  monkeypatch.setattr(runner_module.Trainer, "run", refuse)
  lad = _ladder(record)
  lad.run_stage("small@1x")
  lad.run_stage("cpu@1x")
  assert len(ladder.Record(str(tiny_ladder)).entries) == before
  # A stage whose source is not tuned refuses to start, naming it.
  # Cut off inside a row (its runs recorded, its decision not): the row resumes from the
  # record's runs alone and reaches the same decision.
  partial = tiny_ladder.parent / "partial.jsonl"
  kept = [e for e in record.entries if not (e["kind"] == "final" and e["row"] == "muon")]
  partial.write_text("".join(json.dumps(e) + "\n" for e in kept))
  resumed = ladder.Record(str(partial))
  _ladder(resumed).run_stage("small@1x")
  assert resumed.final("small@1x", "muon")["lr"] == record.final("small@1x", "muon")["lr"]
  assert len(resumed.runs()) == len(record.runs())
  empty = _ladder(ladder.Record(str(tiny_ladder.parent / "other.jsonl")))
  with pytest.raises(ValueError, match="source small@1x"):
    empty.run_stage("cpu@1x")
  with pytest.raises(ValueError, match="stage 'huge@1x'"):
    empty.run_stage("huge@1x")


def test_ladder_record_holds_rounded_curves_and_epochs(tiny_ladder):
  record = ladder.Record(str(tiny_ladder))
  info = record.stage_info("small@1x")
  tokens = info["steps"] * LADDER_SIZES["small"].batch_size * LADDER_SIZES["small"].context
  assert info["epochs"] == pytest.approx(tokens / len(lm.ByteCorpus.load().train), rel=1e-4)
  for run in _kinds(record, "run"):
    assert run["evals"][0][0] == 0 and run["evals"][-1][0] == run["steps"]
    assert all(v == float(f"{v:.5g}") for _, v in run["evals"])
    assert run["final_eval"] == float(f"{run['final_eval']:.5g}")


def _synthetic_record(path, curves: dict, stage="small@1x", size="small", horizon=1):
  """A record whose final runs have the given held-out curves: {row: [curve per seed]}."""
  record = ladder.Record(str(path))
  record.append({"kind": "stage", "stage": stage, "size": size, "horizon": horizon,
                 "source": None, "config": {}, "parameters": 1000, "steps": 40,
                 "tokens": 1, "tokens_per_param": 1, "train_bytes": 1, "epochs": 0.5})
  for row, seeds in curves.items():
    for seed, curve in enumerate(seeds):
      record.append({"kind": "run", "stage": stage, "size": size, "horizon": horizon,
                     "row": row, "purpose": "seed", "lr": 0.01, "overrides": {}, "seed": seed,
                     "steps": 40, "final_eval": curve[-1], "final_train": curve[-1],
                     "diverged": False,
                     "evals": [[10 * i, v] for i, v in enumerate(curve)], "run_s": 1.0})
    record.append({"kind": "final", "stage": stage, "row": row, "lr": 0.01, "overrides": {},
                   "edge": None, "centre": None, "seeds": len(seeds), "runs": len(seeds),
                   "run_s": 1.0})
  return record


def test_ladder_speedups_against_a_hand_count(tmp_path):
  record = _synthetic_record(tmp_path / "r.jsonl", {
      "adamw": [[5, 4, 3, 2.5, 2.0], [5, 4, 3, 2.2, 2.1], [5, 4, 3, 2.6, 2.2]],
      "soap": [[5, 2.0, 1.9, 1.8, 1.7], [5, 3, 2.05, 1.9, 1.8], [5, 3, 3, 3, 3]]})
  # Target: AdamW's median final 2.1; AdamW reaches it at steps 40, 40, never -> median 40;
  # SOAP at 10, 20, never.
  assert ladder.stage_target(record, "small@1x") == 2.1
  assert ladder.steps_ratios(record, "small@1x", "soap") == [10 / 40, 20 / 40, None]
  summary = ladder.summarize(record, {("small", "adamw"): 0.010, ("small", "soap"): 0.015})
  soap = next(s for s in summary if s["row"] == "soap")
  assert soap["time_ratio"][:2] == pytest.approx([0.25 * 1.5, 0.5 * 1.5])
  assert soap["time_ratio"][2] is None
  text = ladder.markdown(summary)
  assert "| 0.375 [0.25, 0.5] (2 of 3) | 0.562 [0.375, 0.75] (2 of 3) |" in text


def test_largest_size_takes_rows_within_ten_percent(tmp_path):
  curve = lambda hit: [5] + [3] * (hit - 1) + [2.0] * (5 - hit)
  curves = {"adamw": [curve(4)] * 3, "soap": [curve(2)] * 3, "kfac": [curve(3)] * 3,
            "muon": [[5, 3, 3, 3, 3]] * 3}
  record = _synthetic_record(tmp_path / "r.jsonl", curves)
  lad = ladder.Ladder(record, rows=("adamw", "soap", "kfac", "muon"), log=lambda t: None)
  # soap 20/40 = 0.5 is best; kfac 30/40 = 0.75 > 1.1 x 0.5; muon never reaches it.
  assert lad.rows_for(ladder.STAGES[2]) == ["adamw", "soap"]
  assert lad.rows_for(ladder.STAGES[0]) == list(lad.rows)


def test_ladder_figures_name_every_method(tmp_path):
  folder = tmp_path / "ladder"
  folder.mkdir()
  _synthetic_record(folder / ladder.RECORD_NAME, {
      "adamw": [[5, 4, 3, 2.5, 2.0]] * 3, "kfac": [[5, 3, 2, 1.9, 1.8]] * 3})
  written = ladder.draw_figures(str(folder))
  assert written == ["sizes.png", "horizons.png", "curves-small-1x.png"]
  assert all((folder / name).stat().st_size > 0 for name in written)
  fig = ladder.plot_trend(str(folder / "again.png"),
                          ladder.summarize(ladder.Record(str(folder / ladder.RECORD_NAME))),
                          "size")
  labels = {t.get_text() for t in fig.axes[0].texts} | set(
      fig.axes[0].get_legend_handles_labels()[1])
  assert {"AdamW", "K-FAC"} <= labels
  # A record with no finished stage still draws (the page's figures always exist).
  empty = tmp_path / "empty"
  empty.mkdir()
  ladder.Record(str(empty / ladder.RECORD_NAME)).append({"kind": "stage", "stage": "x"})
  assert ladder.draw_figures(str(empty), trends=True)[:2] == ["sizes.png", "horizons.png"]


def test_interleaved_step_times_measure_every_entry():
  problem = get_problem("quadratic")
  entries = [(name, runner_module.Trainer(problem, OPTIMIZERS[name], 5), 1e-3)
             for name in ("adam", "sgd")]
  samples = runner_module.interleaved_step_times(entries, rounds=3, block=2, min_block_s=0.0)
  assert sorted(samples) == ["adam", "sgd"]
  assert all(len(v) == 3 and all(s > 0 for s in v) for v in samples.values())


def test_retime_appends_one_line_per_row_and_size(tiny_ladder, tmp_path):
  record = ladder.Record(str(tiny_ladder))
  out = ladder.retime(record, str(tmp_path / "timing.jsonl"), corpus=lm.ByteCorpus.load(),
                      rounds=2, block=2, only_sizes=["small"], log=lambda t: None)
  assert [(e["size"], e["row"]) for e in out] == [("small", r) for r in LADDER_ROWS]
  timing = ladder.read_timing(str(tmp_path / "timing.jsonl"))
  assert set(timing) == {("small", r) for r in LADDER_ROWS}
  assert record.final("small@1x", "adamw")["overrides"] == out[0]["overrides"]


def test_gpu_race_runs_at_a_tiny_size_and_resumes(tiny_ladder, tmp_path, monkeypatch):
  folder = tmp_path / "gpu"
  corpus_path = str(tmp_path / "corpus.npz")
  monkeypatch.setattr(corpus_module, "load", lambda path, **kw: lm.ByteCorpus.load())
  args = ["--size", "tiny", "--steps", "6", "--rows", "adamw,muon", "--dir", str(folder),
          "--ladder", str(tiny_ladder), "--corpus", corpus_path]
  assert bench_main.main(["gpu"] + args) == 0
  record = ladder.Record(str(folder / "gpu.jsonl"))
  source = ladder.Record(str(tiny_ladder))
  for row in ("adamw", "muon"):
    # Transferred from the ladder's largest size at the compute-optimal horizon.
    assert gpu_race.transferred(source, row)[0] == source.final("cpu@1x", row)["lr"]
  runs = _kinds(record, "run")
  assert len(runs) == 2 + 2 + 2  # one each, then both neighbours of AdamW and of Muon
  assert {r["row"] for r in runs if r["purpose"] == "neighbour"} == {"adamw", "muon"}
  assert {f["row"] for f in record.finals("tiny@6steps")} == {"adamw", "muon"}
  assert set(ladder.read_timing(str(folder / ladder.TIMING_NAME))) == {
      ("tiny", "adamw"), ("tiny", "muon")}
  assert "| AdamW |" in (folder / "results.md").read_text()
  monkeypatch.setattr(runner_module.Trainer, "run",
                      lambda *a: (_ for _ in ()).throw(AssertionError("trained again")))
  assert bench_main.main(["gpu"] + args) == 0
  assert len(_kinds(ladder.Record(str(folder / "gpu.jsonl")), "run")) == len(runs)


def test_gpu_race_skips_runs_past_its_budget(tiny_ladder, tmp_path, monkeypatch):
  monkeypatch.setattr(corpus_module, "load", lambda path, **kw: lm.ByteCorpus.load())
  monkeypatch.setattr(gpu_race, "START", gpu_race.time.perf_counter() - 1e6)
  folder = tmp_path / "gpu"
  assert bench_main.main(["gpu", "--size", "tiny", "--steps", "4", "--rows", "adamw",
                          "--dir", str(folder), "--ladder", str(tiny_ladder)]) == 0
  record = ladder.Record(str(folder / "gpu.jsonl"))
  assert _kinds(record, "run") == [] and len(_kinds(record, "skipped")) == 1


def test_speedup_summary_names_every_method_on_its_axis(tmp_path):
  from benchmarks import report

  prob = _scalar_problem(target=1.99)  # from 2.0: every row reaches it
  specs = [OPTIMIZERS["adam"], OPTIMIZERS["momentum"], OPTIMIZERS["sgd"]]
  rows, _, _ = run_problem(prob, specs, dataclasses.replace(PRESETS["quick"], extend=0),
                           sweep_points=1, log=lambda s: None)
  reached = [r.optimizer for r in rows if any(run.steps_to_target for run in r.runs)]
  fig = report.plot_speedups(tmp_path / "s.png", rows, {"scalar": prob})
  for ax in fig.axes[:2]:
    assert [t.get_text() for t in ax.get_yticklabels()] == reached
  assert reached == ["adam", "momentum", "sgd"]
