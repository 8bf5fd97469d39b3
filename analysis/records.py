"""Run records and Optuna studies as pandas DataFrames. Reads files and storages only: nothing
here imports ``budget`` or ``search`` (a record is the interface, README "The run record").

    from adabudget.analysis.records import load
    rec = load(["runs/default", "runs/search/s4-mr"])       # folders, trees of them, studies
    rec.runs                    # one row per run: status, metrics, params, config, meta
    rec.metrics                 # step, split, metric, value (long form)
    rec.ranks                   # step, module, layer, role, group, rank per allocation
    rec.scores                  # step, module, triplet, score, kept: why the ranks moved
    rec.groups                  # group, layers, method, params: what a hybrid trains where
    trials("runs/search/s4-mr/journal.log")   # a study's trials (journal, sqlite:///, postgresql://)

A path may be a run folder (it holds ``result.json``), any folder above run folders, or a
study folder (``search.json``: its trials and re-trainings are run folders below it). Every row
carries its ``run_dir``. ``status`` filters the runs (completed by default; failed, pruned,
interrupted, running on request); a ``running`` run whose heartbeat is older than
``STALE_AFTER_S`` and whose process is gone is reported as ``running`` with ``alive=False``.
Records of an unknown ``record_version`` fail with a ``RecordError`` that says so.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

SUPPORTED_VERSIONS = (1, 2)  # 1: the first records, which have no record_version field
STALE_AFTER_S = 600.0
STATUSES = ("completed", "pruned", "interrupted", "failed", "running")
_BLOCK = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")
# scheme://user:password@ in a storage URL (search.credentials.scrub's twin: analysis imports no search)
_LOGIN = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^@\s]*@")
_QUERY = re.compile(r"([?&]password=)[^&\s]*", re.IGNORECASE)


class RecordError(ValueError):
    """A path or record that cannot be read; the message names it and the fix."""


@dataclass
class Records:
    runs: pd.DataFrame
    metrics: pd.DataFrame
    ranks: pd.DataFrame
    scores: pd.DataFrame
    groups: pd.DataFrame


# ---------------------------------------------------------------- finding runs
def run_dirs(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Every run folder at or below ``paths`` (sorted, no duplicates)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: dict[Path, None] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise RecordError(
                f"{p}: no such file or folder; pass run folders, folders above them, or studies"
            )
        if (p / "result.json").is_file():
            found[p.resolve()] = None
            continue
        for result in sorted(p.rglob("result.json")):
            if result.parent.name in ("adapter", "merged", "checkpoints"):
                continue
            found[result.parent.resolve()] = None
    return list(found)


def read_result(run_dir: Path) -> dict:
    """``result.json`` of a run, checked for a version this reader knows."""
    path = Path(run_dir) / "result.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RecordError(f"{path}: unreadable result record ({err})") from err
    version = result.get("record_version", 1)
    if version not in SUPPORTED_VERSIONS:
        raise RecordError(
            f"{path}: record_version {version} is not one this reader knows ({SUPPORTED_VERSIONS}); it was "
            "written by a newer adabudget: upgrade the analysis side"
        )
    return result


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:  # the last line of a run killed mid-write
                continue
    return rows


# ---------------------------------------------------------------- loading
def load(paths, status: str | Iterable[str] | None = "completed") -> Records:
    """All four tables for the runs at ``paths`` with one of the ``status`` values (None: all)."""
    wanted = None if status is None else ({status} if isinstance(status, str) else set(status))
    if wanted is not None and not wanted <= set(STATUSES):
        raise RecordError(f"status={sorted(wanted)}: use some of {STATUSES} (or None for all)")
    runs, metrics, ranks, scores, groups = [], [], [], [], []
    for run_dir in run_dirs(paths):
        result = read_result(run_dir)
        row = _run_row(run_dir, result)
        if wanted is not None and row["status"] not in wanted:
            continue
        runs.append(row)
        modules = {m["name"]: m for m in result.get("modules") or []}
        for g in result.get("groups") or []:
            for name, m in (g.get("methods") if isinstance(g.get("methods"), dict) else {}).items():
                groups.append(
                    {
                        "run_dir": str(run_dir),
                        "group": g.get("group"),
                        "layers": g.get("layers"),
                        "method": name,
                        "params": m.get("params"),
                    }
                )
        for m in _jsonl(run_dir / "metrics.jsonl"):
            for key, value in m.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    metrics.append(
                        {
                            "run_dir": str(run_dir),
                            "step": m["step"],
                            "split": m.get("split", "train"),
                            "metric": key,
                            "value": float(value),
                        }
                    )
        for a in _jsonl(run_dir / "ranks.jsonl"):
            for name, rank in (a.get("ranks") or {}).items():
                info = modules.get(name) or _guess_module(name)
                ranks.append(
                    {
                        "run_dir": str(run_dir),
                        "step": a["step"],
                        "budget": a.get("budget"),
                        "kept": a.get("kept"),
                        "final": bool(a.get("final")),
                        "module": name,
                        "layer": info["layer"],
                        "role": info["role"],
                        "group": info.get("group", 0),
                        "init_rank": info.get("init_rank"),
                        "rank": rank,
                    }
                )
            for name, values in (a.get("scores") or {}).items():
                mask = (a.get("kept_mask") or {}).get(name) or [None] * len(values)
                for i, (s, k) in enumerate(zip(values, mask)):
                    scores.append(
                        {
                            "run_dir": str(run_dir),
                            "step": a["step"],
                            "module": name,
                            "triplet": i,
                            "score": s,
                            "kept": bool(k),
                        }
                    )
    return Records(
        runs=pd.DataFrame(runs, columns=None if runs else ["run_dir", "status"]),
        metrics=pd.DataFrame(metrics, columns=["run_dir", "step", "split", "metric", "value"]),
        ranks=pd.DataFrame(
            ranks,
            columns=[
                "run_dir",
                "step",
                "budget",
                "kept",
                "final",
                "module",
                "layer",
                "role",
                "group",
                "init_rank",
                "rank",
            ],
        ),
        scores=pd.DataFrame(scores, columns=["run_dir", "step", "module", "triplet", "score", "kept"]),
        groups=pd.DataFrame(groups, columns=["run_dir", "group", "layers", "method", "params"]),
    )


def _run_row(run_dir: Path, r: dict) -> dict:
    cfg = _config(run_dir)
    row = {
        "run_dir": str(run_dir),
        "status": r.get("status"),
        "record_version": r.get("record_version", 1),
        "method": r.get("method"),
        "model": r.get("model"),
        "task": r.get("task"),
        "data_version": r.get("data_version"),
        "primary_metric": r.get("primary_metric") or _primary(r),
        "regression": r.get("regression"),
        "seed": cfg.get("train.seed"),
        "lr": cfg.get("train.lr"),
        "steps": r.get("steps"),
        "total_steps": r.get("total_steps"),
        "trainable_params": r.get("trainable_params"),
        "trainable_params_final": r.get("trainable_params_final"),
        "adapter_params_final": r.get("adapter_params_final"),
        "wall_time_s": r.get("wall_time_s"),
        "peak_memory_mb": r.get("peak_memory_mb"),
        "git_commit": r.get("git_commit"),
        "error": r.get("error"),
        "alive": _alive(r),
        "final_params": _final_params(r),
    }
    for split, values in (r.get("final") or {}).items():
        for k, v in values.items():
            row[f"{split}.{k}"] = v
    for k, v in ((r.get("best") or {}).get("dev") or {}).items():
        row[f"best_dev.{k}"] = v
    row["best_step"] = (r.get("best") or {}).get("step")
    for k, v in (r.get("meta") or {}).items():
        row[f"meta.{k}"] = v if not isinstance(v, (dict, list)) else json.dumps(v, sort_keys=True)
    for k, v in cfg.items():
        row[f"cfg.{k}"] = v if not isinstance(v, (dict, list)) else json.dumps(v, sort_keys=True)
    return row


# methods whose ranks move, for records written before a group said so (``ranks_move``)
_RANKS_MOVED_BEFORE_FLAG = ("adalora", "sora", "increlora", "geolora")


def _final_params(r: dict) -> int | None:
    """The parameters a PEFT table reports: every method's at the end, the task head excluded;
    a method whose ranks move (its group entry says ``ranks_move``: AdaLoRA, SoRA, IncreLoRA,
    GeoLoRA) counts its kept components (``adapter_params_final``); full fine-tuning everything; a
    run of no steps (a zero-shot row) none."""
    if r.get("total_steps") == 0:
        return 0
    if r.get("method") == "full" or not r.get("groups"):
        return r.get("trainable_params")
    start = sum(g.get("params", 0) for g in r["groups"])
    if r.get("adapter_params_final") is None:
        return start
    moving = sum(
        m["params"]
        for g in r["groups"]
        if isinstance(g.get("methods"), dict)
        for name, m in g["methods"].items()
        # the methods whose ranks move (adapter_params_final)
        if m.get("ranks_move", name in _RANKS_MOVED_BEFORE_FLAG)
    )
    return start - moving + r["adapter_params_final"]


def _config(run_dir: Path) -> dict:
    """``config.yaml`` flattened to dotted keys (method groups kept whole)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return {}
    import yaml

    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            if isinstance(v, dict) and k not in ("meta",):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    return flat(yaml.safe_load(path.read_text()) or {})


def _primary(r: dict) -> str:
    dev = ((r.get("final") or {}).get("dev")) or {}
    return "pearson" if "pearson" in dev else "accuracy"


def _alive(r: dict) -> bool | None:
    """For a running record: does the run still live? On its own host the pid answers; elsewhere a
    heartbeat fresher than ``STALE_AFTER_S`` does. (``adabudget.procs.pid_alive``'s check, restated:
    analysis imports neither the engine nor the search.)"""
    if r.get("status") != "running":
        return None
    if r.get("host") == socket.gethostname() and r.get("pid"):
        try:
            os.kill(int(r["pid"]), 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    beat = r.get("heartbeat_at")
    return beat is not None and time.time() - beat < STALE_AFTER_S


def _guess_module(name: str) -> dict:
    """Layer and role of a module in a version-1 record (no modules table): from its name."""
    m = _BLOCK.search("." + name + ".")
    leaf = name.rsplit(".", 1)[-1].removesuffix("_proj")
    roles = {
        "query": "q",
        "key": "k",
        "value": "v",
        "q": "q",
        "k": "k",
        "v": "v",
        "o": "o",
        "c_attn": "qkv",
        "gate": "ffn_in",
        "up": "ffn_in",
        "down": "ffn_out",
        "c_fc": "ffn_in",
    }
    if leaf == "dense":
        role = "o" if "attention" in name else "ffn_in" if "intermediate" in name else "ffn_out"
    elif leaf == "c_proj":
        role = "o" if ".attn." in name else "ffn_out"
    else:
        role = roles.get(leaf, "other")
    return {"layer": int(m.group(1)) if m else None, "role": role, "group": 0}


# ---------------------------------------------------------------- studies
def trials(storage: str | Path, study: str | None = None, folder: str | Path | None = None) -> pd.DataFrame:
    """One row per trial of an Optuna study: state, values, params, the run folder, the counts.

    ``storage``: a journal file, a study folder (its ``journal.log`` / ``search.json``),
    ``sqlite:///...``, ``postgresql://...`` or ``grpc://host:port`` (or a loaded ``optuna.Study``,
    then ``folder`` is its study folder). ``study`` may be omitted when there is one. Run folders
    resolve against the study folder (``resolve_run_dir``), whatever the working directory.
    """
    s = storage if hasattr(storage, "get_trials") else load_study(storage, study)
    folder = folder if folder is not None else study_folder(storage)
    recorded = (s.user_attrs.get("adabudget:root") or {}).get("path")
    study = s.study_name
    objectives = (s.user_attrs.get("adabudget") or {}).get("objectives") or [
        f"value{i}" for i in range(len(s.directions))
    ]
    rows = []
    for t in s.get_trials(deepcopy=False):
        infeasible = t.user_attrs.get("infeasible")
        state = "infeasible" if infeasible and t.state.name == "COMPLETE" else t.state.name.lower()
        row = {
            "study": study,
            "number": t.number,
            "state": state,
            "run_dir": resolve_run_dir(t.user_attrs.get("run_dir"), folder, recorded),
            "trainable_params": t.user_attrs.get("trainable_params"),
            "budget_params": t.user_attrs.get("budget_params"),
            "baseline": t.user_attrs.get("baseline"),
            "retry_of": t.user_attrs.get("retry_of"),
            "infeasible": infeasible,
            "duration_s": t.duration.total_seconds() if t.duration else None,
        }
        for name, v in zip(objectives, t.values if state == "complete" else [None] * len(objectives)):
            row[name] = v
        for k, v in t.params.items():
            row[f"param.{k}"] = v
        for step, v in sorted(t.intermediate_values.items())[-1:]:
            row["last_report_step"], row["last_report"] = step, v
        rows.append(row)
    return pd.DataFrame(rows)


def study_folder(storage) -> Path | None:
    """The study folder a ``trials`` / ``load_study`` argument names: the folder itself, a journal's
    folder; None for a database URL or a loaded study."""
    if hasattr(storage, "get_trials") or "://" in str(storage):
        return None
    p = Path(storage)
    return p if p.is_dir() else p.parent


def resolve_run_dir(
    run_dir: str | None, folder: str | Path | None, recorded: str | None = None
) -> str | None:
    """A trial's run folder as the search wrote it (relative to the search's working directory, or
    absolute on the machine that ran it), found under the study ``folder`` instead: the part of the
    path below the study folder the search recorded (``recorded``, else the last path component
    named like ``folder``), joined to ``folder``, when that exists. Else the path as written."""
    if run_dir is None or folder is None:
        return run_dir
    folder, parts = Path(folder), Path(run_dir).parts
    below = None
    if recorded and parts[: len(Path(recorded).parts)] == Path(recorded).parts:
        below = parts[len(Path(recorded).parts) :]
    elif folder.name in parts:
        below = parts[len(parts) - parts[::-1].index(folder.name) :]
    if below and folder.joinpath(*below).exists():
        return str(folder.joinpath(*below))
    return run_dir


def load_study(storage: str | Path, study: str | None = None):
    """The ``optuna.Study`` at ``storage`` (as for ``trials``), for Optuna's own analyses.

    A database URL without a password (as ``search.json`` stores it) logs in with libpq's
    ``PGPASSWORD`` or ``~/.pgpass``; a refused login is a ``RecordError`` that names them.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage, study = _storage(storage, study)
    shown = hide_password(storage) if isinstance(storage, str) else storage
    try:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    except Exception as err:  # SQLAlchemy's OperationalError: its text names no password
        text = str(err)
        if not any(s in text for s in ("password authentication failed", "no password supplied")):
            raise
        raise RecordError(
            f"{shown}: the database refused the login ({text.splitlines()[0]}); give the password "
            "in PGPASSWORD or a ~/.pgpass line (host:port:database:user:password, mode 0600)"
        ) from None
    if study is None:
        if len(names) != 1:
            raise RecordError(f"{shown}: holds studies {names}; name one")
        study = names[0]
    if study not in names:
        raise RecordError(f"{shown}: no study {study!r}; it holds {names}")
    return optuna.load_study(study_name=study, storage=storage)


def _with_driver(url: str) -> str:
    """``postgresql://`` names no driver and SQLAlchemy 2.1 then imports psycopg (3): with only
    psycopg2 installed (psycopg2-binary, as the docs say), name it (as ``search`` does)."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        if importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url[len("postgresql://") :]
        from adabudget.analysis.extras import require

        require("psycopg2", "postgres", "a postgresql:// storage")  # neither driver: MissingExtra
    return url


def hide_password(text: str) -> str:
    """``text`` with the password of every URL in it removed (``postgresql://u:p@h/db`` -> ``postgresql://u@h/db``)."""
    return _QUERY.sub(r"\1***", _LOGIN.sub(r"\1@", str(text)))


def _storage(path: str | Path, study: str | None):
    """An Optuna storage for ``path`` (and the study name a study folder implies)."""
    text = str(path)
    if text.startswith(("sqlite:", "postgresql", "mysql")):
        return _with_driver(text), study
    if text.startswith("grpc://"):  # adabudget search serve-storage
        from optuna.storages import GrpcStorageProxy

        host, _, port = text[len("grpc://") :].rstrip("/").rpartition(":")
        return GrpcStorageProxy(host=host, port=int(port)), study
    p = Path(path)
    if p.is_dir():
        meta = p / "search.json"
        if meta.exists():
            info = json.loads(meta.read_text())
            stored = info["storage"]
            if "://" not in stored and (p / Path(stored).name).is_file():
                stored = str(p / Path(stored).name)  # the study's journal, wherever the search ran
            return _storage(stored, study or info["study"])
        p = p / "journal.log"
    if not p.is_file():
        raise RecordError(f"{hide_password(path)}: not a journal file, study folder or database URL")
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(p))), study
