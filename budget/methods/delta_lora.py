"""Delta-LoRA (Zi et al., 2023, "Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of
Low-Rank Matrices"): LoRA, y = W x + b + s B A x, where the frozen W also moves after every
optimizer step t >= K by the change of the low-rank product (Algorithm 1):

    W_{t+1} = W_t + λ s (B_{t+1} A_{t+1} - B_t A_t)        λ = update_ratio (paper: 2), K = start_step

W gets no gradient and no optimizer state: the memory is LoRA's, only the factors train. Worked
example (λ = 2, s = 2, K = 0): one step moves B A by 0.01 somewhere; W moves there by 2 x 2 x 0.01
= 0.04 and the layer's output by 0.04 + s x 0.01 = 0.06. The sum telescopes: W_T = W_0 + λ s
(B_T A_T - B_K A_K), so with K = 0 (B_0 = 0) a trained layer computes W_0 + (1 + λ) s B_T A_T.

The layer is lora.py's ``LoRALinear`` (no dropout: the paper removes it from the LoRA branch, since
with dropout the product's change is not the update W would get). ``hooks`` keeps the factors
before each step (``before_step``) and adds λ s (B' A' - B A) to W in place after
``optimizer.step()`` (``after_step``); its ``state_dict`` carries the updated W of every adapted
layer (a checkpoint otherwise holds only trainable parameters), so a resumed run continues bit
for bit. Checkpoints grow by the adapted matrices (MiniLM's 36: 10.6M values, 42 MB in fp32).

Export: ``merge`` folds s B A into the updated W (``export_merged`` is exact).
``adabudget.export.export_peft_adapter`` writes the whole change as a plain peft LoRA adapter
onto the original W0: W_T - W_0 = λ s (B_T A_T - B_K A_K) telescopes, so the layer's change is
(1 + λ) s B_T A_T - λ s B_K A_K, rank 2r (rank r with K = 0, where B_K = 0); exact up to the
rounding of the accumulated updates (``DeltaLoRALinear.peft_factors``). The adapter
(``export_adapter``, ``adabudget.export.save_adapter``) holds the factors as trainable state and the
updated W of each adapted layer in ``hooks.pt`` (this hooks object's ``state_dict``), which
``load_adapter`` restores: it reloads exactly onto the original backbone, at the size of the
adapted matrices in full (the change of W is dense; ``trainable_params_final`` stays LoRA's).

Departures from the paper: λ multiplies the change of the scaled product s B A, the layer's
actual ΔW (the paper writes λ Δ(A B) with its product's scaling left implicit); the default K is 0, not the
paper's few hundred warm-up steps, because this project's runs are a few hundred steps long
(``start_step`` sets it). With a half-precision backbone W, updates below its precision are lost
(the factors stay fp32).
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
