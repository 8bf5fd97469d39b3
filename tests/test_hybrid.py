"""Layer groups (S4), budget solving and the hybrid method end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from adabudget.arch import arch_from_config
from adabudget.compose import preset as _preset
from adabudget.config import ConfigError
from adabudget.groups import allocation_shares, split_layers
from adabudget.hub import packaged_path
from adabudget.methods import count_trainable, method_config_from_dict
from adabudget.methods.hybrid import plan
from transformers import AutoConfig


def preset(name: str) -> dict:
    return _preset("method", name)


@pytest.mark.parametrize(
    "layers, groups, pattern, sizes",
    [
        (12, 4, "uniform", [3, 3, 3, 3]),
        (12, 4, "spindle", [2, 4, 4, 2]),
        (12, 4, "increasing", [2, 3, 3, 4]),
        (12, 4, "decreasing", [4, 3, 3, 2]),
        (6, 4, "spindle", [1, 2, 2, 1]),
        (6, 4, "uniform", [2, 2, 1, 1]),
        (24, 4, "spindle", [4, 8, 8, 4]),
        (6, 3, [1, 3, 2], [1, 3, 2]),
        (6, 1, "spindle", [6]),
    ],
)
def test_grouping_patterns(layers, groups, pattern, sizes):
    split = split_layers(layers, groups, pattern)
    assert [len(g) for g in split] == sizes
    assert sum(split, []) == list(range(layers))  # consecutive, every layer once


def test_allocation_shares():
    assert allocation_shares(4, "uniform") == [0.25] * 4
    assert allocation_shares(4, "increasing") == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert allocation_shares(2, [3, 1]) == [0.75, 0.25]
    with pytest.raises(ConfigError, match="method.allocation"):
        allocation_shares(3, [1, 1])


@pytest.fixture(scope="module")
def minilm():
    return AutoConfig.from_pretrained(packaged_path("minilm"), num_labels=2)


@pytest.mark.parametrize("budget", [60_000, 150_000, 400_000])
@pytest.mark.parametrize("allocation", ["uniform", "increasing"])
def test_budget_solved_within_two_percent(minilm, budget, allocation):
    cfg = method_config_from_dict({**preset("s4"), "budget": budget, "allocation": allocation})
    n = count_trainable(cfg, minilm)
    assert abs(n - budget) <= 0.02 * budget, (n, budget)
    groups = plan(cfg, arch_from_config(minilm))
    assert [len(g.layers) for g in groups] == [1, 2, 2, 1]
    assert list(groups[2].methods) == ["bitfit", "adapter", "prefix"]  # S4 G3 in application order


def test_budget_as_percent_of_backbone(minilm):
    arch = arch_from_config(minilm)
    cfg = method_config_from_dict({**preset("s4"), "budget_percent": 0.5})
    target = 0.005 * arch.backbone_params()
    assert arch.backbone_params() == 22_713_216  # all-MiniLM-L6-v2 without its task head
    assert abs(count_trainable(cfg, minilm) - target) <= 0.02 * target


def test_uniform_allocation_shares_the_budget(minilm):
    cfg = method_config_from_dict({**preset("s4"), "budget": 200_000})
    arch = arch_from_config(minilm)
    from adabudget.methods.hybrid import report

    per_group = [g["params"] for g in report(cfg, arch)]
    assert all(abs(p - 50_000) <= 0.1 * 50_000 for p in per_group), per_group


@pytest.mark.parametrize(
    "change, field",
    [
        ({"groups": [{"lora": {}}]}, "method.groups"),
        ({"groups": [{"lora": {}}, {"full": {}}, {}, {}]}, r"method.groups\[1\].full"),
        # a registered method a group does not apply (it used to vanish from the group silently)
        (
            {"groups": [{"lora": {}}, {"dylora": {}}, {}, {}]},
            r"method.groups\[1\].dylora: a registered method",
        ),
        ({"groups": [{"lora": {}}, {}, {"delta_lora": {}}, {}]}, r"method.groups\[2\].delta_lora"),
        ({"groups": [{"lora": {"layers": [0]}}, {}, {}, {}]}, r"method.groups\[0\].lora.layers"),
        ({"groups": [{"lora": {"rank": 4}}, {}, {}, {}]}, r"method.groups\[0\].lora.rank"),
        ({"groups": [{"lora": {"r": 0}}, {}, {}, {}]}, r"method.groups\[0\].lora"),
        ({"grouping": "zigzag"}, "method.grouping"),
        ({"grouping": [1, 2]}, "method.grouping"),
        ({"allocation": [1, 2]}, "method.allocation"),
        ({"budget": 100, "budget_percent": 1.0}, "method.budget"),
        ({"budget_percent": 150.0}, "method.budget_percent"),
    ],
)
def test_bad_hybrid_configs_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        method_config_from_dict({**preset("s4"), **change}).validate()


def test_unreachable_budget_fails_before_building(minilm):
    cfg = method_config_from_dict({**preset("s4"), "budget": 5_000})  # below BitFit's fixed cost
    with pytest.raises(ConfigError, match="method.budget"):
        count_trainable(cfg, minilm)
    with pytest.raises(ConfigError, match="num_groups"):
        count_trainable(
            method_config_from_dict({**preset("s4"), "num_groups": 8, "groups": [{}] * 8}), minilm
        )


def test_train_s4_end_to_end_on_mr(compose_run):
    """`adabudget train method=s4` on the packaged MiniLM and the real movie-review task."""
    from adabudget.training import train

    cfg = compose_run(
        "method=s4",
        "data.max_train_samples=64",
        "data.max_eval_samples=64",
        "train.max_steps=4",
        "train.batch_size=8",
        "train.eval_every=0",
        "train.log_every=2",
        "train.progress=false",
        tiny=False,
    )
    result = train(cfg)
    assert result["status"] == "completed"
    run = Path(result["run_dir"])
    saved = json.loads((run / "result.json").read_text())
    groups = saved["groups"]
    assert [g["layers"] for g in groups] == [[0], [1, 2], [3, 4], [5]]
    assert set(groups[3]["methods"]) == {"bitfit", "lora", "prefix"}
    head = 384 * 2 + 2
    assert saved["trainable_params"] == sum(g["params"] for g in groups) + head
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert 0.0 <= saved["final"]["dev"]["accuracy"] <= 1.0


def test_prompt_too_long_for_positions_fails_before_the_run_folder(compose_run, tmp_path):
    from adabudget.training import train

    cfg = compose_run("method=prompt", "method.length=100", "data.max_length=64")  # tiny-bert: 128 positions
    with pytest.raises(ConfigError, match="method.length=100"):
        train(cfg)
    assert not (tmp_path / "runs").exists()


def test_adalora_in_two_groups_shares_one_budget_and_merges(compose_run):
    """Two AdaLoRA groups (b(T) = 2 x 6 + 3 x 6 = 30) with BitFit and (IA)3: one global top-k,
    and the merged checkpoint computes what the saved adapter computes."""
    import torch
    from adabudget.config import ModelConfig
    from adabudget.export import load_adapter
    from adabudget.models import load_model
    from adabudget.session import seed_everything
    from adabudget.training import train
    from transformers import AutoModelForSequenceClassification

    groups = (
        "method.groups=[{adalora: {init_r: 4, target_r: 2, mask_interval: 2}, bitfit: {}},"
        " {adalora: {init_r: 6, target_r: 3, mask_interval: 2}, ia3: {}}]"
    )
    result = train(compose_run("method=hybrid", "method.num_groups=2", groups, "export_merged=true"))
    assert result["status"] == "completed"
    assert sum(result["ranks"].values()) == 30
    lines = (Path(result["run_dir"]) / "ranks.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["final"] and sum(last["group_ranks"]) == 30 and len(last["group_ranks"]) == 2
    run = Path(result["run_dir"])
    merged = AutoModelForSequenceClassification.from_pretrained(run / "merged").eval()
    # the unmerged model: the run's tiny-bert (same seed, same init) + the saved adapter
    seed_everything(42)
    fresh = load_model(ModelConfig(name="tiny-bert"), 2, False, 0).eval()
    load_adapter(fresh, run / "adapter")
    ids = torch.randint(5, 1000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            fresh(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=0
        )
