"""Smoke test of ``adabudget bench step`` on tiny-bert: every variant runs, the table is
printed and the last line is the ratio summary with four finite numbers."""

import math
import re

import pytest

from budget import bench

RATIO = re.compile(
    r"ratio adalora/lora=(\S+) shrunk/lora_final=(\S+) adalora/peft_adalora=(\S+) allocator/peft_allocator=(\S+)"
)


def test_bench_step_prints_table_and_ratio_line(capsys):
    pytest.importorskip("peft")
    bench.main(
        [
            "step",
            "--model",
            "tiny-bert",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--alloc-reps",
            "2",
            "--threads",
            "1",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    match = RATIO.fullmatch(lines[-1])
    assert match, lines[-1]
    ratios = [float(x) for x in match.groups()]
    assert all(math.isfinite(r) and r > 0 for r in ratios), ratios
    table = "\n".join(lines)
    for name in (
        "lora r=12",
        "adalora 12->8",
        "adalora shrunk (avg r=8)",
        "lora r=8",
        "peft lora r=12",
        "peft adalora",
    ):
        assert name in table, name
    assert "allocation step" in table and "persistent training state" in table


def test_bench_without_peft_leaves_peft_ratios_undefined(capsys):
    bench.main(
        ["step", "--model", "tiny-bert", "--steps", "1", "--warmup", "0", "--alloc-reps", "1", "--no-peft"]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    x, y, z, w = (float(v) for v in RATIO.fullmatch(last).groups())
    assert math.isfinite(x) and math.isfinite(y)
    assert math.isnan(z) and math.isnan(w)
