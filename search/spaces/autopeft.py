"""AutoPEFT's space (Zhou et al., TACL 2024)."""

from __future__ import annotations

import copy

from adabudget.methods import REGISTRY
from adabudget.search.spaces.context import (
    SpaceContext,
)


def _reductions(hidden: int) -> list[int]:
    """0 (absent) and h / 2^k for k = 0, 1, ... while >= 1: AutoPEFT's log2 reductions."""
    sizes, k = [], 0
    while hidden >> k >= 1:
        sizes.append(hidden >> k)
        k += 1
    return [0, *sorted(set(sizes))]


def autopeft_space(trial, ctx: SpaceContext) -> dict:
    """AutoPEFT (Zhou et al., TACL 2024): per-layer on/off and three module sizes shared by all layers.

    ``layer<i>`` switches block i on; ``serial_adapter`` (an adapter after the FFN output, as
    AutoPEFT's adapter-transformers setup inserts it), ``parallel_adapter`` (beside the FFN,
    scaled) and ``prefix_length`` each take 0 (absent) or h / 2^k, as the log2 reductions of
    cambridgeltl/autopeft's search space. Modules that do not apply to the architecture are
    left out (prefix on DeBERTa). One group per layer (grouping uniform); with a budget the
    sizes are proportions, solved with the budget shared evenly over the layers that are on.
    """
    arch = ctx.arch
    on: list[bool] = []
    for i in range(arch.num_layers):
        if i == arch.num_layers - 1 and not any(on):
            on.append(True)  # no layer on would train nothing
        else:
            on.append(trial.suggest_categorical(f"layer{i}", [True, False]))
    choices = _reductions(arch.hidden)
    module: dict = {}
    for param, name, knobs in (
        ("serial_adapter", "adapter", {"placement": "pfeiffer"}),
        ("parallel_adapter", "parallel_adapter", {"position": "ffn"}),
        ("prefix_length", "prefix", {}),
    ):
        if name in ctx.applicable:
            size = trial.suggest_categorical(param, choices)
            if size:
                module[name] = {**ctx.knobs.get(name, {}), **knobs, REGISTRY[name].size: int(size)}
    groups = [copy.deepcopy(module) if layer_on and module else "none" for layer_on in on]
    method = {
        "name": "hybrid",
        "num_groups": arch.num_layers,
        "grouping": "uniform",
        "allocation": "uniform",
        "groups": groups,
    }
    if ctx.budget is not None:
        method["budget"] = ctx.budget
    return {"method": method}
