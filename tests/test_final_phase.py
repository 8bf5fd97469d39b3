"""The end of a run is as safe as its middle (issue 17, section 5): the final phase (checkpoint at
T, final evaluation, the methods' final hooks, export) runs under the loop's signal handler and
``try``; non-finite weights never reach a checkpoint or an allocation; SIGHUP and SIGUSR1 stop a
run like SIGTERM; the signal handler only sets a flag."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adabudget.compose import resume_config
from adabudget.signals import StopSignals
from adabudget.training import train
from conftest import TINY_ADALORA, TINY_RUN


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"]


# A run in its own process that sends itself ``sig`` from its dev evaluation at step ``at``
# (at T: inside the final phase): what a scheduler's signal at that moment does.
SIGNALLED = """
import json, os, signal, sys
import torch
from adabudget.compose import compose
from adabudget.training import train

torch.set_num_threads(1)
sig, at, overrides = getattr(signal, sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])

def on_eval(step, metrics):
    if step == at:
        os.kill(os.getpid(), sig)

print(json.dumps(train(compose(overrides), on_eval=on_eval)))
"""


def run_signalled(tmp_path: Path, sig: str, at: int, *overrides: str) -> dict:
    args = [*TINY_RUN, *TINY_ADALORA, f"runs_root={tmp_path / 'runs'}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-c", SIGNALLED, sig, str(at), json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_an_error_in_the_final_evaluation_fails_the_run_and_resume_runs_only_the_final_phase(compose_run):
    """The checkpoint at T comes before the final evaluation: an error there ends the run
    ``failed`` (no longer ``running`` forever) and loses no training step; resume runs the final
    phase alone (not "already completed") and the record ends as an unbroken run's does."""
    full = train(compose_run("run_name=full"))

    def on_eval(step, metrics):
        if step == 24:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        train(compose_run("run_name=broken"), on_eval=on_eval)
    run_dir = next((Path(full["run_dir"]).parents[1] / "broken").iterdir())
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "failed" and "No space left on device" in result["error"]
    assert checkpoint_step(run_dir) == 24
    resumed = train(resume_config(run_dir))
    assert resumed["status"] == "completed" and "note" not in resumed
    assert resumed["final"] == full["final"] and resumed["ranks"] == full["ranks"]
    assert read_jsonl(run_dir / "metrics.jsonl") == read_jsonl(Path(full["run_dir"]) / "metrics.jsonl")
    assert read_jsonl(run_dir / "ranks.jsonl") == read_jsonl(Path(full["run_dir"]) / "ranks.jsonl")
    assert (run_dir / "adapter" / "adapter_config.json").exists()


def test_a_signal_in_the_final_phase_interrupts_and_resume_finishes(tmp_path):
    """SIGTERM during the final evaluation: killed with ``status: running`` before; now
    ``interrupted`` with the checkpoint at T, and the resume runs only the final phase."""
    result = run_signalled(tmp_path, "SIGTERM", 24)
    run_dir = Path(result["run_dir"])
    assert result["status"] == "interrupted" and result["interrupted_by"] == "SIGTERM"
    assert result["steps"] == 24 and checkpoint_step(run_dir) == 24
    assert result["resume_with"] == f"adabudget train resume={run_dir}"
    assert json.loads((run_dir / "result.json").read_text())["status"] == "interrupted"
    resumed = train(resume_config(run_dir))
    assert resumed["status"] == "completed" and "note" not in resumed
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["split"] for r in rows if r["step"] == 24] == ["train", "dev", "test"]  # evaluated once


@pytest.mark.parametrize("sig", ["SIGHUP", "SIGUSR1"])  # a closed SSH session; Slurm's --signal=USR1@90
def test_sighup_and_sigusr1_stop_a_run_like_sigterm(tmp_path, sig):
    result = run_signalled(tmp_path, sig, 4, "train.eval_every=4")
    assert result["status"] == "interrupted" and result["interrupted_by"] == sig
    assert result["steps"] == 4 and checkpoint_step(Path(result["run_dir"])) == 4


def test_the_signal_handler_only_sets_a_flag(caplog):
    """Logging from the handler can land inside a write to the same stream (a tqdm bar) and raise
    a reentrant-write error mid-training: the loop logs, the handler does not."""
    with caplog.at_level(logging.DEBUG), StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs at the next bytecode boundary
            if signals.received:
                break
    assert signals.received == "SIGTERM"
    assert caplog.records == []


def test_non_finite_weights_never_reach_a_checkpoint(compose_run):
    """The loss is looked at only at log steps (here only at T): the periodic checkpoints between
    used to save NaN weights."""
    result = train(
        compose_run(
            "method=lora",
            "train.lr=1e30",
            "train.max_grad_norm=null",
            "train.log_every=24",
            "train.eval_every=0",
            "train.checkpoint_every=2",
        )
    )
    assert result["status"] == "failed" and result["steps"] < 24
    assert "non-finite" in result["error"] and "before a checkpoint" in result["error"]
    last = Path(result["run_dir"]) / "checkpoints" / "last.pt"
    if last.exists():
        trainable = torch.load(last, weights_only=True)["trainable"]
        assert all(torch.isfinite(t).all() for t in trainable.values())


def test_non_finite_weights_never_reach_an_allocation(compose_run):
    result = train(
        compose_run(
            "train.lr=1e30",
            "train.max_grad_norm=null",
            "train.log_every=24",
            "train.eval_every=0",
            "train.checkpoint=end",
        )
    )
    assert result["status"] == "failed" and result["steps"] < 24
    assert "before an allocation" in result["error"]
    ranks = read_jsonl(Path(result["run_dir"]) / "ranks.jsonl")
    assert ranks[-1]["step"] < result["steps"]  # the allocation at the failing step is not recorded
