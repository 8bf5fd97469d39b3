"""Tasks as tokenized examples, and the batches the training loop eats.

``load_task(cfg, tokenizer)`` turns a :class:`budget.config.DataConfig` into a
:class:`TaskData`: three lists of tokenized examples (no padding) plus the label kind.
``make_batches`` pads each batch to its longest sequence and shuffles with a
``torch.Generator`` seeded from ``(seed, epoch)``, so a resumed run can skip the batches it
already saw and get exactly the rest of the epoch.

Sources, by ``data.task``:

* **Packaged** ``mr``, ``tweets``, ``amazon``, ``nyt``: the human-rated sentence sets of
  Hutto & Gilbert (ICWSM 2014), shipped inside the sdist of ``vaderSentiment==3.3.2`` as
  ``additional_resources/hutto_ICWSM_2014.tar.gz``. On first use the sdist is fetched with
  ``pip download`` and the inner archive unpacked into ``<cache>/vader/``, where
  ``<cache>`` is ``data.cache_dir``, else ``$ADABUDGET_CACHE``, else
  ``~/.cache/adabudget``. Each file is ``id<TAB>score<TAB>text`` (UTF-8, CRLF), the score
  being the mean of 10-20 raters on [-4, 4].

  - ``mr``: 10,605 snippets of the Pang & Lee movie-review polarity data; binary
    classification (``negative`` = 0, ``positive`` = 1). The label is the source file:
    IDs 1-5152 came from the positive file, the rest from the negative one. The crowd
    score agrees in sign with it for 95.8% of the snippets. ``data.regression=true``
    trains on the crowd score instead.
  - ``tweets`` (4,200), ``amazon`` (3,708 review sentences), ``nyt`` (5,190 editorial
    sentences): regression on the score.

  These ship without splits, so one seeded permutation (``data.split_seed``) cuts them:
  ``n_test = round(n * test_fraction)``, ``n_dev = round(n * dev_fraction)``, the rest
  trains. With the defaults (0.1 / 0.1) the sizes are (train / dev / test):

  ======== ======= ===== ===== =====
  task        rows train   dev  test
  ======== ======= ===== ===== =====
  mr        10,605 8,485 1,060 1,060
  tweets     4,200 3,360   420   420
  amazon     3,708 2,966   371   371
  nyt        5,190 4,152   519   519
  ======== ======= ===== ===== =====

  (``round`` rounds half to even: mr's 1,060.5 becomes 1,060.) Texts are cleaned only of
  what the scrape left behind: HTML entities (``&amp;``, some escaped twice) are unescaped, the two-apostrophe
  double quotes of the movie and NYT corpora (``''Conan''``) become ``"`` and runs of
  whitespace are collapsed. Duplicate sentences (2 in mr, 11 in amazon, 71 in nyt, each rated
  separately) are kept, so a few can fall on both sides of a split; amazon and nyt IDs are
  ``<document>_<sentence>`` and sentences of one document are split independently too.

* **HF hub**: ``glue/<task>`` loads GLUE (``nyu-mll/glue``, the canonical id of
  ``glue``) with the known text columns; any other name goes to
  ``datasets.load_dataset(name)``, and ``name:config`` picks a config
  (``tweet_eval:sentiment``). Dev is the ``validation`` split (MNLI:
  ``validation_matched``). A test split without labels (all of GLUE's) is left empty. A
  dataset without a validation split gets dev (and, when it has no test either, test)
  carved from train by the seeded split.

* **Local** ``csv`` / ``jsonl`` with ``data.path``: one file, cut by the seeded split, or a
  folder with ``train.<ext>``, ``dev.<ext>`` or ``validation.<ext>``, and optionally
  ``test.<ext>``.

Labels: strings are mapped to ids in sorted order (the names become ``label_names``);
integers that are not exactly ``0..K-1`` are mapped the same way; non-integer numbers mean
regression unless ``data.regression`` says otherwise. ``max_train_samples`` /
``max_eval_samples`` keep a seeded subset of each split after it is cut.

Every problem with the config or the data raises :class:`budget.config.ConfigError`
naming the ``data.<field>`` to change, before anything is tokenized.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from budget.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

PACKAGED_TASKS = ("mr", "tweets", "amazon", "nyt")
VADER_SDIST = "vaderSentiment==3.3.2"
_VADER_INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_FILES = {
    "mr": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
# Hutto & Gilbert numbered the Pang & Lee positive snippets first.
_MR_LAST_POSITIVE_ID = 5152

# GLUE task -> (text column, text pair column, dev split, test split).
_GLUE = {
    "sst2": ("sentence", None, "validation", "test"),
    "cola": ("sentence", None, "validation", "test"),
    "mrpc": ("sentence1", "sentence2", "validation", "test"),
    "qqp": ("question1", "question2", "validation", "test"),
    "stsb": ("sentence1", "sentence2", "validation", "test"),
    "mnli": ("premise", "hypothesis", "validation_matched", "test_matched"),
    "qnli": ("question", "sentence", "validation", "test"),
    "rte": ("sentence1", "sentence2", "validation", "test"),
    "wnli": ("sentence1", "sentence2", "validation", "test"),
}
_DEV_SPLIT_NAMES = ("validation", "dev", "valid", "val")
_TOKENIZE_CHUNK = 4096  # texts per tokenizer call: bounds peak memory on large datasets

_TASK_HELP = (
    f"use a packaged task ({', '.join(PACKAGED_TASKS)}), a GLUE task (glue/{', glue/'.join(_GLUE)}), "
    "any HF hub dataset id (imdb, owner/name, name:config), or csv / jsonl with "
    "data.path=/path/to/file_or_folder"
)


# --------------------------------------------------------------------------- public API


@dataclass
class TaskData:
    """A loaded task: tokenized, unpadded examples and what their labels mean.

    Each example is ``{"input_ids", "attention_mask", ["token_type_ids"], "labels"}``
    with lists of ints for the first keys and an ``int`` label (classification) or a
    ``float`` label (regression); ``make_batches`` reads the label type from that.
    """

    name: str
    train: list[dict]
    dev: list[dict]
    test: list[dict]  # may be empty (e.g. GLUE, whose test labels are hidden)
    num_labels: int  # 1 for regression
    regression: bool
    label_names: Optional[list[str]]

    def sizes(self) -> dict:
        """Number of examples per split, e.g. ``{"train": 8485, "dev": 1060, "test": 1060}``."""
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)}


def load_tokenizer(model_name: str, revision: Optional[str] = None):
    """Load the tokenizer that goes with ``model.name``.

    Args:
        model_name: ``minilm`` (the packaged all-MiniLM-L6-v2), a ``tiny-*`` test model
            (these reuse the MiniLM tokenizer, vocabulary 30522), or any hub id / path.
        revision: Hub revision, only used for hub ids.

    Returns:
        A transformers tokenizer whose ``pad_token`` is set; decoder tokenizers without
        one (GPT-2, LLaMA) pad with their end-of-sequence token.
    """
    from transformers import AutoTokenizer

    from budget.models import PACKAGED, packaged_path, pretrained_kwargs

    if model_name == "minilm" or model_name.startswith("tiny-"):
        tokenizer = AutoTokenizer.from_pretrained(packaged_path("minilm"))
    elif model_name in PACKAGED:
        tokenizer = AutoTokenizer.from_pretrained(packaged_path(model_name), **pretrained_kwargs(model_name))
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_name, revision=revision)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"model.name={model_name}: no tokenizer found; use the packaged model (minilm), a tiny "
                f"test model (tiny-bert, ...), a local folder, or a hub id on a machine with internet ({err})"
            ) from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_task(cfg: DataConfig, tokenizer) -> TaskData:
    """Load, split, check and tokenize the task that ``cfg`` names.

    Args:
        cfg: The data section of the run config.
        tokenizer: A transformers tokenizer; texts are truncated to ``cfg.max_length``
            and left unpadded (``make_batches`` pads).

    Returns:
        The tokenized task.

    Raises:
        ConfigError: for any bad config value or unusable data, before tokenizing.
        RuntimeError: when a packaged task is not cached and cannot be downloaded.
    """
    raw = _load_raw(cfg)
    splits = {name: _tokenize(rows, tokenizer, cfg.max_length) for name, rows in raw.splits.items()}
    return TaskData(
        name=raw.name,
        train=splits["train"],
        dev=splits["dev"],
        test=splits["test"],
        num_labels=raw.num_labels,
        regression=raw.regression,
        label_names=raw.label_names,
    )


def num_batches(n_examples: int, batch_size: int) -> int:
    """Batches per epoch; the last one may be short (``ceil(n / batch_size)``)."""
    return math.ceil(n_examples / batch_size)


def make_batches(
    examples: list[dict],
    batch_size: int,
    pad_token_id: int,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    skip_batches: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield one epoch of padded batches.

    The order depends only on ``(seed, epoch)``, drawn from a private
    ``torch.Generator``, so it is unaffected by any other use of the global RNG. A run
    resumed mid-epoch passes ``skip_batches`` (batches already consumed) and gets exactly
    the batches the uninterrupted run would have seen next.

    Args:
        examples: Tokenized examples as in :class:`TaskData`.
        batch_size: Examples per batch; the last batch may be smaller.
        pad_token_id: Fills ``input_ids`` beyond each sequence (right padding).
        shuffle: Permute the examples; otherwise keep their order.
        seed: Run seed.
        epoch: Epoch index; each epoch gets its own permutation.
        skip_batches: Batches to skip at the start of the epoch.

    Yields:
        ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the examples have
        them) as ``(B, T)`` long tensors with ``T`` the longest sequence in the batch, and
        ``labels`` ``(B,)``: long for classification, float for regression.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(examples)
    if shuffle:
        generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        order = torch.randperm(n, generator=generator).tolist()
    else:
        order = list(range(n))
    for start in range(max(skip_batches, 0) * batch_size, n, batch_size):
        yield _collate([examples[i] for i in order[start : start + batch_size]], pad_token_id)


def describe(cfg: DataConfig) -> str:
    """A human summary of the task: source, label kind, split sizes and one example.

    Loads the raw data (fetching a packaged task on first use) but tokenizes nothing.
    """
    raw = _load_raw(cfg)
    sizes = {name: len(rows) for name, rows in raw.splits.items()}
    train = raw.splits["train"]
    if raw.regression:
        values = np.asarray(train.label, dtype=float)
        kind = (
            f"regression, train labels in [{values.min():.3g}, {values.max():.3g}], "
            f"mean {values.mean():.3g}, std {values.std():.3g}"
        )
    else:
        counts = Counter(train.label)
        names = raw.label_names or [str(i) for i in range(raw.num_labels)]
        spread = ", ".join(f"{names[i]} {counts.get(i, 0):,}" for i in range(raw.num_labels))
        kind = f"classification, {raw.num_labels} classes (train: {spread})"
    example = train.text[0]
    if train.pair is not None:
        example += f" || {train.pair[0]}"
    if len(example) > 100:
        example = example[:97] + "..."
    lines = [
        f"task:     {raw.name}",
        f"source:   {raw.source}",
        f"labels:   {kind}",
        "splits:   " + " / ".join(f"{name} {size:,}" for name, size in sizes.items()),
        f"          {raw.split_note}",
        f"columns:  text={raw.columns[0]}" + (f", text_pair={raw.columns[1]}" if raw.columns[1] else ""),
        f"example:  {example!r}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------- internal model


@dataclass
class _Rows:
    """One split, column-wise. ``ids`` trace rows to the source: the file's ID column for
    packaged tasks, row numbers otherwise."""

    text: list[str]
    pair: Optional[list[str]]
    label: list[Any]
    ids: list[Any] = field(default_factory=list)

    def take(self, index) -> _Rows:
        index = list(index)
        return _Rows(
            text=[self.text[i] for i in index],
            pair=None if self.pair is None else [self.pair[i] for i in index],
            label=[self.label[i] for i in index],
            ids=[self.ids[i] for i in index],
        )

    def __len__(self) -> int:
        return len(self.text)


@dataclass
class _RawTask:
    """A task before tokenization: split, labelled, checked."""

    name: str
    source: str
    splits: dict[str, _Rows]  # train, dev, test (test may be empty)
    num_labels: int
    regression: bool
    label_names: Optional[list[str]]
    split_note: str
    columns: tuple[str, Optional[str]]


def _load_raw(cfg: DataConfig) -> _RawTask:
    """Dispatch on ``cfg.task``; every ConfigError is raised from here, untokenized."""
    _check_numbers(cfg)
    task = cfg.task.strip()
    if task.lower() in PACKAGED_TASKS:
        return _load_packaged(task.lower(), cfg)
    if task in ("csv", "jsonl"):
        return _load_local(task, cfg)
    if not task:
        raise ConfigError(f"data.task: empty; {_TASK_HELP}")
    return _load_hub(task, cfg)


def _check_numbers(cfg: DataConfig) -> None:
    """The checks of ``config.validate`` that this module relies on, for direct callers."""
    if not 0 < cfg.dev_fraction < 1:
        raise ConfigError(f"data.dev_fraction: must be in (0, 1), got {cfg.dev_fraction}")
    if not 0 <= cfg.test_fraction < 1:
        raise ConfigError(f"data.test_fraction: must be in [0, 1), got {cfg.test_fraction}")
    if cfg.dev_fraction + cfg.test_fraction >= 1:
        raise ConfigError(
            f"data.dev_fraction: dev_fraction + test_fraction = {cfg.dev_fraction + cfg.test_fraction:g} "
            "leaves nothing to train on; keep the sum below 0.9"
        )
    if cfg.max_length < 1:
        raise ConfigError(f"data.max_length: must be >= 1, got {cfg.max_length}")
    for key in ("max_train_samples", "max_eval_samples"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key}: must be >= 1 or null, got {value}")


# ----------------------------------------------------------------- packaged (VADER)


def cache_root(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$ADABUDGET_CACHE``, else ``~/.cache/adabudget``."""
    root = cfg.cache_dir or os.environ.get("ADABUDGET_CACHE") or "~/.cache/adabudget"
    return Path(root).expanduser()


def ensure_vader(root: Path) -> Path:
    """Return ``<root>/vader``, fetching and unpacking the VADER data if it is missing.

    The files are unpacked into a temporary folder beside the target and renamed into
    place in one step, so an interrupted fetch or a concurrent one never leaves a
    half-written ``vader/`` behind.
    """
    target = root / "vader"
    if _vader_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".vader-tmp-") as tmp:
        tmp = Path(tmp)
        sdist = _download_vader_sdist(tmp / "download")
        staged = tmp / "vader"
        staged.mkdir()
        _extract_vader(sdist, staged)
        try:
            staged.rename(target)
        except OSError:
            # target exists: either a concurrent fetch finished first (keep it) or a
            # partial folder was left by hand (move it aside; it goes with tmp).
            if not _vader_complete(target):
                target.rename(tmp / "stale")
                staged.rename(target)
    return target


def _vader_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _VADER_FILES.values())


def _download_vader_sdist(dest: Path) -> Path:
    # The wheel leaves out additional_resources/; only the sdist carries the data.
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        VADER_SDIST,
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    found = sorted(dest.glob("vaderSentiment-*.tar.gz")) if dest.is_dir() else []
    if proc.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download the {VADER_SDIST} sdist that carries the packaged tasks "
            f"(`{' '.join(cmd)}` exited {proc.returncode}):\n{proc.stderr[-2000:]}\n"
            "Fix the network / package index, or unpack additional_resources/hutto_ICWSM_2014.tar.gz "
            "from that sdist into <data.cache_dir>/vader/ by hand."
        )
    return found[0]


def _extract_vader(sdist: Path, dest: Path) -> None:
    """Copy the files of the inner ``hutto_ICWSM_2014.tar.gz`` flat into ``dest``."""
    with tarfile.open(sdist, "r:gz") as outer:
        inner_member = next((m for m in outer.getmembers() if m.name.endswith(_VADER_INNER_ARCHIVE)), None)
        if inner_member is None:
            raise RuntimeError(f"{sdist.name} has no {_VADER_INNER_ARCHIVE}")
        with tarfile.open(fileobj=outer.extractfile(inner_member), mode="r:gz") as inner:
            for member in inner.getmembers():
                if not member.isfile():
                    continue
                # Written by basename through extractfile: no path in the archive can
                # escape dest.
                with inner.extractfile(member) as src, open(dest / Path(member.name).name, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def _read_vader_file(path: Path) -> tuple[list[str], list[float], list[str]]:
    """Parse ``id<TAB>score<TAB>text`` lines into ids, scores and cleaned texts."""
    ids, scores, texts = [], [], []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                decoded = line.decode("utf-8")
            except UnicodeDecodeError:
                # All four files are valid UTF-8 in 3.3.2; the rest of the archive is
                # Windows-1252, so a re-packaged copy could well be.
                decoded = line.decode("cp1252", errors="replace")
            decoded = decoded.rstrip("\r\n")
            if not decoded.strip():
                continue
            parts = decoded.split("\t", 2)
            if len(parts) != 3:
                raise RuntimeError(f"{path}:{lineno}: expected id<TAB>score<TAB>text, got {decoded[:80]!r}")
            ids.append(parts[0].strip())
            scores.append(float(parts[1]))
            texts.append(_clean_text(parts[2]))
    return ids, scores, texts


def _clean_text(text: str) -> str:
    # The texts were scraped HTML-escaped (&amp;, &lt;), 16 of them twice (&amp;amp;),
    # hence two rounds. The movie and NYT corpora write a double quote as two apostrophes
    # (''Conan''), which WordPiece would split into two apostrophe tokens; some movie
    # snippets carry runs of spaces where markup was stripped.
    text = html.unescape(html.unescape(text))
    return " ".join(text.replace("''", '"').split())


def _load_packaged(task: str, cfg: DataConfig) -> _RawTask:
    if cfg.path:
        raise ConfigError(
            f"data.path: {task} is a packaged task and reads no local file; "
            f"unset data.path, or set data.task=csv / jsonl to read {cfg.path}"
        )
    if task != "mr" and cfg.regression is False:
        raise ConfigError(
            f"data.regression: {task} has real-valued crowd scores in [-4, 4] and no classes; "
            "leave data.regression unset (or true), or use data.task=mr for classification"
        )
    if cfg.text_column not in (None, "text"):
        raise ConfigError(
            "data.text_column: packaged tasks have one text column, 'text'; unset data.text_column"
        )
    if cfg.text_pair_column is not None:
        raise ConfigError(
            "data.text_pair_column: packaged tasks have single texts; unset data.text_pair_column"
        )
    folder = ensure_vader(cache_root(cfg))
    file_name = _VADER_FILES[task]
    ids, scores, texts = _read_vader_file(folder / file_name)
    regression = task != "mr" or bool(cfg.regression)
    if regression:
        labels: list[Any] = scores
        num_labels, label_names = 1, None
    else:
        labels = [int(int(i) <= _MR_LAST_POSITIVE_ID) for i in ids]
        num_labels, label_names = 2, ["negative", "positive"]
    rows = _Rows(text=texts, pair=None, label=labels, ids=ids)
    splits = _seeded_split(rows, cfg, carve_test=True)
    splits = _truncate(splits, cfg)
    return _RawTask(
        name=task,
        source=f"{file_name} from the {VADER_SDIST} sdist (Hutto & Gilbert 2014), cached in {folder}",
        splits=splits,
        num_labels=num_labels,
        regression=regression,
        label_names=label_names,
        split_note=_split_note(cfg, carved=("dev", "test")),
        columns=("text", None),
    )


# ------------------------------------------------------------------ splitting helpers


def _seeded_split(rows: _Rows, cfg: DataConfig, carve_test: bool) -> dict[str, _Rows]:
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


def _truncate(splits: dict[str, _Rows], cfg: DataConfig) -> dict[str, _Rows]:
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


def _split_note(cfg: DataConfig, carved: tuple[str, ...]) -> str:
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


# ------------------------------------------------------------------------ hub datasets


def _load_hub(task: str, cfg: DataConfig) -> _RawTask:
    """Load a hub dataset and pass it through the same path as an in-memory DatasetDict."""
    if cfg.path:
        raise ConfigError(
            f"data.path: data.task={task} loads from the HF hub and reads no local file; "
            "unset data.path, or set data.task=csv / jsonl"
        )
    import datasets

    glue_task = None
    if task.lower().startswith("glue/"):
        glue_task = task.split("/", 1)[1].lower()
        if glue_task not in _GLUE:
            raise ConfigError(
                f"data.task: unknown GLUE task {glue_task!r}; known: glue/{', glue/'.join(_GLUE)}"
            )
        args: tuple[str, ...] = ("nyu-mll/glue", glue_task)
    elif ":" in task:
        args = tuple(task.split(":", 1))
    else:
        args = (task,)
    try:
        dataset_dict = datasets.load_dataset(*args)
    except Exception as err:
        # The hub stack reports "no such dataset" and "offline" through many unrelated
        # types (datasets, huggingface_hub, httpx, OSError); all mean the task is unusable.
        raise ConfigError(
            f"data.task: {task!r} is not a packaged task and datasets.load_dataset{args!r} failed "
            f"({type(err).__name__}: {str(err)[:300]}); {_TASK_HELP}"
        ) from err
    return _from_dataset_dict(task, dataset_dict, cfg, glue_task=glue_task)


def _from_dataset_dict(task: str, dataset_dict, cfg: DataConfig, glue_task: Optional[str] = None) -> _RawTask:
    """Columns, splits and labels of a ``datasets.DatasetDict`` (hub or in memory)."""
    import datasets

    available = list(dataset_dict.keys())
    if glue_task is not None:
        text_default, pair_default, dev_name, test_name = _GLUE[glue_task]
    else:
        text_default, pair_default = "text", None
        dev_name = next((s for s in _DEV_SPLIT_NAMES if s in dataset_dict), None)
        test_name = "test"
    text_column = cfg.text_column or text_default
    pair_column = cfg.text_pair_column or pair_default
    if "train" not in dataset_dict:
        raise ConfigError(
            f"data.task: {task} has no 'train' split (splits: {available}); pick another dataset"
        )

    label_feature = dataset_dict["train"].features.get(cfg.label_column)
    class_names = list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None
    float_label = isinstance(label_feature, datasets.Value) and label_feature.dtype.startswith("float")

    found: dict[str, tuple[str, Any]] = {"train": ("train", dataset_dict["train"])}
    if dev_name is not None and dev_name in dataset_dict:
        found["dev"] = (dev_name, dataset_dict[dev_name])
    if test_name in dataset_dict:
        found["test"] = (test_name, dataset_dict[test_name])

    splits: dict[str, _Rows] = {}
    for split, (source_name, ds) in found.items():
        columns = list(ds.column_names)
        where = f"split {source_name!r} of {task}"
        _require_column(text_column, columns, "data.text_column", where)
        if pair_column is not None:
            _require_column(pair_column, columns, "data.text_pair_column", where)
        if cfg.label_column not in columns:
            if split == "test":  # an unlabeled test split is common and useless here
                continue
            _require_column(cfg.label_column, columns, "data.label_column", where)
        labels = list(ds[cfg.label_column])
        if class_names is not None:
            # ClassLabel marks hidden labels (all of GLUE's test sets) with -1.
            labels = [None if value == -1 else value for value in labels]
        rows = _Rows(
            text=_as_texts(ds[text_column], "data.text_column", where),
            pair=None if pair_column is None else _as_texts(ds[pair_column], "data.text_pair_column", where),
            label=labels,
            ids=list(range(len(ds))),
        )
        splits[split] = rows
    return _finish(
        task,
        f"HF hub dataset {task} (splits: {', '.join(f'{k}<-{v[0]}' for k, v in found.items())})",
        splits,
        cfg,
        (text_column, pair_column),
        class_names=class_names,
        float_label=float_label,
    )


def _require_column(column: str, columns: list[str], fld: str, where: str) -> None:
    if column not in columns:
        raise ConfigError(f"{fld}: no column {column!r} in {where}; available columns: {columns}")


def _as_texts(values, fld: str, where: str) -> list[str]:
    out = []
    for i, value in enumerate(values):
        if value is None:
            raise ConfigError(f"{fld}: row {i} of {where} has no text; fill it or drop the row")
        out.append(value if isinstance(value, str) else str(value))
    return out


# ------------------------------------------------------------------------ local files


def _load_local(kind: str, cfg: DataConfig) -> _RawTask:
    if not cfg.path:
        raise ConfigError(
            f"data.path: data.task={kind} reads a local file: set data.path=/path/to/file.{kind}"
        )
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ConfigError(f"data.path: {path} does not exist; point it at a .{kind} file or a folder of them")
    text_column = cfg.text_column or "text"
    pair_column = cfg.text_pair_column
    if path.is_dir():
        files = {"train": _find_split_file(path, ("train",), kind)}
        dev = _find_split_file(path, ("dev", "validation", "valid", "val"), kind)
        test = _find_split_file(path, ("test",), kind)
        if files["train"] is None:
            present = sorted(p.name for p in path.iterdir())
            raise ConfigError(f"data.path: {path} has no train.{kind}; found {present}")
        if dev is not None:
            files["dev"] = dev
        if test is not None:
            files["test"] = test
    else:
        files = {"train": path}
    splits = {}
    for split, file in files.items():
        records, columns = _read_records(file, kind)
        where = f"{file}"
        if not records:
            raise ConfigError(f"data.path: {file} has no rows; the {split} split would be empty")
        _require_column(text_column, columns, "data.text_column", where)
        if pair_column is not None:
            _require_column(pair_column, columns, "data.text_pair_column", where)
        if cfg.label_column not in columns:
            if split == "test":
                log.info("%s has no %r column: no test split", file, cfg.label_column)
                continue
            _require_column(cfg.label_column, columns, "data.label_column", where)
        splits[split] = _Rows(
            text=_as_texts([r.get(text_column) for r in records], "data.text_column", where),
            pair=None
            if pair_column is None
            else _as_texts([r.get(pair_column) for r in records], "data.text_pair_column", where),
            label=[_coerce_label(r.get(cfg.label_column)) for r in records],
            ids=list(range(len(records))),
        )
    return _finish(kind, f"local {kind} {path}", splits, cfg, (text_column, pair_column))


def _find_split_file(folder: Path, stems: tuple[str, ...], kind: str) -> Optional[Path]:
    return next((folder / f"{s}.{kind}" for s in stems if (folder / f"{s}.{kind}").is_file()), None)


def _read_records(path: Path, kind: str) -> tuple[list[dict], list[str]]:
    """Rows of a csv (tab-separated when named ``.tsv``) or jsonl file, and its columns."""
    if kind == "csv":
        # utf-8-sig: spreadsheet exports start with a BOM that would glue onto the first
        # column name.
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            records = list(reader)
            columns = list(reader.fieldnames or [])
        return records, columns
    records, columns = [], {}
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"data.path: line {lineno} of {path} is not valid JSON ({err})") from err
            if not isinstance(record, dict):
                raise ConfigError(f"data.path: line {lineno} of {path} is not a JSON object")
            records.append(record)
            columns.update(dict.fromkeys(record))
    return records, list(columns)


def _coerce_label(value: Any) -> Any:
    """Numbers written as text (every CSV cell) become numbers; empty cells become None."""
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        for parse in (int, float):
            try:
                return parse(value)
            except ValueError:
                pass
    return value


# ----------------------------------------------------------------------- labels


def _finish(
    task: str,
    source: str,
    splits: dict[str, _Rows],
    cfg: DataConfig,
    columns: tuple[str, Optional[str]],
    class_names: Optional[list[str]] = None,
    float_label: bool = False,
) -> _RawTask:
    """Shared tail of hub and local data: drop unlabeled test, carve splits, encode labels."""
    if "test" in splits and all(v is None for v in splits["test"].label):
        del splits["test"]  # hidden labels, as in GLUE: nothing to score against
    carved: tuple[str, ...] = ()
    if "dev" not in splits:
        carve_test = "test" not in splits
        carved = ("dev", "test") if carve_test and cfg.test_fraction > 0 else ("dev",)
        cut = _seeded_split(splits["train"], cfg, carve_test=carve_test)
        splits = {**splits, **cut}
    splits.setdefault("test", _Rows(text=[], pair=None if columns[1] is None else [], label=[]))
    for name in ("train", "dev"):
        if len(splits[name]) == 0:
            raise ConfigError(f"data.task: the {name} split of {task} is empty; provide rows for it")

    regression, num_labels, label_names = _encode_labels(splits, cfg, class_names, float_label)
    splits = _truncate({name: splits[name] for name in ("train", "dev", "test")}, cfg)
    return _RawTask(
        name=task,
        source=source,
        splits=splits,
        num_labels=num_labels,
        regression=regression,
        label_names=label_names,
        split_note=_split_note(cfg, carved),
        columns=columns,
    )


def _encode_labels(
    splits: dict[str, _Rows],
    cfg: DataConfig,
    class_names: Optional[list[str]],
    float_label: bool,
) -> tuple[bool, int, Optional[list[str]]]:
    """Turn raw labels into ints ``0..K-1`` or floats, in place; return the label kind.

    The mapping is built over all splits together, so a class seen only in dev still gets
    an id and the ids do not depend on ``max_*_samples``.
    """
    values = []
    for name, rows in splits.items():
        for i, value in enumerate(rows.label):
            if value is None:
                raise ConfigError(
                    f"data.label_column: row {i} of the {name} split has no {cfg.label_column!r} value; "
                    "fill it or drop the row"
                )
            if isinstance(value, bool):
                value = int(value)
                rows.label[i] = value
            if not isinstance(value, (int, float, str, np.integer, np.floating)):
                raise ConfigError(
                    f"data.label_column: labels must be ints or strings (or numbers for regression), "
                    f"got {value!r} in row {i} of the {name} split"
                )
            values.append(value)
    strings = [v for v in values if isinstance(v, str)]
    numbers = [v for v in values if not isinstance(v, str)]
    if strings and numbers:
        raise ConfigError(
            f"data.label_column: labels mix numbers and strings (e.g. {numbers[0]!r} and {strings[0]!r}); "
            "use one kind"
        )
    fractional = any(float(v) != int(v) for v in numbers if math.isfinite(float(v)))
    if any(not math.isfinite(float(v)) for v in numbers):
        raise ConfigError("data.label_column: labels contain nan or inf; fix or drop those rows")

    regression = cfg.regression
    if regression is None:
        regression = bool(numbers) and (fractional or float_label)
    if regression:
        if strings:
            raise ConfigError(
                f"data.regression: regression needs numeric labels, got strings such as {strings[0]!r}; "
                "set data.regression=false to classify"
            )
        for rows in splits.values():
            rows.label = [float(v) for v in rows.label]
        return True, 1, None

    if fractional:
        example = next(v for v in numbers if float(v) != int(v))
        raise ConfigError(
            f"data.label_column: classification labels must be ints or strings, got {example!r}; "
            "set data.regression=true for real-valued targets"
        )
    if strings:
        classes: list[Any] = sorted(set(strings))
    else:
        classes = sorted({int(v) for v in numbers})
    if len(classes) < 2:
        raise ConfigError(
            f"data.label_column: classification needs at least 2 classes, found {len(classes)} "
            f"({classes}) in {cfg.label_column!r}; check the column or use more data"
        )
    if not strings and class_names is not None and all(0 <= c < len(class_names) for c in classes):
        # A ClassLabel fixes the ids and names, even for classes absent from this data.
        num_labels, label_names = len(class_names), list(class_names)
    elif classes == list(range(len(classes))):
        num_labels, label_names = len(classes), None
    else:
        num_labels, label_names = 0, None
    if num_labels:
        for rows in splits.values():
            rows.label = [int(v) for v in rows.label]
        return False, num_labels, label_names
    # Strings, or ints that are not 0..K-1 (1..5 stars, -1/1): dense ids, original values
    # kept as names.
    index = {c: i for i, c in enumerate(classes)}
    for rows in splits.values():
        rows.label = [index[v if isinstance(v, str) else int(v)] for v in rows.label]
    return False, len(classes), [str(c) for c in classes]


# --------------------------------------------------------------------- tokenize, batch


def _tokenize(rows: _Rows, tokenizer, max_length: int) -> list[dict]:
    examples: list[dict] = []
    for start in range(0, len(rows), _TOKENIZE_CHUNK):
        stop = start + _TOKENIZE_CHUNK
        pairs = None if rows.pair is None else rows.pair[start:stop]
        encoded = tokenizer(rows.text[start:stop], pairs, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        for j, label in enumerate(rows.label[start:stop]):
            example = {k: list(encoded[k][j]) for k in keys}
            example["labels"] = label
            examples.append(example)
    return examples


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence mixes (seed, epoch) so that nearby pairs give unrelated permutations
    # and no two pairs collide, unlike seed * K + epoch.
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])


def _collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(ex["input_ids"]) for ex in batch)
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0}
    out = {}
    for key, pad in pad_values.items():
        if key in batch[0]:
            out[key] = torch.tensor(
                [ex[key] + [pad] * (longest - len(ex[key])) for ex in batch], dtype=torch.long
            )  # (B, T)
    labels = [ex["labels"] for ex in batch]
    dtype = torch.float if isinstance(labels[0], float) else torch.long
    out["labels"] = torch.tensor(labels, dtype=dtype)  # (B,)
    return out
