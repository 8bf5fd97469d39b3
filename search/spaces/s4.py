"""The S4 design space (Chen et al., ICLR 2023)."""

from __future__ import annotations

from adabudget.config import ConfigError
from adabudget.groups import ALLOCATIONS, PATTERNS, allocation_shares, split_layers
from adabudget.methods import REGISTRY
from adabudget.search.spaces.context import (
    SpaceContext,
    expected_sizes,
    knobs_at,
    size_choices,
    unit_cost,
)


def s4_space(trial, ctx: SpaceContext) -> dict:
    """S4 (Chen et al., ICLR 2023): groups, their pattern, strategies per group, and sizes.

    ``num_groups`` in 1..min(4, L); ``grouping`` one of the four patterns; ``g<i>.<method>``
    (True/False) picks each group's subset (a group may stay empty, not all of them; AdaLoRA
    is not offered where LoRA already adapts the group's matrices);
    with a budget, ``allocation`` shares it across groups and ``g<i>.<method>.share`` (0.1..1,
    normalised in the group) gives each method's part of its group's budget, turned into sizes
    through each method's per-unit cost on those layers (the solver then rescales them as
    proportions, one multiplier per group; fixed-size methods, bitfit and ia3, are paid first).
    Without a budget, ``g<i>.<method>.size`` picks an absolute size from ``SIZES``. AdaLoRA
    starts at init_r = 1.5 target_r.
    """
    arch = ctx.arch
    num_groups = trial.suggest_int("num_groups", 1, min(4, arch.num_layers))
    grouping = trial.suggest_categorical("grouping", list(PATTERNS)) if num_groups > 1 else "uniform"
    candidates = [*ctx.methods, *ctx.extra_methods]
    if not candidates:
        raise ConfigError(f"search.space=s4: no S4 method applies to this {arch.model_type}: {ctx.excluded}")
    chosen: list[list[str]] = []
    for g in range(num_groups):
        picked = []
        for m in candidates:
            if m == "prompt" and any("prompt" in c for c in chosen):
                continue  # the soft prompt is model-level: one group at most
            if m == "adalora" and "lora" in picked:
                continue  # both would wrap the same matrices (see _check_wrapping)
            if g == num_groups - 1 and m == candidates[-1] and not picked and not any(chosen):
                picked.append(m)  # every group empty would train nothing: the last choice is made
                continue
            if trial.suggest_categorical(f"g{g}.{m}", [True, False]):
                picked.append(m)
        chosen.append(picked)
    method: dict = {"name": "hybrid", "num_groups": num_groups, "grouping": grouping, "allocation": "uniform"}
    if ctx.budget is not None:
        method["budget"] = ctx.budget
        if num_groups > 1:
            method["allocation"] = trial.suggest_categorical("allocation", list(ALLOCATIONS))
    layers = split_layers(arch.num_layers, num_groups, grouping)
    scalable = [[m for m in picked if REGISTRY[m].size is not None] for picked in chosen]
    if ctx.budget is not None:
        # the solver's split: fixed-size methods first, the rest shared by allocation over the
        # groups that have something to size
        fixed = sum(
            REGISTRY[m].count(REGISTRY[m].config(**ctx.knobs.get(m, {})), arch, layers[g])
            for g, picked in enumerate(chosen)
            for m in picked
            if m not in scalable[g]
        )
        weights = [
            w if scalable[g] else 0.0
            for g, w in enumerate(allocation_shares(num_groups, method["allocation"]))
        ]
        free = max(ctx.budget - fixed, 0)
    groups = []
    for g, picked in enumerate(chosen):
        if ctx.budget is not None and scalable[g]:
            shares = {
                m: trial.suggest_float(f"g{g}.{m}.share", 0.1, 1.0) if len(scalable[g]) > 1 else 1.0
                for m in scalable[g]
            }
            costs = {m: unit_cost(m, ctx.knobs.get(m, {}), arch, layers[g]) for m in scalable[g]}
            sizes = expected_sizes(shares, costs, free * weights[g] / sum(weights))
        else:
            sizes = {
                m: trial.suggest_categorical(f"g{g}.{m}.size", size_choices(m, ctx)) for m in scalable[g]
            }
        groups.append({m: knobs_at(m, sizes.get(m), ctx) for m in picked} or "none")
    method["groups"] = groups
    return {"method": method}
