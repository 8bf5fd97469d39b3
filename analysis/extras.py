"""The dashboard's optional packages: ``require`` imports one, or raises ``MissingExtra`` naming
``pip install "adabudget[<extra>]"``.

A copy of ``adabudget.extras`` (budget/extras.py), because ``adabudget.analysis`` imports nothing
from ``adabudget`` (tests/test_layout.py); tests/test_package.py checks that both say the same.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional feature asked for without its extra installed; the message names the command."""


def missing_message(module: str, extra: str, feature: str) -> str:
    return f'{feature} needs {module}, which is not installed: pip install "adabudget[{extra}]"'


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``module`` imported, or ``MissingExtra`` naming ``pip install "adabudget[<extra>]"``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:  # absent, or present without its own dependencies: the extra fixes both
        raise MissingExtra(missing_message(module, extra, feature)) from err
