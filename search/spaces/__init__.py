"""Design spaces as code: ``(trial, ctx) -> overrides``, adapting to the backbone.

A space is a plain function in the optuna-examples style: ``trial.suggest_*`` calls and
``if``s, so conditional spaces are natural. It returns a nested dict of overrides to merge onto
the run config (``merge_overrides``): a ``method`` dict that has a ``name`` replaces the whole
method node; every other section merges key by key. Built-in spaces (``SPACES``, one module each
in this package):

- ``s4``: the S4 design space (Chen et al., ICLR 2023): grouping pattern, number of groups,
  a subset of {adapter, prefix, bitfit, lora, adalora} per group (plus ``ia3``,
  ``parallel_adapter``, ``prompt`` when asked), allocation of the budget across groups, and
  each method's share of its group's budget.
- ``autopeft``: AutoPEFT's space (Zhou et al., TACL 2024): per-layer on/off, serial adapter
  size, parallel adapter size, prefix length.
- ``adalora``: AdaLoRA's own knobs (init_r, target, t_i, t_f, ΔT, γ, score).
- ``methods``: one method of the seed families at the budget, the method itself the choice
  (LoRA, AdaLoRA, DyLoRA, Delta-LoRA, RoSA, sparse fine-tuning, Quantum-PEFT, adapters, prefix,
  (IA)³), each sized to the budget through its own knob.
- ``lr``: learning rate and warm-up; composes with any of the above (``[s4, lr]``).
- ``supernet``: a weight-sharing supernet's menus per block (``search/supernet.py``), exact sizes.

Every space reads the backbone from ``SpaceContext`` (``spaces.context``) (the number of layers, which methods
apply to the architecture), so any space runs on any supported model. ``configs/search/space/
<name>.yaml`` spaces in hydra-optuna-sweeper's grammar compile to the same kind of function
(``search.declarative``).

Equal budget: with ``search.budget`` every sampled hybrid carries that budget and the existing
solver (``adabudget.methods.hybrid.solve_sizes``) sizes it, within its tolerance. ``sample``
(``spaces.sampling``) does
this analytically, before any model exists, and marks a configuration that cannot reach the
budget as infeasible (``trial.set_constraint("budget", violation > 0)``) instead of raising:
the study records it and trains nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from adabudget.config import ConfigError
from adabudget.search.declarative import load_space_file
from adabudget.search.spaces.adalora import adalora_space
from adabudget.search.spaces.autopeft import autopeft_space
from adabudget.search.spaces.context import Space, SpaceContext, merge_overrides
from adabudget.search.spaces.longlora import longlora_space
from adabudget.search.spaces.lr import lr_space
from adabudget.search.spaces.methods import methods_space
from adabudget.search.spaces.s4 import s4_space
from adabudget.search.spaces.supernet import supernet_space

SPACES: dict[str, Space] = {
    "s4": s4_space,
    "autopeft": autopeft_space,
    "adalora": adalora_space,
    "lr": lr_space,
    "supernet": supernet_space,
    "methods": methods_space,
    "longlora": longlora_space,
}
for _name, _space in SPACES.items():
    _space.space_name = _name


# ---------------------------------------------------------------- lookup and composition


def _space_dir() -> Path:
    from adabudget.compose import config_dir

    return Path(config_dir()) / "search" / "space"


def _known() -> list[str]:
    files = sorted(p.stem for p in _space_dir().glob("*.yaml")) if _space_dir().is_dir() else []
    return [*SPACES, *(f for f in files if f not in SPACES)]


def _lookup(name: str) -> Space:
    if name in SPACES:
        return SPACES[name]
    path = _space_dir() / f"{name}.yaml"
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():  # a space file outside configs/
        path = Path(name)
    if (re.fullmatch(r"[\w-]+", name) or path == Path(name)) and path.is_file():
        space = load_space_file(path)
        space.space_name = name
        return space
    raise ConfigError(
        f"search.space={name}: unknown space; known spaces: {', '.join(_known())} "
        f"(built in, configs/search/space/<name>.yaml, or a path to a .yaml space file)"
    )


def get_space(names: str | Iterable[str]) -> Space:
    """The space named ``names``, or the composition of several (``[s4, lr]``).

    Built-in names first, then ``configs/search/space/<name>.yaml``, then a path to a ``.yaml``
    space file. In a composition every
    space samples on the same trial and later overrides merge over earlier ones; two spaces
    that both set ``method.name`` fail, naming both, when first sampled.

    Raises:
        ConfigError: naming ``search.space`` and listing the known spaces for an unknown name.
    """
    names = [names] if isinstance(names, str) else [str(n) for n in names]
    if not names:
        raise ConfigError(f"search.space: no space named; known spaces: {', '.join(_known())}")
    parts = [(n, _lookup(n)) for n in names]
    if len(parts) == 1:
        return parts[0][1]

    def composed(trial, ctx: SpaceContext) -> dict:
        out: dict = {}
        setter = None
        for name, space in parts:
            overrides = space(trial, ctx)
            if isinstance(overrides.get("method"), dict) and "name" in overrides["method"]:
                if setter is not None:
                    raise ConfigError(
                        f"search.space=[{', '.join(names)}]: both {setter} and {name} set method.name; "
                        "compose one method space with spaces that set other keys (lr)"
                    )
                setter = name
            out = merge_overrides(out, overrides)
        return out

    composed.space_name = "+".join(names)
    composed.__name__ = composed.space_name
    composed.exact_sizes = any(getattr(space, "exact_sizes", False) for _, space in parts)
    return composed
