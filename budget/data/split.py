"""Seeded splits for data that ships without them, and seeded subsets of each split."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from budget.config import ConfigError, DataConfig

if TYPE_CHECKING:
    from budget.data.raw import Rows


def seeded_split(rows: Rows, cfg: DataConfig, carve_test: bool) -> dict[str, Rows]:
    """Cut ``rows`` by one permutation of ``cfg.split_seed``: test, then dev, then train.

    Each split keeps the source order, so the seed decides membership only.
    """
    n = len(rows)
    n_test = round(n * cfg.test_fraction) if carve_test else 0
    n_dev = round(n * cfg.dev_fraction)
    if n_dev == 0:
        raise ConfigError(
            f"data.dev_fraction: {n} rows * {cfg.dev_fraction:g} rounds to an empty dev split; "
            "raise data.dev_fraction or provide more rows (or a dev file)"
        )
    if carve_test and cfg.test_fraction > 0 and n_test == 0:
        raise ConfigError(
            f"data.test_fraction: {n} rows * {cfg.test_fraction:g} rounds to an empty test split; "
            "raise data.test_fraction, or set it to 0 for no test split"
        )
    if n - n_dev - n_test < 1:
        raise ConfigError(
            f"data.dev_fraction: {n} rows leave no training rows after dev ({n_dev}) and test "
            f"({n_test}); lower data.dev_fraction / data.test_fraction or provide more rows"
        )
    perm = np.random.default_rng(cfg.split_seed).permutation(n)
    out = {
        "train": rows.take(np.sort(perm[n_test + n_dev :])),
        "dev": rows.take(np.sort(perm[n_test : n_test + n_dev])),
    }
    if carve_test:
        out["test"] = rows.take(np.sort(perm[:n_test]))
    return out


def truncate(splits: dict[str, Rows], cfg: DataConfig) -> dict[str, Rows]:
    """Keep a seeded subset of ``max_train_samples`` / ``max_eval_samples`` rows per split.

    A subset rather than a prefix: hub splits are often sorted by label (imdb), and a
    prefix would then hold one class.
    """
    out = {}
    for name, rows in splits.items():
        limit = cfg.max_train_samples if name == "train" else cfg.max_eval_samples
        if limit is not None and limit < len(rows):
            stream = ("train", "dev", "test").index(name)  # each split its own draw
            keep = np.random.default_rng([cfg.split_seed, stream]).permutation(len(rows))[:limit]
            rows = rows.take(np.sort(keep))
        out[name] = rows
    return out


def split_note(cfg: DataConfig, carved: tuple[str, ...]) -> str:
    """One line saying how the splits were made, for ``describe`` and the run record."""
    if not carved:
        return "splits as shipped" + _limit_note(cfg)
    fractions = ", ".join(f"{name} {getattr(cfg, name + '_fraction'):g}" for name in carved)
    note = f"{' and '.join(carved)} carved by a seeded split (split_seed={cfg.split_seed}, {fractions})"
    return note + _limit_note(cfg)


def _limit_note(cfg: DataConfig) -> str:
    limits = [
        f"{key}={getattr(cfg, key)}" for key in ("max_train_samples", "max_eval_samples") if getattr(cfg, key)
    ]
    return f"; truncated to {', '.join(limits)}" if limits else ""
