"""The adabudget Hydra sweeper: an Optuna study run through ``adabudget train -m``.

    adabudget train -m hydra/sweeper=adabudget hydra.sweeper.n_trials=20 hydra.sweeper.n_jobs=2 \
        hydra.sweeper.pruner=median 'train.lr=tag(log, interval(1e-4, 3e-3))' 'method.init_r=choice(8,12,16)'

It takes hydra-optuna-sweeper's configuration and runs each trial as a forked job in a rolling pool
of ``n_jobs`` processes; Hydra finds the plugin's class through the ``hydra_plugins`` namespace
package (``search/plugins/hydra_plugins/adabudget_sweeper``), the work is here. The design and where
it departs from that plugin: docs/sweeper.md#how-the-sweeper-works.

Invariants:

- Samplers, pruners, the grid, directions, objective values and what counts as finished come from
  ``search.optuna_factory``, as in ``adabudget search``.
- The job and the sweep meet through ``adabudget.job`` (a ``TrialHook`` passed in, a ``JobOutcome``
  returned): no module global of another package is written, and ``budget`` never imports
  ``search`` or Optuna (the hook is duck-typed).
- ``n_trials`` counts the study's finished trials, counted and asked under the study's start lock
  (``search.workers.StartLock``), so a resumed sweep, or two sweeps on one storage, start
  ``n_trials`` in all.
- A trial's ``meta`` never holds the storage (its URL may hold a password).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import shlex
import signal
import socket
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from adabudget.config import ConfigError, checker
from adabudget.job import JobOutcome, bind_trial
from adabudget.search import devices as gpu_devices
from adabudget.search import optuna_factory
from adabudget.search.credentials import PASSWORD_HELP, refused_login, scrub, without_password
from adabudget.search.declarative import parse_param
from optuna.distributions import (
    distribution_to_json,
)
from optuna.trial import TrialState

HOST = socket.gethostname()
MAX_RETRIES = 2  # an interrupted trial is re-queued with the same parameters this often
_CURRENT: TrialHook | None = None  # the trial of the job running in this process


def current_trial() -> optuna.Trial | None:
    """The Optuna trial of the job running in this process (in a sweep's job), else None."""
    return _CURRENT.trial if _CURRENT is not None else None


# ---------------------------------------------------------------- the search space
@dataclass
class Space:
    """The sweep's overrides: sampled ones (``distributions``) and the rest, passed as they are."""

    entries: list = field(default_factory=list)  # (key, fixed override line or None), in the given order
    distributions: dict = field(default_factory=dict)  # key -> BaseDistribution
    decoders: dict = field(default_factory=dict)  # key -> typed value of a sampled categorical

    @property
    def fixed(self) -> list[str]:
        return [line for _, line in self.entries if line is not None]

    def overrides(self, params: Mapping) -> list[str]:
        """The job's command-line overrides: each sampled value written in Hydra's syntax."""
        out = []
        for key, line in self.entries:
            out.append(line if line is not None else f"{key}={render(params[key], self.decoders.get(key))}")
        out += [f"{k}={render(v)}" for k, v in params.items() if k not in self.distributions]  # custom space
        return out


def render(value: Any, decode: Callable | None = None) -> str:
    """A sampled value as Hydra override text that parses back to it (``two\\ words``, ``[a,b]``,
    ``null``)."""
    from hydra.core.override_parser.types import Transformer

    return Transformer.str(decode(value) if decode else value)


def parse_space(params: Mapping | None, arguments: list[str]) -> Space:
    """The search space of ``hydra.sweeper.params`` and the command line's overrides.

    Raises:
        ConfigError: an override that does not parse, or a sweep Optuna cannot sample (glob).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Transformer

    lines = [f"{k}={v if isinstance(v, str) else Transformer.str(v)}" for k, v in (params or {}).items()]
    parser = OverridesParser.create()
    found: dict[str, tuple] = {}
    for line in [*lines, *arguments]:
        try:
            override = parser.parse_override(line)
        except Exception as err:  # OverrideParseException
            raise ConfigError(f"hydra.sweeper: cannot parse '{line}' ({err})") from err
        key = override.get_key_element()
        if not override.is_sweep_override():
            found[key] = (line, None, None)
            continue
        try:
            dist, decode = parse_param(key, line.split("=", 1)[1])
        except ConfigError as err:
            raise ConfigError(str(err).replace("search.space: ", "hydra.sweeper: ", 1)) from err
        found[key] = (None, dist, decode)
    space = Space()
    for key, (line, dist, decode) in found.items():
        space.entries.append((key, line))
        if dist is not None:
            space.distributions[key] = dist
            if decode is not None:
                space.decoders[key] = decode
    return space


# ---------------------------------------------------------------- objectives
def directions_of(direction: Any, objectives: list[str] | None) -> list[str]:
    """One direction per objective: given (a name or a list), or inferred from the names
    (``search.optuna_factory``); the job's return value alone is maximised by default."""
    names = list(objectives or [])
    if direction is None and not names:
        return ["maximize"]
    return optuna_factory.directions(names, direction, "hydra.sweeper.direction")


def check_objectives(objectives: list[str] | None) -> None:
    for name in objectives or []:
        if name.split(".")[0] == "test" or name.startswith("final.test"):
            raise ConfigError(f"hydra.sweeper.objectives: {name}: the search sees dev only (dev.<metric>)")
    if objectives is not None and (not objectives or len(set(objectives)) != len(objectives)):
        raise ConfigError(
            f"hydra.sweeper.objectives: {objectives}: give distinct names, or null for the return value"
        )


def job_outcome(
    ret,
    result: dict | None,
    refused: str | None,
    objectives: list[str] | None,
    n_values: int,
    budget_params: int | None = None,
) -> dict:
    """What a job's end means for its trial: ``state`` (complete / pruned / interrupted / fail),
    ``values``, ``error``, and from the record ``run_dir`` and ``status``. ``budget_params``: the
    objective ``params`` (``search.optuna_factory.objective_value``)."""
    try:
        returned = ret.return_value  # re-raises the job's exception
        if isinstance(returned, JobOutcome):  # adabudget's own job: its value is the primary dev metric
            returned = returned.value
    except optuna.TrialPruned as err:
        return {"state": "pruned", "error": str(err) or None}
    except Exception as err:
        traceback.print_exception(type(err), err, err.__traceback__)
        return {"state": "fail", "error": f"{type(err).__name__}: {err}"[:2000]}
    if refused is not None:
        return {"state": "fail", "error": f"config refused: {refused}"[:2000], "refused": refused}
    out: dict = {}
    if result is not None:
        out = {
            "run_dir": result.get("run_dir"),
            "status": result.get("status"),
            "wall_time_s": result.get("wall_time_s"),
            "trainable_params": result.get("trainable_params"),
        }
        status = result.get("status")
        if status == "pruned":
            return {**out, "state": "pruned", "error": f"pruned at step {result.get('pruned_at')}"}
        if status == "interrupted":
            return {**out, "state": "interrupted", "error": f"interrupted by {result.get('interrupted_by')}"}
        if status != "completed":
            return {**out, "state": "fail", "error": str(result.get("error") or status)[:2000]}
    try:
        if objectives:
            if result is None:
                raise ValueError(
                    "hydra.sweeper.objectives are read from the job's record; this job wrote none"
                )
            values = optuna_factory.objective_values(result, objectives, budget_params)
        elif isinstance(returned, (list, tuple)):
            values = [float(v) for v in returned]
        else:
            values = [float(returned)]
    except (KeyError, TypeError, ValueError) as err:
        return {**out, "state": "fail", "error": f"no objective value: {err}"}
    if len(values) != n_values:
        return {
            **out,
            "state": "fail",
            "error": f"{len(values)} value(s) for {n_values} direction(s); "
            "for several objectives set hydra.sweeper.objectives",
        }
    if not all(math.isfinite(v) for v in values):
        return {**out, "state": "fail", "error": f"objective {values}: the run did not complete"}
    return {**out, "state": "complete", "values": values}


# ---------------------------------------------------------------- samplers and pruners
def _optuna_target(spec: Mapping, module: str, what: str):
    """The ``_target_`` of ``spec``, which it and every ``_target_`` nested in its arguments must
    name in ``optuna.<module>``: Hydra's ``instantiate`` builds the nested ones first, so an
    unchecked one would run any callable (``PatientPruner(wrapped_pruner={_target_: ...})``
    and ``PartialFixedSampler(base_sampler={_target_: ...})`` nest legitimately)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"hydra.sweeper.{what}: {spec!r}: give a name or a _target_ dict")

    def check(node, where: str, top: bool = False) -> None:
        if isinstance(node, Mapping):
            if top or "_target_" in node:
                target = str(node.get("_target_", ""))
                if not target.startswith(f"optuna.{module}."):
                    raise ConfigError(f"{where}: _target_ '{target}' must be a class of optuna.{module}")
            for key, value in node.items():
                check(value, f"{where}.{key}")
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                check(value, f"{where}[{i}]")

    check(spec, f"hydra.sweeper.{what}", top=True)
    return str(spec["_target_"])


def make_sampler(spec: Any, space: Space) -> tuple[optuna.samplers.BaseSampler, int | None]:
    """(sampler, grid size or None) from a name or a ``_target_`` dict (hydra/sweeper/sampler)."""
    from hydra.utils import get_class, instantiate
    from omegaconf import OmegaConf

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    if spec is None or isinstance(spec, str):  # a name: the search's own samplers
        return optuna_factory.make_sampler(spec or "tpe", None, space.distributions, "hydra.sweeper.sampler")
    if not isinstance(spec, Mapping):
        raise ConfigError(f"hydra.sweeper.sampler: {spec!r}: give a name or a _target_ dict")
    target = _optuna_target(spec, "samplers", "sampler")
    kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "_partial_")}
    if target == "optuna.samplers.GridSampler":
        grid = optuna_factory.grid_of(space.distributions, "hydra.sweeper.sampler=grid")
        return optuna.samplers.GridSampler(grid, **kwargs), math.prod(len(v) for v in grid.values())
    try:
        get_class(target)
        return instantiate({"_target_": target, **kwargs}), None
    except Exception as err:
        raise ConfigError(f"hydra.sweeper.sampler: cannot build {target}({kwargs}): {err}") from err


def make_pruner(spec: Any) -> optuna.pruners.BasePruner:
    """A pruner from a name (Optuna's defaults) or a ``_target_`` dict; ``none``/null: no pruning."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    if spec is None or isinstance(spec, str):  # a name: the search's own pruners
        try:
            return optuna_factory.make_pruner(spec, "hydra.sweeper.pruner")
        except ConfigError as err:
            raise ConfigError(f"{err}, or a _target_ dict (optuna.pruners.PercentilePruner, ...)") from None
    target = _optuna_target(spec, "pruners", "pruner")
    try:
        return instantiate(spec)
    except Exception as err:
        raise ConfigError(f"hydra.sweeper.pruner: cannot build {target}: {err}") from err


# ---------------------------------------------------------------- the job's side
def trial_outcome(ret, objectives: list[str] | None, n_values: int, job: Any) -> dict:
    """What Hydra's ``JobReturn`` of a trial's job means for the trial (``job_outcome``), read in
    the job's process: adabudget's own job returns its ``JobOutcome``, whose record holds the
    objectives (``params`` counted from the run's config)."""
    from hydra.core.utils import JobStatus

    result, refused, params = None, None, None
    if ret.status == JobStatus.COMPLETED and isinstance(ret.return_value, JobOutcome):  # adabudget's job
        result, refused = ret.return_value.result, ret.return_value.refused
    if result is not None and "params" in (objectives or []):
        try:
            params = budget_params(result)
        except Exception as err:  # no count: the objective fails, naming why
            print(f"trial {job}: params not counted: {err}", file=sys.stderr)
    return job_outcome(ret, result, refused, objectives, n_values, params)


def launched_outcome(ret) -> dict:
    """The outcome a launched job returned (``LaunchedTrial``), or a failure naming what happened
    instead: the job raised, or the launcher lost it (``ret`` is then the launcher's exception)."""
    if isinstance(ret, BaseException):
        return {"state": "fail", "error": f"the launcher lost the job: {type(ret).__name__}: {ret}"[:2000]}
    try:
        outcome = ret.return_value  # re-raises what the job raised
    except Exception as err:
        return {"state": "fail", "error": f"{type(err).__name__}: {err}"[:2000]}
    if not isinstance(outcome, dict) or "state" not in outcome:
        return {"state": "fail", "error": f"the job returned {outcome!r}, not its trial's outcome"[:2000]}
    return outcome


class LaunchedTrial:
    """The task function ``hydra/launcher`` runs for the sweeper's trials. It is pickled to each
    job's process (joblib's, submitit's, a Slurm node's), so it holds plain values: the study
    without its storage's password (the job's libpq reads PGPASSWORD or ~/.pgpass) and, per batch,
    which trial each launcher job number runs. In the job it numbers the job after its trial
    (``<sweep dir>/<trial number>``, as in the pool), runs the task bound to the trial, and
    returns the trial's outcome (``trial_outcome``); the sweep tells the trial."""

    def __init__(self, task_function: Callable):
        self.task_function = task_function
        self.trials: dict[int, tuple[int, int]] = {}  # launcher job number -> (trial id, trial number)

    def bind(self, setup, pruner, metric: str | None, report: bool, objectives: list[str] | None) -> None:
        """The study the trials are in, and what the jobs report to them (set once it is open)."""
        import dataclasses

        storage = without_password(setup.storage)
        if "://" not in storage:  # a journal file: the same file from any working directory
            storage = str(Path(storage).resolve())
        search = {**setup.search, "storage": storage}
        self.setup = dataclasses.replace(setup, storage=storage, search=search)
        self.pruner, self.metric, self.report, self.objectives = pruner, metric, report, objectives
        self.n_values = len(setup.search["directions"])

    def __call__(self, cfg) -> dict:
        global _CURRENT
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.utils import JobReturn, JobStatus
        from omegaconf import read_write

        hydra_cfg = HydraConfig.instance().cfg
        trial_id, number = self.trials[int(hydra_cfg.hydra.job.num)]
        with read_write(hydra_cfg.hydra.job):
            hydra_cfg.hydra.job.num = number
        hook = TrialHook(self.setup, trial_id, self.pruner, self.metric, self.report)
        _CURRENT = hook  # any task function reaches its trial through current_trial()
        ret = JobReturn(overrides=list(hydra_cfg.hydra.overrides.task))
        try:
            ret.return_value = (bind_trial(self.task_function, hook) or self.task_function)(cfg)
            ret.status = JobStatus.COMPLETED
        except Exception as err:  # as Hydra's run_job records it
            ret.return_value, ret.status = err, JobStatus.FAILED
        return trial_outcome(ret, self.objectives, self.n_values, number)


class TrialHook:
    """The job's view of its trial (``adabudget.job.TrialHook``), passed into the job in its process."""

    def __init__(self, setup, trial_id: int, pruner, metric: str | None, report: bool):
        from adabudget.search.study import make_storage

        # a fresh storage: the sweep's connections are not shared with a forked process
        study = optuna.load_study(
            study_name=setup.study,
            storage=make_storage(setup),
            sampler=optuna.samplers.RandomSampler(),
            pruner=pruner,
        )
        self.trial = optuna.trial.Trial(study, trial_id)
        self.metric = metric  # the dev metric reported; None: the task's primary metric
        self.report = report
        # no storage: a database URL may hold a password, and the record is a file
        self.meta = {
            "study": setup.study,
            "trial": self.trial.number,
            "params": dict(self.trial.params),
            "sweeper": "adabudget",
        }

    def on_eval(self, step: int, metrics: dict) -> bool:
        """``train``'s hook: report the dev metric at this step; True when the pruner says stop."""
        if not self.report:
            return False
        from adabudget.metrics import primary_metric

        if self.metric:
            metric = self.metric
        elif "perplexity" in metrics:  # a causal-LM task: generation runs only at some evaluations
            metric = "neg_perplexity"
        else:
            metric = primary_metric("pearson" in metrics)
        if metric not in metrics:  # a causal-LM evaluation without generation: nothing to report
            return False
        self.trial.report(float(metrics[metric]), step)
        return self.trial.should_prune()


def budget_params(result: dict) -> int | None:
    """The objective ``params`` of a finished ``adabudget train`` job: its configuration counted as
    ``adabudget search`` counts a trial's (``search.spaces.sampling.count``, read from the run's
    ``config.yaml``); None when the run left no config."""
    from adabudget.search.spaces.context import SpaceContext
    from adabudget.search.spaces.sampling import count
    from omegaconf import OmegaConf

    path = Path(str(result.get("run_dir"))) / "config.yaml"
    if not path.is_file():
        return None
    run = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    ctx = SpaceContext.from_model(
        run["model"]["name"],
        num_labels=result["num_labels"],
        regression=result["regression"],
        revision=run["model"].get("revision"),
    )
    return count(run["method"], ctx)[1]


def _stop_waiting(signum, frame) -> None:
    raise KeyboardInterrupt  # ends the sweeper's wait for a launched batch (SweeperImpl._batches)


def _detach_from_sweep(parent: int) -> None:
    """Our own process group (the sweep forwards Ctrl-C once), SIGTERM if the sweep dies, and
    Python's own signal handlers, not the sweep's (``train`` installs its own while it runs)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the sweep died before prctl
        os._exit(1)


# ---------------------------------------------------------------- the sweep's side
@dataclass
class _Job:
    trial: optuna.Trial
    process: Any
    conn: Any
    overrides: list
    retries: int = 0
    beat: Any = None  # search.liveness.Beat: the trial's heartbeat while its job runs
    slot: int = 0  # its place in the n_jobs pool, and so its GPUs (hydra.sweeper.devices)


class SweeperImpl:
    """``hydra/sweeper=adabudget`` (the fields: ``AdabudgetSweeperConf``)."""

    def __init__(
        self,
        sampler=None,
        direction=None,
        storage=None,
        study_name=None,
        n_trials=20,
        n_jobs=1,
        max_failure_rate=0.25,
        params=None,
        custom_search_space=None,
        pruner=None,
        objectives=None,
        devices=None,
        gpus_per_trial=None,
    ):
        from omegaconf import OmegaConf

        check = checker("hydra.sweeper")

        self.n_trials, self.n_jobs, rate = int(n_trials), int(n_jobs), float(max_failure_rate)
        check(self.n_trials >= 1, "n_trials", f"must be >= 1, got {n_trials}")
        check(self.n_jobs >= 1, "n_jobs", f"must be >= 1, got {n_jobs}")
        check(0 <= rate <= 1, "max_failure_rate", f"must be in [0, 1], got {max_failure_rate}")
        self.max_failure_rate = rate
        # the n_jobs pool's GPUs: slot i's jobs get gpus[i] (search.devices.assign, at the sweep's start)
        if OmegaConf.is_config(devices):
            devices = OmegaConf.to_container(devices)
        self.devices, self.gpus_per_trial = devices, gpus_per_trial
        gpu_devices.per_trial(gpus_per_trial, gpu_devices.SWEEPER[1])
        gpu_devices.parse_devices(devices, gpu_devices.SWEEPER[2])
        self.sampler_spec, self.pruner_spec = sampler, pruner
        self.params = OmegaConf.to_container(params, resolve=False) if OmegaConf.is_config(params) else params
        self.objectives = list(objectives) if objectives is not None else None
        check_objectives(self.objectives)
        if OmegaConf.is_config(direction):
            direction = OmegaConf.to_container(direction)
        self.directions = directions_of(direction, self.objectives)
        self.storage, self.study_name = storage, study_name
        self.custom_search_space = custom_search_space
        # the job reports its dev evaluations to a single-objective trial (the pruners' input)
        single = len(self.directions) == 1
        self.report = single and (not self.objectives or self.objectives[0].startswith("dev."))
        self.metric = self.objectives[0][4:] if self.objectives and self.report else None
        pruning = str(pruner).lower() not in ("none", "null")
        check(not pruning or single, "pruner", "Optuna prunes single-objective studies only; set pruner=none")
        check(not pruning or self.report, "pruner", f"it hears dev evaluations; {self.objectives} is not one")
        self.pool: dict[int, _Job] = {}
        self.signals = 0

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config
        _forget_password(config)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))  # resolved once, in this process
        # hydra/launcher other than the basic one (joblib, submitit_local, submitit_slurm, slurm):
        # the trials' jobs go through it in batches of n_jobs, as hydra-optuna-sweeper launches;
        # otherwise the rolling pool of forked local processes
        self.launcher, self.launched = None, 0
        target = str(config.hydra.launcher.get("_target_", ""))
        if not target.endswith("BasicLauncher"):
            from hydra.core.plugins import Plugins

            choice = config.hydra.runtime.choices.get("hydra/launcher") or target.rsplit(".", 1)[-1]
            self.launcher_name = f"hydra/launcher={choice}"
            if self.storage and scrub(str(self.storage)) != str(self.storage):
                raise ConfigError(
                    f"hydra.sweeper.storage={without_password(str(self.storage))}: with "
                    f"{self.launcher_name} each job opens the study itself, in its own process or "
                    f"machine, and is given the URL without its password; {PASSWORD_HELP}"
                )
            for key in ("devices", "gpus_per_trial"):
                if getattr(self, key) is not None:
                    raise ConfigError(
                        f"hydra.sweeper.{key}: places the jobs of the local pool; with {self.launcher_name} "
                        "the launcher places them: give the GPUs in its own settings (hydra.launcher."
                        "gpus_per_task for submitit_slurm and the slurm preset), or drop the launcher"
                    )
            self.trial_task = LaunchedTrial(task_function)
            self.launcher = Plugins.instance().instantiate_launcher(
                hydra_context=hydra_context, task_function=self.trial_task, config=config
            )

    # ------------------------------------------------------------ set-up
    def _settings(self, space: Space) -> dict:
        return {
            "distributions": {k: json.loads(distribution_to_json(d)) for k, d in space.distributions.items()},
            "objectives": self.objectives,
            "directions": self.directions,
            "custom_search_space": self.custom_search_space,
        }

    def _make_setup(self, study: str, storage: str, root: Path):
        """A ``search.study.Setup`` for the study machinery shared with ``adabudget search``
        (storage, stale-trial recovery, progress lines, trial rows)."""
        from adabudget.search.config import SearchConfig
        from adabudget.search.trial import Setup

        display = self.objectives or ["dev"]
        scfg = SearchConfig(
            study=study,
            n_trials=self.n_trials,
            workers=self.n_jobs,
            storage=storage,
            objectives=display,
            directions=self.directions,
            enqueue=[],
            root=str(root.parent),
            max_retries=MAX_RETRIES,
        )
        return Setup(
            base={"model": {"name": None}, "data": {"task": None}},
            search=asdict(scfg),
            study=study,
            storage=storage,
            root=str(root),
            primary="accuracy",
            regression=False,
            num_labels=2,
        )

    def _open_study(self, space: Space):
        from adabudget.search.study import database_url, make_storage

        settings = self._settings(space)
        digest = hashlib.sha256(
            json.dumps({**settings, "fixed": sorted(space.fixed)}, sort_keys=True).encode()
        )
        name = self.study_name or f"sweep-{digest.hexdigest()[:8]}"
        root = self.sweep_dir.parent / "sweeps" / name
        # postgresql:// with psycopg2 named (SQLAlchemy 2.1 would import psycopg 3), as adabudget search does
        url = database_url(str(self.storage)) if self.storage else str(root / "journal.log")
        shown = without_password(url)
        if url.startswith("sqlite") and self.n_jobs > 1:
            raise ConfigError(
                "hydra.sweeper.storage: SQLite loses trials with several writers ('database is locked'); "
                "with n_jobs > 1 use the default journal file (storage=null) or postgresql://"
            )
        if not url.startswith(("postgresql", "mysql", "sqlite:///")) and not url.endswith(".log"):
            raise ConfigError(
                f"hydra.sweeper.storage: '{shown}': use null (a journal file), a path ending in .log, "
                "postgresql://... or sqlite:///..."
            )
        setup = self._make_setup(name, url, root)
        sampler, grid = make_sampler(self.sampler_spec, space)
        self.pruner = make_pruner(self.pruner_spec)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            storage = make_storage(setup)
        except Exception as err:  # SQLAlchemy's OperationalError; its text names no password
            if not refused_login(err):
                raise
            raise ConfigError(
                f"hydra.sweeper.storage={shown}: the database refused the login "
                f"({str(err).splitlines()[0]}); {PASSWORD_HELP}"
            ) from None
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=sampler,
            pruner=self.pruner,
            directions=self.directions,
            load_if_exists=True,
        )
        # a new study, or one made by hand (known configurations enqueued first): adopted as it is
        made = [d.name.lower() for d in study.directions]
        saved = study.user_attrs.get("adabudget_sweeper") or {**settings, "directions": made}
        differ = [k for k in settings if saved.get(k) != settings[k]]
        if differ:
            what = "; ".join(f"{k}: {saved.get(k)} -> {settings[k]}" for k in differ)
            raise ConfigError(
                f"hydra.sweeper.study_name={name}: this study in {shown} was made with other "
                f"settings ({what}); resume it with its own, or name a new study"
            )
        study.set_user_attr("adabudget_sweeper", settings)
        return study, setup, grid

    # ------------------------------------------------------------ the sweep
    def sweep(self, arguments: list[str]) -> None:
        from adabudget.search.progress import Progress
        from adabudget.search.workers import StartLock, recover_stale
        from hydra.core.utils import configure_log, setup_globals

        space = parse_space(self.params, arguments)
        gpus = []  # with a launcher there is no local pool: the launcher places the jobs
        if self.launcher is None:
            gpus = gpu_devices.assign(self.n_jobs, self.gpus_per_trial, self.devices, gpu_devices.SWEEPER)
        if gpu_devices.describe(gpus):
            print(gpu_devices.describe(gpus, "job slot"), flush=True)
        study, self.setup_, grid = self._open_study(space)
        n_trials = min(self.n_trials, grid) if grid else self.n_trials
        if self.custom_search_space:
            from hydra.utils import get_method

            self.extend = get_method(self.custom_search_space)
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        if getattr(self.task_function, "__module__", None) == "adabudget.cli":  # adabudget's own jobs
            _preload()
        # the study's start lock (``search.workers.StartLock``: a file lock beside a journal, an
        # advisory lock in PostgreSQL), held while counting and asking: two sweeps, or a sweep and
        # ``adabudget search`` workers, on one study never start more than n_trials between them
        lock = StartLock(self.setup_)
        lock.acquire()
        try:
            recovered = recover_stale(study, self.setup_)
        finally:
            lock.release()
        done = sum(optuna_factory.finished(t) for t in study.get_trials(deepcopy=False))
        if self.launcher is not None:
            self.trial_task.bind(self.setup_, self.pruner, self.metric, self.report, self.objectives)
            how = f"launched through {self.launcher_name} in batches of {self.n_jobs}"
        else:
            how = f"{self.n_jobs} at a time"
        print(
            f"study {study.study_name} in {without_password(self.setup_.storage)}: "
            f"{done} of {n_trials} trials done"
            + (f", {len(recovered)} stale trial(s) re-queued" if recovered else "")
            + f"; jobs in {self.sweep_dir}/<trial>, {how}"
        )
        progress = Progress(self.setup_)
        progress.seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        failed: list[str] = []
        stop: str | None = None
        pooled = self.launcher is None
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if not pooled:
                stop = self._batches(study, space, n_trials, lock, progress, failed)
            while pooled:
                if self.signals and stop is None:
                    stop = "interrupted"
                while stop is None and len(self.pool) < self.n_jobs:
                    lock.acquire()
                    try:
                        if not self._wanted(study, n_trials):
                            break
                        slot = min(set(range(self.n_jobs)) - {j.slot for j in self.pool.values()})
                        with gpu_devices.environ(gpu_devices.worker_env(gpus[slot])):  # the fork inherits it
                            job = self._start(study, space, lock.release)  # released once the trial exists
                        job.slot = slot
                    except ConfigError as err:
                        stop = str(err)
                        break
                    finally:
                        lock.release()
                    self.pool[job.process.sentinel] = job
                if not self.pool:
                    break
                for sentinel in multiprocessing.connection.wait(list(self.pool), timeout=1.0):
                    job = self.pool.pop(sentinel)
                    state, error = self._end(study, job, interrupted=self.signals > 0)
                    if state == "fail":
                        failed.append(f"trial {job.trial.number}: {error}")
                progress.poll(study)
                if stop is None and (stop := self._too_many_failures(failed)):
                    print(f"stopping: {stop}; waiting for {len(self.pool)} running job(s)", file=sys.stderr)
        finally:
            lock.close()
            for s, h in handlers.items():
                signal.signal(s, h)
            progress.poll(study)
            progress.close()
            self._write_record(study, n_trials)
        if self.signals:
            raise SystemExit(130)
        if stop is not None:
            raise RuntimeError(f"{stop}\n  " + "\n  ".join(failed[-5:]))

    def _batches(self, study, space: Space, n_trials: int, lock, progress, failed: list[str]) -> str | None:
        """The trials' jobs through ``hydra/launcher``: up to ``n_jobs`` trials asked under the
        start lock, launched as one batch (``launcher.launch``), waited for, told; again until
        ``n_trials`` are done. Returns why it stopped early (None: done)."""
        from adabudget.search.liveness import Beat, beat_interval

        stop = None
        while stop is None and not self.signals:
            jobs: list[_Job] = []
            lock.acquire()
            try:
                while len(jobs) < self.n_jobs and self._wanted(study, n_trials):
                    trial = study.ask(space.distributions)
                    trial.set_user_attr("worker", {"host": HOST, "pid": os.getpid()})  # the sweep tells it
                    beat = Beat(study._storage, trial._trial_id, beat_interval(self.setup_.scfg.grace_period))
                    jobs.append(_Job(trial, None, None, [], int(trial.user_attrs.get("retries", 0)), beat))
                    beat.__enter__()
            finally:
                lock.release()
            for job in list(jobs):
                try:
                    job.overrides, _ = self._prepare(study, space, job.trial)
                except ConfigError as err:  # the command is wrong: the batch asked so far still runs
                    job.beat.stop()
                    jobs.remove(job)
                    stop = str(err)
            if not jobs:
                break
            first = self.launched
            self.trial_task.trials = {
                first + i: (job.trial._trial_id, job.trial.number) for i, job in enumerate(jobs)
            }
            for job in jobs:
                params = job.trial.params.items()
                sampled = " ".join(f"{k}={render(v, space.decoders.get(k))}" for k, v in params)
                print(f"trial {job.trial.number} launched: {sampled}", flush=True)
            # while launch() waits for the batch, Ctrl-C or SIGTERM ends the wait; the jobs are the
            # launcher's (submitit's, Slurm's) and run on
            waiting = {s: signal.signal(s, _stop_waiting) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                returns = list(self.launcher.launch([j.overrides for j in jobs], initial_job_idx=first))
            except KeyboardInterrupt:
                self.signals += 1
                for job in jobs:
                    job.beat.stop()
                print(
                    f"\nstopped waiting: {len(jobs)} launched job(s) run on (cancel them with the "
                    "launcher's tools, e.g. scancel); their trials are re-queued as stale when the same "
                    "command runs again",
                    file=sys.stderr,
                )
                return "interrupted"
            except Exception as err:  # the launcher lost the batch (a job's process died, sbatch failed)
                traceback.print_exc()
                returns = [err] * len(jobs)
            finally:
                for s, h in waiting.items():
                    signal.signal(s, h)
            self.launched += len(jobs)
            for job, ret in zip(jobs, returns):
                state, error = self._tell(study, job, launched_outcome(ret))
                if state == "fail":
                    failed.append(f"trial {job.trial.number}: {error}")
            progress.poll(study)
            if stop is None and (stop := self._too_many_failures(failed)):
                print(f"stopping: {stop}", file=sys.stderr)
        return stop

    def _too_many_failures(self, failed: list[str]) -> str | None:
        """Why the sweep stops starting jobs, once more than max_failure_rate x n_trials failed."""
        if len(failed) <= self.max_failure_rate * self.n_trials:
            return None
        return (
            f"{len(failed)} of this sweep's jobs failed (hydra.sweeper.max_failure_rate="
            f"{self.max_failure_rate:g} of n_trials={self.n_trials})"
        )

    def _on_signal(self, signum, frame) -> None:
        """Ctrl-C / SIGTERM: the running jobs get SIGTERM (they checkpoint and end), then SIGKILL."""
        self.signals += 1
        what = "checkpoint and end (again to kill them)" if self.signals == 1 else "are killed"
        msg = f"\nstopping: no new trials; {len(self.pool)} running job(s) {what}; the same command resumes\n"
        os.write(2, msg.encode())  # not print: a signal handler may interrupt a print
        for job in self.pool.values():
            try:
                os.kill(job.process.pid, signal.SIGTERM if self.signals == 1 else signal.SIGKILL)
            except ProcessLookupError:
                pass

    @staticmethod
    def _wanted(study, n_trials: int) -> bool:
        trials = study.get_trials(deepcopy=False)
        return sum(optuna_factory.finished(t) or t.state == TrialState.RUNNING for t in trials) < n_trials

    def _start(self, study, space: Space, release: Callable[[], None] = lambda: None) -> _Job:
        """Ask a trial and fork its job; ``release`` (the start lock's) is called once the trial
        is RUNNING and owned, before the fork."""
        from adabudget.search.liveness import Beat, beat_interval

        trial = study.ask(space.distributions)
        # the sweep owns its trials (it tells them): if it dies, they are stale (its jobs get SIGTERM).
        # Its heartbeat (search.liveness) keeps them alive for other hosts' workers however long a job
        # goes without logging a step, on every storage (PostgreSQL too: Optuna's own heartbeat is off)
        trial.set_user_attr("worker", {"host": HOST, "pid": os.getpid()})
        beat = Beat(study._storage, trial._trial_id, beat_interval(self.setup_.scfg.grace_period)).__enter__()
        release()
        try:
            return self._fork(study, space, trial, beat)
        except BaseException:
            beat.stop()
            raise

    def _prepare(self, study, space: Space, trial) -> tuple[list[str], Any]:
        """The trial's overrides and its job's config, composed here; ConfigError (the trial told
        failed) when they do not compose."""
        if self.custom_search_space:
            self.extend(self.config, trial)
        overrides = space.overrides(trial.params)
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr(
            "run_dir", str(self.sweep_dir / str(trial.number))
        )  # adabudget.cli's multirun folder
        try:
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        except Exception as err:  # the overrides do not compose: the command is wrong, not the trial
            trial.set_user_attr("error", str(err))
            study.tell(trial, state=TrialState.FAIL)
            raise ConfigError(f"trial {trial.number}: {' '.join(overrides)}: {err}") from err
        return overrides, config

    def _fork(self, study, space: Space, trial, beat) -> _Job:
        overrides, config = self._prepare(study, space, trial)
        from omegaconf import open_dict, read_write

        with read_write(config.hydra), open_dict(config):
            config.hydra.job.id = trial.number
            config.hydra.job.num = trial.number
            config.hydra.sweep.dir = str(
                self.sweep_dir
            )  # as resolved here (its ${now:} and pid are the sweep's)
        ctx = multiprocessing.get_context("fork")  # the job inherits the task function and the imports
        receive, send = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=self._job_main,
            args=(send, config, trial._trial_id, os.getpid()),
            name=f"trial-{trial.number}",
        )
        process.start()
        send.close()
        trial.set_user_attr("job_pid", process.pid)
        sampled = " ".join(f"{k}={render(v, space.decoders.get(k))}" for k, v in trial.params.items())
        print(f"trial {trial.number} started (pid {process.pid}): {sampled}", flush=True)
        return _Job(trial, process, receive, overrides, int(trial.user_attrs.get("retries", 0)), beat)

    def _job_main(self, send, config, trial_id: int, parent: int) -> None:
        """The job's process: its trial hook, a thread budget, then Hydra's ``run_job``."""
        global _CURRENT
        from hydra.core.utils import run_job

        _detach_from_sweep(parent)
        hook = TrialHook(self.setup_, trial_id, self.pruner, self.metric, self.report)
        _CURRENT = hook  # any task function reaches its trial through current_trial()
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(max(1, (os.cpu_count() or 1) // self.n_jobs))
        ret = run_job(
            hydra_context=self.hydra_context,
            task_function=bind_trial(self.task_function, hook) or self.task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        send.send(trial_outcome(ret, self.objectives, len(self.directions), config.hydra.job.num))
        send.close()

    def _end(self, study, job: _Job, interrupted: bool) -> tuple[str, str | None]:
        """Tell the trial how its job ended; returns (state, error)."""
        outcome = job.conn.recv() if job.conn.poll() else None
        job.process.join()
        job.conn.close()
        if outcome is None:
            why = f"the job's process ended with exit code {job.process.exitcode} before reporting"
            outcome = {"state": "interrupted" if interrupted else "fail", "error": why}
        return self._tell(study, job, outcome)

    def _tell(self, study, job: _Job, outcome: dict) -> tuple[str, str | None]:
        """Tell ``job``'s trial its outcome (``trial_outcome``'s dict), re-queue it if it was
        interrupted; returns (state, error)."""
        from adabudget.search.liveness import tell

        trial, state = job.trial, outcome["state"]
        attrs = {
            key: outcome[key]
            for key in ("run_dir", "status", "wall_time_s", "trainable_params", "error")
            if outcome.get(key) is not None
        }
        try:  # failed as stale meanwhile (a lost race): logged, a result kept as a duplicate, no crash
            if state == "complete":
                told = tell(study, trial, outcome["values"], attrs=attrs)
            else:
                told = tell(
                    study,
                    trial,
                    state=TrialState.PRUNED if state == "pruned" else TrialState.FAIL,
                    attrs=attrs,
                )
        finally:
            if job.beat is not None:
                job.beat.stop()
        if not told:  # the worker that failed it queued it again already
            return "lost", None
        if state == "interrupted" and job.retries < MAX_RETRIES:  # stopped, not bad: run it again
            study.enqueue_trial(
                trial.params,
                user_attrs={
                    "retry_of": trial.user_attrs.get("retry_of", trial.number),
                    "retries": job.retries + 1,
                },
            )
        return state, outcome.get("error")

    # ------------------------------------------------------------ the record
    def _write_record(self, study, n_trials: int) -> None:
        """``sweeps/<study>/sweep.json`` (the whole study) and the multirun folder's
        ``optimization_results.yaml`` (hydra-optuna-sweeper's file)."""
        from adabudget.log import environment, write_json_atomic
        from adabudget.search.record import best_trials
        from adabudget.search.trial import trial_row
        from omegaconf import OmegaConf

        setup = self.setup_
        trials = study.get_trials(deepcopy=False)
        best = [
            {
                **trial_row(t),
                "command": "adabudget train "
                + " ".join(shlex.quote(o) for o in t.user_attrs.get("overrides", [])),
            }
            for t in best_trials(study, setup)
        ]
        key = "best" if len(self.directions) == 1 else "pareto_front"
        record = {
            "study": setup.study,
            "storage": without_password(setup.storage),
            "objectives": setup.scfg.objectives,
            "directions": self.directions,
            "n_trials": n_trials,
            "finished": sum(optuna_factory.finished(t) for t in trials),
            "settings": study.user_attrs.get("adabudget_sweeper"),
            "sampler": type(study.sampler).__name__,
            "pruner": type(self.pruner).__name__,
            "trials": [trial_row(t) for t in trials],
            key: best,
            **environment(),
        }
        Path(setup.root).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(setup.root) / "sweep.json", record)
        if len(self.directions) == 1:
            results = {
                "name": "adabudget",
                "study": setup.study,
                "best_params": best[0]["params"] if best else None,
                "best_value": best[0]["values"][0] if best else None,
            }
        else:
            results = {
                "name": "adabudget",
                "study": setup.study,
                "solutions": [{"params": b["params"], "values": b["values"]} for b in best],
            }
        if self.sweep_dir.is_dir():
            OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optimization_results.yaml")
        if best:
            values = " ".join(f"{n}={v:.4g}" for n, v in zip(record["objectives"], best[0]["values"]))
            print(f"best: trial {best[0]['number']} {values} in {best[0]['run_dir']}")
        print(
            f"study record: {Path(setup.root) / 'sweep.json'} "
            f"({record['finished']} of {n_trials} trials finished)"
        )


def _forget_password(config) -> None:
    """Keep the storage's password out of everything that outlives this process's memory: the
    sweeper read it already (``SweeperImpl.storage``), so the config every job is composed from
    (``hydra.overrides.hydra``, ``hydra.sweeper.storage``) and ``sys.argv`` (W&B records it in
    each job's metadata; forked jobs inherit it) get the URL without it."""
    from omegaconf import read_write

    sys.argv = [scrub(a) for a in sys.argv]
    with read_write(config.hydra):
        config.hydra.overrides.hydra = [scrub(o) for o in config.hydra.overrides.hydra]
        if config.hydra.sweeper.get("storage"):
            config.hydra.sweeper.storage = without_password(str(config.hydra.sweeper.storage))


def _preload() -> None:
    """Import what every job would import (budget's engine and transformers' lazy model and
    tokenizer modules) once, here: forked jobs inherit them, and a tiny job's start drops from
    about 10 s to 1 s on two busy cores."""
    try:
        import adabudget.training  # noqa: F401
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401
    except ImportError:
        pass
