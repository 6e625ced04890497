"""The package's version, defined here only: `pyproject.toml` reads it (`dynamic = ["version"]`)
and `secondorder.__version__` re-exports it. Versioning follows CHANGELOG.md."""

__version__ = "0.1.0"
