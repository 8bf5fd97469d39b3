"""Workers: processes that run trials of one study, on one machine or many, until the study
holds ``search.n_trials`` trained trials, not one more.

Each worker loops under the study's start lock (a file lock beside a journal, a PostgreSQL advisory
lock on a database): recover the trials of dead workers (``recover_stale``), count, ask one trial
and run it (``run_trial``). The loop, the lock and how a dead worker is recognised:
docs/search.md#workers-and-stale-trials.

Invariants:

- Every start decision is taken under the start lock and sees every other worker's running trials,
  so the study ends with exactly ``n_trials``; ``run_trial`` releases the lock only once the trial
  exists and is owned.
- One bad trial never ends a search: an exception inside a trial fails that trial (its error in its
  user attributes, ``search.json`` and the printed line); only ``MAX_CONSECUTIVE_FAILURES`` in a row
  end the worker. Ctrl-C, the stop signals and the search's own refusals still stop it.
- A dead worker's trial is failed and re-queued with its parameters (at most ``search.max_retries``
  times, ``retry_of``); a failed trial is never counted, so none is lost or counted twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import logging
import multiprocessing
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import optuna
from adabudget.config import ConfigError
from adabudget.procs import HOST, pid_alive
from adabudget.search import devices, supernet
from adabudget.search.liveness import Beat, beat_interval, stale_reason, tell
from adabudget.search.optuna_factory import finished
from adabudget.search.progress import Progress
from adabudget.search.spaces import get_space
from adabudget.search.study import make_context, make_objective, make_sampler, open_study
from adabudget.search.trial import STOP, SearchInterrupted, SearchRefused, Setup, stop_if_requested
from optuna.trial import TrialState

__all__ = ["HOST", "pid_alive"]  # kept importable from here (tests, older callers)
log = logging.getLogger("adabudget.search")
MAX_CONSECUTIVE_FAILURES = 5


class TooManyFailures(RuntimeError):
    """``MAX_CONSECUTIVE_FAILURES`` trials in a row failed on one worker."""


class StartLock:
    """The study's start lock: ``acquire`` blocks; ``release`` may be called more than once.

    On PostgreSQL it is a session advisory lock on one connection kept for the worker's life. A
    server may drop that connection while a long trial runs (``idle_session_timeout``, a restart,
    ``pg_terminate_backend``): the lock went with it, so ``release`` just forgets the connection,
    and ``acquire`` opens a new one and tries once more."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.held = False
        self._file = None
        self._engine = None
        self._conn = None
        self._served = None  # behind grpc://: the lease served beside the proxy (search.storage)
        self.key = int(hashlib.sha256(setup.study.encode()).hexdigest()[:15], 16)  # a bigint for PostgreSQL

    def acquire(self) -> None:
        if self.setup.storage.startswith("grpc://"):
            from adabudget.search.storage import ServedLock

            self._served = self._served or ServedLock(self.setup.storage, self.setup.study)
            self._served.acquire()
        elif self.setup.storage.startswith("postgresql"):
            try:
                self._advisory("SELECT pg_advisory_lock(:k)")
            except _disconnects() as err:  # dropped while idle: a new connection, once
                log.warning(
                    "start lock: the database connection was lost (%s); reconnecting", _first_line(err)
                )
                self._drop()
                self._advisory("SELECT pg_advisory_lock(:k)")
        else:
            path = Path(self.setup.root) / ".start.lock"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a+")
            fcntl.flock(self._file, fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        if self._served is not None:
            self._served.release()
        if self._conn is not None:
            try:
                self._advisory("SELECT pg_advisory_unlock(:k)")
            except _disconnects() as err:  # the lock ended with its session: nothing left to unlock
                log.warning("start lock: the database connection was lost while held (%s)", _first_line(err))
                self._drop()
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        self.held = False

    def close(self) -> None:
        self.release()
        self._drop()
        if self._served is not None:
            self._served.close()
            self._served = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def _advisory(self, sql: str) -> None:
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        if self._conn is None:
            if self._engine is None:  # NullPool: a dropped connection is closed, never handed back
                self._engine = create_engine(self.setup.storage, poolclass=NullPool)
            self._conn = self._engine.connect()
        self._conn.execute(text(sql), {"k": self.key})
        self._conn.commit()  # a session lock outlives the transaction; none is left open between trials

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a dead connection may raise again
                self._conn.close()
            self._conn = None


def _disconnects() -> tuple[type[Exception], ...]:
    from sqlalchemy.exc import DBAPIError, OperationalError

    return (OperationalError, DBAPIError)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def recover_stale(study: optuna.Study, setup: Setup) -> list[int]:
    """Fail the RUNNING trials whose worker is gone and queue them again with the same parameters.

    ``search.liveness.stale_reason`` judges each: the pid in the worker's own pid space (at once),
    else its heartbeat against ``search.grace_period``. Call it under the start lock (two callers
    would queue a trial twice)."""
    grace = setup.scfg.grace_period
    storage = study._storage  # the storage API is public; Optuna exposes the study's only here
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        why = stale_reason(t, grace)
        if why is None:
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "failed_because", why)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # its worker told it meanwhile: alive after all
            continue
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


def run_trial(study: optuna.Study, trial, objective, interval: float) -> tuple[str, str | None]:
    """Run ``objective`` on the asked ``trial`` with its heartbeat on, and tell how it ended.

    Returns (``complete`` / ``pruned`` / ``fail`` / ``lost``, the error of a failed trial). Every
    exception is a failed trial, its error (type and message) in the trial's ``error`` attribute
    and its traceback on stderr; a stop (Ctrl-C, ``SearchInterrupted``, ``SystemExit``) or a
    refusal of the search itself (``SearchRefused``) fails the trial and is raised again."""
    values, state, error = None, None, None
    with Beat(study._storage, trial._trial_id, interval):
        try:
            values = objective(trial)
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except (SearchInterrupted, SearchRefused):
            tell(study, trial, state=TrialState.FAIL)
            raise
        except Exception as err:
            state, error = TrialState.FAIL, f"{type(err).__name__}: {err}"[:2000]
            traceback.print_exception(type(err), err, err.__traceback__)
        except BaseException:  # KeyboardInterrupt, SystemExit: the trial ends with this process
            tell(study, trial, state=TrialState.FAIL)
            raise
    attrs = {}
    if error is not None and not trial.user_attrs.get("error"):  # TrialFailed's run already said why
        attrs["error"] = error
    if not tell(study, trial, values, state, attrs):
        return "lost", None
    gc.collect()  # a trial's model and data loaders, before the next one
    if state == TrialState.FAIL:
        return "fail", trial.user_attrs.get("error") or error
    told = study._storage.get_trial(trial._trial_id).state
    if told == TrialState.FAIL:  # values Optuna refused (NaN)
        return "fail", f"objective values {values} refused"
    return told.name.lower(), None


def worker_loop(setup: Setup, after_trial=None, index: int = 0) -> int:
    """Run trials until the study is full; returns how many this worker ran. ``index``: this
    worker's number among the processes started together (its sampler's own random stream)."""
    study = open_study(setup)
    study.sampler = make_sampler(setup, salt=(index, len(study.get_trials(deepcopy=False))))
    ctx = make_context(setup)
    lock = StartLock(setup)
    if setup.scfg.scorer == "supernet":  # trials score sub-configurations of the trained supernet
        objective = supernet.make_objective(setup, ctx, lock.release)
    else:
        objective = make_objective(setup, ctx, get_space(setup.scfg.space_names()), lock.release)
    interval = beat_interval(setup.scfg.grace_period)
    ran, errors = 0, []
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
                        f"search.space: {infeasible} sampled configurations were infeasible or repeats for "
                        f"{done} trained; widen the space or change search.budget"
                    )
                trial = study.ask()
                outcome, error = run_trial(study, trial, objective, interval)
            finally:
                lock.release()
            ran += 1
            errors = [*errors, f"trial {trial.number}: {error}"] if outcome == "fail" else []
            if len(errors) >= MAX_CONSECUTIVE_FAILURES:
                raise TooManyFailures(
                    f"{len(errors)} trials in a row failed on this worker, so it stops (a trial that fails "
                    "alone is recorded and the search goes on); the last errors:\n  "
                    + "\n  ".join(errors[-5:])
                    + "\nsee their run folders; fix the cause, then the same command resumes the study"
                )
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
    # outside a training; ``train`` handles them inside one. SIGUSR1: Slurm's warning before a job's
    # time limit (search.slurm.signal_delay_s, --signal=USR1@90)
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGUSR1, _request_stop)
    try:
        worker_loop(setup, index=index)
    except SearchInterrupted as err:
        sys.exit(err.code)
    except (TooManyFailures, ConfigError) as err:  # said once, without a traceback; the main process sums up
        print(
            f"worker {index}: {'config error: ' if isinstance(err, ConfigError) else ''}{err}",
            file=sys.stderr,
        )
        sys.exit(2 if isinstance(err, ConfigError) else 1)


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


def run_workers(setup: Setup) -> None:
    """``search.workers`` processes (one: this process) until the study is full; prints progress."""
    # each worker process its own GPUs (search.devices, search.gpus_per_trial); None on a CPU machine
    visible = devices.visible_gpus()
    gpus = devices.assign(setup.scfg.workers, setup.scfg.gpus_per_trial, setup.scfg.devices, visible=visible)
    if devices.describe(gpus):
        print(devices.describe(gpus), flush=True)
    progress = Progress(setup)
    study = open_study(setup)
    progress.seen = {
        t.number
        for t in study.get_trials(deepcopy=False)
        if t.state not in (TrialState.RUNNING, TrialState.WAITING)
    }
    for t in study.get_trials(deepcopy=False):  # a resumed study: "best" counts the earlier trials
        if t.number in progress.seen:
            progress.note_best(t)
    try:
        if setup.scfg.workers == 1:
            import torch

            torch.set_num_threads(setup.scfg.worker_threads())
            STOP["signal"] = None  # this process may have searched before (tests, notebooks)
            with _on_sigterm(_request_stop), devices.in_this_process(gpus[0], visible):
                worker_loop(setup, after_trial=lambda: progress.poll(study))
        else:
            ctx = multiprocessing.get_context("spawn")
            procs = [
                ctx.Process(target=worker_main, args=(setup, index), daemon=False)
                for index in range(setup.scfg.workers)
            ]
            for p, own in zip(procs, gpus):
                with devices.environ(devices.worker_env(own)):  # the spawned interpreter inherits it
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
                failed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL]
                last = "".join(
                    f"\n  trial {t.number}: {t.user_attrs.get('error') or t.user_attrs.get('failed_because')}"
                    for t in failed[-5:]
                )
                raise RuntimeError(
                    f"{len(bad)} worker(s) exited with {bad}; the study is resumable as it is"
                    + (f"; the last failed trials:{last}" if last else "")
                )
        progress.poll(study)
    finally:
        progress.close()
