"""End-to-end training through ``budget.train.train`` on a tiny real run: the run record,
allocation invariants, determinism, resume, NaN handling and shrinking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from budget.compose import resume_config
from budget.train import train


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_adalora_run_record(compose_run):
    result = train(compose_run())
    run_dir = Path(result["run_dir"])
    assert result["status"] == "completed"
    for name in ("config.yaml", "metrics.jsonl", "ranks.jsonl", "result.json", "adapter/adapter_config.json"):
        assert (run_dir / name).exists(), name
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["method"]["name"] == "adalora" and saved["model"]["name"] == "tiny-bert"
    on_disk = json.loads((run_dir / "result.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["steps"] == 24
    assert set(on_disk["final"]["dev"]) == {"accuracy", "f1", "matthews"}
    assert on_disk["versions"]["torch"] == torch.__version__
    assert on_disk["peak_memory_mb"] > 0 and on_disk["wall_time_s"] > 0
    # 2 layers x 6 matrices, init_r 4 -> average rank 2: b(0) = 48, b(T) = 24.
    ranks = read_jsonl(run_dir / "ranks.jsonl")
    assert ranks, "no allocation ran"
    for r in ranks:
        assert r["kept"] == r["budget"] == sum(r["ranks"].values())
    assert ranks[-1]["final"] and ranks[-1]["budget"] == 24
    assert sum(on_disk["ranks"].values()) == 24
    # Physical shrink: trainable parameters at the end are those of the final budget.
    assert on_disk["trainable_params_final"] < on_disk["trainable_params"]
    assert on_disk["adapter_params_final"] == ranks[-1]["kept_params"]
    dev_lines = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["split"] == "dev"]
    assert [m["step"] for m in dev_lines] == [12, 24]


def test_same_seed_same_run(compose_run):
    a = train(compose_run("run_name=a"))
    b = train(compose_run("run_name=b"))
    assert a["final"] == b["final"]
    assert a["ranks"] == b["ranks"]
    c = train(compose_run("run_name=c", "train.seed=7"))
    assert c["final"] != a["final"] or c["ranks"] != a["ranks"]


@pytest.mark.parametrize("stop_after", [9, 19])  # in the budgeting phase / after the shrink (T - t_f = 17)
def test_resume_continues_to_identical_result(compose_run, stop_after):
    full = train(compose_run("run_name=full"))
    first = train(compose_run("run_name=killed", f"train.stop_after_step={stop_after}"))
    assert first["status"] == "interrupted" and first["steps"] == stop_after
    resumed = train(resume_config(first["run_dir"]))
    assert resumed["status"] == "completed" and resumed["run_dir"] == first["run_dir"]
    assert resumed["final"] == full["final"]
    assert resumed["ranks"] == full["ranks"]
    full_ranks = read_jsonl(Path(full["run_dir"]) / "ranks.jsonl")
    resumed_ranks = read_jsonl(Path(resumed["run_dir"]) / "ranks.jsonl")
    assert resumed_ranks == full_ranks


def test_nan_loss_fails_and_keeps_record(compose_run):
    result = train(compose_run("train.lr=1e30", "train.max_grad_norm=null", "train.log_every=1"))
    assert result["status"] == "failed"
    assert "non-finite" in result["error"]
    run_dir = Path(result["run_dir"])
    assert json.loads((run_dir / "result.json").read_text())["status"] == "failed"
    assert (run_dir / "config.yaml").exists() and (run_dir / "metrics.jsonl").exists()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_other_methods_train(compose_run, method):
    result = train(compose_run(f"method={method}", "train.lr=1e-3"))
    assert result["status"] == "completed"
    assert result["ranks"] is None
    if method == "full":
        assert result["trainable_params"] == result["total_params"]


def test_grad_accum_counts_optimizer_steps(compose_run):
    result = train(compose_run("train.grad_accum=2"))
    assert result["steps"] == 24
    ranks = read_jsonl(Path(result["run_dir"]) / "ranks.jsonl")
    assert ranks[-1]["step"] == 24 - 7  # T - t_f, in optimizer steps, not micro-batches


def test_total_steps_inferred_from_epochs(compose_run):
    # 128 examples / batch 8 = 16 batches per epoch; 2 epochs with grad_accum 2 -> T = 16.
    result = train(compose_run("train.max_steps=null", "train.epochs=2", "train.grad_accum=2"))
    assert result["total_steps"] == 16 and result["steps"] == 16


def test_regression_task(compose_run):
    result = train(compose_run("data=tweets", "train.eval_every=0"))
    assert result["status"] == "completed"
    assert set(result["final"]["dev"]) >= {"pearson", "spearman"}


def test_wandb_offline_mirror(compose_run, monkeypatch):
    """A real W&B offline run: the mirror writes its files inside the run folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = train(compose_run("logger=wandb", "train.max_steps=12", "train.eval_every=0"))
    assert result["status"] == "completed"
    run_dir = Path(result["run_dir"])
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert any(offline_runs[0].glob("*.wandb"))
    assert (run_dir / "wandb_id.txt").read_text().strip() in offline_runs[0].name
