"""DyLoRA: the seeded rank stream (and its resume), the gradient and update masks of the paper's
frozen and non-frozen modes, the record's rank curve, merging and exporting at a chosen rank,
and the refused rank ranges."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from adabudget.compose import resume_config
from adabudget.config import ConfigError
from adabudget.export import export_peft_adapter, load_adapter, merge_methods, save_adapter, save_merged
from adabudget.methods import apply_method, dylora, method_config_from_dict
from adabudget.methods.dylora import DyLoRAConfig, sample_rank, set_rank
from adabudget.methods.lora import LoRALinear
from adabudget.training import train
from conftest import tiny_model as build
from transformers import AutoModelForSequenceClassification

RUN = ["method=dylora", "method.r_min=1", "method.r_max=4"]


def applied(perturb: bool = True, **knobs):
    """(model, cfg, wrapped): DyLoRA on tiny BERT, B moved off zero so every factor gets gradients."""
    model = build()
    cfg = method_config_from_dict({"name": "dylora", "r_min": 1, "r_max": 4, **knobs})
    cfg.validate()
    wrapped = dylora.apply(model, cfg)
    if perturb:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for layer in wrapped.values():
                layer.B.add_(0.1 * torch.randn(layer.B.shape, generator=g))
    return model, cfg, wrapped


def batch():
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(5, 1000, (2, 7), generator=g), "labels": torch.tensor([0, 1])}


def logits(model):
    with torch.no_grad():
        return model(input_ids=batch()["input_ids"]).logits


def step_with_rank(seed: int, b: int, r_min: int, r_max: int) -> int:
    return next(s for s in range(1000) if sample_rank(seed, s, r_min, r_max) == b)


def nonzero(t: torch.Tensor, dim: int) -> list[int]:
    """Indices along ``dim`` (0: rows of A, 1: columns of B) holding any non-zero entry."""
    other = 1 - dim
    return (t.abs().sum(other) > 0).nonzero().squeeze(1).tolist()


# ---------------------------------------------------------------- the rank stream
def test_sample_rank_is_a_seeded_uniform_stream():
    draws = [sample_rank(42, s, 2, 5) for s in range(400)]
    assert draws == [sample_rank(42, s, 2, 5) for s in range(400)]  # a pure function of (seed, step)
    assert draws != [sample_rank(7, s, 2, 5) for s in range(400)]
    counts = {r: draws.count(r) for r in range(2, 6)}
    assert set(draws) == {2, 3, 4, 5} and min(counts.values()) > 60, counts  # 100 expected each
    assert {sample_rank(0, s, 3, 3) for s in range(20)} == {3}


def test_ranks_follow_the_stream_and_resume_samples_the_same(compose_run, monkeypatch):
    seen: list[tuple[int, int]] = []
    original = dylora.DyLoRAHooks.before_step

    def spy(self, step):
        original(self, step)
        seen.append((step, self.rank))
        assert all(m.active in (None, self.rank) for m in self.layers.values())

    monkeypatch.setattr(dylora.DyLoRAHooks, "before_step", spy)
    cfg = compose_run(*RUN, "run_name=full")
    full = train(cfg)
    seed = cfg.train.seed
    assert seen == [(s, sample_rank(seed, s, 1, 4)) for s in range(24)]
    assert len({b for _, b in seen}) > 1
    full_seen = list(seen)

    seen.clear()
    first = train(compose_run(*RUN, "run_name=killed", "train.stop_after_step=9"))
    assert first["status"] == "interrupted" and seen == full_seen[:9]
    seen.clear()
    resumed = train(resume_config(first["run_dir"]))
    assert resumed["status"] == "completed"
    assert seen == full_seen[9:]  # the resumed run draws steps 9..23's ranks, as the full run did
    assert resumed["final"] == full["final"] and resumed["rank_curve"] == full["rank_curve"]

    # a different seed, a different stream
    seen.clear()
    train(compose_run(*RUN, "run_name=other", "train.seed=7", "train.max_steps=12"))
    assert [b for _, b in seen] == [sample_rank(7, s, 1, 4) for s in range(12)]


# ---------------------------------------------------------------- which components learn
@pytest.mark.parametrize(
    "knobs, b, trained",
    [
        ({}, 3, [2]),  # frozen (the paper's default): only the b-th component
        ({}, 1, [0]),
        ({"r_min": 2}, 2, [0, 1]),  # frozen at b = r_min: the whole smallest model
        ({"r_min": 2}, 4, [3]),
        ({"frozen": False}, 3, [0, 1, 2]),  # all of the first b
    ],
)
def test_only_the_trained_slice_gets_gradients_and_moves(knobs, b, trained):
    model, cfg, wrapped = applied(**knobs)
    hooks = dylora.hooks(model, wrapped, cfg)
    step = step_with_rank(hooks.seed, b, cfg.r_min, cfg.r_max)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    before = {n: (m.A.detach().clone(), m.B.detach().clone()) for n, m in wrapped.items()}

    hooks.before_step(step)
    assert all(m.active in (None, b) and m.scaling == cfg.alpha / b for m in wrapped.values())
    model.train()
    model(**batch()).loss.backward()
    for layer in wrapped.values():
        assert nonzero(layer.A.grad, 0) == trained
        assert nonzero(layer.B.grad, 1) == trained
    optimizer.step()
    hooks.after_step(step, optimizer)
    optimizer.zero_grad()
    for name, layer in wrapped.items():
        a0, b0 = before[name]
        # AdamW's weight decay alone moves every trained component; the rest are held exactly
        assert nonzero(layer.A.detach() - a0, 0) == trained
        assert nonzero(layer.B.detach() - b0, 1) == trained
        assert layer.active is None and layer.scaling == cfg.alpha / cfg.r_max  # back at the serving rank

    # a second step keeps accumulating only where it should (the held copies are per step)
    hooks.before_step(step)
    model(**batch()).loss.backward()
    assert all(nonzero(m.A.grad, 0) == trained for m in wrapped.values())


def test_hold_false_lets_adamw_move_the_untrained_components_as_the_reference_code():
    """``hold=False``: the reference code's behaviour. Gradients are still masked to the b-th
    component, but AdamW's decay (and, from the second step, momentum) moves the others."""
    model, cfg, wrapped = applied(hold=False)
    hooks = dylora.hooks(model, wrapped, cfg)
    steps = [step_with_rank(hooks.seed, b, cfg.r_min, cfg.r_max) for b in (3, 1)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    for i, step in enumerate(steps):
        before = {n: (m.A.detach().clone(), m.B.detach().clone()) for n, m in wrapped.items()}
        hooks.before_step(step)
        model(**batch()).loss.backward()
        for layer in wrapped.values():
            assert nonzero(layer.A.grad, 0) == [hooks.rank - 1]  # the gradient mask is unchanged
        optimizer.step()
        hooks.after_step(step, optimizer)
        optimizer.zero_grad()
        for name, layer in wrapped.items():
            a0, b0 = before[name]
            assert nonzero(layer.A.detach() - a0, 0) == [0, 1, 2, 3]
            if i == 1:  # b = 1 now: component 3 (b = 3 before) moves on its first-step momentum
                moved = (layer.A.detach() - a0)[2].abs().max()
                decay_only = (1e-2 * 0.1 * a0[2].abs()).max()
                assert moved > 10 * decay_only


def test_no_step_in_progress_means_no_masking():
    """Outside a training step (no ``before_step``) the hooks leave gradients alone."""
    model, cfg, wrapped = applied()
    dylora.hooks(model, wrapped, cfg)
    model(**batch()).loss.backward()
    assert all(nonzero(m.A.grad, 0) == [0, 1, 2, 3] for m in wrapped.values())


# ---------------------------------------------------------------- the rank curve
def test_final_evaluates_every_rank_and_restores_the_serving_rank():
    model, cfg, wrapped = applied(r_min=2, r_max=4, export_rank=3)
    hooks = dylora.hooks(model, wrapped, cfg)
    layer = next(iter(wrapped.values()))

    def evaluate(split):
        assert split == "dev"
        return {"rank": layer.rank if layer.active is None else layer.active, "scaling": layer.scaling}

    out = hooks.final(evaluate)
    assert out["export_rank"] == 3
    assert out["rank_curve"] == {str(r): {"rank": r, "scaling": cfg.alpha / r} for r in (2, 3, 4)}
    assert all(m.active == 3 and m.scaling == cfg.alpha / 3 for m in wrapped.values())


def test_record_holds_the_rank_curve(compose_run):
    result = train(
        compose_run(
            "method=dylora", "method.r_min=2", "method.r_max=4", "method.export_rank=3", "method.frozen=false"
        )
    )
    assert result["status"] == "completed"
    on_disk = json.loads((Path(result["run_dir"]) / "result.json").read_text())
    for record in (result, on_disk):
        curve = record["rank_curve"]
        assert list(curve) == ["2", "3", "4"]
        for metrics in curve.values():
            assert set(metrics) == {"accuracy", "f1", "matthews"}
        assert record["export_rank"] == 3
        # the final dev evaluation ran at the serving rank, after every step put the layers back there
        assert curve["3"] == record["final"]["dev"]


# ---------------------------------------------------------------- merge and export at a rank
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_merge_at_rank_k_equals_computing_at_rank_k(k):
    model, cfg, wrapped = applied()
    set_rank(wrapped, k)
    expected = logits(model)
    other = 4 if k != 4 else 1
    set_rank(wrapped, other)
    assert not torch.allclose(logits(model), expected, atol=1e-4)  # the rank changes the function
    set_rank(wrapped, k)
    merged, merged_wrapped = copy.deepcopy((model, wrapped))
    dylora.merge(merged, merged_wrapped)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)


def test_save_adapter_reloads_at_the_export_rank(tmp_path):
    model, cfg, wrapped = applied(export_rank=2)
    expected = logits(model)  # apply leaves the layers at export_rank
    set_rank(wrapped, 4)
    assert not torch.allclose(logits(model), expected, atol=1e-4)
    set_rank(wrapped, 2)
    save_adapter(model, cfg, wrapped, tmp_path, "tiny-bert")
    fresh = build()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [2, 4])
def test_peft_export_at_rank_k(tmp_path, k):
    model, cfg, wrapped = applied()
    base = build()
    set_rank(wrapped, k)
    summary = export_peft_adapter(model, wrapped, tmp_path, base_model_name_or_path="tiny-bert")
    assert set(summary["modules"].values()) == {k}
    assert summary["adapter_params"] == k * sum(m.in_features + m.out_features for m in wrapped.values())
    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)


def at_serving_rank(wrapped, cfg) -> bool:
    return all(m.active is None and m.scaling == cfg.alpha / cfg.r_max for m in wrapped.values())


@pytest.mark.parametrize("k", [1, 3])
def test_export_and_merge_take_rank(tmp_path, k):
    """``rank=k`` of the peft export, the merged checkpoint and the adapter (save and load) gives
    what computing at rank k gives, and leaves the model at its serving rank."""
    model, cfg, wrapped = applied()
    set_rank(wrapped, k)
    expected = logits(model)
    set_rank(wrapped, cfg.r_max)
    full = logits(model)
    assert not torch.allclose(full, expected, atol=1e-4)

    summary = export_peft_adapter(
        model, wrapped, tmp_path / "peft", base_model_name_or_path="tiny-bert", rank=k
    )
    assert set(summary["modules"].values()) == {k} and at_serving_rank(wrapped, cfg)
    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(build(), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=0)

    save_merged(model, wrapped, tmp_path / "merged", rank=k)
    assert at_serving_rank(wrapped, cfg)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model), full, atol=0, rtol=0)

    save_adapter(model, cfg, wrapped, tmp_path / "adapter", "tiny-bert", rank=k)
    fresh = build()
    again = load_adapter(fresh, tmp_path / "adapter")  # saved with rank k: loads at k
    torch.testing.assert_close(logits(fresh), expected, atol=1e-6, rtol=0)
    load_adapter(fresh2 := build(), tmp_path / "adapter", rank=cfg.r_max)  # every component was saved
    torch.testing.assert_close(logits(fresh2), full, atol=1e-6, rtol=0)
    assert all(m.active in (None, k) for m in again.values())

    in_place, in_place_wrapped = copy.deepcopy((model, wrapped))
    merge_methods(in_place, in_place_wrapped, ["dylora"], rank=k)
    torch.testing.assert_close(logits(in_place), expected, atol=1e-5, rtol=0)


def test_rank_is_refused_where_it_cannot_apply(tmp_path):
    model, cfg, wrapped = applied(r_min=2)
    with pytest.raises(ValueError, match=r"rank=5: these DyLoRA layers hold ranks 1\.\.4"):
        export_peft_adapter(model, wrapped, tmp_path / "peft", base_model_name_or_path="tiny-bert", rank=5)
    with pytest.raises(ConfigError, match="method.export_rank"):  # rank 1 was never trained (r_min 2)
        save_adapter(model, cfg, wrapped, tmp_path / "adapter", "tiny-bert", rank=1)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "peft").exists()
    lora_model = build()
    lora_wrapped = apply_method(lora_model, method_config_from_dict({"name": "lora", "r": 2}))
    with pytest.raises(ValueError, match="only DyLoRA layers have a rank"):
        save_merged(lora_model, lora_wrapped, tmp_path / "merged", rank=2)


# ---------------------------------------------------------------- refused configurations
@pytest.mark.parametrize(
    "knobs, field",
    [
        ({"r_min": 5, "r_max": 2}, "method.r_min"),
        ({"r_min": 0}, "method.r_min"),
        ({"export_rank": 9}, "method.export_rank"),
        ({"r_min": 2, "export_rank": 1}, "method.export_rank"),
        ({"dropout": 1.0}, "method.dropout"),
    ],
)
def test_bad_knobs_are_refused_naming_the_field(knobs, field):
    with pytest.raises(ConfigError, match=field):
        DyLoRAConfig(**knobs).validate()


def test_train_refuses_an_empty_rank_range_before_any_compute(compose_run):
    with pytest.raises(ConfigError, match=r"method\.r_min=5 > method\.r_max=2"):
        train(compose_run("method=dylora", "method.r_min=5", "method.r_max=2"))
