"""LoRA (Hu et al., 2022): W = W0 + (alpha / r) B A, B zero-initialised.

``LoRALinear`` is the plain layer; its consumers subclass it: ``SlicedLoRALinear`` (here) computes
with its first r rank-one components, A[:r] and B[:, :r] (views, no copy), keeping its scaling
(``set_active(layer, r)``): DyLoRA's layers run at a sampled rank, and a weight-sharing supernet
(``search.supernet``) trains one R-wide layer for every smaller rank at once; a stand-alone layer
of rank r holding those rows and columns computes the same function. Delta-LoRA's and UniPELT's
gated layers are subclasses in their own method files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from adabudget.config import ConfigError
from adabudget.modules import find_targets, linear_shape, resolve_targets, set_module
from torch import nn


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
        A, B = self.factors()  # (r, in), (out, r)
        h = self.down(x, A)  # (..., r)
        if out.dtype == h.dtype == B.dtype:  # (autocast leaves h in bf16 beside an fp32 B)
            # out += s h Bᵀ in one fused GEMM (as SVDLinear does), no (..., out) temporary
            return (
                out.view(-1, out.shape[-1])
                .addmm_(h.reshape(-1, h.shape[-1]), B.t(), alpha=self.scaling)
                .view(out.shape)
            )
        return out + (F.linear(h, B) * self.scaling).to(out.dtype)

    def down(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """A x after dropout, (..., r): what B maps back up (UniPELT's layer gates it)."""
        return F.linear(self.dropout(x).to(A.dtype), A)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) the layer computes with: (r, in), (out, r)."""
        return self.A, self.B

    def delta_weight(self) -> torch.Tensor:
        """ΔW in nn.Linear layout (out, in) (of the factors in use)."""
        a, b = self.factors()
        return self.scaling * b @ a

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') with B' A' the layer's whole change, the scale folded into B': what a peft LoRA
        adapter holds (``adabudget.export.export_peft_adapter``)."""
        a, b = self.factors()
        return a, b * self.scaling


class SlicedLoRALinear(LoRALinear):
    """A ``LoRALinear`` built at rank R that computes with its first ``active`` components
    (``set_active``; None: all R, 0: the base layer alone)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, r, scaling, dropout)
        self.active: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active == 0:
            return self.base(x)
        return super().forward(x)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[:r], B[:, :r]) of the slice in use, views: (r, in), (out, r)."""
        if self.active is None:
            return self.A, self.B
        return self.A[: self.active], self.B[:, : self.active]


def set_active(layer: SlicedLoRALinear, r: int | None) -> dict[str, tuple]:
    """Compute with the first ``r`` rank-one components only (0: the base layer alone; None: all).

    The scaling stays: a stand-alone rank-r layer with the same s (alpha = s r) and the weights
    A[:r], B[:, :r] computes exactly this. Returns the index of each parameter's part in use,
    ``{"A": (slice(0, r),), "B": (slice(None), slice(0, r))}``, empty when off: the rest gets
    zero gradient and must not be updated (a supernet's masked optimizer reads this).
    """
    if not isinstance(layer, SlicedLoRALinear):
        raise TypeError(
            f"set_active: {type(layer).__name__} computes at its full rank; build it as a SlicedLoRALinear"
        )
    if r is not None and not 0 <= r <= layer.rank:
        raise ValueError(f"LoRA slice r={r} outside 0..{layer.rank}")
    layer.active = None if r is None or r == layer.rank else r
    r = layer.rank if r is None else r
    return {} if r == 0 else {"A": (slice(0, r),), "B": (slice(None), slice(0, r))}


def apply(
    model: nn.Module, cfg: LoRAConfig, layers: list[int] | None = None, layer_cls: type = LoRALinear
) -> dict[str, LoRALinear]:
    """Wrap every target in ``layer_cls`` (``LoRALinear`` or a subclass: the sliced, DyLoRA's,
    Delta-LoRA's and UniPELT's layers are built here too)."""
    layers = layers if layers is not None else cfg.layers
    patterns = resolve_targets(model, cfg.target_modules, "method.target_modules")
    scaling = cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)
    wrapped = {}
    for name in find_targets(model, patterns, "method.target_modules", layers):
        base = model.get_submodule(name)
        # W0 is frozen with the backbone (freeze_backbone); its bias is left alone, so that
        # BitFit or layer freezing applied before in the same group keeps training it.
        base.weight.requires_grad_(False)
        wrapped[name] = layer_cls(base, cfg.r, scaling, cfg.dropout)
        set_module(model, name, wrapped[name])
    return wrapped


def count(cfg: LoRAConfig, arch, layers: list[int] | None = None) -> int:
    """r (in + out) per adapted matrix."""
    layers = layers if layers is not None else cfg.layers
    patterns = cfg.target_modules or arch.default_targets()
    return sum(cfg.r * (s.in_features + s.out_features) for _, s in arch.match_linears(patterns, layers))


@torch.no_grad()
def merge(model: nn.Module, modules: dict[str, LoRALinear]) -> None:
    """W0 += s B A (transposed for Conv1D), then put the base layer back."""
    for name, layer in modules.items():
        if not isinstance(layer, LoRALinear):  # ``modules`` may hold other methods' modules too
            continue
        delta = layer.delta_weight()  # (out, in)
        layer.base.weight.add_((delta.T if layer.fan_in_fan_out else delta).to(layer.base.weight.dtype))
        set_module(model, name, layer.base)
