"""``adabudget bench storage``: what a study's storage costs per trial with N workers, and that no
trial is lost or counted twice, on a journal file, PostgreSQL and the gRPC proxy in front of it.

    adabudget bench storage --postgresql postgresql://postgres@127.0.0.1:5432/bench --workers 1,4,16,32

Each worker runs the search's own loop (``search.workers``: the start lock, ``recover_stale``,
the count, ``ask``, the trial's heartbeat and ``tell``) on a trivial objective (one
``suggest_float``, no training), so the figures are the storage's and the lock's alone. Per
storage and N: trials per second (all workers started, to the last one done), milliseconds per
trial inside storage calls (every call, the heartbeat's included, summed over the workers) and
waiting for the start lock, and the counts: the trials stored complete against ``--trials``
(extra: started beyond n_trials; lost: missing), and trial numbers told by two workers. Figures
and the machine they came from: docs/results/storage.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path

STORAGES = ("journal", "postgresql", "grpc")


class Timed:
    """A storage whose every call is timed (seconds and calls, summed; thread-safe: the heartbeat
    thread calls it too). Optuna takes any object with the storage API."""

    def __init__(self, storage):
        self._inner = storage
        self.seconds, self.calls = 0.0, 0
        self._mutex = threading.Lock()

    def __getattr__(self, name):
        value = getattr(self._inner, name)
        if not callable(value) or name.startswith("_"):
            return value

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return value(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                with self._mutex:
                    self.seconds += spent
                    self.calls += 1

        return timed


def _setup(study: str, storage: str, root: Path, n_trials: int, workers: int):
    from adabudget.search.config import SearchConfig
    from adabudget.search.trial import Setup

    scfg = SearchConfig(study=study, n_trials=n_trials, workers=workers, storage=storage, enqueue=[])
    return Setup({}, asdict(scfg), study, storage, str(root / study), "accuracy", False, 2)


def _worker(setup, index: int, barrier, results) -> None:
    """One worker: the search's loop (``search.workers.worker_loop``) around a trivial objective."""
    import optuna
    from adabudget.search.study import make_storage
    from adabudget.search.workers import StartLock, counts, recover_stale, run_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = Timed(make_storage(setup))
    study = optuna.load_study(
        study_name=setup.study, storage=storage, sampler=optuna.samplers.RandomSampler(seed=index)
    )
    lock = StartLock(setup)

    def objective(trial):
        lock.release()  # the trial exists and is owned (run_trial's Beat wrote its worker)
        return trial.suggest_float("x", 0.0, 1.0)

    told, waited = [], 0.0
    barrier.wait()
    try:
        while True:
            start = time.perf_counter()
            lock.acquire()
            waited += time.perf_counter() - start
            try:
                recover_stale(study, setup)
                done, running, _ = counts(study)
                if done + running >= setup.scfg.n_trials:
                    break
                trial = study.ask()
                outcome, _ = run_trial(study, trial, objective, interval=10.0)
            finally:
                lock.release()
            if outcome == "complete":
                told.append(trial.number)
    finally:
        lock.close()
    ended = time.time()
    results.put(
        {"index": index, "told": told, "seconds": storage.seconds, "calls": storage.calls, "lock": waited}
        | {"ended": ended}
    )


def run_cell(kind: str, url: str, workers: int, trials: int, root: Path) -> dict:
    """One storage at one N: the study made fresh, N workers to ``trials`` trials, the counts."""
    import optuna
    from adabudget.search.study import make_storage
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_name = f"bench-{kind}-{workers}-{uuid.uuid4().hex[:6]}"
    direct = str(root / f"{study_name}.log") if kind == "journal" else url
    setup = _setup(study_name, direct, root, trials, workers)
    optuna.create_study(study_name=study_name, storage=make_storage(setup))  # never through gRPC here
    if kind == "grpc":
        setup = _setup(study_name, GRPC_URL["url"], root, trials, workers)
    ctx = multiprocessing.get_context("fork")  # this process holds no gRPC channel: forking is safe
    barrier, results = ctx.Barrier(workers + 1), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(setup, i, barrier, results)) for i in range(workers)]
    for p in procs:
        p.start()
    barrier.wait(timeout=600)
    start = time.time()
    reports = []
    while len(reports) < workers:  # a worker that died (too many database clients) reports nothing
        try:
            reports.append(results.get(timeout=2))
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break
    for p in procs:
        p.join()
    if not reports:
        raise RuntimeError(
            f"{kind} with {workers} workers: every worker died, exit codes {[p.exitcode for p in procs]}"
        )
    wall = max(r["ended"] for r in reports) - start
    stored = optuna.load_study(
        study_name=study_name, storage=make_storage(_setup(study_name, direct, root, trials, workers))
    ).get_trials(deepcopy=False)
    complete = {t.number for t in stored if t.state == TrialState.COMPLETE}
    told = [n for r in reports for n in r["told"]]
    return {
        "storage": kind,
        "workers": workers,
        "trials": trials,
        "wall_s": wall,
        "trials_per_s": len(complete) / wall if wall > 0 else float("nan"),
        "storage_ms_per_trial": 1000 * sum(r["seconds"] for r in reports) / max(1, len(complete)),
        "calls_per_trial": sum(r["calls"] for r in reports) / max(1, len(complete)),
        "lock_wait_ms_per_trial": 1000 * sum(r["lock"] for r in reports) / max(1, len(complete)),
        "complete": len(complete),
        "extra": max(0, len(complete) - trials),
        "lost": max(0, trials - len(complete)),
        "told_twice": len(told) - len(set(told)),
        "told_not_stored": len(set(told) - complete),
        "not_finished": sum(not t.state.is_finished() for t in stored),
        "exit_codes": [p.exitcode for p in procs if p.exitcode],
    }


GRPC_URL = {"url": None}  # the proxy this benchmark started (one for every N)


def start_proxy(url: str) -> subprocess.Popen:
    """``adabudget search serve-storage`` in front of ``url``, on a free local port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "adabudget.cli", "search", "serve-storage", url, "--port", str(port)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ)
    )
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"serve-storage did not start: {line}{proc.stdout.read()[-2000:]}")
    GRPC_URL["url"] = f"grpc://localhost:{port}"
    return proc


def table(rows: list[dict]) -> str:
    head = (
        "| storage | N | trials | trials/s | storage ms/trial | calls/trial | lock wait ms/trial | "
        "complete | extra | lost | told twice |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    return head + "".join(
        f"| {r['storage']} | {r['workers']} | {r['trials']} | {r['trials_per_s']:.1f} | "
        f"{r['storage_ms_per_trial']:.1f} | {r['calls_per_trial']:.1f} | {r['lock_wait_ms_per_trial']:.1f} | "
        f"{r['complete']} | {r['extra']} | {r['lost']} | {r['told_twice']} |\n"
        for r in rows
    )


def machine() -> str:
    load = os.getloadavg()[0]
    return (
        f"{platform.node()}: {os.cpu_count()} CPU cores, load average {load:.1f} at the start, "
        f"{platform.machine()}"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="adabudget bench storage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,4,16,32", help="worker counts, comma-separated")
    parser.add_argument("--trials", type=int, default=200, help="n_trials of every study")
    parser.add_argument("--storages", default=",".join(STORAGES), help=f"some of {','.join(STORAGES)}")
    parser.add_argument(
        "--postgresql", help="a database URL (postgresql://user@host:port/db); postgresql and grpc need it"
    )
    parser.add_argument("--dir", help="where journal files go (default: a temporary folder)")
    parser.add_argument("--json", help="write the rows here too")
    a = parser.parse_args(argv)
    kinds = [k for k in a.storages.split(",") if k]
    unknown = sorted(set(kinds) - set(STORAGES))
    if unknown:
        parser.error(f"--storages: unknown {unknown}; use some of {STORAGES}")
    if {"postgresql", "grpc"} & set(kinds) and not a.postgresql:
        parser.error("--postgresql URL is needed for the postgresql and grpc storages")
    from adabudget.search.storage import database_url

    url = database_url(a.postgresql) if a.postgresql else None  # psycopg2 named, as the search does
    root = Path(a.dir or tempfile.mkdtemp(prefix="adabudget-bench-storage-"))
    root.mkdir(parents=True, exist_ok=True)
    print(machine(), flush=True)
    rows, proxy = [], None
    try:
        for kind in kinds:
            if kind == "grpc":
                proxy = start_proxy(a.postgresql)
            for n in [int(w) for w in a.workers.split(",")]:
                row = run_cell(kind, url, n, a.trials, root)
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(timeout=30)
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
