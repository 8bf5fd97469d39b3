"""LoRA (Hu et al., 2022): W = W0 + (alpha / r) B A, B zero-initialised."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from budget.config import ConfigError
from budget.models import find_targets, linear_shape, resolve_targets, set_module


@dataclass
class LoRAConfig:
    name: str = "lora"
    target_modules: Optional[list] = None  # regex name suffixes; None = architecture default
    r: int = 8
    alpha: float = 16.0
    rslora: bool = False  # alpha / sqrt(r) instead of alpha / r
    dropout: float = 0.0
    layers: Optional[list] = None  # restrict to these block indices (None = all)

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"method.r: must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"method.dropout: must be in [0, 1), got {self.dropout}")


class LoRALinear(nn.Module):
    """y = W0 x + b + s B A x with A (r, in) Kaiming-uniform and B (out, r) zero (peft's init)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base)
        dev = base.weight.device
        dt = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        self.A = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=dt))  # (r, in)
        self.B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dt))  # (out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = F.linear(self.dropout(x).to(self.A.dtype), self.A)  # (..., r)
        return out + (F.linear(h, self.B) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in nn.Linear layout (out, in)."""
        return self.scaling * self.B @ self.A


def apply(model: nn.Module, cfg: LoRAConfig, layers: list[int] | None = None) -> dict[str, LoRALinear]:
    layers = layers if layers is not None else cfg.layers
    patterns = resolve_targets(model, cfg.target_modules, "method.target_modules")
    scaling = cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)
    wrapped = {}
    for name in find_targets(model, patterns, "method.target_modules", layers):
        base = model.get_submodule(name)
        base.requires_grad_(False)
        wrapped[name] = LoRALinear(base, cfg.r, scaling, cfg.dropout)
        set_module(model, name, wrapped[name])
    return wrapped
