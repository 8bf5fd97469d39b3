"""The space of a weight-sharing supernet (``search.scorer=supernet``; the supernet itself is
``search/supernet.py``): a sub-configuration (``Sub``) is, per method, a size from its menu in every
block (0 = off there); ``SupernetSpace`` holds their exact counts, the budget band, and the
sampling, mutation and crossover the evolution uses. Pure counting: no model is built here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
from adabudget.arch import Arch
from adabudget.config import ConfigError
from adabudget.methods import REGISTRY
from adabudget.search.config import SupernetConfig
from adabudget.search.spaces.context import SpaceContext

METHODS = (
    "lora",
    "adapter",
    "parallel_adapter",
    "prefix",
)  # the order adabudget.methods.hybrid applies them in

BATCH = 4096  # candidates per vectorised rejection round

MAX_DRAWS = 400_000  # rejection draws before a greedy repair takes over


@dataclass(frozen=True)
class Sub:
    """A sub-configuration: per method, its size in every block (0: off in that block)."""

    sizes: tuple  # ((method, (size in block 0, block 1, ...)), ...), methods in METHODS order

    @classmethod
    def of(cls, mapping: dict) -> Sub:
        return cls(tuple((m, tuple(int(v) for v in mapping[m])) for m in METHODS if m in mapping))

    def get(self, method: str) -> tuple[int, ...]:
        return dict(self.sizes)[method]

    def as_dict(self) -> dict[str, list[int]]:
        return {m: list(s) for m, s in self.sizes}

    def key(self) -> str:
        """``lora=8,0 adapter=16,16 prefix=0,5``: per method, the sizes of blocks 0, 1, ..."""
        return " ".join(f"{m}={','.join(map(str, s))}" for m, s in self.sizes)

    @classmethod
    def from_key(cls, key: str) -> Sub:
        return cls.of(
            {m: [int(v) for v in s.split(",")] for m, s in (part.split("=") for part in key.split())}
        )


class SupernetSpace:
    """The sub-configurations of one supernet on one backbone, their exact counts and the budget band.

    Args:
        arch: the backbone (``adabudget.arch.Arch``).
        menus: method -> sizes (0 = off); methods left out have none.
        scfg: the supernet's knobs (LoRA scaling, adapter placement, tolerance).
        budget: the trainable-parameter budget (task head excluded), or None.
    """

    def __init__(
        self, arch: Arch, menus: dict[str, tuple[int, ...]], scfg: SupernetConfig, budget: int | None
    ):
        self.arch, self.scfg, self.budget, self.tolerance = arch, scfg, budget, scfg.tolerance
        self.methods = tuple(m for m in METHODS if m in menus)
        self.menus = {m: tuple(sorted(menus[m])) for m in self.methods}
        self.layers = arch.num_layers
        # units (method, block) in order; per unit its menu and each choice's exact count
        self.units = [(m, i) for m in self.methods for i in range(self.layers)]
        width = max(len(self.menus[m]) for m in self.methods)
        self.choices = np.array([len(self.menus[m]) for m, _ in self.units])  # (U,)
        self.table = np.zeros((len(self.units), width), dtype=np.int64)  # (U, K) count of choice k
        for u, (m, i) in enumerate(self.units):
            for k, size in enumerate(self.menus[m]):
                self.table[u, k] = self.unit_count(m, size, i)
        self._extremes: dict[str, Sub] = {}

    @classmethod
    def from_context(cls, ctx, scfg: SupernetConfig | None = None) -> SupernetSpace:
        """The space of ``scfg`` (default: ``ctx.supernet``) on ``ctx``'s backbone and budget."""
        scfg = scfg or getattr(ctx, "supernet", None) or SupernetConfig()
        menus = {}
        for m in METHODS:
            menu = [int(v) for v in getattr(scfg, m)]
            if m != "prefix":  # a rank or bottleneck beyond h buys nothing (as search.space's menus)
                menu = [v for v in menu if v <= ctx.arch.hidden]
            if m in ctx.applicable and menu and max(menu) > 0:
                menus[m] = tuple(sorted(set(menu) | {0}))
        if not menus:
            raise ConfigError(
                f"search.supernet: no method of the supernet applies to this {ctx.arch.model_type} with "
                "these menus (lora / adapter / prefix / parallel_adapter all [0] or excluded: "
                f"{ctx.excluded})"
            )
        return cls(ctx.arch, menus, scfg, ctx.budget)

    # ---- configurations
    def knobs(self, method: str, size: int) -> dict:
        """The method's knobs at ``size`` (what the stand-alone hybrid group holds)."""
        if method == "lora":
            return {"r": size, "alpha": self.scfg.lora_scaling * size}
        if method == "adapter":
            return {"bottleneck": size, "placement": self.scfg.adapter_placement}
        if method == "parallel_adapter":
            return {"bottleneck": size}
        return {"length": size}

    def unit_count(self, method: str, size: int, layer: int) -> int:
        if size == 0:
            return 0
        spec = REGISTRY[method]
        return spec.count(spec.config(**self.knobs(method, size)), self.arch, [layer])

    def to_method(self, sub: Sub) -> dict:
        """The stand-alone ``hybrid`` method node of ``sub``: one group per run of identical blocks."""
        per_block = []
        for i in range(self.layers):
            entry = {m: self.knobs(m, sub.get(m)[i]) for m in self.methods if sub.get(m)[i] > 0}
            per_block.append(entry or "none")
        sizes, groups = [], []
        for entry in per_block:
            if groups and groups[-1] == entry:
                sizes[-1] += 1
            else:
                sizes.append(1)
                groups.append(entry)
        return {
            "name": "hybrid",
            "num_groups": len(groups),
            "grouping": sizes,
            "allocation": "uniform",
            "groups": copy.deepcopy(groups),
        }

    def full(self) -> Sub:
        """Every module at its largest size: what the supernet holds."""
        return Sub.of({m: [max(self.menus[m])] * self.layers for m in self.methods})

    def count(self, sub: Sub) -> int:
        """Trainable parameters of ``sub`` (task head excluded): ``count_trainable`` of ``to_method``."""
        return int(self.table[np.arange(len(self.units)), self._index(sub)].sum())

    def band(self) -> tuple[float, float]:
        if self.budget is None:
            return 1.0, math.inf
        return self.budget * (1 - self.tolerance), self.budget * (1 + self.tolerance)

    def feasible(self, sub: Sub) -> bool:
        return bool(self._in_band(np.array([self.count(sub)]))[0])

    def _in_band(self, counts: np.ndarray) -> np.ndarray:
        if self.budget is None:
            return counts > 0
        return np.abs(counts - self.budget) <= self.tolerance * self.budget

    def _index(self, sub: Sub) -> np.ndarray:
        sizes = sub.as_dict()
        return np.array([self.menus[m].index(sizes[m][i]) for m, i in self.units])

    def _sub(self, index) -> Sub:
        per = {m: [0] * self.layers for m in self.methods}
        for (m, i), k in zip(self.units, index):
            per[m][i] = self.menus[m][int(k)]
        return Sub.of(per)

    def _counts(self, index: np.ndarray) -> np.ndarray:
        """Counts of rows of menu indices (N, U)."""
        return self.table[np.arange(len(self.units)), index].sum(-1)

    # ---- Optuna
    def suggest(self, trial) -> Sub:
        """``l<block>.<method>`` categorical choices on an Optuna trial."""
        return Sub.of(
            {
                m: [trial.suggest_categorical(f"l{i}.{m}", list(self.menus[m])) for i in range(self.layers)]
                for m in self.methods
            }
        )

    def params(self, sub: Sub) -> dict:
        return {f"l{i}.{m}": s[i] for m, s in sub.sizes for i in range(self.layers)}

    def from_params(self, params: dict) -> Sub:
        return Sub.of({m: [params[f"l{i}.{m}"] for i in range(self.layers)] for m in self.methods})

    # ---- sampling under the budget
    def sample(self, rng: np.random.Generator, n: int = 1) -> list[Sub]:
        """``n`` sub-configurations drawn uniformly among the feasible ones (with repetition).

        Raises:
            ConfigError: naming ``search.budget`` when no sub-configuration meets the budget.
        """
        out: list[Sub] = []
        drawn = 0
        while len(out) < n and drawn < MAX_DRAWS:
            index = rng.integers(0, self.choices, size=(BATCH, len(self.units)))  # (BATCH, U)
            ok = np.nonzero(self._in_band(self._counts(index)))[0]
            out += [self._sub(index[j]) for j in ok[: n - len(out)]]
            drawn += BATCH
        for _ in range(n - len(out)):  # a narrow band: greedy repair from random starts
            out.append(self._repair(rng))
        return out

    def _repair(self, rng: np.random.Generator) -> Sub:
        lo, hi = self.band()
        goal = self.budget if self.budget is not None else 1
        for _ in range(64):
            index = rng.integers(0, self.choices)
            for _ in range(8 * len(self.units)):
                now = int(self._counts(index))
                if lo <= now <= hi:
                    return self._sub(index)
                best, move = abs(now - goal), None
                for u in range(len(self.units)):
                    for k in range(self.choices[u]):
                        c = now - self.table[u, index[u]] + self.table[u, k]
                        if abs(c - goal) < best:
                            best, move = abs(c - goal), (u, k)
                if move is None:
                    break
                index[move[0]] = move[1]
        total = int(self.table.max(1).sum())
        raise ConfigError(
            f"search.budget={self.budget}: no sub-configuration of the supernet holds {lo:.0f}..{hi:.0f} "
            f"trainable parameters (search.supernet.tolerance={self.tolerance:g}; the largest holds "
            f"{total}); change the budget, the menus (search.supernet.lora / adapter / prefix) "
            "or the tolerance"
        )

    def check(self) -> float:
        """Raise a ConfigError if no sub-configuration is feasible; returns the feasible fraction
        of uniform draws (an estimate)."""
        rng = np.random.default_rng(0)
        index = rng.integers(0, self.choices, size=(BATCH, len(self.units)))
        fraction = float(self._in_band(self._counts(index)).mean())
        if fraction == 0:
            self.sample(rng, 1)
        return fraction

    def extreme(self, which: str) -> Sub:
        """The feasible sub-configuration of largest (``"largest"``) or smallest count: the best of a
        seeded pool, then single-unit moves while they grow (shrink) the count within the band.
        Without a budget: every module at its largest; the cheapest single module."""
        if which in self._extremes:
            return self._extremes[which]
        sign = 1 if which == "largest" else -1
        pool = self.sample(np.random.default_rng(0), 256)
        index = self._index(max(pool, key=lambda s: sign * self.count(s)))
        lo, hi = self.band()
        while True:
            now = int(self._counts(index))
            best, move = 0, None
            for u in range(len(self.units)):
                for k in range(self.choices[u]):
                    c = now - self.table[u, index[u]] + self.table[u, k]
                    if lo <= c <= hi and sign * (c - now) > best:
                        best, move = sign * (c - now), (u, k)
            if move is None:
                break
            index[move[0]] = move[1]
        self._extremes[which] = self._sub(index)
        return self._extremes[which]

    def spread(self, n: int, rng: np.random.Generator) -> list[Sub]:
        """``n`` distinct feasible sub-configurations spread over the space: farthest-point picks
        (L1 distance of normalised menu positions) from a uniform feasible pool."""
        pool = list(dict.fromkeys(self.sample(rng, max(40 * n, 512))))
        points = np.array([self._index(s) / np.maximum(self.choices - 1, 1) for s in pool])  # (P, U)
        picked = [int(rng.integers(len(pool)))]
        dist = np.abs(points - points[picked[0]]).sum(1)
        while len(picked) < min(n, len(pool)):
            j = int(dist.argmax())
            picked.append(j)
            dist = np.minimum(dist, np.abs(points - points[j]).sum(1))
        return [pool[j] for j in picked]

    def mutate(self, sub: Sub, rng: np.random.Generator, prob: float) -> Sub:
        """Each unit re-drawn from its menu with probability ``prob`` (at least one), within the band."""
        base = self._index(sub)
        for _ in range(100):
            index = base.copy()
            change = rng.random(len(self.units)) < prob
            change[rng.integers(len(self.units))] = True
            index[change] = rng.integers(0, self.choices[change])
            if (index != base).any() and self._in_band(np.array([self._counts(index)]))[0]:
                return self._sub(index)
        return self.sample(rng, 1)[0]

    def crossover(self, a: Sub, b: Sub, rng: np.random.Generator) -> Sub:
        """Each unit from ``a`` or ``b`` with equal odds, within the band (else a mutant of ``a``)."""
        ia, ib = self._index(a), self._index(b)
        for _ in range(100):
            index = np.where(rng.random(len(self.units)) < 0.5, ia, ib)
            if self._in_band(np.array([self._counts(index)]))[0]:
                return self._sub(index)
        return self.mutate(a, rng, 1 / len(self.units))


def space_function(space: SupernetSpace):
    """The space as a ``search.space`` function (``(trial, ctx) -> overrides``) with exact sizes:
    ``search.space.sample`` counts it and checks the band, and never rescales it."""

    def supernet(trial, ctx) -> dict:
        return {"method": space.to_method(space.suggest(trial))}

    supernet.space_name = "supernet"
    supernet.exact_sizes = True
    return supernet


def describe(space: SupernetSpace) -> dict:
    """What a study's ``search.json`` says about its supernet space."""
    lo, hi = space.band()
    return {
        "methods": list(space.methods),
        "menus": {m: list(v) for m, v in space.menus.items()},
        "budget": space.budget,
        "band": [lo, None if math.isinf(hi) else hi],
        "configurations": int(np.prod(space.choices.astype(float))),
    }


def supernet_space(trial, ctx: SpaceContext) -> dict:
    """The space of a weight-sharing supernet (``search.supernet``; ``search/supernet.py``): per block
    ``l<i>.<method>`` a size from each method's menu (``search.supernet.lora`` ranks, ``adapter``
    bottlenecks, ``prefix`` lengths, 0 = off in that block), as a hybrid of one group per run of
    identical blocks. The sizes are exact (never solved to the budget): with ``search.budget`` a
    configuration outside ``search.supernet.tolerance`` of it is infeasible. ``search.scorer=supernet``
    scores these on a trained supernet; the default scorer trains each (the plain search to compare with).
    """
    space = SupernetSpace.from_context(ctx)
    return {"method": space.to_method(space.suggest(trial))}


supernet_space.exact_sizes = True
