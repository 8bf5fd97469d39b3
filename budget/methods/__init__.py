"""PEFT methods, one file each, registered by name in ``REGISTRY``.

Each method file exports a config dataclass (``name``, ``validate()``), ``apply(model, cfg,
layers=None) -> {name: module}``, ``count(cfg, arch, layers=None) -> int``, and optionally
``merge(model, modules)`` and ``hooks(model, modules, cfg)`` (a ``MethodHooks``, for methods that
act outside forward and backward). The contract in full and how to add a method:
docs/methods.md#the-method-contract.

Invariants:

- ``apply`` makes exactly the method's own parameters trainable, and ``count`` (from the HF config
  alone, before any model exists) equals what it builds.
- ``validate()`` raises ``ConfigError`` naming the ``method.<field>`` and the fix; unknown method
  names fail with the list of known ones.
- ``merge`` leaves the outputs unchanged and removes the method's wrappers and hooks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from adabudget.config import ConfigError
from adabudget.methods import (
    adalora,
    adapter,
    bitfit,
    delta_lora,
    dylora,
    freeze,
    full,
    geolora,
    hybrid,
    ia3,
    increlora,
    longlora,
    lora,
    mam,
    parallel_adapter,
    peft_ref,
    prefix,
    prompt,
    quantum_peft,
    rosa,
    sora,
    sparse,
    unipelt,
)
from adabudget.methods.hooks import MethodHooks


@dataclass(frozen=True)
class Method:
    config: type
    apply: Callable
    count: Callable
    size: Optional[str] = None  # the integer size knob a budget solver scales (None: fixed size)
    merge: Optional[Callable] = None  # None: the method cannot merge into the base weights
    hooks: Optional[Callable] = None  # (model, modules, cfg) -> MethodHooks, the loop's calls (methods.hooks)
    trains_base: bool = False  # trains or writes the base weights themselves (no 4-bit base under it)
    # adapter/ is written in peft's LoRA format (adabudget.export.export_peft_adapter)
    peft_export: bool = False
    # the built-in search spaces that offer the method as a choice of their own ("methods": one
    # method at the budget, offered in REGISTRY's order)
    spaces: tuple[str, ...] = ()
    # its ranks move during training: its size is the components it keeps at the end (the record's
    # ``adapter_params_final``, each of its groups flagged ``ranks_move``), not ``count``'s start;
    # a ``target_params`` knob is that final size (what a budget judges it by)
    ranks_move: bool = False

    @property
    def mergeable(self) -> bool:
        """``export_merged`` works: the method folds into the base weights (outputs unchanged)."""
        return self.merge is not None


IN_METHODS_SPACE = ("methods",)  # offered by the ``methods`` search space (Method.spaces)
REGISTRY: dict[str, Method] = {
    # the methods of the ``methods`` search space first, in the order it offers them
    "lora": Method(
        lora.LoRAConfig,
        lora.apply,
        lora.count,
        "r",
        lora.merge,
        lora.hooks,  # EVA's calibration (method.init=eva), None otherwise
        peft_export=True,
        spaces=IN_METHODS_SPACE,
    ),
    "adalora": Method(
        adalora.AdaLoRAConfig,
        adalora.apply,
        adalora.count,
        "init_r",
        adalora.merge,
        peft_export=True,
        spaces=IN_METHODS_SPACE,
        ranks_move=True,
    ),
    "dylora": Method(
        dylora.DyLoRAConfig,
        dylora.apply,
        dylora.count,
        "r_max",
        dylora.merge,
        dylora.hooks,
        peft_export=True,
        spaces=IN_METHODS_SPACE,
    ),
    "sora": Method(
        sora.SoRAConfig,
        sora.apply,
        sora.count,
        "r",
        sora.merge,
        sora.hooks,
        peft_export=True,
        spaces=IN_METHODS_SPACE,
        ranks_move=True,
    ),
    "increlora": Method(
        increlora.IncreLoRAConfig,
        increlora.apply,
        increlora.count,
        "max_rank",
        increlora.merge,
        increlora.hooks,
        peft_export=True,
        spaces=IN_METHODS_SPACE,
        ranks_move=True,
    ),
    "geolora": Method(
        geolora.GeoLoRAConfig,
        geolora.apply,
        geolora.count,
        "r_max",
        geolora.merge,
        geolora.hooks,
        peft_export=True,
        spaces=IN_METHODS_SPACE,
        ranks_move=True,
    ),
    "delta_lora": Method(
        delta_lora.DeltaLoRAConfig,
        delta_lora.apply,
        delta_lora.count,
        "r",
        delta_lora.merge,
        delta_lora.hooks,
        trains_base=True,
        spaces=IN_METHODS_SPACE,
    ),
    "rosa": Method(
        rosa.RoSAConfig,
        rosa.apply,
        rosa.count,
        "r",
        rosa.merge,
        rosa.hooks,
        trains_base=True,
        spaces=IN_METHODS_SPACE,
    ),
    "sparse": Method(
        sparse.SparseConfig,
        sparse.apply,
        sparse.count,
        "budget",
        sparse.merge,
        sparse.hooks,
        trains_base=True,
        spaces=IN_METHODS_SPACE,
    ),
    "quantum_peft": Method(
        quantum_peft.QuantumPEFTConfig,
        quantum_peft.apply,
        quantum_peft.count,
        "r",
        quantum_peft.merge,
        spaces=IN_METHODS_SPACE,
    ),
    "adapter": Method(
        adapter.AdapterConfig, adapter.apply, adapter.count, "bottleneck", spaces=IN_METHODS_SPACE
    ),
    "parallel_adapter": Method(
        parallel_adapter.ParallelAdapterConfig,
        parallel_adapter.apply,
        parallel_adapter.count,
        "bottleneck",
        spaces=IN_METHODS_SPACE,
    ),
    "prefix": Method(prefix.PrefixConfig, prefix.apply, prefix.count, "length", spaces=IN_METHODS_SPACE),
    "ia3": Method(ia3.IA3Config, ia3.apply, ia3.count, None, ia3.merge, spaces=IN_METHODS_SPACE),
    # LongLoRA is a long-context recipe for LLaMA (its own ``longlora`` space), full fine-tuning and
    # freezing are baselines, the compositions are the hybrid spaces' business
    "full": Method(full.FullConfig, full.apply, full.count, None, full.merge, trains_base=True),
    "prompt": Method(prompt.PromptConfig, prompt.apply, prompt.count, "length"),
    "mam": Method(mam.MAMConfig, mam.apply, mam.count),
    "unipelt": Method(unipelt.UniPELTConfig, unipelt.apply, unipelt.count),
    "bitfit": Method(bitfit.BitFitConfig, bitfit.apply, bitfit.count, None, bitfit.merge),
    "freeze": Method(freeze.FreezeConfig, freeze.apply, freeze.count, None, freeze.merge, trains_base=True),
    "longlora": Method(longlora.LongLoRAConfig, longlora.apply, longlora.count, "r", longlora.merge),
    "hybrid": Method(hybrid.HybridConfig, hybrid.apply, hybrid.count),
    "s4": Method(hybrid.HybridConfig, hybrid.apply, hybrid.count),
    # huggingface/peft's own layers and allocator in our loop, for side-by-side comparisons
    "peft_lora": Method(peft_ref.PeftLoRAConfig, peft_ref.apply, peft_ref.count),
    "peft_adalora": Method(peft_ref.PeftAdaLoRAConfig, peft_ref.apply, peft_ref.count),
}


def method_config_from_dict(values: dict, field_prefix: str = "method"):
    """Build the registered config dataclass named by ``values['name']``; unknown keys fail."""
    values = dict(values)
    name = values.get("name", "adalora")
    if name not in REGISTRY:
        raise ConfigError(f"{field_prefix}.name={name}: unknown method; known methods: {sorted(REGISTRY)}")
    cls = REGISTRY[name].config
    if cls is hybrid.HybridConfig:
        values["name"] = name
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"{field_prefix}.{unknown[0]}: not a knob of method '{name}'; its knobs: {sorted(fields)}"
        )
    return cls(**values)


def apply_method(model, cfg) -> dict:
    """Apply the method described by ``cfg`` (a registered config dataclass).

    A configuration the model cannot take is refused before any module is touched: the exact
    count checks every part of a composition (MAM's prefix, an S4 group's) first, so a refusal
    of the second part does not leave the first one attached.
    """
    from adabudget.arch import arch_of

    try:
        arch = arch_of(model) if hasattr(model, "config") else None
    except ConfigError:  # an architecture without roles: methods with explicit targets still apply
        arch = None
    if arch is not None:
        count_method(cfg, arch)
    return REGISTRY[cfg.name].apply(model, cfg)


def count_method(cfg, arch, layers=None) -> int:
    return REGISTRY[cfg.name].count(cfg, arch, layers)


def count_trainable(method_cfg, model_config, train_head: bool = False, num_labels: int | None = None) -> int:
    """Exact trainable parameters of ``method_cfg`` on the model ``model_config`` describes.

    Analytic (from the HF config alone, nothing is built); equal to the count after
    ``apply`` (tests/test_methods.py checks every method on every architecture).
    """
    from adabudget.arch import arch_from_config

    arch = arch_from_config(model_config, num_labels)
    return count_method(method_cfg, arch) + (arch.head_params if train_head else 0)


def methods_in(cfg) -> list[str]:
    """The registered methods a configuration uses (a hybrid: those of all its groups)."""
    if isinstance(cfg, hybrid.HybridConfig):
        return [m for m in hybrid.ORDER if any(m in g for g in hybrid.parse_groups(cfg))]
    return list(getattr(cfg, "components", None) or [cfg.name])


def check_quantized_base(run) -> None:
    """``model.quantize`` stores the base weights frozen in 4 bits: refuse a method that trains or
    writes them (``Method.trains_base``; a composition: any of its parts) with a ConfigError naming
    the field and the fix. ``adabudget.config.validate`` checks the rest of ``model.quantize``."""
    if run.model.quantize is None:
        return
    names = dict.fromkeys([run.method.name, *methods_in(run.method)])
    trains_base = [m for m in names if m in REGISTRY and REGISTRY[m].trains_base]
    if trains_base:
        raise ConfigError(
            f"model.quantize: method={', '.join(trains_base)} trains or updates the base weights themselves, "
            f"which {run.model.quantize} stores frozen in 4 bits; use model.quantize=null, or a method that "
            "trains on top (lora, adalora, dylora, adapter, ...)"
        )


def adalora_config_of(cfg):
    """The AdaLoRA config of a configuration before it is planned (a hybrid: its first AdaLoRA
    group's, enough for the schedule checks, which only read the phase knobs), or None."""
    if isinstance(cfg, (adalora.AdaLoRAConfig, peft_ref.PeftAdaLoRAConfig)):
        return cfg
    if isinstance(cfg, hybrid.HybridConfig):
        found = [g["adalora"] for g in hybrid.parse_groups(cfg) if "adalora" in g]
        return found[0] if found else None
    return None


@dataclass
class Plan:
    """A method configuration resolved against one backbone, once per run (``plan_of``).

    ``groups``: per layer group its blocks and the method configs with their sizes solved
    (a single method is one group with ``layers=None``: its own ``layers`` knob applies);
    ``adalora``: the config of the one allocator over every AdaLoRA matrix (a hybrid's
    groups share one global budget, b(T) = the sum of their targets), or None.
    """

    method: Any
    groups: list
    adalora: Any

    def methods(self) -> list[str]:
        names = [m for g in self.groups for m in g.methods]
        order = [m for m in hybrid.ORDER if m in names]
        return order + [m for m in dict.fromkeys(names) if m not in order]

    def report(self, arch) -> list[dict]:
        """Per group: layers, and per method its knobs and parameter count (``result.json`` ``groups``)."""
        return hybrid.report_groups(self.groups, arch)


def plan_of(cfg, arch) -> Plan:
    """Parse, solve and validate ``cfg`` against ``arch`` (``adabudget.arch.Arch``; None for a model
    family without one, where only single methods with explicit targets work)."""
    if isinstance(cfg, hybrid.HybridConfig):
        groups = hybrid.plan(cfg, arch)
        return Plan(cfg, groups, hybrid.adalora_of_groups(groups, arch))
    return Plan(cfg, [hybrid.Group(0, None, {cfg.name: cfg})], adalora_config_of(cfg))


def apply_plan(model, plan: Plan) -> dict:
    """Apply a plan's groups in order; returns {module name: module} of everything added or wrapped."""
    return hybrid.apply_groups(model, plan.groups)


def step_hooks(model, plan: Plan, wrapped: dict) -> list[MethodHooks]:
    """The ``MethodHooks`` of every method in ``plan`` that has them, in the plan's order."""
    out = []
    for group in plan.groups:
        for name, cfg in group.methods.items():
            make = REGISTRY[name].hooks if name in REGISTRY else None
            if make is not None:
                hooks = make(model, wrapped, cfg)
                if hooks is not None:
                    out.append(hooks)
    return out


def hook_states(hooks: list[MethodHooks]) -> list:
    """Every hooks object's ``state_dict()`` (None where it keeps nothing), for a checkpoint or
    ``hooks.pt``."""
    return [h.state_dict() for h in hooks]


def load_hook_states(hooks: list[MethodHooks], states) -> None:
    """Restore what ``hook_states(hooks)`` saved (a checkpoint's, an adapter's ``hooks.pt``)."""
    for h, state in zip(hooks, states or []):
        if state is not None:
            h.load_state_dict(state)


def closest_size(cfg, arch, target: float) -> int:
    """The value of ``cfg``'s size knob (``REGISTRY[cfg.name].size``) in 1..max(2, h) whose count on
    ``arch`` is closest to ``target`` (counts grow with the size: a bisection). A size the method's
    config refuses (IncreLoRA's ``max_rank`` below its ``target_r``) counts as too small: the
    refusals sit at the small end; none is returned."""
    import math

    size = REGISTRY[cfg.name].size

    def count(k: int) -> float:
        try:
            changed = dataclasses.replace(cfg, **{size: k})
            changed.validate()
            return count_method(changed, arch)
        except ConfigError:
            return -math.inf

    lo, hi = 1, max(2, arch.hidden)
    while lo < hi:  # the smallest size whose count reaches the target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < target else (lo, mid)
    best = min((lo - 1, lo), key=lambda k: abs(count(k) - target) if k >= 1 else math.inf)
    if count(best) == -math.inf:
        raise ConfigError(
            f"method.{size}: no size of {cfg.name} in 1..{hi} that its config accepts comes near "
            f"{target:.0f} parameters; change the method's other knobs"
        )
    return best


def describe(cfg, arch) -> list[dict]:
    """Per group and per method: layers, knobs and parameters (``result.json`` ``groups``)."""
    return plan_of(cfg, arch).report(arch)


def fold_all(model, wrapped: dict) -> None:
    """Fold training-only reparameterisations (prefix-tuning's MLP) into plain parameters."""
    for module in wrapped.values():
        if hasattr(module, "fold_"):
            module.fold_()
