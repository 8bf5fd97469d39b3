"""The ``search`` node of ``adabudget search``: one dataclass, its defaults and its checks.

The rest of the config is an ordinary run config (``budget.config.RunConfig``): every trial is
that run with the sampled configuration merged on top.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from budget.config import ConfigError

SAMPLERS = ("tpe", "nsga2", "gp", "random", "grid")
PRUNERS = ("none", "median", "hyperband")
# Objectives that are minimised; every dev.<metric> but mse is maximised.
MINIMISED = ("params", "wall_time", "dev.mse")


@dataclass
class SearchConfig:
    """A study over PEFT configurations. Example: ``adabudget search search.space=[s4,lr]
    search.budget=331776 search.n_trials=30 search.workers=2`` samples S4 hybrids and learning
    rates, every hybrid solved to 331,776 trainable parameters (LoRA r=8's count on MiniLM),
    two worker processes sharing one journal file, until 30 trials have trained."""

    study: Optional[str] = None  # name; default <space>-<task> (e.g. s4-lr-mr)
    space: Any = (
        "s4"  # a built-in space (s4, autopeft, adalora, lr), a configs/search/space/<name>.yaml, or a list
    )
    n_trials: int = 20  # trained trials wanted (completed or pruned); a resumed study counts the ones it has
    workers: int = 1  # processes on this machine, one trial each at a time
    threads: Optional[int] = None  # torch threads per worker; default: cores / workers
    # null: a journal file runs/search/<study>/journal.log (several processes on one machine);
    # postgresql://user@host:port/db for several machines (heartbeats); a path ending in .log: a journal
    storage: Optional[str] = None
    objectives: Optional[list] = None  # default [dev.<primary metric>]; e.g. [dev.accuracy, params]
    directions: Optional[list] = (
        None  # default: inferred (dev.* maximise, dev.mse / params / wall_time minimise)
    )
    sampler: str = "tpe"  # tpe | nsga2 | gp | random | grid (grid: declarative spaces of choices)
    pruner: str = "none"  # none | median | hyperband: single objective, fed by the dev evaluations
    budget: Optional[int] = None  # trainable adapter parameters every sampled configuration is solved to
    budget_percent: Optional[float] = None  # the budget as % of the backbone instead
    extra_methods: list = field(default_factory=list)  # ia3, parallel_adapter, prompt in s4 groups
    seed: int = 0  # the sampler's seed
    # Known configurations trained first: default = LoRA and AdaLoRA at the budget and the S4
    # pattern; [] none; names from those three, or {method: {...}, train: {...}} override dicts.
    enqueue: Any = "default"
    trial_overrides: list = field(default_factory=list)  # dotlist for search trials only (a shorter schedule)
    retrain_top_k: int = 0  # after the search: re-train the K best (and the baselines) on the full schedule
    retrain_seeds: list = field(default_factory=lambda: [42, 1, 2])
    max_retries: int = 2  # a trial whose worker died is re-run with the same parameters this often
    grace_period: float = 600.0  # s without a heartbeat before another host's running trial is stale
    root: Optional[str] = None  # default <runs_root>/search

    def validate(self, primary: str | None = None) -> None:
        def check(cond: bool, fld: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"search.{fld}: {msg}")

        check(self.n_trials >= 1, "n_trials", f"must be >= 1, got {self.n_trials}")
        check(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        check(self.threads is None or self.threads >= 1, "threads", "must be >= 1 or null")
        check(self.sampler in SAMPLERS, "sampler", f"unknown sampler '{self.sampler}'; use one of {SAMPLERS}")
        check(self.pruner in PRUNERS, "pruner", f"unknown pruner '{self.pruner}'; use one of {PRUNERS}")
        check(self.budget is None or self.budget >= 1, "budget", "must be >= 1 parameter or null")
        check(
            self.budget_percent is None or 0 < self.budget_percent <= 100,
            "budget_percent",
            "must be in (0, 100]",
        )
        check(
            self.budget is None or self.budget_percent is None,
            "budget",
            "set budget or budget_percent, not both",
        )
        check(self.retrain_top_k >= 0, "retrain_top_k", "must be >= 0")
        check(
            not self.retrain_top_k or len(self.retrain_seeds) >= 1, "retrain_seeds", "give at least one seed"
        )
        check(self.max_retries >= 0, "max_retries", "must be >= 0")
        objectives = self.objective_names(primary)
        for name in objectives:
            check(
                name in ("params", "wall_time") or name.startswith("dev."),
                "objectives",
                f"'{name}': use dev.<metric> (the search never sees test), params or wall_time",
            )
        check(len(set(objectives)) == len(objectives), "objectives", f"{objectives} repeats an objective")
        if self.directions is not None:
            check(
                len(self.directions) == len(objectives)
                and all(d in ("maximize", "minimize") for d in self.directions),
                "directions",
                f"give one of maximize / minimize per objective ({len(objectives)}), got {self.directions}",
            )
        check(
            self.pruner == "none" or len(objectives) == 1,
            "pruner",
            f"pruning is single-objective in Optuna; with objectives {objectives} set search.pruner=none",
        )
        storage = self.storage or ""
        check(
            not storage.startswith("sqlite") or self.workers == 1,
            "storage",
            "SQLite loses trials with several writers ('database is locked'); with search.workers > 1 use "
            "the default journal file (storage=null) or postgresql://",
        )
        check(
            storage == ""
            or storage.startswith(("postgresql", "sqlite:///", "mysql"))
            or storage.endswith(".log"),
            "storage",
            f"'{storage}': use null (a journal file), a path ending in .log, postgresql://... or sqlite:///...",
        )

    def objective_names(self, primary: str | None = None) -> list[str]:
        return list(self.objectives) if self.objectives else [f"dev.{primary or 'accuracy'}"]

    def direction_names(self, primary: str | None = None) -> list[str]:
        if self.directions is not None:
            return list(self.directions)
        return ["minimize" if n in MINIMISED else "maximize" for n in self.objective_names(primary)]

    def worker_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)

    def space_names(self) -> list[str]:
        return [self.space] if isinstance(self.space, str) else [str(s) for s in self.space]


def register_schema() -> None:
    """The search node's schema in Hydra's ConfigStore (``configs/search.yaml`` pulls it in)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="schema", name="search", node=SearchConfig)
