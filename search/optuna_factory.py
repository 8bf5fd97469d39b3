"""One Optuna toolkit for both front ends: ``adabudget search`` (``search.study``) and the Hydra
sweeper (``search.sweeper``) build their samplers, pruners and grids here, infer objective
directions here, read a finished run's objective values here and count finished trials here.
What changed when the two front ends were merged:
docs/search.md#one-optuna-toolkit-the-search-and-the-hydra-sweeper-agree.

The rules, for both:

- **Grid**: every value of a categorical, and of an int or float distribution with a step and no
  log scale (``range(0.1, 0.5, step=0.1)`` is a grid of five); an interval without a step is
  refused, naming the parameter.
- **Finished** (what ``n_trials`` counts): a trained trial, completed or pruned; not an infeasible
  configuration (recorded, never trained), not a repeat of a trained one (``duplicate_of``).
- **Directions**: ``params``, ``wall_time``, ``peak_memory_mb``, ``dev.mse``, ``dev.loss`` and
  ``dev.perplexity`` are minimised, every other objective maximised.
- **params**: the trainable adapter parameters the budget constrains (task head left out, AdaLoRA
  at b(T), as the paper and the hybrid solver count it), counted analytically from the
  configuration (``search.spaces.sampling.count``).
- **Named samplers and pruners**: one table. ``tpe`` is multivariate and grouped (conditional
  spaces) with the constant liar (parallel workers); ``median`` starts pruning after 3 trials.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import optuna
from adabudget.config import ConfigError
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

# name -> (class in optuna.samplers, extra keyword arguments)
SAMPLERS = {
    "tpe": ("TPESampler", {"multivariate": True, "group": True, "constant_liar": True}),
    "random": ("RandomSampler", {}),
    "grid": ("GridSampler", {}),
    "gp": ("GPSampler", {}),
    "nsga2": ("NSGAIISampler", {}),
    "nsgaii": ("NSGAIISampler", {}),
    "nsga3": ("NSGAIIISampler", {}),
    "nsgaiii": ("NSGAIIISampler", {}),
    "cmaes": ("CmaEsSampler", {}),
    "qmc": ("QMCSampler", {}),
    "bruteforce": ("BruteForceSampler", {}),
}
PRUNERS = {
    "none": ("NopPruner", {}),
    "median": ("MedianPruner", {"n_startup_trials": 3, "n_warmup_steps": 0}),
    "hyperband": ("HyperbandPruner", {}),
    "successive_halving": ("SuccessiveHalvingPruner", {}),
}
MINIMISED = ("params", "wall_time", "peak_memory_mb", "dev.mse", "dev.loss", "dev.perplexity")
RESULT_KEYS = {"wall_time": "wall_time_s"}  # objective name -> its key in result.json, where they differ


# ---------------------------------------------------------------- directions
def direction_of(objective: str) -> str:
    return "minimize" if objective in MINIMISED else "maximize"


def directions(objectives: list[str], given: Any = None, where: str = "search.directions") -> list[str]:
    """One direction per objective: ``given`` (a name or a list, any case), else inferred.

    Raises:
        ConfigError: naming ``where`` for an unknown direction or a count that does not match.
    """
    if given is None:
        return [direction_of(n) for n in objectives]
    listed = [given] if isinstance(given, str) or not hasattr(given, "__iter__") else list(given)
    listed = [str(getattr(d, "name", d)).lower() for d in listed]
    if any(d not in ("maximize", "minimize") for d in listed):
        raise ConfigError(f"{where}: {listed}: use maximize or minimize (or a list, one per objective)")
    if objectives and len(listed) != len(objectives):
        raise ConfigError(f"{where}: {len(listed)} direction(s) for objectives {objectives}; give one each")
    return listed


# ---------------------------------------------------------------- samplers, pruners, the grid
def grid_of(distributions: Mapping, where: str = "search.sampler=grid") -> dict[str, list]:
    """GridSampler's search space: every value of each distribution (Optuna's bounds are closed).

    Raises:
        ConfigError: naming ``where`` and the parameter for an interval without a step.
    """
    grid = {}
    for key, d in distributions.items():
        if isinstance(d, CategoricalDistribution):
            grid[key] = list(d.choices)
        elif isinstance(d, (IntDistribution, FloatDistribution)) and d.step is not None and not d.log:
            n = int(round((d.high - d.low) / d.step)) + 1
            values = [d.low + i * d.step for i in range(n)]
            grid[key] = [round(v, 12) if isinstance(v, float) else v for v in values]
        else:
            raise ConfigError(
                f"{where}: {key} is a continuous range ({type(d).__name__}); give it a step "
                "(range(...)) or a choice(...)"
            )
    return grid


def make_sampler(
    name: str,
    seed: int | None = None,
    distributions: Mapping | None = None,
    where: str = "search.sampler",
) -> tuple[optuna.samplers.BaseSampler, int | None]:
    """(sampler, grid size or None) for a sampler's name; ``grid`` enumerates ``distributions``.

    Raises:
        ConfigError: naming ``where`` for an unknown name, or a grid over an interval.
    """
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    key = str(name).lower()
    if key not in SAMPLERS:
        raise ConfigError(f"{where}: unknown sampler '{name}'; use one of {sorted(SAMPLERS)}")
    cls, kwargs = SAMPLERS[key]
    if key == "grid":
        if distributions is None:
            raise ConfigError(f"{where}=grid: needs a declarative space (choice(...) and range(...))")
        grid = grid_of(distributions, f"{where}=grid")
        return optuna.samplers.GridSampler(grid, seed=seed), math.prod(len(v) for v in grid.values())
    return getattr(optuna.samplers, cls)(seed=seed, **kwargs), None


def make_pruner(name: str | None, where: str = "search.pruner") -> optuna.pruners.BasePruner:
    """A pruner by name (``none`` / None: no pruning).

    Raises:
        ConfigError: naming ``where`` for an unknown name.
    """
    key = "none" if name is None else str(name).lower()
    if key not in PRUNERS:
        raise ConfigError(f"{where}: unknown pruner '{name}'; use one of {list(PRUNERS)}")
    cls, kwargs = PRUNERS[key]
    return getattr(optuna.pruners, cls)(**kwargs)


# ---------------------------------------------------------------- a finished run's values
def objective_value(result: Mapping, name: str, budget_params: int | None = None) -> float:
    """An objective's value for a run's ``result.json``: ``dev.<metric>`` from ``final.dev``,
    ``params`` = ``budget_params`` (the count the budget constrains, see the module docstring),
    ``wall_time`` from ``wall_time_s``, anything else a dotted path into the record.

    Raises:
        KeyError: the record does not hold it (the message names what it has).
    """
    if name == "params":
        if budget_params is None:
            raise KeyError(f"objective {name}: the budget count of this run's configuration is unknown")
        return float(budget_params)
    path = ["final", "dev", name[4:]] if name.startswith("dev.") else RESULT_KEYS.get(name, name).split(".")
    node: Any = result
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            have = sorted(node) if isinstance(node, Mapping) else node
            raise KeyError(f"objective {name}: no '{part}' in the run's result.json (has {have})")
        node = node[part]
    return float(node)


def objective_values(result: Mapping, names: list[str], budget_params: int | None = None) -> list[float]:
    return [objective_value(result, n, budget_params) for n in names]


# ---------------------------------------------------------------- finished trials
def finished(trial) -> bool:
    """A trial that counts towards ``n_trials``: trained, completed or pruned. Infeasible ones and
    repeats of a trained configuration (``duplicate_of``: its values copied) are not."""
    if trial.state == TrialState.PRUNED:
        return True
    return (
        trial.state == TrialState.COMPLETE
        and not trial.user_attrs.get("infeasible")
        and trial.user_attrs.get("duplicate_of") is None
    )
