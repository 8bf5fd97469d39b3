"""SoRA (Ding et al., EMNLP 2023, "Sparse Low-rank Adaptation of Pre-trained Language Models"):
LoRA with a gate g on the rank dimension, h = W0 x + s B diag(g) A x, s = alpha / r_max, where g
follows a proximal-gradient step with an L1 penalty: after each optimizer step every gate entry is
soft-thresholded, g <- sign(g) max(|g| - ξ_t, 0), so entries fall to exactly 0 and the rank of each
matrix shrinks to the nonzeros of its gate. The final adapter is a LoRA of those ranks (the zero
columns of B and rows of A dropped): the peft export and the merge are LoRA's.

Its size emerges from ξ. To reach a level, ``target_params`` makes a final cut of the gates
(the smallest |g| pruned, over all matrices, until the kept components' parameters
r_i (in + out + 1) are at most the level) at T - ``final_steps``; the cut gates stay 0 to the end.
What was read of the authors' code and where this departs: docs/methods.md#sora.

Invariants:

- ``count`` is what ``apply`` builds (r_max (in + out + 1) per matrix); the final adapter
  parameters are ``kept()["kept_params"]`` (the record's ``adapter_params_final``), at most
  ``target_params`` after the cut.
- A gate entry that the threshold reaches is exactly 0, and a zero gate adds nothing to ΔW.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from adabudget.config import ConfigError, checker
from adabudget.methods import lora
from adabudget.methods.hooks import MethodHooks, kept_with_cut
from adabudget.methods.lora import LoRALinear
from adabudget.schedule import steps_from
from torch import nn

XI_SCHEDULES = ("constant", "linear", "log_linear", "exp_linear")


@dataclass
class SoRAConfig:
    """SoRA knobs; the paper symbol in each comment.

    Worked example: r_max = 8 on MiniLM's 36 default matrices (24 of 384 x 384, 12 of 384 x 1536
    and 1536 x 384) builds 8 x (24 x 769 + 12 x 1921) = 332,032 parameters; target_params =
    166,000 then keeps the components of largest |g| whose r_i (in + out + 1) sum to at most
    166,000 at T - final_steps. The schedule ξ = 1e-4 -> xi_max = 7e-4 in xi_stages = 7 linear
    stages of xi_stage_steps = 40 steps: ξ_t = 1e-4, 2e-4, ..., 7e-4 from step 240 on.
    """

    name: str = "sora"
    target_modules: Optional[list] = None  # regex name suffixes; None = architecture default
    r: int = 8  # r_max: components per matrix before the gates prune them
    alpha: float = 16.0  # s = alpha / r_max (the authors' lora_alpha 16)
    dropout: float = 0.0
    xi: float = 1e-4  # ξ: soft threshold per step (the authors' sparse_lambda_2)
    # ξ × the gate's current learning rate η_t, as the paper's T_{η_t ξ}; false: ξ itself, as the
    # authors' SparseAdamW (src/sparse_optimizer.py) that their run_glue.py trains with
    xi_times_lr: bool = False
    xi_schedule: str = "constant"  # the sparsifying scheduler: constant | linear | log_linear | exp_linear
    xi_max: Optional[float] = None  # last ξ of the schedule (max_lambda)
    xi_stages: int = 1  # number of ξ values of the schedule (lambda_num)
    xi_stage_steps: Optional[int] = None  # steps per ξ value (the authors: a further 15 epochs each)
    target_params: Optional[int] = None  # the level: final cut of the gates to <= this many parameters
    final_steps: float = 0.0  # steps (or fraction of T) trained after the cut; 0: cut after the last step
    layers: Optional[list] = None  # restrict to these block indices (None = all)

    def validate(self) -> None:
        check = checker("method")
        check(self.r >= 1, "r", f"r_max must be >= 1, got {self.r}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.xi >= 0, "xi", f"ξ must be >= 0 (0: no sparsification), got {self.xi}")
        check(
            self.xi_schedule in XI_SCHEDULES,
            "xi_schedule",
            f"unknown '{self.xi_schedule}'; use one of {XI_SCHEDULES}",
        )
        if self.xi_schedule != "constant":
            check(
                self.xi_max is not None and self.xi_stages >= 2 and (self.xi_stage_steps or 0) >= 1,
                "xi_schedule",
                f"'{self.xi_schedule}' needs method.xi_max, method.xi_stages >= 2 and "
                "method.xi_stage_steps >= 1 (or xi_schedule=constant)",
            )
            check(
                self.xi_schedule != "exp_linear" or (self.xi > 0 and self.xi_max > 0),
                "xi",
                "exp_linear interpolates log ξ: method.xi and method.xi_max must be > 0",
            )
        check(self.target_params is None or self.target_params > 0, "target_params", "must be > 0 (or null)")
        check(self.final_steps >= 0, "final_steps", "must be >= 0 (steps, or a fraction of T below 1)")

    def validate_steps(self, total_steps: int) -> None:
        """The cut at T - final_steps must fall within the run."""
        if self.target_params is not None and cut_step(self, total_steps) < 0:
            raise ConfigError(
                f"method.final_steps: {steps_from(self.final_steps, total_steps, 'method.final_steps')} "
                f"steps after the cut leave none before it (T={total_steps}); lower method.final_steps"
            )


def xi_values(cfg: SoRAConfig) -> list[float]:
    """The ξ of each stage of the sparsifying scheduler (the authors' ``_build_lambda_list``)."""
    if cfg.xi_schedule == "constant":
        return [cfg.xi]
    lo, hi, n = cfg.xi, cfg.xi_max, cfg.xi_stages
    if cfg.xi_schedule == "linear":
        values = np.linspace(lo, hi, n)
    elif cfg.xi_schedule == "log_linear":
        values = np.log(np.linspace(np.exp(lo), np.exp(hi), n))
    else:  # exp_linear
        values = np.exp(np.linspace(np.log(lo), np.log(hi), n))
    return [float(v) for v in values]


def xi_at(cfg: SoRAConfig, step: int) -> float:
    """ξ_t of optimizer step ``step`` (0-based): stage step // xi_stage_steps, the last one held."""
    values = xi_values(cfg)
    stage = 0 if cfg.xi_stage_steps is None else step // cfg.xi_stage_steps
    return values[min(stage, len(values) - 1)]


def cut_step(cfg: SoRAConfig, total_steps: int) -> int:
    """The 0-based optimizer step after which the gates are cut to ``target_params``."""
    return total_steps - steps_from(cfg.final_steps, total_steps, "method.final_steps") - 1


def soft_threshold_(g: torch.Tensor, threshold: float) -> torch.Tensor:
    """g <- sign(g) max(|g| - threshold, 0) in place: the proximal map of threshold ||g||_1."""
    return g.copy_(torch.sign(g) * (g.abs() - threshold).clamp_min_(0))


class SoRALinear(LoRALinear):
    """y = W0 x + b + s B diag(g) A x; g (r,) ~ N(0, 1) as the authors' ``torch.randn(1, r)``
    (B is zero, so the layer starts as the base layer whatever g is)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, r, scaling, dropout)
        self.gate = nn.Parameter(torch.randn(r, device=self.A.device, dtype=self.A.dtype))  # (r,)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A, self.B * self.gate  # (r, in), (out, r)

    def kept_rank(self) -> int:
        return int(torch.count_nonzero(self.gate))

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept components only: (A[keep], s B[:, keep] g[keep]), keep = nonzero gates."""
        keep = self.gate.nonzero().squeeze(1)
        return self.A[keep], self.B[:, keep] * (self.gate[keep] * self.scaling)


def component_cost(layer) -> int:
    """Parameters of one component (a row of A, a column of B, one gate entry): in + out + 1."""
    return layer.in_features + layer.out_features + 1


def as_lora(cfg: SoRAConfig) -> lora.LoRAConfig:
    return lora.LoRAConfig(
        target_modules=cfg.target_modules, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, layers=cfg.layers
    )


def apply(model: nn.Module, cfg: SoRAConfig, layers: list[int] | None = None) -> dict[str, SoRALinear]:
    return lora.apply(model, as_lora(cfg), layers, layer_cls=SoRALinear)


def count(cfg: SoRAConfig, arch, layers: list[int] | None = None) -> int:
    """r_max (in + out + 1) per adapted matrix (A, B and the gate)."""
    layers = layers if layers is not None else cfg.layers
    patterns = cfg.target_modules or arch.default_targets()
    matched = arch.match_linears(patterns, layers)
    total = sum(cfg.r * component_cost(s) for _, s in matched)
    if cfg.target_params is not None and total <= cfg.target_params:
        raise ConfigError(
            f"method.target_params={cfg.target_params}: SoRA at r_max={cfg.r} holds only {total} "
            "parameters, so the cut would keep everything; raise method.r or lower method.target_params"
        )
    return total


def merge(model: nn.Module, modules: dict) -> None:
    """W0 += s B diag(g) A (lora.merge on the gated factors), then put the base layer back."""
    lora.merge(model, {n: m for n, m in modules.items() if isinstance(m, SoRALinear)})


def cut_to(layers: dict[str, SoRALinear], target: int) -> int:
    """Zero the gate entries of smallest |g| (over all layers; ties by module name and index)
    until the kept components' parameters are <= ``target``; returns how many were cut."""
    entries = []  # (|g|, name, index, cost) of every nonzero gate entry
    kept = 0
    for name, layer in sorted(layers.items()):
        cost = component_cost(layer)
        for i in layer.gate.detach().nonzero().squeeze(1).tolist():
            entries.append((abs(float(layer.gate.detach()[i])), name, i, cost))
            kept += cost
    entries.sort()
    cut = 0
    with torch.no_grad():
        for _, name, i, cost in entries:
            if kept <= target:
                break
            layers[name].gate[i] = 0.0
            kept -= cost
            cut += 1
    return cut


class SoRAHooks(MethodHooks):
    """The loop's side of SoRA: the proximal step after each optimizer step, the final cut, the
    ranks the gates keep."""

    def __init__(self, layers: dict[str, SoRALinear], cfg: SoRAConfig):
        self.layers = layers
        self.cfg = cfg
        self.total_steps: int | None = None
        self.cut: int | None = None  # gate entries cut at the level (None: not yet)
        self.reported: dict[str, int] | None = None  # the ranks of the last ranks.jsonl row
        self.zero: dict[SoRALinear, torch.Tensor] = {}  # after the cut: the entries held at 0
        self._take_zeros_before_step = False

    def start(self, total_steps: int) -> None:
        self.total_steps = total_steps

    def _lr(self, optimizer) -> float:
        """η_t: the learning rate of the gates' parameter group now (1 without an optimizer)."""
        gate = next(iter(self.layers.values())).gate
        for group in optimizer.param_groups if optimizer is not None else ():
            if any(p is gate for p in group["params"]):
                return group["lr"]
        return 1.0

    @torch.no_grad()
    def after_step(self, step: int, optimizer) -> None:
        threshold = xi_at(self.cfg, step) * (self._lr(optimizer) if self.cfg.xi_times_lr else 1.0)
        for layer in self.layers.values():
            if self.cut is not None:  # after the cut a gate at 0 stays 0: no regrowth past the level
                layer.gate.masked_fill_(self.zero[layer], 0.0)
            if threshold > 0:
                soft_threshold_(layer.gate, threshold)
        if (
            self.cfg.target_params is not None
            and self.cut is None
            and self.total_steps is not None
            and step == cut_step(self.cfg, self.total_steps)
        ):
            self.cut = cut_to(self.layers, self.cfg.target_params)
        if self.cut is not None:
            self._take_zeros()

    def _take_zeros(self) -> None:
        """The gate entries at 0 now, held there from the next step on (a resumed run takes them
        from the gates it loads: the same entries)."""
        self.zero = {layer: layer.gate.detach() == 0 for layer in self.layers.values()}

    def kept(self) -> dict:
        ranks = {n: m.kept_rank() for n, m in self.layers.items()}
        return {
            "ranks": ranks,
            "kept_params": sum(r * component_cost(self.layers[n]) for n, r in ranks.items()),
        }

    def allocation(self, step: int) -> dict | None:
        """A ranks.jsonl row at step 0 and whenever a gate entry reached 0 (the cut: ``final``)."""
        kept = self.kept()
        if step > 0 and kept["ranks"] == self.reported:
            return None
        self.reported = kept["ranks"]
        return {
            "step": step,
            "budget": self.cfg.target_params,
            "kept": sum(kept["ranks"].values()),
            "kept_params": kept["kept_params"],
            "final": self.cut is not None,
            "ranks": kept["ranks"],
        }

    def state_dict(self) -> dict:
        return {"cut": self.cut, "reported": self.reported}

    def load_state_dict(self, state: dict) -> None:
        self.cut, self.reported = state.get("cut"), state.get("reported")
        # the trainable state (the gates) is loaded after the hooks: the zeros are taken before the
        # next step
        self._take_zeros_before_step = self.cut is not None

    def before_step(self, step: int) -> None:
        if self._take_zeros_before_step:
            self._take_zeros()
            self._take_zeros_before_step = False

    def final(self, evaluate) -> dict:
        return {"sora": kept_with_cut(self.kept(), self.cfg.target_params, self.cut)}


def hooks(model: nn.Module, modules: dict, cfg: SoRAConfig) -> SoRAHooks:
    return SoRAHooks({n: m for n, m in modules.items() if isinstance(m, SoRALinear)}, cfg)
