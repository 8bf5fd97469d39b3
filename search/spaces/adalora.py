"""AdaLoRA's own knobs as a space (Zhang et al., ICLR 2023)."""

from __future__ import annotations

import math

from adabudget.config import ConfigError
from adabudget.methods.adalora import SCORES
from adabudget.search.spaces.context import (
    SpaceContext,
    unit_cost,
)


def adalora_space(trial, ctx: SpaceContext) -> dict:
    """AdaLoRA's knobs, for the paper's ablations as a search (Zhang et al., ICLR 2023).

    ``init_ratio`` b(0) / b(T) in {1.25, 1.5, 2} (Table 7 uses 1.5). With a budget the target is
    ``target_params`` = the budget and init_r = ceil(ratio x budget / Σ(in + out + 1)); without,
    ``method.init_r`` in {4, 6, 12} (Table 7's initial ranks) and target_r = init_r / ratio.
    t_i / T in [0.05, 0.3] and t_f / T in [0.1, 0.55] (so t_i + t_f <= 0.85; Table 8 spans
    0.09-0.15 and 0.27-0.58), ΔT in {1, 10, 100} (Table 8), γ in {0.1, 0.3, 0.5}, and the
    importance score of Tables 4-5.
    """
    if "adalora" not in ctx.applicable:
        raise ConfigError(f"search.space=adalora: AdaLoRA does not apply here: {ctx.excluded.get('adalora')}")
    ratio = trial.suggest_categorical("init_ratio", [1.25, 1.5, 2.0])
    method: dict = {"name": "adalora"}
    if ctx.budget is not None:
        per_rank = unit_cost("adalora", {}, ctx.arch, None)
        method["init_r"] = max(1, math.ceil(ratio * ctx.budget / per_rank))
        method["target_params"] = ctx.budget
    else:
        init_r = trial.suggest_categorical("method.init_r", [4, 6, 12])
        method["init_r"] = init_r
        method["target_r"] = init_r / ratio
    method["warmup_steps"] = trial.suggest_float("method.warmup_steps", 0.05, 0.3)  # t_i / T
    method["final_steps"] = trial.suggest_float("method.final_steps", 0.1, 0.55)  # t_f / T
    method["mask_interval"] = trial.suggest_categorical("method.mask_interval", [1, 10, 100])  # ΔT
    method["orth_reg_weight"] = trial.suggest_categorical("method.orth_reg_weight", [0.1, 0.3, 0.5])  # γ
    method["score"] = trial.suggest_categorical("method.score", list(SCORES))
    return {"method": method}
