"""The notebooks are committed without outputs; they are executed by the docs build.

`tests/test_docs.py::test_docs_build` runs every notebook once, inside the Sphinx build
(myst-nb, a failing cell fails the build), and renders it with its outputs; running them
again here would double the time they take.
"""

from __future__ import annotations

import pathlib
import re

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
  names = {p.name for p in NOTEBOOKS}
  assert {"01_curvature.ipynb", "02_optimizers_in_flax.ipynb",
          "03_accumulation.ipynb"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.get("outputs"), f"{path.name}: code cell {i} carries outputs"
      assert cell.get("execution_count") is None, f"{path.name}: cell {i} has a count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_imports_only_the_installed_package(path):
  nb = nbformat.read(path, as_version=4)
  code = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
  assert "sys.path" not in code and "PYTHONPATH" not in code, path.name
  # The benchmark harness runs from a checkout and is not installed: a notebook importing it
  # works only where the checkout happens to be on the path (and failed the docs build on a
  # clean machine).
  assert not re.search(r"^\s*(from|import)\s+(benchmarks|tests)\b", code, re.M), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_in_the_docs(path):
  assert (ROOT / "docs" / "notebooks" / path.name).resolve() == path.resolve()
