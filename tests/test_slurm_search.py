"""A search whose workers are submitit jobs (``search.launcher``, search/launch.py): submitit's
LocalExecutor runs the very code path of ``search.launcher=slurm`` without a cluster. Exactly
``n_trials`` on a journal file and on PostgreSQL, the re-training run once, ``search.wait=false``
returning at once and the same command adopting, resuming and reporting; the Slurm job's options
(``--signal=USR1@90``) read from the sbatch text submitit would submit.

Commands run as a user runs them: the CLI in a subprocess (the jobs are processes of their own).
What counts as trained is computed from the storage (tests/test_search.py's helpers).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import cli, search_here
from optuna.trial import TrialState
from test_search import LR_STUDY, TINY, check_study, read_record, trials_of, wait_for_running_trial

LOCAL = ["search.launcher=local", "search.workers=2"]


def jobs_of(root: Path) -> list[dict]:
    return json.loads((root / "jobs.json").read_text())["jobs"]


def job_pids(jobs: list[dict]) -> set[int]:
    """The processes of the jobs (submitit's controller, whose pid is the job id, and its task)."""
    import psutil

    pids = set()
    for job in jobs:
        try:
            controller = psutil.Process(int(job["id"]))
        except psutil.NoSuchProcess:
            continue
        pids |= {controller.pid, *(p.pid for p in controller.children(recursive=True))}
    return pids


# ---------------------------------------------------------------- journal file, waiting, one re-training
def test_search_through_submitit_local_jobs_on_a_journal(tmp_path):
    """Two worker jobs on one journal: exactly n_trials from both jobs (not the command's process),
    their ids and logs printed and recorded, then the best and the baselines re-trained once."""
    runs = tmp_path / "runs"
    args = [
        "search",
        *LR_STUDY,
        *LOCAL,
        "search.n_trials=3",
        "search.retrain_top_k=1",
        "search.retrain_seeds=[1]",
        f"runs_root={runs}",
    ]
    proc = cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    root = runs / "search" / "lr-mr"
    stored = trials_of(str(root / "journal.log"), "lr-mr")
    check_study(stored, 3)
    jobs = jobs_of(root)
    assert len(jobs) == 2 and {j["launcher"] for j in jobs} == {"local"}
    for job in jobs:
        assert f"job {job['id']}: submitted" in proc.stdout
        assert Path(job["stdout"]).parent == (root / "jobs" / job["id"]).resolve()
        assert Path(job["stdout"]).exists() and Path(job["stderr"]).exists()
    assert "2 worker job(s) (local)" in proc.stdout
    # the trials ran in both jobs (the command itself runs no worker with a launcher)
    workers = {t.user_attrs["worker"]["pid"] for t in stored if "worker" in t.user_attrs}
    assert len(workers) == 2
    assert read_record(root)["finished"] == 3
    # re-trained once: one run per configuration and seed, one table
    report = read_record(root)["retrain"]
    assert [row["config"] for row in report["rows"]][1:] == ["lora", "adalora"]
    for row in report["rows"]:
        folder = root / "retrain" / row["config"].replace(" ", "_") / "s1"
        assert len(list(folder.glob("*/result.json"))) == 1
    assert proc.stdout.count("| configuration |") == 1
    assert not (root / "retrain.claim").exists()  # given back

    made = {p: p.stat().st_mtime_ns for p in (root / "retrain").rglob("result.json")}
    again = cli(args, cwd=tmp_path)  # full: nothing submitted, nothing re-trained
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(jobs_of(root)) == 2 and "submitted" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (root / "retrain").rglob("result.json")} == made
    assert len(trials_of(str(root / "journal.log"), "lr-mr")) == len(stored)


# ---------------------------------------------------------------- wait=false, killed jobs, the same command
def test_wait_false_returns_and_the_same_command_resumes_after_the_jobs_died(tmp_path):
    """``search.wait=false`` returns while its jobs train; the jobs are then killed mid-trial (a
    node lost); the same command submits two new jobs, re-queues the killed trial and ends with
    exactly n_trials; a third finds the study full and only reports."""
    runs = tmp_path / "runs"
    root = runs / "search" / "lr-mr"
    url = str(root / "journal.log")
    args = [
        "search",
        *LR_STUDY,
        *LOCAL,
        "search.n_trials=4",
        "train.eval_every=1000",
        f"runs_root={runs}",
    ]
    # long trials for the first command's jobs (killed mid-trial), short ones after: the schedule
    # is no setting of the study (train.max_steps), so the same study resumes with it
    long = ["train.max_steps=5000", "train.log_every=2"]
    started = time.time()
    first = cli([*args, *long, "search.wait=false"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "not waiting (search.wait=false)" in first.stdout
    assert time.time() - started < 120  # it did not wait for 4 trials of 5,000 steps
    jobs = jobs_of(root)
    assert len(jobs) == 2
    idle = subprocess.Popen(["sleep", "600"], stderr=subprocess.PIPE, text=True)  # wait_for_running_trial's
    try:
        victim = wait_for_running_trial(root, url, "lr-mr", idle)
    finally:
        idle.kill()
        idle.communicate()
    deadline = time.time() + 120  # both jobs mid-trial (a folder and logged steps), then both killed
    while time.time() < deadline:
        running = [t for t in trials_of(url, "lr-mr") if t.state == TrialState.RUNNING]
        if len(running) == 2 and all(
            (Path(t.user_attrs.get("run_dir", "-")) / "metrics.jsonl").exists() for t in running
        ):
            break
        time.sleep(0.3)
    for pid in job_pids(jobs):
        os.kill(pid, signal.SIGKILL)
    time.sleep(1)

    second = cli(args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:] + second.stdout[-3000:]
    assert len(jobs_of(root)) == 4 and second.stdout.count(": submitted;") == 2
    stored = trials_of(url, "lr-mr")
    check_study(stored, 4)
    killed = next(t for t in stored if t.number == victim.number)
    assert killed.state == TrialState.FAIL and killed.user_attrs.get("failed_because")
    assert [t for t in stored if t.user_attrs.get("retry_of") == victim.number]
    assert read_record(root)["finished"] == 4

    third = cli([*args, "search.wait=false"], cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert len(jobs_of(root)) == 4 and "not waiting" not in third.stdout
    assert "4 trials wanted, 4 done" in third.stdout


# ---------------------------------------------------------------- PostgreSQL
def test_search_through_submitit_local_jobs_on_postgresql(postgres, tmp_path):
    url = postgres.create_db("submitit_jobs")
    runs = tmp_path / "runs"
    proc = cli(
        ["search", *LR_STUDY, *LOCAL, "search.n_trials=4", f"search.storage={url}", f"runs_root={runs}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    stored = trials_of(url, "lr-mr")
    check_study(stored, 4)
    assert len({t.user_attrs["worker"]["pid"] for t in stored}) == 2
    assert len(jobs_of(runs / "search" / "lr-mr")) == 2
    assert read_record(runs / "search" / "lr-mr")["finished"] == 4


# ---------------------------------------------------------------- the re-training claim
def test_retraining_is_skipped_while_another_process_holds_its_claim(tmp_path, capsys):
    """Two commands ending one search (two machines): the one holding ``retrain.claim`` re-trains,
    the other says so and trains nothing; given back, the next command re-trains."""
    from adabudget.procs import claim

    args = [
        *LR_STUDY,
        "search.n_trials=1",
        "search.retrain_top_k=1",
        "search.retrain_seeds=[1]",
        f"runs_root={tmp_path}",
    ]
    root = tmp_path / "search" / "lr-mr"
    root.mkdir(parents=True)
    assert claim(root / "retrain.claim")  # this live process holds it
    code, out, err = search_here(capsys, *args)
    assert code == 0, err[-3000:]
    assert "re-training: " in out and "held by another process" in out
    assert not (root / "retrain").exists()
    assert not read_record(root).get("retrain")
    (root / "retrain.claim").unlink()
    code, out, err = search_here(capsys, *args)
    assert code == 0, err[-3000:]
    assert len(list((root / "retrain").rglob("result.json"))) == 3
    assert "| configuration |" in out and not (root / "retrain.claim").exists()


# ---------------------------------------------------------------- Slurm's options, bad input
def test_slurm_job_asks_for_the_partition_gpus_time_and_usr1_before_the_limit(tmp_path):
    """The sbatch text submitit writes for one worker job: USR1 (adabudget's stop request), not
    submitit's USR2, ``signal_delay_s`` before the limit, and ``search.slurm``'s resources."""
    from adabudget.search.launch import slurm_parameters
    from adabudget.search.trial import Setup
    from submitit.slurm.slurm import _make_sbatch_string

    search = {
        "study": "s",
        "slurm": {
            "partition": "gpu",
            "gpus_per_task": 1,
            "cpus_per_task": 4,
            "mem_gb": 32,
            "timeout_min": 120,
            "additional": {"constraint": "a100"},
        },
    }
    setup = Setup({}, search, "s", "x.log", str(tmp_path), "accuracy", False, 2)
    text = _make_sbatch_string(command="python -m x", folder=tmp_path / "%j", **slurm_parameters(setup))
    lines = set(text.splitlines())
    for flag in (
        "--signal=USR1@90",
        "--partition=gpu",
        "--gpus-per-task=1",
        "--cpus-per-task=4",
        "--mem=32GB",
        "--time=120",
        "--constraint=a100",
        "--ntasks-per-node=1",
    ):
        assert f"#SBATCH {flag}" in lines, text
    assert not any("USR2" in line for line in lines)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["search.launcher=kubernetes"], "search.launcher"),
        (["search.wait=false"], "search.wait"),
        (["search.launcher=local", "search.slurm.timeout_min=0"], "search.slurm.timeout_min"),
        (
            ["search.launcher=local", "search.slurm.signal_delay_s=600", "search.slurm.timeout_min=5"],
            "search.slurm.signal_delay_s",
        ),
        (["search.launcher=slurm"], "search.launcher"),  # no srun on this machine
    ],
)
def test_bad_launcher_settings_are_refused_before_any_job(tmp_path, capsys, overrides, field):
    code, out, err = search_here(capsys, *TINY, "search.n_trials=1", *overrides, f"runs_root={tmp_path}")
    assert code == 2, (out, err)
    assert f"config error: {field}" in err
    assert not list(tmp_path.rglob("jobs.json"))


# ---------------------------------------------------------------- SIGUSR1: Slurm's warning before the limit
def test_sigusr1_to_a_job_stops_its_trial_requeues_it_and_ends_the_job(tmp_path):
    """What ``--signal=USR1@90`` does before a job's time limit: the running trial stops at the end
    of its step, is failed and queued again with its parameters, and the worker job ends."""
    import psutil

    runs = tmp_path / "runs"
    root = runs / "search" / "lr-mr"
    url = str(root / "journal.log")
    args = [*LR_STUDY, "search.launcher=local", "search.workers=1", "search.n_trials=2"]
    long = ["train.max_steps=5000", "train.log_every=2", "train.eval_every=1000", "search.wait=false"]
    first = cli(["search", *args, *long, f"runs_root={runs}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    idle = subprocess.Popen(["sleep", "600"], stderr=subprocess.PIPE, text=True)
    try:
        victim = wait_for_running_trial(root, url, "lr-mr", idle)
    finally:
        idle.kill()
        idle.communicate()
    worker = psutil.Process(victim.user_attrs["worker"]["pid"])
    worker.send_signal(signal.SIGUSR1)
    worker.wait(timeout=120)  # the job ends: no next trial
    stored = trials_of(url, "lr-mr")
    stopped = next(t for t in stored if t.number == victim.number)
    assert stopped.state == TrialState.FAIL and "SIGUSR1" in str(stopped.user_attrs.get("error"))
    again = [t for t in stored if t.user_attrs.get("retry_of") == victim.number]
    assert len(again) == 1 and again[0].state == TrialState.WAITING
    assert again[0].system_attrs["fixed_params"] == victim.params  # queued with its parameters
    result = json.loads((Path(victim.user_attrs["run_dir"]) / "result.json").read_text())
    assert result["status"] == "interrupted" and result["interrupted_by"] == "SIGUSR1"
    assert 0 < result["steps"] < 5000  # stopped at the end of a step, mid-schedule
