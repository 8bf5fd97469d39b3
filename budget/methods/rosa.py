"""RoSA (Nikdan et al., ICML 2024): a low-rank and a sparse adapter trained jointly,
W = W0 + s B A + S, S nonzero on a fixed mask of k entries chosen by the accumulated squared
gradient of the dense weight (the diagonal Fisher). Each target is a ``lora.LoRALinear`` whose
``base`` is a ``sparse.SparseLinear``; the sparse knobs mean what they mean for ``sparse``. The mask
is scored before training (default), after a LoRA warm-up (``warmup_steps``), or read from a
warmed-up run (``mask_from``). The schedules, the reference code and the departures:
docs/methods.md#rosa.

Invariants:

- B = 0 and S = 0 at init (the base function); S's k values exist from step 0, so the trainable
  count is the method's from the start, and get zero gradients until the mask is chosen.
- A run too short to reach its mask is refused (``validate_steps``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from adabudget.config import ConfigError
from adabudget.methods import lora, sparse
from adabudget.methods.lora import LoRALinear
from adabudget.methods.sparse import SparseHooks, SparseLinear
from adabudget.modules import set_module
from torch import nn


@dataclass
class RoSAConfig:
    """LoRA's rank plus a sparse budget on the same matrices.

    Example: tiny BERT's 12 default matrices (16 384 entries, 8 of 32 x 32 and 4 of 64 x 32
    or 32 x 64) at r 2 and density 0.01: LoRA 2 (32 + 32) x 8 + 2 (64 + 32) x 4 = 1 792, the
    sparse part 10 x 8 + 20 x 4 = 160, 1 952 trainable in all.
    """

    name: str = "rosa"
    target_modules: Optional[list] = None  # regex name suffixes; None = architecture default
    r: int = 8
    alpha: float = 16.0
    rslora: bool = False  # alpha / sqrt(r) instead of alpha / r
    dropout: float = 0.0  # on the LoRA path's input
    density: float = 0.003  # fraction of each matrix in S (the reference's default d) when budget is None
    budget: Optional[int] = None  # entries of S in all; wins over density
    score: str = "fisher"  # the mask's score: fisher Σ(∇θ)² (paper) | grad Σ|θ ∇θ| | magnitude |θ|
    scope: str = "matrix"  # matrix: top-k per matrix (paper) | global: top-k over all matrices
    calibration_steps: int = 8  # batches (or training steps, with warmup_steps) the mask's score sums over
    warmup_steps: Optional[int] = (
        None  # LoRA-only steps before the mask (paper: wl64); None: mask before step 0
    )
    mask_from: Optional[str] = None  # a run folder holding a chosen mask: train LoRA + S on it from step 0
    layers: Optional[list] = None  # restrict to these block indices (None = all)

    def validate(self) -> None:
        self.lora_part().validate()
        self.sparse_part().validate()
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(
                f"method.warmup_steps: must be >= 0 (LoRA-only steps before the mask), or null to choose "
                f"the mask before training; got {self.warmup_steps}"
            )
        if self.mask_from is not None:
            if self.warmup_steps is not None:
                raise ConfigError(
                    "method.mask_from and method.warmup_steps both choose the mask: set one of them "
                    "(mask_from restarts on a mask a warmed-up run chose)"
                )
            if not mask_checkpoint(self.mask_from).is_file():
                raise ConfigError(
                    f"method.mask_from={self.mask_from}: no checkpoints/last.pt there; give the folder of a "
                    "RoSA run that chose its mask (e.g. one run with method.warmup_steps=64)"
                )

    @property
    def sparse_from(self) -> int:
        """The first step S trains in: 0 without warm-up; else after the warm-up and, unless the
        score needs no gradients, the steps the score is collected over."""
        if self.warmup_steps is None:
            return 0
        return self.warmup_steps + (0 if self.score == "magnitude" else self.calibration_steps)

    def validate_steps(self, total_steps: int) -> None:
        """Called by the training loop once T is known, before the model is built. T equal to
        ``sparse_from`` is allowed: the run ends with its mask chosen (for ``mask_from``)."""
        if self.sparse_from > total_steps > 0 and self.warmup_steps is not None:
            raise ConfigError(
                f"method.warmup_steps={self.warmup_steps} "
                f"(+ method.calibration_steps={self.calibration_steps} "
                f"steps scoring the mask) ends after the run's {total_steps} steps, "
                "so no mask would be chosen: "
                "lower method.warmup_steps, raise train.max_steps / train.epochs, or set "
                "method.warmup_steps=null to choose the mask before training"
            )

    def lora_part(self) -> lora.LoRAConfig:
        return lora.LoRAConfig(
            target_modules=self.target_modules,
            r=self.r,
            alpha=self.alpha,
            rslora=self.rslora,
            dropout=self.dropout,
            layers=self.layers,
        )

    def sparse_part(self) -> sparse.SparseConfig:
        return sparse.SparseConfig(
            target_modules=self.target_modules,
            density=self.density,
            budget=self.budget,
            score=self.score,
            selection="unstructured",
            scope=self.scope,
            calibration_steps=self.calibration_steps,
            layers=self.layers,
        )


def apply(model: nn.Module, cfg: RoSAConfig, layers: list[int] | None = None) -> dict[str, LoRALinear]:
    """Wrap every target as LoRALinear(SparseLinear(W0)); the mask is chosen by magnitude until
    ``calibrate`` re-chooses it."""
    spa = sparse.wrap(model, cfg.sparse_part(), layers)
    scaling = cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)
    wrapped = {}
    for name, inner in spa.items():
        layer = LoRALinear(inner.base, cfg.r, scaling, cfg.dropout)  # shapes and init from W0 itself
        layer.base = inner  # then the frozen path becomes W0 + S
        wrapped[name] = layer
        set_module(model, name, layer)
    return wrapped


def count(cfg: RoSAConfig, arch, layers: list[int] | None = None) -> int:
    """LoRA's r (in + out) per matrix plus the sparse part's kept entries (``sparse.count``)."""
    return lora.count(cfg.lora_part(), arch, layers) + sparse.count(cfg.sparse_part(), arch, layers)


def sparse_layers(modules: dict) -> dict[str, SparseLinear]:
    return {
        n: m.base
        for n, m in modules.items()
        if isinstance(m, LoRALinear) and isinstance(m.base, SparseLinear)
    }


def mask_checkpoint(run_dir: str) -> Path:
    return Path(run_dir).expanduser() / "checkpoints" / "last.pt"


def load_mask(run_dir: str, layers: dict[str, SparseLinear]) -> dict[str, torch.Tensor]:
    """The mask a RoSA run chose (its checkpoint's hook state), checked against ``layers``."""
    where = f"method.mask_from={run_dir}"
    states = torch.load(mask_checkpoint(run_dir), map_location="cpu", weights_only=True).get("hooks") or []
    state = next((s for s in states if isinstance(s, dict) and "indices" in s), None)
    if state is None or not state.get("active", True):
        raise ConfigError(
            f"{where}: that run holds no chosen mask (not RoSA, or stopped before its mask step); "
            "let it reach method.warmup_steps + method.calibration_steps"
        )
    indices = state["indices"]
    if set(indices) != set(layers):
        raise ConfigError(
            f"{where}: its mask covers other matrices ({len(indices)} vs this run's {len(layers)}); "
            "use the same model and method.target_modules / method.layers"
        )
    for name, layer in layers.items():
        if indices[name].numel() != layer.k or int(indices[name].max()) >= layer.base.weight.numel():
            raise ConfigError(
                f"{where}: its mask keeps {indices[name].numel()} entries of {name}, this run "
                f"{layer.k}; use the same method.density / method.budget / method.scope"
            )
    return indices


class RoSAHooks(SparseHooks):
    """``SparseHooks`` plus the paper's schedule: with ``warmup_steps`` set, S's gradients are
    zeroed until step ``sparse_from``; the dense weights' scores are summed over the training
    steps before it (one score per backward pass); at its end the mask is chosen, S is reset to
    zero on it and its optimizer state is dropped (AdamW starts it afresh)."""

    def __init__(self, layers: dict[str, SparseLinear], cfg: RoSAConfig):
        super().__init__(layers, cfg.sparse_part())
        self.rosa = cfg
        self.active = cfg.sparse_from == 0  # S trains
        self.scores: dict[str, torch.Tensor] | None = None  # summed over the collection steps
        self._handles: list = []
        for layer in layers.values():  # bound method: follows the parameter (same k, same tensor)
            layer.values.register_hook(self._mask_values)

    def _mask_values(self, grad: torch.Tensor) -> torch.Tensor:
        return grad if self.active else torch.zeros_like(grad)

    def _collecting(self, step: int) -> bool:
        cfg = self.rosa
        return (
            cfg.warmup_steps is not None
            and cfg.score != "magnitude"
            and (cfg.warmup_steps <= step < cfg.sparse_from)
        )

    def calibrate(self, loss_of: Callable, batches: Callable) -> None:
        if self.rosa.mask_from is not None:  # a warmed-up run's mask, LoRA and S from scratch
            for name, idx in load_mask(self.rosa.mask_from, self.layers).items():
                self.layers[name].select_(idx)
        elif self.rosa.warmup_steps is None:  # the mask before training, from batches of its own
            super().calibrate(loss_of, batches)

    def before_step(self, step: int) -> None:
        if not self._collecting(step):
            return
        if self.scores is None:
            self.scores = {
                n: torch.zeros(m.base.weight.shape, dtype=torch.float32, device=m.base.weight.device)
                for n, m in self.layers.items()
            }
        for name, layer in self.layers.items():
            w = layer.base.weight
            w.requires_grad_(True)  # W0 is in no optimizer: its gradient is read here, then dropped
            self._handles.append(w.register_hook(self._collector(name, w)))

    def _collector(self, name: str, w: torch.Tensor):
        def collect(grad: torch.Tensor) -> None:
            with torch.no_grad():
                g = grad.float()
                self.scores[name] += (w.float() * g).abs() if self.cfg.score == "grad" else g.square()

        return collect

    @torch.no_grad()
    def after_step(self, step: int, optimizer) -> None:
        if self._collecting(step):
            for handle in self._handles:
                handle.remove()
            self._handles = []
            for layer in self.layers.values():
                layer.base.weight.requires_grad_(False)
                layer.base.weight.grad = None
        if not self.active and step + 1 == self.rosa.sparse_from:
            self._choose_mask(optimizer)

    def _choose_mask(self, optimizer) -> None:
        scores = self.scores
        if scores is None:  # magnitude: the weights themselves
            scores = sparse.importance(self.layers, None, (), "magnitude")
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in scores.values():  # every rank must keep the same entries
                torch.distributed.all_reduce(t)
        for name, idx in sparse.select(self.layers, scores, self.cfg).items():
            layer = self.layers[name]
            layer.select_(idx)  # same k: the same parameter, zeroed
            if optimizer is not None:
                optimizer.state.pop(layer.values, None)  # moments of zero gradients: start afresh
        self.scores, self.active = None, True

    def state_dict(self) -> dict:
        state = {**super().state_dict(), "active": self.active}
        if self.scores is not None:
            state["scores"] = {n: t.cpu() for n, t in self.scores.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.active = state.get("active", True)
        scores = state.get("scores")
        if scores is not None:
            self.scores = {n: t.to(self.layers[n].base.weight.device) for n, t in scores.items()}

    def final(self, evaluate) -> dict:
        return {"sparse_from_step": self.rosa.sparse_from}


def hooks(model: nn.Module, modules: dict, cfg: RoSAConfig) -> RoSAHooks:
    return RoSAHooks(sparse_layers(modules), cfg)


@torch.no_grad()
def merge(model: nn.Module, modules: dict) -> None:
    """W0 += S + s B A (transposed for Conv1D), then put the base layer back."""
    for name, layer in modules.items():
        if not (isinstance(layer, LoRALinear) and isinstance(layer.base, SparseLinear)):
            continue
        base = layer.base.fold_into_base_()
        delta = layer.delta_weight()  # (out, in)
        base.weight.add_((delta.T if layer.fan_in_fan_out else delta).to(base.weight.dtype))
        set_module(model, name, base)
