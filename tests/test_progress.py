"""Training progress (``adabudget.progress``): a bar on a terminal, plain lines in a log or a pipe."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

from adabudget.progress import StepProgress
from conftest import TINY_RUN

LINE = re.compile(r"^(\S+) step (\d+)/(\d+) \| loss (\d+\.\d{4}) \| ([\d.]+) it/s \| ETA (\S+)$", re.M)


def test_training_off_a_terminal_prints_a_line_per_logging_step(tmp_path):
    """``adabudget train`` with stdout and stderr to pipes (as under Slurm or nohup): no carriage
    return anywhere, and a ``step s/T | loss | it/s | ETA`` line at every ``train.log_every`` steps."""
    overrides = [o for o in TINY_RUN if not o.startswith("train.progress")]
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "adabudget"),
        "train",
        *overrides,
        "train.log_every=6",
        "train.checkpoint=none",
        "run_name=piped",
        f"runs_root={tmp_path / 'runs'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # bytes: text mode would turn a carriage return into a newline
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=300)
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, stderr[-3000:]
    assert "\r" not in stdout and "\r" not in stderr, stderr[-3000:]
    lines = LINE.findall(stderr)
    assert [(name, int(step), int(total)) for name, step, total, *_ in lines] == [
        ("piped", s, 24) for s in (6, 12, 18, 24)
    ], stderr[-3000:]
    assert all(float(rate) > 0 for *_, rate, _ in lines)
    assert lines[-1][-1] == "0:00:00"  # nothing left at the last step
    # the printed loss is the one the run logged for that step
    (metrics,) = (tmp_path / "runs" / "piped").glob("*/metrics.jsonl")  # runs/<name>/<time>/
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    logged = {row["step"]: row["loss"] for row in rows if row.get("split") == "train"}
    assert [loss for *_, loss, _, _ in lines] == [f"{logged[s]:.4f}" for s in (6, 12, 18, 24)]


def test_lines_eta_and_rate_count_this_process_steps_only():
    out = io.StringIO()  # not a terminal
    with StepProgress(total=100, initial=40, desc="run", file=out) as bar:
        bar.start -= 10.0  # ten seconds ago: 20 steps in 10 s is 2 it/s
        bar.update(20)
        bar.report(0.123456)
    assert out.getvalue() == "run step 60/100 | loss 0.1235 | 2 it/s | ETA 0:00:20\n"
    quiet = io.StringIO()
    with StepProgress(total=10, initial=0, desc="run", enabled=False, file=quiet) as bar:
        bar.update(10)
        bar.report(1.0)
    assert quiet.getvalue() == ""


def test_on_a_terminal_it_is_a_bar():
    """On a pseudo-terminal the tqdm bar redraws in place (carriage returns), the loss in its postfix."""
    leader, follower = os.openpty()
    with open(follower, "w", closefd=True) as tty:
        with StepProgress(total=10, initial=0, desc="run", file=tty) as bar:
            assert bar.bar is not None
            for _ in range(10):
                bar.update(1)
            bar.report(0.5)
            bar.bar.refresh()
        tty.flush()
        written = os.read(leader, 1 << 16).decode()
    os.close(leader)
    assert "\r" in written and "loss=0.5000" in written and "step 10/10" not in written
