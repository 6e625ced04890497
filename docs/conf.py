"""Sphinx configuration of the secondorder documentation.

Build locally (from the repository root, after ``pip install -e ".[docs]"``)::

  python -m sphinx -W -b html docs docs/_build/html

The pages are MyST Markdown; notebooks (``docs/notebooks`` is a link to the repository's
``notebooks/``) are executed by myst-nb during the build and rendered with their outputs,
and the API reference is generated from the docstrings of every name in
``secondorder.__all__`` (``docs/_ext/public_api.py``).
"""

import os
import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

# Shampoo and K-FAC decompose matrices through OpenBLAS, whose thread pool thrashes on
# shared cores; the notebooks' kernels inherit this environment.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import secondorder  # noqa: E402  (after the environment above)

project = "secondorder"
copyright = "the secondorder authors"  # pylint: disable=redefined-builtin
author = "the secondorder authors"
release = secondorder.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "public_api",
]

exclude_patterns = ["_build", "**/.ipynb_checkpoints", "**/.jupyter_cache", "README.md",
                    "results/*/results.md"]  # a run's own tables, kept beside its record
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

# -- MyST ---------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# -- myst-nb: notebooks run once per build, and a failing cell fails the build --------------
nb_execution_mode = "cache"
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

# -- autodoc / napoleon (Google-style docstrings) ------------------------------------------
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_default_options = {"undoc-members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- Math: MathJax served with the site, never from a CDN ---------------------------------
# Sphinx loads MathJax 3 from jsDelivr by default, so a page opened offline shows raw LaTeX.
# The django-static-mathjax package (a docs/test requirement, no Django needed) holds
# MathJax 3.2.2's distribution; the parts the pages use are copied into `_static/mathjax`
# after the build: the TeX/MathML-to-HTML component, its TeX extensions (loaded on demand),
# its CommonHTML output with the woff fonts, the menu and the accessibility code the menu loads.
# The speech rule engine (`sre`) is left out. Every page is then checked for a script or a
# stylesheet that loads from another host (`_check_no_remote_assets`).
MATHJAX_COMPONENT = "tex-mml-chtml.js"
MATHJAX_PARTS = (MATHJAX_COMPONENT, "input", "output/chtml", "ui", "a11y", "adaptors")
mathjax_path = f"mathjax/{MATHJAX_COMPONENT}"   # relative: under the site's _static/


def _mathjax_distribution() -> pathlib.Path:
  import mathjax  # the django-static-mathjax distribution
  return pathlib.Path(mathjax.__file__).resolve().parent / "static" / "mathjax" / "es5"


def _copy_mathjax(app, exception) -> None:
  if exception is not None or app.builder.format != "html":
    return
  import shutil
  source, target = _mathjax_distribution(), pathlib.Path(app.outdir) / "_static" / "mathjax"
  for part in MATHJAX_PARTS:
    (target / part).parent.mkdir(parents=True, exist_ok=True)
    if (source / part).is_dir():
      shutil.copytree(source / part, target / part, dirs_exist_ok=True)
    else:
      shutil.copy2(source / part, target / part)


# A <script src=...> or a <link href=...> (stylesheet, font, preload) on another host.
_REMOTE_ASSET = re.compile(
    r"<(?:script|link)\b[^>]*\s(?:src|href)=[\"'](?:https?:)?//[^\"']*[\"']", re.IGNORECASE)


def _check_no_remote_assets(app, exception) -> None:
  if exception is not None or app.builder.format != "html":
    return
  remote = []
  for page in sorted(pathlib.Path(app.outdir).rglob("*.html")):
    for tag in _REMOTE_ASSET.findall(page.read_text(encoding="utf-8")):
      remote.append(f"{page.relative_to(app.outdir)}: {tag}")
  if remote:
    raise RuntimeError("pages load assets from another host (the site must work offline):\n"
                       + "\n".join(remote[:20]))


def setup(app):
  app.connect("build-finished", _copy_mathjax)
  app.connect("build-finished", _check_no_remote_assets)


# -- HTML ---------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "secondorder"
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
}

# -- Result figures: drawn at build time from the committed run records ---------------------
# A benchmark run's record (`runs.jsonl`: every run's curves and timings) is kept beside the
# page that quotes it; its figures are drawn from it here, the way the harness draws them, so
# no generated image is kept in the repository.
# Every folder under docs/results with a `runs.jsonl` gets its figures; every record kept
# there ran the language model at its cpu size.
RECORD_LM_SIZE = "cpu"


def _draw_result_figures() -> None:
  sys.path.insert(0, str(DOCS.parent))
  import matplotlib
  matplotlib.use("Agg")
  from benchmarks import report
  from benchmarks.problems import get_problem
  for record in sorted((DOCS / "results").glob("*/runs.jsonl")):
    out = record.parent
    rows, _ = report.read_jsonl(record)
    names = dict.fromkeys(r.problem for r in rows)
    problems = {n: get_problem(n, RECORD_LM_SIZE if n == "lm" else "quick") for n in names}
    for n in names:
      report.plot_problem(str(out / f"{n}.png"), problems[n], [r for r in rows if r.problem == n])
    report.plot_speedups(str(out / "speedups.png"), rows, problems)
  # The size ladder's and the GPU race's records (benchmarks/ladder.py) draw their own.
  from benchmarks import ladder
  ladder.draw_figures(str(DOCS / "results" / "ladder"))
  ladder.draw_figures(str(DOCS / "results" / "gpu"), "gpu.jsonl", trends=False)


_draw_result_figures()
