"""A study over PEFT configurations: its set-up and its trials, each an ordinary training run.

    adabudget search search.space=s4 search.budget=331776 search.n_trials=20

``prepare(cfg)`` validates everything before any trial (the run config, the space against the
budget, the objectives against the task) and settles the study's name and storage; ``open_study``
opens or creates it and enqueues the baselines; ``make_objective`` is one trial: sample (analytic
count, budget solving), merge onto the run config, ``adabudget.training.train`` in
``runs/search/<study>/trials/<number>/``. The command (``search.command.run_search``) runs the
workers, the record and the re-training. See docs/search.md.

Invariants: the search sees only dev; an infeasible configuration is recorded with an Optuna
constraint and never trained; an existing study must keep its settings; samplers, pruners,
directions and objective values come from ``search.optuna_factory`` (as in the Hydra sweeper).
With ``search.scorer=supernet`` a trial scores a sub-configuration instead
(``search.supernet.make_objective``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import asdict
from pathlib import Path

import optuna
from adabudget.config import ConfigError
from adabudget.search import optuna_factory
from adabudget.search.config import SearchConfig
from adabudget.search.spaces import get_space
from adabudget.search.spaces.context import SpaceContext, merge_overrides
from adabudget.search.spaces.sampling import check_space, sample
from adabudget.search.spaces.supernet import SupernetSpace
from adabudget.search.storage import database_url
from adabudget.search.trial import (
    STOP,
    SearchInterrupted,
    SearchRefused,
    Setup,
    TrialFailed,
    infeasible_values,
    trained_twin,
    trial_summary,
)

BASELINES = ("lora", "adalora", "s4")
STUDY_KEYS = ("space", "objectives", "directions", "budget", "model", "task", "trial_overrides", "scorer")
STUDY_KEY_DEFAULTS = {"scorer": "train"}  # what a study made before the key existed has


# ---------------------------------------------------------------- set-up
def prepare(cfg) -> Setup:
    """Check the search and the run config and settle the study's name and storage (no trial runs)."""
    from adabudget.compose import resolve
    from adabudget.config import to_dict, validate
    from adabudget.methods import check_quantized_base
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
    check_quantized_base(run)
    task_meta = _task_meta(run)
    scfg.validate(task_meta["primary"])
    objectives = scfg.objective_names(task_meta["primary"])
    kind = task_meta["kind"]
    metrics = {
        "classification": {"accuracy", "f1", "matthews"},
        "regression": {"pearson", "spearman", "mse"},
        "causal_lm": {"loss", "perplexity", "neg_perplexity", "exact_match", "rouge1", "rouge2", "rougeL"},
    }[kind]
    for name in objectives:
        if name.startswith("dev.") and name[4:] not in metrics:
            raise ConfigError(
                f"search.objectives: {name} is not computed on {run.data.task} ({kind}: "
                f"dev.{', dev.'.join(sorted(metrics))})"
            )
    spaces = [
        Path(n).stem if n.endswith((".yaml", ".yml")) else n for n in scfg.space_names()
    ]  # a file: its name
    study = scfg.study or f"{'-'.join(spaces)}-{Path(str(run.data.task)).name.replace('/', '_')}"
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
        SupernetSpace.from_context(ctx).check()
    else:
        check_space(space, ctx)  # every configuration missing the budget fails here, before any trial
    for name in _baseline_names(scfg):
        baseline_overrides(name, ctx)  # unknown names and unusable override dicts fail here
    return setup


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
        # a causal-LM task is ranked by its scoring's metric (exact_match, rougeL, neg_perplexity)
        primary = primary_metric(regression, task.scoring)
        return {"regression": regression, "num_labels": num_labels, "primary": primary, "kind": task.kind}
    kind = "regression" if regression else "classification"
    return {
        "regression": regression,
        "num_labels": num_labels,
        "primary": primary_metric(regression),
        "kind": kind,
    }


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
    """A journal file (several processes on one machine), a database (several machines) or the gRPC
    proxy in front of one (many machines: ``search.storage``).

    Stale trials have one owner on every storage, ``search.liveness`` (through
    ``search.workers.recover_stale``): Optuna's RDB heartbeat stays off. With it on, two
    mechanisms failed and re-queued killed trials, each with its own retry count, and Optuna's
    often got there first (its failed trial had no ``failed_because``)."""
    url = setup.storage
    if url.startswith("grpc://"):  # Optuna's proxy (search.storage): no database connection here
        from adabudget.search.storage import grpc_storage

        return grpc_storage(url)
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
    if salt and "://" in setup.storage and not setup.storage.startswith("sqlite"):
        # a database or the proxy: other commands' workers (other machines) share the study with the
        # same indices and, started together, the same trial count; two machines drew alike
        from adabudget.search.liveness import identity

        salt = (*salt, int(identity()["id"][:8], 16))
    seed = int(np.random.SeedSequence([scfg.seed, *salt]).generate_state(1)[0]) if salt else scfg.seed
    # evolution enqueues its candidates (search.supernet): the sampler only fills what is not given
    name = "random" if scfg.sampler == "evolution" else scfg.sampler
    space = get_space(scfg.space_names()) if name == "grid" else None
    sampler, _ = optuna_factory.make_sampler(name, seed, getattr(space, "distributions", None))
    return sampler


def make_pruner(setup: Setup):
    return optuna_factory.make_pruner(setup.scfg.pruner)


def open_study(setup: Setup, create: bool = False) -> optuna.Study:
    """The study; with ``create`` a new one gets its settings and baselines, and an existing one
    must have been made by the same space, objectives and budget (else a ConfigError)."""
    from adabudget.search.credentials import PASSWORD_HELP, refused_login, without_password
    from adabudget.search.storage import check_study_folder

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
        study = optuna.load_study(
            study_name=setup.study, storage=storage, sampler=make_sampler(setup), pruner=make_pruner(setup)
        )
        check_study_folder(study, setup.root, setup.storage)  # a worker on another host sees the folder
        return study
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
                f"search.study={setup.study}: this study exists in {without_password(setup.storage)} with "
                f"other settings ({what}); resume it with its own settings, or start a new study with "
                "search.study=<new name>"
            )
    check_study_folder(study, setup.root, setup.storage)  # records it, or checks this host sees it
    return study


# ---------------------------------------------------------------- baselines
def _baseline_names(scfg: SearchConfig) -> list:
    if scfg.enqueue in (None, "none", []):
        return []
    if scfg.scorer == "supernet":
        if scfg.enqueue == "default":
            # LoRA, AdaLoRA and S4 are not sub-configurations; retrain_top_k re-trains the first two
            return []
        raise ConfigError(
            "search.enqueue: a supernet scores its own sub-configurations only; drop search.enqueue (the "
            "LoRA and AdaLoRA baselines are re-trained beside the best with search.retrain_top_k)"
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
    (``target_params``; b(0) about 1.5 b(T), Table 7), or the S4 paper's pattern solved to it.
    Baselines are reference points: their real count is recorded and not held to the search's
    tolerance."""
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
    """The function Optuna calls for one trial of ``search.scorer=train`` (the supernet's is
    ``search.supernet.make_objective``); ``release`` is called once the trial exists
    (the worker's start lock, see ``search.workers``).

    The trial may be failed as stale while it trains (a lost race: another host judged its worker
    dead); it then trains on and returns its values, which ``search.liveness.tell`` keeps as a
    duplicate: the attributes it writes after the training are kept where the storage still takes them."""
    import contextlib
    import os
    import socket

    from adabudget.log import wandb_summary
    from adabudget.search.liveness import identity
    from adabudget.training import train

    scfg = setup.scfg
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
        twin = trained_twin(trial, drawn.overrides) if drawn.feasible else None
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
        with wandb_summary(trial_summary(setup, trial.number, trial.params, drawn.budget_params)):
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
        return optuna_factory.objective_values(result, names, drawn.budget_params)

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


# ---------------------------------------------------------------- the record of a study


# ---------------------------------------------------------------- final evaluation


# ---------------------------------------------------------------- the command
