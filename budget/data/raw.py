"""The untokenized task: rows, the checks every source shares, and the shared tail of hub and local data."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from adabudget.config import ConfigError, DataConfig
from adabudget.data.labels import encode_labels
from adabudget.data.split import GIVEN_SPLITS, SPLIT_PROCEDURE, seeded_split, split_note, truncate


@dataclass
class Rows:
    """One split, column-wise. ``ids`` trace rows to the source: the file's ID column for
    packaged tasks, row numbers otherwise."""

    text: list[str]
    pair: Optional[list[str]]
    label: list[Any]
    ids: list[Any] = field(default_factory=list)

    def take(self, index) -> Rows:
        index = list(index)
        return Rows(
            text=[self.text[i] for i in index],
            pair=None if self.pair is None else [self.pair[i] for i in index],
            label=[self.label[i] for i in index],
            ids=[self.ids[i] for i in index],
        )

    def __len__(self) -> int:
        return len(self.text)


CAUSAL_LM = "causal_lm"  # RawTask.kind / TaskData.kind of prompt -> completion tasks


@dataclass
class Scoring:
    """How a causal-LM task is scored by generation: its own choices, which ``data.answer``,
    ``data.metric``, ``data.max_new_tokens`` and ``data.stop`` override (``Scoring.resolve``)."""

    metric: str  # exact_match | rouge | perplexity: the primary metric
    answer: str = "text"  # text | last_number | gsm8k | label_word: what exact match compares
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)  # generation is cut at the first of these
    label_words: Optional[tuple[str, ...]] = None  # answer=label_word: the words looked for

    def resolve(self, cfg: DataConfig) -> Scoring:
        """These choices with the config's non-null ``data.*`` overrides applied."""
        return Scoring(
            metric=cfg.metric or self.metric,
            answer=cfg.answer or self.answer,
            max_new_tokens=cfg.max_new_tokens or self.max_new_tokens,
            stop=tuple(cfg.stop) if cfg.stop is not None else self.stop,
            label_words=self.label_words,
        )


@dataclass
class RawTask:
    """A task before tokenization: split, labelled, checked.

    Causal-LM tasks (``kind == "causal_lm"``) hold prompts in ``Rows.text`` and completions
    (strings) in ``Rows.label``; ``num_labels`` is 0 and ``scoring`` says how they are scored.
    """

    name: str
    source: str
    version: str  # see TaskData.version
    splits: dict[str, Rows]  # train, dev, test (test may be empty)
    num_labels: int
    regression: bool
    label_names: Optional[list[str]]
    split_note: str
    columns: tuple[str, Optional[str]]
    kind: str = "classification"  # classification | regression | causal_lm
    scoring: Optional[Scoring] = None  # causal_lm only


def finish(
    task: str,
    origin: str,
    source: str,
    splits: dict[str, Rows],
    cfg: DataConfig,
    columns: tuple[str, Optional[str]],
    class_names: Optional[list[str]] = None,
    float_label: bool = False,
) -> RawTask:
    """Shared tail of hub and local data: drop unlabeled test, encode labels, carve splits.

    ``origin`` (``hf:<task>``, ``local-csv``) starts the data version; the digest of the
    rows as loaded and the split procedure complete it.
    """
    digest = content_digest(splits)
    if "test" in splits and all(v is None for v in splits["test"].label):
        del splits["test"]  # hidden labels, as in GLUE: nothing to score against
    # Labels first: their errors then name the row of the file or split as given, and no
    # problem with them hides behind a split that the data cannot fill.
    regression, num_labels, label_names = encode_labels(splits, cfg, class_names, float_label)
    splits, carved = carve_and_check(task, splits, cfg, paired=columns[1] is not None)
    return RawTask(
        name=task,
        source=source,
        version=f"{origin}@{digest}/{SPLIT_PROCEDURE if carved else GIVEN_SPLITS}",
        splits=splits,
        num_labels=num_labels,
        regression=regression,
        label_names=label_names,
        split_note=split_note(cfg, carved),
        columns=columns,
    )


def carve_and_check(
    task: str, splits: dict[str, Rows], cfg: DataConfig, paired: bool
) -> tuple[dict[str, Rows], tuple[str, ...]]:
    """The splits ``finish`` and ``finish_lm`` end with: a missing dev (and test, when there is none
    either) carved from train by ``seeded_split``, an empty test added, train and dev checked not
    empty, every split truncated; returns them (train, dev, test) and the names of those carved."""
    carved: tuple[str, ...] = ()
    if "dev" not in splits:
        carve_test = "test" not in splits
        carved = ("dev", "test") if carve_test and cfg.test_fraction > 0 else ("dev",)
        splits = {**splits, **seeded_split(splits["train"], cfg, carve_test=carve_test)}
    splits.setdefault("test", Rows(text=[], pair=[] if paired else None, label=[]))
    for name in ("train", "dev"):
        if len(splits[name]) == 0:
            raise ConfigError(f"data.task: the {name} split of {task} is empty; provide rows for it")
    return truncate({name: splits[name] for name in ("train", "dev", "test")}, cfg), carved


def content_digest(splits: dict[str, Rows]) -> str:
    """12 hex digits of sha256 over each split's name, texts, pairs and raw labels, in order.

    Computed before labels are encoded, so it names the data as it came, whatever the
    config then makes of it.
    """
    digest = hashlib.sha256()
    for name in sorted(splits):
        rows = splits[name]
        pairs = rows.pair if rows.pair is not None else [None] * len(rows)
        for text, pair, label in zip(rows.text, pairs, rows.label):
            # default=str: numpy scalars and other odd labels still hash, by their text.
            digest.update(json.dumps([name, text, pair, label], default=str, ensure_ascii=False).encode())
            digest.update(b"\n")
    return digest.hexdigest()[:12]


def require_column(column: str, columns: list[str], fld: str, where: str) -> None:
    """Raise a ConfigError naming ``fld`` and the available columns when ``column`` is missing."""
    if column not in columns:
        raise ConfigError(f"{fld}: no column {column!r} in {where}; available columns: {columns}")


def as_texts(values, fld: str, where: str) -> list[str]:
    """A text column as strings; a missing cell is a ConfigError naming ``fld``."""
    out = []
    for i, value in enumerate(values):
        if value is None:
            raise ConfigError(f"{fld}: row {i} of {where} has no text; fill it or drop the row")
        out.append(value if isinstance(value, str) else str(value))
    return out


# ---------------------------------------------------------------- causal-LM data: prompt -> completion

# How hub and local prompt -> completion data is scored unless data.* says otherwise: ROUGE of the
# generated line (at most 64 tokens) against the completion.
DEFAULT_LM_SCORING = Scoring(metric="rouge", answer="text", max_new_tokens=64, stop=("\n",))


def lm_rows(prompts, completions, ids: list[Any], where: str, completion_column: str) -> Optional[Rows]:
    """One causal-LM split from its two columns: prompts in ``Rows.text``, completions in ``Rows.label``.

    Returns None when no row has a completion (a test split with hidden answers: nothing to score
    against, as ``finish`` drops an unlabeled test split); the caller decides whether that is allowed.

    Raises:
        ConfigError: a missing prompt (naming ``data.prompt_column``) or, among rows that have
            completions, an empty one (naming the row and ``data.completion_column``).
    """
    completions = list(completions)
    if not any(_filled(value) for value in completions):
        return None
    text = as_texts(prompts, "data.prompt_column", where)
    label = []
    for i, value in enumerate(completions):
        if not _filled(value):
            raise ConfigError(
                f"data.completion_column: row {i} of {where} has an empty completion (column "
                f"{completion_column!r}); there is nothing to learn or score there: fill it or drop the row"
            )
        label.append(value if isinstance(value, str) else str(value))
    return Rows(text=text, pair=None, label=label, ids=list(ids))


def _filled(value: Any) -> bool:
    return value is not None and bool(str(value).strip())


def finish_lm(
    task: str, origin: str, source: str, splits: dict[str, Rows], cfg: DataConfig, columns: tuple[str, str]
) -> RawTask:
    """The tail of hub and local prompt -> completion data: carve missing splits, check, truncate.

    As ``finish`` without the labels: the splits the data ships are used as given, a missing dev
    (and test, when there is none either) is carved from train by ``seeded_split`` (copies of a
    prompt kept together), and the version is ``<origin>@<digest>/<split>``.
    """
    digest = content_digest(splits)
    splits, carved = carve_and_check(task, splits, cfg, paired=False)
    return RawTask(
        name=task,
        source=source,
        version=f"{origin}@{digest}/{SPLIT_PROCEDURE if carved else GIVEN_SPLITS}",
        splits=splits,
        num_labels=0,
        regression=False,
        label_names=None,
        split_note=split_note(cfg, carved),
        columns=columns,
        kind=CAUSAL_LM,
        scoring=DEFAULT_LM_SCORING,
    )


def refuse_classification_columns(cfg: DataConfig) -> None:
    """Prompt -> completion data reads two columns only: a text, pair or regression setting is refused."""
    for fld in ("text_column", "text_pair_column"):
        if getattr(cfg, fld) is not None:
            raise ConfigError(
                f"data.{fld}: a causal-LM task reads data.prompt_column and data.completion_column only; "
                f"unset data.{fld} (or unset both of those for a classification task)"
            )
    if cfg.regression:
        raise ConfigError(
            "data.regression: a causal-LM task generates text and has no regression target; unset "
            "data.regression (or unset data.prompt_column / data.completion_column for a regression task)"
        )
