"""The package as a user gets it: built, installed from the wheel, run from elsewhere.

* `test_lower_bounds_are_the_tested_minimums`: the lower bounds of `pyproject.toml` are
  exactly the versions `.ci/minimum-versions.txt` pins (what the second job of `.ci/run`
  installs and tests), so a bound cannot move without the tested minimum moving with it.
* `test_wheel_and_sdist_contents`: `python -m build` makes the sdist and, from it, the
  wheel; the wheel holds the library only (every module of `secondorder/`, no tests,
  benchmarks or docs) plus `py.typed` and the licence, and its metadata carries the version
  of `secondorder/_version.py`; the sdist holds the licence and `py.typed` too.
* `test_installed_wheel_runs_the_quickstart_and_every_family`: the wheel is installed (not
  editable) into a fresh virtual environment that gets its dependencies from the package
  index, and that environment's Python runs the README's quickstart and one method of each
  family (`tests/_installed_smoke.py`) in a folder outside the checkout.

Building and installing take a minute or two, most of it pip installing jax, flax and
their dependencies (from pip's cache once they have been downloaded).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests import test_docs

ROOT = pathlib.Path(__file__).resolve().parents[1]
MINIMUMS = ROOT / ".ci" / "minimum-versions.txt"


def _version() -> str:
  text = (ROOT / "secondorder" / "_version.py").read_text(encoding="utf-8")
  return re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE).group(1)


def test_lower_bounds_are_the_tested_minimums():
  tomllib = pytest.importorskip("tomllib")
  project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
  bounds = {}
  for line in project["dependencies"]:
    req = Requirement(line)
    lower = [s.version for s in req.specifier if s.operator == ">="]
    assert len(lower) == 1, f"{line}: a dependency needs one lower bound (>=)"
    bounds[req.name] = Version(lower[0])
  pinned = {}
  for line in MINIMUMS.read_text(encoding="utf-8").splitlines():
    if line.strip() and not line.startswith("#"):
      req = Requirement(line)
      (spec,) = req.specifier
      assert spec.operator == "==", f"{MINIMUMS.name}: {line} is not an exact pin"
      pinned[req.name] = Version(spec.version)
  assert pinned == bounds


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> pathlib.Path:
  """The sdist and the wheel built from it, as a release would build them."""
  out = tmp_path_factory.mktemp("dist")
  proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return out


def test_wheel_and_sdist_contents(dist):
  version = _version()
  (wheel,) = dist.glob("secondorder-*.whl")
  (sdist,) = dist.glob("secondorder-*.tar.gz")
  assert wheel.name.startswith(f"secondorder-{version}-")
  info = f"secondorder-{version}.dist-info"
  names = set(zipfile.ZipFile(wheel).namelist())
  outside = sorted(n for n in names if not n.startswith(("secondorder/", info + "/")))
  assert not outside, f"the wheel holds more than the library: {outside}"
  tracked = subprocess.run(["git", "ls-files", "secondorder"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
  missing = [n for n in tracked if n.endswith(".py") and n not in names]
  assert not missing, f"modules missing from the wheel: {missing}"
  assert "secondorder/py.typed" in names
  licence = f"{info}/licenses/LICENSE"
  assert licence in names
  with zipfile.ZipFile(wheel) as z:
    assert z.read(licence) == (ROOT / "LICENSE").read_bytes()
    metadata = z.read(f"{info}/METADATA").decode()
  assert f"\nVersion: {version}\n" in metadata
  assert "\nLicense-Expression: Apache-2.0\n" in metadata

  with tarfile.open(sdist) as t:
    members = set(t.getnames())
  top = f"secondorder-{version}"
  for path in ("LICENSE", "PKG-INFO", "pyproject.toml", "secondorder/py.typed",
               "secondorder/_version.py"):
    assert f"{top}/{path}" in members, path


def _fresh_env() -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env.update(OPENBLAS_NUM_THREADS="1", MPLBACKEND="Agg", PIP_DISABLE_PIP_VERSION_CHECK="1")
  return env


def test_installed_wheel_runs_the_quickstart_and_every_family(dist, tmp_path):
  (wheel,) = dist.glob("secondorder-*.whl")
  env = _fresh_env()
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  python = str(venv / "bin" / "python")
  proc = subprocess.run([python, "-m", "pip", "install", "-q", str(wheel)], env=env,
                        capture_output=True, text=True, timeout=1200, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  readme = "".join(code for _, code in test_docs.python_blocks(
      (ROOT / "README.md").read_text(encoding="utf-8")))
  (elsewhere / "quickstart.py").write_text(readme + (
      "\nimport json, secondorder\n"
      "print(json.dumps({'loss': float(loss), 'variance': float(jnp.var(y)),"
      " 'file': secondorder.__file__}))\n"))
  proc = subprocess.run([python, "quickstart.py"], cwd=elsewhere, env=env,
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert pathlib.Path(result["file"]).is_relative_to(venv), result["file"]
  # The README's claim: it trains (the check of tests/test_docs.py, on the installed copy).
  assert result["loss"] < 0.2 * result["variance"], result

  (elsewhere / "smoke.py").write_bytes((ROOT / "tests" / "_installed_smoke.py").read_bytes())
  proc = subprocess.run([python, "smoke.py"], cwd=elsewhere, env=env,
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for family in ("curvature toolkit", "adahessian", "sophia", "shampoo", "soap", "kfac",
                 "hessian_free", "natural_gradient", "accumulated_adamw"):
    assert f"\n{family}" in "\n" + proc.stdout, proc.stdout
  assert str(venv) in proc.stderr, proc.stderr
