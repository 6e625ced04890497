"""The documentation: the site builds with warnings as errors, and every code block runs.

* `test_docs_build` builds the Sphinx site (`docs/`) with `-W`: a broken reference, a public
  function or class without a docstring, or a notebook cell that raises fails it. The
  notebooks run here, once, inside the build (myst-nb); `tests/test_notebooks.py` only checks
  that they are committed without outputs. The build's API reference must list every name in
  `secondorder.__all__`.
* `test_code_blocks_run` executes every Python block of README.md and of every Markdown page
  under `docs/` (`docs/index.md`, "Code blocks", states the rule): the blocks of one page run
  in order in one namespace, as one program; all pages run in one fresh Python process with
  eight simulated CPU devices, so the sharding guide runs as written. A page whose code must
  also achieve something has a check of the namespace its blocks leave (`PAGE_CHECKS`): the
  README's quickstart must train its model, so it runs once, here.

Run as a script (`python tests/test_docs.py REPORT.json PAGE.md ...`) it executes the pages'
blocks and writes their failures to REPORT.json, which is what `test_code_blocks_run` does in
a subprocess.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import traceback
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Fences whose info string is one of these run; any other language (``text``, ``bash``,
# ``pycon``) is shown, never run.
_PYTHON = {"python", "py", "python3"}
_DIRECTIVES = {"{code-block}", "{code}", "{code-cell}", "{sourcecode}"}
_NO_RUN = "skip-execution"   # `:class: skip-execution` or `:tags: [skip-execution]`


def markdown_pages() -> list[pathlib.Path]:
  """README.md and every Markdown page of the docs, outside build outputs."""
  pages = [ROOT / "README.md"]
  for path in sorted(DOCS.rglob("*.md")):
    if not {"_build", ".jupyter_cache"} & set(path.relative_to(DOCS).parts):
      pages.append(path)
  return pages


def python_blocks(text: str) -> list[tuple[int, str]]:
  """The runnable Python blocks of a Markdown page, as (first line number, code).

  A fence runs when its language is Python: plain (```` ```python ````) or through a MyST
  directive (```` ```{code-block} python ````). A directive's options are read, not run,
  and a block whose options mention ``skip-execution`` is left out.
  """
  from markdown_it import MarkdownIt  # pylint: disable=import-outside-toplevel

  blocks = []
  for token in MarkdownIt("commonmark").parse(text):
    if token.type != "fence":
      continue
    info = token.info.split()
    if not info:
      continue
    if info[0] in _DIRECTIVES:
      info = info[1:]
    elif info[0].startswith("{"):
      continue   # another directive (math, toctree, ...)
    if not info or info[0] not in _PYTHON:
      continue
    code = token.content.splitlines()
    options = []
    while code and (code[0].startswith(":") or code[0].strip() == "---"):
      options.append(code.pop(0))
    if any(_NO_RUN in o for o in options):
      continue
    blocks.append((token.map[0] + 1 + len(options) + 1, "\n".join(code) + "\n"))
  return blocks


def _quickstart_trains(namespace: dict) -> None:
  """The README's quickstart trains its model: the final loss is under a fifth of the loss of
  the best constant predictor (the variance of the targets)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  assert "optimizer" in namespace and "y" in namespace and "loss" in namespace, (
      "the README has no NNX quickstart (an `optimizer` trained on targets `y`)")
  y = namespace["y"]
  final = float(namespace["loss"])
  baseline = float(jnp.mean((y - y.mean()) ** 2))
  assert final < 0.2 * baseline, f"final loss {final} vs the constant predictor's {baseline}"


# Page (relative to the repository root) -> a check of the namespace its blocks leave.
PAGE_CHECKS = {"README.md": _quickstart_trains}


def run_pages(paths: list[str], checks=None) -> dict[str, str]:
  """Runs each page's blocks in order in a fresh namespace, then the page's check if it has
  one (`checks`, by default `PAGE_CHECKS`); page -> traceback of a failure."""
  checks = PAGE_CHECKS if checks is None else checks
  failures = {}
  for path in paths:
    page = pathlib.Path(path)
    name = str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)
    module = types.ModuleType("__main__")
    for line, code in python_blocks(page.read_text(encoding="utf-8")):
      # The line offset makes a traceback point at the page's own line numbers.
      padded = "\n" * (line - 1) + code
      try:
        exec(compile(padded, str(page.resolve()), "exec"), module.__dict__)  # pylint: disable=exec-used
      except BaseException:  # pylint: disable=broad-except
        failures[name] = f"block at line {line}:\n" + traceback.format_exc(limit=-6)
        break
    else:
      if name in checks:
        try:
          checks[name](module.__dict__)
        except BaseException:  # pylint: disable=broad-except
          failures[name] = "the page's check:\n" + traceback.format_exc(limit=-3)
  return failures


def test_block_extraction():
  text = "\n".join([
      "```python", "a = 1", "```",
      "```bash", "pip install x", "```",
      "```{code-block} python", ":caption: shown", "b = 2", "```",
      "```{code-block} python", ":class: skip-execution", "raise SystemExit", "```",
      "```{math}", "x^2", "```",
      "```text", "c = 3", "```",
  ])
  assert python_blocks(text) == [(2, "a = 1\n"), (9, "b = 2\n")]


def test_a_failing_block_is_reported(tmp_path):
  page = tmp_path / "page.md"
  page.write_text("text\n\n```python\nx = 1\n```\n\n```python\nassert x == 2, 'x is ' + str(x)\n```\n")
  failures = run_pages([str(page)])
  assert list(failures) == [str(page)]
  assert "block at line 8" in failures[str(page)] and "x is 1" in failures[str(page)]


def test_a_failing_page_check_is_reported(tmp_path):
  page = tmp_path / "page.md"
  page.write_text("```python\nx = 1\n```\n")

  def x_is_two(namespace):
    assert namespace["x"] == 2, "x is " + str(namespace["x"])

  assert not run_pages([str(page)], checks={str(page): lambda namespace: None})
  failures = run_pages([str(page)], checks={str(page): x_is_two})
  assert "the page's check" in failures[str(page)] and "x is 1" in failures[str(page)]


def test_code_blocks_run(tmp_path):
  pages = markdown_pages()
  assert sum(len(python_blocks(p.read_text(encoding="utf-8"))) for p in pages) > 10
  env = dict(os.environ, MPLBACKEND="Agg", OPENBLAS_NUM_THREADS="1")
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + " --xla_force_host_platform_device_count=8").strip()
  # The pages run where they may write files (checkpoints), not in the checkout.
  report = tmp_path / "failures.json"
  proc = subprocess.run([sys.executable, __file__, str(report), *map(str, pages)],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  failures = json.loads(report.read_text())
  assert not failures, "\n\n".join(f"{page}: {tb}" for page, tb in failures.items())


def test_all_lists_every_public_name():
  import secondorder  # pylint: disable=import-outside-toplevel

  public = {name for name, value in vars(secondorder).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType)}
  assert public == set(secondorder.__all__)


def test_every_figure_is_committed_or_drawn():
  """An image a page shows is in the repository or drawn at build time from a committed run
  record (`docs/conf.py` draws `<problem>.png` and `speedups.png` beside every
  `docs/results/*/runs.jsonl`): a figure left over from a local run would let the build pass
  here and fail on a clean checkout."""
  import re  # pylint: disable=import-outside-toplevel

  tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.splitlines())
  missing = []
  for page in markdown_pages():
    for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
      if "://" in target:
        continue
      image = (page.parent / target).resolve()
      if not image.is_relative_to(ROOT):
        missing.append(f"{page.relative_to(ROOT)}: {target}")
        continue
      relative = image.relative_to(ROOT)
      records = [(relative.parent / n).as_posix() for n in ("runs.jsonl", "ladder.jsonl",
                                                             "gpu.jsonl")]
      drawn = relative.suffix == ".png" and any(r in tracked for r in records)
      if relative.as_posix() not in tracked and not drawn:
        missing.append(f"{page.relative_to(ROOT)}: {target}")
  assert not missing, f"figures neither committed nor drawn from a committed record: {missing}"


def test_docs_build(tmp_path):
  from sphinx.util.inventory import InventoryFile  # pylint: disable=import-outside-toplevel
  import secondorder  # pylint: disable=import-outside-toplevel

  out = tmp_path / "html"
  env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
       "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

  with open(out / "objects.inv", "rb") as f:
    inventory = InventoryFile.load(f, "", os.path.join)
  documented = {name for domain in inventory.values() for name in domain}
  missing = [n for n in secondorder.__all__ if f"secondorder.{n}" not in documented]
  assert not missing, f"not in the API reference: {missing}"
  for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    html = (out / "notebooks" / f"{notebook.stem}.html").read_text(encoding="utf-8")
    assert "cell_output" in html, f"{notebook.name}: rendered without outputs"
    if "plt." in notebook.read_text(encoding="utf-8") or "plot_" in notebook.read_text(
        encoding="utf-8"):
      assert "<img" in html, f"{notebook.name}: its figures are not in the page"


if __name__ == "__main__":
  pathlib.Path(sys.argv[1]).write_text(json.dumps(run_pages(sys.argv[2:])))
