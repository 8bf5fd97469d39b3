"""The optional features and the extra that installs each (pyproject's optional-dependencies).

A feature imports its extra's module through ``require`` where it first needs it, so that a missing
package is a message naming the command, not a bare ``ModuleNotFoundError`` deep in a call:

    >>> require("wandb", "wandb", "logger.wandb=true (the W&B mirror)")   # doctest: +SKIP
    MissingExtra: logger.wandb=true (the W&B mirror) needs wandb, which is not installed:
    pip install "adabudget[wandb]"

``adabudget.analysis`` imports nothing from ``adabudget`` (tests/test_layout.py), so it keeps a
copy of these few lines (``adabudget.analysis.extras``); tests/test_package.py checks both agree.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from adabudget.config import ConfigError

# extra -> what it serves; the same names as pyproject.toml's [project.optional-dependencies]
EXTRAS = {
    "wandb": "the W&B mirror of a run (logger.wandb=true)",
    "dashboard": "adabudget dashboard: plotly figures, --png through kaleido",
    "peft": "the peft adapter of a run (adabudget.load, PeftModel) and method=peft_*",
    "postgres": "search.storage=postgresql://... (psycopg2)",
    "scale": "Hydra launchers, Slurm jobs and the gRPC storage proxy",
    "qlora": "model.quantize=nf4 (torchao)",
    "smollm2": "model=smollm2, the packaged SmolLM2 GGUF (gguf, accelerate)",
}


class MissingExtra(ConfigError, ImportError):
    """An optional feature asked for without its extra installed; the message names the command.
    A ``ConfigError`` (the CLI prints it as one and exits 2) and an ``ImportError``."""


def missing_message(module: str, extra: str, feature: str) -> str:
    return f'{feature} needs {module}, which is not installed: pip install "adabudget[{extra}]"'


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``module`` imported, or ``MissingExtra`` naming ``pip install "adabudget[<extra>]"``.

    Args:
        module: the import name (``"plotly.graph_objects"``, ``"wandb"``).
        extra: the extra that installs it, one of ``EXTRAS``.
        feature: what the user asked for, as they would recognise it (a command or a config field).
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as err:  # absent, or present without its own dependencies: the extra fixes both
        raise MissingExtra(missing_message(module, extra, feature)) from err
