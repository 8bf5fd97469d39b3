"""The version of adabudget, in one place (pyproject.toml reads it; a leaf: it imports nothing)."""

__version__ = "0.1.0"
