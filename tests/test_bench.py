"""Smoke test of ``adabudget bench step`` on tiny-bert: every variant runs, the table is
printed and the last line is the ratio summary with four finite numbers."""

import math
import re

import pytest
from adabudget import bench

RATIO = re.compile(
    r"ratio adalora/lora=(\S+) shrunk/lora_final=(\S+) adalora/peft_adalora=(\S+) "
    r"allocator/peft_allocator=(\S+)"
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


def test_bench_lr_grid_resumes_and_tables(tmp_path, capsys):
    """`adabudget bench lr`: one run folder per cell, finished cells skipped, a table from the records."""
    from adabudget.bench_lr import main as lr_main

    tiny = [
        "model=tiny-bert",
        "data.max_train_samples=64",
        "data.max_eval_samples=32",
        "train.max_steps=8",
        "train.batch_size=8",
        "method.init_r=4",
        "method.target_r=2",
        "method.mask_interval=2",
    ]
    args = [
        "--root",
        str(tmp_path),
        "--variants",
        "adalora-r1",
        "peft_adalora",
        "--lrs",
        "1e-3",
        "--seeds",
        "3",
    ]
    lr_main(args + tiny)
    first = capsys.readouterr().out
    assert first.count("completed dev accuracy") == 2
    lr_main(args + tiny)  # nothing left to run
    second = capsys.readouterr().out
    assert "completed dev accuracy" not in second
    assert len(list(tmp_path.glob("*/lr0.001/s3/*/result.json"))) == 2
    rows = [
        line for line in second.splitlines() if line.startswith("| adalora-r1") or line.startswith("| peft")
    ]
    assert len(rows) == 2 and all("(lr 0.001)" in r for r in rows)


def test_bench_methods_run_at_loras_count(capsys):
    """``--methods``: each registered method is a variant at LoRA r=init_r's trainable count (a
    size knob solved to the closest count, or the knobs given), with its own ratio to LoRA."""
    res = bench.run(
        bench.parse_args(
            [
                "step",
                "--model",
                "tiny-bert",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--alloc-reps",
                "1",
                "--no-peft",
                "--init-r",
                "4",
                "--target-r",
                "2",
                "--methods",
                "adapter,lora:r=2",
            ]
        )
    )
    v = res["variants"]
    lora, adapter = v["lora"]["trainable"], v["method:adapter"]["trainable"]
    b = int(re.search(r"bottleneck=(\d+)", v["method:adapter"]["name"]).group(1))
    # no other bottleneck comes closer to LoRA r=4's count (the head trains in neither: equal offsets)
    from adabudget.arch import arch_of
    from adabudget.methods import count_method, method_config_from_dict

    arch = arch_of(bench.quiet_load("tiny-bert"))
    counts = {
        k: count_method(method_config_from_dict({"name": "adapter", "bottleneck": k}), arch)
        for k in (b - 1, b, b + 1)
    }
    target = lora - (adapter - counts[b])
    assert abs(counts[b] - target) <= min(abs(counts[b - 1] - target), abs(counts[b + 1] - target))
    assert v["method:lora:r=2"]["trainable"] == v["lora_final"]["trainable"]  # the knob given wins
    assert set(res["ratios"]) >= {"adapter/lora", "lora[r:2]/lora"}  # one key per entry, knobs shown
    bench.report(bench.parse_args(["step", "--model", "tiny-bert", "--methods", "adapter,lora:r=2"]), res)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("ratio adapter/lora=") and RATIO.fullmatch(lines[-1])
    assert re.search(r" lora\[r:2\]/lora=\d+\.\d{3}$", lines[-2])


def test_bench_step_on_a_causal_lm_in_bf16(capsys):
    """The decoder's LM head on a batch of tokens, every variant (ours and peft's) under bf16
    autocast: the header says so, each row has its tokens per second, the ratios are finite."""
    pytest.importorskip("peft")
    bench.main(
        "step --model tiny-llama --task causal-lm --precision bf16 --batch-size 2 --seq-len 32 "
        "--steps 2 --warmup 1 --alloc-reps 2 --threads 1".split()
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert "task=causal-lm precision=bf16 batch=2x32" in lines[0]
    assert "tok/s" in "\n".join(lines)
    ratios = [float(x) for x in RATIO.fullmatch(lines[-1]).groups()]
    assert all(math.isfinite(r) and r > 0 for r in ratios), ratios
