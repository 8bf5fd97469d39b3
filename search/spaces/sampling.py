"""``sample``: run a space on a trial and check the configuration analytically (nothing is built);
``check_space``: the dry run a study makes before any trial."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import optuna
from adabudget.arch import Arch
from adabudget.config import ConfigError, RunConfig
from adabudget.groups import split_layers
from adabudget.methods import REGISTRY, count_trainable, method_config_from_dict, methods_in
from adabudget.methods import hybrid as hybrid_method
from adabudget.methods.adalora import AdaLoRAConfig, check_budget, magnitude_params, triplet_cost
from adabudget.methods.hybrid import ORDER, HybridConfig
from adabudget.search.spaces.context import HYBRIDS, Space, SpaceContext, merge_overrides


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
        result.trainable_params, result.budget_params, groups = _counts(mcfg, ctx)
        used = methods_in(mcfg)
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


def count(method: dict, ctx: SpaceContext) -> tuple[int, int]:
    """(trainable parameters at step 0, the count a budget constrains) of a method node on
    ``ctx``'s backbone, the task head excluded: what ``sample`` records as ``trainable_params`` and
    ``budget_params`` (the objective ``params``; ``search.optuna_factory``).

    Raises:
        ConfigError: the node is not a valid configuration.
    """
    mcfg = method_config_from_dict(method)
    mcfg.validate()
    trainable, budget, _ = _counts(mcfg, ctx)
    return trainable, budget


def _counts(mcfg, ctx: SpaceContext) -> tuple[int, int, list | None]:
    trainable = count_trainable(mcfg, ctx.hf_config)
    used = methods_in(mcfg)
    groups = (
        hybrid_method.plan(mcfg, ctx.arch)
        if isinstance(mcfg, HybridConfig) and ("adalora" in used or "prompt" in used)
        else None
    )
    return trainable, budget_count(mcfg, ctx.arch, trainable, groups), groups


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
                    f"search.space: the space sets {key}.{unknown[0]}, not a key of {key}; known: "
                    f"{sorted(names)}"
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
                    f"search.space: method.groups[{g}].{name}: not a method a group can use; use some of "
                    f"{allowed}"
                )
            names = {f.name for f in dataclasses.fields(REGISTRY[name].config)} - {"layers"}
            unknown = sorted(set(knobs or {}) - names - {"name"})
            if unknown:
                raise ConfigError(
                    f"search.space: method.groups[{g}].{name}.{unknown[0]}: not a knob of {name}; "
                    f"its knobs: {sorted(names)}"
                )


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


def budget_count(mcfg, arch: Arch, trainable: int, groups) -> int:
    """The parameters a budget constrains: the final adapter parameters. The trainable count, but
    AdaLoRA's at b(T), and a method whose ranks move (``Method.ranks_move``: SoRA, IncreLoRA,
    GeoLoRA) at its ``target_params`` (the final cut / growth limit it ends at), as ``adabudget
    reproduce`` levels them."""
    if isinstance(mcfg, AdaLoRAConfig):
        if mcfg.target_params is not None:
            return int(mcfg.target_params)
        matrices = arch.match_linears(mcfg.target_modules or arch.default_targets(), mcfg.layers)
        per_rank = sum(triplet_cost(s) for _, s in matrices)
        fixed = sum(magnitude_params(s, mcfg.dora) for _, s in matrices)  # DoRA's m, never pruned
        if mcfg.target_total_rank is not None:  # nominal: the allocator picks which matrices keep them
            return round(mcfg.target_total_rank * per_rank / len(matrices)) + fixed
        return round(mcfg.target_r * per_rank) + fixed
    method = REGISTRY.get(getattr(mcfg, "name", None))
    if method is not None and method.ranks_move:
        target = getattr(mcfg, "target_params", None)
        return int(target) if target is not None else trainable
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
            f"method.target_params={budget.target}: AdaLoRA keeps whole triplets of up to "
            f"{max(budget.costs)} parameters, so it can end up to that far below the target "
            f"(more than the {100 * tolerance:g}% tolerance)"
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
                    f"method.groups[{g}]: lora and adalora would both wrap {both[0]} (and {len(both) - 1} "
                    "more); give them disjoint target_modules or put them in different groups"
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
