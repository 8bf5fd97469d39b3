"""Checks of a run config against the loaded backbone, before the run folder exists.

``adabudget.config.validate`` checks what a config decides alone; these checks need the model's
HF config and module names. ``adabudget.training`` calls :func:`check_against_model` as soon as the
model and the method plan exist, before any module is wrapped, any run folder is claimed or
any step is taken, so a refused run leaves nothing behind.
"""

from __future__ import annotations

import re

from adabudget.config import ConfigError, RunConfig
from adabudget.modules import block_index, is_head, is_linear, model_type
from torch import nn


def check_against_model(run: RunConfig, model: nn.Module, plan) -> None:
    """Raise ConfigError when ``run`` cannot work on ``model`` (``plan``: ``adabudget.methods.plan_of``)."""
    check_max_length(run.data.max_length, model.config)
    for group in plan.groups:
        for name, cfg in group.methods.items():
            patterns = getattr(cfg, "target_modules", None)
            if not patterns:  # the architecture's defaults
                continue
            single = len(plan.groups) == 1 and group.layers is None
            where = "method" if single else f"method.groups[{group.index}].{name}"
            layers = group.layers if group.layers is not None else getattr(cfg, "layers", None)
            check_target_patterns(model, list(patterns), f"{where}.target_modules", layers)


def check_max_length(max_length: int, config) -> None:
    """``data.max_length`` must fit the model's absolute position table (BERT's 512): a longer
    tokenized example indexes past it, which fails only at the first long batch."""
    from adabudget.methods.prompt import position_limit

    limit = position_limit(config)
    if limit is not None and max_length > limit:
        raise ConfigError(
            f"data.max_length={max_length}: this {getattr(config, 'model_type', 'model')} has an absolute "
            f"position table of {limit} positions; set data.max_length <= {limit}"
        )


def check_target_patterns(model: nn.Module, patterns: list[str], field_name: str, layers=None) -> None:
    """Every pattern must match a linear layer (the candidates of ``adabudget.modules.find_targets``).

    A pattern that matches nothing beside others that match would be dropped without a word,
    and with it its matrices: a smaller adapter and, for AdaLoRA, a smaller final budget b(T).
    When none matches, ``find_targets`` itself says so when the method is applied.
    """
    names = [
        name
        for name, module in model.named_modules()
        if name
        and is_linear(module)
        and not is_head(name)
        and (layers is None or block_index(name) in layers)
    ]
    unmatched = [p for p in patterns if not any(re.fullmatch(rf"(.*\.)?(?:{p})", n) for n in names)]
    if unmatched and len(unmatched) < len(patterns):
        endings = sorted({n.split(".")[-1] for n in names})
        in_layers = f" in blocks {list(layers)}" if layers is not None else ""
        raise ConfigError(
            f"{field_name}: {unmatched} match no linear layer of this "
            f"{model_type(model) or 'model'}{in_layers} (the other patterns do), so those matrices would be "
            f"left out; fix or remove them (its linear layer names end in {endings}; a pattern is a regex "
            "matched against the end of a module name)"
        )
