"""Shared test setup.

The repository root goes on sys.path so that test modules can import the shared contract
(`from tests import contract`) however pytest is started (`pytest` from the root, as in CI,
or `python -m pytest tests/...`). Simulated multi-device meshes are set up in subprocesses
by the tests that need them, never here: the device count must not change for the whole
session (the compile level below is set once, before JAX is imported).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import tempfile

import pytest

# jaxlib's CPU eigh/Cholesky call OpenBLAS, whose own threads thrash on a few shared cores and
# have hung batched eigendecompositions (jaxlib 0.10.2); one BLAS thread per call avoids both.
# It must be set before JAX (and so OpenBLAS) is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# XLA compiling dominates this suite's time (about 30 of every 55 seconds of a contract
# case, XLA's own backend compile). Two CPU compiler settings cut it: LLVM optimisation
# level 0 instead of the default 3, and XLA's older loop-fusion code emitters instead of the
# MLIR-based ones. The suite took 556 s with both against 1188-1320 s at level 2 alone
# (2 workers, this 2-core machine); the contract checks of one case 25 s instead of 49 s.
# The tests check the algorithms, not XLA's code generation: a result may round
# differently, so a comparison between two differently compiled programs must hold to a
# tolerance that the problem's conditioning supports (every test does). Subprocesses
# (notebooks, the docs build, the simulated meshes) inherit the flags. An XLA_FLAGS that
# already sets a level is left alone, so `XLA_FLAGS=--xla_backend_optimization_level=3
# pytest` runs with XLA's defaults. The emitter flag is XLA's own and may be dropped by a
# later jaxlib, which would reject it at start-up: it is set only for the jaxlib versions it
# was checked on.
_FAST_COMPILE_JAXLIB = ("0.10.",)


def _fast_compile_flags() -> str:
  flags = " --xla_backend_optimization_level=0"
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return flags
  if version.startswith(_FAST_COMPILE_JAXLIB):
    flags += " --xla_cpu_use_fusion_emitters=false"
  return flags


if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + _fast_compile_flags()).strip()

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# JAX's persistent compilation cache, in a directory made for this test run by the first
# process that loads this file (the xdist controller, or the only process without xdist) and
# shared with the workers, notebook kernels and subprocesses through the environment. Many
# tests compile the same XLA program again (each check of the shared contract jits its own
# update function; notebooks and subprocesses start fresh processes); with the cache each
# distinct program compiles once per run: the contract tests took 184 s instead of 280 s on
# two cores, the whole suite 724-768 s instead of 882 s. The cache keys on the program, the
# compile options and the backend, so a hit runs the executable a compile would have
# produced. The directory starts empty (nothing carries over between runs) and the process
# that made it removes it at the end. A JAX_COMPILATION_CACHE_DIR already set is used as is.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="secondorder-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_xdist_auto_num_workers(config):
  """`-n auto`: one worker per usable core, at most 4. Each worker holds its own JAX and
  compiled functions, so a machine that shows many cores with little memory behind them is
  not overrun."""
  del config
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    cores = os.cpu_count() or 1
  return max(1, min(cores, 4))


# Scheduling on pytest-xdist workers (`--dist loadgroup`, pyproject.toml). Each test is its own
# unit of work, handed to whichever worker is free, in collection order, except:
#
# * Tests that share one expensive module fixture run on one worker, as one group: the
#   sharding tests all read the report of one subprocess (a minute or more of training on a
#   simulated 8-device mesh); spread over two workers, the second sat idle, waiting for the
#   first to write it. The contract checks of one case run on one worker, which then
#   traces that case's shared update function and masked reference once (tests/contract.py
#   caches them per process): 5% less CPU for the checks of six cases (296 s -> 281 s).
# * The longest single tests start first, so that neither worker is left at the end running
#   one of them alone while the other has nothing to do.
_GROUPS = {
    "tests/test_sharding.py::": "sharding_report",
}
_START_FIRST = (
    "tests/test_docs.py::test_docs_build",                 # Sphinx, runs the notebooks
    "tests/test_docs.py::test_code_blocks_run",            # every page's code, one process
    "tests/test_kfac_models.py::test_nnx_scanned_layers",  # scanned vs unrolled K-FAC
    "tests/test_kfac_models.py::test_linen_scanned_layers",
    "tests/test_real_models.py::test_methods_train_a_cnn",  # BatchNorm/Dropout, 5 methods
)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the items
def pytest_collection_modifyitems(config, items):
  """Marks the groups (`_GROUPS`, and one per contract case) and moves the tests of
  `_START_FIRST` to the front (in that order; the rest keep theirs). Every worker collects
  the same order, as xdist needs. xdist hands out the largest groups first."""
  del config
  for item in items:
    for prefix, group in _GROUPS.items():
      if item.nodeid.startswith(prefix):
        item.add_marker(pytest.mark.xdist_group(group))
    if item.nodeid.startswith("tests/test_contract.py::test_contract["):
      item.add_marker(pytest.mark.xdist_group("contract_" + item.callspec.params["case"].name))

  def rank(item):
    for i, prefix in enumerate(_START_FIRST):
      if item.nodeid.startswith(prefix):
        return i
    return len(_START_FIRST)

  items[:] = sorted(items, key=rank)   # stable: the others keep pytest's order


def pytest_unconfigure(config):
  """The process that made this run's cache directory removes it at the end (the workers
  inherited it)."""
  del config
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
