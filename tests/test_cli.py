"""The README's main-job command itself (``adabudget train``), shortened by overrides, run as
a user runs it: a subprocess of the installed console script."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start_commands() -> list[str]:
    """The shell commands of the README's quick start (the first ```bash block after it)."""
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-c", "from budget.cli import main; main()", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


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
    assert accuracy > 0.70  # chance is 0.5; one LoRA epoch reaches ~0.82 (REFERENCE.md)
