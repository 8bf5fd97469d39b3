"""SoRA: the proximal step (soft-thresholding: an entry below the threshold becomes exactly 0),
the ξ schedule, the final cut of the gates to ``target_params`` (exact), the gated layer as a
LoRA (merge, the peft round trip of the kept components), and a whole run: ranks.jsonl, the
record's final count, and a resume before and after the cut."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adabudget.compose import resume_config
from adabudget.config import ConfigError
from adabudget.export import export_peft_adapter
from adabudget.methods import apply_method, method_config_from_dict, sora
from adabudget.methods.sora import SoRAConfig, SoRAHooks, component_cost, cut_to, xi_at
from adabudget.training import train
from conftest import tiny_model as build


def applied(**knobs):
    model = build()
    cfg = method_config_from_dict({"name": "sora", "r": 4, **knobs})
    cfg.validate()
    wrapped = apply_method(model, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B off zero, so the gates matter
        for layer in wrapped.values():
            layer.B.add_(0.1 * torch.randn(layer.B.shape, generator=g))
    return model, cfg, wrapped


def logits(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(input_ids=torch.randint(5, 1000, (2, 7), generator=g)).logits


# ---------------------------------------------------------------- the proximal step
def test_an_entry_below_the_threshold_becomes_exactly_zero_the_others_shrink_by_it():
    _, cfg, wrapped = applied(xi=1e-3)
    layer = next(iter(wrapped.values()))
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([0.5, -9e-4, 9e-4, -0.25]))
    SoRAHooks(wrapped, cfg).after_step(0, None)
    assert layer.gate.tolist() == pytest.approx([0.499, 0.0, 0.0, -0.249], abs=1e-7)
    assert layer.gate[1].item() == 0.0 and layer.gate[2].item() == 0.0  # exactly, not nearly
    assert layer.kept_rank() == 2


def test_the_paper_threshold_is_xi_times_the_gates_learning_rate():
    _, cfg, wrapped = applied(xi=0.1, xi_times_lr=True)
    layer = next(iter(wrapped.values()))
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([0.5, 0.009, -0.011, 1.0]))
    optimizer = torch.optim.SGD([m.gate for m in wrapped.values()], lr=0.1)  # η_t ξ = 0.01
    SoRAHooks(wrapped, cfg).after_step(0, optimizer)
    assert layer.gate.tolist() == pytest.approx([0.49, 0.0, -0.001, 0.99], abs=1e-7)


@pytest.mark.parametrize(
    "schedule, table",
    [
        ("linear", [(0, 1e-4), (39, 1e-4), (40, 2e-4), (119, 3e-4), (240, 7e-4), (10_000, 7e-4)]),
        ("exp_linear", [(0, 1e-4), (240, 7e-4), (120, 1e-4 * 7**0.5)]),
    ],
)
def test_the_sparsifying_scheduler_as_a_table(schedule, table):
    cfg = SoRAConfig(xi=1e-4, xi_max=7e-4, xi_stages=7, xi_stage_steps=40, xi_schedule=schedule)
    cfg.validate()
    for step, xi in table:
        assert xi_at(cfg, step) == pytest.approx(xi, rel=1e-9), step
    assert xi_at(SoRAConfig(xi=3e-4), 999) == 3e-4  # constant


# ---------------------------------------------------------------- the cut to a level
def test_the_final_cut_keeps_the_largest_gates_within_the_level_exactly():
    _, cfg, wrapped = applied()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in wrapped.values():
            layer.gate.copy_(torch.rand(layer.gate.shape, generator=g) + 0.01)
    full = sum(m.rank * component_cost(m) for m in wrapped.values())
    target = full // 3 + 17
    entries = sorted(
        ((abs(m.gate[i].item()), n, i, component_cost(m)) for n, m in wrapped.items() for i in range(m.rank)),
        reverse=True,
    )
    # the reference: drop from the smallest up while over the level
    kept, expected = full, {(n, i) for _, n, i, _ in entries}
    for _, n, i, cost in reversed(entries):
        if kept <= target:
            break
        kept -= cost
        expected.discard((n, i))

    hooks = SoRAHooks(wrapped, SoRAConfig(r=4, xi=0.0, target_params=target))
    hooks.start(10)
    for step in range(9):
        hooks.after_step(step, None)
    assert hooks.cut is None  # final_steps = 0: the cut comes after the last step only
    hooks.after_step(9, None)
    left = {(n, i) for n, m in wrapped.items() for i in m.gate.nonzero().squeeze(1).tolist()}
    assert left == expected
    assert hooks.kept()["kept_params"] == kept <= target
    assert target - kept < max(component_cost(m) for m in wrapped.values())
    assert hooks.cut == 4 * len(wrapped) - len(left)


def test_after_the_cut_a_zero_gate_stays_zero():
    _, _, wrapped = applied()
    hooks = SoRAHooks(wrapped, SoRAConfig(r=4, xi=0.0, target_params=1, final_steps=2))
    hooks.start(5)
    with torch.no_grad():
        for layer in wrapped.values():
            layer.gate.fill_(1.0)
    hooks.after_step(2, None)  # the cut, at T - final_steps - 1
    assert hooks.kept()["kept_params"] == 0 and hooks.cut == 4 * len(wrapped)
    with torch.no_grad():  # an optimizer step moves the cut gates off 0
        for layer in wrapped.values():
            layer.gate.add_(0.5)
    hooks.after_step(3, None)
    assert all((m.gate == 0).all() for m in wrapped.values())


def test_cut_to_reports_nothing_to_cut_under_the_level():
    _, _, wrapped = applied()
    assert cut_to(wrapped, 10**9) == 0


# ---------------------------------------------------------------- the result is a LoRA
def test_zero_gates_leave_the_export_and_peft_computes_the_same(tmp_path):
    model, _, wrapped = applied()
    with torch.no_grad():
        for k, layer in enumerate(wrapped.values()):
            layer.gate[k % 4] = 0.0
            if k == 0:
                layer.gate.zero_()  # a matrix pruned whole: left out of the adapter
    names = list(wrapped)
    summary = export_peft_adapter(model, wrapped, tmp_path, base_model_name_or_path="tiny-bert")
    assert summary["pruned"] == [names[0]]
    assert set(summary["modules"].values()) == {3}
    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)


def test_merge_folds_the_gated_update():
    model, _, wrapped = applied()
    with torch.no_grad():
        for layer in wrapped.values():
            layer.gate[0] = 0.0
    expected = logits(model)
    sora.merge(model, wrapped)
    assert not any(isinstance(m, sora.SoRALinear) for m in model.modules())
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- a whole run
def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "ranks.jsonl").read_text().splitlines()]


def level(compose_run, r: int = 4) -> int:
    from adabudget.arch import arch_of
    from adabudget.methods import count_method

    return count_method(SoRAConfig(r=r), arch_of(build())) // 2


RUN = ["method=sora", "method.r=4", "method.xi=2e-3", "method.final_steps=6"]


def test_a_run_reaches_the_level_records_the_ranks_and_resumes_before_and_after_the_cut(compose_run):
    target = level(compose_run)
    full = train(compose_run(*RUN, f"method.target_params={target}", "run_name=full"))
    assert full["status"] == "completed"
    kept = full["sora"]["kept_params"]
    assert full["adapter_params_final"] == kept <= target and full["sora"]["cut"] > 0
    assert target - kept < 2 * 384  # within one component of the level (tiny-bert: in + out + 1 <= 289)
    assert sum(full["ranks"].values()) < 4 * len(full["ranks"])
    lines = rows(full["run_dir"])
    assert lines[0]["step"] == 0 and sum(lines[0]["ranks"].values()) == 4 * len(full["ranks"])
    assert lines[-1]["final"] and lines[-1]["ranks"] == full["ranks"] and lines[-1]["kept_params"] == kept
    assert [r["step"] for r in lines] == sorted({r["step"] for r in lines})
    assert Path(full["exports"]["adapter"]["path"], "adapter_config.json").exists()
    from adabudget.analysis.records import load

    assert load([full["run_dir"]]).runs["final_params"].tolist() == [kept]  # the tables' count

    for stop in (9, 20):  # before the cut (after step 17) and after it
        first = train(
            compose_run(
                *RUN, f"method.target_params={target}", f"run_name=s{stop}", f"train.stop_after_step={stop}"
            )
        )
        assert first["status"] == "interrupted"
        resumed = train(resume_config(first["run_dir"]))
        assert resumed["status"] == "completed"
        assert resumed["final"] == full["final"] and resumed["ranks"] == full["ranks"], stop
        assert resumed["sora"] == full["sora"]
        assert rows(resumed["run_dir"]) == lines


@pytest.mark.parametrize(
    "knobs, field",
    [
        ({"r": 0}, "method.r"),
        ({"xi": -1.0}, "method.xi"),
        ({"xi_schedule": "cosine"}, "method.xi_schedule"),
        ({"xi_schedule": "linear"}, "method.xi_schedule"),
        ({"target_params": 0}, "method.target_params"),
    ],
)
def test_bad_knobs_are_refused_naming_the_field(knobs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        SoRAConfig(**knobs).validate()


def test_a_level_above_what_r_max_builds_is_refused_before_any_compute(compose_run):
    with pytest.raises(ConfigError, match=r"method\.target_params.*raise method\.r"):
        train(compose_run("method=sora", "method.r=1", "method.target_params=100000000"))
