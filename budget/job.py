"""One ``adabudget train`` job, as the Hydra task function (``adabudget.cli``) and the adabudget
sweeper (``adabudget.search.sweeper``) both run it.

The sweeper runs a job for an Optuna trial by passing the trial's hook in (``TrialHook``: ``meta``
added to the record, ``on_eval`` reported to the trial; a duck type, so ``adabudget`` knows no
Optuna), and reads the job's ``JobOutcome`` back: ``train``'s result, or why the config was
refused. Nothing is passed through module globals. A task function offers a trial-bound variant
of itself as its ``for_trial`` attribute (``for_trial(hook) -> task function returning a
JobOutcome``); ``bind_trial`` finds it.

In a multirun a refused job has no folder; ``<sweep dir>/<job number>.refused.json``
(``{"status": "refused", "error", "overrides"}``) records it instead, so the multirun summary
lists it, with its overrides, whichever process, launcher or machine ran it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

REFUSED_SUFFIX = ".refused.json"  # <sweep dir>/<job number>.refused.json


class TrialHook(Protocol):
    """The job's view of the trial it runs for."""

    meta: dict  # added to the run record's meta (study, trial number, params)

    def on_eval(self, step: int, metrics: dict) -> bool:
        """``train``'s hook at each dev evaluation: True stops the run as pruned."""
        ...


@dataclass
class JobOutcome:
    """How a job ended: ``train``'s ``result``, or ``refused`` (the config error) and no result."""

    result: dict | None = None
    refused: str | None = None

    @property
    def value(self) -> float:
        """The primary dev metric of a completed run, else NaN: what a Hydra sweeper optimises."""
        r = self.result
        if r is None or r.get("status") != "completed":
            return math.nan
        return float(r["final"]["dev"][r["primary_metric"]])


def job_folder(cfg, hydra_cfg, multirun: bool) -> str | None:
    """The run folder a job trains in: ``run_dir`` if given; in a multirun ``<sweep dir>/<job
    number>``; a single run's ``hydra.run.dir`` when the user set one (``.`` means none)."""
    if cfg.run_dir is not None:
        return str(cfg.run_dir)
    if multirun:
        return str(Path(hydra_cfg.sweep.dir) / str(hydra_cfg.job.num))
    if str(hydra_cfg.run.dir) != ".":
        return str(hydra_cfg.run.dir)
    return None


def run_job(cfg, hydra_cfg, multirun: bool, hook: TrialHook | None = None) -> tuple[Any, JobOutcome]:
    """Train the job's config (a resume, or a run in its job folder, with the hook's ``meta``).

    Returns:
        (the config the run trained, its outcome). A config ``train`` refuses (``ConfigError``)
        is an outcome, ``refused``, in a multirun (recorded in ``<sweep dir>/<job>.refused.json``);
        a single run raises it.
    """
    from adabudget.compose import resume_config
    from adabudget.config import ConfigError
    from adabudget.training import train
    from omegaconf import OmegaConf, open_dict

    try:
        if cfg.resume is not None:
            cfg = resume_config(cfg.resume, list(hydra_cfg.overrides.task))
        else:
            with open_dict(cfg):
                cfg.run_dir = job_folder(cfg, hydra_cfg, multirun)
                if hook is not None:
                    cfg.meta = {**OmegaConf.to_container(cfg.meta), **hook.meta}
        result = train(cfg, on_eval=hook.on_eval if hook is not None else None)
    except ConfigError as err:
        if not multirun:
            raise
        sweep = Path(hydra_cfg.sweep.dir)  # the multirun summary lists it from there
        sweep.mkdir(parents=True, exist_ok=True)
        record = {"status": "refused", "error": str(err), "overrides": list(hydra_cfg.overrides.task)}
        (sweep / f"{hydra_cfg.job.num}{REFUSED_SUFFIX}").write_text(json.dumps(record) + "\n")
        return cfg, JobOutcome(refused=str(err))
    return cfg, JobOutcome(result=result)


def bind_trial(task_function: Callable, hook: TrialHook) -> Callable | None:
    """``task_function`` bound to a trial (its ``for_trial(hook)``), or None if it offers none."""
    for_trial = getattr(task_function, "for_trial", None)
    return for_trial(hook) if for_trial is not None else None
