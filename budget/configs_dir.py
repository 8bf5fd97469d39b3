"""Where the Hydra configs are, found without importing Hydra or torch (``adabudget.compose`` and
the torch-free help and completion of ``adabudget.completion`` both ask)."""

from __future__ import annotations

import os
from pathlib import Path


def config_dir() -> str:
    """The ``configs/`` folder: $ADABUDGET_CONFIGS, the source checkout, or the installed copy."""
    if os.environ.get("ADABUDGET_CONFIGS"):
        return os.environ["ADABUDGET_CONFIGS"]
    checkout = Path(__file__).resolve().parents[1] / "configs"
    if (checkout / "train.yaml").exists():
        return str(checkout)
    import adabudget_configs

    return str(Path(adabudget_configs.__file__).parent)
