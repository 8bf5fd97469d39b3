"""Seeded splits, by groups of copies of a text, for data that ships without them; seeded subsets."""

from __future__ import annotations

import logging
import re
import unicodedata
from typing import TYPE_CHECKING, Optional

import numpy as np
from adabudget.config import ConfigError, DataConfig

if TYPE_CHECKING:
    from adabudget.data.raw import Rows

log = logging.getLogger(__name__)

# The split procedure, the second half of every data version (TaskData.version). Bump it
# when normalised_text or seeded_split would put any row elsewhere. Version 1 ("rows-v1",
# never written into a record) permuted rows, so copies of a text could straddle splits.
SPLIT_PROCEDURE = "groups-v2"
GIVEN_SPLITS = "given"  # the data came with its own dev (and test) split

# \W is Unicode-aware on str patterns: anything but a letter, digit or underscore.
_NOT_ALNUM = re.compile(r"[\W_]+")


def normalised_text(text: str, pair: Optional[str] = None) -> str:
    """The key that decides which texts count as copies of each other in a split.

    NFKC-normalised, case-folded, with everything but letters and digits removed, so
    ``"Anger is UGLY!!"``, ``"Anger is ugly."`` and ``"anger is ugly"`` share the key
    ``"angerisugly"``; dropping whitespace as well makes ``"good-bye"``, ``"good bye"`` and
    ``"goodbye"`` one text. A text with no letter or digit at all (``":-)"``) keeps its
    exact form rather than colliding with every other emoticon. With a text pair both
    parts form the key.
    """
    key = _NOT_ALNUM.sub("", unicodedata.normalize("NFKC", text).casefold()) or "\0" + text
    if pair is None:
        return key
    return key + "\x1f" + normalised_text(pair)


def seeded_split(rows: Rows, cfg: DataConfig, carve_test: bool) -> dict[str, Rows]:
    """Cut ``rows`` into test, dev and train by ``cfg.split_seed``, every copy of a text in one split.

    Rows are grouped by :func:`normalised_text` and whole groups are dealt out. The seed
    draws one permutation of the rows and each group takes the place its *first* row
    (in source order) has in it, so a group of six copies is no likelier to land in test
    than a single sentence (placing it by its earliest copy would be), and data without
    duplicates splits exactly as a plain row permutation would. Walking the groups in that
    order, each goes to test if it fits in the room left there, else to dev if it fits
    there, else to train.

    Sizes: test gets ``round(n * test_fraction)`` rows (0 when ``carve_test`` is false), dev
    ``round(n * dev_fraction)``, train the rest, exactly, whenever at least one text without
    a copy ends up in train: a group only skips test or dev when it is larger than the room
    left, so a single row skipping them means no room was left. Otherwise (data made
    mostly of repeated texts) test and dev come out short by less than the smallest group
    that skipped them, and a warning gives the sizes.

    Copies whose labels differ (68 of nyt's 72 duplicated sentences carry two different
    crowd scores; the tweets set rates each of 30 base tweets again with capitals and
    exclamation marks added) are all kept, unmerged, in the one split their group lands
    in. Each row is a separate rating by its own 10-20 raters, and the differences between
    the tweet variants are the signal that set was built to measure, so averaging the copies
    would throw data away and change the row counts everyone reports. Keeping them together
    is what stops a sentence from being both trained on and scored on; the price is that a
    text rated more than once weighs more in its split's metric (4.5% of tweets' rows, 2.8%
    of nyt's, 1.0% of amazon's, 0.04% of mr's are such copies).

    What the key does not catch: the tweets set's seventh variant of a base tweet changes a
    word (``"Anger is very ugly!"``), and stays a separate text. A key on word sets that
    tolerates one changed word would catch it, but it also joins opposite sentences such as
    mr's ``"One of the best/worst movies of the year."``.

    Each split keeps the source order, so the seed decides membership only.

    Raises:
        ConfigError: when a fraction rounds to an empty split, nothing is left to train
            on, or the groups leave dev (or a requested test) empty.
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
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(rows.text):
        key = normalised_text(text, None if rows.pair is None else rows.pair[i])
        groups.setdefault(key, []).append(i)
    perm = np.random.default_rng(cfg.split_seed).permutation(n)
    place = np.empty(n, dtype=np.int64)
    place[perm] = np.arange(n)  # place[i]: where row i falls in the permutation
    room = {"test": n_test, "dev": n_dev}
    picked: dict[str, list[int]] = {"test": [], "dev": [], "train": []}
    for members in sorted(groups.values(), key=lambda members: place[members[0]]):
        name = next((s for s in ("test", "dev") if len(members) <= room[s]), "train")
        if name != "train":
            room[name] -= len(members)
        picked[name].extend(members)
    if not picked["dev"] or (n_test and not picked["test"]):
        empty = "data.dev_fraction" if not picked["dev"] else "data.test_fraction"
        raise ConfigError(
            f"{empty}: every text in the {n} rows has more copies than the split has room for "
            f"(dev {n_dev}, test {n_test} rows), and copies stay together; raise {empty} or "
            "provide more distinct texts"
        )
    if room["test"] or room["dev"]:
        log.warning(
            "copies of a text stay in one split, so the seeded split came out short: "
            "test %d of %d rows, dev %d of %d, train %d",
            len(picked["test"]),
            n_test,
            len(picked["dev"]),
            n_dev,
            len(picked["train"]),
        )
    out = {"train": rows.take(sorted(picked["train"])), "dev": rows.take(sorted(picked["dev"]))}
    if carve_test:
        out["test"] = rows.take(sorted(picked["test"]))
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
    note = (
        f"{' and '.join(carved)} carved by a seeded split that keeps copies of a text together "
        f"(split_seed={cfg.split_seed}, {fractions})"
    )
    return note + _limit_note(cfg)


def _limit_note(cfg: DataConfig) -> str:
    limits = [
        f"{key}={getattr(cfg, key)}" for key in ("max_train_samples", "max_eval_samples") if getattr(cfg, key)
    ]
    return f"; truncated to {', '.join(limits)}" if limits else ""
