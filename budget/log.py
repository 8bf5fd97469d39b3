"""The run record: a self-describing folder, mirrored to W&B when asked.

    <run_dir>/config.yaml    resolved config (the dataclasses, after overrides)
    <run_dir>/metrics.jsonl  one JSON object per log / eval event
    <run_dir>/ranks.jsonl    step 0, then one per allocation: budget, kept, rank of every
                             module, and every triplet's score with its keep mask
    <run_dir>/result.json    status (running while the run lives, with host, pid and a
                             heartbeat), final and best metrics, params, the modules table,
                             time, memory, versions; ``record_version`` says how to read it

Files are the truth; W&B only mirrors them, and a W&B failure (no network, no login)
never fails or blocks a run. ``claim_run_dir`` is the one place run folders are named and
created: a folder belongs to one run, always.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import functools
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from adabudget.procs import CLAIM, claim, process_alive, start_ticks

log = logging.getLogger("adabudget")

# 2: status "running" with heartbeat, record_version, primary_metric, regression, data_version,
#    the modules table, a step-0 row and triplet scores in ranks.jsonl (1: the first release).
RECORD_VERSION = 2
LOCK = ".lock"  # flock-ed by the process running the run; says its host, pid and start time
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import: os.umask can only be read by setting it


def release_run_dir(path: Path) -> None:
    """Give back a folder ``claim_run_dir`` made for a run refused before it wrote anything:
    removed if it holds nothing but the claim marker (anything else is left alone)."""
    path = Path(path)
    (path / CLAIM).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        pass


def claim_run_dir(runs_root: str | Path, run_name: str, run_dir: str | Path | None = None) -> Path:
    """Create and return a run folder that no other run has or will have.

    Default: ``<runs_root>/<run_name>/<YYYY-mm-dd_HH-MM-SS>``, made with an exclusive mkdir
    and a ``_1``, ``_2``, ... suffix when another run (another process, a torchrun rank, a
    search worker) made that name first. An explicit ``run_dir`` must not exist yet or be
    empty (claimed through an exclusive marker file); one that holds anything is refused,
    so a record is never appended to or overwritten by another run.
    """
    from adabudget.config import ConfigError

    if run_dir is not None:
        path = Path(run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            pass
        if not path.is_dir() or any(p.name != CLAIM for p in path.iterdir()):
            raise ConfigError(
                f"run_dir={path}: already holds a run (a run folder belongs to one run); choose a new "
                f"run_dir, or continue that run with resume={path}"
            )
        if not claim(path / CLAIM):  # exists only while a process claims the explicit, empty folder
            raise ConfigError(
                f"run_dir={path}: another process is starting a run in it; choose a new run_dir"
            )
        return path
    parent = Path(runs_root) / run_name
    parent.mkdir(parents=True, exist_ok=True)
    base = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    for k in range(10_000):
        path = parent / (base if k == 0 else f"{base}_{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder name under {parent}")


def lock_run(run_dir: Path) -> int:
    """Lock ``run_dir`` for this process and return the open descriptor holding the lock (``unlock_run``
    gives it back; the kernel does when the process dies). The lock file says the holder's host, pid
    and start time.

    A live holder is refused, naming its pid; the lock of a process that died without giving it
    back (kill -9, a lost node) is taken over with a warning. Where the file system has no
    ``flock`` (some network file systems), the recorded host, pid and start time decide.
    """
    from adabudget.config import ConfigError

    path = Path(run_dir) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alive = False
        except BlockingIOError:
            alive = True
        except OSError:  # no flock on this file system: judge the recorded holder
            alive = _holder_alive(_holder(fd))
        holder = _holder(fd) or {}
        if alive:
            pid = holder.get("pid", "unknown")
            raise ConfigError(
                f"resume={run_dir}: the run is still alive: pid {pid} on {holder.get('host', 'unknown')} "
                f"(started {holder.get('started_at', 'unknown')}) holds {path}; stop it first (kill -TERM "
                f"{pid} checkpoints it), or, if that process is gone, delete {path}"
            )
        if holder:  # written, never given back: its process died
            log.warning(
                "%s: taking over the lock of pid %s on %s (started %s), which is gone",
                run_dir,
                holder.get("pid"),
                holder.get("host"),
                holder.get("started_at"),
            )
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": start_ticks(os.getpid()),
            "started_at": datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        return fd
    except BaseException:
        os.close(fd)
        raise


def unlock_run(fd: int) -> None:
    """Give back ``lock_run``'s lock: emptied (an empty lock file is a free one), then unlocked."""
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _holder(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else None
    except ValueError:
        return None


def _holder_alive(holder: dict | None) -> bool:
    """A holder on this host lives while its pid runs the same process (same start time); one on
    another host cannot be checked from here, so it counts as alive."""
    if not holder:
        return False
    pid = holder.get("pid", -1)
    return (
        process_alive({"host": holder.get("host"), "pid": pid, "start_ticks": holder.get("pid_start")})
        is not False
    )


def truncate_jsonl(path: Path, last_step: int, evals_at_last_step: bool = True) -> None:
    """Drop the lines written after ``last_step`` (a resumed run redoes those steps); with
    ``evals_at_last_step=False`` also the evaluation lines of ``last_step`` (the final phase of a
    run resumed at its last step evaluates again).

    A torn last line (a kill or a full disk during an append) is dropped, with the file as it
    was kept as ``<name>.bak``; an unreadable line before the last is refused, naming the line.
    """
    from adabudget.config import ConfigError

    if not path.exists():
        return
    lines = [(n, line) for n, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.strip()]
    rows, torn = [], None
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError:  # UnicodeDecodeError too: a write cut inside a character
            if i < len(lines) - 1:
                raise ConfigError(
                    f"{path}: line {n} is not a JSON object ({line[:60]!r}...), and {len(lines) - 1 - i} "
                    "lines follow it: the file is corrupt in the middle, not torn at its end; repair or "
                    "delete that line, then resume"
                ) from None
            torn = n
            continue
        rows.append((line, row))

    def keep(row: dict) -> bool:
        step = row.get("step", 0)
        return step < last_step or (
            step == last_step and (evals_at_last_step or row.get("split") in (None, "train"))
        )

    kept = [line for line, row in rows if keep(row)]
    if torn is None and len(kept) == len(lines):
        return
    if torn is not None:
        backup = path.with_name(path.name + ".bak")
        shutil.copyfile(path, backup)
        log.warning(
            "%s: its last line (%d) was cut mid-write (a kill or a full disk) and is dropped; the file as "
            "it was is kept in %s",
            path,
            torn,
            backup,
        )
    write_text_atomic(path, b"".join(line + b"\n" for line in kept))


def write_text_atomic(path: Path, text: str | bytes, fsync: bool = False) -> None:
    """Write via a uniquely named temporary file and a rename, so a crash never leaves half a file
    and two writers never truncate each other's temporary file; ``fsync``: durable before the rename."""
    path = Path(path)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_beside(path: Path) -> tuple[int, str]:
    """A new, uniquely named temporary file in ``path``'s folder (open descriptor, name), with the
    permissions an ordinary new file gets (``mkstemp`` makes it private to its owner)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)
    return fd, tmp


def fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (skipped where a folder cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write via a temp file and rename, so a crash never leaves half a file."""
    write_text_atomic(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(obj):
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


# What ``wandb_summary`` adds to the W&B summary of the runs recorded inside it (None: nothing)
_SUMMARY_ENTRIES: contextvars.ContextVar[Callable[[dict], dict] | None] = contextvars.ContextVar(
    "adabudget_wandb_summary", default=None
)


@contextlib.contextmanager
def wandb_summary(entries: Callable[[dict], dict]) -> Iterator[None]:
    """Let the caller of a run add to its W&B summary: a run recorded inside this block (its
    ``RunRecord`` opened here, in this thread) puts ``entries(result)`` there as well whenever it
    writes its result, ``result`` being the record ``result.json`` then holds (status, ``final``
    metrics, ``wall_time_s``, ...). ``entries`` returns ``{summary key: value}`` and leaves out
    what it cannot give (a failed run has no final metrics); it is not called for a run without a
    W&B mirror, and an error in it is a W&B error (the mirror stops, the run goes on).

    Example (a caller that labels its runs: a number, and an objective once the run has one)::

        def entries(result: dict) -> dict:
            dev = (result.get("final") or {}).get("dev") or {}
            objective = {"objective/dev.accuracy": dev["accuracy"]} if "accuracy" in dev else {}
            return {"trial/number": 3, **objective}

        with wandb_summary(entries):
            train(cfg)
    """
    token = _SUMMARY_ENTRIES.set(entries)
    try:
        yield
    finally:
        _SUMMARY_ENTRIES.reset(token)


class RunRecord:
    """Appends metrics and allocations to the run folder and the optional W&B mirror.

    Args:
        run_dir: the run's folder (``claim_run_dir``; a resumed run's own folder).
        config: the resolved config as a plain dict, written to ``config.yaml`` (also on
            resume: the resumed config may have changed the knobs that may change).
        logger_cfg: the ``logger`` section (W&B mirror).
        resume_step: on resume, the checkpoint's step: later lines are dropped.
        header: what ``result.json`` says while the run lives (``status: running``).
        final_again: the resumed run runs only its final phase again (its checkpoint is at the last
            step): the evaluation lines of ``resume_step`` are dropped too.

    The record holds the run folder's lock (``lock_run``) from here to ``close``: a second process
    resuming a live run is refused before it writes anything.
    """

    def __init__(
        self,
        run_dir: Path,
        config: dict,
        logger_cfg,
        resume_step: int | None = None,
        header: dict | None = None,
        final_again: bool = False,
    ):
        from adabudget.extras import require
        from omegaconf import OmegaConf

        if logger_cfg.wandb:  # asked for but not installed: said before the run folder is made
            require("wandb", "wandb", "logger.wandb=true (the W&B mirror)")
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.wandb = None
        self._summary_entries = _SUMMARY_ENTRIES.get()  # the caller's (``wandb_summary``)
        self._lock = lock_run(self.dir)
        try:
            resume = resume_step is not None
            if resume:
                for name in ("metrics.jsonl", "ranks.jsonl"):
                    truncate_jsonl(self.dir / name, resume_step, evals_at_last_step=not final_again)
            text = OmegaConf.to_yaml(OmegaConf.create(config))
            path = self.dir / "config.yaml"
            if not path.exists() or path.read_text() != text:  # unchanged: left as it is
                write_text_atomic(path, text, fsync=True)
        except BaseException:
            self._release()
            raise
        (self.dir / CLAIM).unlink(missing_ok=True)
        self.header = {
            "record_version": RECORD_VERSION,
            "status": "running",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": datetime.now().isoformat(timespec="seconds"),
            **(header or {}),
        }
        self.heartbeat(resume_step or 0)
        if logger_cfg.wandb:
            self.wandb = _init_wandb(self.dir, config, logger_cfg, resume_step)

    def heartbeat(self, step: int) -> None:
        """Refresh the live ``result.json``: a run whose heartbeat is old and whose pid is gone was killed."""
        write_json_atomic(
            self.dir / "result.json", {**self.header, "steps": step, "heartbeat_at": time.time()}
        )

    def _append(self, name: str, record: dict) -> None:
        line = (json.dumps(record, default=_jsonable) + "\n").encode()
        with open(self.dir / name, "a+b") as f:
            if f.tell() > 0:  # after a torn write (a full disk), start on a line of its own
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)

    def metrics(self, record: dict) -> None:
        self._append("metrics.jsonl", record)
        if self.wandb is not None:
            self._wandb_call(self.wandb.log, _wandb_metrics(record), step=record["step"])

    def ranks(self, record: dict) -> None:
        self._append("ranks.jsonl", record)
        if self.wandb is not None and record.get("step") != 0:  # the initial ranks: nothing to plot yet
            self._wandb_call(self.wandb.log, _wandb_ranks(record), step=record["step"])

    def result(self, result: dict) -> None:
        write_json_atomic(self.dir / "result.json", {**self.header, **result})
        if self.wandb is not None:
            self._wandb_call(self._wandb_summary, result)

    def _wandb_summary(self, result: dict) -> None:
        import wandb

        for key in ("status", "trainable_params", "trainable_params_final", "wall_time_s"):
            if key in result:
                self.wandb.summary[key] = result[key]
        for split, metrics in (result.get("final") or {}).items():
            for k, v in metrics.items():
                self.wandb.summary[f"final/{split}/{k}"] = v
        if self._summary_entries is not None:
            for key, value in self._summary_entries(result).items():
                self.wandb.summary[key] = value
        path = self.dir / "ranks.jsonl"
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if rows:
                modules = list(rows[-1]["ranks"])
                table = wandb.Table(columns=["step", "budget", "kept", *modules])
                for r in rows:
                    table.add_data(
                        r["step"], r["budget"], r["kept"], *[r["ranks"].get(m, 0) for m in modules]
                    )
                self.wandb.log({"rank_table": table})

    def _wandb_call(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as err:  # the mirror must never take the run down
            warnings.warn(f"W&B mirror disabled after an error: {err}", stacklevel=2)
            self.wandb = None

    def close(self) -> None:
        if self.wandb is not None:
            self._wandb_call(self.wandb.finish)
            self.wandb = None
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            unlock_run(self._lock)
            self._lock = None


def module_table(wrapped: dict, arch, plan) -> list[dict]:
    """The record's ``modules`` table: every rank-carrying module of ``wrapped`` ({name: module},
    what the methods added) with its block, matrix role, layer group and initial rank, so that
    analysis can place ranks without importing budget. ``arch``: ``adabudget.arch.Arch`` or None;
    ``plan``: the run's ``adabudget.methods.Plan``."""
    from adabudget.methods.adalora import SVDLinear
    from adabudget.methods.lora import LoRALinear
    from adabudget.modules import block_index

    roles = {name: spec.role for name, spec in arch.match_linears([".*"])} if arch is not None else {}
    rows = []
    for name, m in wrapped.items():
        if isinstance(m, SVDLinear):
            rank = m.r_initial
        elif isinstance(m, LoRALinear):
            rank = m.rank
        elif isinstance(getattr(m, "r", None), dict) and "default" in m.r:  # peft's layers: r[adapter]
            rank = m.r["default"]
        else:
            continue
        layer = block_index(name)
        group = next((g.index for g in plan.groups if g.layers is not None and layer in g.layers), 0)
        rows.append(
            {
                "name": name,
                "layer": layer,
                "role": roles.get(name, "other"),
                "group": group,
                "init_rank": rank,
            }
        )
    return rows


def group_ranks(ranks: dict[str, int], modules: list[dict], groups: list[dict] | None) -> dict:
    """``{"group_ranks": [kept rank of group 0, ...]}`` of an allocation's ranks (a hybrid's:
    which layer group the budget flows to), or {} for a run of fewer than two groups."""
    if not groups or len(groups) < 2:
        return {}
    group_of = {m["name"]: m["group"] for m in modules}
    totals = [0] * len(groups)
    for name, r in ranks.items():
        totals[group_of[name]] += r
    return {"group_ranks": totals}


def flat_config(config: dict, prefix: str = "") -> dict:
    """The config as W&B sees it: one entry per dotted key (``method.r``, ``train.lr``), the names
    Hydra overrides and W&B sweep parameters use, so a run started by a sweep agent (which sets
    ``method.r`` itself) and any other run agree. Lists stay values."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_config(value, name + "."))
        else:
            out[name] = value
    return out


def _wandb_metrics(record: dict) -> dict:
    """A metrics.jsonl line as W&B rows see it: ``train/loss``, ``dev/accuracy``, ..."""
    prefix = record.get("split", "train")
    return {f"{prefix}/{k}": v for k, v in record.items() if k not in ("step", "split")}


def _wandb_ranks(record: dict) -> dict:
    """A ranks.jsonl line as W&B rows see it: the budget and every module's rank."""
    return {
        "budget/scheduled": record["budget"],
        "budget/kept": record["kept"],
        **{f"rank/{k}": v for k, v in record["ranks"].items()},
    }


def _init_wandb(run_dir: Path, config: dict, logger_cfg, resume_step: int | None):
    """The W&B run mirroring ``run_dir``; on resume, one whose history ends at the checkpoint's step.

    A killed run logged past its last checkpoint; the resumed run logs those steps again, and W&B
    drops a step at or below the last one it has. So a resumed run's mirror is, in this order:
    the same W&B run rewound to the checkpoint's step (``resume_from``: a W&B server feature, in
    preview), a fork of it at that step (``fork_from``: a new run id), or, offline or where the
    server refuses both, a new W&B run into which the record (metrics.jsonl, ranks.jsonl, already
    cut at that step) is replayed before training goes on. ``wandb_id.txt`` names the run to
    sync; an earlier offline segment of a replayed run is left as it was.
    """
    # Offline unless the user chose otherwise (config or their environment). A run started by a
    # W&B sweep agent (WANDB_SWEEP_ID) reports to its sweep: offline, the sweep would never see it.
    agent = "online" if os.environ.get("WANDB_SWEEP_ID") else None
    mode = logger_cfg.mode or os.environ.get("WANDB_MODE") or agent or "offline"
    try:
        import wandb

        run_id_file = run_dir / "wandb_id.txt"
        previous = (
            run_id_file.read_text().strip() if resume_step is not None and run_id_file.exists() else None
        )
        common = dict(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            dir=str(run_dir),
            config=flat_config(config),
            mode=mode,
            tags=list(logger_cfg.tags) or None,
            group=logger_cfg.group,
            name=f"{run_dir.parent.name}/{run_dir.name}",
            settings=wandb.Settings(init_timeout=30, silent=True),
        )
        run = None
        if previous and mode == "online":
            # W&B keeps the history up to and including the step given, then logs from the next one
            for how in ("resume_from", "fork_from"):
                try:
                    run = wandb.init(**common, **{how: f"{previous}?_step={resume_step}"})
                    break
                except Exception as err:  # a server without the feature (rewind is a preview)
                    warnings.warn(f"W&B {how} refused ({err})", stacklevel=2)
        if run is None:
            run = wandb.init(**common)
            if previous:
                _replay(run, run_dir, previous, resume_step)
        run_id_file.write_text(run.id)
        return run
    except Exception as err:
        warnings.warn(
            f"W&B mirror not started ({err}); the run folder still records everything", stacklevel=2
        )
        return None


def _replay(run, run_dir: Path, previous: str, resume_step: int) -> None:
    """Log the record up to ``resume_step`` into the new W&B run ``run``, in step order, so that it
    alone holds the run's whole history (the steps after it follow as training goes on)."""
    rows = []
    for name, row in (("metrics.jsonl", _wandb_metrics), ("ranks.jsonl", _wandb_ranks)):
        path = run_dir / name
        lines = path.read_text().splitlines() if path.exists() else []
        for record in map(json.loads, filter(str.strip, lines)):
            if name == "metrics.jsonl" or record.get("step") != 0:
                rows.append((record["step"], row(record)))
    for step, data in sorted(rows, key=lambda r: r[0]):  # stable: a step's rows in file order
        run.log(data, step=step)
    run.config.update({"mirror.replaces": previous, "mirror.replayed_to_step": resume_step})


def environment() -> dict:
    """Package versions and the git commit, for result.json."""
    import torch
    import transformers
    from adabudget.version import __version__

    versions = {
        "python": platform.python_version(),
        "adabudget": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for name in ("peft", "optuna", "hydra", "wandb"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "__version__"):
            versions[name] = mod.__version__
    return {"versions": versions, "git_commit": git_commit()}


@functools.cache  # the checkout's commit when this process first asks, near when it loaded the code:
# a long-lived process (a reproduce or search worker) runs the code it imported, not later commits
def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
