"""Full fine-tuning: every backbone parameter trains (the upper-bound baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class FullConfig:
    name: str = "full"

    def validate(self) -> None:
        pass


def apply(model: nn.Module, cfg: FullConfig, layers: list[int] | None = None) -> dict[str, nn.Module]:
    model.requires_grad_(True)
    return {"": model}
