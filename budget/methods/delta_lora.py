"""Delta-LoRA (Zi et al., 2023): LoRA, y = W x + b + s B A x, where the frozen W also moves after
every optimizer step t >= K (``start_step``) by λ (``update_ratio``) times the change of s B A.
The layer is ``LoRALinear`` without dropout; ``hooks`` keeps the factors before each step and
updates W in place after ``optimizer.step()``. Algorithm 1, a worked example, the exports and the
departures: docs/methods.md#delta-lora.

Invariants:

- W gets no gradient and no optimizer state: the memory is LoRA's; ``update_ratio=0`` is LoRA.
- The hooks' ``state_dict`` carries the updated W of every adapted layer, so checkpoints and
  ``adapter/`` (``hooks.pt``) restore it and a resumed run continues bit for bit.
- W_T - W_0 = λ s (B_T A_T - B_K A_K) telescopes: ``merge`` and the peft export are exact up to the
  rounding of the accumulated updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from adabudget.config import ConfigError
from adabudget.methods import lora
from adabudget.methods.hooks import MethodHooks
from adabudget.methods.lora import LoRALinear
from torch import nn


@dataclass
class DeltaLoRAConfig:
    name: str = "delta_lora"
    target_modules: Optional[list] = None  # regex name suffixes; None = architecture default
    r: int = 8
    alpha: float = 16.0
    rslora: bool = False  # alpha / sqrt(r) instead of alpha / r
    update_ratio: float = 2.0  # λ: W moves by λ s Δ(B A) after each step (0: plain LoRA)
    start_step: int = 0  # K: W moves after steps K, K + 1, ... (0-based optimizer steps)
    layers: Optional[list] = None  # restrict to these block indices (None = all)

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"method.r: must be >= 1, got {self.r}")
        if not (math.isfinite(self.update_ratio) and self.update_ratio >= 0):
            raise ConfigError(
                f"method.update_ratio: must be a finite number >= 0 (0 = plain LoRA), got {self.update_ratio}"
            )
        if self.start_step < 0:
            raise ConfigError(
                f"method.start_step: must be >= 0 (0 = update W from the first step), got {self.start_step}"
            )


class DeltaLoRALinear(LoRALinear):
    """A ``LoRALinear`` whose base weight the Delta-LoRA hooks update after every optimizer step.

    ``start``: (A_K, B_K, λ) from before the first update of W (the hooks set it), so the change
    of W is λ s (B A - B_K A_K) (the sum telescopes) and ``export_peft_adapter`` can write the
    layer's whole change as a rank-2r LoRA (rank r when B_K = 0, i.e. K = 0); None while W has
    not moved; "unknown" for W restored from a checkpoint that predates it (then refused).
    """

    start = None

    @property
    def moves_base(self) -> bool:  # B A alone is not its change, and the start is not known
        return isinstance(self.start, str)

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') with B' A' = (W - W0) + s B A, the scale folded into B': (r', in), (out, r')."""
        a, b = super().peft_factors()
        if self.start is None:
            return a, b
        a0, b0, ratio = self.start
        if not b0.any():  # K = 0: B_0 = 0, the change is (1 + λ) s B A
            return a, (1 + ratio) * b
        r = a.shape[0]
        return torch.cat([a, a0[:r]]), torch.cat([(1 + ratio) * b, -ratio * self.scaling * b0[:, :r]], dim=1)


def as_lora(cfg: DeltaLoRAConfig) -> lora.LoRAConfig:
    """The LoRA it trains (no dropout on the LoRA branch, as the paper)."""
    return lora.LoRAConfig(
        target_modules=cfg.target_modules,
        r=cfg.r,
        alpha=cfg.alpha,
        rslora=cfg.rslora,
        dropout=0.0,
        layers=cfg.layers,
    )


def apply(
    model: nn.Module, cfg: DeltaLoRAConfig, layers: list[int] | None = None
) -> dict[str, DeltaLoRALinear]:
    """W frozen (it moves only through the hooks, never by a gradient), LoRA's factors trained."""
    return lora.apply(model, as_lora(cfg), layers, layer_cls=DeltaLoRALinear)


def count(cfg: DeltaLoRAConfig, arch, layers: list[int] | None = None) -> int:
    """LoRA's r (in + out) per adapted matrix: W's change is not a trainable parameter."""
    return lora.count(as_lora(cfg), arch, layers)


def merge(model: nn.Module, modules: dict) -> None:
    """W += s B A into the updated W (lora.merge), then put the base layer back."""
    lora.merge(model, {n: m for n, m in modules.items() if isinstance(m, DeltaLoRALinear)})


@torch.no_grad()
def add_product_change_(layer: LoRALinear, a0: torch.Tensor, b0: torch.Tensor, coeff: float) -> None:
    """W += coeff (B' A' - B A), with (A, B) = (a0, b0) before the step and (A', B') now.

    Written as (B' - B) A' + B (A' - A): the rounding is relative to the small change, not to
    the products (which cancel), and no (out, in) temporary is needed when W is fp32.
    """
    a1, b1 = layer.A.detach(), layer.B.detach()
    terms = ((b1 - b0, a1), (b0, a1 - a0))  # (out, r) @ (r, in) each
    w = layer.base.weight  # (out, in), or (in, out) for GPT-2's Conv1D
    if w.dtype == a1.dtype:
        for left, right in terms:
            if layer.fan_in_fan_out:
                w.addmm_(right.T, left.T, alpha=coeff)
            else:
                w.addmm_(left, right, alpha=coeff)
    else:  # a half-precision backbone: the change in fp32, then rounded into W once
        delta = coeff * (terms[0][0] @ terms[0][1] + terms[1][0] @ terms[1][1])
        w.add_((delta.T if layer.fan_in_fan_out else delta).to(w.dtype))


class DeltaLoRAHooks(MethodHooks):
    """The training loop's side of Delta-LoRA (``MethodHooks``): W follows the change of the product AB."""

    def __init__(self, layers: dict[str, DeltaLoRALinear], update_ratio: float, start_step: int):
        self.layers = layers
        self.update_ratio = update_ratio  # λ
        self.start_step = start_step  # K
        self._before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _moves(self, step: int) -> bool:
        return self.update_ratio != 0 and step >= self.start_step

    def before_step(self, step: int) -> None:
        # (A_t, B_t): 2 r (in + out) values per layer, kept for one step
        self._before = (
            {n: (m.A.detach().clone(), m.B.detach().clone()) for n, m in self.layers.items()}
            if self._moves(step)
            else {}
        )
        for name, (a0, b0) in self._before.items():  # the first update: (A_K, B_K) for the export
            if self.layers[name].start is None:
                self.layers[name].start = (a0, b0, self.update_ratio)

    def after_step(self, step: int, optimizer) -> None:
        for name, (a0, b0) in self._before.items():
            layer = self.layers[name]
            add_product_change_(layer, a0, b0, self.update_ratio * layer.scaling)
        self._before = {}

    def state_dict(self) -> dict:
        """The updated W of every adapted layer (detached views: the checkpoint is written at once)."""
        if self.update_ratio == 0:
            return {"weights": {}}
        start = {n: m.start[:2] for n, m in self.layers.items() if isinstance(m.start, tuple)}
        return {"weights": {n: m.base.weight.detach() for n, m in self.layers.items()}, "start": start}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        weights = state.get("weights", {})
        unknown = sorted(set(weights) - set(self.layers))
        if unknown:
            raise ValueError(
                f"delta_lora checkpoint holds W of modules this model does not adapt: {unknown[:5]}"
            )
        start = state.get("start")
        for name, value in weights.items():
            layer = self.layers[name]
            layer.base.weight.copy_(value)
            if start is None:  # a checkpoint from before the start was kept: W moved, from where unknown
                layer.start = "unknown"
            elif name in start:
                a0, b0 = start[name]
                layer.start = (a0.to(layer.A.device), b0.to(layer.B.device), self.update_ratio)


def hooks(model: nn.Module, modules: dict, cfg: DeltaLoRAConfig) -> DeltaLoRAHooks:
    layers = {n: m for n, m in modules.items() if isinstance(m, DeltaLoRALinear)}
    return DeltaLoRAHooks(layers, cfg.update_ratio, cfg.start_step)
