"""DyLoRA (Valipour et al., EACL 2023): one LoRA block trained for every rank in [r_min, r_max] at
once, so the rank is chosen after training, with no search. Each optimizer step samples a rank b
and every layer computes h = W0 x + (alpha / b) B[:, :b] A[:b] x; by default (``frozen``) only the
b-th component trains. The layers are ``DyLoRALinear`` (a ``SlicedLoRALinear`` at rank r_max); the
loop drives them through ``hooks``. The sampling, the authors' code it was checked against and the
departures: docs/methods.md#dylora.

Invariants:

- b depends on (run seed, step) only, so a resumed run samples the same sequence.
- With ``hold=True`` a component that does not train in a step keeps its value exactly.
- Between steps (evaluation, merge, exports) the layers compute at the serving rank
  ``export_rank`` (default r_max); ``rank=k`` of ``adabudget.export``'s functions uses rank k.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from adabudget.config import ConfigError
from adabudget.methods import lora
from adabudget.methods.hooks import MethodHooks
from adabudget.methods.lora import LoRALinear, set_active
from torch import nn


@dataclass
class DyLoRAConfig:
    """LoRA trained for every rank in [r_min, r_max].

    Example: r_min = 1, r_max = 8 on MiniLM's 24 default matrices (384 x 384) trains
    8 x 768 x 24 = 147,456 parameters, and after training any rank 1..8 is a LoRA adapter
    of its own (rank 4: the first 4 rows of A and columns of B, scale alpha / 4).
    """

    name: str = "dylora"
    target_modules: Optional[list] = None  # regex name suffixes; None = architecture default
    r_min: int = 1  # smallest rank trained
    r_max: int = 8  # largest rank trained; A, B hold r_max components
    alpha: float = 16.0  # scale alpha / b at rank b (eq. 4)
    frozen: bool = True  # paper's "frozen" mode (eq. 6): only component b learns; False: all of 1..b
    hold: bool = (
        True  # untrained components keep their values (eq. 6); False: AdamW moves them (the reference code)
    )
    dropout: float = 0.0
    export_rank: Optional[int] = None  # the rank evaluated, merged and exported after training (None = r_max)
    layers: Optional[list] = None  # restrict to these block indices (None = all)

    def validate(self) -> None:
        if self.r_min < 1:
            raise ConfigError(f"method.r_min: must be >= 1, got {self.r_min}")
        if self.r_min > self.r_max:
            raise ConfigError(
                f"method.r_min={self.r_min} > method.r_max={self.r_max}: the rank range is empty; "
                "lower method.r_min or raise method.r_max"
            )
        if self.export_rank is not None and not self.r_min <= self.export_rank <= self.r_max:
            raise ConfigError(
                f"method.export_rank={self.export_rank}: must be a trained rank, in "
                f"[method.r_min, method.r_max] = [{self.r_min}, {self.r_max}] (or null for r_max)"
            )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"method.dropout: must be in [0, 1), got {self.dropout}")

    @property
    def serving_rank(self) -> int:
        return self.r_max if self.export_rank is None else self.export_rank


def sample_rank(seed: int, step: int, r_min: int, r_max: int) -> int:
    """b of optimizer step ``step``: uniform on {r_min, ..., r_max}, a pure function of (seed, step)."""
    return int(np.random.default_rng([seed, step]).integers(r_min, r_max + 1))


class DyLoRALinear(lora.SlicedLoRALinear):
    """A LoRA layer of rank r_max that DyLoRA runs at rank b (``set_rank``: A[:b], B[:, :b] and
    the scale alpha / b, eq. 4)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0, *, alpha: float):
        super().__init__(base, r, scaling, dropout)
        self.alpha = alpha


def is_dylora(module: nn.Module) -> bool:
    return isinstance(module, DyLoRALinear)


def set_rank(modules: dict[str, nn.Module], b: int) -> None:
    """Make every DyLoRA layer in ``modules`` compute at rank ``b``: A[:b], B[:, :b], scale alpha / b."""
    for layer in modules.values():
        if is_dylora(layer):
            set_active(layer, b)
            layer.scaling = layer.alpha / b


def choose_rank(modules: dict[str, nn.Module], rank: int) -> None:
    """``set_rank`` for a caller's ``rank=``: refused, naming the range, where it cannot apply."""
    set_rank(check_rank(modules, rank), rank)


def check_rank(modules: dict[str, nn.Module], rank: int) -> dict[str, LoRALinear]:
    """The DyLoRA layers of ``modules``, if ``rank`` is one they hold; else ValueError naming the range."""
    layers = {n: m for n, m in modules.items() if is_dylora(m)}
    if not layers:
        raise ValueError(
            f"rank={rank}: only DyLoRA layers have a rank to choose, and this model has none; leave rank=None"
        )
    r_max = min(m.rank for m in layers.values())
    if not 1 <= rank <= r_max:
        raise ValueError(
            f"rank={rank}: these DyLoRA layers hold ranks 1..{r_max} (trained: method.r_min..method.r_max)"
        )
    return layers


@contextmanager
def at_rank(modules: dict[str, nn.Module], rank: int | None) -> Iterator[None]:
    """Within the block every DyLoRA layer of ``modules`` computes at ``rank`` (None: as it is);
    each layer's rank and scale are put back afterwards. The ``rank=`` of the export and merge
    functions (``adabudget.export``)."""
    if rank is None:
        yield
        return
    layers = {n: m for n, m in modules.items() if is_dylora(m)}
    saved = {n: (m.active, m.scaling) for n, m in layers.items()}
    choose_rank(layers, rank)
    try:
        yield
    finally:
        for name, (active, scaling) in saved.items():
            set_active(layers[name], active)
            layers[name].scaling = scaling


def trained_slice(b: int, r_min: int, frozen: bool) -> slice:
    """The components that learn at rank b: the b-th alone (frozen; all of the first r_min at
    b = r_min), else the first b."""
    return slice(b - 1 if frozen and b > r_min else 0, b)


def as_lora(cfg: DyLoRAConfig) -> lora.LoRAConfig:
    """The LoRA at rank r_max (scale alpha / r_max) that holds every component."""
    return lora.LoRAConfig(
        target_modules=cfg.target_modules,
        r=cfg.r_max,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        layers=cfg.layers,
    )


def apply(model: nn.Module, cfg: DyLoRAConfig, layers: list[int] | None = None) -> dict[str, LoRALinear]:
    wrapped = lora.apply(
        model, as_lora(cfg), layers, layer_cls=functools.partial(DyLoRALinear, alpha=cfg.alpha)
    )
    set_rank(wrapped, cfg.serving_rank)  # a model built from this config computes at the export rank
    return wrapped


def count(cfg: DyLoRAConfig, arch, layers: list[int] | None = None) -> int:
    """r_max (in + out) per adapted matrix: every component of A and B trains over the run."""
    return lora.count(as_lora(cfg), arch, layers)


@torch.no_grad()
def merge(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """W0 += (alpha / k) B[:, :k] A[:k] at the rank k the layers compute at (``set_rank``), then
    put the base layer back."""
    lora.merge(model, {name: m for name, m in modules.items() if is_dylora(m)})


class DyLoRAHooks(MethodHooks):
    """The training loop's side of DyLoRA (``MethodHooks``): sampled ranks, masked
    gradients, held components, the rank curve."""

    def __init__(self, layers: dict[str, LoRALinear], cfg: DyLoRAConfig, seed: int):
        self.layers = layers
        self.cfg = cfg
        self.seed = seed
        self.rank: int | None = None  # b of the step in progress; None between steps
        self.held: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # A, B before the step
        for layer in layers.values():  # bound methods: deepcopy drops tensor hooks, nothing breaks
            layer.A.register_hook(self._mask_a)
            layer.B.register_hook(self._mask_b)

    def _trained(self) -> slice:
        return trained_slice(self.rank, self.cfg.r_min, self.cfg.frozen)

    def _mask_a(self, grad: torch.Tensor) -> torch.Tensor:  # (r_max, in): rows
        if self.rank is None:
            return grad
        keep = self._trained()
        out = torch.zeros_like(grad)
        out[keep] = grad[keep]
        return out

    def _mask_b(self, grad: torch.Tensor) -> torch.Tensor:  # (out, r_max): columns
        if self.rank is None:
            return grad
        keep = self._trained()
        out = torch.zeros_like(grad)
        out[:, keep] = grad[:, keep]
        return out

    def before_step(self, step: int) -> None:
        self.rank = sample_rank(self.seed, step, self.cfg.r_min, self.cfg.r_max)
        set_rank(self.layers, self.rank)
        if self.cfg.hold:
            self.held = {n: (m.A.detach().clone(), m.B.detach().clone()) for n, m in self.layers.items()}

    @torch.no_grad()
    def after_step(self, step: int, optimizer) -> None:
        keep = self._trained()
        for name, layer in self.layers.items() if self.cfg.hold else ():
            a0, b0 = self.held[name]
            a, b = layer.A, layer.B
            a[: keep.start], a[keep.stop :] = a0[: keep.start], a0[keep.stop :]
            b[:, : keep.start], b[:, keep.stop :] = b0[:, : keep.start], b0[:, keep.stop :]
        self.held, self.rank = {}, None
        set_rank(self.layers, self.cfg.serving_rank)

    def state_dict(self) -> dict:
        return {"seed": self.seed}  # b is a pure function of (seed, step): nothing else to keep

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]

    def final(self, evaluate) -> dict:
        """Dev metrics at every rank r_min..r_max (keys are strings, as in result.json); the
        layers are left at the serving rank for the export."""
        curve = {}
        for r in range(self.cfg.r_min, self.cfg.r_max + 1):
            set_rank(self.layers, r)
            curve[str(r)] = evaluate("dev")
        set_rank(self.layers, self.cfg.serving_rank)
        return {"rank_curve": curve, "export_rank": self.cfg.serving_rank}


def hooks(model: nn.Module, modules: dict[str, nn.Module], cfg: DyLoRAConfig) -> DyLoRAHooks:
    """The hooks of the DyLoRA layers in ``modules``.

    The rank stream is seeded by the run seed: ``adabudget.training`` seeds torch with ``train.seed``
    just before it builds the model and the hooks, and the factory gets no seed argument, so it
    is read back from ``torch.initial_seed()`` (and kept in the checkpoint's hook state).
    """
    layers = {name: m for name, m in modules.items() if is_dylora(m)}
    return DyLoRAHooks(layers, cfg, torch.initial_seed())
