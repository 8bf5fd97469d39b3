"""The ``search`` node of ``adabudget search``: one dataclass, its defaults and its checks.

The rest of the config is an ordinary run config (``adabudget.config.RunConfig``): every trial is
that run with the sampled configuration merged on top.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from adabudget.config import ConfigError, checker
from adabudget.methods.adapter import PLACEMENTS as ADAPTER_PLACEMENTS
from adabudget.search import optuna_factory
from adabudget.search.devices import parse_devices, per_trial

# the samplers and pruners of search.optuna_factory (one table for the search and the Hydra sweeper);
# evolution is the supernet's own (search.supernet.run_evolution)
SAMPLERS = (*optuna_factory.SAMPLERS, "evolution")
PRUNERS = tuple(optuna_factory.PRUNERS)
SCORERS = ("train", "supernet")
SUPERNET_SAMPLING = ("sandwich", "random", "largest")


@dataclass
class SupernetConfig:
    """The weight-sharing supernet of ``search.scorer=supernet`` (``search.supernet``; design in its
    module docstring). Example: on MiniLM with ``search.budget=331776`` (LoRA r=8's count) and the
    default menus every sampled sub-configuration holds 331,776 +- 5% trainable parameters: per
    block a LoRA rank, an adapter bottleneck and a prefix length from these menus (0 = off there).
    """

    # size menus per block, 0 = the method is off in that block; [0] leaves the method out
    lora: list = field(default_factory=lambda: [0, 2, 4, 8, 16])  # r
    adapter: list = field(default_factory=lambda: [0, 8, 16, 32, 64])  # bottleneck d
    prefix: list = field(default_factory=lambda: [0, 5, 10, 20])  # length l
    parallel_adapter: list = field(default_factory=lambda: [0])  # bottleneck d (beside the FFN, scale 4)
    # |count - budget| <= tolerance x budget: the band a sub-configuration must fall in (menus are
    # coarse, so wider than the hybrid solver's 2%)
    tolerance: float = 0.05
    lora_scaling: float = 2.0  # s = alpha / r of every LoRA slice (alpha = s r, so slices share a meaning)
    adapter_placement: str = "houlsby"  # houlsby (after attention and FFN) | pfeiffer (after the FFN)
    steps: Optional[int] = None  # supernet training steps; None: the run's own T (one training's cost)
    sampling: str = "sandwich"  # sandwich: largest, smallest, random ... | random | largest only
    random_paths: int = 2  # random sub-configurations per sandwich cycle (after the largest and smallest)
    paths_per_step: int = 1  # sub-configurations whose gradients one optimizer step sums (BigNAS: 4)
    calibration_steps: int = 0  # scoring: steps training only the scored slice first (weights restored)
    calibration_lr: Optional[float] = None  # None: train.lr
    run_dir: Optional[str] = None  # a trained supernet to score with; default <study folder>/supernet
    # search.sampler=evolution (AutoFormer): population size, parents kept, per-unit mutation probability
    population: int = 16
    parents: int = 8
    mutation_prob: float = 0.2
    crossover_share: float = 0.5  # of each new generation: crossovers of two parents; the rest mutants

    def validate(self) -> None:
        check = checker("search.supernet")

        for name in ("lora", "adapter", "prefix", "parallel_adapter"):
            menu = list(getattr(self, name))
            check(
                bool(menu)
                and all(isinstance(v, int) and v >= 0 for v in menu)
                and len(set(menu)) == len(menu),
                name,
                f"{menu}: give distinct sizes >= 0 (0 = off in that block; [0] leaves the method out)",
            )
        check(0 < self.tolerance < 1, "tolerance", f"must be in (0, 1), got {self.tolerance}")
        check(self.lora_scaling > 0, "lora_scaling", f"must be > 0, got {self.lora_scaling}")
        check(
            self.adapter_placement in ADAPTER_PLACEMENTS,
            "adapter_placement",
            f"use one of {tuple(ADAPTER_PLACEMENTS)}",
        )
        check(self.steps is None or self.steps >= 1, "steps", "must be >= 1 or null")
        check(self.sampling in SUPERNET_SAMPLING, "sampling", f"use one of {SUPERNET_SAMPLING}")
        check(self.random_paths >= 0, "random_paths", "must be >= 0")
        check(self.paths_per_step >= 1, "paths_per_step", "must be >= 1")
        check(self.calibration_steps >= 0, "calibration_steps", "must be >= 0")
        check(self.calibration_lr is None or self.calibration_lr > 0, "calibration_lr", "must be > 0 or null")
        check(self.population >= 2, "population", "must be >= 2")
        check(
            1 <= self.parents <= self.population, "parents", f"must be in [1, population={self.population}]"
        )
        check(0 <= self.mutation_prob <= 1, "mutation_prob", "must be in [0, 1]")
        check(0 <= self.crossover_share <= 1, "crossover_share", "must be in [0, 1]")


LAUNCHERS = ("processes", "local", "slurm")


@dataclass
class SlurmConfig:
    """The Slurm jobs of ``search.launcher=slurm`` (``search.slurm``): one job per worker, each
    with these resources, submitted through submitit (``search.launch``). Example:
    ``search.slurm.partition=gpu search.slurm.gpus_per_task=1 search.slurm.timeout_min=240``."""

    partition: Optional[str] = None  # null: the cluster's default partition
    account: Optional[str] = None
    gpus_per_task: int = 0  # GPUs of each worker job (0: a CPU job)
    cpus_per_task: int = 1
    mem_gb: Optional[float] = None  # null: the partition's default
    timeout_min: int = 240  # each job's time limit; a resumed search re-runs the interrupted trials
    # SIGUSR1 this many seconds before the limit (--signal=USR1@90): the running trial stops at the
    # end of its step, checkpointed, and is queued again (adabudget treats SIGUSR1 as a stop request)
    signal_delay_s: int = 90
    setup: list = field(default_factory=list)  # shell lines run before each worker (module load ...)
    additional: dict = field(default_factory=dict)  # more sbatch options, e.g. {constraint: a100}

    def validate(self) -> None:
        check = checker("search.slurm")

        check(self.gpus_per_task >= 0, "gpus_per_task", f"must be >= 0, got {self.gpus_per_task}")
        check(self.cpus_per_task >= 1, "cpus_per_task", f"must be >= 1, got {self.cpus_per_task}")
        check(self.mem_gb is None or self.mem_gb > 0, "mem_gb", "must be > 0 GB or null")
        check(self.timeout_min >= 1, "timeout_min", f"must be >= 1 minute, got {self.timeout_min}")
        check(
            0 <= self.signal_delay_s < 60 * self.timeout_min,
            "signal_delay_s",
            f"must be in [0, timeout_min x 60 = {60 * self.timeout_min}) s, got {self.signal_delay_s}",
        )


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
    workers: int = 1  # worker processes (or jobs: search.launcher), one trial each at a time
    # processes: the workers are processes of this command; local: submitit's LocalExecutor jobs on
    # this machine; slurm: search.workers Slurm jobs (search.slurm) sharing search.storage (search.launch)
    launcher: str = "processes"
    wait: bool = True  # with a launcher: wait for the jobs and report; false: submit, print the ids, return
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    threads: Optional[int] = None  # torch threads per worker; default: cores / workers
    # GPUs the workers spread over: indices among the visible ones (CUDA_VISIBLE_DEVICES honoured);
    # null: every visible GPU; each worker process gets its own CUDA_VISIBLE_DEVICES (search.devices)
    devices: Optional[list] = None
    # GPUs per worker: an integer >= 1 (a trial that runs torchrun), or 1/k to pack k trials on one
    # GPU (the user picks k: no memory management beyond that); null: 1 where GPUs are visible
    gpus_per_trial: Any = None
    # null: a journal file runs/search/<study>/journal.log (several processes on one machine);
    # postgresql://user@host:port/db for several machines (heartbeats); a path ending in .log: a journal;
    # grpc://host:port: `adabudget search serve-storage` in front of a database (hundreds of workers)
    storage: Optional[str] = None
    objectives: Optional[list] = None  # default [dev.<primary metric>]; e.g. [dev.accuracy, params]
    directions: Optional[list] = (
        None  # default: inferred (dev.* maximise, dev.mse / params / wall_time minimise)
    )
    # tpe | nsga2 | gp | random | grid (declarative spaces of choices and stepped ranges) | cmaes |
    # qmc | nsga3 | bruteforce (search.optuna_factory) | evolution (AutoFormer's, over a supernet's
    # inherited scores: search.scorer=supernet)
    sampler: str = "tpe"
    # none | median | hyperband | successive_halving: single objective, fed by the dev evaluations
    pruner: str = "none"
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
    # train: every trial trains its configuration; supernet: trials score sub-configurations of one
    # trained weight-sharing supernet with inherited weights (search.supernet; search/supernet.py)
    scorer: str = "train"
    supernet: SupernetConfig = field(default_factory=SupernetConfig)

    def __post_init__(self):
        for name, kind in (("supernet", SupernetConfig), ("slurm", SlurmConfig)):
            if isinstance(getattr(self, name), kind):
                continue
            values = dict(getattr(self, name) or {})
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = sorted(set(values) - names)
            if unknown:
                raise ConfigError(f"search.{name}.{unknown[0]}: unknown key; known keys: {sorted(names)}")
            setattr(self, name, kind(**values))

    def validate(self, primary: str | None = None) -> None:
        check = checker("search")

        check(self.n_trials >= 1, "n_trials", f"must be >= 1, got {self.n_trials}")
        check(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        check(self.threads is None or self.threads >= 1, "threads", "must be >= 1 or null")
        check(
            self.launcher in LAUNCHERS,
            "launcher",
            f"unknown launcher '{self.launcher}'; use one of {LAUNCHERS} (processes: this command's own)",
        )
        check(
            self.wait or self.launcher != "processes",
            "wait",
            "search.wait=false needs jobs that outlive the command: add search.launcher=slurm (or local)",
        )
        self.slurm.validate()
        per_trial(self.gpus_per_trial)  # their form here; the GPUs themselves when the workers start
        parse_devices(self.devices)
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
        # 0 or less would make every other host's running trial stale at once: re-queued twice
        check(
            self.grace_period > 0,
            "grace_period",
            f"must be > 0 seconds without a heartbeat, got {self.grace_period} (default 600)",
        )
        check(self.scorer in SCORERS, "scorer", f"unknown scorer '{self.scorer}'; use one of {SCORERS}")
        self.supernet.validate()
        if self.scorer == "supernet":
            check(
                self.pruner == "none",
                "pruner",
                "a supernet scores a configuration in one evaluation, there is nothing to prune; "
                "set search.pruner=none",
            )
            check(
                self.space_names() in (["s4"], ["supernet"]),
                "space",
                f"{self.space_names()}: search.scorer=supernet searches the supernet's own space (its menus: "
                "search.supernet.lora / adapter / prefix); drop search.space or set search.space=supernet",
            )
        if self.sampler == "evolution":
            check(
                self.scorer == "supernet",
                "sampler",
                "evolution runs over a supernet's inherited scores; add search.scorer=supernet",
            )
            check(
                self.workers == 1, "workers", "search.sampler=evolution runs its generations in one process"
            )
            check(
                self.launcher == "processes",
                "launcher",
                "search.sampler=evolution runs its generations in this command's process; "
                "drop search.launcher",
            )
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
            self.sampler != "evolution" or len(objectives) == 1,
            "sampler",
            f"evolution ranks one objective; with objectives {objectives} use search.sampler=nsga2",
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
            or storage.startswith(("postgresql", "sqlite:///", "mysql", "grpc://"))
            or storage.endswith(".log"),
            "storage",
            f"'{storage}': use null (a journal file), a path ending in .log, postgresql://..., sqlite:///... "
            "or grpc://HOST:PORT (adabudget search serve-storage)",
        )
        if storage.startswith("grpc://"):
            from adabudget.search.storage import parse_grpc

            parse_grpc(storage)

    def objective_names(self, primary: str | None = None) -> list[str]:
        return list(self.objectives) if self.objectives else [f"dev.{primary or 'accuracy'}"]

    def direction_names(self, primary: str | None = None) -> list[str]:
        if self.directions is not None:
            return list(self.directions)
        return optuna_factory.directions(self.objective_names(primary))

    def worker_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)

    def space_names(self) -> list[str]:
        return [self.space] if isinstance(self.space, str) else [str(s) for s in self.space]


def register_schema() -> None:
    """The search node's schema in Hydra's ConfigStore (``configs/search.yaml`` pulls it in)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="schema", name="search", node=SearchConfig)
