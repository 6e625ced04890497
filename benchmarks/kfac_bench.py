"""K-FAC (secondorder.kfac) against Adam and kfac-jax on the digits autoencoder and CNN.

Autoencoder: 64-128-32-8-32-128-64, tanh, linear 8-unit code, Bernoulli-logit loss summed
over the 64 pixels and averaged over the batch; sklearn's digits scaled to [0, 1]; batch
256, 500 steps, every optimizer from the same initial parameters and the same batches.
Reported: the full-data loss after the last step, the steps and the wall time to a full-data
loss ≤ 17, and the median step time. Adam runs at each learning rate of a small sweep and the
best final loss is kept. kfac-jax's adaptive `Optimizer` runs in its own virtual environment
(see benchmarks/kfac_jax_digits.py for the exact versions) as a subprocess.

Step times: every step is timed to `block_until_ready`; the first (compiling) step is left
out of the medians and, in "wall to ≤ 17", counted at the median step time. kfac-jax
compiles further functions in later steps (its first inverse and damping updates), which
"wall to ≤ 17" includes; "steps × median" leaves every compile out. Adam's and
K-FAC's median step times are also measured interleaved (alternating blocks of steps, median
of the block medians), and the ratio K-FAC / Adam is taken from that phase.

CNN: the digits classifier conv3x3(16)-conv3x3/2(32)-dense(10), softmax cross-entropy,
batch 64, K-FAC (true Fisher) against the best Adam of a small sweep.

Usage::

  python3 -m benchmarks.kfac_bench [--out bench_out] [--kfac-python /work/envs/kfac/bin/python]
                                   [--skip-kfac-jax] [--skip-cnn]
"""

from __future__ import annotations

import os

# jaxlib's CPU Cholesky/eigh call OpenBLAS, whose thread pool thrashes when the cores are
# shared (12 small Cholesky inverses: ~400 ms instead of ~1.3 ms on a loaded 2-core machine).
# One thread, for every optimizer here and for the kfac-jax subprocess, unless set already.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

from benchmarks.problems import CNN
from secondorder import capture
from secondorder.transforms.kfac import kfac

SIZES = (64, 128, 32, 8, 32, 128, 64)
CODE_LAYER = 2
BATCH, STEPS, TARGET = 256, 500, 17.0
ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
# Best of a small sweep on each problem (damping, kl_clip, momentum), as Adam's lr is.
KFAC_CONFIG = dict(learning_rate=0.3, damping=3e-3, kl_clip=2e-2, update_interval=5,
                   momentum=0.7)
CNN_KFAC_CONFIG = dict(learning_rate=0.3, damping=1e-2, kl_clip=2e-3, update_interval=5,
                       momentum=0.7)
HERE = os.path.dirname(os.path.abspath(__file__))


class Autoencoder(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(SIZES[:-1], SIZES[1:])])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1 and i != CODE_LAYER:
        x = jnp.tanh(x)
    return x


def bernoulli_nll(logits, x):
  return jnp.sum(jnp.logaddexp(0.0, logits) - x * logits) / x.shape[0]


def softmax_ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def batch_indices(n: int, batch: int, steps: int, seed: int) -> np.ndarray:
  """Epoch-wise shuffled minibatches (the last partial batch of an epoch dropped)."""
  rng = np.random.default_rng(seed)
  out, per_epoch = [], n // batch
  while len(out) < steps:
    perm = rng.permutation(n)
    out.extend(perm[i * batch:(i + 1) * batch] for i in range(per_epoch))
  return np.stack(out[:steps])


# ----------------------------------------------------------------------------- runners


def make_steps(graphdef, loss_fn, likelihood, tx, x_full, y_full, kind):
  """(step(params, opt_state, xb, yb, key), full_loss(params)) for one optimizer."""
  model_loss = lambda p, xb, yb: loss_fn(nnx.merge(graphdef, p)(xb), yb)
  if kind == "kfac":
    cap = capture.nnx_capture(loss_fn, likelihood=likelihood)

    @jax.jit
    def step(params, opt_state, xb, yb, key):
      loss, grads, stats = cap(nnx.merge(graphdef, params), xb, yb, key=key)
      updates, opt_state = tx.update(grads, opt_state, params, kfac_stats=stats)
      return optax.apply_updates(params, updates), opt_state, loss
  else:

    @jax.jit
    def step(params, opt_state, xb, yb, key):
      del key
      loss, grads = jax.value_and_grad(model_loss)(params, xb, yb)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

  full = jax.jit(lambda p: model_loss(p, x_full, y_full))
  return step, full


def train(step, full, params, opt_state, x, y, idx, seed=0):
  losses, times = [], []
  key = jax.random.key(seed)
  for t in range(idx.shape[0]):
    xb, yb = x[idx[t]], y[idx[t]]
    k = jax.random.fold_in(key, t)
    t0 = time.perf_counter()
    params, opt_state, _ = step(params, opt_state, xb, yb, k)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - t0)
    losses.append(float(full(params)))
  return params, losses, times


def summarize(losses, times, target):
  med = statistics.median(times[1:])
  hit = next((i + 1 for i, l in enumerate(losses) if l <= target), None)
  wall = None if hit is None else med + sum(times[1:hit])
  typical = None if hit is None else hit * med
  return dict(final=losses[-1], steps_to_target=hit, wall_to_target=wall,
              steps_x_median=typical, median_step=med)


def interleaved_step_times(runs, x, y, idx, rounds=5, block=40):
  """Median over rounds of each run's median step time, the runs alternating in blocks."""
  meds = {name: [] for name in runs}
  state = {name: (p, s) for name, (step, p, s) in runs.items()}
  key = jax.random.key(123)
  for r in range(rounds):
    for name, (step, _, _) in runs.items():
      p, s = state[name]
      ts = []
      for t in range(block):
        i = (r * block + t) % idx.shape[0]
        t0 = time.perf_counter()
        p, s, _ = step(p, s, x[idx[i]], y[idx[i]], jax.random.fold_in(key, t))
        jax.block_until_ready(p)
        ts.append(time.perf_counter() - t0)
      state[name] = (p, s)
      meds[name].append(statistics.median(ts))
  return {name: statistics.median(v) for name, v in meds.items()}


# ----------------------------------------------------------------------------- autoencoder


def autoencoder(args):
  x = jnp.asarray(load_digits().data / 16.0, jnp.float32)
  idx = batch_indices(x.shape[0], BATCH, STEPS, seed=0)
  model = Autoencoder(nnx.Rngs(0))
  graphdef, params0 = nnx.split(model)
  results, curves, runs = {}, {}, {}

  for lr in ADAM_LRS:
    tx = optax.adam(lr)
    step, full = make_steps(graphdef, bernoulli_nll, None, tx, x, x, "adam")
    _, losses, times = train(step, full, params0, tx.init(params0), x, x, idx)
    results[f"adam lr={lr:g}"] = summarize(losses, times, TARGET)
    curves[f"adam lr={lr:g}"] = (losses, times)
    print(f"adam lr={lr:g}: {results[f'adam lr={lr:g}']}", flush=True)
  best_adam = min((k for k in results if k.startswith("adam")), key=lambda k: results[k]["final"])
  best_lr = float(best_adam.split("=")[1])
  adam_tx = optax.adam(best_lr)
  adam_step, _ = make_steps(graphdef, bernoulli_nll, None, adam_tx, x, x, "adam")

  cap = capture.nnx_capture(bernoulli_nll, likelihood="bernoulli")
  layers = cap.layers(model, x[:BATCH])
  tx = kfac(layers=layers, **KFAC_CONFIG)
  kstep, kfull = make_steps(graphdef, bernoulli_nll, "bernoulli", tx, x, x, "kfac")
  _, losses, times = train(kstep, kfull, params0, tx.init(params0), x, x, idx)
  results["secondorder.kfac"] = summarize(losses, times, TARGET)
  curves["secondorder.kfac"] = (losses, times)
  print(f"secondorder.kfac: {results['secondorder.kfac']}", flush=True)

  runs = {"adam": (adam_step, params0, adam_tx.init(params0)),
          "kfac": (kstep, params0, tx.init(params0))}
  inter = interleaved_step_times(runs, x, x, idx)

  if not args.skip_kfac_jax:
    os.makedirs(args.out, exist_ok=True)
    setup = os.path.join(args.out, "kfac_jax_setup.npz")
    result = os.path.join(args.out, "kfac_jax_result.json")
    pure = nnx.to_pure_dict(params0)
    arrays = {"x": np.asarray(x), "idx": idx}
    for i in range(len(SIZES) - 1):
      arrays[f"W{i}"] = np.asarray(pure["layers"][i]["kernel"])
      arrays[f"b{i}"] = np.asarray(pure["layers"][i]["bias"])
    np.savez(setup, **arrays)
    cmd = [args.kfac_python, os.path.join(HERE, "kfac_jax_digits.py"), setup, result]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      print("kfac-jax run failed:\n" + proc.stderr[-3000:], flush=True)
    else:
      with open(result) as f:
        kj = json.load(f)
      results["kfac-jax (adaptive)"] = summarize(kj["loss"], kj["step_time"], TARGET)
      curves["kfac-jax (adaptive)"] = (kj["loss"], kj["step_time"])
      print(f"kfac-jax: {results['kfac-jax (adaptive)']}", flush=True)

  print(f"\n## Digits autoencoder, batch {BATCH}, {STEPS} steps (full-data loss; target ≤ {TARGET})\n")
  print(f"secondorder.kfac config: {KFAC_CONFIG}; best Adam: lr={best_lr:g}\n")
  print("| optimizer | final loss | steps to ≤17 | wall to ≤17 (s) | steps × median (s) | "
        "median step (ms) |")
  print("|---|---|---|---|---|---|")
  for name, r in results.items():
    wall = "—" if r["wall_to_target"] is None else f"{r['wall_to_target']:.2f}"
    typ = "—" if r["steps_x_median"] is None else f"{r['steps_x_median']:.2f}"
    steps = "—" if r["steps_to_target"] is None else str(r["steps_to_target"])
    print(f"| {name} | {r['final']:.3f} | {steps} | {wall} | {typ} | "
          f"{1e3 * r['median_step']:.2f} |")
  print(f"\nInterleaved median step time: Adam {1e3 * inter['adam']:.2f} ms, K-FAC "
        f"{1e3 * inter['kfac']:.2f} ms, ratio K-FAC/Adam {inter['kfac'] / inter['adam']:.2f}")
  return results, curves, inter


# ----------------------------------------------------------------------------- CNN


def cnn(args, steps=300, batch=64):
  d = load_digits()
  perm = np.random.default_rng(0).permutation(len(d.target))
  xs = jnp.asarray(d.data[perm] / 16.0, jnp.float32)
  ys = jnp.asarray(d.target[perm], jnp.int32)
  x_tr, y_tr, x_te, y_te = xs[:1500], ys[:1500], xs[1500:], ys[1500:]
  idx = batch_indices(x_tr.shape[0], batch, steps, seed=1)
  model = CNN(rngs=nnx.Rngs(0))
  graphdef, params0 = nnx.split(model)
  acc = jax.jit(lambda p: jnp.mean(jnp.argmax(nnx.merge(graphdef, p)(x_te), -1) == y_te))
  results, curves = {}, {}
  for lr in (1e-3, 3e-3, 1e-2):
    tx = optax.adam(lr)
    step, full = make_steps(graphdef, softmax_ce, None, tx, x_tr, y_tr, "adam")
    p, losses, times = train(step, full, params0, tx.init(params0), x_tr, y_tr, idx)
    results[f"adam lr={lr:g}"] = dict(summarize(losses, times, 0.1), acc=float(acc(p)))
    curves[f"adam lr={lr:g}"] = (losses, times)
  cap = capture.nnx_capture(softmax_ce, likelihood="softmax")
  layers = cap.layers(model, x_tr[:batch])
  tx = kfac(layers=layers, **CNN_KFAC_CONFIG)
  step, full = make_steps(graphdef, softmax_ce, "softmax", tx, x_tr, y_tr, "kfac")
  p, losses, times = train(step, full, params0, tx.init(params0), x_tr, y_tr, idx)
  results["secondorder.kfac"] = dict(summarize(losses, times, 0.1), acc=float(acc(p)))
  curves["secondorder.kfac"] = (losses, times)
  print(f"\n## Digits CNN classifier, batch {batch}, {steps} steps (train loss; target ≤ 0.1)\n")
  print(f"secondorder.kfac config: {CNN_KFAC_CONFIG}\n")
  print("| optimizer | final train loss | steps to ≤0.1 | wall to ≤0.1 (s) | median step (ms) | test acc |")
  print("|---|---|---|---|---|---|")
  for name, r in results.items():
    wall = "—" if r["wall_to_target"] is None else f"{r['wall_to_target']:.2f}"
    st = "—" if r["steps_to_target"] is None else str(r["steps_to_target"])
    print(f"| {name} | {r['final']:.4f} | {st} | {wall} | {1e3 * r['median_step']:.2f} | "
          f"{r['acc']:.3f} |")
  return results, curves


def plot(curves, path, title):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, (losses, times) in curves.items():
    med = statistics.median(times[1:])
    wall = np.cumsum([med] + list(times[1:]))
    axes[0].plot(np.arange(1, len(losses) + 1), losses, label=name)
    axes[1].plot(wall, losses, label=name)
  for ax, xl in zip(axes, ("step", "wall time (s)")):
    ax.set_yscale("log")
    ax.set_xlabel(xl)
    ax.set_ylabel("full-data loss")
    ax.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="bench_out")
  ap.add_argument("--kfac-python", default="/work/envs/kfac/bin/python")
  ap.add_argument("--skip-kfac-jax", action="store_true")
  ap.add_argument("--skip-cnn", action="store_true")
  args = ap.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  print(f"jax {jax.__version__}, optax {optax.__version__}, devices {jax.devices()}", flush=True)
  res, curves, inter = autoencoder(args)
  plot(curves, os.path.join(args.out, "kfac_autoencoder.png"), "digits autoencoder")
  out = {"autoencoder": res, "interleaved_step": inter}
  if not args.skip_cnn:
    cres, ccurves = cnn(args)
    plot(ccurves, os.path.join(args.out, "kfac_cnn.png"), "digits CNN")
    out["cnn"] = cres
  with open(os.path.join(args.out, "kfac_bench.json"), "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
