"""``adabudget reproduce PROTOCOL``: run the missing cells of a paper table, then write the table.

    adabudget reproduce minilm-budget                  # 12 rows x 4 tasks x 3 seeds, then the table
    adabudget reproduce minilm-budget --variant cpu --workers 2

A protocol is ``configs/reproduce/<name>.yaml``: rows (a label and the overrides of a method at a
budget) x tasks x seeds, the overrides of every cell (``base``), the table layout and named
variants. Where cells live, claims and failures: docs/analysis.md.

A row may give a learning-rate grid (``lr: [5e-4, 1e-3]``: a cell per rate, ``adabudget table``
keeps each row's rate with the best mean dev over seeds per task) and a ``level`` (a name of the
protocol's ``levels``, in trainable parameters: the table flags a row more than 2% away from it).
``--dry-run`` lists the cells and estimates the time from the finished ones; a run prints its
progress and the same estimate as it goes.

Invariants: a cell that holds a completed run is skipped and one with a checkpoint resumed, so the
command resumes after any stop; a cell is run by one worker at a time (an exclusive claim file, taken
over only when its worker's pid is gone from this host); a failed cell is left missing, never filled
in, and makes the command exit 1.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from adabudget.config import ConfigError
from adabudget.procs import CLAIM, claim
from adabudget.search import devices
from adabudget.search.trial import SearchInterrupted


@dataclass
class Protocol:
    name: str
    rows: list[dict]  # {label, overrides}
    tasks: dict[str, list[str]]  # task name -> overrides
    seeds: list[int]
    base: list[str] = field(default_factory=list)
    layout: str | None = None
    description: str = ""
    variant: str | None = None
    levels: dict[str, int] = field(default_factory=dict)  # level name -> trainable adapter parameters
    # each row's place in the protocol file (``select`` keeps them; None: the rows are all there)
    places: list[int] | None = None


def protocol_dir() -> Path:
    from adabudget.compose import config_dir

    return Path(config_dir()) / "reproduce"


def load_protocol(name: str, variant: str | None = None) -> Protocol:
    """Read ``configs/reproduce/<name>.yaml`` (or a path); a variant overrides seeds, tasks, rows
    or adds overrides to every cell."""
    import yaml

    path = Path(name) if name.endswith((".yaml", ".yml")) else protocol_dir() / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in protocol_dir().glob("*.yaml"))
        raise ConfigError(f"reproduce {name}: no protocol {path}; known protocols: {known}")
    spec = yaml.safe_load(path.read_text()) or {}
    variants = spec.pop("variants", {}) or {}
    named_tasks = set(spec.get("tasks") or {})  # a row may name these even where a variant drops some
    if variant is not None:
        if variant not in variants:
            raise ConfigError(f"--variant {variant}: protocol {path.stem} has variants {sorted(variants)}")
        chosen = variants[variant]
        named_tasks |= set(chosen.get("tasks") or {})
        spec["base"] = list(spec.get("base", [])) + list(chosen.get("overrides", []))
        for key in ("seeds", "tasks", "rows"):
            if key in chosen:
                spec[key] = (
                    chosen[key]
                    if key != "rows"
                    else [r for r in spec["rows"] if r["label"] in chosen["rows"]]
                )
        if "lr" in chosen:  # the variant's grid replaces every row's grid
            spec["rows"] = [{**r, "lr": chosen["lr"]} if "lr" in r else r for r in spec["rows"]]
    unknown = sorted(set(spec) - {"name", "description", "base", "rows", "tasks", "seeds", "table", "levels"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {unknown}; a protocol has name, description, base, rows, "
            "tasks, seeds, levels, table, variants"
        )
    rows = spec.get("rows") or []
    if not rows or not all(isinstance(r, dict) and "label" in r for r in rows):
        raise ConfigError(f"{path}: rows must be a list of {{label, overrides}}")
    levels = spec.get("levels") or {}
    if not isinstance(levels, dict) or not all(isinstance(v, int) and v > 0 for v in levels.values()):
        raise ConfigError(
            f"{path}: levels must map a name to a positive parameter count, e.g. {{1.2M: 165888}}"
        )
    for r in rows:
        _check_row(path, r, levels, named_tasks)
    return Protocol(
        name=spec.get("name", path.stem),
        rows=rows,
        tasks=dict(spec.get("tasks") or {}),
        seeds=[int(s) for s in spec.get("seeds") or [42]],
        base=list(spec.get("base") or []),
        layout=(spec.get("table") or {}).get("layout"),
        description=spec.get("description", ""),
        variant=variant,
        levels={str(k): int(v) for k, v in levels.items()},
    )


def _check_row(path: Path, row: dict, levels: dict, tasks: set) -> None:
    """A row's ``level`` names one of ``levels``; its ``lr`` grid is a list of distinct positive rates;
    its ``tasks`` (when given: the row runs on those only) name tasks of the protocol."""
    unknown = sorted(set(row) - {"label", "overrides", "level", "lr", "tasks"})
    if unknown:
        raise ConfigError(
            f"{path}: row '{row['label']}': unknown key(s) {unknown}; a row has label, overrides, level, "
            "lr, tasks"
        )
    if "tasks" in row:
        named = row["tasks"]
        if not isinstance(named, list) or not named or not all(isinstance(t, str) for t in named):
            raise ConfigError(
                f"{path}: row '{row['label']}': tasks must be a list of task names, got {named!r}"
            )
        stray = [t for t in named if t not in tasks]
        if stray:
            raise ConfigError(
                f"{path}: row '{row['label']}': tasks {stray} are not tasks of the protocol "
                f"{sorted(tasks)}; name those, or drop the row's tasks to run it on all of them"
            )
    if "level" in row and str(row["level"]) not in levels:
        raise ConfigError(
            f"{path}: row '{row['label']}': level {row['level']!r} is not one of levels {sorted(levels)}; "
            "add it to the protocol's levels (in trainable parameters)"
        )
    grid = row.get("lr")
    if grid is not None:
        try:  # YAML reads 2e-4 (no dot) as a string
            rates = [float(x) for x in grid] if isinstance(grid, list) else []
        except (TypeError, ValueError):
            rates = []
        if not rates or not all(x > 0 for x in rates) or len(set(rates)) != len(rates):
            raise ConfigError(
                f"{path}: row '{row['label']}': lr must be a list of distinct positive learning rates, "
                f"got {grid!r}"
            )
        row["lr"] = rates
        if any(str(o).split("=", 1)[0].lstrip("+") == "train.lr" for o in row.get("overrides", [])):
            raise ConfigError(
                f"{path}: row '{row['label']}': give train.lr in its overrides or an lr grid, not both"
            )


@dataclass
class Cell:
    label: str
    task: str
    seed: int
    overrides: list[str]
    folder: str  # <root>/<row>/<task>[/lr<lr>]/s<seed>: the cell's runs (timestamped) and its claim
    row: int = 0  # the row's place in the protocol (the table keeps that order)
    lr: float | None = None  # one rate of the row's grid (None: the row has no grid)
    level: str | None = None  # the row's level name (protocol.levels)


def select(protocol: Protocol, rows: list[str] | None = None, tasks: list[str] | None = None) -> Protocol:
    """The protocol with only the rows whose label matches one of ``rows`` (shell patterns:
    ``"GeoLoRA*"``) and only the ``tasks`` named; None keeps all. The cells keep their folders, so
    a selection runs (and resumes) part of the same table. Refused, naming the known ones, when a
    pattern matches no row or a task is not the protocol's."""
    import dataclasses
    from fnmatch import fnmatchcase

    chosen_rows, chosen_tasks = protocol.rows, protocol.tasks
    if rows:
        for pattern in rows:
            if not any(fnmatchcase(r["label"], pattern) for r in protocol.rows):
                raise ConfigError(
                    f"--rows {pattern}: no row of {protocol.name} matches; its rows: "
                    f"{[r['label'] for r in protocol.rows]}"
                )
        places = [i for i, r in enumerate(protocol.rows) if any(fnmatchcase(r["label"], p) for p in rows)]
        chosen_rows = [protocol.rows[i] for i in places]
        protocol = dataclasses.replace(
            protocol, places=[(protocol.places or range(len(protocol.rows)))[i] for i in places]
        )
    if tasks:
        unknown = [t for t in tasks if t not in protocol.tasks]
        if unknown:
            raise ConfigError(
                f"--tasks {unknown[0]}: not a task of {protocol.name}; its tasks: {list(protocol.tasks)}"
            )
        chosen_tasks = {t: o for t, o in protocol.tasks.items() if t in tasks}
    return dataclasses.replace(protocol, rows=chosen_rows, tasks=chosen_tasks)


def cells(protocol: Protocol, root: Path) -> list[Cell]:
    out = []
    for index, row in zip(protocol.places or range(len(protocol.rows)), protocol.rows):
        for task, task_overrides in protocol.tasks.items():
            if task not in row.get("tasks", protocol.tasks):
                continue
            for lr in row.get("lr") or [None]:
                for seed in protocol.seeds:
                    folder = root / _slug(row["label"]) / task
                    folder = (folder / f"lr{lr:g}" if lr is not None else folder) / f"s{seed}"
                    overrides = [*protocol.base, *task_overrides, *row.get("overrides", [])]
                    overrides += [f"train.lr={lr:g}"] if lr is not None else []
                    level = str(row["level"]) if "level" in row else None
                    cell = Cell(
                        row["label"], task, seed, overrides + [f"train.seed={seed}"], str(folder), index
                    )
                    cell.lr, cell.level = lr, level
                    out.append(cell)
    return out


def _name(cell: Cell) -> str:
    lr = f" | lr {cell.lr:g}" if cell.lr is not None else ""
    return f"{cell.label} | {cell.task}{lr} | seed {cell.seed}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text).strip("_")


def cell_state(cell: Cell) -> tuple[str, Path | None]:
    """``done`` (a completed run), ``resume`` (a checkpointed one) or ``new``."""
    for result in sorted(Path(cell.folder).glob("*/result.json"), reverse=True):
        status = json.loads(result.read_text()).get("status")
        if status == "completed":
            return "done", result.parent
        if status != "completed" and (result.parent / "checkpoints" / "last.pt").exists():
            return "resume", result.parent
    return "new", None


def compose_cell(cell: Cell, protocol: Protocol, runs_root: str):
    from adabudget.compose import compose
    from omegaconf import OmegaConf, open_dict

    cfg = compose(cell.overrides)
    with open_dict(cfg):
        cfg.runs_root = str(Path(cell.folder).parent)
        cfg.run_name = Path(cell.folder).name
        cfg.train.progress = False
        cfg.meta = OmegaConf.create(
            {
                "label": cell.label,
                "row": cell.row,
                "protocol": protocol.name,
                "variant": protocol.variant,
                "task": cell.task,
                "seed": cell.seed,
                "lr": cell.lr,
                "level": cell.level,
                "level_params": protocol.levels.get(cell.level) if cell.level else None,
            }
        )
    return cfg


def check(protocol: Protocol, runs_root: str) -> None:
    """Compose and validate every distinct configuration before any cell runs."""
    from adabudget.compose import resolve
    from adabudget.config import validate

    seen = set()
    for cell in cells(protocol, Path(runs_root)):
        key = (cell.label, cell.task)
        if key in seen:
            continue
        seen.add(key)
        try:
            validate(resolve(compose_cell(cell, protocol, runs_root)))
        except Exception as err:  # Hydra's composition errors too: name the cell
            raise ConfigError(f"reproduce {protocol.name}: row '{cell.label}' on {cell.task}: {err}") from err


def _wall_time(run_dir: Path) -> float | None:
    try:
        return float(json.loads((run_dir / "result.json").read_text())["wall_time_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def estimate(protocol: Protocol, root: Path, workers: int = 1) -> tuple[float | None, int, int, int]:
    """(seconds left, finished cells it rests on, cells done, cells in all). A cell to run is
    estimated by the mean wall time of the finished cells of its row and task, else of its task,
    else of all; the sum is shared by ``workers``. None when no cell has finished yet."""
    done: list[tuple[Cell, float]] = []
    todo: list[Cell] = []
    every = cells(protocol, root)
    for c in every:
        state, run_dir = cell_state(c)
        wall = _wall_time(run_dir) if state == "done" else None
        if state == "done" and wall is not None:
            done.append((c, wall))
        elif state != "done":
            todo.append(c)
    n_done = len(every) - len(todo)
    if not done:
        return (None if todo else 0.0), 0, n_done, len(every)

    def mean_of(pred) -> float | None:
        walls = [w for c, w in done if pred(c)]
        return sum(walls) / len(walls) if walls else None

    overall = mean_of(lambda c: True)
    total = 0.0
    for c in todo:
        guess = mean_of(lambda d, c=c: (d.label, d.task) == (c.label, c.task))
        guess = guess if guess is not None else mean_of(lambda d, c=c: d.task == c.task)
        total += guess if guess is not None else overall
    return total / max(1, min(workers, len(todo) or 1)), len(done), n_done, len(every)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown (no finished cell yet)"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def dry_run(
    name: str,
    variant: str | None = None,
    runs_root: str = "runs",
    workers: int = 1,
    log=print,
    rows: list[str] | None = None,
    tasks: list[str] | None = None,
) -> int:
    """``adabudget reproduce --dry-run``: every cell with its state (done, resume, new), the counts
    and the time left from the finished cells, without running or validating anything (``rows``,
    ``tasks``: a ``select``ion). Returns the number of cells to run."""
    protocol = select(load_protocol(name, variant), rows, tasks)
    root = Path(runs_root) / "reproduce" / (protocol.name + (f"-{variant}" if variant else ""))
    all_cells = cells(protocol, root)
    states = [cell_state(c)[0] for c in all_cells]
    for c, state in zip(all_cells, states):
        lr = f" | lr {c.lr:g}" if c.lr is not None else ""
        log(f"  {c.label} | {c.task}{lr} | seed {c.seed}: {state}")
    left, basis, n_done, total = estimate(protocol, root, workers)
    todo = total - n_done
    log(
        f"reproduce {protocol.name}{f' ({variant})' if variant else ''} in {root}: {total} cells, "
        f"{n_done} done, {states.count('resume')} to resume, {states.count('new')} new"
    )
    log(
        f"time left at {workers} worker(s): {duration(left)}"
        + (f" (from {basis} finished cell(s) of this protocol)" if basis else "")
    )
    return todo


class Progress:
    """Cells done out of all and the time left (``estimate``), counted from the cells' folders, so
    it is right with any number of workers and after a resume: a bar on a terminal, a line each."""

    def __init__(self, protocol: Protocol, root: Path, workers: int):
        import sys

        from tqdm.auto import tqdm

        self.protocol, self.root, self.workers = protocol, root, workers
        _, _, done, total = estimate(protocol, root, workers)
        self.done = done
        on_terminal = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=done, desc=protocol.name, unit="cell", disable=not on_terminal)

    def update(self) -> str:
        left, _, self.done, total = estimate(self.protocol, self.root, self.workers)
        self.bar.n = self.done
        self.bar.set_postfix_str(f"~{duration(left)} left", refresh=True)
        return f"[{self.done}/{total} cells done, ~{duration(left)} left]"

    def close(self) -> None:
        self.bar.close()


def _claim(cell: Cell) -> bool:
    """Take the cell for this process (``adabudget.procs.claim``: an exclusive file; a dead worker's
    claim is taken over)."""
    path = Path(cell.folder) / CLAIM
    path.parent.mkdir(parents=True, exist_ok=True)
    return claim(path)


def run_cells(
    protocol: Protocol,
    runs_root: str,
    threads: int | None = None,
    log=print,
    progress: Progress | None = None,
) -> int:
    """Run every cell that is not done (this process's share of them); returns how many ran.
    ``progress``: ends each cell's line with the cells done and the time left."""
    import torch
    from adabudget.compose import resume_config
    from adabudget.training import train

    if threads:
        torch.set_num_threads(threads)
    ran = 0
    for cell in cells(protocol, Path(runs_root)):
        state, run_dir = cell_state(cell)
        if state == "done" or not _claim(cell):
            continue
        try:
            state, run_dir = cell_state(cell)  # another worker may have finished it meanwhile
            if state == "done":
                continue
            try:
                if state == "resume":
                    result = train(
                        resume_config(run_dir, [f"train.num_threads={threads}"] if threads else [])
                    )
                else:
                    cfg = compose_cell(cell, protocol, runs_root)
                    if threads:
                        cfg.train.num_threads = threads
                    result = train(cfg)
            except Exception as err:  # one bad cell (out of memory, a disk error) never stops the rest
                ran += 1
                traceback.print_exception(type(err), err, err.__traceback__)
                log(
                    f"{_name(cell)}: failed ({type(err).__name__}: {err}); "
                    "the other cells go on, the same command retries it"
                )
                continue
            ran += 1
            metric = result.get("primary_metric", "accuracy")
            dev = (result.get("final") or {}).get("dev", {}).get(metric)
            log(
                f"{_name(cell)}: {result['status']}"
                + (f" dev {metric}={dev:.4f}" if dev is not None else "")
                + f" ({result['wall_time_s']:.0f} s)"
                + (f" {progress.update()}" if progress is not None else "")
            )
            if result["status"] == "interrupted":  # a stop signal means stop, not "the next cell"
                cause = result.get("interrupted_by") or "a stop signal"
                log(f"{cause}: the cell checkpointed; the same command resumes it and runs the rest")
                raise SearchInterrupted(cause)
        finally:
            (Path(cell.folder) / CLAIM).unlink(missing_ok=True)
    return ran


@contextlib.contextmanager
def _forwarding_stop_signals(procs: list):
    """While the workers run, a SIGTERM or SIGINT to this process goes to each of them (each
    checkpoints its cell and stops); the previous handlers come back after."""

    def forward(signum, frame):
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _worker(protocol: Protocol, runs_root: str, threads: int) -> None:
    try:
        run_cells(protocol, runs_root, threads)
    except SearchInterrupted as err:  # the exit code tells the parent which signal stopped it
        raise SystemExit(err.code) from None


def reproduce(
    name: str,
    variant: str | None = None,
    workers: int = 1,
    runs_root: str = "runs",
    threads: int | None = None,
    gpus=None,
    gpus_per_cell=None,
    rows: list[str] | None = None,
    tasks: list[str] | None = None,
) -> tuple[Path, Protocol, int]:
    """Run the missing cells with ``workers`` processes, each on its own GPUs (``gpus``: indices
    among the visible GPUs, default all; ``gpus_per_cell``: an integer or 1/k, see
    ``search.devices``); ``rows`` / ``tasks``: only those cells (``select``). Returns the protocol's
    folder, the protocol and how many of the selected cells are still missing (the table is
    ``analysis.tables``' job)."""
    protocol = select(load_protocol(name, variant), rows, tasks)
    root = Path(runs_root) / "reproduce" / (protocol.name + (f"-{variant}" if variant else ""))
    check(protocol, str(root))
    visible = devices.visible_gpus()
    assignment = devices.assign(workers, gpus_per_cell, gpus, devices.REPRODUCE, visible)
    todo = [c for c in cells(protocol, root) if cell_state(c)[0] != "done"]
    total = len(cells(protocol, root))
    left = estimate(protocol, root, workers)[0]
    print(
        f"reproduce {protocol.name}{f' ({variant})' if variant else ''}: {total} cells, {total - len(todo)} "
        f"done, {len(todo)} to run, {workers} worker(s)"
        + (f", ~{duration(left)} left" if todo and left else "")
    )
    if devices.describe(assignment):
        print(devices.describe(assignment))
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    progress = Progress(protocol, root, workers) if todo else None
    try:
        if todo and workers == 1:
            with devices.in_this_process(assignment[0], visible, devices.REPRODUCE[2]):
                run_cells(protocol, str(root), threads, progress=progress)
        elif todo:
            _run_workers(protocol, root, workers, threads, assignment, progress)
    finally:
        if progress is not None:
            progress.close()
    missing = [c for c in cells(protocol, root) if cell_state(c)[0] != "done"]
    if missing:
        print(
            f"{len(missing)} cell(s) did not complete (e.g. {_name(missing[0])}); "
            "run the command again to retry them"
        )
    return root, protocol, len(missing)


def _run_workers(
    protocol: Protocol, root: Path, workers: int, threads: int, assignment, progress: Progress
) -> None:
    """``workers`` spawned processes take the cells in turn; this one prints the progress as cells
    finish (polled from the cells' folders every 10 s)."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(protocol, str(root), threads)) for _ in range(workers)]
    for p, own in zip(procs, assignment):
        with devices.environ(devices.worker_env(own)):  # the spawned interpreter inherits it
            p.start()
        time.sleep(0.2)  # stagger the first claims
    with _forwarding_stop_signals(procs):
        seen = progress.done
        while alive := [p for p in procs if p.is_alive()]:
            alive[0].join(timeout=10)
            line = progress.update()
            if progress.done != seen:
                seen = progress.done
                print(line, flush=True)
    codes = [p.exitcode for p in procs if p.exitcode in (130, 143)]
    if codes:  # a worker was stopped by a signal: so is the protocol (the same command resumes)
        raise SearchInterrupted("SIGTERM" if 143 in codes else "SIGINT")
