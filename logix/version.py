"""The package version, in one place (pyproject.toml reads it; logs record it)."""

__version__ = "0.1.0"
