"""What one trial of a study is, shared by every module of the search wing (a leaf: it imports
no other search module but the config and the Optuna toolkit): the trial's ``Setup``, how a trial
ends early (``TrialFailed``, ``SearchRefused``, ``SearchInterrupted`` and the stop flag), a
trained twin of a configuration, an infeasible trial's values, what it adds to its W&B summary
and its row in ``search.json`` / ``sweep.json``. Which trials count as finished is
``search.optuna_factory.finished``.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from adabudget.config import ConfigError
from adabudget.search.config import SearchConfig
from adabudget.search.optuna_factory import finished, objective_value
from optuna.trial import TrialState


class TrialFailed(Exception):
    """The trial's run ended without a result (diverged, crashed, interrupted)."""


class SearchRefused(ConfigError):
    """A refusal of the search itself, not of one trial (a broken space): it ends the search at once."""


class SearchInterrupted(Exception):
    """Ctrl-C or SIGTERM reached a trial's run: it checkpointed and ended ``interrupted``, its trial
    is failed and queued again, and this worker stops (a scheduler's SIGTERM means stop, not
    "go on with the next trial"). ``code``: the exit code, 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, cause: str):
        super().__init__(cause)
        self.code = 143 if "SIGTERM" in cause else 130


# A stop signal that reached a search worker outside a training (``search.workers`` installs the
# handler; while a run trains, ``adabudget.training``'s own handler takes the signal and checkpoints).
STOP: dict = {"signal": None}


def stop_if_requested() -> None:
    """Raise ``SearchInterrupted`` if a stop signal arrived since the worker started."""
    if STOP["signal"]:
        raise SearchInterrupted(STOP["signal"])


@dataclass
class Setup:
    """Everything a worker process needs to run trials (plain values: it is pickled to spawn them)."""

    base: dict  # the run config every trial starts from (resolved to plain values, no search node)
    search: dict  # SearchConfig as a dict
    study: str
    storage: (
        str  # a journal path or a database URL, as given (a password too): show without_password(storage)
    )
    root: str  # runs/search/<study>
    primary: str  # the task's primary metric (accuracy / pearson)
    regression: bool
    num_labels: int

    @property
    def scfg(self) -> SearchConfig:
        return SearchConfig(**self.search)

    @property
    def supernet_dir(self) -> Path:
        """The trained supernet of ``search.scorer=supernet``: ``search.supernet.run_dir``, else
        ``<study folder>/supernet``."""
        return Path(self.scfg.supernet.run_dir or Path(self.root) / "supernet")


def trained_twin(trial, overrides: dict):
    """A completed, trained trial of the same study with exactly these overrides, or None."""
    key = json.dumps(overrides, sort_keys=True, default=str)
    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if (
            t.number != trial.number
            and finished(t)
            and json.dumps(t.user_attrs.get("overrides"), sort_keys=True, default=str) == key
        ):
            return t
    return None


def infeasible_values(drawn, names: list[str], directions: list[str]) -> list[float]:
    """An infeasible trial's values: placeholders no feasible trial can lose to (Optuna and
    optuna-dashboard take ±inf); its constraint (> 0) keeps it out of every sampler's reach."""
    return [
        float(drawn.budget_params or 0) if n == "params" else -math.inf if d == "maximize" else math.inf
        for n, d in zip(names, directions)
    ]


def trial_summary(setup: Setup, number: int, params: dict, budget_params: int | None):
    """What a trial adds to its run's W&B summary: a function of the run's result for
    ``adabudget.log.wandb_summary`` (called only for a run with a W&B mirror).

    It gives ``trial/number``, ``trial/params/<name>`` and ``objective/<name>``, the values Optuna
    is told (``optuna_factory.objective_value``): ``objective/dev.accuracy`` from the run's final
    dev evaluation, ``objective/wall_time`` from its ``wall_time_s``, ``objective/params`` the count
    the search scores (AdaLoRA at b(T)), known before the run. An objective the result does not
    hold (a failed run has no final evaluation) is left out.
    """
    names = setup.scfg.objective_names(setup.primary)
    known = {"trial/number": number, **{f"trial/params/{k}": v for k, v in params.items()}}
    if "params" in names:
        known["objective/params"] = budget_params

    def entries(result: dict) -> dict:
        out = dict(known)
        for name in names:
            if name != "params":
                with contextlib.suppress(KeyError):
                    out[f"objective/{name}"] = objective_value(result, name)
        return out

    return entries


def trial_row(t) -> dict:
    """A trial as ``search.json`` and ``sweep.json`` list it."""
    state = (
        "infeasible"
        if t.state == TrialState.COMPLETE and t.user_attrs.get("infeasible")
        else t.state.name.lower()
    )
    return {
        "number": t.number,
        "state": state,
        "params": t.params,
        "values": t.values if state == "complete" else None,
        "trainable_params": t.user_attrs.get("trainable_params"),
        "budget_params": t.user_attrs.get("budget_params"),
        "run_dir": t.user_attrs.get("run_dir"),
        "wall_time_s": t.user_attrs.get("wall_time_s"),
        "baseline": t.user_attrs.get("baseline"),
        "retry_of": t.user_attrs.get("retry_of"),
        "duplicate_of": t.user_attrs.get("duplicate_of"),
        "infeasible": t.user_attrs.get("infeasible"),
        "error": t.user_attrs.get("error") or t.user_attrs.get("failed_because"),
        "overrides": t.user_attrs.get("overrides"),
        # search.scorer=supernet: the scored sub-configuration and its dev metrics with inherited weights
        **(
            {"sub": t.user_attrs.get("sub"), "inherited": t.user_attrs.get("inherited")}
            if t.user_attrs.get("scorer") == "supernet"
            else {}
        ),
    }
