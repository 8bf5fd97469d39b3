"""One method of the seed families at the budget, the method itself the choice."""

from __future__ import annotations

import math

from adabudget.config import ConfigError
from adabudget.methods import REGISTRY, closest_size
from adabudget.methods.hybrid import ORDER
from adabudget.search.spaces.context import (
    ADALORA_INIT_RATIO,
    SIZES,
    SpaceContext,
    knobs_at,
    size_choices,
    unit_cost,
)

# The single methods of the ``methods`` space: the registry's methods that name it in their
# ``spaces``, in its order. LongLoRA is not a budget alternative (a long-context training recipe for
# LLaMA: LoRA plus embeddings and norms; its own axes are the ``longlora`` space) and QLoRA is a
# property of the base (``model.quantize``), so neither is a choice here.
SINGLE_METHODS = tuple(name for name, method in REGISTRY.items() if "methods" in method.spaces)

SINGLE_SIZES = {
    "dylora": (4, 8, 16),
    "delta_lora": (2, 4, 8, 16),
    "rosa": (2, 4, 8, 16),
    "quantum_peft": (2, 4, 8, 16),
    "sparse": (0.001, 0.003, 0.01),
    "sora": (4, 8, 16),  # r_max (no level: the gates' proximal step alone sets the final size)
    "increlora": (8, 16),  # max_rank (the default budget: average rank 8)
    "geolora": (8, 16, 32),  # r_max (no level: τ's truncations alone set the final size)
}


def methods_space(trial, ctx: SpaceContext) -> dict:
    """One method at the budget, the method the choice (``method``): each applicable one of
    ``SINGLE_METHODS``, sized to ``search.budget`` through its own knob (the closest count: LoRA's
    and Delta-LoRA's r, DyLoRA's r_max, Quantum-PEFT's r, adapter bottlenecks, prefix length;
    AdaLoRA's ``target_params`` at init_r = 1.5 x its rank; sparse fine-tuning's ``budget``
    exactly; RoSA splits the budget, ``rosa.sparse_share`` in [0.1, 0.9] of it in its sparse part
    and the rest in LoRA's rank). Quantum-PEFT also draws its parameterisation
    (``quantum_peft.unitary``: the Pauli circuit's few angles or the Lie-algebra chart, whose count
    grows like LoRA's). A method whose count cannot come near the budget (Quantum-PEFT's Pauli
    angles, (IA)³'s fixed size) is infeasible at that budget, not trained. Without a budget,
    a size from ``SIZES`` / ``SINGLE_SIZES`` (sparse: a density).
    """
    arch = ctx.arch
    lora_like = "lora" in ctx.applicable
    # the group methods where they apply; the others wrap the same linears as LoRA
    choices = [m for m in SINGLE_METHODS if (m in ctx.applicable if m in ORDER else lora_like)]
    if not choices:
        raise ConfigError(
            f"search.space=methods: no method applies to this {arch.model_type}: {ctx.excluded}"
        )
    name = trial.suggest_categorical("method", choices)
    knobs = dict(ctx.knobs.get(name, {}))
    if name == "ia3":
        return {"method": {"name": "ia3", **knobs}}
    if name == "quantum_peft":  # Pauli: log2 N angles per side; Lie: N K - K(K+1)/2, LoRA's scale
        knobs["unitary"] = trial.suggest_categorical("quantum_peft.unitary", ["pauli", "lie"])
    if ctx.budget is None:
        if name == "sparse":
            knobs["density"] = trial.suggest_categorical("sparse.density", list(SINGLE_SIZES["sparse"]))
        elif name == "rosa":
            knobs["r"] = trial.suggest_categorical("rosa.r", list(SINGLE_SIZES["rosa"]))
        elif name == "adalora":
            knobs.update(
                knobs_at("adalora", trial.suggest_categorical("adalora.size", list(SIZES["adalora"])), ctx)
            )
        else:
            sizes = SINGLE_SIZES.get(name) or size_choices(name, ctx)
            knobs[REGISTRY[name].size] = trial.suggest_categorical(f"{name}.size", list(sizes))
        return {"method": {"name": name, **knobs}}
    if name == "sparse":
        knobs["budget"] = ctx.budget
    elif name == "adalora":
        per_rank = unit_cost("adalora", {}, arch, None)
        knobs.update(
            init_r=max(1, math.ceil(ADALORA_INIT_RATIO * ctx.budget / per_rank)), target_params=ctx.budget
        )
    elif name in ("sora", "increlora"):  # start above (SoRA) or below (IncreLoRA) the level, end at it
        per_rank = unit_cost("adalora", {}, arch, None)  # a component costs in + out + 1, as a triplet
        if name == "sora":
            knobs["r"] = max(1, math.ceil(ADALORA_INIT_RATIO * ctx.budget / per_rank))
        else:
            knobs.update(init_r=1, max_rank=max(2, math.ceil(2 * ctx.budget / per_rank)))
        knobs["target_params"] = ctx.budget
    elif name == "geolora":  # rank free to grow above the level (r_max), the final cut to it
        per_rank = unit_cost("adalora", {}, arch, None)  # a final component costs in + out (+ 1: near)
        r_max = max(2, math.ceil(ADALORA_INIT_RATIO * ctx.budget / per_rank))
        knobs.update(r_max=r_max, init_r=max(2, r_max // 2), min_rank=2, target_params=ctx.budget)
    elif name == "rosa":
        share = trial.suggest_float("rosa.sparse_share", 0.1, 0.9)
        lora_part = REGISTRY["lora"]
        r = closest_size(lora_part.config(), arch, (1 - share) * ctx.budget)
        knobs["r"] = r
        knobs["budget"] = max(1, ctx.budget - lora_part.count(lora_part.config(r=r), arch, None))
    else:
        knobs[REGISTRY[name].size] = closest_size(REGISTRY[name].config(**knobs), arch, ctx.budget)
    return {"method": {"name": name, **knobs}}
