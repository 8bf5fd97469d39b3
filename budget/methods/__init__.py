"""PEFT methods, one file each, registered by name.

Each module exports a config dataclass (with ``name`` and ``validate()``) and
``apply(model, cfg, layers=None) -> {module name: wrapped module}``. Adding a method means
its file, one line in ``REGISTRY``, ``configs/method/<name>.yaml`` and a test-matrix row.
"""

from __future__ import annotations

import dataclasses

from budget.config import ConfigError
from budget.methods import adalora, full, lora

REGISTRY = {
    "adalora": (adalora.AdaLoRAConfig, adalora.apply),
    "lora": (lora.LoRAConfig, lora.apply),
    "full": (full.FullConfig, full.apply),
}


def method_config_from_dict(values: dict):
    """Build the registered config dataclass named by ``values['name']``; unknown keys fail."""
    values = dict(values)
    name = values.get("name", "adalora")
    if name not in REGISTRY:
        raise ConfigError(f"method.name={name}: unknown method; known methods: {sorted(REGISTRY)}")
    cls = REGISTRY[name][0]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"method.{unknown[0]}: not a knob of method '{name}'; its knobs: {sorted(fields)}")
    return cls(**values)


def apply_method(model, cfg) -> dict:
    """Apply the method described by ``cfg`` (a registered config dataclass)."""
    return REGISTRY[cfg.name][1](model, cfg)
