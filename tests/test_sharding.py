"""Every transform under JAX's own SPMD: a simulated 8-device CPU mesh, sharded `jax.jit`.

One subprocess (`_sharding_worker.py`, started with
`--xla_force_host_platform_device_count=8`) trains each method for 20 steps on one
device, on a data-parallel mesh and on a 2x4 data x model mesh, and writes what it saw
to JSON; the tests below assert on that report. The test session's own jax keeps its
single device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

try:
  import fcntl
except ImportError:  # not POSIX: every worker writes its own report
  fcntl = None

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Every method the library ships, by the name used in `_training_setups`.
# (kfac_spread: K-FAC with its factor stacks sharded over the mesh for the refresh.)
# (shampoo_sparse_stats: Shampoo with its statistics updated every other step.)
# (shampoo_stacked: Shampoo on a scan-over-layers model, a [3, 8, 8] stacked leaf read
# through dimension numbers; the worker's own model.)
# (soap: SOAP on the classifier with a squared-error head, blocks of 4; see
# test_soap_state_matches_one_device for why not the softmax head.)
# (ekfac: its capture measures the moments in the state's bases, batches of 64; see
# _training_setups for why.)
METHODS = ["adam", "adahessian", "sophia_h", "sophia_g", "shampoo", "shampoo_sparse_stats",
           "shampoo_stacked", "kfac", "kfac_spread", "ekfac", "every_k_adamw", "soap",
           "kl_shampoo"]
# The methods that keep statistics estimated from the batch.
STATISTICS_METHODS = ["adahessian", "sophia_h", "sophia_g", "shampoo", "shampoo_sparse_stats",
                      "shampoo_stacked", "kfac", "kfac_spread", "ekfac", "soap", "kl_shampoo"]
# The methods whose state holds trees shaped like the params. SOAP keeps its moments per
# stack of blocks in the rotated coordinates instead; test_soap_stacks_follow_the_blocks
# checks their sharding. EK-FAC covers every parameter of the classifier and keeps no
# momentum: its state has no parameter-shaped leaf (test_ekfac_factor_of_a_sharded_...).
PARAM_TREE_STATE_METHODS = [name for name in METHODS if name not in ("soap", "ekfac")]
MESHES = ["dp8", "dp2_mp4"]
# Twenty float32 steps whose reductions (batch means, contractions over a sharded hidden
# dimension) run in a different order on the mesh. Most methods agree to ~1e-6; AdaHessian
# divides by sqrt(v) + 1e-4 with single-probe Hessian diagonals near zero, which turns
# 1e-9 differences of the momentum into ~2e-5 of the step.
PARAM_RTOL = 5e-5


def _write_report(out):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  partial = out.with_suffix(".partial")
  proc = subprocess.run(
      [sys.executable, os.path.join(HERE, "_sharding_worker.py"), str(partial)],
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  os.replace(partial, out)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  if os.environ.get("PYTEST_XDIST_WORKER") and fcntl is not None:
    # Under pytest-xdist this module's tests are spread over the workers, whose temporary
    # directories share one parent for the session: the first worker writes the report
    # (over a minute of training on the simulated mesh) and the others wait and read it.
    shared = tmp_path_factory.getbasetemp().parent
    out = shared / "sharding_report.json"
    with open(shared / "sharding_report.lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not out.exists():
        _write_report(out)
  else:
    out = tmp_path_factory.mktemp("sharding") / "report.json"
    _write_report(out)
  with open(out) as f:
    return json.load(f)


def _method(report, name):
  assert name in report["methods"], f"{name}: the mesh worker did not run it"
  entry = report["methods"][name]
  assert "error" not in entry, f"{name} failed on the mesh: {entry['error']}"
  return entry


def _by_path(rows):
  return {row["path"]: row for row in rows}


def test_eight_simulated_devices(report):
  assert report["devices"] == 8
  assert report["steps"] == 20


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("name", METHODS)
def test_sharded_training_matches_one_device(report, name, mesh):
  entry = _method(report, name)["meshes"][mesh]
  scale = max(1.0, entry["params_max_abs"])
  assert entry["params_max_abs_diff"] <= PARAM_RTOL * scale, entry["params_max_abs_diff"]


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("name", METHODS)
def test_params_keep_their_sharding(report, name, mesh):
  entry = _method(report, name)["meshes"][mesh]
  before = _by_path(entry["params_in"])
  after = _by_path(entry["params"])
  assert before.keys() == after.keys()
  for path, row in after.items():
    assert row["spec"] == before[path]["spec"], path
  if mesh == "dp2_mp4":
    if name == "shampoo_stacked":
      assert after["['layers']['kernel']"]["spec"] == [None, None, "model"]
    else:
      assert after["['hidden']['kernel']"]["spec"] == [None, "model"]


def _param_like_rows(entry):
  """State leaves that mirror a parameter: (state row, parameter row) pairs."""
  params = _by_path(entry["params"])
  pairs = []
  for row in entry["state"]:
    for path, prow in params.items():
      if row["path"].endswith(path) and row["shape"] == prow["shape"]:
        pairs.append((row, prow))
        break
  return pairs


@pytest.mark.parametrize("name", PARAM_TREE_STATE_METHODS)
def test_state_follows_model_sharded_params(report, name):
  """On the 2x4 mesh every parameter-shaped state leaf is sharded like its parameter."""
  entry = _method(report, name)["meshes"]["dp2_mp4"]
  pairs = _param_like_rows(entry)
  assert pairs, "no parameter-shaped state leaf found"
  for row, prow in pairs:
    assert row["spec"] == prow["spec"], (row["path"], row["spec"], prow["spec"])


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("name", STATISTICS_METHODS)
def test_curvature_statistics_are_averaged_over_the_data_axis(report, name, mesh):
  """The mesh's statistics equal the full-batch ones, not those of one data shard.

  The two halves of the batch have inputs of different scale, so a per-device estimate
  (what `optax.contrib.sophia` computes under pmap) differs from the global one.
  """
  stats = _method(report, name)["meshes"][mesh]["statistics"]
  scale = stats["full_max_abs"]
  assert scale > 0
  # The per-shard value is clearly different: the check below could fail.
  assert stats["full_vs_first_shard"] > 1e-2 * scale, stats
  assert stats["mesh_vs_full"] <= 1e-5 * scale, stats
  assert stats["mesh_vs_first_shard"] > 1e-2 * scale, stats


def _rows(entry, fragment):
  return [row for row in entry["state"] if fragment in row["path"]]


def test_shampoo_factor_stacks_follow_the_blocks(report):
  """Shampoo stacks the factors of same-shaped blocks; on the 2x4 mesh the blocks of the
  model-sharded dimensions live on different "model" devices, and so do their factors and
  roots (the stack axis is sharded). On the data-only mesh, like the parameters, they are
  replicated."""
  meshes = _method(report, "shampoo")["meshes"]
  stacks = _rows(meshes["dp2_mp4"], ".stats[") + _rows(meshes["dp2_mp4"], ".preconds[")
  assert stacks
  for row in stacks:
    assert row["spec"][0] == "model" and row["spec"][1:] == [None, None], row
    assert row["shard_shape"][0] * 4 == row["shape"][0], row
  for row in _rows(meshes["dp8"], ".stats[") + _rows(meshes["dp8"], ".preconds["):
    assert row["replicated"], row


def test_shampoo_roots_are_spread_over_the_model_axis(report):
  """The compiled per-device program decomposes a quarter of every stack on the 2x4 mesh."""
  entry = _method(report, "shampoo")
  single = sorted(entry["single_decomposition_shapes"])
  sharded = sorted(entry["meshes"]["dp2_mp4"]["decomposition_shapes"])
  assert single and len(single) == len(sharded)
  for full, part in zip(single, sharded):
    assert part == [full[0] // 4] + full[1:], (single, sharded)


def test_shampoo_stacked_layers_have_their_own_factors(report):
  """The [3, 8, 8] stack's three layers have two 8x8 factors each, in the stack of the
  output kernel's 8x8 factor ([7, 8, 8]); no factor spans the layer axis (side 3), and the
  roots of that stack are one batched call, as for an unrolled model."""
  entry = _method(report, "shampoo_stacked")
  for mesh in MESHES:
    shapes = sorted(row["shape"] for row in _rows(entry["meshes"][mesh], ".stats["))
    assert shapes == [[1, 4, 4], [7, 8, 8]], (mesh, shapes)
  assert sorted(entry["single_decomposition_shapes"]) == [[1, 4, 4], [7, 8, 8]]


# Twenty float32 steps of SOAP's state (factors, bases of order 1, rotated moments): the mesh
# agreed with one device to 4e-6 when this was written.
SOAP_STATE_RTOL = 5e-5


@pytest.mark.parametrize("mesh", MESHES)
def test_soap_state_matches_one_device(report, mesh):
  """SOAP's factors, eigenbases and rotated moments after 20 steps equal one device's.

  The worker trains SOAP with a squared-error head, not the softmax head the other methods
  use: a softmax head has a direction with an exactly zero gradient (one number added to
  every logit: a shift of each row of the output kernel, and of the output bias). SOAP
  rotates that zero into a rounding-sized component, which Adam divides by sqrt(v) + eps;
  the output kernel then drifts along the direction by an amount set by the order of the
  reductions, which differs between meshes, without changing the loss. With this setup's
  eps = 1e-4, the softmax head's output kernel ended 8.6e-5 (data-parallel) and 1.2e-4
  (2x4) from one device's, 1.5e-7 once each row's mean was removed: a comparison there
  measures rounding, not sharding.
  """
  entry = _method(report, "soap")["meshes"][mesh]
  scale = max(1.0, entry["state_max_abs"])
  assert entry["state_max_abs_diff"] <= SOAP_STATE_RTOL * scale, entry["state_max_abs_diff"]


def test_soap_stacks_follow_the_blocks(report):
  """SOAP's stack of 4x4 factors [48, 4, 4] (every block of both kernels), the stack of
  their eigenbases and the kernels' rotated moments ([16, 4, 4] and [8, 4, 4]) are split
  over "model" on the 2x4 mesh, a quarter of the blocks per device, like Shampoo's factor
  stacks; on the data-only mesh, like the parameters, they are replicated."""
  meshes = _method(report, "soap")["meshes"]
  stacks = [row for row in meshes["dp2_mp4"]["state"] if len(row["shape"]) == 3]
  paths = sorted(row["path"] for row in stacks)
  assert paths == ["[0].bases[0]", "[0].factors[0]", "[0].mu[1]", "[0].mu[3]",
                   "[0].nu[1]", "[0].nu[3]"], paths
  for row in stacks:
    assert row["spec"] == ["model", None, None], row
    assert row["shard_shape"][0] * 4 == row["shape"][0], row
  for row in meshes["dp8"]["state"]:
    assert row["replicated"], row


def test_soap_decompositions_are_spread_over_the_model_axis(report):
  """The compiled per-device program of the 2x4 mesh decomposes a quarter of the [48, 4, 4]
  stack: the first refresh's eigendecomposition and the later refreshes' QR."""
  entry = _method(report, "soap")
  assert entry["single_decomposition_shapes"] == [[48, 4, 4]]
  assert entry["meshes"]["dp2_mp4"]["decomposition_shapes"] == [[12, 4, 4]]
  single_qr = entry["single_qr_shapes"]
  sharded_qr = entry["meshes"]["dp2_mp4"]["qr_shapes"]
  assert single_qr and [48, 4, 4] in single_qr, single_qr
  assert sharded_qr and all(shape[0] == 12 for shape in sharded_qr), sharded_qr


# KL-Shampoo on the same squared-error classifier and blocks as SOAP: its factors, bases,
# eigenvalue estimates and momentum agreed with one device's to 1.4e-5 (largest entry 0.98)
# when this was written.
KL_SHAMPOO_STATE_RTOL = 5e-5


@pytest.mark.parametrize("mesh", MESHES)
def test_kl_shampoo_state_matches_one_device(report, mesh):
  """KL-Shampoo's factors, bases, eigenvalue estimates and momentum after 20 steps equal
  one device's (the squared-error head for the reason given for SOAP above)."""
  entry = _method(report, "kl_shampoo")["meshes"][mesh]
  scale = max(1.0, entry["state_max_abs"])
  assert entry["state_max_abs_diff"] <= KL_SHAMPOO_STATE_RTOL * scale, entry["state_max_abs_diff"]


def test_kl_shampoo_stacks_follow_the_blocks(report):
  """KL-Shampoo's stack of 4x4 factors [48, 4, 4], their bases and their eigenvalue
  estimates [48, 4] are split over "model" on the 2x4 mesh, a quarter of the blocks per
  device; its momentum is shaped like the params and sharded like them (checked with the
  other methods' parameter-shaped state); on the data-only mesh everything is replicated."""
  meshes = _method(report, "kl_shampoo")["meshes"]
  stacks = {row["path"]: row for row in meshes["dp2_mp4"]["state"] if row["shape"][:1] == [48]}
  assert sorted(stacks) == ["[0].bases[0]", "[0].eigenvalues[0]", "[0].factors[0]"], stacks
  for row in stacks.values():
    assert row["spec"][0] == "model" and not any(row["spec"][1:]), row
    assert row["shard_shape"][0] * 4 == row["shape"][0], row
  for row in meshes["dp8"]["state"]:
    assert row["replicated"], row


def test_kl_shampoo_decompositions_are_spread_over_the_model_axis(report):
  """The 2x4 mesh's per-device program decomposes a quarter of the [48, 4, 4] stack: the
  first eigendecomposition and the later refreshes' QR."""
  entry = _method(report, "kl_shampoo")
  assert entry["single_decomposition_shapes"] == [[48, 4, 4]]
  assert entry["meshes"]["dp2_mp4"]["decomposition_shapes"] == [[12, 4, 4]]
  assert [48, 4, 4] in entry["single_qr_shapes"], entry["single_qr_shapes"]
  sharded_qr = entry["meshes"]["dp2_mp4"]["qr_shapes"]
  assert sharded_qr and all(shape[0] == 12 for shape in sharded_qr), sharded_qr


def test_kfac_factor_of_a_sharded_dimension_is_sharded(report):
  """The hidden layer's kernel [8, 32] is sharded over "model" along its outputs: its output
  factor S [32, 32] and S's damped inverse stay sharded over "model" (along one of their
  two dimensions); the input factor A [9, 9] of the unsharded input dimension is
  replicated, like that dimension."""
  entry = _method(report, "kfac")["meshes"]["dp2_mp4"]
  rows = _by_path(entry["state"])
  for path in ("[0].s['hidden']", "[0].s_inverse['hidden']"):
    assert "model" in rows[path]["spec"] and not rows[path]["replicated"], rows[path]
    assert rows[path]["shard_nbytes"] * 4 == rows[path]["nbytes"], rows[path]
  for path in ("[0].a['hidden']", "[0].s['out']"):
    assert rows[path]["replicated"], rows[path]


@pytest.mark.xfail(strict=True, reason=(
    "K-FAC appends the bias as a row of ones to the layer input, so the output layer's "
    "input factor is A [33, 33]: the concatenation drops the 'model' sharding of the 32 "
    "hidden units and the factor is replicated on every device."))
def test_kfac_input_factor_of_a_sharded_dimension_is_sharded(report):
  entry = _method(report, "kfac")["meshes"]["dp2_mp4"]
  row = _by_path(entry["state"])["[0].a['out']"]
  assert not row["replicated"], row


def test_kfac_decompositions_are_spread_over_devices(report):
  """Without factor_sharding every device repeats each layer's factorization. With it
  (kfac_spread, pad_ratio 3) A_hidden [9, 9] and S_out [4, 4], padded to 9, form one stack
  [2, 9, 9] that is split over the 8 devices of either mesh: each device factorizes one.
  (The other stack, A_out and S_hidden of side 33, is decomposed one matrix at a time on
  CPU, secondorder.linalg.CPU_ONE_AT_A_TIME, so it shows as one [33, 33] call in a loop.)"""
  plain = _method(report, "kfac")
  assert sorted(plain["single_decomposition_shapes"]) == sorted(
      plain["meshes"]["dp8"]["decomposition_shapes"])
  entry = _method(report, "kfac_spread")
  single = sorted(entry["single_decomposition_shapes"])
  assert single == [[2, 9, 9], [33, 33]], single
  for mesh in MESHES:
    sharded = sorted(entry["meshes"][mesh]["decomposition_shapes"])
    assert sharded == [[1, 9, 9], [33, 33]], (mesh, sharded)
    assert sum(map(_size, sharded)) < sum(map(_size, single))


@pytest.mark.parametrize("mesh", MESHES)
def test_ekfac_state_matches_one_device(report, mesh):
  """EK-FAC's factors, eigenbases and projected moments after 20 steps equal one device's,
  within the parameters' tolerance."""
  entry = _method(report, "ekfac")["meshes"][mesh]
  scale = max(1.0, entry["state_max_abs"])
  assert entry["state_max_abs_diff"] <= PARAM_RTOL * scale, entry["state_max_abs_diff"]


def test_ekfac_factor_of_a_sharded_dimension_is_sharded(report):
  """As K-FAC's: the hidden layer's output factor S [32, 32] and its eigenbasis stay sharded
  over "model" on the 2x4 mesh, a quarter per device; the factors of unsharded dimensions
  are replicated."""
  rows = _by_path(_method(report, "ekfac")["meshes"]["dp2_mp4"]["state"])
  for path in ("[0].s['hidden']", "[0].s_eigvecs['hidden']"):
    assert "model" in rows[path]["spec"] and not rows[path]["replicated"], rows[path]
    assert rows[path]["shard_nbytes"] * 4 == rows[path]["nbytes"], rows[path]
  for path in ("[0].a['hidden']", "[0].s['out']"):
    assert rows[path]["replicated"], rows[path]


def _size(shape):
  n = 1
  for d in shape:
    n *= d
  return n


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("name", ["shampoo", "soap", "kl_shampoo"])
def test_donated_steps_on_a_mesh(report, name, mesh):
  """Steps jitted with the sharded params and the state donated run (no buffer is shared by
  two state fields) and give the parameters of the same steps without donation."""
  entry = _method(report, name)["meshes"][mesh]
  assert "donated_steps_max_abs_diff" in entry, "the worker did not run the donated steps"
  assert entry["donated_steps_max_abs_diff"] == 0.0, entry["donated_steps_max_abs_diff"]
