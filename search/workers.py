"""Workers: processes that run trials of one study, on one machine or many, until the study
holds ``search.n_trials`` trained trials, not one more.

Each worker loops: take the study's start lock, recover the trials of dead workers, count the
trained and running trials, and if more are wanted start one (``study.optimize(n_trials=1)``);
the trial releases the lock as soon as it exists. So every start decision sees every other
worker's running trials and the study ends with exactly ``n_trials``. The lock is a file lock
beside a journal file (processes on one machine) or a PostgreSQL advisory lock (machines
sharing a database).

A worker killed mid-trial (``kill -9``, a lost machine) leaves its trial RUNNING. On a
database, Optuna's heartbeats fail it after ``search.grace_period`` and re-queue it with the
same parameters (``RetryHeartbeatStaleTrialCallback``). A journal file has no heartbeats, so
``recover_stale`` does it: a RUNNING trial whose worker (host and pid, in its user attributes)
is gone from this host, or another host's whose run record's heartbeat is older than the grace
period, is failed and re-queued (at most ``search.max_retries`` times). A re-run trial says
``retry_of: <number>``; a failed one is never counted, so no trial is lost or counted twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from budget.config import ConfigError
from search.space import get_space
from search.study import (
    STOP,
    SearchInterrupted,
    Setup,
    finished,
    make_context,
    make_objective,
    make_sampler,
    open_study,
    stop_if_requested,
)

HOST = socket.gethostname()
log = logging.getLogger("adabudget.search")
MAX_CONSECUTIVE_FAILURES = 5


class StartLock:
    """The study's start lock: ``acquire`` blocks; ``release`` may be called more than once."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.held = False
        self._file = None
        self._conn = None
        self.key = int(hashlib.sha256(setup.study.encode()).hexdigest()[:15], 16)  # a bigint for PostgreSQL

    def acquire(self) -> None:
        if self.setup.storage.startswith("postgresql"):
            from sqlalchemy import create_engine, text

            if self._conn is None:
                self._conn = create_engine(self.setup.storage, poolclass=None).connect()
            self._conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        else:
            path = Path(self.setup.root) / ".start.lock"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a+")
            fcntl.flock(self._file, fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        if self._conn is not None:
            from sqlalchemy import text

            self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            self._conn.commit()
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        self.held = False

    def close(self) -> None:
        self.release()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process of that pid
        return True
    return True


def heartbeat_age(trial) -> float:
    """Seconds since the trial's run last wrote its heartbeat (or since the trial started)."""
    run_dir = trial.user_attrs.get("run_dir")
    if run_dir and (Path(run_dir) / "result.json").exists():
        try:
            beat = json.loads((Path(run_dir) / "result.json").read_text()).get("heartbeat_at")
            if beat:
                return time.time() - beat
        except (OSError, ValueError):
            pass
    start = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
    return time.time() - start


def recover_stale(study: optuna.Study, setup: Setup) -> list[int]:
    """Fail the RUNNING trials whose worker died and re-queue them with the same parameters.

    On this host the worker's pid decides, however long its run goes without a heartbeat (a live
    trial failed here was trained twice, and its worker crashed telling it). Another host's trial
    is stale after ``search.grace_period`` without a heartbeat in its run record; on a database
    that is Optuna's heartbeat, so those are left to it."""
    grace = setup.scfg.grace_period
    heartbeats = setup.storage.startswith(("postgresql", "mysql"))  # make_storage turns them on
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        gone = worker.get("host") == HOST and not pid_alive(int(worker.get("pid", -1)))
        if not gone and (worker.get("host") == HOST or heartbeats or heartbeat_age(t) <= grace):
            continue
        why = f"its worker ({worker.get('host')}:{worker.get('pid')}) died" if gone else (
            f"no heartbeat for more than search.grace_period={grace:g} s")  # fmt: skip
        storage = study._storage  # the storage API is public; Optuna exposes the study's only here
        storage.set_trial_user_attr(t._trial_id, "failed_because", why)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        retries = int(t.user_attrs.get("retries", 0))
        if retries < setup.scfg.max_retries:
            attrs = {"retry_of": t.user_attrs.get("retry_of", t.number), "retries": retries + 1}
            if "baseline" in t.user_attrs:
                attrs["baseline"] = t.user_attrs["baseline"]
            study.enqueue_trial(t.params, user_attrs=attrs)
        recovered.append(t.number)
        log.warning("trial %d failed: %s; re-queued with the same parameters", t.number, why)
    return recovered


def counts(study: optuna.Study) -> tuple[int, int, int]:
    """(trained, running, untrained: infeasible or repeated) trials."""
    trials = study.get_trials(deepcopy=False)
    done = sum(finished(t) for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    untrained = sum(t.state == TrialState.COMPLETE and not finished(t) for t in trials)  # infeasible, repeats
    return done, running, untrained


def worker_loop(setup: Setup, after_trial=None, index: int = 0) -> int:
    """Run trials until the study is full; returns how many this worker ran. ``index``: this
    worker's number among the processes started together (its sampler's own random stream)."""
    from search.study import TrialFailed

    study = open_study(setup)
    study.sampler = make_sampler(setup, salt=(index, len(study.get_trials(deepcopy=False))))
    ctx, space = make_context(setup), get_space(setup.scfg.space_names())
    lock = StartLock(setup)
    ran, failures = 0, 0
    try:
        while True:
            stop_if_requested()  # a stop signal between trials: end here, nothing is running
            lock.acquire()
            try:
                recover_stale(study, setup)
                done, running, infeasible = counts(study)
                if done + running >= setup.scfg.n_trials:
                    break
                if infeasible > 20 * setup.scfg.n_trials:
                    raise ConfigError(
                        f"search.space: {infeasible} sampled configurations were infeasible or repeats for {done} "
                        "trained; widen the space or change search.budget"
                    )
                before = len(study.get_trials(deepcopy=False))
                study.optimize(make_objective(setup, ctx, space, lock.release), n_trials=1,
                               catch=(TrialFailed,), gc_after_trial=True)  # fmt: skip
            finally:
                lock.release()
            last = study.get_trials(deepcopy=False)[before:]
            mine = [t for t in last if (t.user_attrs.get("worker") or {}).get("pid") == os.getpid()]
            ran += 1
            failures = failures + 1 if mine and mine[-1].state == TrialState.FAIL else 0
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise RuntimeError(f"{failures} trials in a row failed on this worker; see their run folders")
            if after_trial is not None:
                after_trial()
    finally:
        lock.close()
    return ran


def worker_main(setup: Setup, index: int = 0) -> None:
    """A worker process: quiet, its own thread budget; stopped by a signal, it exits with the
    signal's code (its trial checkpointed and is queued again), without a traceback."""
    import torch

    torch.set_num_threads(setup.scfg.worker_threads())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    signal.signal(signal.SIGTERM, _request_stop)  # outside a training; ``train`` handles it inside one
    try:
        worker_loop(setup, index=index)
    except SearchInterrupted as err:
        sys.exit(err.code)


def _request_stop(signum, frame) -> None:
    """SIGTERM outside a training: remembered, acted on at the next safe point (before a trial's
    training, or between trials), never in the middle of a storage write."""
    STOP["signal"] = signal.Signals(signum).name


@contextlib.contextmanager
def _on_sigterm(handler):
    """``handler`` takes SIGTERM inside the block and the previous handler is back after it; off
    the main thread (where Python cannot set handlers) the block runs with the signal as it was."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


class _Terminated(Exception):
    """SIGTERM reached the main process of a multi-worker search."""


def _raise_terminated(signum, frame):
    raise _Terminated


class Progress:
    """One line per finished trial (number, state, objective, best so far, params in short, time,
    ETA) and a bar over trained trials, read from the storage, so it works for any number of workers."""

    def __init__(self, setup: Setup):
        from tqdm.auto import tqdm

        self.setup = setup
        self.seen: set[int] = set()
        self.names = setup.scfg.objective_names(setup.primary)
        self.sign = [1 if d == "maximize" else -1 for d in setup.scfg.direction_names(setup.primary)]
        self.best = None
        self.start = time.time()
        self.bar = tqdm(total=setup.scfg.n_trials, desc=setup.study, leave=False, file=sys.stderr,
                        disable=not sys.stderr.isatty())  # fmt: skip

    def poll(self, study: optuna.Study) -> None:
        from search.study import trial_row

        trials = study.get_trials(deepcopy=False)
        for t in trials:
            if t.number in self.seen or t.state in (TrialState.RUNNING, TrialState.WAITING):
                continue
            self.seen.add(t.number)
            row = trial_row(t)
            self.note_best(t)
            value = (
                " ".join(f"{n}={v:.4g}" for n, v in zip(self.names, row["values"])) if row["values"] else "-"
            )
            params = ", ".join(f"{k}={_short(v)}" for k, v in list(t.params.items())[:6])
            if row["baseline"]:
                params = f"baseline {row['baseline']}" + (f", {params}" if params else "")
            if row["infeasible"]:
                params += f"; infeasible: {row['infeasible'][:90]}"
            elif row["state"] == "fail" and row["error"]:
                params += f"; {str(row['error'])[:90]}"
            done = sum(finished(x) for x in trials)
            timed = [
                x.user_attrs["wall_time_s"] for x in trials if finished(x) and "wall_time_s" in x.user_attrs
            ]
            left = max(0, self.setup.scfg.n_trials - done)
            eta = statistics_mean(timed) * left / self.setup.scfg.workers if timed else None
            best = f"best {self.best[1]:.4g} (#{self.best[0]})" if self.best else "best -"
            wall = f"{row['wall_time_s']:.0f}s" if row["wall_time_s"] else ""
            self.bar.write(
                f"trial {t.number:>3} {row['state']:<10} {value:<22} {best:<20} {wall:>6}  "
                f"ETA {eta / 60:.0f} min  [{params}]" if eta is not None else
                f"trial {t.number:>3} {row['state']:<10} {value:<22} {best:<20} {wall:>6}  [{params}]"
            )  # fmt: skip
            self.bar.n = min(done, self.setup.scfg.n_trials)
            self.bar.refresh()

    def note_best(self, t) -> None:
        """Keep the best trained trial (first objective); infeasible ones carry placeholders."""
        from search.study import finished

        if t.state == TrialState.COMPLETE and finished(t) and (
            self.best is None or self.sign[0] * t.values[0] > self.sign[0] * self.best[1]
        ):
            self.best = (t.number, t.values[0])

    def close(self) -> None:
        self.bar.close()


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def run_workers(setup: Setup) -> None:
    """``search.workers`` processes (one: this process) until the study is full; prints progress."""
    progress = Progress(setup)
    study = open_study(setup)
    progress.seen = {t.number for t in study.get_trials(deepcopy=False)
                     if t.state not in (TrialState.RUNNING, TrialState.WAITING)}  # fmt: skip
    for t in study.get_trials(deepcopy=False):  # a resumed study: "best" counts the earlier trials
        if t.number in progress.seen:
            progress.note_best(t)
    try:
        if setup.scfg.workers == 1:
            import torch

            torch.set_num_threads(setup.scfg.worker_threads())
            STOP["signal"] = None  # this process may have searched before (tests, notebooks)
            with _on_sigterm(_request_stop):
                worker_loop(setup, after_trial=lambda: progress.poll(study))
        else:
            ctx = multiprocessing.get_context("spawn")
            procs = [
                ctx.Process(target=worker_main, args=(setup, index), daemon=False)
                for index in range(setup.scfg.workers)
            ]
            for p in procs:
                p.start()
            try:
                # SIGTERM to this process (a scheduler, ``kill``) must reach the workers too: by
                # default it would end this process alone and leave them training as orphans. The
                # handler is put back when the block ends: a second SIGTERM while joining ends this process
                with _on_sigterm(_raise_terminated):
                    while any(p.is_alive() for p in procs):
                        progress.poll(study)
                        time.sleep(2.0)
            except (KeyboardInterrupt, _Terminated) as stop:
                for p in procs:
                    p.terminate()  # SIGTERM: each run checkpoints and ends 'interrupted'; resume re-runs it
                if isinstance(stop, _Terminated):
                    raise SearchInterrupted("SIGTERM") from None
                raise
            finally:
                for p in procs:
                    p.join()
            bad = [p.exitcode for p in procs if p.exitcode]
            if bad:
                raise RuntimeError(f"{len(bad)} worker(s) exited with {bad}; the study is resumable as it is")
        progress.poll(study)
    finally:
        progress.close()
