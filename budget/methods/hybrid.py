"""Hybrid PEFT configurations: per layer group, any set of methods, each with its own size.

The S4 design space (Chen et al., ICLR 2023): the L blocks are split into G consecutive
groups (``adabudget.groups``), each group gets a subset of methods (or ``none``), and a total
trainable-parameter budget may replace the sizes: then the sizes given act as proportions
and are solved (``solve_sizes``) so the whole configuration holds the budget within
``tolerance`` (2% by default), shared across groups by ``allocation``. S4's discovered
pattern is ``configs/method/s4.yaml``:

    grouping: spindle, 4 groups; G1 = adapter + lora; G2 = adapter + prefix;
    G3 = adapter + prefix + bitfit; G4 = prefix + bitfit + lora.

Within a group the methods are applied in ``ORDER``: LoRA-family layers replace linears
first, every other method hooks the module then at its path (see ``adabudget.methods``),
so e.g. an adapter after the FFN sees the LoRA-updated FFN output. AdaLoRA in several
groups shares one global budget over all its triplets (the allocator's b(T) is the sum of
the groups' target ranks); the other methods do not take part in its budget.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from adabudget.config import ConfigError
from adabudget.groups import PATTERNS, allocation_shares, split_layers

# The order in which a group's methods are applied (module replacers before hookers).
ORDER = ("freeze", "bitfit", "lora", "adalora", "ia3", "adapter", "parallel_adapter", "prefix", "prompt")


@dataclass
class HybridConfig:
    """A hybrid configuration. Example (``configs/method/s4.yaml`` on MiniLM, L = 6):

    ``grouping=spindle, num_groups=4`` -> groups [[0], [1, 2], [3, 4], [5]];
    ``groups[0] = {adapter: {bottleneck: 16}, lora: {r: 8}}`` puts a 16-wide Houlsby adapter
    and rank-8 LoRA on block 0; ``budget=200000`` rescales every size so the total is
    200,000 +- 2% with ``allocation=uniform`` giving each group a quarter.
    """

    name: str = "hybrid"  # hybrid | s4 (the same method; s4 names the S4 paper's preset)
    num_groups: int = 4  # G
    grouping: Any = "spindle"  # uniform | spindle | increasing | decreasing | explicit sizes [2, 4, 4, 2]
    # One entry per group: {method: {knob: value}}, or "none" / {} for a group left frozen.
    groups: list = field(default_factory=list)
    budget: Optional[int] = None  # total trainable parameters (task head excluded); sizes become proportions
    budget_percent: Optional[float] = None  # the budget as % of the backbone's parameters instead
    allocation: Any = "uniform"  # budget share per group: uniform | increasing | decreasing | [shares]
    tolerance: float = 0.02  # |count - budget| <= tolerance x budget, or the solve fails

    def validate(self) -> None:
        if self.name not in ("hybrid", "s4"):
            raise ConfigError(f"method.name={self.name}: a HybridConfig is named hybrid or s4")
        if self.num_groups < 1:
            raise ConfigError(f"method.num_groups: must be >= 1, got {self.num_groups}")
        if isinstance(self.grouping, str) and self.grouping not in PATTERNS:
            raise ConfigError(
                f"method.grouping={self.grouping}: unknown pattern; use one of {PATTERNS} or a list of sizes"
            )
        if not isinstance(self.grouping, str) and len(list(self.grouping)) != self.num_groups:
            raise ConfigError(
                f"method.grouping={list(self.grouping)}: {len(list(self.grouping))} sizes for "
                f"num_groups={self.num_groups}; give one size per group"
            )
        if len(self.groups) != self.num_groups:
            raise ConfigError(
                f"method.groups: {len(self.groups)} entries for num_groups={self.num_groups}; give one "
                "entry per group ({method: {knobs}} or none)"
            )
        if self.budget is not None and self.budget_percent is not None:
            raise ConfigError("method.budget: set at most one of budget and budget_percent")
        if self.budget is not None and self.budget < 1:
            raise ConfigError(f"method.budget: must be >= 1 parameter, got {self.budget}")
        if self.budget_percent is not None and not 0 < self.budget_percent <= 100:
            raise ConfigError(f"method.budget_percent: must be in (0, 100], got {self.budget_percent}")
        if not 0 < self.tolerance < 1:
            raise ConfigError(f"method.tolerance: must be in (0, 1), got {self.tolerance}")
        allocation_shares(self.num_groups, self.allocation)
        parsed = parse_groups(self)
        for g, methods in enumerate(parsed):
            if "freeze" in methods and "bitfit" in methods:
                raise ConfigError(
                    f"method.groups[{g}]: freeze already trains every bias of the group; drop bitfit there"
                )
        prompts = sum("prompt" in g for g in parsed)
        if prompts > 1:
            raise ConfigError(
                "method.groups: prompt is model-level (input embeddings); use it in one group only"
            )
        adalora = [g["adalora"] for g in parsed if "adalora" in g]
        for other in adalora[1:]:
            for knob in (
                "warmup_steps",
                "final_steps",
                "mask_interval",
                "beta1",
                "beta2",
                "score",
                "shrink",
                "orth_reg_weight",
                "orth_squared",
                "lambda_lr_ratio",
                "reset_pruned_momentum",
            ):
                if getattr(other, knob) != getattr(adalora[0], knob):
                    raise ConfigError(
                        f"method.groups: adalora.{knob} differs between groups; the AdaLoRA groups share one "
                        "global budget schedule, so give them the same schedule knobs"
                    )
            if other.target_total_rank is not None or other.target_params is not None:
                raise ConfigError(
                    "method.groups: in a hybrid, give each AdaLoRA group its budget as target_r "
                    "(average rank)"
                )


def parse_groups(cfg: HybridConfig) -> list[dict]:
    """The groups as {method name: validated config dataclass}, in application ``ORDER``."""
    from adabudget.methods import REGISTRY

    out = []
    for g, entry in enumerate(cfg.groups):
        where = f"method.groups[{g}]"
        if entry is None or entry == "none" or entry == {}:
            out.append({})
            continue
        if isinstance(entry, str):
            entry = {entry: {}}
        if not hasattr(entry, "items"):
            raise ConfigError(f"{where}={entry}: give {{method: {{knobs}}}} or none")
        methods = {}
        for name, knobs in entry.items():
            name = str(name)
            if name not in ORDER:  # whole-model methods, and the seed families not (yet) in groups
                why = "a registered method, but not one a group can use" if name in REGISTRY else "unknown"
                raise ConfigError(f"{where}.{name}: {why}; a group uses some of {sorted(ORDER)}")
            knobs = dict(knobs or {})
            if "layers" in knobs:
                raise ConfigError(f"{where}.{name}.layers: the group sets the layers; remove the key")
            knobs.pop("name", None)
            cls = REGISTRY[name].config
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(knobs) - names)
            if unknown:
                raise ConfigError(
                    f"{where}.{name}.{unknown[0]}: not a knob of {name}; its knobs: {sorted(names)}"
                )
            mcfg = cls(**knobs)
            try:
                mcfg.validate()
            except ConfigError as err:
                raise ConfigError(f"{where}.{name}: {err}") from err
            if name == "adalora" and getattr(mcfg, "dora", False):
                # the groups' AdaLoRA shares one allocator and budget, which count triplets only
                raise ConfigError(
                    f"{where}.adalora.dora: DoRA on AdaLoRA runs as method=adalora method.dora=true, not "
                    "inside a hybrid group; remove the key (a group's lora takes dora)"
                )
            methods[name] = mcfg
        out.append({m: methods[m] for m in ORDER if m in methods})
    return out


@dataclass
class Group:
    index: int
    layers: Optional[list]  # block indices; None: a single method on its own layers (all blocks and outside)
    methods: dict  # name -> config dataclass (sizes solved when a budget is set)


def plan(cfg: HybridConfig, arch) -> list[Group]:
    """The groups with their layers and final method configs (sizes solved for a budget)."""
    layer_groups = split_layers(arch.num_layers, cfg.num_groups, cfg.grouping)
    groups = [
        Group(i, layers, methods) for i, (layers, methods) in enumerate(zip(layer_groups, parse_groups(cfg)))
    ]
    for g in groups:  # LoRA and AdaLoRA both replace a linear: they cannot share one
        if "lora" in g.methods and "adalora" in g.methods:
            shared = _targets(g.methods["lora"], arch, g.layers) & _targets(
                g.methods["adalora"], arch, g.layers
            )
            if shared:
                raise ConfigError(
                    f"method.groups[{g.index}]: lora and adalora both adapt {sorted(shared)[0]} (and "
                    f"{len(shared) - 1} more); give them disjoint target_modules or keep one of them"
                )
    target = budget_params(cfg, arch)
    if target is not None:
        solve_sizes(groups, arch, target, allocation_shares(cfg.num_groups, cfg.allocation), cfg.tolerance)
    return groups


def _targets(c, arch, layers) -> set[str]:
    return {name for name, _ in arch.match_linears(c.target_modules or arch.default_targets(), layers)}


def budget_params(cfg: HybridConfig, arch) -> int | None:
    if cfg.budget is not None:
        return int(cfg.budget)
    if cfg.budget_percent is not None:
        return int(round(arch.backbone_params() * cfg.budget_percent / 100))
    return None


def count(cfg: HybridConfig, arch, layers: list[int] | None = None) -> int:
    """Trainable parameters at the start of training, summed over groups and methods."""
    from adabudget.methods import REGISTRY

    return sum(REGISTRY[m].count(c, arch, g.layers) for g in plan(cfg, arch) for m, c in g.methods.items())


def apply(model, cfg: HybridConfig, layers: list[int] | None = None) -> dict:
    """Apply every group's methods to its blocks; returns {module name: module} of all of them."""
    from adabudget.arch import arch_of

    if layers is not None:
        raise ConfigError(
            "method: a hybrid configuration sets its own layers (grouping); it cannot be nested"
        )
    return apply_groups(model, plan(cfg, arch_of(model)))


def apply_groups(model, groups: list[Group]) -> dict:
    """Apply planned groups (``plan``) in order; returns {module name: module} of all of them."""
    from adabudget.methods import REGISTRY

    wrapped = {}
    for group in groups:
        for name, mcfg in group.methods.items():
            wrapped.update(REGISTRY[name].apply(model, mcfg, group.layers))
    return wrapped


def report(cfg: HybridConfig, arch) -> list[dict]:
    """Per group: its layers, and per method its knobs and parameter count (for result.json)."""
    return report_groups(plan(cfg, arch), arch)


def report_groups(groups: list[Group], arch) -> list[dict]:
    """``report`` of planned groups; a group with ``layers=None`` (a single method) covers every block."""
    from adabudget.methods import REGISTRY

    out = []
    for g in groups:
        methods = {
            m: {
                "params": REGISTRY[m].count(c, arch, g.layers),
                **({"ranks_move": True} if REGISTRY[m].ranks_move else {}),
                **_knobs(c),
            }
            for m, c in g.methods.items()
        }
        layers = (
            g.layers
            if g.layers is not None
            else arch.layers(getattr(next(iter(g.methods.values())), "layers", None))
        )
        out.append(
            {
                "group": g.index,
                "layers": layers,
                "methods": methods or "none",
                "params": sum(v["params"] for v in methods.values()),
            }
        )
    return out


def adalora_config(cfg: HybridConfig, arch):
    """One AdaLoRA config for the global allocator: the groups' schedule, b(T) = sum of their targets."""
    return adalora_of_groups(plan(cfg, arch), arch)


def adalora_of_groups(groups: list[Group], arch):
    """``adalora_config`` of planned groups."""
    groups = [g for g in groups if "adalora" in g.methods]
    if not groups:
        return None
    first = groups[0].methods["adalora"]
    if len(groups) == 1:
        return first
    total = 0
    for g in groups:
        c = g.methods["adalora"]
        patterns = c.target_modules or arch.default_targets()
        total += round(c.target_r * len(arch.match_linears(patterns, g.layers)))
    max_rank = max(g.methods["adalora"].max_rank or g.methods["adalora"].init_r for g in groups)
    init_r = max(g.methods["adalora"].init_r for g in groups)
    return dataclasses.replace(first, init_r=init_r, target_total_rank=total, max_rank=max_rank)


def _knobs(c) -> dict:
    return {k: v for k, v in dataclasses.asdict(c).items() if k not in ("name", "layers")}


# ---------------------------------------------------------------- budget solving
def final_count(name: str, c, arch, layers) -> int:
    """Parameters a method holds at the end of training (AdaLoRA: its b(T) triplets): what a
    budget constrains, and what the solver and the search spaces count."""
    from adabudget.methods import REGISTRY

    if name == "adalora":
        patterns = c.target_modules or arch.default_targets()
        from adabudget.methods.adalora import triplet_cost

        return round(sum(c.target_r * triplet_cost(s) for _, s in arch.match_linears(patterns, layers)))
    return REGISTRY[name].count(c, arch, layers)


def _with_size(name: str, c, size: int):
    from adabudget.methods import REGISTRY

    knob = REGISTRY[name].size
    if name == "adalora":
        # keep the configured b(0) / b(T) ratio (the paper uses 1.5)
        ratio = c.init_r / c.target_r
        return dataclasses.replace(c, target_r=float(size), init_r=max(size + 1, math.ceil(ratio * size)))
    changes = {knob: int(size)}
    if hasattr(c, "reduction_factor"):
        changes["reduction_factor"] = None
    return dataclasses.replace(c, **changes)


def _size_of(name: str, c) -> float:
    from adabudget.methods import REGISTRY

    if name == "adalora":
        return float(c.target_r)
    value = getattr(c, REGISTRY[name].size)
    if value is None and getattr(c, "reduction_factor", None):  # adapter sized by reduction factor
        return float(c.reduction_factor)  # replaced below by the bottleneck it implies
    return float(value)


def solve_sizes(groups: list[Group], arch, target: int, shares: list[float], tolerance: float) -> None:
    """Rescale the size knobs of ``groups`` in place so the total count meets ``target``.

    Per group, the sizes given are proportions: one multiplier per group is found by
    bisection so the group's count meets its share of the budget (fixed-size methods such
    as BitFit and (IA)³ are paid first; shares of groups with nothing to scale go to the
    others); then single sizes move by +-1 while that brings the total closer. Raises
    ConfigError when the result misses the budget by more than ``tolerance``.
    """
    from adabudget.methods import REGISTRY

    def group_count(g: Group) -> int:
        return sum(final_count(m, c, arch, g.layers) for m, c in g.methods.items())

    for g in groups:  # adapters sized by a reduction factor: turn it into a bottleneck first
        for m, c in list(g.methods.items()):
            if getattr(c, "reduction_factor", None):
                g.methods[m] = _with_size(m, c, max(1, arch.hidden // c.reduction_factor))
    scalable = [[m for m in g.methods if REGISTRY[m].size is not None] for g in groups]
    fixed = [
        sum(final_count(m, c, arch, g.layers) for m, c in g.methods.items() if m not in s)
        for g, s in zip(groups, scalable)
    ]
    live = [i for i, g in enumerate(groups) if scalable[i]]
    if not live:
        raise ConfigError(
            "method.budget: no group has a method with a size (lora, adalora, adapter, prefix, ...)"
        )
    free = target - sum(fixed)
    if free <= 0:
        raise ConfigError(
            f"method.budget={target}: the fixed-size methods (bitfit, ia3, freeze) alone hold {sum(fixed)} "
            "parameters; raise the budget or drop some of them"
        )
    share_sum = sum(shares[i] for i in live)
    base = {(i, m): _size_of(m, groups[i].methods[m]) for i in live for m in scalable[i]}
    for i in live:
        goal = free * shares[i] / share_sum + fixed[i]
        g = groups[i]
        original = dict(g.methods)

        def sized(mult: float, g=g, i=i, original=original) -> int:
            for m in scalable[i]:
                g.methods[m] = _with_size(m, original[m], max(1, round(base[(i, m)] * mult)))
            return group_count(g)

        lo, hi = 0.0, 1.0
        while sized(hi) < goal and hi < 1e6:
            hi *= 2
        for _ in range(60):
            mid = (lo + hi) / 2
            if sized(mid) < goal:
                lo = mid
            else:
                hi = mid
        # the closer of the two brackets
        below, above = sized(lo), sized(hi)
        sized(hi if abs(above - goal) <= abs(below - goal) else lo)

    def total() -> int:
        return sum(group_count(g) for g in groups)

    # greedy +-1 moves on single sizes while they bring the total closer to the budget
    best = total()
    improved = True
    while improved and best != target:
        improved = False
        for i in live:
            for m in scalable[i]:
                c = groups[i].methods[m]
                size = int(round(_size_of(m, c)))
                for step in (-1, 1):
                    if size + step < 1:
                        continue
                    groups[i].methods[m] = _with_size(m, c, size + step)
                    now = total()
                    if abs(now - target) < abs(best - target):
                        best, improved, c = now, True, groups[i].methods[m]
                        size += step
                    else:
                        groups[i].methods[m] = c
    if abs(best - target) > tolerance * target:
        raise ConfigError(
            f"method.budget={target}: the closest this configuration gets is {best} parameters "
            f"({100 * (best - target) / target:+.1f}%, tolerance {100 * tolerance:g}%); the unit sizes are "
            "too coarse for this model: raise the budget, add a finer method (lora, prefix), or raise "
            "method.tolerance"
        )
