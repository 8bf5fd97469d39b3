"""Torn files are repaired, never fatal: record lines and Optuna journals cut mid-write, broken
checkpoints, config.yaml written atomically, and the run lock that keeps a live run from being
resumed by a second process (issue 17, section 4)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from adabudget.compose import resume_config
from adabudget.config import ConfigError
from adabudget.training import train


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- metrics.jsonl / ranks.jsonl
def test_a_torn_last_line_is_dropped_on_resume_and_kept_in_a_bak(compose_run, caplog):
    """A kill or a full disk during an append leaves half a line: resume drops it (crashed with
    JSONDecodeError before), keeps the file as it was in <name>.bak, and ends like an unbroken run."""
    full = train(compose_run("run_name=full"))
    first = train(compose_run("run_name=torn", "train.stop_after_step=9"))
    run_dir = Path(first["run_dir"])
    torn = {}
    for name, half in (("metrics.jsonl", '{"step": 10, "split": "tr'), ("ranks.jsonl", '{"step": 10, "bud')):
        with open(run_dir / name, "a") as f:
            f.write(half)
        torn[name] = (run_dir / name).read_text()
    with caplog.at_level(logging.WARNING, logger="adabudget"):
        resumed = train(resume_config(run_dir))
    assert resumed["status"] == "completed" and resumed["final"] == full["final"]
    for name in ("metrics.jsonl", "ranks.jsonl"):
        assert read_jsonl(run_dir / name) == read_jsonl(Path(full["run_dir"]) / name)
        assert (run_dir / f"{name}.bak").read_text() == torn[name]
        assert f"{name}.bak" in caplog.text
    assert "was cut mid-write" in caplog.text


def test_corruption_in_the_middle_of_a_record_is_refused_naming_the_line(compose_run):
    first = train(compose_run("train.stop_after_step=9"))
    path = Path(first["run_dir"]) / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[0] = lines[0][:15]  # not the last line: this is no torn append
    path.write_text("\n".join(lines) + "\n")
    before = path.read_text()
    with pytest.raises(
        ConfigError, match=r"metrics\.jsonl: line 1 is not a JSON object .*corrupt in the middle"
    ):
        train(resume_config(first["run_dir"]))
    assert path.read_text() == before  # refused before anything was written
    assert not (path.parent / "metrics.jsonl.bak").exists()


def test_every_append_starts_on_a_new_line(tmp_path):
    """An append after a torn one (space freed on a full disk) starts its own line, so the record
    loses one line, not two."""
    from adabudget.config import LoggerConfig
    from adabudget.log import RunRecord

    record = RunRecord(tmp_path, {"run_name": "x"}, LoggerConfig())
    record.metrics({"step": 1, "split": "train", "loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "spl')  # the append the disk cut
    record.metrics({"step": 3, "split": "train", "loss": 0.5})
    record.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 1 and lines[1] == '{"step": 2, "spl'
    assert json.loads(lines[2]) == {"step": 3, "split": "train", "loss": 0.5}


# ---------------------------------------------------------------- config.yaml
def test_config_yaml_is_written_atomically_and_only_when_it_changes(compose_run):
    first = train(compose_run("train.stop_after_step=9"))
    path = Path(first["run_dir"]) / "config.yaml"
    inode = path.stat().st_ino
    # the first resume records resume= and run_dir=: a new file renamed into place, never rewritten in place
    train(resume_config(first["run_dir"], ["train.stop_after_step=9"]))
    changed = path.stat()
    assert changed.st_ino != inode
    again = train(resume_config(first["run_dir"], ["train.stop_after_step=9"]))
    assert again["status"] == "interrupted" and again["steps"] == 11
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (changed.st_ino, changed.st_mtime_ns)  # untouched
    assert not list(path.parent.glob(".config.yaml.*"))  # no temporary file left


# ---------------------------------------------------------------- checkpoints
def test_a_broken_last_checkpoint_falls_back_to_the_previous_one(compose_run, caplog):
    """A zero-byte last.pt (a full disk, a crash before the data reached the disk): resume warns,
    naming both files, and goes on from prev.pt, to the same end as an unbroken run."""
    full = train(compose_run("run_name=full"))
    first = train(compose_run("run_name=broken", "train.checkpoint_every=4", "train.stop_after_step=9"))
    folder = Path(first["run_dir"]) / "checkpoints"
    assert torch.load(folder / "prev.pt", weights_only=True)["step"] == 8  # the periodic one before the stop
    (folder / "last.pt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="adabudget"):
        resumed = train(resume_config(first["run_dir"]))
    assert f"{folder / 'last.pt'} is empty (0 bytes)" in caplog.text
    assert f"continuing from the previous checkpoint {folder / 'prev.pt'} (step 8)" in caplog.text
    assert resumed["status"] == "completed" and resumed["final"] == full["final"]
    assert read_jsonl(Path(first["run_dir"]) / "metrics.jsonl") == read_jsonl(
        Path(full["run_dir"]) / "metrics.jsonl"
    )

    for name in ("last.pt", "prev.pt"):
        (folder / name).write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(
        ConfigError, match=r"last\.pt is unreadable .*prev\.pt is unreadable .*start a new run"
    ):
        train(resume_config(first["run_dir"], ["train.max_steps=30"]))


def test_save_keeps_the_previous_checkpoint_and_never_touches_another_writers_temp_file(tmp_path):
    from adabudget.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint

    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    other = path.with_suffix(".tmp")  # the one fixed temporary name every writer used to share
    other.write_bytes(b"another writer's checkpoint, half written")
    save_checkpoint(path, {"step": 1})
    save_checkpoint(path, {"step": 2})
    assert other.read_bytes() == b"another writer's checkpoint, half written"
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt", "last.tmp", "prev.pt"]  # no temp left
    assert load_checkpoint(path)["step"] == 2 and load_checkpoint(path.with_name("prev.pt"))["step"] == 1
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's private 0600
    path.unlink()  # a kill between the save's two renames: only prev.pt is there
    assert has_checkpoint(path) and load_checkpoint(path)["step"] == 1


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- the run lock
def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that holds the run folder's lock, as a live run does."""
    code = (
        "import sys, time; from adabudget.log import lock_run; lock_run(sys.argv[1]); "
        "print('held', flush=True); time.sleep(300)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_resuming_a_live_run_is_refused_and_a_dead_ones_lock_is_taken_over(compose_run, caplog):
    first = train(compose_run("train.stop_after_step=9"))
    run_dir = Path(first["run_dir"])
    assert (run_dir / ".lock").read_text() == ""  # the finished process gave it back
    holder = _hold_lock(run_dir)
    try:
        before = {
            name: (run_dir / name).read_text() for name in ("metrics.jsonl", "result.json", "config.yaml")
        }
        with pytest.raises(
            ConfigError, match=rf"the run is still alive: pid {holder.pid} on .*kill -TERM {holder.pid}"
        ):
            train(resume_config(run_dir))
        assert {name: (run_dir / name).read_text() for name in before} == before  # nothing written
    finally:
        holder.kill()  # kill -9: the lock file still names it
        holder.wait()
    assert json.loads((run_dir / ".lock").read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="adabudget"):
        resumed = train(resume_config(run_dir))
    assert resumed["status"] == "completed"
    assert f"taking over the lock of pid {holder.pid}" in caplog.text


def test_without_flock_the_holders_host_pid_and_start_time_decide(tmp_path, monkeypatch):
    """Some network file systems have no flock: the lock file's record decides whether its
    holder lives (same host, the pid running, the same process start time: no reused pid)."""
    import errno
    import fcntl
    import socket

    from adabudget.log import LOCK, lock_run, unlock_run
    from adabudget.procs import start_ticks

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    holder = _hold_lock(tmp_path)
    monkeypatch.setattr(fcntl, "flock", no_flock)
    try:
        with pytest.raises(ConfigError, match=rf"still alive: pid {holder.pid}"):
            lock_run(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    unlock_run(lock_run(tmp_path))  # its pid is gone: taken over
    me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": start_ticks(os.getpid())}
    (tmp_path / LOCK).write_text(json.dumps(me))
    with pytest.raises(ConfigError, match=rf"still alive: pid {os.getpid()}"):
        lock_run(tmp_path)
    (tmp_path / LOCK).write_text(json.dumps({**me, "pid_start": me["pid_start"] - 1}))  # a reused pid
    unlock_run(lock_run(tmp_path))
    (tmp_path / LOCK).write_text(json.dumps({**me, "host": "elsewhere"}))  # cannot be checked from here
    with pytest.raises(ConfigError, match=r"on elsewhere .*if that process is gone, delete"):
        lock_run(tmp_path)


# ---------------------------------------------------------------- Optuna journals
def _journal(tmp_path: Path, trials: int = 3):
    """A study in a journal file opened as the search opens it (``search.study.make_storage``)."""
    import optuna
    from adabudget.search.study import make_storage
    from adabudget.search.trial import Setup

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = str(tmp_path / "journal.log")
    setup = Setup(
        base={},
        search={},
        study="s",
        storage=url,
        root=str(tmp_path),
        primary="accuracy",
        regression=False,
        num_labels=2,
    )
    study = optuna.create_study(study_name="s", storage=make_storage(setup))
    for _ in range(trials):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0, 1))
    return Path(url), lambda: optuna.load_study(study_name="s", storage=make_storage(setup))


def _ask_and_tell(study) -> None:
    trial = study.ask()
    study.tell(trial, trial.suggest_float("x", 0, 1))


def test_a_journal_cut_mid_line_is_repaired_on_open(tmp_path, caplog):
    """A full disk cut Optuna's last append: without the repair the next ask raises AttributeError
    and every later open JSONDecodeError."""
    path, reopen = _journal(tmp_path)
    with open(path, "ab") as f:
        f.write(b'{"op_code":5,"worker_id":"ab')
    torn = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="adabudget.search"):
        study = reopen()
    _ask_and_tell(study)
    assert len(study.trials) == 4 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert (tmp_path / "journal.log.bak").read_bytes() == torn
    assert "dropped a torn last line (28 bytes" in caplog.text and "journal.log.bak" in caplog.text


def test_a_journal_a_process_appended_to_after_the_tear_is_repaired(tmp_path):
    """What a first open after the tear leaves (before this repair existed): the torn bytes and
    the next record glued into one line in the middle of the file."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path, reopen = _journal(tmp_path)
    with open(path, "ab") as f:
        f.write(b'{"op_code":5,"worker_id":"ab')
    raw = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))
    with pytest.raises(AttributeError):
        raw.ask()  # Optuna's own failure, which glues its record to the torn bytes
    study = reopen()
    _ask_and_tell(study)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 4
    assert all(json.loads(line) for line in path.read_bytes().splitlines())


def test_a_journal_corrupt_in_the_middle_is_refused_naming_the_line(tmp_path):
    path, reopen = _journal(tmp_path, trials=1)
    lines = path.read_bytes().splitlines()
    lines[1] = b"\x00" * 20  # not a torn write: no record follows the bad bytes on that line
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ConfigError, match=r"journal\.log: line 2 is not a record"):
        reopen()


def test_the_repair_waits_for_the_journal_lock(tmp_path):
    """The repair takes the lock Optuna's appends take, so it never cuts a record being written."""
    from adabudget.search.journal import repair_journal
    from optuna.storages.journal import JournalFileSymlinkLock

    path, _ = _journal(tmp_path, trials=1)
    with open(path, "ab") as f:
        f.write(b'{"op_code":5,"worker_id":"ab')
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()  # a worker in the middle of an append
    done = []
    repair = threading.Thread(target=lambda: done.append(repair_journal(path)))
    repair.start()
    time.sleep(0.5)
    assert not done and path.read_bytes().endswith(b'"ab')  # waiting, nothing cut yet
    lock.release()
    repair.join(timeout=30)
    assert done and done[0] and path.read_bytes().endswith(b"}\n")


def test_the_hydra_sweeper_repairs_its_journal_when_it_resumes(tmp_path):
    """The sweeper opens its journal through the same ``make_storage``: a sweep whose journal a
    full disk cut goes on (a second ``-m`` run to more trials) instead of failing for good."""
    from test_sweeper import SPHERE, SPHERE_CONF, cli_env, journal_study

    (tmp_path / "conf").mkdir()
    (tmp_path / "sphere.py").write_text(SPHERE)
    (tmp_path / "conf" / "config.yaml").write_text(SPHERE_CONF.replace("n_trials: 6", "n_trials: 2"))
    journal = tmp_path / "out" / "sweeps" / "sphere" / "journal.log"

    def sweep(n_trials: int) -> None:
        cmd = [
            sys.executable,
            "sphere.py",
            "-m",
            "hydra.sweep.dir=out/sweep",
            f"hydra.sweeper.n_trials={n_trials}",
        ]
        proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    sweep(2)
    with open(journal, "ab") as f:
        f.write(b'{"op_code":4,"worker_id":"cut-by-a-full-di')
    sweep(4)
    assert (journal.parent / "journal.log.bak").exists()
    assert sum(t.state.name == "COMPLETE" for t in journal_study(journal, "sphere").trials) == 4
