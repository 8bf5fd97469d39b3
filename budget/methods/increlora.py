"""IncreLoRA (Zhang et al., 2023, "IncreLoRA: Incremental Parameter Allocation Method for
Parameter-Efficient Fine-tuning"): AdaLoRA's SVD form W = W0 + s P diag(λ) Q, but the ranks grow
instead of shrinking. Every matrix starts at ``init_r`` components; every ΔT steps after t_i the
``top_h`` matrices of highest importance (AdaLoRA's smoothed sensitivity times its uncertainty,
Ī·Ū, per matrix) gain ``rank_step`` components each, until the budget b(T) is spent; never beyond
it. With ``reserve`` (the paper's "advance learning") each matrix also trains its next components
ahead of time at a fixed tiny λ, so that a component starts from trained P, Q when it is added.

The layers hold ``max_rank`` components from the start (fixed shapes: the optimizer, checkpoints
and resume stay as they are) and compute with their first ``active`` (+ reserved) ones; the rest
take no part in the forward. The final adapter is a LoRA of the active ranks (A = Q, B = s P Λ):
the peft export and the merge are LoRA's. What was read of the authors' code and where this
departs: docs/methods.md#increlora.

Invariants:

- ``count`` is what ``apply`` builds (max_rank (in + out + 1) per matrix); the final adapter
  parameters are ``kept()["kept_params"]`` = Σ r_i (in + out + 1) over the active ranks r_i.
- The budget in its units (ranks, or parameters with ``target_params``) is never exceeded: a
  matrix grows by at most what is left.
- A matrix grows only at the steps t > t_i with t % ΔT == 0 (t counted after the optimizer step).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
from adabudget.config import ConfigError, checker
from adabudget.methods import lora
from adabudget.methods.hooks import MethodHooks, restore_ranks
from adabudget.methods.lora import LoRALinear
from adabudget.modules import find_targets, resolve_targets, set_module
from adabudget.schedule import steps_from
from torch import nn

log = logging.getLogger(__name__)
RESERVE_LAMBDA = 1e-5  # λ of a reserved component (the authors' add_reserve_param: e = 1e-5)


@dataclass
class IncreLoRAConfig:
    """IncreLoRA knobs; the paper symbol in each comment.

    Worked example (defaults, 36 matrices): b(0) = 1 x 36 = 36 ranks, b(T) = 8 x 36 = 288. From
    t_i = 10% of T, every ΔT = 10 steps the top_h = 10 matrices gain rank_step = 4 components
    each (40 ranks a round), so the budget is spent after ceil(252 / 40) = 7 rounds, 70 steps
    after t_i; the last round gives out only the 12 ranks left. No matrix exceeds max_rank = 16.
    """

    name: str = "increlora"
    target_modules: Optional[list] = None  # regex name suffixes; None = architecture default
    init_r: int = 1  # initial rank of every matrix (the authors' lora_r); b(0) = init_r x #matrices
    target_r: float = 8.0  # average final rank per matrix: b(T) = target_r x #matrices
    target_total_rank: Optional[int] = None  # b(T) as a total rank instead of target_r
    target_params: Optional[int] = None  # b(T) as adapter parameters (a component costs out + in + 1)
    max_rank: int = 16  # components each matrix holds (its rank cap); the built size
    rank_step: int = 4  # components added to a chosen matrix (incre_rank_num; the authors: target_r / 2)
    top_h: int = 10  # h: matrices chosen per round
    warmup_steps: float = 0.1  # t_i: steps (>= 1) or fraction of T (< 1) before the first round
    mask_interval: int = 10  # ΔT: steps between two rounds (incre_interval)
    beta1: float = 0.85  # β1: EMA of sensitivity
    beta2: float = 0.85  # β2: EMA of uncertainty
    reserve: bool = True  # advance learning: the next rank_step components train ahead at λ = 1e-5
    alpha: Optional[float] = None  # s = alpha / init_r, fixed; None = 2 x init_r (s = 2, AdaLoRA's)
    # λ enters as c λ̃ with c = this ratio: Adam's steps on λ̃ move λ c times faster, AdaLoRA's
    # lambda_lr_ratio without a parameter group of its own (λ starts at 0, as AdaLoRA's)
    lambda_lr_ratio: float = 64.0
    dropout: float = 0.0
    layers: Optional[list] = None  # restrict to these block indices (None = all)

    def validate(self) -> None:
        check = checker("method")
        check(self.init_r >= 1, "init_r", f"must be >= 1, got {self.init_r}")
        check(
            self.max_rank > self.init_r,
            "max_rank",
            f"must be > init_r={self.init_r} (room to grow), got {self.max_rank}",
        )
        n_targets = sum(v is not None for v in (self.target_total_rank, self.target_params))
        check(n_targets <= 1, "target_total_rank", "set at most one of target_total_rank and target_params")
        if n_targets == 0:
            check(
                self.init_r < self.target_r <= self.max_rank,
                "target_r",
                f"the final average rank must be in (init_r={self.init_r}, max_rank={self.max_rank}], "
                f"got {self.target_r}; raise method.target_r or lower method.init_r",
            )
        check(self.rank_step >= 1, "rank_step", f"must be >= 1, got {self.rank_step}")
        check(self.top_h >= 1, "top_h", f"must be >= 1, got {self.top_h}")
        check(self.mask_interval >= 1, "mask_interval", f"ΔT must be >= 1, got {self.mask_interval}")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0 (steps, or a fraction of T below 1)")
        check(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
        check(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")
        check(self.lambda_lr_ratio > 0, "lambda_lr_ratio", "must be > 0 (1 = same lr as P and Q)")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")

    def validate_steps(self, total_steps: int) -> None:
        """A round must fall within the run: t_i + ΔT <= T."""
        t_i = steps_from(self.warmup_steps, total_steps, "method.warmup_steps")
        if first_round(t_i, self.mask_interval) > total_steps:
            raise ConfigError(
                f"method.warmup_steps: t_i={t_i} and ΔT={self.mask_interval} leave no round of growth "
                f"within T={total_steps} steps; lower method.warmup_steps or method.mask_interval, or "
                "train longer"
            )


def first_round(t_i: int, interval: int) -> int:
    """The first step t (counted after the optimizer step) with t > t_i and t % ΔT == 0."""
    return (t_i // interval + 1) * interval


def grows_at(t: int, t_i: int, interval: int) -> bool:
    """A round of growth after optimizer step t (1-based): t > t_i and t % ΔT == 0 (the authors'
    ``global_step > init_warmup and global_step % incre_interval == 0``)."""
    return t > t_i and t % interval == 0


class IncreLoRALinear(LoRALinear):
    """y = W0 x + b + s P[:, :n] diag(c λ̃[:n]) Q[:n] x with n = active + reserved components.

    A holds Q (max_rank, in) with orthonormal rows, B holds P (out, max_rank) with orthonormal
    columns (our SVDLinear's init: λ are then true singular values of ΔW / s, and a component
    added later is orthogonal to the ones before it); λ̃ starts at 0, so the layer starts as the
    base layer.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        *,
        init_r: int,
        lambda_scale: float,
    ):
        super().__init__(base, r, scaling, dropout)
        with torch.no_grad():
            nn.init.orthogonal_(self.A)  # Q (r, in)
            nn.init.orthogonal_(self.B)  # P (out, r)
        self.lam = nn.Parameter(torch.zeros(r, device=self.A.device, dtype=self.A.dtype))  # λ̃ (r,)
        self.lambda_scale = lambda_scale  # c
        self.active = init_r  # components in the adapter
        self.reserved = 0  # components after them trained ahead at λ = RESERVE_LAMBDA

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.active + self.reserved
        return self.A[:n], self.B[:, :n] * (self.lambda_scale * self.lam[:n])  # (n, in), (out, n)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.active}/{self.rank}"


def component_cost(layer) -> int:
    """Parameters of one component (a column of P, one λ, a row of Q): in + out + 1."""
    return layer.in_features + layer.out_features + 1


def scaling_of(cfg: IncreLoRAConfig) -> float:
    return (cfg.alpha if cfg.alpha is not None else 2.0 * cfg.init_r) / cfg.init_r


def apply(model: nn.Module, cfg: IncreLoRAConfig, layers: list[int] | None = None) -> dict:
    layers = layers if layers is not None else cfg.layers
    patterns = resolve_targets(model, cfg.target_modules, "method.target_modules")
    wrapped = {}
    for name in find_targets(model, patterns, "method.target_modules", layers):
        base = model.get_submodule(name)
        base.weight.requires_grad_(False)
        wrapped[name] = IncreLoRALinear(
            base,
            cfg.max_rank,
            scaling_of(cfg),
            cfg.dropout,
            init_r=cfg.init_r,
            lambda_scale=cfg.lambda_lr_ratio,
        )
        set_module(model, name, wrapped[name])
    return wrapped


def budget_of(cfg: IncreLoRAConfig, shapes: list) -> tuple[list[int], int, int]:
    """(cost of a component of each matrix in budget units, b(0), b(T)); ConfigError unless
    b(0) < b(T) <= what max_rank holds. ``shapes``: anything with in_features / out_features."""
    if not shapes:
        raise ConfigError("method.target_modules: IncreLoRA matches no linear layer here")
    by_params = cfg.target_params is not None
    costs = [component_cost(s) if by_params else 1 for s in shapes]
    initial, ceiling = cfg.init_r * sum(costs), cfg.max_rank * sum(costs)
    if by_params:
        target, field = int(cfg.target_params), "method.target_params"
    elif cfg.target_total_rank is not None:
        target, field = int(cfg.target_total_rank), "method.target_total_rank"
    else:
        target, field = int(round(cfg.target_r * len(shapes))), "method.target_r"
    if not initial < target <= ceiling:
        raise ConfigError(
            f"{field}: the final budget b(T)={target} must be above the initial b(0)={initial} "
            f"({len(shapes)} matrices x init_r={cfg.init_r}) and at most {ceiling} (x max_rank="
            f"{cfg.max_rank}); change the target, method.init_r or method.max_rank"
        )
    return costs, initial, target


def count(cfg: IncreLoRAConfig, arch, layers: list[int] | None = None) -> int:
    """max_rank (in + out + 1) per adapted matrix (P, λ, Q at full capacity)."""
    layers = layers if layers is not None else cfg.layers
    patterns = cfg.target_modules or arch.default_targets()
    shapes = [s for _, s in arch.match_linears(patterns, layers)]
    budget_of(cfg, shapes)
    return sum(cfg.max_rank * component_cost(s) for s in shapes)


def merge(model: nn.Module, modules: dict) -> None:
    """W0 += s P Λ Q over the components in use (lora.merge), then put the base layer back."""
    lora.merge(model, {n: m for n, m in modules.items() if isinstance(m, IncreLoRALinear)})


class IncreLoRAHooks(MethodHooks):
    """The loop's side of IncreLoRA: importance EMAs per matrix, the rounds of growth, the
    reserved components, the ranks for ranks.jsonl."""

    def __init__(self, layers: dict[str, IncreLoRALinear], cfg: IncreLoRAConfig):
        self.names = sorted(layers)
        self.layers = [layers[n] for n in self.names]
        self.cfg = cfg
        self.costs, self.initial, self.target = budget_of(cfg, self.layers) if layers else ([], 0, 0)
        self.spent = sum(c * m.active for c, m in zip(self.costs, self.layers))  # in budget units
        self.ipt = torch.zeros(len(self.layers))  # Ī per matrix
        self.unc = torch.zeros(len(self.layers))  # Ū per matrix
        self.growing = bool(layers)
        self.t_i: int | None = None
        self.total_steps: int | None = None
        self.reported: list[int] | None = None
        for layer in self.layers:  # only the active λ learn; a reserved λ stays at 1e-5
            layer.lam.register_hook(self._mask_lambda(layer))

    @staticmethod
    def _mask_lambda(layer: IncreLoRALinear):
        def mask(grad: torch.Tensor) -> torch.Tensor:
            return grad * (torch.arange(grad.numel(), device=grad.device) < layer.active).to(grad.dtype)

        return mask

    def start(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.t_i = steps_from(self.cfg.warmup_steps, total_steps, "method.warmup_steps")
        self._reserve()

    @torch.no_grad()
    def _reserve(self) -> None:
        """Set the reserved components (the next rank_step after the active ones) while growing."""
        for layer in self.layers:
            n = min(self.cfg.rank_step, layer.rank - layer.active) if self.growing and self.cfg.reserve else 0
            layer.lam[layer.active :].zero_()
            layer.lam[layer.active : layer.active + n] = RESERVE_LAMBDA / layer.lambda_scale
            layer.reserved = n

    @torch.no_grad()
    def _update_importance(self) -> None:
        """s = Σ |θ ∂L/∂θ| over the active P, λ, Q of a matrix / sqrt(out in); Ī, Ū its EMAs."""
        scores = torch.zeros(len(self.layers))
        for i, layer in enumerate(self.layers):
            n, total = layer.active, 0.0
            for p, part in ((layer.A, layer.A[:n]), (layer.B, layer.B[:, :n]), (layer.lam, layer.lam[:n])):
                if p.grad is None:
                    continue
                g = p.grad[:n] if p is not layer.B else p.grad[:, :n]
                total += float((part * g).abs().sum())
            scores[i] = total / math.sqrt(layer.in_features * layer.out_features)
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        self.ipt.mul_(b1).add_(scores, alpha=1 - b1)
        self.unc.mul_(b2).add_((scores - self.ipt).abs(), alpha=1 - b2)

    def _can_grow(self, i: int) -> bool:
        return self.layers[i].active < self.layers[i].rank and self.costs[i] <= self.target - self.spent

    @torch.no_grad()
    def grow(self) -> dict[str, int]:
        """One round: the top_h growable matrices by Ī·Ū (ties: module order) gain up to
        rank_step components each, as far as the budget and max_rank allow. Returns {name: added}."""
        score = (self.ipt * self.unc).tolist()
        order = sorted(range(len(self.layers)), key=lambda i: (-score[i], i))
        added = {}
        for i in [i for i in order if self._can_grow(i)][: self.cfg.top_h]:
            layer = self.layers[i]
            k = min(
                self.cfg.rank_step, layer.rank - layer.active, (self.target - self.spent) // self.costs[i]
            )
            if k < 1:
                continue
            # a reserved component keeps its λ = 1e-5 and starts learning; an unreserved one starts at 0
            start = layer.active + min(k, layer.reserved)
            layer.lam[start : layer.active + k].zero_()
            layer.active += k
            self.spent += k * self.costs[i]
            added[self.names[i]] = k
        if not any(self._can_grow(i) for i in range(len(self.layers))):
            self.growing = False  # the budget is spent (or every matrix is full): reserves dropped
        self._reserve()
        return added

    def after_step(self, step: int, optimizer) -> None:
        if not self.growing:
            return
        t = step + 1
        with torch.no_grad():  # a reserved λ is held (weight decay would move it)
            for layer in self.layers:
                layer.lam[layer.active : layer.active + layer.reserved] = RESERVE_LAMBDA / layer.lambda_scale
        self._update_importance()
        if self.t_i is not None and grows_at(t, self.t_i, self.cfg.mask_interval):
            self.grow()
        if self.growing and t == self.total_steps:  # the run ends before the budget is spent
            self.growing = False
            self._reserve()
            log.warning(
                "increlora: T=%d steps spent %d of the budget b(T)=%d; lower method.warmup_steps or "
                "method.mask_interval, raise method.top_h / rank_step, or train longer",
                t,
                self.spent,
                self.target,
            )

    def kept(self) -> dict:
        ranks = {n: m.active for n, m in zip(self.names, self.layers)}
        return {
            "ranks": ranks,
            "kept_params": sum(m.active * component_cost(m) for m in self.layers),
        }

    def allocation(self, step: int) -> dict | None:
        """A ranks.jsonl row at step 0 and after every round that added components."""
        kept = self.kept()
        now = list(kept["ranks"].values())
        if step > 0 and now == self.reported:
            return None
        self.reported = now
        return {
            "step": step,
            "budget": self.target,
            "kept": sum(now),
            "kept_params": kept["kept_params"],
            "final": not self.growing,
            "ranks": kept["ranks"],
        }

    def state_dict(self) -> dict:
        return {
            "ranks": [m.active for m in self.layers],
            "growing": self.growing,
            "ipt": self.ipt.clone(),
            "unc": self.unc.clone(),
            "reported": self.reported,
        }

    def load_state_dict(self, state: dict) -> None:
        restore_ranks("increlora", self.layers, state["ranks"])
        self.spent = sum(c * m.active for c, m in zip(self.costs, self.layers))
        self.growing = bool(state["growing"])
        self.ipt.copy_(state["ipt"])
        self.unc.copy_(state["unc"])
        self.reported = state.get("reported")
        for layer in self.layers:  # the λ of the reserved components come with the trainable state
            layer.reserved = (
                min(self.cfg.rank_step, layer.rank - layer.active) if self.growing and self.cfg.reserve else 0
            )

    def final(self, evaluate) -> dict:
        return {
            "increlora": {
                "kept_params": self.kept()["kept_params"],
                "budget": self.target,
                "spent": self.spent,
                "budget_reached": not any(self._can_grow(i) for i in range(len(self.layers))),
            }
        }


def hooks(model: nn.Module, modules: dict, cfg: IncreLoRAConfig) -> IncreLoRAHooks:
    return IncreLoRAHooks({n: m for n, m in modules.items() if isinstance(m, IncreLoRALinear)}, cfg)
