"""The package version, in one place: pyproject.toml reads it (tool.setuptools.dynamic),
`freeanchor.__version__` and `freeanchor --version` print it."""

__version__ = "0.1.0"
