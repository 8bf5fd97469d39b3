"""Storages for many machines (search.storage): the gRPC proxy in front of PostgreSQL with the start
lock served beside it, exactly n_trials through it, the MySQL rule, the study-folder check, run
folders found from any working directory, and ``adabudget bench storage``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli, cli_env, closed_port, popen_cli, search_here

TINY = ["model=tiny-bert", "debug=fast", "train.max_steps=10", "train.num_threads=1", "search.threads=1"]
LR_STUDY = [*TINY, "method=lora", "search.space=lr", "search.enqueue=[]"]


def serve_storage(url: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """``adabudget search serve-storage url`` on a free port: (the process, its grpc:// URL) once it
    listens; the first line it printed is checked by the callers."""
    port = closed_port()
    proc = popen_cli(["search", "serve-storage", url, "--port", str(port), *extra], cwd=Path.cwd())
    line = proc.stdout.readline()
    assert "serving" in line, line + proc.stderr.read()[-3000:]
    proc.first_line = line
    return proc, f"grpc://localhost:{port}"


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    return out + err


def stored_trials(url: str, study: str) -> list:
    import optuna
    from adabudget.search.study import database_url

    return optuna.load_study(study_name=study, storage=database_url(url)).get_trials(deepcopy=False)


# ---------------------------------------------------------------- the start lock served beside the proxy
CRITICAL = """
import sys, time
from pathlib import Path
from adabudget.search.storage import ServedLock
lock, counter = ServedLock(sys.argv[1], "study"), Path(sys.argv[2])
for _ in range(5):
    lock.acquire()
    n = int(counter.read_text())      # read, wait, write: two holders at once lose an increment
    time.sleep(0.05)
    counter.write_text(str(n + 1))
    lock.release()
lock.close()
"""
HOLD = """
import sys, time
from adabudget.search.storage import ServedLock
lock = ServedLock(sys.argv[1], "study")
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_the_served_lock_excludes_across_processes_and_a_dead_holders_lease_expires_postgresql(
    postgres, tmp_path
):
    """Three processes each increment a file counter five times under the lock (read, sleep, write):
    no increment is lost. A holder killed with SIGKILL frees the lock after the lease (2 s here)
    and not before, so a dead worker never blocks a study."""
    from adabudget.search.storage import ServedLock

    proc, url = serve_storage(postgres.create_db("lock"), "--lock-ttl", "2")
    try:
        counter = tmp_path / "counter"
        counter.write_text("0")
        env = cli_env()
        racers = [
            subprocess.Popen([sys.executable, "-c", CRITICAL, url, str(counter)], env=env) for _ in range(3)
        ]
        assert [r.wait(timeout=300) for r in racers] == [0, 0, 0]
        assert counter.read_text() == "15"

        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD, url], env=env, stdout=subprocess.PIPE, text=True
        )
        assert holder.stdout.readline().strip() == "held"
        time.sleep(3)  # longer than the lease: the holder's renewals keep it
        lock = ServedLock(url, "study")
        assert lock._call("acquire")["granted"] is False
        holder.kill()
        holder.wait()
        start = time.monotonic()
        lock.acquire()
        waited = time.monotonic() - start
        lock.close()
        assert 0.5 < waited < 5, waited  # the rest of its lease, then free
    finally:
        stop(proc)


# ---------------------------------------------------------------- exactly n_trials behind the proxy
def test_bench_storage_counts_exactly_n_trials_on_every_storage_postgresql(postgres, tmp_path):
    """``adabudget bench storage``: 1 and 3 workers on the journal, PostgreSQL and the gRPC proxy
    in front of it, each to 12 trials: exactly 12 complete, none running, none told by two workers."""
    from adabudget.search.bench_storage import main

    rows = main(
        [
            "--postgresql",
            postgres.create_db("bench"),
            "--workers",
            "1,3",
            "--trials",
            "12",
            "--dir",
            str(tmp_path),
        ]
    )
    assert [(r["storage"], r["workers"]) for r in rows] == [
        (s, n) for s in ("journal", "postgresql", "grpc") for n in (1, 3)
    ]
    for r in rows:
        assert (r["complete"], r["extra"], r["lost"], r["told_twice"]) == (12, 0, 0, 0), r
        assert r["not_finished"] == 0 and r["told_not_stored"] == 0 and r["exit_codes"] == [], r
        assert r["trials_per_s"] > 0 and r["storage_ms_per_trial"] > 0


@pytest.mark.slow
def test_two_machines_search_through_the_grpc_proxy_to_exactly_n_trials_postgresql(tmp_path):
    """Two ``adabudget search`` commands (two machines' worth: 2 workers each) share one study
    through ``serve-storage`` in front of a password-protected PostgreSQL: exactly n_trials trained,
    every worker through the proxy (no database URL, no password on their side), and the password
    appears nowhere in what the server printed."""
    from pg import PostgresServer, find_bindir
    from test_search import check_study

    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    with PostgresServer(bindir, password="proxy-s3cret") as pg:
        url = pg.create_db("proxied")
        proc, grpc_url = serve_storage(url)
        try:
            runs = tmp_path / "runs"
            args = [
                "search",
                *LR_STUDY,
                "search.n_trials=5",
                "search.workers=2",
                f"search.storage={grpc_url}",
                f"runs_root={runs}",
            ]
            env = {k: v for k, v in cli_env().items() if not k.startswith("PG")}
            first = popen_cli(args, cwd=tmp_path, env=env)
            second = cli(args, cwd=tmp_path, env=env)
            out, err = first.communicate(timeout=900)
            assert first.returncode == 0, err[-3000:]
            assert second.returncode == 0, second.stderr[-3000:]
        finally:
            printed = stop(proc)
        stored = stored_trials(url, "lr-mr")
    check_study(stored, 5)
    assert len({t.user_attrs["worker"]["pid"] for t in stored}) >= 2
    assert "proxy-s3cret" not in printed + out + err + second.stdout + second.stderr
    assert "postgres@127.0.0.1" in proc.first_line  # the URL shown, without its password


# ---------------------------------------------------------------- bad storages
def test_a_grpc_url_without_a_port_is_refused(tmp_path, capsys):
    code, out, err = search_here(capsys, *TINY, "search.storage=grpc://proxy-host", f"runs_root={tmp_path}")
    assert code == 2 and "config error: search.storage=grpc://proxy-host: give grpc://HOST:PORT" in err


def test_a_grpc_url_where_nothing_listens_says_how_to_start_the_server(tmp_path, capsys):
    port = closed_port()
    code, out, err = search_here(
        capsys, *LR_STUDY, f"search.storage=grpc://localhost:{port}", f"runs_root={tmp_path}"
    )
    assert code == 2, err[-2000:]
    assert f"config error: search.storage=grpc://localhost:{port}: no storage server answered" in err
    assert "adabudget search serve-storage postgresql://" in err


def test_serve_storage_refuses_a_journal_without_printing_a_password(tmp_path):
    proc = cli(["search", "serve-storage", str(tmp_path / "journal.log")], cwd=tmp_path)
    assert proc.returncode == 2 and "give a postgresql:// (or mysql://) database URL" in proc.stderr


def test_mysql_refuses_a_second_machine_and_says_what_to_use():
    """The start lock of a MySQL study is the file lock of one machine: a worker on another host is
    refused (search.storage), naming the host the study runs on, the proxy and PostgreSQL."""
    from adabudget.config import ConfigError
    from adabudget.procs import HOST
    from adabudget.search.storage import check_mysql_host

    url = "mysql+pymysql://user:hunter2@db/studies"
    check_mysql_host(url, {"host": HOST, "path": "/x", "token": "t"})  # its own machine: fine
    check_mysql_host("postgresql://u@db/s", {"host": "node-7", "path": "/x", "token": "t"})  # a real lock
    with pytest.raises(ConfigError) as err:
        check_mysql_host(url, {"host": "node-7", "path": "/x", "token": "t"})
    text = str(err.value)
    assert text.startswith("search.storage=mysql+pymysql://user@db/studies: this study runs on node-7")
    assert "serve-storage" in text and "postgresql://" in text and "hunter2" not in text


# ---------------------------------------------------------------- the study folder
@pytest.fixture(scope="module")
def shared_journal_study(tmp_path_factory):
    """A one-trial study run from folder ``a`` with a relative runs_root, its journal at a path a
    second "machine" shares (search.storage), its trial folders under a/runs/search/lr-mr."""
    base = tmp_path_factory.mktemp("shared")
    (base / "a").mkdir()
    journal = base / "shared" / "studies.log"
    args = ["search", *LR_STUDY, "search.n_trials=1", f"search.storage={journal}", "runs_root=runs"]
    proc = cli(args, cwd=base / "a")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base, journal


def test_a_worker_that_does_not_see_the_study_folder_is_refused(shared_journal_study, tmp_path, capsys):
    """Another machine's view: the same storage, but its search.root is not the folder the study
    recorded (no marker there): refused before any trial, naming search.root and the fix."""
    base, journal = shared_journal_study
    marker = json.loads((base / "a" / "runs" / "search" / "lr-mr" / ".adabudget-study").read_text())
    code, out, err = search_here(
        capsys,
        *LR_STUDY,
        "search.n_trials=2",
        f"search.storage={journal}",
        f"search.root={tmp_path / 'elsewhere'}",
    )
    assert code == 2, err[-2000:]
    assert (
        "config error: search.root: this machine" in err and "does not see the folder of study lr-mr" in err
    )
    assert "runs/search/lr-mr" in err and "filesystem every machine mounts at the same path" in err
    assert not (tmp_path / "elsewhere" / "lr-mr" / "trials").exists()
    import optuna

    study = optuna.load_study(study_name="lr-mr", storage=_journal(journal))
    assert study.user_attrs["adabudget:root"]["token"] == marker["token"]
    assert len(study.get_trials()) == 1  # nothing started


def _journal(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def test_the_study_opens_from_any_working_directory(shared_journal_study, tmp_path, monkeypatch):
    """The record holds paths as the search wrote them (relative to folder ``a``); from another
    directory the study folder's trials, run folders and dashboard section are found all the same."""
    from adabudget.analysis.dashboard import study_section
    from adabudget.analysis.records import trials

    base, _ = shared_journal_study
    folder = base / "a" / "runs" / "search" / "lr-mr"
    monkeypatch.chdir(tmp_path)
    assert not Path("runs/search/lr-mr").exists()
    tr = trials(folder)
    assert list(tr["state"]) == ["complete"]
    assert tr["run_dir"][0] == str(folder / "trials" / "0")
    assert (Path(tr["run_dir"][0]) / "result.json").is_file()
    sec = study_section(str(folder))
    assert "No completed trial yet." not in sec.notes and sec.figures
