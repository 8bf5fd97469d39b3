"""Exporting trained models: peft LoRA adapters, merged checkpoints, trainable-only state dicts.

Each backbone is trained a few AdaLoRA steps on random tokens (so λ, P, Q and the head are
non-trivial), allocated down to mixed ranks with one module forced to rank 0 and the
others to ranks 1 and >= 2, physically shrunk, then exported and reloaded with peft itself
(``PeftModel.from_pretrained``) on a copy of the backbone taken before the method was
applied. Every comparison also checks that the adapters and the head move the logits by
far more than the tolerance, so a dropped factor, scale or head would fail.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
from adabudget.allocator import RankAllocator
from adabudget.config import ModelConfig
from adabudget.export import (
    export_peft_adapter,
    load_trainable_state_dict,
    merge_into_base,
    save_merged,
    trainable_state_dict,
)
from adabudget.hub import packaged_path
from adabudget.methods import apply_method, method_config_from_dict
from adabudget.methods.adalora import SVDLinear
from adabudget.methods.lora import LoRALinear
from adabudget.models import load_model
from adabudget.modules import freeze_backbone
from safetensors.torch import load_file, save_file
from torch import nn

peft = pytest.importorskip("peft")

TINY = ["tiny-bert", "tiny-gpt2", "tiny-llama"]
ATOL = 1e-5
ADALORA = {
    "name": "adalora",
    "init_r": 4,
    "target_r": 2,
    "warmup_steps": 2,
    "final_steps": 2,
    "mask_interval": 1,
}
LORA = {"name": "lora", "r": 2, "alpha": 4.0}
STEPS = 6


@dataclass
class Trained:
    model: nn.Module  # eval mode, adapters in place
    layers: dict  # {module name: wrapper}
    base: nn.Module  # the backbone as loaded, before the method (same frozen weights)
    cfg: object
    ids: torch.Tensor  # eval batch


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def train(name: str, method: dict) -> Trained:
    torch.manual_seed(0)
    model = load_model(ModelConfig(name=name), 2, False)
    base = copy.deepcopy(model)
    freeze_backbone(model, train_head=True)
    cfg = method_config_from_dict({**method, "min_rank": 0} if method["name"] == "adalora" else method)
    layers = apply_method(model, cfg)
    alloc = RankAllocator(layers, cfg, STEPS) if cfg.name == "adalora" else None
    # A large step size: after 6 steps ΔW must move the logits far beyond ATOL.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, STEPS + 1):
        ids = torch.randint(1, 1000, (4, 8), generator=gen)  # no pad (0): GPT-2 / LLaMA pool the last token
        loss = model(input_ids=ids, labels=torch.randint(0, 2, (4,), generator=gen)).loss
        loss.backward()
        opt.step()
        if alloc is not None:
            allocation = alloc.update_and_allocate(step)
            if allocation is not None and allocation.shrink:
                alloc.shrink_(opt)
        opt.zero_grad()
    if alloc is not None:
        assert alloc.fixed and sum(alloc.ranks().values()) == round(cfg.target_r * len(layers))
        # Mixed ranks for sure: one module at 0, one at 1, and (sum of ranks = 2 x #modules,
        # each <= 4) the largest of the rest at >= 2.
        ranks = alloc.ranks()
        names = list(ranks)
        ranks[names[0]] = 0
        top = max(names[1:], key=ranks.get)
        ranks[next(n for n in names[1:] if n != top and ranks[n] > 0)] = 1
        alloc.shrink_to(ranks)
        assert {0, 1} <= set(ranks.values()) and max(ranks.values()) >= 2
    model.eval()
    return Trained(model, layers, base, cfg, torch.randint(1, 1000, (3, 10), generator=gen))


_CACHE: dict = {}


def trained(name: str, method: dict) -> Trained:
    """One training run per (model, method), shared by the tests that only read it."""
    key = (name, method["name"])
    if key not in _CACHE:
        _CACHE[key] = train(name, method)
    return _CACHE[key]


def assert_adapters_matter(run: Trained) -> None:
    """The trained adapters and head change the logits far beyond ATOL (no vacuous pass)."""
    ref = logits(run.model, run.ids)
    assert not torch.allclose(logits(run.base, run.ids), ref, atol=100 * ATOL)
    no_delta = copy.deepcopy(run.model)
    for module in no_delta.modules():
        if isinstance(module, SVDLinear):
            module.lam.data.zero_()
        elif isinstance(module, LoRALinear):
            module.B.data.zero_()
    assert not torch.allclose(logits(no_delta, run.ids), ref, atol=100 * ATOL)


def check_peft_roundtrip(run: Trained, tmp_path, name: str) -> dict:
    summary = export_peft_adapter(run.model, run.layers, tmp_path, base_model_name_or_path=name)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(run.base), tmp_path)
    torch.testing.assert_close(logits(peft_model, run.ids), logits(run.model, run.ids), atol=ATOL, rtol=0)
    assert_adapters_matter(run)
    # peft built exactly our modules at our ranks, and nothing else.
    built = {
        n: m.r["default"] for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")
    }
    assert built == summary["modules"] == {n: lay.rank for n, lay in run.layers.items() if lay.rank > 0}
    return summary


@pytest.mark.parametrize("name", TINY)
def test_adalora_exports_to_peft_lora(name, tmp_path):
    run = trained(name, ADALORA)
    summary = check_peft_roundtrip(run, tmp_path, name)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    pruned = [n for n, lay in run.layers.items() if lay.rank == 0]
    assert pruned and summary["pruned"] == sorted(pruned)
    assert not set(pruned) & set(config["target_modules"])
    assert (
        config["peft_type"] == "LORA"
        and config["rank_pattern"]
        and config["rank_pattern"] == config["alpha_pattern"]
    )
    assert config["fan_in_fan_out"] == (name == "tiny-gpt2")  # GPT-2's Conv1D stores W as (in, out)
    head = "score" if name in ("tiny-gpt2", "tiny-llama") else "classifier"
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert f"base_model.model.{head}.weight" in keys
    expected = sum(
        r * (run.layers[n].in_features + run.layers[n].out_features) for n, r in summary["modules"].items()
    )
    assert summary["adapter_params"] == expected


@pytest.mark.parametrize("name", TINY)
def test_lora_exports_to_peft_lora(name, tmp_path):
    run = trained(name, LORA)
    summary = check_peft_roundtrip(run, tmp_path, name)
    assert set(summary["modules"].values()) == {2} and summary["pruned"] == []


def test_masked_triplets_are_left_out(tmp_path):
    """With ``shrink: never`` pruned triplets stay in place with λ = 0: exported at the effective rank."""
    run = trained("tiny-bert", ADALORA)
    model, layers = copy.deepcopy((run.model, run.layers))
    ranks = {n: lay.rank for n, lay in layers.items()}
    top = max(ranks, key=ranks.get)
    gone = next(n for n, r in ranks.items() if r > 0 and n != top)
    with torch.no_grad():
        layers[top].lam[0] = 0
        layers[gone].lam.zero_()
    summary = export_peft_adapter(model, layers, tmp_path, "tiny-bert")
    assert summary["modules"][top] == ranks[top] - 1 and gone in summary["pruned"]
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(run.base), tmp_path)
    torch.testing.assert_close(logits(peft_model, run.ids), logits(model, run.ids), atol=ATOL, rtol=0)


def test_minilm_exports_and_saves_merged(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = trained("minilm", ADALORA)
    check_peft_roundtrip(run, tmp_path / "adapter", "minilm")
    tokenizer = AutoTokenizer.from_pretrained(packaged_path("minilm"))
    save_merged(run.model, run.layers, tmp_path / "merged", tokenizer=tokenizer)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded, run.ids), logits(run.model, run.ids), atol=ATOL, rtol=0)
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "merged")("a film")["input_ids"]
        == tokenizer("a film")["input_ids"]
    )


@pytest.mark.parametrize("method", [ADALORA, LORA], ids=["adalora", "lora"])
@pytest.mark.parametrize("name", TINY)
def test_merge_into_base_keeps_logits(name, method):
    run = trained(name, method)
    assert_adapters_matter(run)
    before = logits(run.model, run.ids)
    model, layers = copy.deepcopy((run.model, run.layers))
    assert merge_into_base(model, layers) is model
    assert not any(isinstance(m, (SVDLinear, LoRALinear)) for m in model.modules())
    torch.testing.assert_close(logits(model, run.ids), before, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="already merged"):
        merge_into_base(model, layers)


@pytest.mark.parametrize("name", TINY)
def test_save_merged_roundtrip_leaves_model_untouched(name, tmp_path):
    from transformers import AutoModelForSequenceClassification

    run = trained(name, ADALORA)
    before = logits(run.model, run.ids)
    save_merged(run.model, run.layers, tmp_path)
    assert all(run.model.get_submodule(n) is lay for n, lay in run.layers.items())
    torch.testing.assert_close(logits(run.model, run.ids), before, atol=0, rtol=0)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded, run.ids), before, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_trainable_state_dict_roundtrip(name, tmp_path):
    run = trained(name, ADALORA)
    state = trainable_state_dict(run.model)
    head = {k for k in state if k.split(".")[0] in ("classifier", "score")}
    # a module pruned to rank 0 has empty factors, which take no gradient: not trainable state
    pruned = {n for n, lay in run.layers.items() if lay.rank == 0}
    assert pruned, "the fixture prunes one module to rank 0"
    expected = {f"{n}.{f}" for n in run.layers if n not in pruned for f in ("P", "lam", "Q")}
    assert head and set(state) - head == expected
    save_file(state, str(tmp_path / "trainable.safetensors"))
    state = load_file(str(tmp_path / "trainable.safetensors"))

    fresh = copy.deepcopy(run.base)
    freeze_backbone(fresh, train_head=True)
    layers = apply_method(fresh, run.cfg)
    with pytest.raises(ValueError, match="shrink_to"):
        load_trainable_state_dict(fresh, state)  # still at init_r
    RankAllocator(layers, run.cfg, STEPS).shrink_to({n: lay.rank for n, lay in run.layers.items()})
    assert not torch.allclose(logits(fresh, run.ids), logits(run.model, run.ids), atol=100 * ATOL)
    load_trainable_state_dict(fresh, state)
    torch.testing.assert_close(logits(fresh, run.ids), logits(run.model, run.ids), atol=ATOL, rtol=0)


def test_export_refuses_what_peft_cannot_load(tmp_path):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(4, 4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = Block()
            self.dec = nn.Module()
            self.dec.enc = Block()  # "dec.enc.q" ends in ".enc.q": peft would adapt it too

    net = Net().requires_grad_(False)
    layer = SVDLinear(net.enc.q, r=2, scaling=1.0)
    net.enc.q = layer
    layer.lam.data.fill_(1.0)  # λ = 0 at init would leave nothing to export
    with pytest.raises(ValueError, match=r"peft would adapt \['dec\.enc\.q'\]"):
        export_peft_adapter(net, {"enc.q": layer}, tmp_path, "net")
    layer.shrink_(torch.arange(0))
    with pytest.raises(ValueError, match="rank 0"):
        export_peft_adapter(net, {"enc.q": layer}, tmp_path, "net")
    with pytest.raises(ValueError, match="save_merged"):
        export_peft_adapter(net, {"": net}, tmp_path, "net")  # full fine-tuning
