"""Hydra glue: where ``configs/`` lives, the dataclass schemas in Hydra's ConfigStore,
and ``compose(overrides)`` for tests and programs that want the real composed config."""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_store import ConfigStore

from budget.config import DataConfig, LoggerConfig, ModelConfig, RunConfig, TrainConfig


def config_dir() -> str:
    """The ``configs/`` folder: $ADABUDGET_CONFIGS, the source checkout, or the installed copy."""
    if os.environ.get("ADABUDGET_CONFIGS"):
        return os.environ["ADABUDGET_CONFIGS"]
    checkout = Path(__file__).resolve().parents[1] / "configs"
    if (checkout / "train.yaml").exists():
        return str(checkout)
    import adabudget_configs

    return str(Path(adabudget_configs.__file__).parent)


_registered = False


def register_configs() -> None:
    """Put the dataclasses in Hydra's ConfigStore: they are the schema and the defaults;
    YAML files only name presets. Each method's schema is ``method/<name>_schema``."""
    global _registered
    if _registered:
        return
    from budget.methods import REGISTRY

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="train", name="train_schema", node=TrainConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    for name, method in REGISTRY.items():
        cs.store(group="method", name=f"{name}_schema", node=method.config)
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
