"""Local ``csv`` / ``jsonl`` data: one file, or a folder of ``train`` / ``dev`` / ``test`` files."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Optional

from budget.config import ConfigError, DataConfig
from budget.data.raw import RawTask, Rows, as_texts, finish, require_column

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
    splits = {}
    for split, file in files.items():
        records, columns = _read_records(file, kind)
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
