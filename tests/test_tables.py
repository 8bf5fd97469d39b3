"""Paper tables from fixed records: golden Markdown and LaTeX, mean ± std checked by hand,
missing cells shown as missing, LaTeX that compiles; and the same table from a study's folder
as from its run folders."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
from adabudget.analysis.records import load
from adabudget.analysis.tables import LAYOUTS, build, latex_escape, table

GOLDEN = Path(__file__).parent / "golden"
MADE = "2026-11-23"
# (label, method, final params, task -> metric -> per-seed values); amazon/nyt left out on
# purpose for AdaLoRA & BitFit: their cells must show as missing, never filled in.
FIXED = [
    (
        "LoRA r=2",
        "lora",
        82944,
        {
            "mr": {"accuracy": [0.781, 0.785, 0.790]},
            "tweets": {"pearson": [0.702, 0.698, 0.710]},
            "amazon": {"pearson": [0.650, 0.655, 0.661]},
            "nyt": {"pearson": [0.501, 0.515, 0.490]},
        },
    ),
    (
        "AdaLoRA b72",
        "adalora",
        83016,
        {"mr": {"accuracy": [0.788, 0.792, 0.786]}, "tweets": {"pearson": [0.711, 0.705, 0.709]}},
    ),
    ("BitFit & friends_1", "bitfit", 19968, {"mr": {"accuracy": [0.760, 0.771]}}),
]


def write_fixed(root: Path) -> None:
    """Run folders as adabudget writes them (record_version 2), with known numbers."""
    k = 0
    for label, method, params, tasks in FIXED:
        for task, metrics in tasks.items():
            ((metric, values),) = metrics.items()
            for seed, value in zip((42, 1, 2), values):
                run = root / f"run{k}"
                k += 1
                run.mkdir(parents=True)
                (run / "config.yaml").write_text(
                    f"train:\n  seed: {seed}\n  lr: 0.0005\nmethod:\n  name: {method}\n"
                    f"data:\n  task: {task}\nmeta:\n  label: {label}\n"
                )
                dev = {metric: value - 0.01}
                result = {
                    "record_version": 2,
                    "status": "completed",
                    "method": method,
                    "task": task,
                    "model": "minilm",
                    "data_version": "vader-3.3.2/groups-v2",
                    "primary_metric": metric,
                    "regression": metric == "pearson",
                    "trainable_params": params + 770,
                    "adapter_params_final": None,
                    "groups": [{"group": 0, "params": params, "methods": {}}],
                    "final": {"dev": dev, "test": {metric: value}},
                    "best": {"step": 10, "dev": dev},
                    "meta": {"label": label},
                    "git_commit": "0123456789abcdef",
                    "steps": 265,
                }
                (run / "result.json").write_text(json.dumps(result))


@pytest.fixture
def fixed(tmp_path):
    write_fixed(tmp_path / "runs")
    return tmp_path / "runs"


@pytest.mark.parametrize("fmt, golden", [("markdown", "table_packaged.md"), ("latex", "table_packaged.tex")])
def test_golden(fixed, fmt, golden):
    text = table([fixed], layout="packaged", fmt=fmt, made=MADE)
    assert text == (GOLDEN / golden).read_text(), f"update tests/golden/{golden} only after checking the diff"


def test_means_and_stds_by_hand(fixed):
    runs = load([fixed]).runs
    cells = build(runs, LAYOUTS["packaged"])
    lora = cells.loc["LoRA r=2"]
    values = [0.781 * 100, 0.785 * 100, 0.790 * 100]
    assert lora["MR"][0]["mean"] == pytest.approx(statistics.mean(values))
    assert lora["MR"][0]["std"] == pytest.approx(statistics.stdev(values))
    assert lora["MR"][0]["n"] == 3
    means = [
        statistics.mean(FIXED[0][3][t][m]) * 100
        for t, m in (("mr", "accuracy"), ("tweets", "pearson"), ("amazon", "pearson"), ("nyt", "pearson"))
    ]
    assert lora["All"][0]["mean"] == pytest.approx(statistics.mean(means))
    ada = cells.loc["AdaLoRA b72"]
    assert ada["Amazon"] == [None] and ada["All"] == [None]  # missing, never invented
    assert lora["params"] == 82944


def test_missing_cells_and_bold(fixed):
    text = table([fixed], layout="packaged", made=MADE)
    ada = next(line for line in text.splitlines() if line.startswith("| AdaLoRA"))
    assert ada.count("–") == 3  # amazon, nyt and All
    # AdaLoRA's MR mean (78.8 + 79.2 + 78.6) / 3 = 78.87 beats LoRA's 78.53: bold, LoRA's not
    assert "**78.87 ± 0.31 (3)**" in ada
    lora = next(line for line in text.splitlines() if line.startswith("| LoRA"))
    assert "| 78.53 ± 0.45 (3) |" in lora and "**66.15**" in lora


def test_latex_escapes_and_compiles(fixed, tmp_path):
    assert latex_escape("BitFit & friends_1 100%") == r"BitFit \& friends\_1 100\%"
    tex = table([fixed], layout="packaged", fmt="latex", made=MADE)
    assert r"BitFit \& friends\_1" in tex
    engine = shutil.which("pdflatex")
    if engine is None:
        pytest.skip("pdflatex not installed (Debian texlive-latex-base; .ci/run installs it)")
    doc = tmp_path / "t.tex"
    doc.write_text(
        "\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n" + tex + "\\end{document}\n"
    )
    proc = subprocess.run(
        [engine, "-interaction=nonstopmode", "-halt-on-error", doc.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (tmp_path / "t.pdf").stat().st_size > 1000


def test_unknown_layout_and_empty(tmp_path):
    with pytest.raises(ValueError, match="layout=nope"):
        table([tmp_path], layout="nope")
    with pytest.raises(ValueError, match="no completed runs"):
        table([tmp_path])


def test_a_supernet_run_is_not_a_row(fixed):
    """A study's supernet folder (``meta.supernet``, method ``supernet``) scores configurations;
    a table over the study leaves it out instead of printing it as a configuration."""
    run = fixed / "supernet"
    run.mkdir()
    (run / "config.yaml").write_text(
        "train:\n  seed: 42\nmethod:\n  name: hybrid\ndata:\n  task: mr\nmeta:\n  supernet: true\n"
    )
    result = {
        "record_version": 2,
        "status": "completed",
        "method": "supernet",
        "task": "mr",
        "model": "minilm",
        "data_version": "vader-3.3.2/groups-v2",
        "primary_metric": "accuracy",
        "regression": False,
        "trainable_params": 999999,
        "adapter_params_final": None,
        "groups": [],
        "final": {"dev": {"accuracy": 0.99}, "test": {"accuracy": 0.99}},
        "best": {"step": 10, "dev": {}},
        "meta": {"supernet": True},
        "git_commit": "0123456789abcdef",
        "steps": 265,
    }
    (run / "result.json").write_text(json.dumps(result))
    assert (
        len(load([fixed], status="completed").runs) == 21
    )  # 20 fixed runs and the supernet: the records show it
    assert table([fixed], layout="packaged", made=MADE) == (GOLDEN / "table_packaged.md").read_text()
