"""End-to-end training through ``adabudget.training.train`` on a tiny real run: the run record,
allocation invariants, determinism, resume, NaN handling and shrinking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from adabudget.compose import resume_config
from adabudget.training import train


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


# ---------------------------------------------------------------- Engine 0.2: the record and its seams
def test_record_is_readable_without_budget(compose_run):
    """result.json states how to read it; ranks.jsonl starts at step 0 and says why ranks moved."""
    result = train(compose_run())
    run_dir = Path(result["run_dir"])
    on_disk = json.loads((run_dir / "result.json").read_text())
    assert on_disk["record_version"] == 2
    assert on_disk["primary_metric"] == "accuracy" and on_disk["regression"] is False
    assert on_disk["data_version"] == "vader-3.3.2/groups-v2"
    assert on_disk["host"] and on_disk["pid"] > 0 and on_disk["started_at"]
    modules = {m["name"]: m for m in on_disk["modules"]}
    assert len(modules) == 12 and set(modules) == set(on_disk["ranks"])
    assert {m["role"] for m in modules.values()} == {"q", "k", "v", "o", "ffn_in", "ffn_out"}
    assert {m["layer"] for m in modules.values()} == {0, 1}
    assert all(m["init_rank"] == 4 and m["group"] == 0 for m in modules.values())
    ranks = read_jsonl(run_dir / "ranks.jsonl")
    assert ranks[0]["step"] == 0 and ranks[0]["kept"] == ranks[0]["budget"] == 48
    assert set(ranks[0]["ranks"].values()) == {4}
    for row in ranks[1:]:
        assert set(row["scores"]) == set(row["ranks"]) == set(row["kept_mask"])
        for name, scores in row["scores"].items():
            mask = row["kept_mask"][name]
            assert sum(mask) == row["ranks"][name] and len(scores) == len(mask)
        kept = [s for n in row["scores"] for s, k in zip(row["scores"][n], row["kept_mask"][n]) if k]
        pruned = [s for n in row["scores"] for s, k in zip(row["scores"][n], row["kept_mask"][n]) if not k]
        if pruned and not row["final"] and min(kept) != max(pruned):
            assert min(kept) >= max(pruned)  # one global threshold (eq. 7 scores, no floors/caps here)


def test_running_status_and_heartbeat_while_the_run_lives(compose_run):
    seen = []

    def on_eval(step, metrics):
        run_dirs = list(Path(compose_run().runs_root).rglob("result.json"))
        seen.append(json.loads(run_dirs[0].read_text()))

    result = train(compose_run(), on_eval=on_eval)
    live = seen[0]
    assert live["status"] == "running" and live["steps"] == 12 and live["heartbeat_at"] > 0
    assert live["modules"] and live["total_steps"] == 24
    assert result["status"] == "completed"


def test_on_eval_prunes_with_a_complete_record(compose_run):
    calls = []
    result = train(compose_run(), on_eval=lambda step, metrics: calls.append((step, metrics)) or step >= 12)
    assert result["status"] == "pruned" and result["pruned_at"] == 12 and result["steps"] == 12
    assert [c[0] for c in calls] == [12] and "accuracy" in calls[0][1]
    run_dir = Path(result["run_dir"])
    on_disk = json.loads((run_dir / "result.json").read_text())
    assert on_disk["status"] == "pruned" and on_disk["best"]["step"] == 12
    splits = {m["split"] for m in read_jsonl(run_dir / "metrics.jsonl")}
    assert splits == {"train", "dev"}  # a pruned run never looks at test
    assert not (run_dir / "adapter").exists()


def test_on_eval_sees_every_dev_evaluation(compose_run):
    steps = []
    result = train(compose_run(), on_eval=lambda step, metrics: steps.append(step))
    assert result["status"] == "completed" and steps == [12, 24]


def test_shrink_never_reports_the_kept_ranks(compose_run):
    result = train(compose_run("method.shrink=never"))
    assert sum(result["ranks"].values()) == 24  # kept, not the physical init_r columns
    ranks = read_jsonl(Path(result["run_dir"]) / "ranks.jsonl")
    assert result["ranks"] == ranks[-1]["ranks"]
    assert result["adapter_params_final"] == ranks[-1]["kept_params"]


@pytest.mark.parametrize("policy, expect", [("none", False), ("end", True)])
def test_checkpoint_policy(compose_run, policy, expect):
    result = train(compose_run(f"train.checkpoint={policy}"))
    assert (Path(result["run_dir"]) / "checkpoints" / "last.pt").exists() == expect


def test_periodic_checkpoints_hold_only_trainable_state(compose_run):
    first = train(compose_run("train.checkpoint_every=5", "train.stop_after_step=7"))
    ckpt = torch.load(Path(first["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 7  # the stop writes its own
    model_names = set(ckpt["trainable"])
    assert all(n.split(".")[-1] in ("P", "lam", "Q", "weight", "bias") for n in model_names)
    assert not any("embeddings" in n or "attention.self.query.base" in n for n in model_names)


def test_resume_truncates_the_record_to_the_checkpoint(compose_run):
    """A kill after the last checkpoint leaves lines the resumed run writes again: they go."""
    full = train(compose_run("run_name=full"))
    first = train(compose_run("run_name=killed", "train.stop_after_step=9"))
    run_dir = Path(first["run_dir"])
    with open(run_dir / "metrics.jsonl", "a") as f:  # what a kill -9 at step 11 would have left
        f.write(json.dumps({"step": 10, "split": "train", "loss": 9.9}) + "\n")
    with open(run_dir / "ranks.jsonl", "a") as f:
        f.write(json.dumps({"step": 10, "budget": 1, "kept": 1, "ranks": {}}) + "\n")
    resumed = train(resume_config(run_dir))
    assert read_jsonl(run_dir / "metrics.jsonl") == read_jsonl(Path(full["run_dir"]) / "metrics.jsonl")
    strip = lambda rows: [{k: v for k, v in r.items()} for r in rows]  # noqa: E731
    assert strip(read_jsonl(run_dir / "ranks.jsonl")) == strip(
        read_jsonl(Path(full["run_dir"]) / "ranks.jsonl")
    )
    assert resumed["wall_time_s"] >= first["wall_time_s"]  # both segments


def test_resume_refuses_changes_and_allows_more_steps(compose_run):
    from adabudget.config import ConfigError

    first = train(compose_run("train.stop_after_step=9"))
    with pytest.raises(ConfigError, match=r"train\.lr=1e-2 cannot change on resume"):
        resume_config(first["run_dir"], ["train.lr=1e-2"])
    with pytest.raises(ConfigError, match=r"method\.init_r .*differ"):
        bad = resume_config(first["run_dir"])
        bad.method.init_r = 6
        train(bad)
    longer = train(resume_config(first["run_dir"], ["train.max_steps=30", "train.progress=false"]))
    assert longer["status"] == "completed" and longer["steps"] == 30 and longer["total_steps"] == 30
    again = train(resume_config(first["run_dir"], ["train.max_steps=30"]))
    assert again["status"] == "completed" and "already completed" in again["note"]
    assert read_jsonl(Path(first["run_dir"]) / "metrics.jsonl")[-1]["split"] == "test"  # nothing appended
    tests = [m for m in read_jsonl(Path(first["run_dir"]) / "metrics.jsonl") if m["split"] == "test"]
    assert len(tests) == 1


def test_model_dropout_override(compose_run):
    from adabudget.config import ModelConfig
    from adabudget.models import load_model
    from adabudget.session import set_dropout
    from torch import nn

    model = load_model(ModelConfig(name="tiny-llama"), 2, False)
    set_dropout(model, 0.0)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    assert all(m.attention_dropout == 0.0 for m in model.modules() if hasattr(m, "attention_dropout"))
    a = train(compose_run("model.dropout=0.0", "run_name=a", "train.max_steps=6", "train.eval_every=0"))
    b = train(compose_run("model.dropout=0.0", "run_name=b", "train.max_steps=6", "train.eval_every=0"))
    assert a["final"] == b["final"]


def test_allocator_follows_the_factors_device_and_dtype():
    """Built before ``model.to(...)``, the allocator's buffers still follow the factors (the CUDA
    crash at step 1 of Engine 0.1, here with a dtype move that CPU can show)."""
    from adabudget.allocator import RankAllocator
    from adabudget.config import ModelConfig
    from adabudget.methods import apply_method, method_config_from_dict
    from adabudget.models import load_model
    from adabudget.modules import freeze_backbone

    torch.manual_seed(0)
    model = load_model(ModelConfig(name="tiny-bert"), 2, False)
    freeze_backbone(model, True)
    cfg = method_config_from_dict(
        {
            "name": "adalora",
            "init_r": 4,
            "target_r": 2,
            "warmup_steps": 1,
            "final_steps": 2,
            "mask_interval": 1,
        }
    )
    allocator = RankAllocator(apply_method(model, cfg), cfg, 8)
    model.double()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(1000, 2000, (4, 9))
    kept = []
    for step in range(1, 9):
        model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        opt.step()
        allocation = allocator.update_and_allocate(step)
        if allocation is not None:
            kept.append(allocation.kept)
            if allocation.shrink:
                allocator.shrink_(opt)
        opt.zero_grad()
    assert allocator._ibar_flat.dtype == torch.float64 and allocator._mask.dtype == torch.float64
    assert kept and kept[-1] == 24


def test_peak_memory_is_the_run_s_own_in_a_process_that_held_more_before(compose_run):
    """A worker or notebook that held a large tensor before a run (a previous, bigger run) does not
    pass that peak on: the record's ``peak_memory_mb`` counts from the run's start (``VmHWM`` reset
    on Linux), and the record says so."""
    import sys

    from adabudget.session import peak_rss_bytes

    if not sys.platform.startswith("linux"):
        pytest.skip("the peak RSS is reset through /proc/self/clear_refs (Linux)")
    big = torch.ones(200 * 2**20)  # 800 MB, touched
    assert float(big[-1]) == 1.0
    del big
    before = peak_rss_bytes()  # the process's peak so far: with the 800 MB
    result = train(compose_run("run_name=small"))
    assert result["status"] == "completed" and result["peak_memory_scope"] == "run"
    assert 0 < result["peak_memory_mb"] * 2**20 < before - 400 * 2**20, (result["peak_memory_mb"], before)
