"""The Optuna outer loop: a study over PEFT configurations, each trial an ordinary training run.

    adabudget search search.space=s4 search.budget=331776 search.n_trials=20

``run_search(cfg)`` validates everything before any trial (the run config, the space against
the budget, the objectives against the task, an existing study's settings), opens or creates
the study, enqueues the baselines, lets ``search.workers`` processes run trials
(``search.workers``), then writes ``runs/search/<study>/search.json`` and ``best.yaml`` and,
with ``search.retrain_top_k``, re-trains the best configurations and the baselines on the
full schedule with several seeds and scores them on test. The search itself sees only dev.
With ``search.scorer=supernet`` a weight-sharing supernet is trained once (``search.supernet``)
and trials score its sub-configurations with inherited weights instead of training them.

A trial (``make_objective``): the space samples a configuration (``search.space.sample``:
analytic count, budget solving; an infeasible one is recorded with an Optuna constraint and
never trained), it is merged onto the run config, and ``adabudget.training.train`` runs it in
``runs/search/<study>/trials/<number>/`` with the trial's study, number and parameters in the
record (``meta``); the folder is in the trial's user attributes. Pruners hear every dev
evaluation through ``train``'s ``on_eval`` hook.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from adabudget.config import ConfigError
from adabudget.search.config import SearchConfig
from adabudget.search.space import SpaceContext, check_space, get_space, merge_overrides, sample
from optuna.trial import TrialState

BASELINES = ("lora", "adalora", "s4")
STUDY_KEYS = ("space", "objectives", "directions", "budget", "model", "task", "trial_overrides", "scorer")
STUDY_KEY_DEFAULTS = {"scorer": "train"}  # what a study made before the key existed has


class TrialFailed(Exception):
    """The trial's run ended without a result (diverged, crashed, interrupted)."""


class SearchRefused(ConfigError):
    """A refusal of the search itself, not of one trial (a broken space): it ends the search at once."""


# A stop signal that reached a search worker outside a training (``search.workers`` installs the
# handler; while a run trains, ``adabudget.training``'s own handler takes the signal and checkpoints).
STOP: dict = {"signal": None}


def stop_if_requested() -> None:
    """Raise ``SearchInterrupted`` if a stop signal arrived since the worker started."""
    if STOP["signal"]:
        raise SearchInterrupted(STOP["signal"])


class SearchInterrupted(Exception):
    """Ctrl-C or SIGTERM reached a trial's run: it checkpointed and ended ``interrupted``, its trial
    is failed and queued again, and this worker stops (a scheduler's SIGTERM means stop, not
    "go on with the next trial"). ``code``: the exit code, 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, cause: str):
        super().__init__(cause)
        self.code = 143 if "SIGTERM" in cause else 130


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


# ---------------------------------------------------------------- set-up
def prepare(cfg) -> Setup:
    """Check the search and the run config and settle the study's name and storage (no trial runs)."""
    from adabudget.compose import resolve
    from adabudget.config import to_dict, validate
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    cfg.pop("hydra", None)
    scfg = _search_config(cfg.pop("search", None) or {})
    if scfg.scorer == "supernet" and scfg.space_names() == ["s4"]:
        # the default space becomes the supernet's own (its menus); validate refuses any other
        scfg.space = "supernet"
    run = resolve(cfg)
    validate(run)
    task_meta = _task_meta(run)
    scfg.validate(task_meta["primary"])
    objectives = scfg.objective_names(task_meta["primary"])
    metrics = (
        {"accuracy", "f1", "matthews"} if not task_meta["regression"] else {"pearson", "spearman", "mse"}
    )
    for name in objectives:
        if name.startswith("dev.") and name[4:] not in metrics:
            kind = "regression" if task_meta["regression"] else "classification"
            raise ConfigError(
                f"search.objectives: {name} is not computed on {run.data.task} ({kind}: dev.{', dev.'.join(sorted(metrics))})"
            )
    study = scfg.study or f"{'-'.join(scfg.space_names())}-{Path(str(run.data.task)).name.replace('/', '_')}"
    root = Path(scfg.root or Path(run.runs_root) / "search") / study
    storage = database_url(scfg.storage) if scfg.storage else str(root / "journal.log")
    base = to_dict(run)
    base.update(run_dir=None, resume=None)
    setup = Setup(
        base,
        asdict(scfg),
        study,
        storage,
        str(root),
        task_meta["primary"],
        task_meta["regression"],
        task_meta["num_labels"],
    )
    ctx = make_context(setup)
    space = get_space(scfg.space_names())
    if "supernet" in scfg.space_names():  # exact menus: rejection finds narrow bands 64 draws miss
        from adabudget.search.supernet import SupernetSpace

        SupernetSpace.from_context(ctx).check()
    else:
        check_space(space, ctx)  # every configuration missing the budget fails here, before any trial
    for name in _baseline_names(scfg):
        baseline_overrides(name, ctx)  # unknown names and unusable override dicts fail here
    return setup


def database_url(url: str) -> str:
    """``postgresql://`` names no driver, and SQLAlchemy 2.1 then imports psycopg (3); with only
    psycopg2 installed (psycopg2-binary, as the docs say) that failed with an ImportError in
    every process: name psycopg2 then."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        if importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def _search_config(values: dict) -> SearchConfig:
    names = set(SearchConfig.__dataclass_fields__)
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"search.{unknown[0]}: unknown key; known keys: {sorted(names)}")
    return SearchConfig(**values)


def _task_meta(run) -> dict:
    """The task's label kind, read once in the main process (a packaged task: no tokenizing)."""
    from adabudget.data import PACKAGED_TASKS
    from adabudget.metrics import primary_metric

    if run.data.task in PACKAGED_TASKS:
        regression = run.data.task != "mr" or bool(run.data.regression)
        num_labels = 1 if regression else 2
    else:
        from adabudget.data import load_task, load_tokenizer

        task = load_task(run.data, load_tokenizer(run.model.name, run.model.revision))
        regression, num_labels = task.regression, task.num_labels
    return {"regression": regression, "num_labels": num_labels, "primary": primary_metric(regression)}


def make_context(setup: Setup) -> SpaceContext:
    scfg = setup.scfg
    base = setup.base
    supernet = "supernet" in scfg.space_names()  # its band is search.supernet.tolerance wide
    return SpaceContext.from_model(
        base["model"]["name"],
        num_labels=setup.num_labels,
        regression=setup.regression,
        revision=base["model"]["revision"],
        budget=scfg.budget,
        budget_percent=scfg.budget_percent,
        extra_methods=scfg.extra_methods,
        method=copy.deepcopy(base["method"]),
        max_length=base["data"]["max_length"],
        supernet=scfg.supernet,
        **({"tolerance": scfg.supernet.tolerance} if supernet else {}),
    )


def make_storage(setup: Setup):
    """A journal file (several processes on one machine) or a database (several machines).

    Stale trials have one owner on every storage, ``search.liveness`` (through
    ``search.workers.recover_stale``): Optuna's RDB heartbeat stays off. With it on, two
    mechanisms failed and re-queued killed trials, each with its own retry count, and Optuna's
    often got there first (its failed trial had no ``failed_because``)."""
    url = setup.storage
    if url.startswith(("postgresql", "mysql", "sqlite")):
        from optuna.storages import RDBStorage

        if url.startswith("sqlite"):
            return RDBStorage(url)
        # a pooled connection the server closed during a long trial is replaced, not used
        return RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    from adabudget.search.journal import repair_journal
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(url).parent.mkdir(parents=True, exist_ok=True)
    repair_journal(url)  # a line cut by a full disk or a kill: Optuna would fail on it for good
    return JournalStorage(JournalFileBackend(url))


def make_sampler(setup: Setup, salt: tuple[int, ...] = ()):
    """The sampler, seeded with ``search.seed`` mixed with ``salt`` (a worker's index and the study's
    trial count when it started): with one seed in every process, two workers, or a resumed run,
    drew the same configurations as each other (TPE's random start-up above all)."""
    import numpy as np

    scfg = setup.scfg
    seed = int(np.random.SeedSequence([scfg.seed, *salt]).generate_state(1)[0]) if salt else scfg.seed
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if scfg.sampler == "tpe":  # multivariate + group: TPE that understands conditional spaces
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
    if scfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if scfg.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if scfg.sampler in ("random", "evolution"):  # evolution enqueues its candidates (search.supernet)
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GridSampler(grid_of(get_space(scfg.space_names())), seed=seed)


def grid_of(space) -> dict:
    """The values of every parameter of a declarative space, for Optuna's GridSampler."""
    dists = getattr(space, "distributions", None)
    why = "needs a declarative space (configs/search/space/*.yaml)"
    grid = {}
    for name, d in (dists or {}).items():
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            grid[name] = list(d.choices)
        elif isinstance(d, optuna.distributions.IntDistribution) and not d.log:
            grid[name] = list(range(d.low, d.high + 1, d.step))
        else:
            why = f"cannot enumerate {name} ({type(d).__name__}: an interval)"
            dists = None
            break
    if not dists:
        raise ConfigError(
            f"search.sampler=grid: {why}; use choice(...) and range(...) only, or search.sampler=tpe"
        )
    return grid


def make_pruner(setup: Setup):
    if setup.scfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if setup.scfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def open_study(setup: Setup, create: bool = False) -> optuna.Study:
    """The study; with ``create`` a new one gets its settings and baselines, and an existing one
    must have been made by the same space, objectives and budget (else a ConfigError)."""
    from adabudget.search.credentials import PASSWORD_HELP, refused_login, without_password

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = make_storage(setup)
    except Exception as err:  # SQLAlchemy's OperationalError; its text names no password
        if not refused_login(err):
            raise
        reason = str(err).splitlines()[0]
        raise ConfigError(
            f"search.storage={without_password(setup.storage)}: the database refused the login "
            f"({reason}); {PASSWORD_HELP}"
        ) from None
    scfg = setup.scfg
    settings = {
        "space": scfg.space_names(),
        "objectives": scfg.objective_names(setup.primary),
        "directions": scfg.direction_names(setup.primary),
        "budget": scfg.budget or scfg.budget_percent,
        "model": setup.base["model"]["name"],
        "task": setup.base["data"]["task"],
        "trial_overrides": list(scfg.trial_overrides),
        "scorer": scfg.scorer,
    }
    if not create:
        return optuna.load_study(
            study_name=setup.study, storage=storage, sampler=make_sampler(setup), pruner=make_pruner(setup)
        )
    study = optuna.create_study(
        study_name=setup.study,
        storage=storage,
        directions=settings["directions"],
        sampler=make_sampler(setup),
        pruner=make_pruner(setup),
        load_if_exists=True,
    )
    saved = study.user_attrs.get("adabudget")
    if saved is None:
        study.set_user_attr("adabudget", settings)
        for name in _baseline_names(scfg):
            study.enqueue_trial(
                {}, user_attrs={"baseline": name if isinstance(name, str) else json.dumps(name)}
            )
    else:
        differ = [k for k in STUDY_KEYS if saved.get(k, STUDY_KEY_DEFAULTS.get(k)) != settings.get(k)]
        if differ:
            what = ", ".join(f"{k}: {saved.get(k)} -> {settings.get(k)}" for k in differ)
            raise ConfigError(
                f"search.study={setup.study}: this study exists in {without_password(setup.storage)} with other "
                f"settings ({what}); "
                f"resume it with its own settings, or start a new study with search.study=<new name>"
            )
    return study


# ---------------------------------------------------------------- baselines
def _baseline_names(scfg: SearchConfig) -> list:
    if scfg.enqueue in (None, "none", []):
        return []
    if scfg.scorer == "supernet":
        if scfg.enqueue == "default":
            return []  # LoRA, AdaLoRA and S4 are not sub-configurations; retrain_top_k re-trains the first two
        raise ConfigError(
            "search.enqueue: a supernet scores its own sub-configurations only; drop search.enqueue (the LoRA "
            "and AdaLoRA baselines are re-trained beside the best with search.retrain_top_k)"
        )
    if scfg.enqueue == "default":
        return list(BASELINES)
    items = [scfg.enqueue] if isinstance(scfg.enqueue, (str, dict)) else list(scfg.enqueue)
    for item in items:
        if isinstance(item, str) and item not in BASELINES:
            raise ConfigError(
                f"search.enqueue: unknown baseline '{item}'; use some of {BASELINES} or override dicts"
            )
    return items


def baseline_overrides(name, ctx: SpaceContext) -> dict:
    """A known configuration at the search's budget: the largest LoRA within it (its rank is coarse:
    on MiniLM a rank costs 41,472 parameters), AdaLoRA whose kept triplets fit the budget
    (``target_params``; b(0) about 1.5 b(T), Table 7), or the S4 paper's pattern solved to it. Baselines are reference points: their real
    count is recorded and not held to the search's tolerance."""
    from adabudget.compose import preset

    if isinstance(name, str) and name.startswith("{"):
        name = json.loads(name)
    if isinstance(name, dict):
        if not set(name) <= {"method", "train", "model", "data"}:
            raise ConfigError(f"search.enqueue: {name}: an override dict has method / train sections only")
        return copy.deepcopy(name)
    arch = ctx.arch
    linears = arch.match_linears(arch.default_targets())
    if name == "lora":
        per_rank = sum(s.in_features + s.out_features for _, s in linears)
        r = max(1, ctx.budget // per_rank) if ctx.budget else 8  # the largest LoRA within the budget
        return {"method": {"name": "lora", "r": r, "alpha": 2.0 * r}}
    if name == "adalora":
        if not ctx.budget:
            return {"method": {"name": "adalora"}}
        target_r = ctx.budget / sum(s.in_features + s.out_features + 1 for _, s in linears)
        init_r = max(math.ceil(1.5 * target_r), math.floor(target_r) + 1)
        # b(T) in parameters: the kept triplets fit the budget whichever matrices win them (a total
        # rank at the average triplet cost ended 7-8% over it on MiniLM, the FFN triplets costing more)
        return {"method": {"name": "adalora", "init_r": init_r, "target_params": int(ctx.budget)}}
    method = {"name": "s4", **preset("method", "s4")}
    if ctx.budget:
        method["budget"] = ctx.budget
    return {"method": method}


# ---------------------------------------------------------------- one trial
def trial_config(setup: Setup, overrides: dict, run_dir: str, meta: dict, for_search: bool = True) -> dict:
    """The run config of a trial (or a re-training): the base run, the sampled overrides, the
    trial-only overrides, its own folder and the labels of its record."""
    from omegaconf import OmegaConf

    cfg = merge_overrides(copy.deepcopy(setup.base), overrides)
    if for_search and setup.scfg.trial_overrides:
        merged = OmegaConf.merge(
            OmegaConf.create(cfg), OmegaConf.from_dotlist(list(setup.scfg.trial_overrides))
        )
        cfg = OmegaConf.to_container(merged)
    cfg["run_dir"], cfg["resume"] = run_dir, None
    cfg["train"] = {**cfg["train"], "progress": False, "num_threads": setup.scfg.worker_threads()}
    if for_search:
        cfg["train"]["checkpoint"] = "none"  # a trial is re-run, not resumed
    cfg["logger"] = {**cfg["logger"], "group": setup.study}
    cfg["meta"] = {**cfg.get("meta", {}), **meta}
    return cfg


def make_objective(setup: Setup, ctx: SpaceContext, space, release=lambda: None):
    """The function Optuna calls for one trial; ``release`` is called once the trial exists
    (the worker's start lock, see ``search.workers``).

    The trial may be failed as stale while it trains (a lost race: another host judged its worker
    dead); it then trains on and returns its values, which ``search.liveness.tell`` keeps as a
    duplicate: the attributes it writes after the training are kept where the storage still takes them."""
    import contextlib
    import os
    import socket

    from adabudget.search.liveness import identity
    from adabudget.search.wandb import trial_summary
    from adabudget.training import train

    scfg = setup.scfg
    if scfg.scorer == "supernet":
        from adabudget.search.supernet import make_objective as supernet_objective

        return supernet_objective(setup, ctx, release)
    names = scfg.objective_names(setup.primary)
    directions = scfg.direction_names(setup.primary)
    head = ctx.arch.head_params if setup.base["model"]["train_head"] else 0

    def note(trial, key: str, value) -> None:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # failed as stale: a lost race
            trial.set_user_attr(key, value)

    def objective(trial: optuna.Trial):
        trial.set_user_attr(
            "worker", {"host": socket.gethostname(), "pid": os.getpid(), "id": identity()["id"]}
        )
        release()
        baseline = trial.user_attrs.get("baseline")
        try:
            if (
                baseline is not None
            ):  # a reference point: sized by baseline_overrides, its real count recorded
                fixed = baseline_overrides(baseline, ctx)
                drawn = sample(
                    trial, lambda t, c: copy.deepcopy(fixed), dataclasses.replace(ctx, budget=None)
                )
            else:
                drawn = sample(trial, space, ctx)
        except ConfigError as err:  # a broken space (not a dict, an unknown key): every draw would fail alike
            raise SearchRefused(str(err)) from err
        trial.set_user_attr("overrides", drawn.overrides)
        twin = _trained_twin(trial, drawn.overrides) if drawn.feasible else None
        if twin is not None:  # the sampler proposed a trained configuration again: its result, no training
            trial.set_user_attr("duplicate_of", twin.number)
            return list(twin.values)
        if not drawn.feasible:  # its constraint (> 0) keeps it out of every sampler's and best's reach
            return infeasible_values(drawn, names, directions)
        run_dir = str(Path(setup.root) / "trials" / str(trial.number))
        trial.set_user_attr("run_dir", run_dir)
        meta = {
            "study": setup.study,
            "trial": trial.number,
            "params": trial.params,
        }  # no storage: it may hold a password
        meta.update(trial_summary(setup, trial.number, trial.params, drawn.budget_params))  # W&B summary
        cfg = trial_config(setup, drawn.overrides, run_dir, meta)
        on_eval = None
        if scfg.pruner != "none":
            metric = names[0][4:]

            def on_eval(step, metrics):
                try:
                    trial.report(metrics[metric], step)
                except optuna.exceptions.UpdateFinishedTrialError:  # failed as stale meanwhile: train on
                    return False
                return trial.should_prune()

        if STOP["signal"]:  # stopped between sampling and training: run it again, stop this worker
            trial.set_user_attr("error", STOP["signal"])
            _requeue(trial, baseline)
            raise SearchInterrupted(STOP["signal"])
        result = train(cfg, on_eval=on_eval)
        note(trial, "status", result["status"])
        note(trial, "wall_time_s", result["wall_time_s"])
        built = result["trainable_params"] - head
        if built != drawn.trainable_params:
            raise TrialFailed(
                f"built {built} trainable parameters, counted {drawn.trainable_params}: a count bug"
            )
        if result["status"] == "pruned":
            raise optuna.TrialPruned(f"pruned at step {result['pruned_at']}")
        if result["status"] != "completed":
            note(trial, "error", result.get("error") or result.get("interrupted_by"))
            if result["status"] == "interrupted":  # stopped, not bad: run it again
                _requeue(trial, baseline)
            if result["status"] == "interrupted" and result.get("interrupted_by"):
                raise SearchInterrupted(
                    result["interrupted_by"]
                )  # the worker stops (search.workers.run_trial)
            raise TrialFailed(result.get("error") or result["status"])
        values = []
        for n in names:
            if n == "params":
                values.append(float(drawn.budget_params))
            elif n == "wall_time":
                values.append(float(result["wall_time_s"]))
            else:
                values.append(float(result["final"]["dev"][n[4:]]))
        return values

    def _requeue(trial, baseline) -> None:
        """Queue ``trial``'s parameters again (at most ``search.max_retries`` times in a row), unless
        it was failed as stale meanwhile (that queued it already)."""
        retries = int(trial.user_attrs.get("retries", 0))
        if (
            retries < scfg.max_retries
            and not trial.study._storage.get_trial(trial._trial_id).state.is_finished()
        ):
            attrs = {"retry_of": trial.user_attrs.get("retry_of", trial.number), "retries": retries + 1}
            if baseline is not None:
                attrs["baseline"] = baseline
            trial.study.enqueue_trial(trial.params, user_attrs=attrs)

    return objective


def infeasible_values(drawn, names: list[str], directions: list[str]) -> list[float]:
    """An infeasible trial's values: placeholders no feasible trial can lose to (Optuna and
    optuna-dashboard take ±inf); its constraint (> 0) keeps it out of every sampler's reach."""
    return [
        float(drawn.budget_params or 0) if n == "params" else -math.inf if d == "maximize" else math.inf
        for n, d in zip(names, directions)
    ]


def _trained_twin(trial, overrides: dict):
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


# ---------------------------------------------------------------- the record of a study
def finished(trial) -> bool:
    """A trained trial: completed within the budget, or pruned. Infeasible and failed ones are not,
    nor a repeat of a trained configuration (its result was copied, ``duplicate_of``)."""
    if trial.state == TrialState.PRUNED:
        return True
    return (
        trial.state == TrialState.COMPLETE
        and not trial.user_attrs.get("infeasible")
        and trial.user_attrs.get("duplicate_of") is None
    )


def trial_row(t) -> dict:
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


def best_trials(study: optuna.Study, setup: Setup) -> list:
    """Single objective: the best feasible trial; several: the Pareto front of the feasible ones."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and finished(t)]
    if not done:
        return []
    directions = setup.scfg.direction_names(setup.primary)
    sign = [1 if d == "maximize" else -1 for d in directions]
    if len(directions) == 1:
        return [max(done, key=lambda t: sign[0] * t.values[0])]
    front = [t for t in done if not any(_dominates(o, t, sign) for o in done)]
    return sorted(front, key=lambda t: -sign[0] * t.values[0])


def top_trials(study: optuna.Study, setup: Setup, k: int) -> list:
    """The ``k`` configurations to re-train, best first: single objective, the ``k`` best feasible
    trials; several, the Pareto front in order of the first objective. Repeats of a trained
    configuration (not ``finished``) and the LoRA / AdaLoRA baselines (re-trained as such) are
    left out, so ``k`` counts distinct configurations."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and finished(t)]
    done = [t for t in done if t.user_attrs.get("baseline") not in RETRAINED]
    sign = [1 if d == "maximize" else -1 for d in setup.scfg.direction_names(setup.primary)]
    if len(sign) > 1:
        done = [t for t in done if not any(_dominates(o, t, sign) for o in done)]
    return sorted(done, key=lambda t: (-sign[0] * t.values[0], t.number))[:k]


RETRAINED = ("lora", "adalora")  # the baselines every final evaluation re-trains


def _dominates(a, b, sign) -> bool:
    va = [s * v for s, v in zip(sign, a.values)]
    vb = [s * v for s, v in zip(sign, b.values)]
    return all(x >= y for x, y in zip(va, vb)) and any(x > y for x, y in zip(va, vb))


def write_outputs(study: optuna.Study, setup: Setup, retrain: dict | None = None) -> dict:
    """``search.json`` (every trial, the best or the Pareto front, settings, provenance) and
    ``best.yaml`` (the best configuration as an experiment preset)."""
    from adabudget.log import environment, write_json_atomic
    from adabudget.search.credentials import without_password

    scfg = setup.scfg
    best = best_trials(study, setup)
    trials = [trial_row(t) for t in study.get_trials(deepcopy=False)]
    out = {
        "study": setup.study,
        "storage": without_password(setup.storage),
        "space": scfg.space_names(),
        "objectives": scfg.objective_names(setup.primary),
        "directions": scfg.direction_names(setup.primary),
        "sampler": scfg.sampler,
        "pruner": scfg.pruner,
        "budget": scfg.budget,
        "budget_percent": scfg.budget_percent,
        "n_trials": scfg.n_trials,
        "finished": sum(finished(t) for t in study.get_trials(deepcopy=False)),
        "model": setup.base["model"]["name"],
        "task": setup.base["data"]["task"],
        "trial_overrides": list(scfg.trial_overrides),
        "trials": trials,
        ("best" if len(best) <= 1 and len(scfg.objective_names(setup.primary)) == 1 else "pareto_front"): [
            trial_row(t) for t in best
        ],
        "retrain": retrain,
        "scorer": scfg.scorer,
        **environment(),
    }
    if scfg.scorer == "supernet":
        from adabudget.search.supernet import SupernetSpace, describe, supernet_dir

        out["supernet"] = {
            "run_dir": str(supernet_dir(setup)),
            "calibration_steps": scfg.supernet.calibration_steps,
            **describe(SupernetSpace.from_context(make_context(setup))),
        }
    root = Path(setup.root)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "search.json", out)
    if best:
        (root / "best.yaml").write_text(best_yaml(best[0], setup))
    return out


def best_yaml(trial, setup: Setup) -> str:
    """The trial's configuration as an experiment preset: ``adabudget train experiment=<this file>``.

    It holds the trial's whole method node and selects that method's preset: merged into the
    default method (AdaLoRA) a LoRA node fails (``Key 'r' not in 'AdaLoRAConfig'``), and a study
    whose space sets no method (``method=lora search.space=lr``) would otherwise train AdaLoRA.
    """
    from adabudget.compose import config_dir, resolve
    from adabudget.config import to_dict
    from omegaconf import OmegaConf

    overrides = copy.deepcopy(trial.user_attrs.get("overrides") or {})
    method = to_dict(resolve(merge_overrides(setup.base, overrides)))["method"]
    preset = method["name"] if (Path(config_dir()) / "method" / f"{method['name']}.yaml").exists() else None
    body = {"defaults": [{"override /method": preset}], **overrides, "method": method}
    values = ", ".join(
        f"{n}={v:.4g}" for n, v in zip(setup.scfg.objective_names(setup.primary), trial.values)
    )
    head = (
        f"# @package _global_\n# Trial {trial.number} of study {setup.study} ({values}), "
        f"{trial.user_attrs.get('trainable_params'):,} trainable adapter parameters.\n"
        f"# Run it: adabudget train experiment={Path(setup.root) / 'best.yaml'}\n"
    )
    return head + OmegaConf.to_yaml(OmegaConf.create(body))


# ---------------------------------------------------------------- final evaluation
def retrain(study: optuna.Study, setup: Setup, log=print) -> dict:
    """Re-train the ``retrain_top_k`` best configurations and the LoRA / AdaLoRA baselines at the
    same budget on the full schedule (no trial overrides), once per ``retrain_seeds``, and report
    dev and test as mean ± std. Finished runs are kept, interrupted ones resumed."""
    scfg = setup.scfg
    ctx = make_context(setup)
    picks = [
        (f"trial {t.number}", t.user_attrs["overrides"]) for t in top_trials(study, setup, scfg.retrain_top_k)
    ]
    picks += [(name, baseline_overrides(name, ctx)) for name in RETRAINED]
    rows = []
    for label, overrides in picks:
        results = []
        for seed in scfg.retrain_seeds:
            folder = Path(setup.root) / "retrain" / label.replace(" ", "_") / f"s{seed}"
            results.append(
                _retrain_one(
                    setup, overrides, folder, {"study": setup.study, "retrain_of": label, "seed": seed}, seed
                )
            )
            log(f"retrain {label} seed {seed}: {results[-1]['status']}")
        rows.append(_summarise(label, results, setup.primary))
    return {"seeds": list(scfg.retrain_seeds), "metric": setup.primary, "rows": rows}


def _retrain_one(setup: Setup, overrides: dict, folder: Path, meta: dict, seed: int) -> dict:
    from adabudget.compose import resume_config
    from adabudget.training import train

    for path in sorted(folder.glob("*/result.json"), reverse=True):
        result = json.loads(path.read_text())
        if result.get("status") == "completed":
            return result
        if (path.parent / "checkpoints" / "last.pt").exists():
            return train(resume_config(path.parent))
    cfg = trial_config(
        setup,
        {**overrides, "train": {**overrides.get("train", {}), "seed": seed}},
        None,
        meta,
        for_search=False,
    )
    cfg["runs_root"], cfg["run_name"] = str(folder.parent), folder.name
    return train(cfg)


def _summarise(label: str, results: list[dict], metric: str) -> dict:
    def stats(split: str) -> dict:
        values = [
            r["final"][split][metric] for r in results if r["status"] == "completed" and split in r["final"]
        ]
        if not values:
            return {"mean": None, "std": None, "n": 0}
        return {
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values),
        }

    params = results[0].get("adapter_params_final") or results[0]["trainable_params"]
    return {
        "config": label,
        "trainable_params": results[0]["trainable_params"],
        "final_params": params,
        "dev": stats("dev"),
        "test": stats("test"),
        "run_dirs": [r["run_dir"] for r in results],
    }


def retrain_table(report: dict) -> str:
    lines = [
        f"| configuration | trainable params | dev {report['metric']} | test {report['metric']} | seeds |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:

        def cell(s):
            return "-" if s["mean"] is None else f"{s['mean']:.4f} ± {s['std']:.4f}"

        lines.append(
            f"| {row['config']} | {row['trainable_params']:,} | {cell(row['dev'])} | {cell(row['test'])} "
            f"| {row['test']['n']} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- the command
def run_search(cfg) -> dict:
    """``adabudget search``: prepare, open or create the study, run the workers to
    ``search.n_trials`` trained trials, write the record, re-train the best."""
    from adabudget.search.credentials import without_password
    from adabudget.search.workers import run_workers

    setup = prepare(cfg)
    study = open_study(setup, create=True)
    print(
        f"study {setup.study} in {without_password(setup.storage)}: {setup.scfg.n_trials} trials wanted, "
        f"{sum(finished(t) for t in study.get_trials(deepcopy=False))} done"
    )
    if setup.scfg.scorer == "supernet":  # train it first (or resume, or reuse the study's)
        from adabudget.search.supernet import ensure_supernet

        ensure_supernet(setup)
    try:
        if setup.scfg.sampler == "evolution":
            from adabudget.search.supernet import run_evolution

            run_evolution(setup)
        else:
            run_workers(setup)
    except (RuntimeError, SearchInterrupted):  # a worker died or was stopped: record what exists, then say so
        write_outputs(open_study(setup), setup)
        raise
    study = open_study(setup)
    report = write_outputs(study, setup)
    if setup.scfg.retrain_top_k:
        report = write_outputs(study, setup, retrain(study, setup))
        print(retrain_table(report["retrain"]))
    best = report.get("best") or report.get("pareto_front") or []
    if best:
        where = (
            f"in {best[0]['run_dir']}"
            if best[0]["run_dir"]
            else f"scored on the supernet ({best[0].get('sub')})"
        )
        print(f"best: trial {best[0]['number']} {best[0]['values']} {where}")
    print(f"record: {Path(setup.root) / 'search.json'}; best configuration: {Path(setup.root) / 'best.yaml'}")
    return report
