"""Declarative search spaces: hydra-optuna-sweeper's ``params`` grammar compiled to a space.

``compile_params`` turns a ``params:`` mapping (``configs/search/space/<name>.yaml``: dotted keys to
``choice``, ``range``, ``interval``, ``tag(log, ...)``, ``int(...)`` or plain values) into the same
kind of function as the spaces written in code, ``(trial, ctx) -> overrides``. The grammar, an
example and the mapping: docs/search.md#spaces-as-code.

Invariant: a parsed override maps to the Optuna distribution hydra-optuna-sweeper's
``create_optuna_distribution_from_override`` gives it (``range(a, b)`` includes ``b``), so files
written for that sweeper sample the same values here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adabudget.config import ConfigError
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

_KEY = re.compile(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*")  # a dotted config key: method.r, train.lr


def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def distribution_from_override(override) -> Any:
    """The Optuna distribution of a parsed Hydra override; a plain value for a non-sweep one.

    ``choice(...)`` -> ``CategoricalDistribution`` (choices that are not str/int/float/bool, such
    as lists, are encoded as Hydra strings, as the sweeper does); ``range(start, stop[, step])``
    -> ``IntDistribution(start, stop, step)``, or ``FloatDistribution`` with that step when a bound
    or the step is a float, or a categorical of its items under ``shuffle(...)``;
    ``interval(a, b)`` -> ``FloatDistribution(a, b)`` (Hydra parses interval bounds as floats);
    ``int(interval(a, b))`` -> ``IntDistribution(a, b)``; ``tag(log, ...)`` sets ``log=True``.
    A non-sweep override returns its typed value (``override.value()``: 5, "lora", [1, 2], None);
    the sweeper's string form is ``override.get_value_element_as_str()``.

    Raises:
        ConfigError: for a sweep this grammar has no distribution for (e.g. ``glob``).
    """
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Transformer

    if not override.is_sweep_override():
        return override.value()
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, RangeSweep):
        if value.shuffle:
            # a choice over its items (here the stop is excluded, as Hydra iterates it), sorted: the
            # same choices in the same order in every process, or Optuna sees two distributions
            return CategoricalDistribution(sorted(override.sweep_iterator(transformer=Transformer.encode)))
        if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
            return FloatDistribution(float(value.start), float(value.stop), step=float(value.step))
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step))
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise ConfigError(
        f"search.space: {override.input_line} is a sweep Optuna cannot sample; use choice(...), "
        "range(...), interval(...), int(interval(...)) or tag(log, interval(...))"
    )


def parse_param(key: str, value: Any):
    """(distribution or fixed value, decode) for one ``params`` entry; ConfigError naming the key.

    ``decode`` maps a sampled categorical value back to the typed value it stands for (a choice
    of lists is sampled as Hydra strings and returned as lists); None when nothing to decode.
    """
    from hydra.core.override_parser.types import ChoiceSweep

    if not isinstance(value, str):  # YAML already typed it (3, true, [a, b]): fixed
        return value, None
    try:
        override = _parser().parse_override(f"{key}={value}")
    except Exception as err:  # Hydra raises OverrideParseException / HydraException
        raise ConfigError(f"search.space: {key}: cannot parse '{value}' ({err})") from err
    try:
        dist = distribution_from_override(override)
    except ValueError as err:  # Optuna's checks (low > high, a log range from 0, ...)
        raise ConfigError(f"search.space: {key}: {value} is not a valid range ({err})") from err
    decode = None
    if isinstance(dist, CategoricalDistribution) and isinstance(override.value(), ChoiceSweep):
        typed = list(override.sweep_iterator())  # same order as the encoded choices
        if any(type(t) is not type(c) for t, c in zip(typed, dist.choices)):
            decode = dict(zip(dist.choices, typed)).__getitem__
    return dist, decode


def compile_params(params: dict) -> Callable:
    """A space ``(trial, ctx) -> overrides`` from a ``params`` mapping {dotted key: grammar}.

    Every key is suggested under its own dotted name (``trial.params["method.r"]``), in the
    order given; fixed values are set without a suggestion. The result carries
    ``distributions`` (name -> distribution) and ``fixed`` (name -> value) for samplers that
    need the space up front (GridSampler).

    Raises:
        ConfigError: naming ``search.space`` and the key for an unparsable value.
    """
    if not hasattr(params, "items"):
        raise ConfigError(f"search.space: params must be a mapping of dotted keys to values, got {params!r}")
    entries = []
    for key, value in params.items():
        key = str(key)
        if not _KEY.fullmatch(key):
            raise ConfigError(f"search.space: '{key}' is not a dotted config key (e.g. method.r, train.lr)")
        entries.append((key, *parse_param(key, value)))

    def space(trial, ctx=None) -> dict:
        out: dict = {}
        for key, spec, decode in entries:
            if isinstance(spec, BaseDistribution):
                value = trial._suggest(key, spec)
                value = decode(value) if decode else value
            else:
                value = spec
            _set_dotted(out, key, value)
        return out

    space.distributions = {k: s for k, s, _ in entries if isinstance(s, BaseDistribution)}
    space.fixed = {k: s for k, s, _ in entries if not isinstance(s, BaseDistribution)}
    return space


def _set_dotted(out: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = out
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"search.space: {key}: '{p}' is already set to a value, not a section")
        node = child
    if isinstance(node.get(leaf), dict) and not isinstance(value, dict):
        raise ConfigError(f"search.space: {key}: is a section already set by more specific keys")
    node[leaf] = value


def load_space_file(path: str | Path) -> Callable:
    """Compile ``configs/search/space/<name>.yaml`` (a ``params:`` mapping) into a space."""
    from omegaconf import OmegaConf

    path = Path(path)
    # interpolations stay text: ${...} means nothing to a search space
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    unknown = sorted(set(data) - {"params"})
    if unknown or "params" not in data:
        raise ConfigError(
            f"search.space={path.stem}: {path} must hold one `params:` mapping "
            f"(hydra-optuna-sweeper's grammar){'; unknown keys: ' + str(unknown) if unknown else ''}"
        )
    space = compile_params(data["params"] or {})
    space.__name__ = path.stem
    return space
