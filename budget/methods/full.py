"""Full fine-tuning: every backbone parameter trains (the upper-bound baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from adabudget.modules import is_head
from torch import nn


@dataclass
class FullConfig:
    name: str = "full"

    def validate(self) -> None:
        pass


def apply(model: nn.Module, cfg: FullConfig, layers: list[int] | None = None) -> dict[str, nn.Module]:
    for name, p in model.named_parameters():
        if not is_head(name):  # the head follows model.train_head
            p.requires_grad_(True)
    return {"": model}


def merge(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Nothing to fold: full fine-tuning trained the base weights themselves."""


def count(cfg: FullConfig, arch, layers: list[int] | None = None) -> int:
    """Every backbone parameter (the task head is counted by ``train_head``), and a causal LM's
    untied LM head (tiny LLaMA's ``lm_head``; a tied one is the input embedding, counted already)."""
    return arch.backbone_params() + arch.lm_head_params
