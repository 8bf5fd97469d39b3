"""``hydra/sweeper=adabudget``: the config schema and the class Hydra instantiates.

Hydra imports every module under ``hydra_plugins`` at each start (plain runs too), so this one
holds only dataclasses and a thin class; Optuna, the study and the job pool are imported when a
sweep begins (``search.sweeper``, where the design is described).

The fields are hydra-optuna-sweeper's (``sampler``, ``direction``, ``storage``, ``study_name``,
``n_trials``, ``n_jobs``, ``max_failure_rate``, ``params``, ``custom_search_space``), so a config
written for it runs here by changing the sweeper's name, plus ``pruner`` and ``objectives``.
The samplers are the same config group, ``hydra/sweeper/sampler`` (tpe, random, cmaes, nsgaii,
nsgaiii, gp, qmc, grid: ``_target_`` dicts with that plugin's fields as far as Optuna 5 still
takes them); ``hydra.sweeper.sampler`` also takes a plain name (``sampler=random``).
"""

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from omegaconf import MISSING


@dataclass
class AdabudgetSweeperConf:
    """``hydra.sweeper``: an Optuna study run through Hydra. Example: ``adabudget train -m
    hydra/sweeper=adabudget hydra.sweeper.n_trials=20 hydra.sweeper.n_jobs=2
    'train.lr=tag(log, interval(1e-4, 3e-3))' 'method.init_r=choice(8,12,16)'``."""

    _target_: str = "hydra_plugins.adabudget_sweeper.adabudget_sweeper.AdabudgetSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    _recursive_: bool = False  # the sweeper builds the sampler and pruner itself (optuna classes only)
    # a hydra/sweeper/sampler option (a _target_ dict under optuna.samplers), or a name: tpe, random,
    # cmaes, nsgaii, nsgaiii, gp, qmc, grid (search.optuna_factory's, as adabudget search builds them)
    sampler: Any = MISSING  # filled by the defaults list (MISSING does not override it on merge)
    # maximize | minimize, or one per objective; default: inferred (search.optuna_factory: params,
    # wall_time, peak_memory_mb, dev.mse and dev.loss minimised, the rest and the job's return value
    # maximised)
    direction: Any = None
    # null: a journal file <runs_root>/<run_name>/sweeps/<study>/journal.log, so the same command
    # resumes; a path ending in .log (journal), postgresql://..., or sqlite:///... (n_jobs 1 only)
    storage: Optional[Any] = None
    study_name: Optional[str] = None  # default sweep-<digest of the search space and objectives>
    n_trials: int = 20  # finished (completed or pruned) trials the study should hold, resumes included
    n_jobs: int = 1  # jobs running at once, each its own process; a new one starts when one ends
    # the sweep stops once more than this fraction of n_trials jobs failed in it (0: the first)
    max_failure_rate: float = 0.25
    params: Optional[dict[str, Any]] = None  # dotted key -> choice(...), range(...), interval(...), a value
    custom_search_space: Optional[str] = None  # dotted path of fn(cfg, trial) suggesting more params
    # none | median | hyperband | successive_halving, or a _target_ dict under optuna.pruners;
    # the job's dev evaluations are reported to its trial (single objective only)
    pruner: Any = None
    # values read from the job's record (result.json): dev.<metric>, params, wall_time, or a
    # dotted path (adapter_params_final, peak_memory_mb); default: the job's return value
    objectives: Optional[list[str]] = None
    # the n_jobs pool's GPUs (adabudget.search.devices): indices among the visible ones (null: all),
    # and GPUs per job, an integer or 1/k to pack k jobs on one GPU; each job its own CUDA_VISIBLE_DEVICES
    devices: Optional[Any] = None
    gpus_per_trial: Optional[Any] = None


# hydra-optuna-sweeper's sampler options, with the fields Optuna 5 still accepts
SAMPLERS = {
    "tpe": {
        "_target_": "optuna.samplers.TPESampler",
        "seed": None,
        "consider_prior": None,
        "prior_weight": None,
        "consider_magic_clip": None,
        "consider_endpoints": None,
        "n_startup_trials": 10,
        "n_ei_candidates": 24,
        "multivariate": False,
        "warn_independent_sampling": None,
    },
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": None},
    "cmaes": {
        "_target_": "optuna.samplers.CmaEsSampler",
        "seed": None,
        "x0": None,
        "sigma0": None,
        "warn_independent_sampling": True,
        "consider_pruned_trials": False,
        "restart_strategy": None,
        "use_separable_cma": False,
    },
    "nsgaii": {
        "_target_": "optuna.samplers.NSGAIISampler",
        "seed": None,
        "population_size": 50,
        "mutation_prob": None,
        "crossover_prob": 0.9,
        "swapping_prob": 0.5,
    },
    "nsgaiii": {
        "_target_": "optuna.samplers.NSGAIIISampler",
        "seed": None,
        "population_size": 50,
        "mutation_prob": None,
        "crossover_prob": 0.9,
        "swapping_prob": 0.5,
    },
    "gp": {
        "_target_": "optuna.samplers.GPSampler",
        "seed": None,
        "n_startup_trials": 10,
        "deterministic_objective": False,
        "warn_independent_sampling": True,
    },
    "qmc": {
        "_target_": "optuna.samplers.QMCSampler",
        "seed": None,
        "qmc_type": "sobol",
        "scramble": False,
        "warn_asynchronous_seeding": True,
        "warn_independent_sampling": True,
    },
    # the search space is filled in from the params when the sweep starts
    "grid": {"_target_": "optuna.samplers.GridSampler", "_partial_": True, "seed": None},
}


class AdabudgetSweeper(Sweeper):
    """Hydra's handle; the work is ``search.sweeper.SweeperImpl``'s."""

    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: Optional[Any],
        study_name: Optional[str],
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: Optional[Any],
        custom_search_space: Optional[str],
        pruner: Any,
        objectives: Optional[list[str]],
        devices: Optional[Any] = None,
        gpus_per_trial: Optional[Any] = None,
    ) -> None:
        from adabudget.search.sweeper import SweeperImpl

        self.impl = SweeperImpl(
            sampler=sampler,
            direction=direction,
            storage=storage,
            study_name=study_name,
            n_trials=n_trials,
            n_jobs=n_jobs,
            max_failure_rate=max_failure_rate,
            params=params,
            custom_search_space=custom_search_space,
            pruner=pruner,
            objectives=objectives,
            devices=devices,
            gpus_per_trial=gpus_per_trial,
        )

    def setup(self, *, hydra_context, task_function, config) -> None:
        with _config_errors():
            self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        with _config_errors():
            return self.impl.sweep(arguments)


@contextmanager
def _config_errors():
    """A ConfigError (the sweep's settings, its storage, its launcher) ends the command as
    ``adabudget train``'s own do: ``config error: <field>: <fix>`` and exit 2, not Hydra's traceback."""
    from adabudget.config import ConfigError

    try:
        yield
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)


_store = ConfigStore.instance()
_store.store(group="hydra/sweeper", name="adabudget", node=AdabudgetSweeperConf, provider="adabudget")
for _name, _node in SAMPLERS.items():
    _store.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="adabudget")
