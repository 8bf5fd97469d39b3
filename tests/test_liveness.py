"""Stale-trial detection that cannot fool itself (``search/liveness.py``, ``recover_stale``) and the
PostgreSQL start lock's reconnect (``search.workers.StartLock``).

Trials here are real trials of real storages (a journal file, the throwaway PostgreSQL server of
``tests/pg.py``); processes are real (``sleep`` for a pid, a worker subprocess that trains). "Another
host" is this process told that its pid space is another machine's (``procs.pid_space``): what
it then sees of a trial is exactly what a worker elsewhere sees, the storage's attributes.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from adabudget import procs
from adabudget.procs import start_ticks
from adabudget.search.liveness import ALIVE_KEY, WORKER_KEY, Beat, identity
from adabudget.search.study import database_url
from adabudget.search.trial import Setup
from adabudget.search.workers import StartLock, recover_stale
from optuna.trial import TrialState

TINY = ["model=tiny-bert", "debug=fast", "train.max_steps=6", "train.num_threads=1", "search.threads=1"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
ELSEWHERE = "another-machine/pid:[1]"


def bare_setup(storage: str, root: Path, grace: float = 600.0, study: str = "s") -> Setup:
    return Setup(
        base={},
        search={"grace_period": grace, "max_retries": 2},
        study=study,
        storage=storage,
        root=str(root),
        primary="accuracy",
        regression=False,
        num_labels=2,
    )


def new_study(setup: Setup) -> optuna.Study:
    from adabudget.search.study import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=setup.study, storage=make_storage(setup), load_if_exists=True)


def running(study: optuna.Study, worker: dict | None = None, legacy: dict | None = None):
    """A RUNNING trial with a distribution, its worker recorded as given."""
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    if worker is not None:
        study._storage.set_trial_system_attr(trial._trial_id, WORKER_KEY, worker)
    if legacy is not None:
        trial.set_user_attr("worker", legacy)
    return trial


def state_of(study, trial) -> TrialState:
    return study._storage.get_trial(trial._trial_id).state


def sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"])


# ---------------------------------------------------------------- one pid space: the pid decides
def test_pid_reuse_and_dead_pids_fail_trials_and_a_live_pid_keeps_its_trial(tmp_path):
    """In this pid space: a recorded pid now held by a process that started at another time (pid
    reuse) is a dead worker, with or without the start time in the record (an older record: the
    process began after the trial); a pid with no process is dead; the recorded process itself,
    alive, keeps its trial RUNNING however old its last beat (grace period 0.01 s)."""
    setup = bare_setup(str(tmp_path / "journal.log"), tmp_path, grace=0.01)
    study = new_study(setup)
    me = identity()
    legacy_trial = running(study, legacy={"host": me["host"], "pid": None})  # pid filled in below
    time.sleep(1.5)  # the process holding the pid must start more than 1 s after the trial
    holder = sleeper()
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        ticks = start_ticks(holder.pid)
        assert ticks is not None
        base = {**me, "id": "someone-else"}
        reused = running(study, {**base, "pid": holder.pid, "start_ticks": ticks - 7})
        alive = running(study, {**base, "pid": holder.pid, "start_ticks": ticks})
        study._storage.set_trial_system_attr(alive._trial_id, ALIVE_KEY, time.time() - 3600)
        dead = running(study, {**base, "pid": gone.pid, "start_ticks": 1})
        study._storage.set_trial_user_attr(
            legacy_trial._trial_id, "worker", {"host": me["host"], "pid": holder.pid}
        )

        recovered = recover_stale(study, setup)

        assert sorted(recovered) == sorted([reused.number, dead.number, legacy_trial.number])
        assert state_of(study, alive) == TrialState.RUNNING
        trials = {t.number: t for t in study.get_trials()}
        assert "is now another process's" in trials[reused.number].user_attrs["failed_because"]
        assert "is now another process's" in trials[legacy_trial.number].user_attrs["failed_because"]
        assert "died" in trials[dead.number].user_attrs["failed_because"]
        queued = [t.user_attrs["retry_of"] for t in trials.values() if t.state == TrialState.WAITING]
        assert sorted(queued) == sorted(recovered)  # each re-queued once, with its parameters
    finally:
        holder.kill()
        holder.wait()


def test_a_pid_of_another_pid_space_is_never_judged_here(tmp_path):
    """A worker in another container on this kernel: same hostname, a pid that names nothing here
    (or another process). Its pid is not looked at: its heartbeat decides."""
    setup = bare_setup(str(tmp_path / "journal.log"), tmp_path, grace=60)
    study = new_study(setup)
    other = {**identity(), "id": "container-b", "pid_space": ELSEWHERE, "pid": 999_999_999}
    trial = running(study, other)
    study._storage.set_trial_system_attr(trial._trial_id, ALIVE_KEY, time.time())
    assert recover_stale(study, setup) == []
    assert state_of(study, trial) == TrialState.RUNNING
    study._storage.set_trial_system_attr(trial._trial_id, ALIVE_KEY, time.time() - 61)  # its beats stopped
    assert recover_stale(study, setup) == [trial.number]
    assert "no heartbeat for 61 s" in study._storage.get_trial(trial._trial_id).user_attrs["failed_because"]


# ---------------------------------------------------------------- another pid space: the heartbeat decides
@pytest.mark.parametrize("kind", ["journal", "postgresql"])
def test_the_beat_keeps_a_silent_trial_alive_and_its_end_lets_it_go_stale(tmp_path, postgres, kind):
    """A trial of another host whose run logs nothing (a long evaluation): its Beat thread alone
    keeps it alive past the grace period; once the beats stop it is failed and re-queued."""
    storage = str(tmp_path / "journal.log") if kind == "journal" else database_url(postgres.create_db("beat"))
    setup = bare_setup(storage, tmp_path, grace=0.6)
    study = new_study(setup)
    trial = running(study)
    other = {**identity(), "id": "host-b", "pid_space": ELSEWHERE, "host": "host-b"}
    with Beat(study._storage, trial._trial_id, interval=0.1, worker=other):
        for _ in range(8):  # 1.6 s: more than twice the grace period, no step logged
            time.sleep(0.2)
            assert recover_stale(study, setup) == []
        beats = study._storage.get_trial(trial._trial_id).system_attrs
        assert beats[WORKER_KEY]["id"] == "host-b" and time.time() - beats[ALIVE_KEY] < 0.6
    time.sleep(0.8)
    assert recover_stale(study, setup) == [trial.number]
    assert state_of(study, trial) == TrialState.FAIL


def test_a_slow_trial_of_another_host_is_not_failed(tmp_path, monkeypatch):
    """End to end: a real worker (a subprocess running ``worker_loop``) trains a trial whose run
    first spends 4 s logging nothing (a slow load or evaluation: no step, no ``result.json``
    heartbeat); this process, a worker of another machine with a grace period of 1 s, checks for
    stale trials all along and fails none; the trial completes."""
    from adabudget.compose import compose
    from adabudget.search.config import register_schema
    from adabudget.search.study import open_study, prepare

    register_schema()
    args = [
        *TINY,
        "method=lora",
        "search.space=lr",
        "search.enqueue=[]",
        "search.n_trials=1",
        "search.grace_period=1",
        f"runs_root={tmp_path / 'runs'}",
    ]
    setup = prepare(compose(args, config_name="search"))
    study = open_study(setup, create=True)
    (tmp_path / "setup.pkl").write_bytes(pickle.dumps(setup))
    script = textwrap.dedent("""
        import pickle, sys, time
        import adabudget.training
        real = adabudget.training.train
        def slow(cfg, on_eval=None):
            time.sleep(4)  # loading, calibrating, evaluating: no step logged
            return real(cfg, on_eval=on_eval)
        adabudget.training.train = slow
        from adabudget.search.workers import worker_loop
        worker_loop(pickle.load(open(sys.argv[1], "rb")))
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "setup.pkl")],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    monkeypatch.setattr(procs, "pid_space", lambda: ELSEWHERE)  # this process is on another machine now
    seen_running = 0
    try:
        while proc.poll() is None:
            assert recover_stale(study, setup) == []
            seen_running += any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
            time.sleep(0.3)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    [trial] = study.get_trials()
    assert trial.state == TrialState.COMPLETE and "failed_because" not in trial.user_attrs
    assert (trial.datetime_complete - trial.datetime_start).total_seconds() > 4
    assert seen_running * 0.3 > 2  # it was checked while it ran, for longer than the grace period
    assert trial.system_attrs[WORKER_KEY]["pid"] == trial.user_attrs["worker"]["pid"] != os.getpid()


# ---------------------------------------------------------------- a lost race
def test_a_trial_failed_by_mistake_tells_without_a_crash_and_its_result_is_a_duplicate(tmp_path):
    """``liveness.tell`` on a trial another worker failed meanwhile: False, no exception, the
    trial stays FAIL, and its values are kept as a COMPLETE trial ``duplicate_of`` it (which
    ``finished`` does not count)."""
    from adabudget.search.liveness import tell
    from adabudget.search.optuna_factory import finished

    setup = bare_setup(str(tmp_path / "journal.log"), tmp_path)
    study = new_study(setup)
    trial = running(study, identity())
    trial.set_user_attr("run_dir", "runs/x/0")
    other = new_study(setup)  # another worker's handle on the same journal
    other._storage.set_trial_user_attr(trial._trial_id, "failed_because", "no heartbeat (a mistake)")
    other._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)

    assert tell(study, trial, [0.75], attrs={"status": "completed"}) is False
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    [dup] = [t for t in trials if t.number != trial.number]
    assert dup.state == TrialState.COMPLETE and dup.values == [0.75] and dup.params == trials[0].params
    assert dup.user_attrs["duplicate_of"] == trial.number and "a mistake" in dup.user_attrs["lost_race"]
    assert dup.user_attrs["status"] == "completed" and "run_dir" not in dup.user_attrs
    assert not finished(dup)
    # a failed end of a trial failed meanwhile: nothing to keep, no exception
    second = running(study, identity())
    other._storage.set_trial_state_values(second._trial_id, TrialState.FAIL)
    assert tell(study, second, state=TrialState.FAIL, attrs={"error": "x"}) is False
    assert len(study.get_trials()) == 3


# ---------------------------------------------------------------- PostgreSQL
def test_postgresql_storage_has_one_owner_of_stale_trials(postgres, tmp_path):
    """Optuna's RDB heartbeat is off (``search.liveness`` owns stale trials; two owners raced),
    and the pool checks a connection before using it (a server may drop idle ones)."""
    from adabudget.search.study import make_storage

    storage = make_storage(bare_setup(database_url(postgres.create_db("owner")), tmp_path))
    assert storage.heartbeat_interval is None and storage.grace_period is None
    assert storage.engine.pool._pre_ping


def test_start_lock_reconnects_after_its_connection_is_terminated(postgres, tmp_path):
    """The advisory lock's connection killed by the server (``pg_terminate_backend``, as an idle
    timeout does after a long trial): while released, the next ``acquire`` reconnects and holds
    the lock for real; while held, ``release`` does not raise (the lock ended with its session)."""
    from sqlalchemy import create_engine, text

    url = database_url(postgres.create_db("lock"))
    lock = StartLock(bare_setup(url, tmp_path, study="locked"))
    admin = create_engine(url).connect()

    def taken() -> bool:  # held by some session: another one cannot take it
        got = admin.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": lock.key}).scalar()
        if got:
            admin.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": lock.key})
        admin.commit()
        return not got

    def kill_lock_backend() -> None:
        pid = lock._conn.execute(text("SELECT pg_backend_pid()")).scalar()
        lock._conn.commit()
        assert admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        admin.commit()
        time.sleep(0.2)

    try:
        lock.acquire()
        assert taken()
        lock.release()
        assert not taken()
        kill_lock_backend()  # idle between trials
        lock.acquire()
        assert taken()
        kill_lock_backend()  # while held
        assert not taken()
        lock.release()
        lock.acquire()
        assert taken()
        lock.release()
        assert not taken()
    finally:
        lock.close()
        admin.close()


@pytest.mark.slow  # ~25 s: a one-job sweep on PostgreSQL in a subprocess
def test_a_sweeps_silent_job_on_postgresql_stays_alive_for_other_hosts(postgres, tmp_path, monkeypatch):
    """The Hydra sweeper's ask/tell trials get the same heartbeat: a sweep on PostgreSQL whose job
    spends 5 s logging nothing, watched by a worker of another machine with a 1.5 s grace period
    (the sweep beats every 0.3 s here instead of every 10 s), is never failed, and completes."""
    repo = Path(__file__).resolve().parents[1]
    url = database_url(postgres.create_db("sweep"))
    script = textwrap.dedent("""
        import sys, time
        import adabudget.search.liveness
        import adabudget.training
        real = adabudget.training.train
        def slow(cfg, on_eval=None):
            time.sleep(5)  # loading, calibrating, evaluating: no step logged
            return real(cfg, on_eval=on_eval)
        adabudget.training.train = slow
        adabudget.search.liveness.beat_interval = lambda grace_period: 0.3
        from adabudget.cli import main
        main(sys.argv[1:])
    """)
    args = [
        "train",
        "-m",
        "hydra/sweeper=adabudget",
        "model=tiny-bert",
        "debug=fast",
        "train.max_steps=4",
        "train.num_threads=1",
        "method=lora",
        f"runs_root={tmp_path}",
        f"hydra.sweeper.storage={url}",
        "hydra.sweeper.study_name=silent",
        "hydra.sweeper.n_trials=1",
        "train.lr=choice(1e-3,2e-3)",
    ]
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(repo), str(repo / "search" / "plugins")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    monkeypatch.setattr(procs, "pid_space", lambda: ELSEWHERE)
    setup = bare_setup(url, tmp_path, grace=1.5, study="silent")
    study, watched = None, 0.0
    try:
        while proc.poll() is None:
            time.sleep(0.3)
            if study is None:
                try:
                    study = optuna.load_study(study_name="silent", storage=url)
                except KeyError:  # not created yet
                    continue
            assert recover_stale(study, setup) == []
            watched += 0.3 * any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    [trial] = optuna.load_study(study_name="silent", storage=url).get_trials()
    assert trial.state == TrialState.COMPLETE and "failed_because" not in trial.user_attrs
    assert watched > 3  # checked while it ran, for twice the grace period and more
    assert trial.system_attrs[WORKER_KEY]["pid"] == proc.pid  # the sweep process owns and beats its trials
    assert trial.system_attrs[ALIVE_KEY] > trial.datetime_start.timestamp() + 4
