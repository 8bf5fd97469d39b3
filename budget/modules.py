"""The module tree of a backbone: which modules are linear layers, heads and blocks, and how a
method finds and replaces the ones it wraps.

``find_targets`` turns ``target_modules`` patterns (defaults: ``adabudget.arch.DEFAULT_TARGETS``)
into the linear layers a method wraps; ``set_module`` puts a wrapper in place; ``base_linear``
finds the frozen linear inside one.
"""

from __future__ import annotations

import re

from adabudget.arch import DEFAULT_TARGETS
from adabudget.config import ConfigError
from torch import nn

# Freshly initialised task heads; trained (not adapted) when model.train_head is set.
HEAD_NAMES = ("classifier", "score")


def is_head(name: str) -> bool:
    """A parameter or module of the task head: ``classifier`` / ``score``, and DeBERTa's
    top-level ``pooler`` (its ContextPooler is new, unlike BERT's pretrained ``bert.pooler``)."""
    parts = name.split(".")
    return any(h in parts for h in HEAD_NAMES) or parts[0] == "pooler"


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or ""


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or HF's Conv1D (GPT-2, weight stored as (in, out))."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a linear layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    in_f, out_f = module.weight.shape  # Conv1D
    return in_f, out_f, True


def resolve_targets(model: nn.Module, patterns: list[str] | None, field_name: str) -> list[str]:
    if patterns:
        return list(patterns)
    mtype = model_type(model)
    if mtype not in DEFAULT_TARGETS:
        raise ConfigError(
            f"{field_name}: no default target modules for model_type '{mtype}'; "
            f"set {field_name}=[...] (module-name patterns), defaults exist for {sorted(DEFAULT_TARGETS)}"
        )
    return DEFAULT_TARGETS[mtype]


def find_targets(model: nn.Module, patterns: list[str], field_name: str, layers: list[int] | None = None):
    """Linear layers whose names end in one of ``patterns`` (regex suffixes), heads excluded.

    ``layers`` restricts to transformer blocks with those indices. Raises ConfigError
    naming ``field_name`` when nothing matches.
    """
    regexes = [re.compile(rf"(.*\.)?(?:{p})") for p in patterns]
    if layers is not None:
        blocks = {block_index(name) for name, _ in model.named_modules()} - {None}
        bad = [i for i in layers if i not in blocks]
        if bad:
            raise ConfigError(
                f"method.layers: block indices {bad} out of range for this {model_type(model) or 'model'} "
                f"with {len(blocks)} blocks; use indices in [0, {max(blocks, default=0)}]"
            )
    found = []
    for name, module in model.named_modules():
        if not name or not is_linear(module) or is_head(name):
            continue
        if not any(r.fullmatch(name) for r in regexes):
            continue
        if layers is not None and block_index(name) not in layers:
            continue
        found.append(name)
    if not found:
        linear_names = sorted({n.split(".")[-1] for n, m in model.named_modules() if n and is_linear(m)})
        raise ConfigError(
            f"{field_name}={patterns} matches no linear layer of this {model_type(model) or 'model'}; "
            f"its linear layer names end in {linear_names}"
        )
    return found


_BLOCK = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def block_index(name: str) -> int | None:
    m = _BLOCK.search("." + name + ".")
    return int(m.group(1)) if m else None


def base_linear(module: nn.Module) -> nn.Module:
    """The frozen linear inside LoRA / AdaLoRA wrappers (their ``.base``), or ``module`` itself."""
    while isinstance(getattr(module, "base", None), nn.Module):
        module = module.base
    return module


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze_backbone(model: nn.Module, train_head: bool) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(train_head and is_head(name))


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
