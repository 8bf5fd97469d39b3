"""The README's main-job command itself (``adabudget train``), shortened by overrides, run as
a user runs it: a subprocess of the installed console script."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import cli as run_cli
from conftest import popen_cli

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start_commands() -> list[str]:
    """The shell commands of the README's quick start (the first ```bash block after it)."""
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_quick_start_has_two_commands():
    commands = quick_start_commands()
    assert len(commands) == 2
    assert commands[0].rstrip().endswith("adabudget train")
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert commands[1] in ci, ".ci/run must run exactly the README's test command"


def test_main_job_command_shortened(tmp_path):
    """`adabudget train` from the README, shortened: tiny model, 24 steps."""
    main_job = quick_start_commands()[0].split("&&")[-1].split()
    assert main_job == ["adabudget", "train"]
    shorten = [
        "model=tiny-bert",
        "debug=fast",
        "method.init_r=4",
        "method.target_r=2",
        f"runs_root={tmp_path}",
    ]
    proc = run_cli(main_job[1:] + shorten, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "status: completed" in out
    assert re.search(r"dev: accuracy=0\.\d+", out)
    assert "final rank allocation (sum 24 over 12 matrices)" in out
    run_dir = Path(re.search(r"run folder: (\S+)", out).group(1))
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed"
    assert (run_dir / ".hydra" / "overrides.yaml").exists()  # Hydra's record lands in the same folder


def test_cli_config_error_exit_code(tmp_path):
    proc = run_cli(["train", "model=tiny-bert", "method.target_r=99", f"runs_root={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "method.target_r" in proc.stderr


def test_data_command(tmp_path):
    proc = run_cli(["data", "data=tweets"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tweets" in proc.stdout and "3360" in proc.stdout.replace(",", "")


@pytest.mark.slow
def test_main_job_full(tmp_path):
    """The real quick-start job: AdaLoRA on packaged MiniLM + mr, one epoch (~4-6 min)."""
    proc = run_cli(["train", f"runs_root={tmp_path}", "train.progress=false"], cwd=tmp_path, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracy = float(re.search(r"dev: accuracy=(0\.\d+)", proc.stdout).group(1))
    assert accuracy > 0.70  # chance is 0.5; one LoRA epoch reaches ~0.82 (docs/reference.md)


# ---------------------------------------------------------------- what a user hits
TINY = ["model=tiny-bert", "debug=fast", "method.init_r=4", "method.target_r=2", "train.num_threads=1"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.nope=1", "config error: train.nope: unknown key; the keys of train: epochs, max_steps"),
        ("nope=1", "config error: nope: unknown key; the keys of the config: model, data"),
        ("train.lr=abc", "config error: train.lr: Value 'abc'"),
    ],
    ids=["unknown-key", "unknown-top-key", "bad-type"],
)
def test_override_hydra_cannot_apply_is_a_config_error(tmp_path, override, message):
    """Hydra reports such an override and exits 1 before any job; the CLI makes it exit 2, as
    every other config error, with a line naming the key (and, for an unknown one, the keys)."""
    proc = run_cli(["train", "model=tiny-bert", override, f"runs_root={tmp_path / 'runs'}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert not (tmp_path / "runs").exists()


def folders(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_dir()}


def test_refused_config_leaves_no_folder(tmp_path):
    proc = run_cli(["train", *TINY, "method.target_r=99", f"runs_root={tmp_path / 'runs'}"], cwd=tmp_path)
    assert proc.returncode == 2 and "method.target_r" in proc.stderr
    assert folders(tmp_path) == set()  # neither Hydra's output folder nor a run folder


def test_multirun_survives_failed_and_refused_jobs(tmp_path):
    """-m: one job diverges (lr 1e30), one is refused (target_r 99): the sweep goes on to the end,
    and leaves a summary of its jobs."""
    proc = run_cli(
        [
            "train",
            "-m",
            *TINY,
            "train.max_grad_norm=null",
            "train.log_every=1",
            "train.lr=1e30,5e-3",
            "method.target_r=2,99",
            f"runs_root={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list(tmp_path.glob("default/multirun_*"))
    assert len(sweeps) == 1
    summary = json.loads((sweeps[0] / "summary.json").read_text())
    assert sorted(r["status"] for r in summary) == ["completed", "failed", "refused", "refused"]
    assert [r["job"] for r in summary] == ["0", "1", "2", "3"]
    assert proc.stderr.count("config error: method.target_r") == 2
    assert "1 of 4 job(s) completed" in proc.stdout
    assert all("method.target_r=99" in r["overrides"] for r in summary if r["status"] == "refused")
    for row in summary:  # each run's record in its own folder, with Hydra's record beside it
        if row["run_dir"]:
            assert (Path(row["run_dir"]) / ".hydra" / "overrides.yaml").exists()
        else:
            assert "method.target_r" in row["error"]
    ran = sorted(r["job"] for r in summary if r["run_dir"])
    assert sorted(p.name for p in sweeps[0].iterdir() if p.is_dir()) == ran  # refused jobs: no folder


def test_runs_started_together_get_their_own_folders(tmp_path):
    procs = [
        popen_cli(
            [
                "train",
                *TINY,
                "train.max_steps=4",
                "train.eval_every=0",
                f"train.seed={s}",
                f"runs_root={tmp_path}",
            ],
            tmp_path,
        )
        for s in range(3)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    dirs = [Path(re.search(r"run folder: (\S+)", o[0]).group(1)) for o in outs]
    assert len(set(dirs)) == 3
    seeds = {yaml.safe_load((d / "config.yaml").read_text())["train"]["seed"] for d in dirs}
    assert seeds == {0, 1, 2}
    for d in dirs:
        steps = [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(steps)  # nobody else's lines in between


@pytest.mark.slow  # ~20 s: several CLI runs into one folder
def test_explicit_run_dir_is_never_reused(tmp_path):
    target = tmp_path / "mine"
    first = run_cli(
        ["train", *TINY, "train.max_steps=4", "train.eval_every=0", f"run_dir={target}"], cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr[-2000:]
    before = (target / "metrics.jsonl").read_text()
    for again in ([f"run_dir={target}"], [f"hydra.run.dir={target}"]):
        proc = run_cli(["train", *TINY, "train.max_steps=4", *again], cwd=tmp_path)
        assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert (target / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(
    "sig, code", [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)]
)  # the SIGINT case is slow (15 s); the SIGTERM case stays in the default suite
def test_signal_checkpoints_and_resumes(tmp_path, sig, code):
    """What a scheduler (SIGTERM) or Ctrl-C (SIGINT) does: a checkpoint, status interrupted with
    the resume command, a clean exit; the resume finishes the run."""
    proc = popen_cli(
        [
            "train",
            *TINY,
            "train.max_steps=400",
            "train.eval_every=0",
            "train.log_every=1",
            "train.checkpoint=end",
            f"runs_root={tmp_path}",
        ],
        tmp_path,
    )
    metrics = _wait_for_steps(tmp_path, 5, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err
    run_dir = metrics.parent
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "interrupted" and result["interrupted_by"] == sig.name
    assert result["resume_with"] == f"adabudget train resume={run_dir}" and "continue with:" in out
    assert (run_dir / "checkpoints" / "last.pt").exists()
    resumed = run_cli(["train", f"resume={run_dir}", "train.max_steps=40"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"


@pytest.mark.slow  # ~27 s: a run killed mid-interval, then resumed
def test_kill_9_loses_at_most_one_interval(tmp_path):
    """SIGKILL mid-run: the periodic checkpoint (every 5 steps here) is where resume goes on from;
    the record holds every step once and ends like an uninterrupted run's."""
    common = [*TINY, "train.max_steps=60", "train.eval_every=20", "train.log_every=1", "model.dropout=0.0"]
    proc = popen_cli(["train", *common, "train.checkpoint_every=5", f"runs_root={tmp_path / 'k'}"], tmp_path)
    metrics = _wait_for_steps(tmp_path / "k", 23, proc)
    proc.kill()
    proc.communicate(timeout=60)
    run_dir = metrics.parent
    assert json.loads((run_dir / "result.json").read_text())["status"] == "running"  # what kill -9 leaves
    step = torch_load_step(run_dir)
    assert step >= 20  # at most one interval (5 steps) lost
    resumed = run_cli(["train", f"resume={run_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = run_cli(["train", *common, f"runs_root={tmp_path / 'full'}"], cwd=tmp_path)
    full_dir = Path(re.search(r"run folder: (\S+)", full.stdout).group(1))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys))  # nothing logged twice
    final = json.loads((run_dir / "result.json").read_text())
    assert final["final"] == json.loads((full_dir / "result.json").read_text())["final"]


def torch_load_step(run_dir: Path) -> int:
    import torch

    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"]


def _wait_for_steps(root: Path, steps: int, proc, timeout: float = 300) -> Path:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in root.rglob("metrics.jsonl"):
            lines = path.read_text().splitlines()
            if lines and json.loads(lines[-1]).get("step", 0) >= steps:
                return path
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read()[-3000:])
        time.sleep(0.05)
    raise AssertionError("the run did not get far enough")


def test_shell_completion(tmp_path):
    install = run_cli(["train", "-sc", "install=bash"], cwd=tmp_path)
    assert install.returncode == 0
    assert install.stdout.rstrip().endswith("hydra_bash_completion adabudget")
    env = dict(os.environ, COMP_LINE="adabudget train meth", COMP_POINT="20")
    cmd = [sys.executable, "-c", "from adabudget.cli import main; main()", "-sc", "query=bash"]
    query = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert query.returncode == 0, query.stderr
    assert "method" in query.stdout.split()
    env.update(COMP_LINE="adabudget train method=", COMP_POINT="24")
    presets = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120).stdout
    assert "method=lora" in presets.split() and "method=s4" in presets.split() and "schema" not in presets
    env["COMP_LINE"] = "adabudget tr"
    sub = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "train" in sub.stdout.split()


def test_schemas_are_not_presets(tmp_path):
    proc = run_cli(["train", *TINY, "method=lora_schema"], cwd=tmp_path)
    assert proc.returncode != 0 and "lora_schema" in proc.stderr
    helptext = run_cli(["train", "--help"], cwd=tmp_path).stdout
    method_line = next(line for line in helptext.splitlines() if line.startswith("method:"))
    assert "_schema" not in method_line and "lora" in method_line


def test_failed_run_summary(tmp_path):
    proc = run_cli(
        [
            "train",
            *TINY,
            "train.lr=1e30",
            "train.max_grad_norm=null",
            "train.log_every=1",
            f"runs_root={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "status: failed" in proc.stdout and "rank allocation" not in proc.stdout
    assert "non-finite" in proc.stdout


def test_summary_rank_grid_is_compact(tmp_path):
    proc = run_cli(["train", *TINY, f"runs_root={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grid = proc.stdout[proc.stdout.index("rank allocation") :].splitlines()[1:4]
    assert grid[0].split() == ["layer", "q", "k", "v", "o", "ffn_in", "ffn_out"]
    assert max(len(line) for line in grid) < 60
    assert "LOAD REPORT" not in proc.stdout + proc.stderr and "\x1b[" not in proc.stdout + proc.stderr


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the error on a machine without CUDA"
)
def test_cuda_without_cuda_is_a_config_error(tmp_path):
    proc = run_cli(["train", *TINY, "train.device=cuda", f"runs_root={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 2 and "train.device=cuda" in proc.stderr and "Traceback" not in proc.stderr
