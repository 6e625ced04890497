"""Shampoo's inverse roots on a simulated 8-device mesh: spread over devices or repeated?

A two-layer tanh MLP (128 -> 256 -> 128, mean squared error) trained by
`shampoo_preconditioner(block_size=64, update_interval=1)`: each kernel is cut into eight
64x64 blocks, so every step decomposes one stack of 32 factors [32, 64, 64].
Five set-ups of the same sharded `jax.jit` step:

  single       one device;
  dp8          8-way data parallel, parameters replicated: propagation leaves the factor
               stack replicated, so every device computes all 32 roots;
  dp8+zero     the same, with the factor stacks constrained to P("data") by
               `jax.lax.with_sharding_constraint` (ZeRO-style optimizer-state sharding):
               each device owns 4 factors and computes their roots;
  dp2_mp4      a 2x4 (data, model) mesh, kernels sharded over "model": propagation puts
               the blocks of each model shard, and their factors, on that shard (8 roots
               per device);
  dp2_mp4+zero the factor stacks constrained to P(("data", "model")): 4 per device.

For each set-up the table gives the per-device shapes of the eigendecompositions in the
compiled HLO of the step with `method="eigh"` (the partitioned program each device runs;
compiled, not run), the number of roots each device owns (the stack's shard), the
median step time (with the timed `--method`, Newton by default) over
interleaved rounds, its ratio to dp8 measured in the same rounds, and the largest
difference of the parameters after the timed steps from the single-device run. The
simulated devices share this machine's cores, so repeated work costs its full price once
per device: the ratio shows the work saved, not the speed-up of real accelerators.

    python3 -m benchmarks.sharding_bench --repeats 5 --out bench_out

K-FAC's factorizations, the same way (`--kfac-only` runs this part alone): a linen MLP
128 -> 256 -> 256 -> 256 -> 128 (tanh, softmax cross-entropy over 128 classes, true Fisher)
trained by `kfac(update_interval=1)`, so every step computes the damped inverses of its
eight factors, A of sizes 129, 257, 257, 257 and S of sizes 256, 256, 256, 128. By default
each is its own Cholesky call, repeated on every device. With `factor_sharding` (and
`pad_ratio=1.25`) they form two stacks, [6, 257, 257] and [2, 129, 129], each split over
the 8 devices: one factorization of each size per device. The table gives the per-device
Cholesky factorizations (potrf) of the compiled step, the median step time and its ratio
to dp8 (the defaults: every device repeating every factorization). The set-ups keep every
device's batch of factorizations to one, so this benchmark lets them run as batched calls
(`secondorder.linalg.CPU_ONE_AT_A_TIME` raised): jaxlib 0.10's batched CPU LAPACK kernels
deadlock inside larger programs (a replicated [6, 257, 257] stack hangs it), which is why
the library decomposes batches of matrices of side >= 32 one at a time on CPU.

The roots use the coupled Newton iteration (`method="newton"`, batched matmuls) by
default. With `--method eigh` the roots are LAPACK calls: jaxlib 0.10's CPU kernel splits a
batched eigendecomposition into tasks on the same thread pool that runs the simulated
devices, and with eight devices decomposing at once on a small machine every pool thread
can end up waiting for tasks that never get a thread (a deadlock; newer jaxlib builds no
longer split the batch). The sharded tests use 8x8 blocks, which stay below that split.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from secondorder.transforms.shampoo import ShampooState, shampoo_preconditioner  # noqa: E402

SIZES = (128, 256, 128)
BATCH = 64
BLOCK = 64


def make_problem(seed: int = 0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  params = {
      "w1": jax.random.normal(k1, SIZES[:2]) / np.sqrt(SIZES[0]),
      "b1": jnp.zeros(SIZES[1]),
      "w2": jax.random.normal(k2, SIZES[1:]) / np.sqrt(SIZES[1]),
      "b2": jnp.zeros(SIZES[2]),
  }
  batch = {"x": jax.random.normal(k3, (BATCH, SIZES[0])),
           "y": jax.random.normal(k4, (BATCH, SIZES[2]))}
  return params, batch


def loss_fn(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  return jnp.mean(jnp.square(h @ params["w2"] + params["b2"] - batch["y"]))


def constrain_factor_stacks(state, sharding):
  """Gives Shampoo's factor stacks (statistics and roots) `sharding`; other leaves as they are."""
  def one(node):
    if isinstance(node, ShampooState):
      c = lambda xs: tuple(jax.lax.with_sharding_constraint(x, sharding) for x in xs)
      return node._replace(stats=c(node.stats), preconds=c(node.preconds))
    return node
  return jax.tree.map(one, state, is_leaf=lambda n: isinstance(n, ShampooState))


def make_tx(method: str):
  return optax.chain(
      shampoo_preconditioner(block_size=BLOCK, update_interval=1, method=method),
      optax.scale_by_learning_rate(1e-2))


def make_step(tx, stack_sharding):
  def step(params, state, batch):
    if stack_sharding is not None:
      state = constrain_factor_stacks(state, stack_sharding)
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    if stack_sharding is not None:
      state = constrain_factor_stacks(state, stack_sharding)
    return optax.apply_updates(params, updates), state
  return jax.jit(step)


def call_shapes(hlo_text: str, kernel: str = "syevd") -> list[str]:
  """Per-device shapes of the LAPACK calls `kernel` (syevd: eigendecompositions, potrf:
  Cholesky) in a compiled (partitioned) program."""
  shapes = []
  for line in hlo_text.splitlines():
    if "custom-call" in line and kernel in line:
      m = re.search(r"=\s*\(?(\w+\[[\d,]*\])", line)
      if m:
        shapes.append(m.group(1))
  return sorted(shapes)


def meshes(devices):
  """The data-parallel (8,) mesh and the 2x4 (data, model) mesh."""
  return (Mesh(devices.reshape(8), ("data",), axis_types=(AxisType.Auto,)),
          Mesh(devices.reshape(2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2))


def setups(devices):
  dp, dpmp = meshes(devices)
  replicated = {"w1": P(), "b1": P(), "w2": P(), "b2": P()}
  megatron = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}
  return {
      "single": (None, None, None),
      "dp8": (dp, replicated, None),
      "dp8+zero": (dp, replicated, P("data")),
      "dp2_mp4": (dpmp, megatron, None),
      "dp2_mp4+zero": (dpmp, megatron, P(("data", "model"))),
  }


def time_rounds(runs: dict, args, advance) -> None:
  """Interleaved timing: `args.repeats` rounds over the set-ups in random order, each
  `args.steps` calls of `advance(run, params, state) -> (params, state)`; appends the
  seconds per step to `run["times"]` and carries params and state on."""
  names = list(runs)
  for _ in range(args.repeats):
    random.shuffle(names)
    for name in names:
      r = runs[name]
      params, state = r["params"], r["state"]
      t0 = time.perf_counter()
      for _ in range(args.steps):
        params, state = advance(r, params, state)
      jax.block_until_ready((params, state))
      r["times"].append((time.perf_counter() - t0) / args.steps)
      r["params"], r["state"] = params, state


KFAC_SIZES = (128, 256, 256, 256, 128)


def kfac_setups(devices):
  dp, dpmp = meshes(devices)
  return {  # name: (mesh, model-sharded params, factor_sharding spec)
      "single": (None, False, None),
      "dp8": (dp, False, None),
      "dp8+factor_sharding": (dp, False, P("data")),
      "dp2_mp4": (dpmp, True, None),
      "dp2_mp4+factor_sharding": (dpmp, True, P(("data", "model"))),
  }


def kfac_main(args) -> list[dict]:
  import flax.linen as nn

  from secondorder.capture import linen_capture
  from secondorder.transforms.kfac import kfac

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i, width in enumerate(KFAC_SIZES[1:]):
        x = nn.Dense(width, name=f"l{i}")(x)
        if i < len(KFAC_SIZES) - 2:
          x = jnp.tanh(x)
      return x

  def ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  model = MLP()
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (BATCH, KFAC_SIZES[0]))
  y = jax.random.randint(ky, (BATCH,), 0, KFAC_SIZES[-1])
  params0 = model.init(kp, x)["params"]
  cap = linen_capture(model, ce, likelihood="softmax")
  layers = cap.layers(params0, x)

  def make(sharding):
    # Without factor_sharding: the defaults, one call per factor (repeated on every device).
    tx = kfac(0.1, layers=layers, update_interval=1, factor_sharding=sharding,
              pad_ratio=None if sharding is None else 1.25)

    def step(params, state, x, y, key):
      _, grads, stats = cap(params, x, y, key=key)
      updates, state = tx.update(grads, state, params, kfac_stats=stats)
      return optax.apply_updates(params, updates), state
    return tx, jax.jit(step)

  devices = np.array(jax.devices())
  key = jax.random.key(1)
  runs = {}
  for name, (mesh, model_sharded, spec) in kfac_setups(devices).items():
    params, xb, yb = params0, x, y
    sharding = None
    if mesh is not None:
      def pspec(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        if not model_sharded:
          return P()
        i = int(names[0][1:])  # alternate columns / rows of the kernels over "model"
        if names[-1] == "kernel":
          return P(None, "model") if i % 2 == 0 else P("model", None)
        return P("model") if i % 2 == 0 else P()
      shardings = jax.tree_util.tree_map_with_path(
          lambda pth, leaf: NamedSharding(mesh, pspec(pth, leaf)), params0)
      params = jax.device_put(params0, shardings)
      xb = jax.device_put(x, NamedSharding(mesh, P("data")))
      yb = jax.device_put(y, NamedSharding(mesh, P("data")))
      sharding = None if spec is None else NamedSharding(mesh, spec)
    tx, step = make(sharding)
    state = jax.jit(tx.init)(params)
    compiled = step.lower(params, state, xb, yb, key).compile()
    # Output shardings may differ from the inputs' for a step or two: warm the jitted step
    # (which recompiles for them) up before timing it.
    for _ in range(3):
      params, state = jax.block_until_ready(step(params, state, xb, yb, key))
    runs[name] = {"step": step, "params": params, "state": state, "x": xb, "y": yb,
                  "times": [], "potrf": call_shapes(compiled.as_text(), "potrf")}

  time_rounds(runs, args, lambda r, p, st: r["step"](p, st, r["x"], r["y"], key))

  rows = []
  for name, r in runs.items():
    ratios = [t / d for t, d in zip(r["times"], runs["dp8"]["times"])]
    rows.append({
        "setup": name, "potrf_per_device": ", ".join(r["potrf"]),
        "median_step_ms": 1e3 * float(np.median(r["times"])),
        "ratio_to_dp8": float(np.median(ratios)),
        "max_param_diff_vs_single": max(
            float(jnp.max(jnp.abs(a - b))) for a, b in
            zip(jax.tree.leaves(r["params"]), jax.tree.leaves(runs["single"]["params"])))})
  print(f"\nK-FAC damped inverses on a simulated 8-device mesh (MLP "
        f"{'-'.join(map(str, KFAC_SIZES))}, update_interval=1, "
        f"{args.repeats} rounds x {args.steps} steps)\n")
  print("| set-up | Cholesky per device (compiled HLO) | median step (ms) | time / dp8 | "
        "max param diff vs single |")
  print("|---|---|---|---|---|")
  for row in rows:
    print(f"| {row['setup']} | {row['potrf_per_device']} | {row['median_step_ms']:.1f} | "
          f"{row['ratio_to_dp8']:.2f} | {row['max_param_diff_vs_single']:.1e} |")
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(prog="python3 -m benchmarks.sharding_bench",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
  parser.add_argument("--steps", type=int, default=2, help="steps per timed call (default 2)")
  parser.add_argument("--method", default="newton", choices=("newton", "eigh"),
                      help="root method (default newton; see the note on eigh)")
  parser.add_argument("--out", default="bench_out")
  parser.add_argument("--kfac-only", action="store_true", help="only the K-FAC table")
  args = parser.parse_args()
  # Batched decompositions as on an accelerator: Shampoo's eigh program is compiled only,
  # never run, and every K-FAC set-up gives each device batches of one factor (the
  # defaults: one call per factor; factor_sharding: one factor per device and stack), which
  # jaxlib's CPU kernels run without the deadlock secondorder.linalg guards against.
  from secondorder import linalg
  linalg.CPU_ONE_AT_A_TIME = 10**9
  if args.kfac_only:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sharding_bench_kfac.json"), "w") as f:
      json.dump(kfac_main(args), f, indent=1)
    return

  devices = np.array(jax.devices())
  if devices.size != 8:
    raise SystemExit(f"needs 8 simulated devices, got {devices.size}")
  tx = make_tx(args.method)
  tx_eigh = make_tx("eigh")
  params0, batch0 = make_problem()

  runs = {}
  for name, (mesh, pspec, stack_spec) in setups(devices).items():
    if mesh is None:
      params, batch = params0, batch0
      stack = None
    else:
      params = jax.device_put(params0, {k: NamedSharding(mesh, s) for k, s in pspec.items()})
      batch = jax.device_put(batch0, NamedSharding(mesh, P("data")))
      stack = None if stack_spec is None else NamedSharding(mesh, stack_spec)
    step = make_step(tx, stack)
    state = jax.jit(tx.init)(params)
    params, state = jax.block_until_ready(step(params, state, batch))  # settle shardings
    compiled = step.lower(params, state, batch).compile()
    runs[name] = {"step": compiled, "params": params, "state": state, "batch": batch,
                  "times": [],
                   # Compiled only, never run: the per-device LAPACK calls of method="eigh".
                   "eigh": call_shapes(make_step(tx_eigh, stack).lower(
                       params, state, batch)
                       .compile().as_text())}

  time_rounds(runs, args, lambda r, p, st: r["step"](p, st, r["batch"]))

  def leaf_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  rows = []
  for name, r in runs.items():
    ratios = [t / d for t, d in zip(r["times"], runs["dp8"]["times"])]
    stack = jax.tree.leaves(
        r["state"], is_leaf=lambda n: isinstance(n, ShampooState))[0].stats[0]
    spec = stack.sharding
    per_device = spec.shard_shape(stack.shape)[0]
    rows.append({
        "setup": name,
        "stack_spec": str(getattr(spec, "spec", "single device")),
        "eigh_per_device": ", ".join(r["eigh"]),
        "roots_per_device": per_device,
        "median_step_ms": 1e3 * float(np.median(r["times"])),
        "ratio_to_dp8": float(np.median(ratios)),
        "max_param_diff_vs_single": leaf_diff(r["params"], runs["single"]["params"]),
    })

  print(f"Shampoo roots on a simulated 8-device mesh ({jax.device_count()} devices, "
        f"block {BLOCK}, method {args.method}, update_interval=1, {args.repeats} rounds x "
        f"{args.steps} steps)\n")
  print("| set-up | factor stack sharding | eigh per device (compiled HLO, method=eigh) | "
        "roots per device "
        "| median step (ms) | time / dp8 | max param diff vs single |")
  print("|---|---|---|---|---|---|---|")
  for row in rows:
    print(f"| {row['setup']} | `{row['stack_spec']}` | {row['eigh_per_device']} | "
          f"{row['roots_per_device']} | {row['median_step_ms']:.1f} | "
          f"{row['ratio_to_dp8']:.2f} | {row['max_param_diff_vs_single']:.1e} |")

  kfac_rows = kfac_main(args)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "sharding_bench.json"), "w") as f:
    json.dump(rows, f, indent=1)
  with open(os.path.join(args.out, "sharding_bench_kfac.json"), "w") as f:
    json.dump(kfac_rows, f, indent=1)
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar([r["setup"] for r in rows], [r["median_step_ms"] for r in rows])
    ax.set_ylabel("median step (ms)")
    ax.set_title("Shampoo step, roots every step, 8 simulated devices")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "sharding_bench.png"), dpi=120)
  except ImportError:
    pass


if __name__ == "__main__":
  main()
