"""IncreLoRA: ranks grow at the scheduled steps only, never beyond the budget (in ranks or in
parameters) nor max_rank; the reserved components (advance learning) train ahead at a fixed λ; the
grown layer is a LoRA (peft round trip); a whole run: ranks.jsonl, the record's final count, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adabudget.compose import resume_config
from adabudget.config import ConfigError
from adabudget.export import export_peft_adapter
from adabudget.methods import apply_method, method_config_from_dict
from adabudget.methods.increlora import (
    RESERVE_LAMBDA,
    IncreLoRAConfig,
    IncreLoRAHooks,
    component_cost,
    grows_at,
)
from adabudget.training import train
from conftest import tiny_model as build


def batch():
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(5, 1000, (4, 7), generator=g), "labels": torch.tensor([0, 1, 1, 0])}


def logits(model):
    with torch.no_grad():
        return model(input_ids=batch()["input_ids"]).logits


def trained(steps: int, **knobs):
    """Apply IncreLoRA on tiny BERT and run ``steps`` AdamW steps with its hooks; returns (model,
    wrapped, hooks, the ranks after every step)."""
    model = build()
    cfg = method_config_from_dict({"name": "increlora", **knobs})
    cfg.validate()
    wrapped = apply_method(model, cfg)
    hooks = IncreLoRAHooks(wrapped, cfg)
    hooks.start(steps)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    history = []
    for step in range(steps):
        model(**batch()).loss.backward()
        opt.step()
        hooks.after_step(step, opt)
        opt.zero_grad()
        history.append({n: m.active for n, m in wrapped.items()})
    return model.eval(), wrapped, hooks, history


KNOBS = {"init_r": 1, "max_rank": 4, "rank_step": 2, "top_h": 3, "warmup_steps": 2, "mask_interval": 3}


def test_grows_at_as_a_table():
    assert [t for t in range(1, 20) if grows_at(t, 5, 3)] == [6, 9, 12, 15, 18]
    assert [t for t in range(1, 8) if grows_at(t, 0, 1)] == [1, 2, 3, 4, 5, 6, 7]


def test_ranks_grow_at_the_scheduled_steps_never_beyond_the_budget():
    model, wrapped, hooks, history = trained(30, target_total_rank=12 + 7, **KNOBS)  # 12 matrices
    start = {n: 1 for n in wrapped}
    before = start
    grew = []
    for step, ranks in enumerate(history):
        total = sum(ranks.values())
        assert total <= 19 and max(ranks.values()) <= 4
        if ranks != before:
            grew.append(step + 1)
            added = {n: ranks[n] - before[n] for n in ranks if ranks[n] != before[n]}
            assert len(added) <= 3 and all(0 < k <= 2 for k in added.values())
        before = ranks
    assert grew and all(grows_at(t, 2, 3) for t in grew)
    assert grew[0] == 3  # the first round after t_i = 2
    assert sum(history[-1].values()) == 19  # spent exactly: the last round gives only what is left
    assert not hooks.growing and all(m.reserved == 0 for m in wrapped.values())
    for m in wrapped.values():  # past the active components nothing is left in the layer
        assert (m.lam[m.active :] == 0).all()
    assert hooks.kept()["kept_params"] == sum(m.active * component_cost(m) for m in wrapped.values())


def test_a_parameter_budget_is_never_exceeded():
    model = build()
    wrapped = apply_method(model, IncreLoRAConfig(**KNOBS, target_total_rank=20))
    initial = sum(component_cost(m) for m in wrapped.values())
    target = initial + 5 * 97 + 30  # tiny-bert's costs: 65 (32 x 32) and 97 (32 x 64)
    _, wrapped, hooks, history = trained(30, target_params=target, **KNOBS)
    costs = {n: component_cost(m) for n, m in wrapped.items()}
    for ranks in history:
        assert sum(r * costs[n] for n, r in ranks.items()) <= target
    kept = hooks.kept()["kept_params"]
    assert kept <= target and target - kept < min(costs.values())
    assert hooks.final(None)["increlora"]["budget_reached"]


def test_reserved_components_train_ahead_at_a_fixed_lambda():
    model = build()
    cfg = IncreLoRAConfig(**{**KNOBS, "warmup_steps": 100, "target_total_rank": 20})
    wrapped = apply_method(model, cfg)
    hooks = IncreLoRAHooks(wrapped, cfg)
    hooks.start(200)
    layer = next(iter(wrapped.values()))
    assert layer.reserved == 2
    reserve_lam = layer.lam[1:3].detach().clone()
    assert reserve_lam.tolist() == pytest.approx([RESERVE_LAMBDA / cfg.lambda_lr_ratio] * 2)
    q0 = layer.A[1:3].detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        model(**batch()).loss.backward()
        assert (layer.lam.grad[1:] == 0).all() and layer.lam.grad[0] != 0  # only the active λ learn
        assert (layer.A.grad[3:] == 0).all() and (layer.A.grad[1:3] != 0).any()  # past the reserve: no part
        opt.step()
        hooks.after_step(step, opt)
        opt.zero_grad()
    assert torch.equal(layer.lam[1:3], reserve_lam)
    assert not torch.equal(layer.A[1:3], q0)  # their Q rows (and P columns) learn ahead
    assert layer.factors()[0].shape[0] == 3


def test_the_grown_adapter_round_trips_through_peft(tmp_path):
    model, wrapped, _, history = trained(12, target_total_rank=20, **KNOBS)
    assert sum(history[-1].values()) == 20
    summary = export_peft_adapter(model, wrapped, tmp_path, base_model_name_or_path="tiny-bert")
    assert summary["modules"] == {n: m.active for n, m in wrapped.items()}
    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)


def test_state_dict_restores_ranks_and_importance():
    _, wrapped, hooks, _ = trained(8, target_total_rank=30, **KNOBS)
    state = hooks.state_dict()
    fresh_model = build()
    cfg = IncreLoRAConfig(target_total_rank=30, **KNOBS)
    fresh = apply_method(fresh_model, cfg)
    other = IncreLoRAHooks(fresh, cfg)
    other.start(8)
    other.load_state_dict(state)
    assert {n: m.active for n, m in fresh.items()} == {n: m.active for n, m in wrapped.items()}
    assert torch.equal(other.ipt, hooks.ipt) and other.spent == hooks.spent


# ---------------------------------------------------------------- a whole run
RUN = [
    "method=increlora",
    "method.init_r=1",
    "method.target_r=2",
    "method.max_rank=3",
    "method.rank_step=1",
    "method.top_h=4",
    "method.warmup_steps=3",
    "method.mask_interval=2",
]


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "ranks.jsonl").read_text().splitlines()]


def test_a_run_grows_to_the_budget_records_the_ranks_and_resumes(compose_run):
    full = train(compose_run(*RUN, "run_name=full"))
    assert full["status"] == "completed"
    n = len(full["ranks"])
    assert sum(full["ranks"].values()) == 2 * n and full["increlora"]["budget_reached"]
    assert full["adapter_params_final"] == full["increlora"]["kept_params"]
    lines = rows(full["run_dir"])
    assert lines[0]["step"] == 0 and set(lines[0]["ranks"].values()) == {1}
    assert all(grows_at(r["step"], 3, 2) for r in lines[1:])
    assert [sum(r["ranks"].values()) for r in lines] == sorted(sum(r["ranks"].values()) for r in lines)
    assert lines[-1]["final"] and lines[-1]["ranks"] == full["ranks"]

    first = train(compose_run(*RUN, "run_name=killed", "train.stop_after_step=6"))
    assert first["status"] == "interrupted"
    resumed = train(resume_config(first["run_dir"]))
    assert resumed["status"] == "completed"
    assert resumed["final"] == full["final"] and resumed["ranks"] == full["ranks"]
    assert rows(resumed["run_dir"]) == lines


@pytest.mark.parametrize(
    "knobs, field",
    [
        ({"init_r": 0}, "method.init_r"),
        ({"max_rank": 1}, "method.max_rank"),
        ({"target_r": 20.0}, "method.target_r"),
        ({"rank_step": 0}, "method.rank_step"),
        ({"target_params": 5, "target_total_rank": 5}, "method.target_total_rank"),
    ],
)
def test_bad_knobs_are_refused_naming_the_field(knobs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        IncreLoRAConfig(**knobs).validate()


def test_a_budget_beyond_max_rank_or_a_run_too_short_is_refused_before_any_compute(compose_run):
    with pytest.raises(ConfigError, match=r"method\.target_total_rank.*max_rank"):
        train(compose_run(*RUN, "method.target_total_rank=1000"))
    with pytest.raises(ConfigError, match=r"method\.warmup_steps.*no round"):
        train(compose_run(*RUN, "method.warmup_steps=30"))


def test_closest_size_skips_the_max_ranks_its_config_refuses():
    """``closest_size`` (``bench step``'s sizing, the search spaces') bisects IncreLoRA's ``max_rank``
    through values below its ``target_r`` = 8, which its config refuses: they count as too small,
    and the size found is one the config accepts, as near LoRA r=12's count as any."""
    import dataclasses

    from adabudget.arch import arch_of
    from adabudget.config import ConfigError
    from adabudget.methods import closest_size, count_method, method_config_from_dict
    from conftest import tiny_model

    arch = arch_of(tiny_model("tiny-bert"))
    cfg = method_config_from_dict({"name": "increlora"})  # target_r 8
    goal = count_method(method_config_from_dict({"name": "lora", "r": 12}), arch)
    size = closest_size(cfg, arch, goal)
    sized = dataclasses.replace(cfg, max_rank=size)
    sized.validate()
    with pytest.raises(ConfigError):
        dataclasses.replace(cfg, max_rank=7).validate()  # the small end (below target_r) is refused
    near = abs(count_method(sized, arch) - goal)
    for k in (size - 1, size + 1):
        other = dataclasses.replace(cfg, max_rank=k)
        other.validate()
        assert near <= abs(count_method(other, arch) - goal)
    with pytest.raises(ConfigError, match="method.max_rank: no size of increlora"):
        closest_size(dataclasses.replace(cfg, target_r=10_000), arch, goal)
