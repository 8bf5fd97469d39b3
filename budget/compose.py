"""Hydra glue and config resolution: where ``configs/`` lives, the dataclass schemas in
Hydra's ConfigStore, ``compose(overrides)`` for tests and programs that want the real
composed config, and ``resolve(cfg)``, which turns it into the dataclasses of
``adabudget.config`` with the method section built by its registered dataclass."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from adabudget.config import (
    ConfigError,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    to_dict,
)
from adabudget.configs_dir import config_dir  # noqa: F401 (re-exported: callers import it from here)
from hydra.core.config_store import ConfigStore

_registered = False


def register_configs() -> None:
    """Put the dataclasses in Hydra's ConfigStore: they are the schema and the defaults;
    YAML files only name presets. The schemas live in their own groups (``schema/model``,
    ``schema/method/<name>``, ...; a preset pulls its own in with ``/schema/...@_here_``),
    so that the groups users pick from (``method=``, ``model=``) list presets only."""
    global _registered
    if _registered:
        return
    from adabudget.methods import REGISTRY
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    cs.store(group="schema", name="run", node=RunConfig)
    cs.store(group="schema", name="model", node=ModelConfig)
    cs.store(group="schema", name="data", node=DataConfig)
    cs.store(group="schema", name="train", node=TrainConfig)
    cs.store(group="schema", name="logger", node=LoggerConfig)
    for name, method in REGISTRY.items():
        cs.store(group="schema/method", name=name, node=method.config)
    # The sweep folder's name carries the pid: two multiruns started in the same second differ.
    # Cached, as Hydra's ${now:} is: the launching process resolves hydra.sweep.dir first, and every
    # job's config is composed with that cache copied in (ConfigLoader.load_sweep_config), so a job
    # in another process (joblib, submitit, Slurm) gets the launcher's pid, not its own.
    OmegaConf.register_new_resolver("adabudget.pid", os.getpid, replace=True, use_cache=True)
    _registered = True


def compose(overrides: list[str] | None = None, config_name: str = "train"):
    """The composed config, exactly as ``adabudget train <overrides>`` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def preset(group: str, name: str) -> dict:
    """The knobs a shipped preset ``configs/<group>/<name>.yaml`` sets (its defaults list dropped)."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(OmegaConf.load(f"{config_dir()}/{group}/{name}.yaml"))
    values.pop("defaults", None)
    return values


def resolve(cfg: Any) -> RunConfig:
    """Turn a composed Hydra/OmegaConf config (or a plain dict, or a RunConfig) into
    the dataclasses, with the method section built by its registered dataclass."""
    from adabudget.methods import method_config_from_dict
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, RunConfig):
        run = dataclasses.replace(cfg)
    else:
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        cfg = dict(cfg)
        cfg.pop("hydra", None)
        known = {f.name for f in dataclasses.fields(RunConfig)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"{', '.join(unknown)}: unknown top-level key(s); known: {sorted(known)}")
        sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "logger": LoggerConfig}
        kwargs = {}
        for key, value in cfg.items():
            if key in sections:
                kwargs[key] = _build(sections[key], value or {}, key)
            else:
                kwargs[key] = value
        run = RunConfig(**kwargs)
    if run.method is None or isinstance(run.method, dict):
        run.method = method_config_from_dict(run.method or {"name": "adalora"})
    return run


def _build(cls, values: Any, prefix: str):
    if isinstance(values, cls):
        return values
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key; known keys: {sorted(names)}")
    return cls(**values)


# Top-level keys that an older run's config.yaml holds and a run config no longer has: ``search``
# (a supernet's search settings, kept in its own supernet.yaml since; null in every other run).
# A saved config is read without them, so that an older run folder still resumes and loads.
RETIRED_KEYS = ("search",)


def saved_config(run_dir: str | Path):
    """A run folder's ``config.yaml`` (an OmegaConf node) without the ``RETIRED_KEYS`` older versions
    wrote."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(run_dir) / "config.yaml")
    for key in RETIRED_KEYS:
        cfg.pop(key, None)
    return cfg


def resume_config(run_dir: str | Path, overrides: list[str] | None = None):
    """The saved config of a run folder, with ``overrides`` applied, ready for ``train`` to resume.

    Only the knobs in ``adabudget.checkpoint.RESUMABLE`` may change (more steps, logging, evaluation,
    checkpoints, exports, device); any other override is refused with a ConfigError naming it, as is
    a folder without a checkpoint to continue from (``check_resume``).
    """
    from adabudget.checkpoint import check_resume
    from omegaconf import OmegaConf

    overrides = list(overrides or [])
    run_dir = check_resume(run_dir, {o.split("=", 1)[0].lstrip("+~"): o for o in overrides})
    cfg = saved_config(run_dir)
    dotlist = [o for o in overrides if o.split("=", 1)[0] not in ("resume", "run_dir")]
    cfg.train.stop_after_step = None  # a stop point belongs to one invocation, not to the run
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    cfg.resume = str(run_dir)
    return cfg


def resumed(run: RunConfig) -> RunConfig:
    """``run`` (its ``resume`` names the folder) checked against the config saved there.

    Any difference outside ``RESUMABLE`` is refused, naming the keys (``check_resume``): a
    resumed run keeps its config. Build the config to pass with ``resume_config(run_dir, overrides)``.
    """
    from adabudget.checkpoint import check_resume, config_changes

    run_dir = check_resume(run.resume)  # a run folder with a checkpoint, before its config.yaml is read
    saved = resolve(saved_config(run_dir))
    check_resume(run_dir, config_changes(to_dict(saved), to_dict(run)))
    run.resume, run.run_dir = str(run_dir), str(run_dir)
    return run
