"""Design spaces as code: ``(trial, ctx) -> overrides``, adapting to the backbone.

Built-in spaces (``SPACES``, one module each in this package): ``s4``, ``autopeft``, ``adalora``,
``methods``, ``longlora``, ``lr`` and ``supernet``; ``context`` holds ``SpaceContext`` (the backbone),
``sampling`` the ``sample`` / ``count`` / ``check_space`` every front end calls. What each space
searches and how to write one: docs/search.md#spaces-as-code.

Invariants: a space only calls ``trial.suggest_*`` and reads ``ctx``, never builds a model; a ``method``
override with a ``name`` replaces the whole method node, other sections merge key by key; with a
budget a configuration that cannot reach it is marked infeasible with the ``budget`` constraint,
never raised and never trained.
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
