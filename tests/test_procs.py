"""``adabudget.procs``: whether the process a record names still runs, and claim files (the run
folder's ``.claim``, a reproduce cell's), judged with real processes: a live one, one that exited,
a pid whose start time is another process's, a pid of another pid space."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from adabudget import procs
from adabudget.config import ConfigError
from adabudget.log import claim_run_dir


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_process_alive_by_pid_start_time_and_pid_space(dead_pid, monkeypatch):
    me = procs.identity()
    assert me["pid"] == os.getpid() and me["start_ticks"] is not None
    assert procs.process_alive(me) is True
    assert procs.process_alive({**me, "start_ticks": None}) is True  # no start time: the pid decides
    assert procs.process_alive({**me, "pid": dead_pid, "start_ticks": None}) is False
    assert procs.process_alive({**me, "start_ticks": me["start_ticks"] - 1}) is False  # the pid was reused
    assert procs.process_alive({"host": procs.HOST, "pid": os.getpid()}) is True  # an older record: host, pid
    assert procs.process_alive({"host": "elsewhere", "pid": dead_pid}) is None  # cannot be told from here
    assert procs.process_alive({**me, "pid_space": "another-machine/pid:[1]"}) is None
    monkeypatch.setattr(procs, "pid_space", lambda: "another-machine/pid:[1]")
    assert procs.process_alive(me) is None  # this process, told it is elsewhere now


def test_a_claim_is_one_processs_until_that_process_is_gone(tmp_path, dead_pid):
    path = tmp_path / procs.CLAIM
    assert procs.claim(path)
    assert json.loads(path.read_text()) == procs.identity()
    assert not procs.claim(path)  # held by a live process (this one)
    path.write_text(json.dumps({**procs.identity(), "pid": dead_pid, "start_ticks": None}))
    assert procs.claim(path)  # its owner died: taken over
    assert json.loads(path.read_text())["pid"] == os.getpid()
    path.write_text(json.dumps({**procs.identity(), "pid_space": "another-machine/pid:[1]"}))
    assert not procs.claim(path)  # another machine's: never judged here
    path.write_text("")  # being written this instant
    assert not procs.claim(path)


def test_an_explicit_run_dir_a_killed_process_claimed_is_taken_over(tmp_path, dead_pid):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / procs.CLAIM).write_text(json.dumps({"host": procs.HOST, "pid": dead_pid}))
    assert claim_run_dir(tmp_path, "x", run_dir) == run_dir
    with pytest.raises(ConfigError, match="another process is starting a run in it"):
        claim_run_dir(tmp_path, "x", run_dir)  # now held by this live process


def _race(path, barrier, won) -> None:
    barrier.wait()
    won.put(procs.claim(path))


def test_of_several_processes_taking_over_a_dead_claim_at_once_one_wins(tmp_path, dead_pid):
    import multiprocessing

    path = tmp_path / procs.CLAIM
    path.write_text(json.dumps({"host": procs.HOST, "pid": dead_pid}))
    ctx = multiprocessing.get_context("fork")
    barrier, won = ctx.Barrier(6), ctx.Queue()
    racers = [ctx.Process(target=_race, args=(path, barrier, won)) for _ in range(6)]
    for p in racers:
        p.start()
    results = [won.get(timeout=60) for _ in racers]
    for p in racers:
        p.join()
    assert sorted(results) == [False] * 5 + [True]
    assert json.loads(path.read_text())["pid"] in {p.pid for p in racers}
