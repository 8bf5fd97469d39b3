"""What a space may depend on (``SpaceContext``: the backbone, the budget, the methods that apply),
how its overrides merge onto the run config, and the size helpers the built-in spaces share."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import optuna
from adabudget.arch import Arch, arch_from_config
from adabudget.config import ConfigError
from adabudget.methods import REGISTRY
from adabudget.methods.hybrid import ORDER, HybridConfig

Space = Callable[[optuna.Trial, "SpaceContext"], dict]

S4_METHODS = ("adapter", "prefix", "bitfit", "lora", "adalora")  # S4's strategies + AdaLoRA

EXTRA_METHODS = ("ia3", "parallel_adapter", "prompt")  # in s4 groups only when asked

# Knobs that make a method apply where its defaults do not: LLaMA's linears and RMSNorms have
# no bias, so BitFit there trains new zero biases (as configs/method/s4.yaml does).
FALLBACK_KNOBS = {"bitfit": {"add_missing": True}}

HYBRIDS = ("hybrid", "s4")

# Sizes sampled without a budget (absolute) and the AdaLoRA ratio b(0) = 1.5 b(T) (Table 7).
SIZES = {
    "lora": (2, 4, 8, 16),  # r
    "adalora": (2, 4, 8),  # target_r; init_r = 1.5 x target_r
    "adapter": (8, 16, 32, 64),  # bottleneck d
    "parallel_adapter": (16, 32, 64, 128),  # bottleneck d
    "prefix": (5, 10, 20, 40),  # length l
    "prompt": (5, 10, 20),  # length l
}

ADALORA_INIT_RATIO = 1.5


@dataclass
class SpaceContext:
    """What a space may depend on: the backbone, the budget, the methods that apply here.

    Build it with ``SpaceContext.from_model("minilm")`` or ``SpaceContext.from_config(hf_config)``.
    """

    arch: Arch
    hf_config: Any  # the HF PretrainedConfig: count_trainable reads it
    budget: Optional[int] = None  # trainable adapter parameters (task head excluded), or None
    methods: tuple[str, ...] = ()  # the S4 methods that apply to this architecture
    extra_methods: tuple[str, ...] = ()  # the optional ones asked for that apply
    applicable: tuple[str, ...] = ()  # every group method that applies (autopeft reads it)
    knobs: dict = field(default_factory=dict)  # method -> knobs it needs on this backbone
    excluded: dict = field(default_factory=dict)  # method -> why it does not apply here
    # The run's method node: a space that sets method keys without method.name merges onto it.
    method: Optional[dict] = None
    tolerance: float = HybridConfig.tolerance  # |count - budget| <= tolerance x budget
    max_length: Optional[int] = None  # data.max_length, for soft prompts on absolute positions
    supernet: Any = None  # search.supernet (search.config.SupernetConfig): the ``supernet`` space's menus

    @classmethod
    def from_config(
        cls,
        hf_config,
        num_labels: int | None = None,
        *,
        budget: int | None = None,
        budget_percent: float | None = None,
        extra_methods: Iterable[str] = (),
        method: dict | None = None,
        tolerance: float = HybridConfig.tolerance,
        max_length: int | None = None,
        supernet=None,
    ) -> SpaceContext:
        """The context for an HF config; ``budget_percent`` is % of the backbone's parameters.

        Raises:
            ConfigError: naming ``search.budget`` / ``search.extra_methods`` for bad values.
        """
        arch = arch_from_config(hf_config, num_labels)
        if budget is not None and budget_percent is not None:
            raise ConfigError("search.budget: set at most one of search.budget and search.budget_percent")
        if budget_percent is not None:
            if not 0 < budget_percent <= 100:
                raise ConfigError(f"search.budget_percent: must be in (0, 100], got {budget_percent}")
            budget = int(round(arch.backbone_params() * budget_percent / 100))
        if budget is not None and int(budget) < 1:
            raise ConfigError(f"search.budget: must be >= 1 trainable parameter, got {budget}")
        if not 0 < tolerance < 1:
            raise ConfigError(f"search.tolerance: must be in (0, 1), got {tolerance}")
        extra = tuple(extra_methods or ())
        bad = [m for m in extra if m not in EXTRA_METHODS]
        if bad:
            raise ConfigError(
                f"search.extra_methods={list(extra)}: {bad[0]} is not an optional S4 method; use some of "
                f"{list(EXTRA_METHODS)}"
            )
        applicable, knobs, excluded = _applicability(arch, hf_config)
        return cls(
            arch=arch,
            hf_config=hf_config,
            budget=None if budget is None else int(budget),
            methods=tuple(m for m in S4_METHODS if m in applicable),
            extra_methods=tuple(m for m in EXTRA_METHODS if m in extra and m in applicable),
            applicable=applicable,
            knobs=knobs,
            excluded=excluded,
            method=dict(method) if method is not None else None,
            tolerance=tolerance,
            max_length=max_length,
            supernet=supernet,
        )

    @classmethod
    def from_model(
        cls, name: str, num_labels: int = 2, regression: bool = False, revision: str | None = None, **kwargs
    ) -> SpaceContext:
        """The context for ``model.name`` (``minilm``, ``tiny-bert``, an HF id or path); reads only its
        config."""
        from adabudget.hub import PACKAGED, TINY, packaged_path, pretrained_kwargs
        from adabudget.models import tiny_config

        if name in TINY:
            hf_config = tiny_config(name, num_labels, regression)
        else:
            from transformers import AutoConfig

            path = packaged_path(name) if name in PACKAGED else name
            extra = {"problem_type": "regression"} if regression else {}
            try:
                hf_config = AutoConfig.from_pretrained(
                    path, revision=revision, num_labels=num_labels, **extra, **pretrained_kwargs(name)
                )
            except OSError as err:
                raise ConfigError(
                    f"model.name={name}: no readable model config ({err.__class__.__name__})"
                ) from err
        return cls.from_config(hf_config, num_labels, **kwargs)


def _applicability(arch: Arch, hf_config) -> tuple[tuple[str, ...], dict, dict]:
    """Which group methods apply to ``arch``: each method's own ``count`` refuses what it cannot do."""
    applicable, knobs, excluded = [], {}, {}
    every = list(range(arch.num_layers))
    for name in ORDER:
        method = REGISTRY[name]
        try:
            method.count(method.config(), arch, every)
        except ConfigError as err:
            fallback = FALLBACK_KNOBS.get(name)
            try:
                if fallback is None:
                    raise
                method.count(method.config(**fallback), arch, every)
                knobs[name] = dict(fallback)
            except ConfigError:
                excluded[name] = str(err)
                continue
        if name == "prompt":
            # adabudget.methods.prompt.apply refuses input embeddings narrower than the hidden size
            width = getattr(hf_config, "embedding_size", None) or arch.hidden
            if width != arch.hidden:
                excluded[name] = f"input embeddings of width {width} != hidden size {arch.hidden}"
                continue
        applicable.append(name)
    return tuple(applicable), knobs, excluded


# ---------------------------------------------------------------- overrides
def merge_overrides(base: dict, overrides: dict) -> dict:
    """``overrides`` merged onto ``base`` (a new dict): a ``method`` dict with a ``name`` replaces
    the method node; every other dict merges key by key, recursively; other values replace."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if key == "method" and isinstance(value, dict) and "name" in value:
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ---------------------------------------------------------------- sizes the built-in spaces share
def unit_cost(name: str, knobs: dict, arch: Arch, layers: list[int] | None) -> int:
    """Parameters one more unit of ``name``'s size knob costs on ``layers`` (AdaLoRA: per unit of
    target_r, i.e. one triplet per matrix, Σ (in + out + 1))."""
    method = REGISTRY[name]
    cfg = method.config(**knobs)
    one = method.count(dataclasses.replace(cfg, **{method.size: 1}), arch, layers)
    two = method.count(dataclasses.replace(cfg, **{method.size: 2}), arch, layers)
    return two - one


def expected_sizes(shares: dict, costs: dict, group_budget: float) -> dict:
    """Sizes that spend ``share`` of ``group_budget`` on each method, given its per-unit cost.

    The solver treats them as proportions and rescales them together; writing them at the
    expected scale keeps the overrides readable (near the solved sizes) and keeps a soft
    prompt's written length near its solved one (``adabudget.training.check_positions`` reads the
    written length).
    """
    total = sum(shares.values())
    sizes = {m: max(1, round(shares[m] / total * group_budget / costs[m])) for m in shares}
    if "adalora" in sizes:  # even, so init_r = 1.5 target_r is exact
        sizes["adalora"] = 2 * max(1, round(sizes["adalora"] / 2))
    return sizes


def knobs_at(name: str, size: int | None, ctx: SpaceContext) -> dict:
    knobs = dict(ctx.knobs.get(name, {}))
    if name == "adalora":
        knobs.update(target_r=float(size), init_r=int(round(ADALORA_INIT_RATIO * size)))
    elif size is not None:
        knobs[REGISTRY[name].size] = int(size)
    return knobs


def size_choices(name: str, ctx: SpaceContext) -> list[int]:
    choices = list(SIZES[name])
    if name in ("adapter", "parallel_adapter", "lora"):  # a bottleneck or rank beyond h buys nothing
        choices = [c for c in choices if c <= ctx.arch.hidden] or choices[:1]
    return choices
