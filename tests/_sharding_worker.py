"""Trains every secondorder transform on a simulated 8-device CPU mesh and writes a JSON report.

Run in its own process (the device count is fixed when jax starts):

  python tests/_sharding_worker.py OUT.json [method ...]

For each method it records, on a data-parallel mesh (8,) ("data") and on a 2x4
("data", "model") mesh with the weights sharded along "model":
  * the largest difference between the parameters after 20 sharded steps and after
    20 steps on one device;
  * the sharding of every parameter and optimizer-state leaf (initial and final), and
    how many times the step compiled;
  * the per-device shapes of the LAPACK decompositions in the compiled program;
  * the curvature statistics after one step on the mesh, on one device with the full
    batch, and on one device with only the first data shard's examples.
Nothing here is specific to a method: the mesh, the shardings and the propagation are
plain `jax.jit` over `NamedSharding` inputs.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _training_setups as ts  # noqa: E402

STEPS = 20


def meshes() -> dict[str, Mesh]:
  devices = np.array(jax.devices())
  if devices.size != 8:
    raise RuntimeError(f"expected 8 simulated devices, got {devices.size}")
  return {
      "dp8": Mesh(devices.reshape(8), ("data",), axis_types=(AxisType.Auto,)),
      "dp2_mp4": Mesh(devices.reshape(2, 4), ("data", "model"),
                      axis_types=(AxisType.Auto, AxisType.Auto)),
  }


def param_specs(params, mesh: Mesh):
  """Megatron-style: the hidden dimension of both dense layers on "model" (if present)."""
  if "model" not in mesh.axis_names:
    return jax.tree.map(lambda _: P(), params)
  return {
      "hidden": {"kernel": P(None, "model"), "bias": P("model")},
      "out": {"kernel": P("model", None), "bias": P()},
  }


# A scan-over-layers model: three stacked tanh layers [3, 8, 8] (no biases: a stacked bias
# [3, 8] has no reduction axis to declare) applied by `lax.scan`, then the output layer.
# Shampoo reads the stack through dimension numbers (three independent 8x8 layers); on the
# 2x4 mesh the layers' outputs are sharded over "model".
STACKED_LAYERS = 3


def stacked_init_params(seed: int = 0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  scale = 1.0 / np.sqrt(ts.IN_FEATURES)
  return {
      "layers": {"kernel": scale * jax.random.normal(
                     k1, (STACKED_LAYERS, ts.IN_FEATURES, ts.IN_FEATURES), jnp.float32)},
      "out": {"kernel": scale * jax.random.normal(k2, (ts.IN_FEATURES, ts.CLASSES),
                                                  jnp.float32),
              "bias": jnp.zeros((ts.CLASSES,), jnp.float32)},
  }


def stacked_param_specs(params, mesh: Mesh):
  if "model" not in mesh.axis_names:
    return jax.tree.map(lambda _: P(), params)
  return {"layers": {"kernel": P(None, None, "model")},
          "out": {"kernel": P("model", None), "bias": P()}}


def stacked_loss(params, batch):
  def layer(x, w):
    return jnp.tanh(x @ w["kernel"]), None

  x, _ = jax.lax.scan(layer, batch["x"], params["layers"])
  logits = x @ params["out"]["kernel"] + params["out"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


class StackedSetup:
  """Shampoo on the scan-over-layers model (the interface of `_training_setups.Setup`, plus
  the model's own parameters and shardings)."""

  name = "shampoo_stacked"
  make_for_mesh = None
  init_params = staticmethod(stacked_init_params)
  param_specs = staticmethod(stacked_param_specs)

  @staticmethod
  def make_on(mesh=None):
    del mesh
    from secondorder.transforms.shampoo import shampoo  # pylint: disable=g-import-not-at-top
    specs = {"layers": {"kernel": optax.contrib.MuonDimensionNumbers(1, 2)},
             "out": {"kernel": None, "bias": None}}
    return shampoo(1e-2, block_size=8, update_interval=5, weight_dimension_numbers=specs)

  @staticmethod
  def grads_and_args(params, batch, key):
    del key
    return jax.grad(stacked_loss)(params, batch), {}

  @staticmethod
  def statistics(state):
    return ts.find_state(state, "ShampooState").stats


# SOAP on the classifier with a squared-error head. A softmax head has a direction with an
# exactly zero gradient (adding one number to every logit, i.e. shifting each row of the
# output kernel and the output bias, leaves the loss unchanged); SOAP rotates that zero into
# a rounding-sized component which Adam divides by sqrt(v) + eps, so the output kernel drifts
# along it by an amount set by the reductions' order, different on every mesh, without
# changing the loss (here 1e-4 of the kernel's entries, 1000 times the other differences).
# A squared error against one-hot labels has no such direction: on it the mesh's
# parameters, factors, bases and moments are comparable to one device's.
# Blocks of 4: the hidden kernel [8, 32] is 2 x 8 blocks and the output kernel [32, 4] 8 x 1,
# so the one stack of 4x4 factors (and of their bases) is [48, 4, 4].


def _squared_error_grads(params, batch, key):
  del key

  def loss(params):
    logits = ts.logits_fn(params, batch)
    return jnp.mean((logits - jax.nn.one_hot(batch["y"], ts.CLASSES)) ** 2)

  return jax.grad(loss)(params), {}


class SoapSetup:
  """SOAP on the squared-error classifier (the interface of `_training_setups.Setup`).

  Its programs compile at XLA's backend optimisation level 0 (one device and both meshes
  alike), which takes a third off each of its three compilations, the bulk of its share of
  this worker's time.
  """

  name = "soap"
  make_for_mesh = None
  compiler_options = {"xla_backend_optimization_level": 0}
  grads_and_args = staticmethod(_squared_error_grads)

  @staticmethod
  def make_on(mesh=None):
    del mesh
    from secondorder.transforms.soap import soap  # pylint: disable=g-import-not-at-top
    return soap(1e-2, block_size=4, eps=1e-4, precondition_frequency=5)

  @staticmethod
  def statistics(state):
    return ts.find_state(state, "ScaleBySoapState").factors


class KlShampooSetup(SoapSetup):
  """KL-Shampoo on the squared-error classifier, blocks of 4, like `SoapSetup` (a softmax
  head's zero-gradient direction, rotated into rounding-sized components and divided by
  the small eigenvalue estimates there, would drift differently on every mesh)."""

  name = "kl_shampoo"

  @staticmethod
  def make_on(mesh=None):
    del mesh
    from secondorder.transforms.kl_shampoo import kl_shampoo  # pylint: disable=g-import-not-at-top
    return kl_shampoo(1e-2, block_size=4, eps=1e-4, precondition_frequency=5)

  @staticmethod
  def statistics(state):
    return ts.find_state(state, "ScaleByKlShampooState").factors


def all_setups() -> dict:
  setups = ts.available_setups()
  if "shampoo" in setups:
    setups["shampoo_stacked"] = StackedSetup()
  setups["soap"] = SoapSetup()
  setups["kl_shampoo"] = KlShampooSetup()
  return setups


def batch_specs(batch):
  return jax.tree.map(lambda x: P("data", *([None] * (x.ndim - 1))), batch)


def _spec_list(x) -> list | None:
  sharding = x.sharding
  if not isinstance(sharding, NamedSharding):
    return None
  spec = list(sharding.spec) + [None] * (x.ndim - len(sharding.spec))
  out = []
  for entry in spec:
    if entry is None:
      out.append(None)
    elif isinstance(entry, (tuple, list)):
      out.append(list(entry))
    else:
      out.append(entry)
  return out


def describe(tree) -> list[dict]:
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not isinstance(leaf, jax.Array):
      continue
    is_key = jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    rows.append({
        "path": jax.tree_util.keystr(path),
        "shape": list(leaf.shape),
        "dtype": str(leaf.dtype),
        "is_key": bool(is_key),
        "spec": _spec_list(leaf),
        "replicated": bool(leaf.sharding.is_fully_replicated),
        "shard_shape": list(leaf.sharding.shard_shape(leaf.shape)),
        "nbytes": int(leaf.nbytes) if not is_key else 0,
        "shard_nbytes": (int(np.prod(leaf.sharding.shard_shape(leaf.shape)))
                         * leaf.dtype.itemsize) if not is_key else 0,
    })
  return rows


def max_abs_diff(a, b) -> float:
  diffs = jax.tree.map(
      lambda x, y: float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32)
                                         - jnp.asarray(y, jnp.float32)))) if x.size else 0.0,
      a, b)
  return max(jax.tree.leaves(diffs), default=0.0)


def max_abs(a) -> float:
  return max((float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32)))) for x in jax.tree.leaves(a)
              if x.size), default=0.0)


def first_shard_only(batch, data_shards: int):
  """The batch with every data shard replaced by the first: per-shard statistics.

  A mean over this batch equals the mean over the first shard's examples alone, which
  is what a per-device estimate (no cross-device average) would see on device 0.
  """
  return jax.tree.map(
      lambda x: jnp.concatenate([x[: x.shape[0] // data_shards]] * data_shards), batch)


def decomposition_shapes(hlo_text: str, kinds=("syevd", "potrf")) -> list[list[int]]:
  """Per-device shapes of the LAPACK eigendecompositions (syevd) and Cholesky
  factorizations (potrf) in compiled HLO (with ``kinds=("geqrf",)``: the QR
  factorizations)."""
  shapes = []
  for line in hlo_text.splitlines():
    if "custom-call" in line and any(kind in line for kind in kinds):
      # The first tuple element is the eigenvector array, e.g. (f32[3,8,8]{...}, ...).
      m = re.search(r"=\s*\(?\w+\[([\d,]*)\]", line)
      if m:
        shapes.append([int(d) for d in m.group(1).split(",") if d])
  return shapes


def make_train(setup: ts.Setup, mesh: Mesh | None):
  """The jitted `init` and STEPS steps; it also returns the curvature statistics after
  step 1."""
  tx = setup.make_on(mesh)
  stats_of = setup.statistics or (lambda state: ())

  def train(params, batches, keys):
    def body(carry, inputs):
      params, state = carry
      batch, key = inputs
      grads, extra_args = ts.grads_and_args(setup, params, batch, key, state)
      updates, state = tx.update(grads, state, params, **extra_args)
      return (optax.apply_updates(params, updates), state), stats_of(state)

    (params, state), stats = jax.lax.scan(body, (params, tx.init(params)), (batches, keys))
    return params, state, jax.tree.map(lambda x: x[0], stats)

  return jax.jit(train)


# Methods whose training step also runs jitted with the parameters and the optimizer state
# donated on every mesh (every state leaf its own buffer).
DONATION_CHECKED = ("shampoo", "soap", "kl_shampoo")
DONATED_STEPS = 3


def name_of(setup) -> str:
  return getattr(setup, "name", "")


def donated_steps(setup: ts.Setup, mesh: Mesh, params, batches, keys) -> float:
  """DONATED_STEPS steps jitted with params and state donated (sharded params), against the
  same steps without donation: the largest parameter difference (0 when both agree)."""
  tx = setup.make_on(mesh)

  def step(params, state, batch, key):
    grads, extra_args = ts.grads_and_args(setup, params, batch, key, state)
    updates, state = tx.update(grads, state, params, **extra_args)
    return optax.apply_updates(params, updates), state

  donated = jax.jit(step, donate_argnums=(0, 1))
  plain = jax.jit(step)
  p_ref, s_ref = params, jax.jit(tx.init)(params)
  p_don, s_don = jax.tree.map(jnp.copy, params), jax.jit(tx.init)(params)
  for i in range(DONATED_STEPS):
    batch = jax.tree.map(lambda x: x[i], batches)
    p_ref, s_ref = plain(p_ref, s_ref, batch, keys[i])
    p_don, s_don = donated(p_don, s_don, batch, keys[i])
  return max_abs_diff(p_don, p_ref)


def run_method(setup: ts.Setup, meshes_: dict[str, Mesh]) -> dict:
  train = make_train(setup, None)
  params0 = getattr(setup, "init_params", ts.init_params)()
  specs_of = getattr(setup, "param_specs", param_specs)
  batches = ts.make_batches(STEPS, batch_size=getattr(setup, "batch_size", ts.BATCH))
  keys = jax.random.split(jax.random.key(2), STEPS)

  options = getattr(setup, "compiler_options", None)

  def compile_and_run(train, params, batches):
    compiled = train.lower(params, batches, keys).compile(options)
    return compiled(params, batches, keys), compiled

  t0 = time.perf_counter()
  (single_params, single_state, single_stats), single = compile_and_run(
      train, params0, batches)
  result = {"single_seconds": time.perf_counter() - t0, "meshes": {},
            "single_decomposition_shapes": decomposition_shapes(single.as_text()),
            "single_qr_shapes": decomposition_shapes(single.as_text(), ("geqrf",))}

  for mesh_name, mesh in meshes_.items():
    t0 = time.perf_counter()
    p_shard = jax.tree.map(lambda s: NamedSharding(mesh, s), specs_of(params0, mesh))
    b_shard = jax.tree.map(
        lambda x: NamedSharding(mesh, P(None, "data", *([None] * (x.ndim - 2)))), batches)
    params = jax.device_put(params0, p_shard)
    mesh_train = train if setup.make_for_mesh is None else make_train(setup, mesh)
    (mesh_params, mesh_state, mesh_stats), compiled = compile_and_run(
        mesh_train, params, jax.device_put(batches, b_shard))
    no_keys = lambda tree: [x for x in jax.tree.leaves(tree)
                            if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)]
    entry = {
        "params_max_abs_diff": max_abs_diff(mesh_params, single_params),
        "params_max_abs": max_abs(single_params),
        "state_max_abs_diff": max_abs_diff(no_keys(mesh_state), no_keys(single_state)),
        "state_max_abs": max_abs([x for x in no_keys(single_state)
                                  if jnp.issubdtype(x.dtype, jnp.floating)]),
        "params": describe(mesh_params),
        "params_in": describe(params),
        "state": describe(mesh_state),
        "decomposition_shapes": decomposition_shapes(compiled.as_text()),
        "qr_shapes": decomposition_shapes(compiled.as_text(), ("geqrf",)),
    }
    if setup.statistics is not None:
      # After one step from the same start: on the mesh, on one device with the whole
      # batch, on one device with the first data shard only (the single-device executable: no
      # recompile).
      data_shards = mesh.shape["data"]
      first_only = jax.tree.map(lambda x: x, batches)
      first_only = {k: v.at[0].set(first_shard_only({k: v[0]}, data_shards)[k])
                    for k, v in batches.items()}
      shard_stats = single(params0, first_only, keys)[2]
      entry["statistics"] = {
          "mesh_vs_full": max_abs_diff(mesh_stats, single_stats),
          "mesh_vs_first_shard": max_abs_diff(mesh_stats, shard_stats),
          "full_vs_first_shard": max_abs_diff(single_stats, shard_stats),
          "full_max_abs": max_abs(single_stats),
      }
    if name_of(setup) in DONATION_CHECKED:
      entry["donated_steps_max_abs_diff"] = donated_steps(setup, mesh, params, batches, keys)
    entry["seconds"] = time.perf_counter() - t0
    result["meshes"][mesh_name] = entry
  return result


def main(argv: list[str]) -> None:
  out_path = argv[1]
  setups = all_setups()
  names = argv[2:] or list(setups)
  meshes_ = meshes()
  report = {"devices": jax.device_count(), "steps": STEPS, "methods": {}}
  for name in names:
    t0 = time.perf_counter()
    try:
      report["methods"][name] = run_method(setups[name], meshes_)
    except Exception as e:  # reported per method, asserted on by the tests
      report["methods"][name] = {"error": f"{type(e).__name__}: {e}"}
    report["methods"][name]["seconds"] = time.perf_counter() - t0
  with open(out_path, "w") as f:
    json.dump(report, f, indent=1)


if __name__ == "__main__":
  main(sys.argv)
