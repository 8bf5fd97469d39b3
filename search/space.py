"""Design spaces as code: ``(trial, ctx) -> overrides``, adapting to the backbone.

A space is a plain function in the optuna-examples style: ``trial.suggest_*`` calls and
``if``s, so conditional spaces are natural. It returns a nested dict of overrides to merge onto
the run config (``merge_overrides``): a ``method`` dict that has a ``name`` replaces the whole
method node; every other section merges key by key. Built-in spaces (``SPACES``):

- ``s4``: the S4 design space (Chen et al., ICLR 2023): grouping pattern, number of groups,
  a subset of {adapter, prefix, bitfit, lora, adalora} per group (plus ``ia3``,
  ``parallel_adapter``, ``prompt`` when asked), allocation of the budget across groups, and
  each method's share of its group's budget.
- ``autopeft``: AutoPEFT's space (Zhou et al., TACL 2024): per-layer on/off, serial adapter
  size, parallel adapter size, prefix length.
- ``adalora``: AdaLoRA's own knobs (init_r, target, t_i, t_f, ΔT, γ, score).
- ``methods``: one method of the seed families at the budget, the method itself the choice
  (LoRA, AdaLoRA, DyLoRA, Delta-LoRA, RoSA, sparse fine-tuning, Quantum-PEFT, adapters, prefix,
  (IA)³), each sized to the budget through its own knob.
- ``lr``: learning rate and warm-up; composes with any of the above (``[s4, lr]``).
- ``supernet``: a weight-sharing supernet's menus per block (``search/supernet.py``), exact sizes.

Every space reads the backbone from ``SpaceContext`` (the number of layers, which methods
apply to the architecture), so any space runs on any supported model. ``configs/search/space/
<name>.yaml`` spaces in hydra-optuna-sweeper's grammar compile to the same kind of function
(``search.declarative``).

Equal budget: with ``search.budget`` every sampled hybrid carries that budget and the existing
solver (``adabudget.methods.hybrid.solve_sizes``) sizes it, within its tolerance. ``sample`` does
this analytically, before any model exists, and marks a configuration that cannot reach the
budget as infeasible (``trial.set_constraint("budget", violation > 0)``) instead of raising:
the study records it and trains nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import optuna
from adabudget.arch import Arch, arch_from_config
from adabudget.config import ConfigError, RunConfig
from adabudget.groups import ALLOCATIONS, PATTERNS, allocation_shares, split_layers
from adabudget.methods import REGISTRY, closest_size, count_trainable, method_config_from_dict, methods_in
from adabudget.methods import hybrid as hybrid_method
from adabudget.methods.adalora import SCORES, AdaLoRAConfig, check_budget, triplet_cost
from adabudget.methods.hybrid import ORDER, HybridConfig
from adabudget.search.declarative import compile_params, distribution_from_override, load_space_file

__all__ = [
    "SPACES",
    "Sample",
    "Space",
    "SpaceContext",
    "check_space",
    "compile_params",
    "distribution_from_override",
    "get_space",
    "merge_overrides",
    "sample",
]

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


# ---------------------------------------------------------------- context
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
        """The context for ``model.name`` (``minilm``, ``tiny-bert``, an HF id or path); reads only its config."""
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


def _check_sections(overrides: dict) -> None:
    """Unknown top-level or section keys mean a broken space: raise, naming ``search.space``."""
    known = {f.name: f for f in dataclasses.fields(RunConfig)}
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(
                f"search.space: the space sets '{key}', not a config key; known: {sorted(known)}"
            )
        if key == "method":
            if not isinstance(value, dict):
                raise ConfigError(f"search.space: method must be a dict of method knobs, got {value!r}")
            continue
        default = getattr(RunConfig(), key)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"search.space: {key} is a section; give a dict of its keys, got {value!r}")
            names = {f.name for f in dataclasses.fields(default)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise ConfigError(
                    f"search.space: the space sets {key}.{unknown[0]}, not a key of {key}; known: {sorted(names)}"
                )


def _check_group_keys(cfg: HybridConfig) -> None:
    """Unknown methods or knobs in a hybrid's groups mean a broken space (validate() checks values)."""
    allowed = sorted(ORDER)  # what adabudget.methods.hybrid.parse_groups accepts
    for g, entry in enumerate(cfg.groups):
        if entry is None or entry == "none" or entry == {}:
            continue
        entry = {entry: {}} if isinstance(entry, str) else entry
        if not hasattr(entry, "items"):
            raise ConfigError(
                f"search.space: method.groups[{g}]={entry!r}: give {{method: {{knobs}}}} or none"
            )
        for name, knobs in entry.items():
            if name not in allowed:
                raise ConfigError(
                    f"search.space: method.groups[{g}].{name}: not a method a group can use; use some of {allowed}"
                )
            names = {f.name for f in dataclasses.fields(REGISTRY[name].config)} - {"layers"}
            unknown = sorted(set(knobs or {}) - names - {"name"})
            if unknown:
                raise ConfigError(
                    f"search.space: method.groups[{g}].{name}.{unknown[0]}: not a knob of {name}; "
                    f"its knobs: {sorted(names)}"
                )


# ---------------------------------------------------------------- sampling
@dataclass
class Sample:
    """One sampled configuration and what ``sample`` found out about it without training."""

    overrides: dict  # nested overrides, as merged onto the run config (hybrids carry the budget)
    trainable_params: Optional[int] = None  # count_trainable: the built model's count at step 0
    # What the budget constrains: the same count, except that AdaLoRA counts its final b(T)
    # (its triplets at the end of training) as the hybrid solver and the paper do.
    budget_params: Optional[int] = None
    infeasible: Optional[str] = None  # why it cannot be trained as asked (None: feasible)
    method: Any = None  # the resolved method config dataclass (sizes still proportions)

    @property
    def feasible(self) -> bool:
        return self.infeasible is None


def sample(trial, space: Space, ctx: SpaceContext) -> Sample:
    """Run ``space`` on ``trial`` and check the configuration analytically (nothing is built).

    The method node (the space's, merged onto ``ctx.method``) is resolved with
    ``method_config_from_dict``, validated, and counted with ``count_trainable``; a hybrid gets
    ``ctx.budget`` when it sets none and is solved by the hybrid solver. A configuration that
    fails validation, cannot reach the budget within ``ctx.tolerance``, trains nothing, or whose
    AdaLoRA schedule the allocator would refuse is infeasible: the trial gets
    ``set_constraint("budget", v > 0)`` and ``set_user_attr("infeasible", reason)``; feasible
    ones get the constraint 0.0. ``trainable_params`` (and ``budget_params``) are user attrs.
    When neither the space nor ``ctx.method`` names a method nothing is counted (None).

    Raises:
        ConfigError: for a broken space (not a dict, unknown config key, method or knob); never
            for an infeasible sample.
    """
    overrides = space(trial, ctx)
    if not isinstance(overrides, dict):
        raise ConfigError(
            f"search.space: a space returns a dict of overrides, got {type(overrides).__name__}"
        )
    _check_sections(overrides)
    node = _method_node(overrides, ctx)
    if node is None:  # neither the space nor the run names a method: nothing to count
        result = Sample(overrides)
        _record(trial, result, 0.0)
        return result
    unsized = node.get("budget") is None and node.get("budget_percent") is None
    exact = getattr(space, "exact_sizes", False)  # sizes from a menu (the supernet's): checked, never solved
    if ctx.budget is not None and node.get("name") in HYBRIDS and unsized and not exact:
        extra = {"budget": ctx.budget}  # equal budget: the solver sizes every sampled hybrid
        if node.get("tolerance", HybridConfig.tolerance) != ctx.tolerance:
            extra["tolerance"] = ctx.tolerance
        node.update(extra)
        overrides = merge_overrides(overrides, {"method": extra})
    try:
        mcfg = method_config_from_dict(node)
    except ConfigError as err:
        raise ConfigError(f"search.space: the space's method is not a configuration: {err}") from err
    if isinstance(mcfg, HybridConfig):
        _check_group_keys(mcfg)
    result = Sample(overrides, method=mcfg)
    violation = 1.0  # unknown distance to feasibility (a validation or solver failure)
    try:
        mcfg.validate()
        if isinstance(mcfg, HybridConfig):
            _check_wrapping(mcfg, ctx.arch)
        result.trainable_params = count_trainable(mcfg, ctx.hf_config)
        used = methods_in(mcfg)
        groups = (
            hybrid_method.plan(mcfg, ctx.arch)
            if isinstance(mcfg, HybridConfig) and ("adalora" in used or "prompt" in used)
            else None
        )
        result.budget_params = _budget_count(mcfg, ctx.arch, result.trainable_params, groups)
        if "adalora" in used:
            _check_adalora(mcfg, ctx.arch, groups, ctx.tolerance if ctx.budget is not None else None)
        if "prompt" in used:
            _check_positions(mcfg, ctx, groups)
    except ConfigError as err:
        result.infeasible = str(err)
    if result.infeasible is None and result.trainable_params == 0:
        result.infeasible = "method: the configuration trains no parameter (every group is empty)"
    if result.infeasible is None and ctx.budget is not None:
        miss = abs(result.budget_params - ctx.budget) / ctx.budget
        if miss > ctx.tolerance:
            result.infeasible = (
                f"search.budget={ctx.budget}: this configuration holds {result.budget_params} parameters "
                f"({100 * (result.budget_params - ctx.budget) / ctx.budget:+.1f}%, tolerance "
                f"{100 * ctx.tolerance:g}%) and has no size the solver can scale"
            )
            violation = miss - ctx.tolerance
    _record(trial, result, violation)
    return result


def _method_node(overrides: dict, ctx: SpaceContext) -> dict | None:
    """The method dict the run will see: the space's (a name replaces), merged onto ``ctx.method``."""
    own = overrides.get("method")
    if own is not None and "name" in own:
        return copy.deepcopy(own)
    if ctx.method is None:
        if own:
            raise ConfigError(
                f"search.space: the space sets method.{sorted(own)[0]} but neither it nor the run names a "
                "method; add method.name to the space or pass the run's method node to SpaceContext"
            )
        return None
    return merge_overrides({"method": ctx.method}, {"method": own or {}})["method"]


def _record(trial, result: Sample, violation: float) -> None:
    if result.trainable_params is not None:
        trial.set_user_attr("trainable_params", int(result.trainable_params))
    if result.budget_params is not None:
        trial.set_user_attr("budget_params", int(result.budget_params))
    if result.infeasible is not None:
        trial.set_user_attr("infeasible", result.infeasible)
    if hasattr(trial, "set_constraint"):
        trial.set_constraint("budget", max(violation, 1e-9) if result.infeasible is not None else 0.0)


def _budget_count(mcfg, arch: Arch, trainable: int, groups) -> int:
    """The parameters a budget constrains: the trainable count, AdaLoRA's counted at b(T)."""
    if isinstance(mcfg, AdaLoRAConfig):
        if mcfg.target_params is not None:
            return int(mcfg.target_params)
        matrices = arch.match_linears(mcfg.target_modules or arch.default_targets(), mcfg.layers)
        per_rank = sum(triplet_cost(s) for _, s in matrices)
        if mcfg.target_total_rank is not None:  # nominal: the allocator picks which matrices keep them
            return round(mcfg.target_total_rank * per_rank / len(matrices))
        return round(mcfg.target_r * per_rank)
    if groups is not None and any("adalora" in g.methods for g in groups):
        # the solver's own measure of a group (hybrid.final_count): AdaLoRA at its target_r
        return sum(
            hybrid_method.final_count(m, c, arch, g.layers) for g in groups for m, c in g.methods.items()
        )
    return trainable


def _check_adalora(mcfg, arch: Arch, groups, tolerance: float | None) -> None:
    """The allocator's budget rule (``adalora.check_budget``) on the configuration's shapes, before training.

    ``tolerance``: also require that whole triplets can meet a parameter target that closely
    (the allocator keeps triplets while their cost fits, so it may stop one triplet short).
    """
    if isinstance(mcfg, AdaLoRAConfig):
        acfg = mcfg
        patterns = mcfg.target_modules or arch.default_targets()
        matrices = [(s, mcfg.init_r) for _, s in arch.match_linears(patterns, mcfg.layers)]
    else:
        acfg = hybrid_method.adalora_config(mcfg, arch)
        matrices = []
        for g in groups:
            if "adalora" in g.methods:
                c = g.methods["adalora"]
                patterns = c.target_modules or arch.default_targets()
                matrices += [(s, c.init_r) for _, s in arch.match_linears(patterns, g.layers)]
    budget = check_budget(acfg, matrices)
    if (
        acfg.target_params is not None
        and tolerance is not None
        and max(budget.costs) > tolerance * budget.target
    ):
        raise ConfigError(
            f"method.target_params={budget.target}: AdaLoRA keeps whole triplets of up to {max(budget.costs)} "
            f"parameters, so it can end up to that far below the target (more than the {100 * tolerance:g}% tolerance)"
        )


def _check_wrapping(cfg: HybridConfig, arch: Arch) -> None:
    """LoRA and AdaLoRA both replace a linear by a wrapper: on the same matrix of a group the
    second finds no linear to wrap (``find_targets`` fails at apply; ``count`` does not see it)."""
    layer_groups = split_layers(arch.num_layers, cfg.num_groups, cfg.grouping)
    for g, (layers, methods) in enumerate(zip(layer_groups, hybrid_method.parse_groups(cfg))):
        if "lora" in methods and "adalora" in methods:
            wrapped = [
                {
                    n
                    for n, _ in arch.match_linears(
                        methods[m].target_modules or arch.default_targets(), layers
                    )
                }
                for m in ("lora", "adalora")
            ]
            both = sorted(wrapped[0] & wrapped[1])
            if both:
                raise ConfigError(
                    f"method.groups[{g}]: lora and adalora would both wrap {both[0]} (and {len(both) - 1} more); "
                    "give them disjoint target_modules or put them in different groups"
                )


def _check_positions(mcfg, ctx: SpaceContext, groups) -> None:
    """A soft prompt (its solved length) plus the text must fit an absolute position table."""
    from adabudget.methods.prompt import PromptConfig, position_limit

    limit = position_limit(ctx.hf_config)
    if limit is None:
        return
    if isinstance(mcfg, PromptConfig):
        lengths = [mcfg.length]
    else:
        # the solved length, and the written one, which adabudget.training.check_positions reads
        lengths = [g.methods["prompt"].length for g in groups or [] if "prompt" in g.methods]
        lengths += [g["prompt"].length for g in hybrid_method.parse_groups(mcfg) if "prompt" in g]
    text = ctx.max_length or 1
    for length in lengths:
        if length + text > limit:
            raise ConfigError(
                f"method.length={length}: a soft prompt that long leaves no room for {text} text positions "
                f"in this model's {limit}; lower the budget or the prompt's share"
            )


def check_space(space: Space, ctx: SpaceContext, n: int = 64, seed: int = 0) -> float:
    """Sample ``n`` configurations at random (in memory) and return the feasible fraction.

    The study calls this before any trial: a space none of whose configurations reaches the
    budget would only record infeasible trials.

    Raises:
        ConfigError: naming ``search.budget`` (or ``search.space`` without a budget) when no
            sampled configuration is feasible, with the most common reason.
    """
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(logging.WARNING)  # no "Trial N pruned" lines for a dry run
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        reasons: Counter = Counter()
        feasible = 0
        for _ in range(n):
            trial = study.ask()
            result = sample(trial, space, ctx)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)  # nothing is trained here
            if result.feasible:
                feasible += 1
            else:
                reasons[result.infeasible] += 1
    finally:
        optuna.logging.set_verbosity(verbosity)
    if feasible == 0:
        name = getattr(space, "space_name", getattr(space, "__name__", "the space"))
        reason, count = reasons.most_common(1)[0]
        where = f"search.budget={ctx.budget}" if ctx.budget is not None else f"search.space={name}"
        raise ConfigError(
            f"{where}: none of {n} configurations sampled from search.space={name} on this "
            f"{ctx.arch.model_type} ({ctx.arch.num_layers} layers) is feasible; {count} of them: {reason}"
        )
    return feasible / n


# ---------------------------------------------------------------- built-in spaces
def _unit_cost(name: str, knobs: dict, arch: Arch, layers: list[int] | None) -> int:
    """Parameters one more unit of ``name``'s size knob costs on ``layers`` (AdaLoRA: per unit of
    target_r, i.e. one triplet per matrix, Σ (in + out + 1))."""
    method = REGISTRY[name]
    cfg = method.config(**knobs)
    one = method.count(dataclasses.replace(cfg, **{method.size: 1}), arch, layers)
    two = method.count(dataclasses.replace(cfg, **{method.size: 2}), arch, layers)
    return two - one


def _expected_sizes(shares: dict, costs: dict, group_budget: float) -> dict:
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


def _knobs(name: str, size: int | None, ctx: SpaceContext) -> dict:
    knobs = dict(ctx.knobs.get(name, {}))
    if name == "adalora":
        knobs.update(target_r=float(size), init_r=int(round(ADALORA_INIT_RATIO * size)))
    elif size is not None:
        knobs[REGISTRY[name].size] = int(size)
    return knobs


def _size_choices(name: str, ctx: SpaceContext) -> list[int]:
    choices = list(SIZES[name])
    if name in ("adapter", "parallel_adapter", "lora"):  # a bottleneck or rank beyond h buys nothing
        choices = [c for c in choices if c <= ctx.arch.hidden] or choices[:1]
    return choices


def s4_space(trial, ctx: SpaceContext) -> dict:
    """S4 (Chen et al., ICLR 2023): groups, their pattern, strategies per group, and sizes.

    ``num_groups`` in 1..min(4, L); ``grouping`` one of the four patterns; ``g<i>.<method>``
    (True/False) picks each group's subset (a group may stay empty, not all of them; AdaLoRA
    is not offered where LoRA already adapts the group's matrices);
    with a budget, ``allocation`` shares it across groups and ``g<i>.<method>.share`` (0.1..1,
    normalised in the group) gives each method's part of its group's budget, turned into sizes
    through each method's per-unit cost on those layers (the solver then rescales them as
    proportions, one multiplier per group; fixed-size methods, bitfit and ia3, are paid first). Without a budget, ``g<i>.<method>.size`` picks
    an absolute size from ``SIZES``. AdaLoRA starts at init_r = 1.5 target_r.
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
            costs = {m: _unit_cost(m, ctx.knobs.get(m, {}), arch, layers[g]) for m in scalable[g]}
            sizes = _expected_sizes(shares, costs, free * weights[g] / sum(weights))
        else:
            sizes = {
                m: trial.suggest_categorical(f"g{g}.{m}.size", _size_choices(m, ctx)) for m in scalable[g]
            }
        groups.append({m: _knobs(m, sizes.get(m), ctx) for m in picked} or "none")
    method["groups"] = groups
    return {"method": method}


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
        per_rank = _unit_cost("adalora", {}, ctx.arch, None)
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


def supernet_space(trial, ctx: SpaceContext) -> dict:
    """The space of a weight-sharing supernet (``search.supernet``; ``search/supernet.py``): per block
    ``l<i>.<method>`` a size from each method's menu (``search.supernet.lora`` ranks, ``adapter``
    bottlenecks, ``prefix`` lengths, 0 = off in that block), as a hybrid of one group per run of
    identical blocks. The sizes are exact (never solved to the budget): with ``search.budget`` a
    configuration outside ``search.supernet.tolerance`` of it is infeasible. ``search.scorer=supernet``
    scores these on a trained supernet; the default scorer trains each (the plain search to compare with).
    """
    from adabudget.search.supernet import SupernetSpace

    space = SupernetSpace.from_context(ctx)
    return {"method": space.to_method(space.suggest(trial))}


supernet_space.exact_sizes = True


# The single methods of the ``methods`` space; LongLoRA is not a budget alternative (a long-context
# training recipe for LLaMA: LoRA plus embeddings and norms; its own axes are the ``longlora`` space)
# and QLoRA is a property of the base (``model.quantize``), so neither is a choice here.
SINGLE_METHODS = (
    "lora",
    "adalora",
    "dylora",
    "delta_lora",
    "rosa",
    "sparse",
    "quantum_peft",
    "adapter",
    "parallel_adapter",
    "prefix",
    "ia3",
)
SINGLE_SIZES = {
    "dylora": (4, 8, 16),
    "delta_lora": (2, 4, 8, 16),
    "rosa": (2, 4, 8, 16),
    "quantum_peft": (2, 4, 8, 16),
    "sparse": (0.001, 0.003, 0.01),
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
                _knobs("adalora", trial.suggest_categorical("adalora.size", list(SIZES["adalora"])), ctx)
            )
        else:
            sizes = SINGLE_SIZES.get(name) or _size_choices(name, ctx)
            knobs[REGISTRY[name].size] = trial.suggest_categorical(f"{name}.size", list(sizes))
        return {"method": {"name": name, **knobs}}
    if name == "sparse":
        knobs["budget"] = ctx.budget
    elif name == "adalora":
        per_rank = _unit_cost("adalora", {}, arch, None)
        knobs.update(
            init_r=max(1, math.ceil(ADALORA_INIT_RATIO * ctx.budget / per_rank)), target_params=ctx.budget
        )
    elif name == "rosa":
        share = trial.suggest_float("rosa.sparse_share", 0.1, 0.9)
        lora_part = REGISTRY["lora"]
        r = closest_size(lora_part.config(), arch, (1 - share) * ctx.budget)
        knobs["r"] = r
        knobs["budget"] = max(1, ctx.budget - lora_part.count(lora_part.config(r=r), arch, None))
    else:
        knobs[REGISTRY[name].size] = closest_size(REGISTRY[name].config(**knobs), arch, ctx.budget)
    return {"method": {"name": name, **knobs}}


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
        knobs["r"] = trial.suggest_categorical("longlora.r", _size_choices("lora", ctx))
    else:
        knobs["r"] = closest_size(REGISTRY["longlora"].config(**knobs), ctx.arch, ctx.budget)
    return {"method": knobs}


def lr_space(trial, ctx: SpaceContext) -> dict:
    """Learning rate log-uniform in [1e-4, 3e-3] and warm-up ratio in [0, 0.2]."""
    return {
        "train": {
            "lr": trial.suggest_float("train.lr", 1e-4, 3e-3, log=True),
            "warmup_ratio": trial.suggest_float("train.warmup_ratio", 0.0, 0.2),
        }
    }


SPACES: dict[str, Space] = {
    "s4": s4_space,
    "autopeft": autopeft_space,
    "adalora": adalora_space,
    "lr": lr_space,
    "supernet": supernet_space,
    "methods": methods_space,
    "longlora": longlora_space,
}
for _name, _space in SPACES.items():
    _space.space_name = _name


# ---------------------------------------------------------------- lookup and composition
def _space_dir() -> Path:
    from adabudget.compose import config_dir

    return Path(config_dir()) / "search" / "space"


def _known() -> list[str]:
    files = sorted(p.stem for p in _space_dir().glob("*.yaml")) if _space_dir().is_dir() else []
    return [*SPACES, *(f for f in files if f not in SPACES)]


def _lookup(name: str) -> Space:
    if name in SPACES:
        return SPACES[name]
    path = _space_dir() / f"{name}.yaml"
    if re.fullmatch(r"[\w-]+", name) and path.is_file():
        space = load_space_file(path)
        space.space_name = name
        return space
    raise ConfigError(
        f"search.space={name}: unknown space; known spaces: {', '.join(_known())} "
        f"(built in, or configs/search/space/<name>.yaml)"
    )


def get_space(names: str | Iterable[str]) -> Space:
    """The space named ``names``, or the composition of several (``[s4, lr]``).

    Built-in names first, then ``configs/search/space/<name>.yaml``. In a composition every
    space samples on the same trial and later overrides merge over earlier ones; two spaces
    that both set ``method.name`` fail, naming both, when first sampled.

    Raises:
        ConfigError: naming ``search.space`` and listing the known spaces for an unknown name.
    """
    names = [names] if isinstance(names, str) else [str(n) for n in names]
    if not names:
        raise ConfigError(f"search.space: no space named; known spaces: {', '.join(_known())}")
    parts = [(n, _lookup(n)) for n in names]
    if len(parts) == 1:
        return parts[0][1]

    def composed(trial, ctx: SpaceContext) -> dict:
        out: dict = {}
        setter = None
        for name, space in parts:
            overrides = space(trial, ctx)
            if isinstance(overrides.get("method"), dict) and "name" in overrides["method"]:
                if setter is not None:
                    raise ConfigError(
                        f"search.space=[{', '.join(names)}]: both {setter} and {name} set method.name; "
                        "compose one method space with spaces that set other keys (lr)"
                    )
                setter = name
            out = merge_overrides(out, overrides)
        return out

    composed.space_name = "+".join(names)
    composed.__name__ = composed.space_name
    composed.exact_sizes = any(getattr(space, "exact_sizes", False) for _, space in parts)
    return composed
