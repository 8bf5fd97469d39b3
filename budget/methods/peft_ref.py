"""huggingface/peft's own LoRA and AdaLoRA, trained by adabudget's loop: the reference methods.

``method=peft_lora`` and ``method=peft_adalora`` inject peft's layers (its ``LoraModel`` /
``AdaLoraModel`` tuners, in place, on the same target modules as ``lora`` / ``adalora``)
and ``PeftAllocator`` drives peft's own ``RankAllocator`` from our loop. Everything else
(data order, optimizer, schedule, evaluation, record) is the run's, so a comparison of
``adalora`` against ``peft_adalora`` differs only in the method. Needs ``pip install peft``.

What is peft's and what is ours:

- peft's: the layers (AdaLoRA: ``lora_A`` = Q (r, in) and ``lora_B`` = P (out, r) drawn from
  N(0, 0.02), ``lora_E`` = λ (r, 1) zero; scaling ``lora_alpha / r`` with peft's default
  ``lora_alpha`` = 8), the importance EMAs, the budget schedule, the masking and the final
  rank pattern (kept by masking λ at every step; peft never shrinks). LoRA: kaiming-uniform A,
  zero B, as ours.
- ours: calling ``RankAllocator.update_and_allocate`` with the optimizer steps done (the three
  branches of ``AdaLoraModel.update_and_allocate``, copied), and the orthogonal penalty,
  which peft adds inside ``AdaLoraModel.forward``; ``orth_penalty`` below is that code, as a
  visible term of the loop's loss (tests/test_peft_ref.py checks it equals peft's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from adabudget.config import ConfigError
from adabudget.methods.adalora import kept_params as adalora_kept_params
from adabudget.methods.adalora import triplet_cost
from adabudget.modules import find_targets, resolve_targets
from torch import nn

ADAPTER = "default"


def _require_peft():
    from adabudget.extras import require

    require("peft", "peft", "method.name=peft_* (huggingface/peft's code, the reference methods)")


@dataclass
class PeftLoRAConfig:
    """peft's ``LoraConfig`` on our target modules (``r``, ``alpha`` as ``lora_alpha``)."""

    name: str = "peft_lora"
    target_modules: Optional[list] = None  # regex name suffixes; None = architecture default
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    layers: Optional[list] = None  # restrict to these block indices (None = all)

    def validate(self) -> None:
        _require_peft()
        if self.r < 1:
            raise ConfigError(f"method.r: must be >= 1, got {self.r}")


@dataclass
class PeftAdaLoRAConfig:
    """peft's ``AdaLoraConfig`` with our knob names (peft's in the comments).

    The schedule knobs mean what they mean for ``adalora`` (fractions of T below 1, steps
    otherwise) and become peft's ``tinit`` / ``tfinal`` / ``total_step`` once T is known.
    """

    name: str = "peft_adalora"
    target_modules: Optional[list] = None
    init_r: int = 12  # init_r
    target_r: int = 8  # target_r
    warmup_steps: float = 0.1  # tinit
    final_steps: float = 0.3  # tfinal
    mask_interval: int = 10  # deltaT
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    alpha: float = 8.0  # lora_alpha: peft's default, scaling alpha / init_r
    dropout: float = 0.0
    layers: Optional[list] = None  # restrict to these block indices (None = all)

    def validate(self) -> None:
        _require_peft()
        if not 0 < self.target_r < self.init_r:
            raise ConfigError(f"method.target_r: must be in (0, init_r={self.init_r}), got {self.target_r}")
        if self.mask_interval < 1:
            raise ConfigError(f"method.mask_interval: must be >= 1, got {self.mask_interval}")


def apply(model: nn.Module, cfg, layers: list[int] | None = None) -> dict[str, nn.Module]:
    """Inject peft's layers on our targets; returns {module name: peft layer}.

    The tuner marks only its adapters trainable; what was trainable before (the task
    head) stays so. The AdaLoRA tuner is kept on the model for ``PeftAllocator``.
    """
    _require_peft()
    from adabudget.modules import is_linear, linear_shape
    from peft import AdaLoraConfig, AdaLoraModel, LoraConfig, LoraModel

    layers = layers if layers is not None else cfg.layers
    patterns = resolve_targets(model, cfg.target_modules, "method.target_modules")
    targets = find_targets(model, patterns, "method.target_modules", layers)
    # GPT-2's Conv1D stores W as (in, out); peft wants to be told (it warns and sets it itself).
    fan_in_fan_out = any(
        linear_shape(model.get_submodule(t))[2] for t in targets if is_linear(model.get_submodule(t))
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "peft_lora":
        peft_cfg = LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=targets,
            fan_in_fan_out=fan_in_fan_out,
        )
        tuner = LoraModel(model, peft_cfg, ADAPTER)
    else:
        # total_step is not known before the loop: a placeholder, set by PeftAllocator.
        peft_cfg = AdaLoraConfig(
            init_r=cfg.init_r,
            target_r=cfg.target_r,
            tinit=0,
            tfinal=0,
            deltaT=cfg.mask_interval,
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            orth_reg_weight=cfg.orth_reg_weight,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=targets,
            fan_in_fan_out=fan_in_fan_out,
            total_step=1,
        )
        tuner = AdaLoraModel(model, peft_cfg, ADAPTER)
        model.__dict__["_peft_tuner"] = tuner  # not a submodule: the tuner holds the model
    for p in trainable:
        p.requires_grad_(True)
    return {name: model.get_submodule(name) for name in targets}


def count(cfg, arch, layers: list[int] | None = None) -> int:
    """LoRA: r (in + out) per target; AdaLoRA: init_r (in + out + 1) (A, B and E)."""
    layers = layers if layers is not None else cfg.layers
    linears = arch.match_linears(cfg.target_modules or arch.default_targets(), layers)
    if cfg.name == "peft_lora":
        return sum(cfg.r * (s.in_features + s.out_features) for _, s in linears)
    return sum(cfg.init_r * triplet_cost(s) for _, s in linears)


def orth_penalty(model: nn.Module) -> torch.Tensor:
    """peft's R(P, Q): Σ ||AAᵀ - I||_F + ||BᵀB - I||_F over every lora_A / lora_B, / their number
    (``AdaLoraModel.forward``, peft 0.21, without its DeepSpeed branch)."""
    total, n = None, 0
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and ADAPTER in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            term = torch.norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype), p="fro")
            total, n = (term if total is None else total + term), n + 1
    return total / n if n else torch.zeros(())


class PeftAllocator:
    """Our loop's allocator interface over peft's ``RankAllocator`` (see ``RankAllocator`` in
    ``adabudget.allocator`` for the interface): ``update_and_allocate(step)`` after every optimizer
    step, ``orth_penalty()``, ``budget_at(step)``, ``ranks()``, state for checkpoints."""

    def __init__(self, model: nn.Module, cfg: PeftAdaLoRAConfig, total_steps: int):
        from adabudget.schedule import phase_steps

        self.model = model
        self.tuner = model.__dict__["_peft_tuner"]
        self.cfg = cfg
        self.total_steps = total_steps
        self.warmup_steps, self.final_steps = phase_steps(cfg.warmup_steps, cfg.final_steps, total_steps)
        peft_cfg = self.tuner.peft_config[ADAPTER]
        peft_cfg.tinit, peft_cfg.tfinal, peft_cfg.total_step = (
            self.warmup_steps,
            self.final_steps,
            total_steps,
        )
        self.peft = self.tuner.rankallocator
        self.final_step = total_steps - self.final_steps
        self.fixed = False
        self.names = sorted(n.rsplit(".lora_E", 1)[0] for n, _ in model.named_parameters() if ".lora_E." in n)

    def orth_penalty(self) -> torch.Tensor:
        return orth_penalty(self.model)

    def budget_at(self, step: int) -> int:
        return self.peft.budget_schedule(step)[0]

    def update_and_allocate(self, step: int):
        """``AdaLoraModel.update_and_allocate(step)``, returning what it did."""
        from adabudget.allocator import Allocation

        peft_cfg = self.tuner.peft_config[ADAPTER]
        if step < self.final_step:
            budget, pattern = self.peft.update_and_allocate(self.model, step)
            if not pattern:
                return None
            peft_cfg.rank_pattern = pattern
        elif step == self.final_step:
            budget, pattern = self.peft.update_and_allocate(self.model, step, force_mask=True)
            peft_cfg.rank_pattern = pattern
            self.peft.reset_ipt()
            self.fixed = True
        else:
            self.peft.mask_using_rank_pattern(self.model, peft_cfg.rank_pattern)
            return None
        ranks = self._ranks(pattern)
        kept = adalora_kept_params(ranks, {n: self.model.get_submodule(n) for n in ranks})
        return Allocation(
            step=step,
            budget=budget,
            kept=sum(ranks.values()),
            kept_params=kept,
            ranks=ranks,
            final=self.fixed,
            shrink=False,
        )

    def _ranks(self, pattern: dict) -> dict[str, int]:
        return {k.rsplit(".lora_E", 1)[0]: int(sum(v)) for k, v in sorted(pattern.items())}

    def ranks(self) -> dict[str, int]:
        pattern = self.tuner.peft_config[ADAPTER].rank_pattern
        if not pattern:
            return {n: self.cfg.init_r for n in self.names}
        return self._ranks(pattern)

    def state_dict(self) -> dict:
        # ipt / EMAs are {param name: tensor}; the rank pattern {lora_E name: [bool]}.
        return {
            "ipt": dict(self.peft.ipt),
            "exp_avg_ipt": dict(self.peft.exp_avg_ipt),
            "exp_avg_unc": dict(self.peft.exp_avg_unc),
            "rank_pattern": self.tuner.peft_config[ADAPTER].rank_pattern,
            "fixed": self.fixed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.peft.ipt, self.peft.exp_avg_ipt = dict(state["ipt"]), dict(state["exp_avg_ipt"])
        self.peft.exp_avg_unc = dict(state["exp_avg_unc"])
        self.tuner.peft_config[ADAPTER].rank_pattern = state["rank_pattern"]
        self.fixed = state["fixed"]

    def shrink_(self, optimizer=None) -> None:
        raise RuntimeError("peft's AdaLoRA never shrinks (Allocation.shrink is always False)")
