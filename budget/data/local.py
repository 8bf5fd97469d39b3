"""Local ``csv`` / ``jsonl`` data: one file, or a folder of ``train`` / ``dev`` / ``test`` files."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any, Optional

from adabudget.config import ConfigError, DataConfig
from adabudget.data.raw import (
    RawTask,
    Rows,
    as_texts,
    finish,
    finish_lm,
    lm_rows,
    refuse_classification_columns,
    require_column,
)

log = logging.getLogger(__name__)


def load_local(kind: str, cfg: DataConfig) -> RawTask:
    """Read ``data.path`` (a file, or a folder of split files) as ``kind`` (csv or jsonl)."""
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
    if cfg.prompt_column is not None:
        return _load_lm(kind, path, files, cfg)
    splits = {}
    for split, file in files.items():
        records, columns = _read_records(file, kind, cfg.encoding)
        where = f"{file}"
        if not records:
            raise ConfigError(f"data.path: {file} has no rows; the {split} split would be empty")
        require_column(text_column, columns, "data.text_column", where)
        if pair_column is not None:
            require_column(pair_column, columns, "data.text_pair_column", where)
        if cfg.label_column not in columns:
            if split == "test":
                log.info("%s has no %r column: no test split", file, cfg.label_column)
                continue
            require_column(cfg.label_column, columns, "data.label_column", where)
        splits[split] = Rows(
            text=as_texts([r.get(text_column) for r in records], "data.text_column", where),
            pair=None
            if pair_column is None
            else as_texts([r.get(pair_column) for r in records], "data.text_pair_column", where),
            label=[_coerce_label(r.get(cfg.label_column)) for r in records],
            ids=list(range(len(records))),
        )
    return finish(kind, f"local-{kind}", f"local {kind} {path}", splits, cfg, (text_column, pair_column))


def _load_lm(kind: str, path: Path, files: dict[str, Path], cfg: DataConfig) -> RawTask:
    """``data.prompt_column`` -> ``data.completion_column`` pairs of each file: a causal-LM task.

    A test file without the completion column, or with every completion empty, is left out (as a
    test file without labels is for classification).
    """
    refuse_classification_columns(cfg)
    splits = {}
    for split, file in files.items():
        records, columns = _read_records(file, kind, cfg.encoding)
        where = f"{file}"
        if not records:
            raise ConfigError(f"data.path: {file} has no rows; the {split} split would be empty")
        require_column(cfg.prompt_column, columns, "data.prompt_column", where)
        if cfg.completion_column not in columns and split == "test":
            log.info("%s has no %r column: no test split", file, cfg.completion_column)
            continue
        require_column(cfg.completion_column, columns, "data.completion_column", where)
        rows = lm_rows(
            [r.get(cfg.prompt_column) for r in records],
            [r.get(cfg.completion_column) for r in records],
            range(len(records)),
            where,
            cfg.completion_column,
        )
        if rows is None and split != "test":
            raise ConfigError(
                f"data.completion_column: every completion ({cfg.completion_column!r}) of {where} is empty; "
                "name the column that holds the answers"
            )
        if rows is not None:
            splits[split] = rows
    columns = (cfg.prompt_column, cfg.completion_column)
    return finish_lm(kind, f"local-{kind}", f"local {kind} {path}", splits, cfg, columns)


def _find_split_file(folder: Path, stems: tuple[str, ...], kind: str) -> Optional[Path]:
    return next((folder / f"{s}.{kind}" for s in stems if (folder / f"{s}.{kind}").is_file()), None)


def _read_records(path: Path, kind: str, encoding: str = "utf-8-sig") -> tuple[list[dict], list[str]]:
    """Rows of a csv (tab-separated when named ``.tsv``) or jsonl file, and its columns."""
    text = _read_text(path, encoding)
    if kind == "csv":
        reader = csv.DictReader(
            io.StringIO(text, newline=""), delimiter="\t" if path.suffix == ".tsv" else ","
        )
        records = list(reader)
        columns = list(reader.fieldnames or [])
        return records, columns
    records, columns = [], {}
    for lineno, line in enumerate(io.StringIO(text, newline=None), start=1):  # \n, \r\n or \r, as open()
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


def _read_text(path: Path, encoding: str) -> str:
    """The whole file decoded with ``data.encoding``. A file that does not decode, or that decodes
    to NUL characters (UTF-16 read as UTF-8: every other byte is 0), is refused naming both."""
    raw = path.read_bytes()
    utf16 = raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\0" in raw[:2]
    fix = (
        "set data.encoding=utf-16 (the file looks like UTF-16)"
        if utf16
        else (
            "set data.encoding to the file's encoding (data.encoding=cp1252 for a Windows export, "
            "latin-1, ...)"
        )
    )
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"data.encoding: {path} is not valid {encoding} (byte {raw[err.start]:#04x} on line {line}: "
            f"{err.reason}); {fix}, or re-save it as UTF-8"
        ) from None
    nul = text.find("\0")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise ConfigError(
            f"data.encoding: {path} read as {encoding} holds a NUL character (line {line}), which no text "
            f"holds: it is another encoding or not a text file; {fix}, or re-save it as UTF-8"
        )
    return text.removeprefix("\ufeff")  # utf-8-sig drops a byte-order mark, other codecs may not


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
