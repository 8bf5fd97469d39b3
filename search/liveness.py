"""Which RUNNING trials still have a live worker: one owner of stale trials on every storage.

A worker records who runs a trial (``WORKER_KEY``) and beats while it runs (``ALIVE_KEY``, ``Beat``);
``stale_reason`` judges whether that worker is gone and ``search.workers.recover_stale`` fails and
re-queues its trial. How the owner, the beat and the judgment work: docs/search.md#workers-and-stale-trials.

Invariants:

- A pid is judged only inside its own pid space (boot id and pid namespace, ``adabudget.procs``);
  elsewhere only a beat older than ``search.grace_period`` makes a worker dead.
- ``WORKER_KEY`` is written before the start lock is released, so no observer sees an unowned trial.
- The beat runs on its own thread, whatever the training loop is doing.
- A trial failed as stale whose worker later tells a result is kept as a ``duplicate_of`` trial and
  never counted: no trial is counted twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from pathlib import Path

import optuna
from adabudget import procs
from adabudget.procs import pid_alive, same_pid_space, start_ticks, started_at
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

WORKER_KEY = "adabudget:worker"
ALIVE_KEY = "adabudget:alive_at"
log = logging.getLogger("adabudget.search")
_IDS: dict[int, str] = {}  # pid -> this process's random worker id (a forked child gets its own)


# ---------------------------------------------------------------- who runs a trial
def identity() -> dict:
    """This process as a trial's worker: random id, host, pid, start time and pid space."""
    return {"id": _IDS.setdefault(os.getpid(), uuid.uuid4().hex), **procs.identity()}


# ---------------------------------------------------------------- that it lives
def beat_interval(grace_period: float) -> float:
    """Seconds between beats: four beats fit in a grace period, and at most 10 s apart (a journal
    file gets one short line per beat)."""
    return max(0.2, min(10.0, grace_period / 4))


class Beat:
    """``with Beat(storage, trial_id, interval):`` the trial is this worker's (``WORKER_KEY``,
    written on entry) and alive (``ALIVE_KEY``, written on entry and every ``interval`` seconds by
    a daemon thread) while the block runs. ``worker``: the identity to record (default: this
    process's). ``lost`` is set when the trial turned out finished by someone else."""

    def __init__(self, storage, trial_id: int, interval: float, worker: dict | None = None):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.worker = worker or identity()
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Beat:
        self.storage.set_trial_system_attr(self.trial_id, WORKER_KEY, self.worker)
        self.storage.set_trial_system_attr(self.trial_id, ALIVE_KEY, time.time())
        self._thread = threading.Thread(target=self._run, name=f"adabudget-beat-{self.trial_id}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        missed = 0
        while not self._stop.wait(self.interval):
            try:
                self.storage.set_trial_system_attr(self.trial_id, ALIVE_KEY, time.time())
                missed = 0
            except (UpdateFinishedTrialError, KeyError):  # told, or failed by another worker: no more beats
                self.lost = True
                return
            except Exception as err:  # a dropped connection, a busy database: the next beat tries again
                missed += 1
                if missed == 1:
                    log.warning(
                        "trial heartbeat failed (%s: %s); retrying every %g s",
                        type(err).__name__,
                        err,
                        self.interval,
                    )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, 2 * self.interval))  # a daemon: a hung write cannot hold us

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- the judgment
def stale_reason(trial, grace_period: float, now: float | None = None) -> str | None:
    """Why the RUNNING ``trial``'s worker is gone, or None while it may live.

    Args:
        trial: a FrozenTrial; its worker is ``WORKER_KEY`` (or the older ``worker`` user attribute,
            host and pid only).
        grace_period: seconds without a beat before a worker in another pid space is gone.
        now: the observer's clock (default: ``time.time()``).
    """
    now = time.time() if now is None else now
    worker = trial.system_attrs.get(WORKER_KEY)
    legacy = worker is None
    worker = worker or trial.user_attrs.get("worker") or {}
    if worker.get("id") is not None and worker.get("id") == identity()["id"]:
        return None  # this process's own trial
    pid = worker.get("pid")
    if pid is not None and same_pid_space(worker):
        who = f"{worker.get('host')}:{pid}"
        if not pid_alive(int(pid)):
            return f"its worker ({who}) died"
        if not legacy and worker.get("start_ticks") is not None:
            ticks = start_ticks(int(pid))
            reused = ticks is not None and ticks != worker["start_ticks"]
        else:  # a record without the start time: a process that began after the trial is not its worker
            begun, trial_start = started_at(int(pid)), trial.datetime_start
            reused = begun is not None and trial_start is not None and begun > trial_start.timestamp() + 1.0
        if reused:
            return f"its worker ({who}) died; pid {pid} is now another process's (started later)"
        return None  # the pid decides, however long the run goes without a beat
    beat = trial.system_attrs.get(ALIVE_KEY)
    if beat is None:
        beat = _older_heartbeat(trial)
    age = now - beat
    if age <= grace_period:
        return None
    where = f" ({worker.get('host')}:{pid})" if pid is not None else ""
    return (
        f"its worker{where} sent no heartbeat for {age:.0f} s, "
        f"more than search.grace_period={grace_period:g} s"
    )


def _older_heartbeat(trial) -> float:
    """A trial without beats (written before them): its run record's heartbeat, else its start."""
    run_dir = trial.user_attrs.get("run_dir")
    if run_dir and (Path(run_dir) / "result.json").exists():
        try:
            beat = json.loads((Path(run_dir) / "result.json").read_text()).get("heartbeat_at")
            if beat:
                return float(beat)
        except (OSError, ValueError):
            pass
    return trial.datetime_start.timestamp() if trial.datetime_start else time.time()


# ---------------------------------------------------------------- the end of a trial
def tell(
    study: optuna.Study, trial, values=None, state: TrialState | None = None, attrs: dict | None = None
) -> bool:
    """Write ``attrs`` (user attributes) and tell the trial's end; False when the race was lost.

    A trial already finished by another worker (failed as stale while it lived) cannot be told:
    that is logged, and a result (``values`` without a state, or COMPLETE) is kept as a new
    COMPLETE trial with the same parameters, ``duplicate_of`` the failed one and ``lost_race``
    saying why; it is never counted (the failed trial's re-queued copy is).
    """
    storage = study._storage  # the storage API is public; Optuna exposes the study's only here
    attrs = attrs or {}
    try:
        if not storage.get_trial(trial._trial_id).state.is_finished():
            for key, value in attrs.items():
                storage.set_trial_user_attr(trial._trial_id, key, value)
            study.tell(trial, values, state=state)
            return True
    except RuntimeError as err:  # UpdateFinishedTrialError is one: finished between the check and the write
        if "Study.stop" in str(err):  # GridSampler ends the study when the grid is done; the trial is told
            return True
        if not storage.get_trial(trial._trial_id).state.is_finished():
            raise
    except ValueError:  # "Cannot tell a FAIL trial": finished between the check and the tell
        if not storage.get_trial(trial._trial_id).state.is_finished():
            raise
    frozen = storage.get_trial(trial._trial_id)
    why = frozen.user_attrs.get("failed_because") or f"ended {frozen.state.name} by another worker"
    kept = ""
    if values is not None and state in (None, TrialState.COMPLETE):
        values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
        if all(not math.isnan(v) for v in values):
            user = {
                k: v
                for k, v in {**frozen.user_attrs, **attrs}.items()
                if k not in ("run_dir", "failed_because")
            }
            user.update(
                duplicate_of=frozen.number, lost_race=f"trial {frozen.number} was failed while it ran: {why}"
            )
            system = {k: v for k, v in frozen.system_attrs.items() if k not in (WORKER_KEY, ALIVE_KEY)}
            study.add_trial(
                optuna.trial.create_trial(
                    state=TrialState.COMPLETE,
                    values=values,
                    params=frozen.params,
                    distributions=frozen.distributions,
                    user_attrs=user,
                    system_attrs=system,
                )
            )
            kept = f"; its result {values} is kept as a duplicate_of {frozen.number} (not counted)"
    log.warning(
        "trial %d finished, but it had been failed while it ran (%s): a lost race%s", frozen.number, why, kept
    )
    return False
