"""Hydra launchers (docs/scale-out.md, "A Slurm cluster"): ``adabudget train -m`` through
hydra-joblib-launcher and hydra-submitit-launcher's ``submitit_local`` (real submitit, its local
executor: the same code path as Slurm without a cluster), the adabudget sweeper launching its
trials through a launcher, and the shipped ``hydra/launcher=slurm`` preset up to the sbatch script.

Each job of these runs in another process than the one that launched it: the sweep folder's name
carries the launcher's pid (``${adabudget.pid:}``), resolved once there and cached into every
job's config, so every job lands in one folder and the summary counts them all.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import time
from pathlib import Path

import optuna
import pytest
from adabudget.config import ConfigError
from conftest import cli_env, popen_cli
from optuna.trial import TrialState

pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason='pip install -e ".[dev]" (the scale extra)')
pytest.importorskip(
    "hydra_plugins.hydra_submitit_launcher", reason='pip install -e ".[dev]" (the scale extra)'
)

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=tiny-bert", "debug=fast", "train.num_threads=1", "method.init_r=4"]
# four jobs: one completes, one diverges (lr 1e30: failed), two are refused (target_r 99 > init_r)
MIXED = ["train.max_grad_norm=null", "train.log_every=1", "train.lr=1e30,5e-3", "method.target_r=2,99"]


def run(args: list[str], cwd: Path, timeout: int = 600) -> tuple[int, int, str, str]:
    """``adabudget <args>`` in a fresh interpreter: (its pid, exit code, stdout, stderr)."""
    env = cli_env(TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    proc = popen_cli(args, cwd, env=env)
    out, err = proc.communicate(timeout=timeout)
    return proc.pid, proc.returncode, out, err


def only(paths) -> Path:
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


def check_mixed_sweep(root: Path, launcher_pid: int, out: str) -> Path:
    """One sweep folder named after the launching process; all four jobs in its summary, each run
    trained in another process; the failure and the refusals reported with their reasons."""
    sweep = only(root.glob("default/multirun_*"))
    assert sweep.name.endswith(f"_{launcher_pid}")
    summary = json.loads((sweep / "summary.json").read_text())
    assert [r["job"] for r in summary] == ["0", "1", "2", "3"]
    assert sorted(r["status"] for r in summary) == ["completed", "failed", "refused", "refused"]
    assert "1 of 4 job(s) completed" in out
    for row in summary:
        if row["status"] == "refused":  # no folder; its overrides from <job>.refused.json
            assert row["run_dir"] is None and "method.target_r=99" in row["overrides"]
            assert "method.target_r" in row["error"]
        else:
            result = json.loads((Path(row["run_dir"]) / "result.json").read_text())
            assert Path(row["run_dir"]).parent == sweep and result["pid"] != launcher_pid
            assert "method.target_r=2" in row["overrides"]
    failed = only(r for r in summary if r["status"] == "failed")
    assert "train.lr=1e+30" in failed["overrides"] and "non-finite" in failed["error"]  # as Hydra writes it
    assert re.search(r"job +\d +failed .*\n +non-finite", out)  # the reason printed under its line
    return sweep


def test_joblib_multirun_lands_in_one_sweep_folder_and_counts_every_job(tmp_path):
    pid, code, out, err = run(
        [
            "train",
            "-m",
            *TINY,
            *MIXED,
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"runs_root={tmp_path}",
        ],
        tmp_path,
    )
    assert code == 0, err[-3000:]
    check_mixed_sweep(tmp_path, pid, out)


def test_submitit_local_multirun_lands_in_one_sweep_folder_and_counts_every_job(tmp_path):
    pid, code, out, err = run(
        ["train", "-m", *TINY, *MIXED, "hydra/launcher=submitit_local", f"runs_root={tmp_path}"], tmp_path
    )
    assert code == 0, err[-3000:]
    sweep = check_mixed_sweep(tmp_path, pid, out)
    logs = list((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 4  # submitit's own job folders, one per job, inside the sweep folder


def enqueued_study(storage: Path, name: str, *lrs: float) -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage.parent.mkdir(parents=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name, storage=JournalStorage(JournalFileBackend(str(storage))), direction="maximize"
    )
    for lr in lrs:
        study.enqueue_trial({"train.lr": lr})
    return study


def test_sweeper_launches_its_trials_through_submitit_local(tmp_path):
    """hydra/sweeper=adabudget with hydra/launcher=submitit_local: trials asked in batches of
    n_jobs, each a submitit job (another process); a diverging trial is recorded failed and
    replaced, so the study ends with exactly n_trials finished, each in <sweep>/<trial number>."""
    storage = tmp_path / "default" / "sweeps" / "launched" / "journal.log"
    enqueued_study(storage, "launched", 5e-3, 1e30, 4e-3)
    pid, code, out, err = run(
        [
            "train",
            "-m",
            "hydra/sweeper=adabudget",
            "hydra/launcher=submitit_local",
            *TINY,
            "method.target_r=2",
            f"runs_root={tmp_path}",
            "hydra.sweeper.study_name=launched",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.max_failure_rate=0.5",
            "train.max_grad_norm=null",
            "train.log_every=1",
            "train.max_steps=6",
            "train.eval_every=3",
            "train.lr=choice(5e-3,4e-3,1e30)",
        ],
        tmp_path,
    )
    assert code == 0, err[-3000:]
    assert "launched through hydra/launcher=submitit_local in batches of 2" in out
    study = optuna.load_study(
        study_name="launched",
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(storage))),
    )
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert "non-finite" in study.trials[1].user_attrs["error"]
    sweep = only(tmp_path.glob("default/multirun_*"))
    assert sweep.name.endswith(f"_{pid}")
    for trial in study.trials:
        run_dir = Path(trial.user_attrs["run_dir"])
        assert run_dir == sweep / str(trial.number)  # numbered after the trial, not the launcher's job
        result = json.loads((run_dir / "result.json").read_text())
        assert result["pid"] != pid  # a submitit job, not the sweep's process
        assert result["meta"]["trial"] == trial.number and result["meta"]["params"] == trial.params
        if trial.state == TrialState.COMPLETE:
            assert trial.value == result["final"]["dev"]["accuracy"]
            assert set(trial.intermediate_values) == {3, 6}  # reported from the job's process
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) == 3
    summary = json.loads((sweep / "summary.json").read_text())
    assert sorted(r["status"] for r in summary) == ["completed", "completed", "failed"]
    record = json.loads((storage.parent / "sweep.json").read_text())
    assert record["finished"] == 2 and record["n_trials"] == 2


def launched_config(launcher: str):
    """The composed ``adabudget train`` config with ``hydra/launcher=<launcher>``, Hydra's node included."""
    from adabudget.compose import config_dir, register_configs
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", [f"hydra/launcher={launcher}"], return_hydra_config=True)


def test_a_password_in_the_storage_url_is_refused_with_a_launcher():
    """A launched job opens the study in its own process or machine: the URL it gets has no
    password (nothing pickled to submitit's folder holds one), so one given in the URL is refused."""
    from adabudget.search.sweeper import SweeperImpl

    sweeper = SweeperImpl(storage="postgresql://me:s3cret@db.example/optuna")
    with pytest.raises(
        ConfigError, match="storage=postgresql://me@db.example/optuna: with hydra/launcher=joblib each"
    ) as err:
        sweeper.setup(hydra_context=None, task_function=None, config=launched_config("joblib"))
    assert "PGPASSWORD" in str(err.value) and "s3cret" not in str(err.value)


@pytest.mark.parametrize("key, value", [("devices", [0, 1]), ("gpus_per_trial", 1)])
def test_the_pools_gpus_are_refused_with_a_launcher(key, value):
    """The pool's GPU settings place local processes; a launcher places its jobs itself."""
    from adabudget.search.sweeper import SweeperImpl

    sweeper = SweeperImpl(**{key: value})
    with pytest.raises(
        ConfigError, match=f"hydra.sweeper.{key}: .* with hydra/launcher=slurm .*gpus_per_task"
    ):
        sweeper.setup(hydra_context=None, task_function=None, config=launched_config("slurm"))


def test_ctrl_c_stops_waiting_for_a_launched_batch(tmp_path):
    """Ctrl-C while the sweeper waits for its batch: it stops waiting, says what runs on, writes
    the study record and exits 130; the trials are left running, to be re-queued as stale."""
    env = cli_env(TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    args = [
        "train",
        "-m",
        "hydra/sweeper=adabudget",
        "hydra/launcher=submitit_local",
        *TINY,
        "method.target_r=2",
        f"runs_root={tmp_path}",
        "hydra.sweeper.study_name=stopped",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "train.max_steps=100000",
        "train.eval_every=0",
        "train.lr=choice(5e-3,4e-3)",
    ]
    # stderr to a file: the jobs left running hold the command's pipes open after it exits
    with (tmp_path / "stderr.txt").open("w") as stderr:
        proc = popen_cli(args, tmp_path, env=env, start_new_session=True, stderr=stderr)
    try:
        launched = [line for _, line in zip(range(2), (x for x in proc.stdout if " launched: " in x))]
        assert len(launched) == 2, (tmp_path / "stderr.txt").read_text()[-3000:]
        time.sleep(3)
        os.kill(proc.pid, signal.SIGINT)  # the sweep's process only, as a user's kill -INT would
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.killpg(proc.pid, signal.SIGKILL)  # the submitit jobs it left running
        proc.stdout.close()
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, err[-3000:]
    assert "stopped waiting: 2 launched job(s) run on" in err
    record = json.loads((tmp_path / "default" / "sweeps" / "stopped" / "sweep.json").read_text())
    assert [t["state"] for t in record["trials"]] == ["running", "running"] and record["finished"] == 0


def fake_slurm(bin_dir: Path, script_copy: Path) -> None:
    """``sbatch`` that keeps the submitted script and answers like Slurm; ``srun`` that exists."""
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {script_copy}\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(stat.S_IRWXU)


def test_slurm_preset_asks_for_gpus_time_and_usr1_before_the_limit(tmp_path):
    """``hydra/launcher=slurm`` down to the sbatch script submitit writes (sbatch itself faked):
    the partition, one GPU per task, the time limit, and SIGUSR1 90 s before it, which adabudget
    takes as a stop request that checkpoints (budget/signals.py)."""
    script = tmp_path / "job.sh"
    fake_slurm(tmp_path / "bin", script)
    env = cli_env(TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    args = [
        "train",
        "-m",
        *TINY,
        "method.target_r=2",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "train.seed=0,1",
    ]
    proc = popen_cli([*args, f"runs_root={tmp_path}"], tmp_path, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not script.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert script.exists(), proc.communicate(timeout=60)[1][-3000:] if proc.poll() is not None else ""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # it would wait for the job forever: there is no Slurm
        proc.communicate(timeout=60)
    text = script.read_text()
    for flag in (
        "--partition=gpu",
        "--gpus-per-task=1",
        "--time=240",
        "--signal=USR1@90",
        "--array=0-1%2",
        "--job-name=adabudget_default",
    ):
        assert f"#SBATCH {flag}\n" in text, text
    assert "USR2" not in text  # submitit's own requeue signal is replaced
    sweep = only(tmp_path.glob("default/multirun_*"))
    assert f"{sweep}/.submitit/" in text  # the jobs' logs, inside the one sweep folder
