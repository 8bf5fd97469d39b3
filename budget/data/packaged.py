"""The packaged tasks: the human-rated sentence sets of the ``vaderSentiment==3.3.2`` sdist.

Fetched with ``pip download`` on first use, unpacked into the cache, parsed and cleaned of
what the scrape left behind; the tasks and their splits: docs/training.md#data.
"""

from __future__ import annotations

import html
import os
import shutil
import tarfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

from adabudget import fetch
from adabudget.config import ConfigError, DataConfig
from adabudget.data.raw import RawTask, Rows
from adabudget.data.split import SPLIT_PROCEDURE, seeded_split, split_note, truncate

PACKAGED_TASKS = ("mr", "tweets", "amazon", "nyt")
VADER_SDIST = "vaderSentiment==3.3.2"
_VADER_INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_FILES = {
    "mr": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
# The data version of every packaged task (TaskData.version): the rows of this sdist as
# _read_vader_file cleans them, split by seeded_split. Bump the first half when the
# cleaning changes a text; tests pin both halves.
PACKAGED_VERSION = f"vader-{VADER_SDIST.split('==')[1]}/{SPLIT_PROCEDURE}"
# Hutto & Gilbert numbered the Pang & Lee positive snippets first.
_MR_LAST_POSITIVE_ID = 5152


def cache_root(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$ADABUDGET_CACHE``, else ``~/.cache/adabudget``."""
    return fetch.cache_root(cfg.cache_dir)


def ensure_vader(root: Path) -> Path:
    """Return ``<root>/vader``, fetching and unpacking the VADER data if it is missing.

    The sdist is fetched (the wheel leaves out ``additional_resources/``) and its inner archive
    unpacked by :func:`ensure_fetched`, which says how a half-fetched or foreign folder is met.
    """
    return ensure_fetched(
        root / "vader",
        _VADER_FILES.values(),
        VADER_SDIST,
        _VADER_INNER_ARCHIVE,
        pip_args=("--no-binary", ":all:"),
        prepare=_unpack_inner,
        hint=f"Or unpack {_VADER_INNER_ARCHIVE} from that sdist into <data.cache_dir>/vader/ by hand.",
    )


def ensure_fetched(
    target: Path,
    files: Iterable[str],
    requirement: str,
    member: str,
    *,
    pip_args: Sequence[str] = (),
    prepare: Optional[Callable[[Path], None]] = None,
    hint: str = "",
) -> Path:
    """Return ``target`` once it holds ``files``, fetching ``member`` of ``requirement`` if it does not.

    ``adabudget.fetch.fetch_member`` downloads the distribution (its sha256 pinned), stages the
    member's files beside the target (``prepare`` turns them into ``files``) and renames them into
    place in one step, so an interrupted or concurrent fetch never leaves a half-written folder.
    A fetched folder that lacks a file since (``adabudget.fetch.MARKER`` says adabudget filled it)
    is replaced; any other folder of that name is the user's and is refused, never deleted:
    ``data.cache_dir`` may point anywhere.
    """
    files = list(files)
    if all((target / name).is_file() for name in files):
        return target
    if target.exists():
        if not (target / fetch.MARKER).is_file():
            missing = sorted(n for n in files if not (target / n).is_file())
            raise ConfigError(
                f"data.cache_dir: {target} exists but adabudget did not fetch it (no {fetch.MARKER} file) "
                f"and it lacks {missing}; adabudget will not delete it: move it away, or point "
                "data.cache_dir (or $ADABUDGET_CACHE) at another folder"
            )
        shutil.rmtree(target.rename(target.parent / f".{target.name}-stale-{os.getpid()}"))
    return fetch.fetch_member(requirement, member, target, pip_args=pip_args, prepare=prepare, hint=hint)


def _unpack_inner(staged: Path) -> None:
    """Replace the staged ``hutto_ICWSM_2014.tar.gz`` by its files, flat."""
    archive = staged / Path(_VADER_INNER_ARCHIVE).name
    with tarfile.open(archive, mode="r:gz") as inner:
        for member in inner.getmembers():
            if not member.isfile():
                continue
            # Written by basename through extractfile: no path in the archive can escape staged.
            with inner.extractfile(member) as src, open(staged / Path(member.name).name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    archive.unlink()
    missing = [n for n in _VADER_FILES.values() if not (staged / n).is_file()]
    if missing:
        raise fetch.FetchError(f"{_VADER_INNER_ARCHIVE} of {VADER_SDIST} lacks {missing}")


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


def load_packaged(task: str, cfg: DataConfig) -> RawTask:
    """Check the config against what a packaged task offers, then read, label and split it."""
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
    if cfg.label_column not in (None, "label"):
        # Rejected rather than ignored: a run asking for another target must not silently
        # train on the default one.
        raise ConfigError(
            f"data.label_column: packaged tasks have no label columns to choose from (got "
            f"{cfg.label_column!r}); their label is fixed: mr's polarity (data.regression=true "
            "for the crowd score instead) and the others' crowd score. Unset data.label_column"
        )
    if cfg.prompt_column is not None or cfg.completion_column is not None:
        raise ConfigError(
            f"data.prompt_column: {task} is a classification task with fixed columns; unset "
            "data.prompt_column and data.completion_column, or use data.task=mr_instruct (mr as "
            "prompt -> completion pairs for a decoder)"
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
    rows = Rows(text=texts, pair=None, label=labels, ids=ids)
    splits = seeded_split(rows, cfg, carve_test=True)
    splits = truncate(splits, cfg)
    return RawTask(
        name=task,
        source=f"{file_name} from the {VADER_SDIST} sdist (Hutto & Gilbert 2014), cached in {folder}",
        version=PACKAGED_VERSION,
        splits=splits,
        num_labels=num_labels,
        regression=regression,
        label_names=label_names,
        split_note=split_note(cfg, carved=("dev", "test")),
        columns=("text", None),
    )
