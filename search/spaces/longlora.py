"""LongLoRA's own design choices as a space (Chen et al., ICLR 2024)."""

from __future__ import annotations

from adabudget.config import ConfigError
from adabudget.methods import REGISTRY, closest_size
from adabudget.search.spaces.context import (
    SpaceContext,
    size_choices,
)

LONGLORA_GROUP_FRACTIONS = (8, 4, 2)  # G = N/8, N/4 (the paper's G = N/4), N/2 of data.max_length


def longlora_space(trial, ctx: SpaceContext) -> dict:
    """LongLoRA's own design choices (Chen et al., ICLR 2024; the axes of its ablations), for
    LLaMA-family models: the S²-Attn group size G as a fraction of ``data.max_length``
    (``longlora.group``: N/8, N/4 as in the paper, or N/2; even, at least 2), whether the
    embedding table and the norms train (``longlora.train_embeddings`` / ``train_norms``, the
    paper's LoRA+), and LoRA's rank: with ``search.budget``, sized to what the budget leaves
    after the embeddings and norms (a choice whose embeddings alone exceed the budget is
    infeasible, not trained); without one, from ``SIZES["lora"]``.
    """
    from adabudget.methods import longlora

    probe = longlora.LongLoRAConfig()
    try:
        longlora._check_arch(probe, ctx.arch, None)
    except ConfigError as err:
        raise ConfigError(f"search.space=longlora: {err}") from None
    n = ctx.max_length or 64
    fraction = trial.suggest_categorical("longlora.group", list(LONGLORA_GROUP_FRACTIONS))
    group = max(2, (n // fraction) // 2 * 2)
    knobs = dict(ctx.knobs.get("longlora", {}))
    knobs.update(
        name="longlora",
        group_size=group,
        train_embeddings=trial.suggest_categorical("longlora.train_embeddings", [True, False]),
        train_norms=trial.suggest_categorical("longlora.train_norms", [True, False]),
    )
    if ctx.budget is None:
        knobs["r"] = trial.suggest_categorical("longlora.r", size_choices("lora", ctx))
    else:
        knobs["r"] = closest_size(REGISTRY["longlora"].config(**knobs), ctx.arch, ctx.budget)
    return {"method": knobs}
