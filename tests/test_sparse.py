"""Sparse fine-tuning and RoSA (adabudget.methods.sparse / rosa): the mask, its memory, its
calibration against a direct |θ ∇θ| / (∇θ)² computation, exact counts, resume and merge."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from adabudget.arch import arch_of
from adabudget.compose import resume_config
from adabudget.config import ConfigError
from adabudget.methods import REGISTRY, count_method, method_config_from_dict
from adabudget.methods.lora import LoRALinear
from adabudget.methods.sparse import SparseLinear
from adabudget.models import tiny_config
from adabudget.modules import freeze_backbone
from adabudget.training import train
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification


def build(arch_name: str = "tiny-bert", seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(arch_name, 2, False)).eval()
    freeze_backbone(model, train_head=False)
    return model


def batches(n: int) -> list[dict]:
    """n different token batches (labels included), the same on every call."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        ids = torch.randint(5, 1000, (4, 9), generator=g)
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(0, 2, (4,), generator=g),
            }
        )
    return out


def logits(model, b):
    with torch.no_grad():
        return model(**{k: v for k, v in b.items() if k != "labels"}).logits


def loss_of(model):
    return lambda b: model(**b).loss


def prepared(values: dict, arch_name: str = "tiny-bert", calibrate: bool = True):
    """(model, cfg, wrapped, hooks, sparse layers) with the method applied and calibrated."""
    model = build(arch_name)
    cfg = method_config_from_dict(values)
    cfg.validate()
    wrapped = REGISTRY[cfg.name].apply(model, cfg)
    hooks = REGISTRY[cfg.name].hooks(model, wrapped, cfg)
    if calibrate:
        hooks.calibrate(loss_of(model), batches)
    return model, cfg, wrapped, hooks, hooks.layers


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def effective(layers: dict) -> dict[str, torch.Tensor]:
    """W0 + S per layer, (out, in)."""
    with torch.no_grad():
        return {
            n: (m.base.weight.t() if m.fan_in_fan_out else m.base.weight) + m.delta_weight()
            for n, m in layers.items()
        }


def kept_mask(layer: SparseLinear) -> torch.Tensor:
    """The kept entries as a bool mask in (out, in) layout."""
    mask = torch.zeros(layer.base.weight.numel(), dtype=torch.bool)
    mask[layer.idx] = True
    mask = mask.view(layer.base.weight.shape)
    return mask.t() if layer.fan_in_fan_out else mask


def train_steps(model, steps: int = 3, lr: float = 1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for b in batches(steps):
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


def assert_same_end(full: dict, resumed: dict) -> None:
    """Two runs' last checkpoints hold the same trainable state and the same chosen entries."""
    a = torch.load(Path(full["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(Path(resumed["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)
    for (name, x), (_, y) in zip(a["trainable"].items(), b["trainable"].items()):
        assert torch.equal(x, y), name
    for x, y in zip(a["hooks"][0]["indices"].values(), b["hooks"][0]["indices"].values()):
        assert torch.equal(x, y)


MODES = [
    ("density", {"name": "sparse", "density": 0.05}),
    ("budget", {"name": "sparse", "budget": 777}),
    ("global-budget", {"name": "sparse", "budget": 777, "scope": "global"}),
    ("global-density", {"name": "sparse", "density": 0.05, "scope": "global"}),
    ("rows-budget", {"name": "sparse", "budget": 2000, "selection": "structured"}),
    ("rows-density", {"name": "sparse", "density": 0.1, "selection": "structured"}),
    ("fisher", {"name": "sparse", "density": 0.05, "score": "fisher"}),
    ("magnitude", {"name": "sparse", "density": 0.05, "score": "magnitude"}),
    ("rosa", {"name": "rosa", "r": 2, "density": 0.05}),
    ("rosa-global", {"name": "rosa", "r": 2, "budget": 500, "scope": "global", "score": "grad"}),
    ("heads-density", {"name": "sparse", "density": 0.5, "selection": "heads"}),
    ("heads-budget", {"name": "sparse", "budget": 5000, "selection": "heads"}),
]
MODE_IDS = [m[0] for m in MODES]


# ---------------------------------------------------------------- sizes
def test_count_worked_examples():
    """The config docstrings' numbers on tiny BERT (8 matrices 32 x 32, 4 of 64 x 32 / 32 x 64)."""
    arch = arch_of(build())

    def n(**values):
        return count_method(method_config_from_dict(values), arch)

    assert n(name="sparse", density=0.01) == 8 * 10 + 4 * 20
    assert n(name="sparse", budget=100) == 100
    assert n(name="sparse", budget=100, scope="global") == 100
    assert n(name="sparse", density=0.01, scope="global") == int(0.01 * 16384)  # floor of the total
    assert n(name="sparse", density=0.1, selection="structured") == 8 * 3 * 32 + 2 * (6 * 32) + 2 * (3 * 64)
    # budget 2000: shares 125 / 250 entries -> 3 rows of 32 (96) and 7 of 32 or 3 of 64 (224 / 192)
    assert n(name="sparse", budget=2000, selection="structured") == 8 * 96 + 2 * 224 + 2 * 192
    assert n(name="rosa", r=2, density=0.01) == 1792 + 160
    # heads (2 of 16 per attention matrix; FFN matrices not targeted): half of them is one head,
    # 16 rows x 32 of query / key / value, 32 x 16 columns of the output projection, 8 matrices
    assert n(name="sparse", density=0.5, selection="heads") == 8 * 512
    # budget 5000 over 8 x 1024 entries: shares of 625 -> one head of 512 each
    assert n(name="sparse", budget=5000, selection="heads") == 8 * 512


def test_budget_shares_are_exact():
    """budget 100: 6.25 per attention matrix, 12.5 per FFN matrix; the 4 left go to the FFN ones."""
    _, _, _, _, layers = prepared({"name": "sparse", "budget": 100}, calibrate=False)
    ks = {n: m.k for n, m in layers.items()}
    assert sum(ks.values()) == 100
    assert sorted(ks.values()) == [6] * 8 + [13] * 4


@pytest.mark.parametrize("arch_name", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("mode, values", MODES, ids=MODE_IDS)
def test_count_equals_trainable_after_calibrate(mode, values, arch_name):
    model, cfg, _, _, layers = prepared(values, arch_name)
    assert trainable_count(model) == count_method(cfg, arch_of(model))
    assert all(m.values.numel() == m.k == m.idx.unique().numel() for m in layers.values())
    if "structured" in values.values():  # whole rows of the (out, in) matrix, also for GPT-2's Conv1D
        for m in layers.values():
            rows = kept_mask(m).sum(1)
            assert set(rows.tolist()) <= {0, m.in_features} and rows.sum() == m.k
    if "heads" in values.values():  # whole heads: head_dim rows (q, k, v, qkv) or columns (o)
        assert {m.heads[0] for m in layers.values()} == {"rows", "cols"}
        for m in layers.values():
            axis, hd = m.heads
            mask = kept_mask(m) if axis == "rows" else kept_mask(m).t()  # heads along dim 0
            per_head = mask.reshape(-1, hd * mask.shape[1]).sum(1)
            assert set(per_head.tolist()) <= {0, hd * mask.shape[1]} and per_head.sum() == m.k


@pytest.mark.parametrize(
    "values, field",
    [
        ({"name": "sparse", "selection": "structured", "scope": "global"}, "method.scope"),
        ({"name": "sparse", "selection": "heads", "scope": "global"}, "method.scope"),
        (
            {"name": "sparse", "selection": "heads", "target_modules": ["intermediate.dense"]},
            "method.selection",
        ),
        ({"name": "sparse", "selection": "heads", "budget": 100}, "method.budget"),  # < 1 head
        ({"name": "sparse", "budget": 10**9}, "method.budget"),
        ({"name": "sparse", "density": 0.01, "selection": "structured"}, "method.density"),  # < 1 row
        ({"name": "sparse", "score": "random"}, "method.score"),
        ({"name": "rosa", "r": 0}, "method.r"),
    ],
)
def test_bad_knobs_fail_naming_the_field(values, field):
    model = build()
    cfg = method_config_from_dict(values)
    with pytest.raises(ConfigError, match=field):
        cfg.validate()
        count_method(cfg, arch_of(model))
    with pytest.raises(ConfigError, match=field):
        cfg.validate()
        REGISTRY[cfg.name].apply(model, cfg)


# ---------------------------------------------------------------- the mask
@pytest.mark.parametrize("mode, values", MODES, ids=MODE_IDS)
def test_kept_entries_move_and_nothing_else(mode, values):
    model, _, wrapped, _, layers = prepared(values)
    base = build()
    torch.testing.assert_close(logits(model, batches(1)[0]), logits(base, batches(1)[0]), atol=1e-6, rtol=0)
    w0 = {n: m.base.weight.detach().clone() for n, m in layers.items()}
    before = effective(layers)
    train_steps(model)
    after = effective(layers)
    moved_total = 0
    for name, m in layers.items():
        assert torch.equal(m.base.weight, w0[name]), "the dense W0 must stay frozen"
        moved = after[name] != before[name]
        assert not (moved & ~kept_mask(m)).any(), f"{name}: an entry outside the mask changed"
        moved_total += int(moved.sum())
    assert moved_total >= 0.9 * sum(m.k for m in layers.values())
    if values["name"] == "rosa":  # the LoRA part trains too
        assert all(layer.B.abs().sum() > 0 for layer in wrapped.values())


def _direct_scores(values: dict, arch_name: str) -> dict[str, torch.Tensor]:
    """Σ_b |W ∇W L_b| or Σ_b (∇W L_b)² on the plain model (no wrappers), (out, in) layout."""
    model = build(arch_name)
    cfg = method_config_from_dict(values)
    names = list(REGISTRY[cfg.name].apply(build(arch_name), cfg))
    weights = {n: model.get_submodule(n).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
    acc = {n: torch.zeros_like(w) for n, w in weights.items()}
    for b in batches(cfg.calibration_steps):
        model.zero_grad()
        model(**b).loss.backward()
        for n, w in weights.items():
            acc[n] += (w * w.grad).abs() if cfg.score == "grad" else w.grad.square()
    conv1d = {n: not isinstance(model.get_submodule(n), torch.nn.Linear) for n in names}
    return {n: (s.t() if conv1d[n] else s).detach() for n, s in acc.items()}


@pytest.mark.parametrize("arch_name", ["tiny-bert", "tiny-gpt2"])
@pytest.mark.parametrize(
    "values",
    [
        {"name": "sparse", "density": 0.05, "calibration_steps": 3},
        {"name": "sparse", "budget": 777, "scope": "global", "calibration_steps": 3},
        {"name": "sparse", "density": 0.1, "selection": "structured", "calibration_steps": 3},
        {"name": "sparse", "density": 0.5, "selection": "heads", "calibration_steps": 3},
        {"name": "rosa", "r": 2, "density": 0.05, "calibration_steps": 3},  # fisher
    ],
    ids=["grad", "global", "rows", "heads", "rosa-fisher"],
)
def test_selection_takes_the_largest_scores(values, arch_name):
    """The calibrated mask is the top of a direct autograd computation on the same batches."""
    direct = _direct_scores(values, arch_name)
    *_, layers = prepared(values, arch_name)
    cfg = method_config_from_dict(values)
    if cfg.scope == "global":
        kept = torch.cat([direct[n][kept_mask(m)] for n, m in layers.items()])
        dropped = torch.cat([direct[n][~kept_mask(m)] for n, m in layers.items()])
        assert kept.numel() == 777
        assert kept.min() >= dropped.max() * (1 - 1e-5)
        return
    for name, m in layers.items():
        mask, score = kept_mask(m), direct[name]
        if values.get("selection") == "structured":
            mask, score = mask.all(1), score.sum(1)  # the kept rows, by their summed scores
        if values.get("selection") == "heads":  # the kept heads, by their summed scores
            axis, hd = m.heads
            if axis == "cols":
                mask, score = mask.t(), score.t()
            mask = mask.reshape(-1, hd * mask.shape[1]).all(1)
            score = score.reshape(-1, hd * score.shape[1]).sum(1)
        assert mask.any() and not mask.all()
        assert score[mask].min() >= score[~mask].max() * (1 - 1e-5), name


@pytest.mark.parametrize("arch_name", ["tiny-bert", "tiny-gpt2"])
@pytest.mark.parametrize("mode, values", [MODES[0], MODES[8]], ids=["sparse", "rosa"])
def test_value_gradients_are_the_dense_gradient_at_the_kept_entries(mode, values, arch_name):
    """The custom backward: dL/dS = (dL/dW)[idx] of the merged model, and dL/dx flows on (LoRA, lower
    layers)."""
    model, cfg, wrapped, _, layers = prepared(values, arch_name)
    with torch.no_grad():
        for m in layers.values():
            m.values.normal_(0, 0.05)
    b = batches(1)[0]
    model(**b).loss.backward()
    merged = copy.deepcopy(model)
    REGISTRY[cfg.name].merge(merged, {n: merged.get_submodule(n) for n in wrapped})
    for n in layers:
        merged.get_submodule(n).weight.requires_grad_(True)
    merged(**b).loss.backward()
    for n, m in layers.items():
        dense = merged.get_submodule(n).weight.grad.flatten()[m.idx]
        torch.testing.assert_close(m.values.grad, dense, atol=1e-6, rtol=1e-4)
    if values["name"] == "rosa":
        assert all(layer.B.grad.abs().sum() > 0 for layer in wrapped.values())


# ---------------------------------------------------------------- memory
def test_gradients_and_adam_state_hold_only_the_kept_entries():
    """AdamW keeps exp_avg and exp_avg_sq (fp32) per trainable entry: 8 k bytes, not 8 numel(W)."""
    model, cfg, _, _, layers = prepared({"name": "sparse", "density": 0.05})
    opt = train_steps(model, steps=1)
    model(**batches(1)[0]).loss.backward()
    for m in layers.values():
        state = opt.state[m.values]
        assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == m.values.grad.numel() == m.k
        assert m.base.weight.grad is None and not m.base.weight.requires_grad
    adam_bytes = sum(
        t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step"
    )
    dense_bytes = 2 * 4 * sum(m.base.weight.numel() for m in layers.values())  # a dense mask's AdamW state
    assert count_method(cfg, arch_of(model)) == 816  # 8 x floor(51.2) + 4 x floor(102.4)
    assert adam_bytes == 2 * 4 * 816 == 6_528
    assert dense_bytes == 2 * 4 * 16_384 == 131_072


# ---------------------------------------------------------------- merge and resume
@pytest.mark.parametrize("arch_name", ["tiny-bert", "tiny-gpt2"])
@pytest.mark.parametrize("mode, values", MODES, ids=MODE_IDS)
def test_merge_equals_forward(mode, values, arch_name):
    model, cfg, wrapped, _, _ = prepared(values, arch_name)
    train_steps(model)
    b = batches(1)[0]
    expected = logits(model, b)
    REGISTRY[cfg.name].merge(model, wrapped)
    assert not any(isinstance(m, (SparseLinear, LoRALinear)) for m in model.modules())
    torch.testing.assert_close(logits(model, b), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode, values", [MODES[2], MODES[9]], ids=["sparse-global", "rosa-global"])
def test_hooks_state_rebuilds_the_same_parameters(mode, values):
    """A resumed run: apply, load the hooks' state (the indices), then the trainable values."""
    model, cfg, _, hooks, _ = prepared(values)
    train_steps(model)
    state = copy.deepcopy(hooks.state_dict())
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fresh = build()
    wrapped = REGISTRY[cfg.name].apply(fresh, cfg)
    fresh_hooks = REGISTRY[cfg.name].hooks(fresh, wrapped, cfg)
    shapes = {n: p.shape for n, p in fresh.named_parameters() if p.requires_grad}
    fresh_hooks.load_state_dict(state)
    assert {n: p.shape for n, p in fresh.named_parameters() if p.requires_grad} == {
        n: p.shape for n, p in trained.items()
    }
    assert shapes != {n: p.shape for n, p in trained.items()}, (
        "global scope should move entries between matrices"
    )
    fresh.load_state_dict(trained, strict=False)
    b = batches(1)[0]
    torch.testing.assert_close(logits(fresh, b), logits(model, b), atol=0, rtol=0)


@pytest.mark.parametrize(
    "method",
    [
        ["method=sparse", "method.budget=600", "method.scope=global", "method.calibration_steps=2"],
        ["method=rosa", "method.r=2", "method.density=0.02", "method.calibration_steps=2"],
    ],
    ids=["sparse", "rosa"],
)
def test_run_calibrates_counts_and_resumes(compose_run, method):
    """Through the training loop on real data: the record's count is the analytic one, and a
    run stopped at step 9 and resumed ends exactly where the uninterrupted one does."""
    full = train(compose_run(*method, "run_name=full"))
    assert full["status"] == "completed"
    run = compose_run(*method)
    cfg = method_config_from_dict(OmegaConf.to_container(run.method))
    arch = arch_of(build())
    assert full["trainable_params"] == count_method(cfg, arch) + arch.head_params * run.model.train_head
    first = train(compose_run(*method, "run_name=killed", "train.stop_after_step=9"))
    assert first["status"] == "interrupted"
    resumed = train(resume_config(first["run_dir"]))
    assert resumed["status"] == "completed" and resumed["final"] == full["final"]
    assert_same_end(full, resumed)


@pytest.mark.parametrize(
    "method",
    [
        ["method=sparse", "method.budget=600", "method.score=grad", "method.calibration_steps=2"],
        ["method=sparse", "method.budget=600", "method.scope=global", "method.calibration_steps=2"],
        ["method=rosa", "method.r=2", "method.density=0.02", "method.calibration_steps=2"],
    ],
    ids=["sparse-grad", "sparse-global", "rosa"],
)
def test_run_adapter_reloads_the_calibrated_mask(compose_run, method):
    """A run's ``adapter/`` carries the entries chosen from gradients (``hooks.pt``): loaded onto a
    fresh base it computes what the trained model computed (a re-pick by magnitude would not)."""
    from adabudget.export import load_adapter
    from adabudget.models import load_model

    run = compose_run(*method, "export_adapter=true", "model.dropout=0")
    result = train(run)
    adapter = Path(result["run_dir"]) / "adapter"
    assert (adapter / "hooks.pt").exists()
    model = load_model(run.model, 2, False)
    load_adapter(model, adapter)
    ckpt = torch.load(Path(result["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)
    for name, p in model.named_parameters():
        if name in ckpt["trainable"]:
            assert torch.equal(p.detach(), ckpt["trainable"][name]), name
    idx = {n: b for n, b in model.named_buffers() if n.endswith("idx") or "indices" in n}
    assert idx, "no index buffers found"
    for saved in ckpt["hooks"][0]["indices"].values():
        assert any(torch.equal(saved, b) for b in idx.values())


# ---------------------------------------------------------------- RoSA's warm-up schedule (wl{N})
def test_rosa_warmup_trains_lora_alone_then_masks_by_the_collected_fisher():
    """warmup_steps=2, calibration_steps=2: steps 0-3 train LoRA only (S's values stay zero),
    steps 2-3 sum (∇W0 L)² of their own backward passes, and after step 3 the mask is the top-k
    of that sum, computed here independently on a copy of the model at each of those steps;
    S trains from step 4 with fresh AdamW state."""
    values = {"name": "rosa", "r": 2, "density": 0.05, "warmup_steps": 2, "calibration_steps": 2}
    model, cfg, wrapped, hooks, layers = prepared(values, calibrate=False)
    hooks.calibrate(loss_of(model), batches)  # with a warm-up: nothing chosen before training
    assert cfg.sparse_from == 4 and not hooks.active
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    expected = {n: torch.zeros(m.base.weight.shape) for n, m in layers.items()}
    lora_before = {n: m.B.detach().clone() for n, m in wrapped.items()}
    model.eval()  # no dropout: the copies must see the forward the model sees
    for step, b in enumerate(batches(6)):
        if step in (2, 3):  # the score, by hand: (∇W0 L)² at this step's parameters
            twin = copy.deepcopy(model)
            twin_layers = {n: twin.get_submodule(n).base for n in layers}
            ws = [m.base.weight.requires_grad_(True) for m in twin_layers.values()]
            for n, g in zip(twin_layers, torch.autograd.grad(twin(**b).loss, ws)):
                expected[n] += g.square()
        hooks.before_step(step)
        model(**b).loss.backward()
        opt.step()
        hooks.after_step(step, opt)
        opt.zero_grad()
        if step < 4:
            assert all(torch.count_nonzero(m.values) == 0 for m in layers.values()), step
        if step == 3:  # the mask is chosen: the zero-gradient moments are dropped
            assert all(m.values not in opt.state for m in layers.values())
        assert all(not m.base.weight.requires_grad and m.base.weight.grad is None for m in layers.values())
    assert all(not torch.equal(m.B.detach(), lora_before[n]) for n, m in wrapped.items())  # LoRA trained
    for name, layer in layers.items():
        k = layer.k
        want = expected[name].flatten().topk(k).indices.sort().values
        assert torch.equal(layer.idx, want), name
        assert torch.count_nonzero(layer.values) > 0  # S trains from step 4
        assert opt.state[layer.values]["step"] == 2  # steps 4 and 5: its AdamW state started afresh
    assert hooks.active and hooks.scores is None


def test_rosa_warmup_with_magnitude_needs_no_collection():
    values = {"name": "rosa", "r": 2, "density": 0.05, "warmup_steps": 1, "score": "magnitude"}
    model, cfg, wrapped, hooks, layers = prepared(values)
    assert cfg.sparse_from == 1
    before = {n: m.idx.clone() for n, m in layers.items()}
    opt = train_steps(model, steps=1)
    hooks.after_step(0, opt)
    assert hooks.active and all(torch.equal(m.idx, before[n]) for n, m in layers.items())


def test_rosa_warmup_run_resumes_inside_the_collection_window(compose_run):
    """Stopped at step 4, inside the steps scoring the mask (3 and 4 of 3 + 2), and resumed: the
    partial score travels in the checkpoint, so the mask and every weight end as in one run."""
    method = [
        "method=rosa",
        "method.r=2",
        "method.density=0.02",
        "method.calibration_steps=2",
        "method.warmup_steps=3",
    ]
    full = train(compose_run(*method, "run_name=full"))
    assert full["status"] == "completed" and full["sparse_from_step"] == 5
    first = train(compose_run(*method, "run_name=killed", "train.stop_after_step=4"))
    assert first["status"] == "interrupted"
    mid = torch.load(Path(first["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)
    assert mid["hooks"][0]["active"] is False and mid["hooks"][0]["scores"]
    resumed = train(resume_config(first["run_dir"]))
    assert resumed["status"] == "completed" and resumed["final"] == full["final"]
    assert_same_end(full, resumed)


def test_rosa_warmup_longer_than_the_run_is_refused_before_any_compute(compose_run, tmp_path):
    run = compose_run("method=rosa", "method.warmup_steps=21", "method.calibration_steps=4")
    with pytest.raises(ConfigError, match=r"method\.warmup_steps=21.*24 steps"):
        train(run)
    assert not any((tmp_path / "runs").glob("*/checkpoints"))
    with pytest.raises(ConfigError, match=r"method\.warmup_steps"):
        method_config_from_dict({"name": "rosa", "warmup_steps": -1}).validate()


def test_rosa_restarts_on_the_mask_of_a_warmed_up_run(compose_run, tmp_path):
    """The reference README's recommended flow: one run warms LoRA up and ends right after its
    mask is chosen (T = warmup + calibration steps, S never trained); a second run with
    ``mask_from`` starts LoRA and S from scratch on exactly that mask."""
    warm = train(
        compose_run(
            "method=rosa",
            "method.r=2",
            "method.density=0.02",
            "method.warmup_steps=6",
            "method.calibration_steps=2",
            "train.max_steps=8",
            "run_name=warm",
        )
    )
    assert warm["status"] == "completed" and warm["sparse_from_step"] == 8
    ckpt = torch.load(Path(warm["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)
    mask = ckpt["hooks"][0]["indices"]
    assert ckpt["hooks"][0]["active"] and all(v.numel() > 0 for v in mask.values())
    assert all(torch.count_nonzero(v) == 0 for n, v in ckpt["trainable"].items() if n.endswith("values"))
    # a different mask than the cold start's, or the test proves nothing
    cold = train(
        compose_run(
            "method=rosa",
            "method.r=2",
            "method.density=0.02",
            "method.calibration_steps=2",
            "train.max_steps=1",
            "run_name=cold",
        )
    )
    cold_mask = torch.load(Path(cold["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)["hooks"][0][
        "indices"
    ]
    assert any(not torch.equal(mask[n], cold_mask[n]) for n in mask)

    again = train(
        compose_run(
            "method=rosa",
            "method.r=2",
            "method.density=0.02",
            f"method.mask_from={warm['run_dir']}",
            "run_name=again",
        )
    )
    assert again["status"] == "completed" and again["sparse_from_step"] == 0
    after = torch.load(Path(again["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)
    for name, idx in mask.items():
        assert torch.equal(after["hooks"][0]["indices"][name], idx), name


@pytest.mark.slow  # ~15 s: a warmed-up run, then three refused ones
@pytest.mark.parametrize(
    "extra, match",
    [
        (["method.warmup_steps=2"], "set one of them"),
        (["method.density=0.05"], "keeps"),
        (["method.layers=[0]"], "other matrices"),
    ],
    ids=["both", "other-density", "other-layers"],
)
def test_rosa_mask_from_a_mismatched_run_is_refused(compose_run, tmp_path, extra, match):
    warm = train(
        compose_run(
            "method=rosa",
            "method.r=2",
            "method.density=0.02",
            "method.warmup_steps=1",
            "method.calibration_steps=1",
            "train.max_steps=2",
            "run_name=warm",
        )
    )
    run = compose_run(
        "method=rosa",
        "method.r=2",
        "method.density=0.02",
        f"method.mask_from={warm['run_dir']}",
        *extra,
        "run_name=again",
    )
    with pytest.raises(ConfigError, match=match):
        train(run)
    assert not any((tmp_path / "runs" / "again").glob("*"))  # the claimed run folder is given back


def test_rosa_mask_from_a_folder_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"method\.mask_from=.*no checkpoints/last\.pt"):
        method_config_from_dict({"name": "rosa", "mask_from": str(tmp_path)}).validate()


def test_rosa_peft_export_is_refused_since_b_a_is_not_the_change(tmp_path):
    from adabudget.export import export_peft_adapter

    model, cfg, wrapped, hooks, layers = prepared({"name": "rosa", "r": 2, "density": 0.05})
    with pytest.raises(ValueError, match="a sparse part.*save_adapter"):
        export_peft_adapter(model, wrapped, tmp_path / "peft", base_model_name_or_path="tiny-bert")
    assert not (tmp_path / "peft").exists()
