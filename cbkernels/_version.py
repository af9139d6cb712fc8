"""The package version, defined here only (pyproject.toml reads it; ``cbkernels.__version__`` re-exports it)."""

__version__ = "0.2.0"
