"""Learning rate and warm-up: composes with any method space (``[s4, lr]``)."""

from __future__ import annotations

from adabudget.search.spaces.context import (
    SpaceContext,
)


def lr_space(trial, ctx: SpaceContext) -> dict:
    """Learning rate log-uniform in [1e-4, 3e-3] and warm-up ratio in [0, 0.2]."""
    return {
        "train": {
            "lr": trial.suggest_float("train.lr", 1e-4, 3e-3, log=True),
            "warmup_ratio": trial.suggest_float("train.warmup_ratio", 0.0, 0.2),
        }
    }
