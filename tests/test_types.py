"""`secondorder/` type-checks with mypy, configured in pyproject.toml (`[tool.mypy]`, which
says why mypy): no error. The package ships `py.typed`, so a user's type checker reads these
annotations; this keeps them true."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_mypy_finds_no_error(tmp_path):
  # The cache goes to a temporary folder, not the checkout.
  proc = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path)],
                        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
  assert "Success: no issues found" in proc.stdout, proc.stdout


def test_the_package_is_marked_typed():
  assert (ROOT / "secondorder" / "py.typed").is_file()
