"""``adabudget search`` end to end on a tiny model: the record of a study, resume to the requested
total, several workers (journal file and PostgreSQL) with no duplicate and no lost trial, a worker
killed mid-trial, pruning, the dashboard, multi-objective Pareto fronts, bad inputs and the final
re-training on several seeds.

Every study here trains random 2-layer BERTs for 10 steps on one thread (``TINY``). Commands run
as a user runs them: a subprocess of the CLI where processes matter (workers, kill -9), the same
``adabudget.cli.main`` in this process elsewhere (it skips ~8 s of imports per command). What counts
as trained is computed here from the storage, not with the code under test: a COMPLETE trial that
is not infeasible, or a PRUNED one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import time
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
import yaml
from conftest import cli, popen_cli, search_here
from optuna.trial import TrialState

# 10 steps of batch 16 on 256 movie reviews, evaluated on 128, one torch thread per worker
TINY = ["model=tiny-bert", "debug=fast", "train.max_steps=10", "train.num_threads=1", "search.threads=1"]


# ---------------------------------------------------------------- helpers
def storage_of(url: str):
    if url.startswith("postgresql"):
        from adabudget.search.study import database_url

        return database_url(url)  # postgresql:// with psycopg2 (SQLAlchemy 2.1 defaults to psycopg 3)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(url))


def trials_of(url: str, study: str) -> list:
    return optuna.load_study(study_name=study, storage=storage_of(url)).get_trials(deepcopy=False)


def trained(t) -> bool:
    return t.state == TrialState.PRUNED or (
        t.state == TrialState.COMPLETE and "infeasible" not in t.user_attrs
    )


def check_study(trials: list, n_trials: int) -> None:
    """Exactly ``n_trials`` trained, nothing RUNNING, no configuration drawn twice, one run folder per
    trial and one trial per folder, each folder's record naming its own trial."""
    assert sum(trained(t) for t in trials) == n_trials, [(t.number, t.state.name) for t in trials]
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    dirs = [t.user_attrs["run_dir"] for t in trials if "run_dir" in t.user_attrs]
    assert len(dirs) == len(set(dirs)), "two trials share a run folder"
    for t in trials:
        if not trained(t):
            continue
        result = json.loads((Path(t.user_attrs["run_dir"]) / "result.json").read_text())
        assert result["meta"]["trial"] == t.number
        assert result["status"] == ("pruned" if t.state == TrialState.PRUNED else "completed")
    # a continuous parameter drawn twice is a sampler seeded alike in two workers or two runs
    drawn = [
        tuple(sorted(t.params.items()))
        for t in trials
        if "retry_of" not in t.user_attrs
        and "baseline" not in t.user_attrs
        and any(isinstance(v, float) for v in t.params.values())
    ]
    assert len(drawn) == len(set(drawn)), "two trials drew the same configuration"
    if dirs:  # trials/<n>/ holds one run and nothing else
        root = Path(dirs[0]).parent
        assert sorted(p.name for p in root.iterdir()) == sorted(Path(d).name for d in dirs)


def read_record(root: Path) -> dict:
    return json.loads((root / "search.json").read_text())


# ---------------------------------------------------------------- 1-2: a study through the CLI, resumed
S4_STUDY = [*TINY, "search.space=s4", "search.budget=3000"]


@pytest.fixture(scope="module")
def s4_study(tmp_path_factory):
    """``adabudget search`` of 3 trials (S4 space at 3,000 parameters, baselines first), as the CLI
    leaves it: its output, and search.json and best.yaml as they were then (a later test resumes it)."""
    runs = tmp_path_factory.mktemp("s4study") / "runs"
    args = ["search", *S4_STUDY, "search.n_trials=3", f"runs_root={runs}"]
    proc = cli(args, cwd=runs.parent)
    root = runs / "search" / "s4-mr"
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        "args": args,
        "proc": proc,
        "runs": runs,
        "root": root,
        "record": read_record(root),
        "best_yaml": (root / "best.yaml").read_text(),
        "storage": str(root / "journal.log"),
    }


def test_study_end_to_end(s4_study, tmp_path):
    """Every trial in search.json, baselines first, trial folders labelled with study, number and
    params, and best.yaml trains the same method through ``adabudget train experiment=<file>``."""
    record = s4_study["record"]
    assert "study s4-mr" in s4_study["proc"].stdout and "3 trials wanted" in s4_study["proc"].stdout
    rows = record["trials"]
    stored = trials_of(s4_study["storage"], "s4-mr")
    assert [r["number"] for r in rows] == [t.number for t in stored]  # every trial, as in the storage
    assert [r["baseline"] for r in rows[:3]] == ["lora", "adalora", "s4"]  # enqueued first
    assert all(r["baseline"] is None for r in rows[3:])
    assert record["finished"] == 3 and sum(trained(t) for t in stored) == 3
    for row in rows:
        if row["state"] != "complete":
            assert row["state"] == "infeasible" and row["run_dir"] is None and row["infeasible"]
            continue
        result = json.loads((Path(row["run_dir"]) / "result.json").read_text())
        assert result["status"] == "completed"
        assert result["meta"]["study"] == "s4-mr" and result["meta"]["trial"] == row["number"]
        assert result["meta"]["params"] == row["params"]
        assert row["values"] == [result["final"]["dev"]["accuracy"]]
        if row["baseline"] == "adalora":  # its kept triplets fit the budget, whichever matrices win them
            config = yaml.safe_load((Path(row["run_dir"]) / "config.yaml").read_text())
            assert config["method"]["target_params"] == 3000
            assert 0.9 * 3000 <= result["adapter_params_final"] <= 3000
    check_study(stored, 3)
    best = record["best"][0]
    assert best["values"] == [max(r["values"][0] for r in rows if r["state"] == "complete")]

    # best.yaml is an experiment preset: the same method node as the best trial's run
    (tmp_path / "best.yaml").write_text(s4_study["best_yaml"])
    proc = cli(
        [
            "train",
            f"experiment={tmp_path / 'best.yaml'}",
            "model=tiny-bert",
            "debug=fast",
            "train.max_steps=10",
            "train.num_threads=1",
            f"runs_root={tmp_path / 'runs'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = Path(re.search(r"run folder: (\S+)", proc.stdout).group(1)) / "config.yaml"
    trial_config = yaml.safe_load((Path(best["run_dir"]) / "config.yaml").read_text())
    assert yaml.safe_load(config.read_text())["method"] == trial_config["method"]


def test_resume_reaches_the_requested_total(s4_study, capsys):
    """The same command with n_trials=5 after n_trials=3: 5 trained trials, the first ones kept."""
    before = {r["number"]: r["state"] for r in s4_study["record"]["trials"]}
    args = [a.replace("search.n_trials=3", "search.n_trials=5") for a in s4_study["args"][1:]]
    code, out, err = search_here(capsys, *args)
    assert code == 0, err[-3000:]
    assert "5 trials wanted, 3 done" in out
    stored = trials_of(s4_study["storage"], "s4-mr")
    check_study(stored, 5)
    assert {t.number: t.state.name.lower() for t in stored if t.number in before} == {
        n: ("complete" if s == "infeasible" else s) for n, s in before.items()
    }
    assert read_record(s4_study["root"])["finished"] == 5
    # the progress lines' "best" counts the first run's trials too
    earlier = max(
        t.values[0] for t in stored if t.number in before and trained(t) and t.state == TrialState.COMPLETE
    )
    first = re.search(r"best (\S+) \(#(\d+)\)", out)
    assert first and float(first.group(1)) >= float(f"{earlier:.4g}"), out
    # the resumed run draws new configurations, not the first run's again (the sampler's seed)
    drawn = [t.params for t in stored if t.params and "baseline" not in t.user_attrs]
    assert all(a != b for i, a in enumerate(drawn) for b in drawn[i + 1 :]), drawn


def test_dashboard_reads_the_study(s4_study):
    """optuna-dashboard's WSGI app (what ``optuna-dashboard <journal>`` serves) lists the study and
    its trials, read from the journal path alone."""
    optuna_dashboard = pytest.importorskip("optuna_dashboard")
    app = optuna_dashboard.wsgi(s4_study["storage"])

    def get(path: str) -> dict:
        environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
        setup_testing_defaults(environ)
        status = []
        body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
        assert status[0].startswith("200"), (status, body[:500])
        return json.loads(body)

    [summary] = get("/api/studies")["study_summaries"]
    assert summary["study_name"] == "s4-mr"
    detail = get(f"/api/studies/{summary['study_id']}")
    stored = trials_of(s4_study["storage"], "s4-mr")
    assert [t["number"] for t in detail["trials"]] == [t.number for t in stored]
    assert {t["state"] for t in detail["trials"]} >= {"Complete"}
    best = max(t.values[0] for t in stored if trained(t) and t.state == TrialState.COMPLETE)
    assert detail["best_trials"][0]["values"] == [best]


# ---------------------------------------------------------------- 3-4: workers on a journal file
# LoRA with a sampled learning rate: every trial is feasible and has parameters of its own
LR_STUDY = [*TINY, "method=lora", "search.space=lr", "search.enqueue=[]"]


def test_two_workers_journal(tmp_path):
    """Two worker processes on one journal file: exactly n_trials, no duplicate. With a grace period
    of 1 s and heartbeats only at a run's start and end, a live worker's trial must still never be
    taken for a dead one's (its pid is alive on this host)."""
    runs = tmp_path / "runs"
    proc = cli(
        [
            "search",
            *LR_STUDY,
            "train.max_steps=20",
            "train.log_every=20",
            "search.grace_period=1",
            "search.n_trials=4",
            "search.workers=2",
            f"runs_root={runs}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = runs / "search" / "lr-mr"
    stored = trials_of(str(root / "journal.log"), "lr-mr")
    assert [t.state for t in stored] == [TrialState.COMPLETE] * 4
    check_study(stored, 4)
    pids = {t.user_attrs["worker"]["pid"] for t in stored}
    assert len(pids) == 2  # both workers ran trials
    assert read_record(root)["finished"] == 4


def wait_for_running_trial(root: Path, url: str, study: str, proc: subprocess.Popen, timeout: float = 300):
    """A RUNNING trial whose run has logged some training steps. The storage is read only once a
    trial folder has metrics (by then the study exists: reading earlier would create it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read()[-3000:])
        started = [
            p.parent for p in root.glob("trials/*/metrics.jsonl") if len(p.read_text().splitlines()) >= 2
        ]
        if started:
            for t in trials_of(url, study):
                if t.state == TrialState.RUNNING and Path(t.user_attrs.get("run_dir", "")) in started:
                    return t
        time.sleep(0.3)
    raise AssertionError("no trial got far enough")


def sigterm_mid_trial(args: list[str], root: Path, url: str, cwd: Path):
    """Start the search, SIGTERM its main process once a trial trains, let it end; returns the
    process, the running trial, the worker pids of the RUNNING trials then, and stderr."""
    proc = popen_cli(args, cwd)
    try:
        victim = wait_for_running_trial(root, url, "lr-mr", proc)
        workers = {
            t.user_attrs["worker"]["pid"] for t in trials_of(url, "lr-mr") if t.state == TrialState.RUNNING
        }
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, victim, workers, err


def kill_a_worker_mid_trial(args: list[str], root: Path, url: str, study: str, cwd: Path):
    """Start the search, SIGKILL the worker of a running trial, let the command end; returns the
    killed trial and the command's result."""
    import psutil

    proc = popen_cli(args, cwd)
    try:
        victim = wait_for_running_trial(root, url, study, proc)
        pid = victim.user_attrs["worker"]["pid"]
        assert pid in {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}  # a worker process
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    return victim, proc.returncode, out, err


def check_killed_trial_rerun(stored: list, victim, n_trials: int) -> None:
    """The killed trial FAIL with why, re-run once with its parameters, the total exact."""
    killed = next(t for t in stored if t.number == victim.number)
    assert killed.state == TrialState.FAIL
    assert killed.user_attrs.get("failed_because")
    retries = [t for t in stored if t.user_attrs.get("retry_of") == victim.number]
    assert len(retries) == 1, [(t.number, t.user_attrs.get("retry_of")) for t in stored]
    assert retries[0].params == victim.params and retries[0].number > victim.number
    assert trained(retries[0])
    check_study(stored, n_trials)


KILL_SCHEDULE = ["train.max_steps=100", "train.eval_every=25", "train.log_every=2"]


@pytest.mark.slow  # ~40 s idle, ~80 s on a loaded machine: two CLI runs of two workers each
def test_killed_worker_is_rerun(tmp_path):
    """kill -9 of a worker mid-trial: the main process says a worker died and the study is resumable;
    the trial is failed and re-run with the same parameters (by the other worker, or by the same
    command run again), and the study ends with exactly n_trials trained."""
    runs = tmp_path / "runs"
    args = ["search", *LR_STUDY, *KILL_SCHEDULE, "search.n_trials=3", "search.workers=2", f"runs_root={runs}"]
    url = str(runs / "search" / "lr-mr" / "journal.log")
    victim, code, out, err = kill_a_worker_mid_trial(args, runs / "search" / "lr-mr", url, "lr-mr", tmp_path)
    assert code != 0 and "exited with [-9]" in err and "resumable" in err, err[-3000:]
    again = cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    stored = trials_of(url, "lr-mr")
    check_killed_trial_rerun(stored, victim, 3)
    assert "died" in next(t for t in stored if t.number == victim.number).user_attrs["failed_because"]
    row = next(r for r in read_record(runs / "search" / "lr-mr")["trials"] if r["number"] == victim.number)
    assert row["state"] == "fail" and "died" in row["error"]


def test_sigterm_stops_a_one_worker_search(tmp_path):
    """SIGTERM (what a scheduler sends) to a one-worker search mid-trial: the run checkpoints and
    ends interrupted, its trial is failed and queued again, and the search stops with exit 143
    instead of going on with the next trial; the same command then finishes the study with the
    stopped trial's parameters re-run."""
    runs = tmp_path / "runs"
    args = ["search", *LR_STUDY, *KILL_SCHEDULE, "search.n_trials=2", f"runs_root={runs}"]
    root = runs / "search" / "lr-mr"
    url = str(root / "journal.log")
    proc, victim, workers, err = sigterm_mid_trial(args, root, url, tmp_path)
    assert proc.returncode == 143, err[-3000:]
    assert "search interrupted (SIGTERM)" in err and "resumes the study" in err
    stored = trials_of(url, "lr-mr")
    assert [t.state for t in stored] == [TrialState.FAIL, TrialState.WAITING]  # no next trial was started
    assert stored[1].user_attrs["retry_of"] == victim.number
    assert stored[1].system_attrs["fixed_params"] == victim.params  # queued: its parameters are fixed
    result = json.loads((Path(victim.user_attrs["run_dir"]) / "result.json").read_text())
    assert result["status"] == "interrupted" and result["interrupted_by"] == "SIGTERM"
    assert read_record(root)["trials"][0]["state"] == "fail"  # the record is written on the way out

    again = cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    stored = trials_of(url, "lr-mr")
    assert stored[1].state == TrialState.COMPLETE and stored[1].params == victim.params
    check_study(stored, 2)


@pytest.mark.slow  # ~1 min: two workers, then the same command again
def test_sigterm_to_a_multi_worker_search_stops_its_workers(tmp_path):
    """SIGTERM to the main process of a two-worker search (a scheduler's stop): it reaches the
    workers, whose runs checkpoint and end interrupted; no worker outlives the command (before,
    the main process died alone and its workers trained on as orphans); exit 143, and the same
    command then finishes the study."""
    from adabudget.search.liveness import pid_alive

    runs = tmp_path / "runs"
    args = ["search", *LR_STUDY, *KILL_SCHEDULE, "search.n_trials=3", "search.workers=2", f"runs_root={runs}"]
    root = runs / "search" / "lr-mr"
    url = str(root / "journal.log")
    proc, victim, workers, err = sigterm_mid_trial(args, root, url, tmp_path)
    assert victim.user_attrs["worker"]["pid"] in workers and proc.pid not in workers
    assert proc.returncode == 143, err[-3000:]
    # the workers exit with the signal's code, not an uncaught SearchInterrupted (Optuna's own
    # warning about the interrupted trial still logs its exception)
    assert "search interrupted (SIGTERM)" in err and "in worker_main" not in err, err[-3000:]
    deadline = time.time() + 10
    while any(pid_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(pid_alive(pid) for pid in workers)
    stored = trials_of(url, "lr-mr")
    # a worker between trials or before its run started stops too, leaving no trial RUNNING
    assert not any(t.state == TrialState.RUNNING for t in stored), [(t.number, t.state) for t in stored]
    result = json.loads((Path(victim.user_attrs["run_dir"]) / "result.json").read_text())
    assert result["status"] == "interrupted" and result["interrupted_by"] == "SIGTERM"

    again = cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    check_study(trials_of(url, "lr-mr"), 3)


@pytest.mark.slow  # ~15 s: a two-trial search on the tiny LLaMA
def test_longlora_space_searches_a_llama(tmp_path, capsys):
    """``search.space=longlora`` end to end on the tiny LLaMA at a budget: trials train LongLoRA
    with S²-Attn at the drawn group size, their counts at the budget."""
    code, out, err = search_here(
        capsys,
        "model=tiny-llama",
        "debug=fast",
        "train.max_steps=4",
        "train.num_threads=1",
        "search.threads=1",
        "search.space=longlora",
        "search.budget=8192",
        "search.n_trials=2",
        "search.enqueue=none",
        "data.max_length=32",
        f"runs_root={tmp_path}",
    )
    assert code == 0, err[-3000:]
    record = read_record(tmp_path / "search" / next(p.name for p in (tmp_path / "search").iterdir()))
    trained = [t for t in record["trials"] if t["state"] == "complete" and t.get("run_dir")]
    assert len(trained) == 2
    for t in trained:
        result = json.loads((Path(t["run_dir"]) / "result.json").read_text())
        assert result["status"] == "completed" and result["method"] == "longlora"
        assert t["params"]["longlora.group"] in (8, 4, 2) and not t["params"]["longlora.train_embeddings"]


# ---------------------------------------------------------------- 5: pruning
def test_median_pruner_stops_a_bad_trial(tmp_path, capsys):
    """Three good learning rates, then one too small to move (lr 1e-8): its dev MSE at the first
    evaluation is worse than the median of the completed trials', so it is pruned there. Dev MSE
    on the tweets regression task changes with every step of a learning run (accuracy on a tiny
    random model sits at the majority class and ties)."""
    enqueue = "search.enqueue=[{train:{lr:5e-3}},{train:{lr:3e-3}},{train:{lr:2e-3}},{train:{lr:1e-8}}]"
    code, out, err = search_here(
        capsys,
        *TINY,
        "data=tweets",
        "method=lora",
        "search.space=lr",
        enqueue,
        "search.n_trials=4",
        "search.objectives=[dev.mse]",
        "search.pruner=median",
        "train.eval_every=2",
        f"runs_root={tmp_path}",
    )
    assert code == 0, err[-3000:]
    root = tmp_path / "search" / "lr-tweets"
    stored = trials_of(str(root / "journal.log"), "lr-tweets")
    assert [t.state for t in stored] == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED]
    pruned = stored[3]
    result = json.loads((Path(pruned.user_attrs["run_dir"]) / "result.json").read_text())
    assert result["status"] == "pruned" and result["pruned_at"] == 2 < result["total_steps"]
    check_study(stored, 4)
    assert read_record(root)["trials"][3]["state"] == "pruned"


# ---------------------------------------------------------------- 6: PostgreSQL
@pytest.fixture(scope="module")
def postgres():
    from pg import PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    with PostgresServer(bindir) as server:
        yield server


@pytest.mark.slow
def test_two_workers_postgresql(postgres, tmp_path):
    url = postgres.create_db("two_workers")
    runs = tmp_path / "runs"
    proc = cli(
        [
            "search",
            *LR_STUDY,
            "search.n_trials=4",
            "search.workers=2",
            f"search.storage={url}",
            f"runs_root={runs}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = trials_of(url, "lr-mr")
    check_study(stored, 4)
    assert len({t.user_attrs["worker"]["pid"] for t in stored}) == 2
    assert read_record(runs / "search" / "lr-mr")["finished"] == 4


@pytest.mark.slow
def test_killed_worker_is_rerun_postgresql(postgres, tmp_path):
    """As on the journal, on PostgreSQL: one owner of stale trials (``search.liveness``; Optuna's RDB
    heartbeat is off), so the killed trial is failed by ``recover_stale`` (``failed_because``: its
    worker died) and re-run once, never also by a second mechanism with its own retry count."""
    url = postgres.create_db("killed_worker")
    runs = tmp_path / "runs"
    args = [
        "search",
        *LR_STUDY,
        *KILL_SCHEDULE,
        "search.n_trials=3",
        "search.workers=2",
        f"search.storage={url}",
        "search.grace_period=4",
        f"runs_root={runs}",
    ]
    victim, code, out, err = kill_a_worker_mid_trial(args, runs / "search" / "lr-mr", url, "lr-mr", tmp_path)
    assert code != 0 and "exited with [-9]" in err, err[-3000:]
    again = cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    stored = trials_of(url, "lr-mr")
    check_killed_trial_rerun(stored, victim, 3)
    assert "died" in next(t for t in stored if t.number == victim.number).user_attrs["failed_because"]


# ---------------------------------------------------------------- 8: several objectives
@pytest.mark.parametrize("data,metric", [("mr", "accuracy"), ("tweets", "pearson")])
def test_pareto_front_is_the_non_dominated_set(tmp_path, capsys, data, metric):
    """The dev metric up, parameters down (S4 without a budget: sizes vary), NSGA-II: the reported
    front is exactly the non-dominated set of the feasible completed trials. On ``mr`` a tiny random
    model predicts one class, so accuracies tie and only the smallest trial is on the front (equal
    on one objective and better on the other dominates); on ``tweets`` Pearson varies."""
    code, out, err = search_here(
        capsys,
        *TINY,
        f"data={data}",
        "train.max_steps=6",
        "train.lr=5e-3",
        "search.space=s4",
        "search.n_trials=6",
        f"search.objectives=[dev.{metric},params]",
        "search.sampler=nsga2",
        f"runs_root={tmp_path}",
    )
    assert code == 0, err[-3000:]
    record = read_record(tmp_path / "search" / f"s4-{data}")
    assert record["directions"] == ["maximize", "minimize"] and "best" not in record
    done = [r for r in record["trials"] if r["state"] == "complete"]
    assert len(done) == 6 and len({r["values"][1] for r in done}) > 1

    def dominates(a, b) -> bool:
        at_least = a["values"][0] >= b["values"][0] and a["values"][1] <= b["values"][1]
        return at_least and a["values"] != b["values"]

    front = {r["number"] for r in done if not any(dominates(o, r) for o in done)}
    assert {r["number"] for r in record["pareto_front"]} == front
    assert data == "mr" or len(front) > 1  # a real trade-off, not one best trial
    infeasible = {r["number"] for r in record["trials"] if r["state"] == "infeasible"}
    assert infeasible and not infeasible & front  # the s4 preset's 4 groups on 2 layers: never on the front


# ---------------------------------------------------------------- 9: bad inputs
BAD = [
    (["search.space=nope"], "search.space"),
    (["search.budget=10"], "search.budget"),
    (["search.objectives=[dev.pearson]"], "search.objectives"),
    (["search.pruner=median", "search.objectives=[dev.accuracy,params]"], "search.pruner"),
    (["search.storage=sqlite:///{tmp}/s.db", "search.workers=2"], "search.storage"),
]


@pytest.mark.parametrize("overrides,field", BAD, ids=[b[1] for b in BAD])
def test_bad_input_fails_before_any_trial(tmp_path, capsys, overrides, field):
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    code, out, err = search_here(capsys, *TINY, *overrides, f"runs_root={tmp_path / 'runs'}")
    assert code == 2, err[-2000:]
    assert f"config error: {field}" in err
    assert not (tmp_path / "runs").exists()  # no study folder, no trial folder
    assert not (tmp_path / "s.db").exists()


def test_unknown_search_key_is_refused(tmp_path, capsys):
    """Hydra refuses a key the search schema does not have, naming it, before anything runs; a
    config given from Python is checked by the search itself."""
    from adabudget.compose import compose
    from adabudget.config import ConfigError
    from adabudget.search.command import run_search

    code, out, err = search_here(capsys, *TINY, "search.nope=1", f"runs_root={tmp_path / 'runs'}")
    assert code != 0 and "search.nope" in err
    assert not (tmp_path / "runs").exists()
    train_args = [o for o in TINY if not o.startswith("search.")]
    cfg = {**compose([*train_args, f"runs_root={tmp_path / 'runs'}"]), "search": {"nope": 1}}
    with pytest.raises(ConfigError, match=r"search\.nope: unknown key"):
        run_search(cfg)
    assert not (tmp_path / "runs").exists()


def test_unknown_search_key_exit_code(tmp_path, capsys):
    """Hydra reports an override it cannot apply and exits 1; the CLI makes it a config error
    (exit 2) with a line naming the key and the keys that exist."""
    code, out, err = search_here(capsys, *TINY, "search.nope=1", f"runs_root={tmp_path / 'runs'}")
    assert code == 2
    assert "config error: search.nope: unknown key; the keys of search: " in err and "n_trials" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("change", ["search.space=s4", "search.objectives=[dev.f1]"])
def test_existing_study_with_other_settings_is_refused(tmp_path, capsys, change):
    """A study made with one space and objective, reopened with another: refused, naming the study
    and suggesting a new search.study, before any trial and without touching the study."""
    from adabudget.compose import compose
    from adabudget.search.config import register_schema
    from adabudget.search.study import open_study, prepare

    register_schema()
    runs = tmp_path / "runs"
    args = [*TINY, "method=lora", "search.space=lr", "search.study=mine", f"runs_root={runs}"]
    setup = prepare(compose(args, config_name="search"))
    study = open_study(setup, create=True)  # an existing study (its settings saved, baselines queued)
    before = (study.user_attrs, [(t.number, t.state) for t in study.get_trials()])
    key = change.split("=")[0]
    changed = [a for a in args if not a.startswith(key + "=")] + [change]
    code, out, err = search_here(capsys, *changed)
    assert code == 2, err[-2000:]
    assert "search.study=mine: this study exists" in err and "search.study=<new name>" in err
    assert key.split(".")[1] in err  # names the setting that differs
    assert not (runs / "search" / "mine" / "trials").exists()
    study = optuna.load_study(study_name="mine", storage=storage_of(setup.storage))
    assert (study.user_attrs, [(t.number, t.state) for t in study.get_trials()]) == before


# ---------------------------------------------------------------- 10: re-training the best on seeds
def test_retrain_best_and_baselines_on_seeds(tmp_path, capsys):
    """retrain_top_k=1, seeds [1, 2]: the best trial and the LoRA / AdaLoRA baselines re-trained on
    the full schedule (10 steps; trials ran 6), dev and test as mean ± std of 2 seeds; the same
    command again finds them finished and trains nothing."""
    args = [
        *TINY,
        "method=lora",
        "search.space=lr",
        "search.enqueue=[]",
        "search.n_trials=1",
        "search.trial_overrides=['train.max_steps=6']",
        "search.retrain_top_k=1",
        "search.retrain_seeds=[1,2]",
        f"runs_root={tmp_path}",
    ]
    code, out, err = search_here(capsys, *args)
    assert code == 0, err[-3000:]
    root = tmp_path / "search" / "lr-mr"
    report = read_record(root)["retrain"]
    assert report["seeds"] == [1, 2] and report["metric"] == "accuracy"
    assert [row["config"] for row in report["rows"]] == ["trial 0", "lora", "adalora"]
    assert json.loads((root / "trials" / "0" / "result.json").read_text())["steps"] == 6
    for row in report["rows"]:
        results = [json.loads((Path(d) / "result.json").read_text()) for d in row["run_dirs"]]
        assert [r["steps"] for r in results] == [10, 10] and all(r["status"] == "completed" for r in results)
        for split in ("dev", "test"):
            values = [r["final"][split]["accuracy"] for r in results]
            assert row[split]["n"] == 2
            assert row[split]["mean"] == pytest.approx(statistics.mean(values))
            assert row[split]["std"] == pytest.approx(statistics.stdev(values))
        configs = [yaml.safe_load((Path(d) / "config.yaml").read_text()) for d in row["run_dirs"]]
        assert [c["train"]["seed"] for c in configs] == [1, 2]
        if row["config"] == "trial 0":  # the trial's own configuration, not the run's default
            assert {c["train"]["lr"] for c in configs} == {
                trials_of(str(root / "journal.log"), "lr-mr")[0].params["train.lr"]
            }
    assert "| trial 0 |" in out and "±" in out
    made = {p: p.stat().st_mtime_ns for p in (root / "retrain").rglob("result.json")}
    assert len(made) == 6
    folders = set((root / "retrain").rglob("*"))

    code, again, err = search_here(capsys, *args)
    assert code == 0, err[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (root / "retrain").rglob("result.json")} == made
    assert set((root / "retrain").rglob("*")) == folders
    assert len(re.findall(r"^retrain .* seed \d: completed$", again, re.M)) == 6  # read from the records
    assert read_record(root)["retrain"] == report


@pytest.mark.parametrize("objectives", [["dev.accuracy"], ["dev.accuracy", "params"]])
def test_top_trials_gives_k_distinct_configurations(objectives):
    """retrain_top_k=K re-trains the K best distinct configurations (single objective), or the
    Pareto front in order (several): never one trial only, never a repeat or a LoRA / AdaLoRA
    baseline (re-trained as baselines anyway), never an infeasible one."""
    from adabudget.search.record import top_trials
    from adabudget.search.trial import Setup
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    directions = ["maximize"] if len(objectives) == 1 else ["maximize", "minimize"]
    study = optuna.create_study(directions=directions)
    rows = [  # (accuracy, params, user attrs)
        (0.70, 100, {}),
        (0.90, 300, {"baseline": "lora"}),
        (0.85, 200, {}),
        (0.85, 200, {"duplicate_of": 2}),
        (0.80, 50, {}),
        (0.99, 10, {"infeasible": True}),
        (0.60, 400, {"baseline": "s4"}),
        (0.75, 90, {}),
    ]
    for acc, params, attrs in rows:
        values = [acc] if len(objectives) == 1 else [acc, params]
        study.add_trial(
            create_trial(
                values=values,
                params={"x": acc},
                distributions={"x": FloatDistribution(0, 1)},
                user_attrs=attrs,
            )
        )
    setup = Setup(
        base={},
        search={"objectives": objectives},
        study="s",
        storage="",
        root="",
        primary="accuracy",
        regression=False,
        num_labels=2,
    )
    numbers = [t.number for t in top_trials(study, setup, 3)]
    if len(objectives) == 1:
        assert numbers == [
            2,
            4,
            7,
        ]  # 0.85, 0.80, 0.75: the baseline, the repeat and the infeasible one skipped
        assert [t.number for t in top_trials(study, setup, 10)] == [2, 4, 7, 0, 6]
    else:  # front of (max accuracy, min params) among 0, 2, 4, 6, 7: 2 (0.85, 200), 4 (0.80, 50)
        assert numbers == [2, 4]


def test_a_stop_signal_outside_a_training_stops_the_worker_at_a_safe_point(tmp_path):
    """SIGTERM that reaches a worker between trials or between sampling and training (its handler
    only sets ``search.trial.STOP``): the worker asks no new trial, and a trial already asked is
    queued again with its parameters instead of training; both raise SearchInterrupted (exit 143)."""
    from adabudget.compose import compose
    from adabudget.search.config import register_schema
    from adabudget.search.spaces import get_space
    from adabudget.search.study import make_context, make_objective, open_study, prepare
    from adabudget.search.trial import STOP, SearchInterrupted
    from adabudget.search.workers import worker_loop

    register_schema()
    args = [
        *TINY,
        "method=lora",
        "search.space=lr",
        "search.enqueue=none",
        "search.n_trials=2",
        f"runs_root={tmp_path / 'runs'}",
    ]
    setup = prepare(compose(args, config_name="search"))
    study = open_study(setup, create=True)
    STOP["signal"] = "SIGTERM"
    try:
        with pytest.raises(SearchInterrupted) as stopped:
            worker_loop(setup)
        assert stopped.value.code == 143 and study.get_trials() == []  # nothing asked
        trial = study.ask()
        objective = make_objective(setup, make_context(setup), get_space(setup.scfg.space_names()))
        with pytest.raises(SearchInterrupted):
            objective(trial)
        assert not (tmp_path / "runs" / "search" / setup.study / "trials" / str(trial.number)).exists()
        study.tell(trial, state=TrialState.FAIL)
        queued = [t for t in study.get_trials() if t.state == TrialState.WAITING]
        assert len(queued) == 1 and queued[0].user_attrs["retry_of"] == trial.number
        assert queued[0].system_attrs["fixed_params"] == trial.params
    finally:
        STOP["signal"] = None
