"""A ``public-api`` directive: the API reference of a module, generated from its ``__all__``.

In a reStructuredText page (the directive emits reStructuredText, which autodoc needs),
``.. public-api:: secondorder`` documents every name in ``secondorder.__all__``, grouped by
the module that defines it, with an autosummary table and the full docstring of each; a
name added to ``__all__`` appears in the reference without editing any page. A public
function or class without a docstring is a build warning (an error under ``sphinx-build -W``).

Option ``:skip-toplevel:`` leaves out names that ``secondorder`` itself exports, so a
submodule's page documents only what is reachable through that submodule alone.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

logger = logging.getLogger(__name__)

# Section titles, matched against the defining module by the longest dotted prefix; the
# order is the page's order. A module no prefix matches gets its dotted name as the title,
# after these.
SECTIONS = {
    "secondorder.transforms.hutchinson": "AdaHessian (Hutchinson diagonal)",
    "secondorder.transforms.sophia": "Sophia",
    "secondorder.transforms.shampoo": "Shampoo",
    "secondorder.transforms.soap": "SOAP",
    "secondorder.transforms.kfac": "K-FAC",
    "secondorder.capture": "Layer statistics for K-FAC",
    "secondorder.transforms.hessian_free": "Hessian-free and natural gradient",
    "secondorder.transforms.accumulate": "Gradient accumulation in the moments",
    "secondorder.closures": "Model closures",
    "secondorder.curvature.products": "Curvature products",
    "secondorder.curvature.estimators": "Diagonal estimators",
    "secondorder.curvature.losses": "Output-space losses",
    "secondorder.curvature.spectrum": "Spectrum",
    "secondorder.curvature.cg": "Conjugate gradient",
    "secondorder.linalg": "Matrix functions",
    "secondorder.dimension_numbers": "Dimension numbers",
}


def section_title(module_name: str) -> str:
  """The title of the section for names defined in ``module_name``."""
  parts = module_name.split(".")
  for i in range(len(parts), 0, -1):
    if ".".join(parts[:i]) in SECTIONS:
      return SECTIONS[".".join(parts[:i])]
  return module_name


def public_names(module: types.ModuleType) -> list[str]:
  """The names a module declares public: its ``__all__``, which it must have."""
  names = getattr(module, "__all__", None)
  if names is None:
    raise ValueError(f"{module.__name__} has no __all__: the API reference documents "
                     "exactly the names a module lists there")
  return list(names)


def _kind(obj) -> str:
  """The autodoc directive for an object: class, function or data."""
  if inspect.isclass(obj):
    return "autoclass"
  if inspect.isroutine(obj):
    return "autofunction"
  return "autodata"


def _has_docstring(name: str, obj, module: types.ModuleType) -> bool:
  """Whether a public object carries its own documentation."""
  if _kind(obj) == "autodata":
    # Data (constants, type aliases) shows its value; a ``#:`` comment or a string literal
    # after the assignment adds a description, which is welcome but not required.
    del name, module
    return True
  doc = inspect.getdoc(obj) or ""
  if inspect.isclass(obj) and hasattr(obj, "_fields"):
    # A NamedTuple without a docstring gets "Name(field, ...)" from Python.
    auto = f"{obj.__name__}({', '.join(obj._fields)})"
    return bool(doc) and doc != auto
  return bool(doc)


def _defining_module(name: str, obj, package: str) -> str:
  """The module of ``package`` that defines (or, for a re-exported object, holds) ``obj``."""
  module = getattr(obj, "__module__", None) if _kind(obj) != "autodata" else None
  if module and (module == package or module.startswith(package + ".")):
    return module
  for modname, mod in sorted(sys.modules.items()):
    if (modname.startswith(package + ".") and mod is not None
        and getattr(mod, name, None) is obj):
      return modname
  return package


class PublicApi(SphinxDirective):
  """Documents the ``__all__`` of the module named in the argument."""

  required_arguments = 1
  option_spec = {"skip-toplevel": directives.flag}

  def run(self) -> list[nodes.Node]:
    modname = self.arguments[0]
    module = importlib.import_module(modname)
    toplevel = importlib.import_module(modname.split(".")[0])
    toplevel_objects = {id(getattr(toplevel, n)) for n in public_names(toplevel)}
    package = modname.split(".")[0]
    groups: dict[str, list[tuple[str, object]]] = {}
    for name in public_names(module):
      obj = getattr(module, name)
      if isinstance(obj, types.ModuleType):
        continue
      if "skip-toplevel" in self.options and id(obj) in toplevel_objects:
        continue
      if not _has_docstring(name, obj, module):
        logger.warning("public name %s.%s has no docstring", modname, name,
                       location=self.get_location())
      title = section_title(_defining_module(name, obj, package))
      groups.setdefault(title, []).append((name, obj))

    titles = list(dict.fromkeys(SECTIONS.values()))
    order = titles + sorted(set(groups) - set(titles))
    lines = []
    for title in order:
      if title not in groups:
        continue
      if "skip-toplevel" not in self.options:
        lines += [title, "-" * len(title), ""]
      lines += [".. autosummary::", ""]
      lines += [f"   {modname}.{name}" for name, _ in groups[title]]
      lines.append("")
      for name, obj in groups[title]:
        lines += [f".. {_kind(obj)}:: {modname}.{name}", ""]
    content = StringList(lines, source=f"<public-api {modname}>")
    node = nodes.section() if "skip-toplevel" not in self.options else nodes.container()
    node.document = self.state.document
    nested_parse_with_titles(self.state, content, node)
    return node.children


def setup(app):
  """Registers the directive; autosummary renders its tables."""
  app.setup_extension("sphinx.ext.autodoc")
  app.setup_extension("sphinx.ext.autosummary")
  app.add_directive("public-api", PublicApi)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
