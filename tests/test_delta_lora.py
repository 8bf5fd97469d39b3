"""Delta-LoRA (budget/methods/delta_lora.py): W moves by exactly λ s (B'A' - BA) after each step
from K on, λ = 0 is LoRA step for step, a resumed run continues bit for bit, merge and the adapter
export reproduce the trained function."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adabudget.arch import arch_of
from adabudget.compose import resume_config
from adabudget.config import ConfigError
from adabudget.export import load_adapter, merge_methods, save_adapter
from adabudget.methods import REGISTRY, apply_method, count_method, delta_lora, lora, method_config_from_dict
from adabudget.training import train
from conftest import tiny_batch as batch
from conftest import tiny_logits as logits
from conftest import tiny_model as build


def setup(arch_name="tiny-bert", seed=0, **knobs):
    model = build(arch_name, seed)
    cfg = method_config_from_dict({"name": "delta_lora", "r": 4, **knobs})
    cfg.validate()
    wrapped = apply_method(model, cfg)
    return model, cfg, wrapped


def steps(model, wrapped, cfg, n: int, lr: float = 1e-2, on_step=None):
    """n optimizer steps through the hooks, as adabudget.training calls them."""
    hooks = REGISTRY[cfg.name].hooks(model, wrapped, cfg) if cfg.name == "delta_lora" else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(n):
        if hooks is not None:
            hooks.before_step(step)
        before = {
            n: (m.A.detach().clone(), m.B.detach().clone(), m.base.weight.detach().clone())
            for n, m in wrapped.items()
        }
        model(**batch()).loss.backward()
        opt.step()
        if hooks is not None:
            hooks.after_step(step, opt)
        opt.zero_grad()
        if on_step is not None:
            on_step(step, before)
    return hooks


def as_linear(layer, w: torch.Tensor) -> torch.Tensor:
    return w.T if layer.fan_in_fan_out else w


@pytest.mark.parametrize("arch_name", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_step_moves_w_by_the_product_change(arch_name):
    model, cfg, wrapped = setup(arch_name, update_ratio=2.0, start_step=2)
    moved = []

    def check(step, before):
        for name, layer in wrapped.items():
            a0, b0, w0 = (t.double() for t in before[name])
            a1, b1 = layer.A.detach().double(), layer.B.detach().double()
            change = as_linear(layer, layer.base.weight.detach().double() - w0)  # (out, in)
            if step < cfg.start_step:  # K warm-up steps: W stays frozen
                assert torch.equal(change, torch.zeros_like(change)), (step, name)
                continue
            expected = cfg.update_ratio * layer.scaling * (b1 @ a1 - b0 @ a0)
            assert expected.abs().max() > 1e-4  # the step really moved the factors
            torch.testing.assert_close(change, expected, atol=1e-6, rtol=1e-5)
            moved.append(name)

    steps(model, wrapped, cfg, 4, on_step=check)
    assert len(moved) == 2 * len(wrapped)
    # W got no gradient and has no optimizer state: only the factors train
    assert all(not m.base.weight.requires_grad for m in wrapped.values())


def test_update_ratio_zero_is_lora_step_for_step():
    """The same 5 steps: λ = 0 gives LoRA's parameters exactly after every step; λ = 2 does not."""
    configs = {
        "lora": method_config_from_dict({"name": "lora", "r": 4}),
        "zero": method_config_from_dict({"name": "delta_lora", "r": 4, "update_ratio": 0.0}),
        "two": method_config_from_dict({"name": "delta_lora", "r": 4, "update_ratio": 2.0}),
    }
    trace = {}
    for key, cfg in configs.items():
        model = build(seed=3)
        wrapped = apply_method(model, cfg)
        trace[key] = []
        steps(
            model,
            wrapped,
            cfg,
            5,
            on_step=lambda s, b, model=model, key=key: trace[key].append(
                [p.detach().clone() for p in model.parameters()]
            ),
        )
    for step, (a, zero, two) in enumerate(zip(trace["lora"], trace["zero"], trace["two"])):
        assert all(torch.equal(x, y) for x, y in zip(a, zero)), f"λ = 0 left LoRA at step {step}"
        assert not all(torch.equal(x, y) for x, y in zip(a, two)), f"λ = 2 equals LoRA at step {step}"


def test_count_is_loras():
    model, cfg, _ = setup()
    arch = arch_of(model)
    as_lora = method_config_from_dict({"name": "lora", "r": 4})
    expected = lora.count(as_lora, arch)
    assert count_method(cfg, arch) == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


@pytest.mark.parametrize("arch_name", ["tiny-bert", "tiny-gpt2"])
def test_merge_and_adapter_reproduce_the_trained_model(arch_name, tmp_path):
    model, cfg, wrapped = setup(arch_name)
    original = {n: m.base.weight.detach().clone() for n, m in wrapped.items()}
    steps(model, wrapped, cfg, 4)
    assert any(not torch.equal(original[n], m.base.weight) for n, m in wrapped.items()), "W never moved"
    expected = logits(model)

    merged = build(arch_name)  # the adapter reloads onto the original backbone, W's change included
    # (the run's hooks hand their state, the updated W, to the adapter's hooks.pt, as train() does)
    save_adapter(
        model, cfg, wrapped, tmp_path / "adapter", arch_name, [delta_lora.hooks(model, wrapped, cfg)]
    )
    assert (tmp_path / "adapter" / "hooks.pt").exists()
    assert not any(
        m.base.weight.requires_grad for m in wrapped.values()
    )  # W stays out of the trainable state
    torch.testing.assert_close(logits(model), expected, atol=0, rtol=0)
    load_adapter(merged, tmp_path / "adapter")
    torch.testing.assert_close(logits(merged), expected, atol=1e-6, rtol=0)

    merge_methods(model, wrapped, ["delta_lora"])  # s B A folded into the updated W
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())


def test_resume_continues_exactly(compose_run):
    knobs = ["method=delta_lora", "method.r=4", "train.checkpoint=end"]
    full = train(compose_run("run_name=full", *knobs))
    first = train(compose_run("run_name=killed", *knobs, "train.stop_after_step=9"))
    assert first["status"] == "interrupted" and first["steps"] == 9
    stopped = torch.load(Path(first["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)["hooks"][0]
    resumed = train(resume_config(first["run_dir"]))
    assert resumed["status"] == "completed" and resumed["final"] == full["final"]

    ends = [
        torch.load(Path(r["run_dir"]) / "checkpoints" / "last.pt", weights_only=True) for r in (full, resumed)
    ]
    w_full, w_resumed = (e["hooks"][0]["weights"] for e in ends)
    assert w_full and set(w_full) == set(w_resumed) == set(stopped["weights"])
    for name in w_full:
        assert torch.equal(w_full[name], w_resumed[name]), name  # W restored, then moved alike
        assert not torch.equal(w_full[name], stopped["weights"][name]), name  # W kept moving after step 9
    for name, value in ends[0]["trainable"].items():
        assert torch.equal(value, ends[1]["trainable"][name]), name


def test_update_ratio_zero_trains_as_lora(compose_run):
    """Through adabudget.training: λ = 0 ends with LoRA's trained factors and head, bit for bit."""
    common = ["method.r=4", "method.alpha=16", "train.checkpoint=end"]
    runs = {
        "lora": train(compose_run("run_name=lora", "method=lora", *common)),
        "zero": train(compose_run("run_name=zero", "method=delta_lora", "method.update_ratio=0", *common)),
        "two": train(compose_run("run_name=two", "method=delta_lora", *common)),
    }
    state = {
        k: torch.load(Path(r["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)["trainable"]
        for k, r in runs.items()
    }
    assert (
        runs["zero"]["trainable_params"]
        == runs["lora"]["trainable_params"]
        == runs["two"]["trainable_params"]
    )
    assert set(state["zero"]) == set(state["lora"]) == set(state["two"])
    assert all(torch.equal(state["zero"][n], state["lora"][n]) for n in state["lora"])
    assert not all(torch.equal(state["two"][n], state["lora"][n]) for n in state["lora"])


@pytest.mark.parametrize(
    "knobs, field",
    [
        ({"update_ratio": -1.0}, "method.update_ratio"),
        ({"start_step": -1}, "method.start_step"),
        ({"r": 0}, "method.r"),
    ],
)
def test_validate_names_the_field(knobs, field):
    with pytest.raises(ConfigError, match=field):
        method_config_from_dict({"name": "delta_lora", **knobs}).validate()


def test_hooks_refuse_a_foreign_checkpoint():
    model, cfg, wrapped = setup()
    hooks = delta_lora.hooks(model, wrapped, cfg)
    with pytest.raises(ValueError, match="does not adapt"):
        hooks.load_state_dict({"weights": {"nowhere.dense": torch.zeros(1)}})


@pytest.mark.parametrize("arch_name", ["tiny-bert", "tiny-gpt2"])
@pytest.mark.parametrize("start_step", [0, 1], ids=["K=0", "K=1"])
def test_peft_export_carries_the_change_of_w(tmp_path, arch_name, start_step):
    """The telescoped change, (1 + λ) s B A - λ s B_K A_K, as a plain peft LoRA adapter on the
    original backbone computes what the trained model computes (rank r with K = 0, 2r after)."""
    peft = pytest.importorskip("peft")
    from adabudget.export import export_peft_adapter

    model, cfg, wrapped = setup(arch_name, start_step=start_step)
    steps(model, wrapped, cfg, 3)
    summary = export_peft_adapter(model, wrapped, tmp_path / "peft", base_model_name_or_path=arch_name)
    assert set(summary["modules"].values()) == {cfg.r if start_step == 0 else 2 * cfg.r}
    loaded = peft.PeftModel.from_pretrained(build(arch_name), tmp_path / "peft").eval()
    model.eval()
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)


def test_peft_export_is_refused_when_the_start_of_w_is_unknown(tmp_path):
    """W restored from a checkpoint that holds no (A_K, B_K): the change cannot be written as
    factors; refused, pointing at the adapter and merged exports, before anything is written."""
    from adabudget.export import export_peft_adapter

    model, cfg, wrapped = setup()
    hooks = steps(model, wrapped, cfg, 2)
    state = hooks.state_dict()
    del state["start"]
    fresh, _, fresh_wrapped = setup()
    REGISTRY["delta_lora"].hooks(fresh, fresh_wrapped, cfg).load_state_dict(state)
    with pytest.raises(ValueError, match="updated W0 whose start is not known.*save_adapter.*save_merged"):
        export_peft_adapter(fresh, fresh_wrapped, tmp_path / "peft", base_model_name_or_path="tiny-bert")
    assert not (tmp_path / "peft").exists()
