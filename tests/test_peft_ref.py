"""The peft reference methods do what peft itself does: the same penalty as
``AdaLoraModel.forward`` adds, the same masks as ``AdaLoraModel.update_and_allocate``."""

from __future__ import annotations

import pytest
import torch
from adabudget.config import ModelConfig
from adabudget.methods import apply_method, method_config_from_dict
from adabudget.methods.peft_ref import PeftAllocator, orth_penalty
from adabudget.models import load_model
from adabudget.modules import freeze_backbone

pytest.importorskip("peft")

T = 30  # t_i = 3, t_f = 9: allocations at steps 4, 6, ..., 20 and the final one at 21


def adalora_model():
    torch.manual_seed(0)
    model = load_model(ModelConfig(name="tiny-bert"), 2, False)
    freeze_backbone(model, train_head=True)
    cfg = method_config_from_dict(
        {
            "name": "peft_adalora",
            "init_r": 4,
            "target_r": 2,
            "warmup_steps": 0.1,
            "final_steps": 0.3,
            "mask_interval": 2,
        }
    )
    apply_method(model, cfg)
    return model.eval(), cfg  # no dropout: two copies must see the same function


def batches(n: int):
    g = torch.Generator().manual_seed(3)
    for _ in range(n):
        yield {
            "input_ids": torch.randint(1000, 3000, (4, 9), generator=g),
            "labels": torch.randint(0, 2, (4,), generator=g),
        }


def test_orth_penalty_is_the_one_peft_adds_in_forward():
    model, cfg = adalora_model()
    with torch.no_grad():  # move P, Q off their init so the penalty is not trivial
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.3 * torch.randn_like(p))
    batch = next(batches(1))
    tuner = model.__dict__["_peft_tuner"]
    with torch.no_grad():
        plain = model(**batch).loss
        with_penalty = tuner(**batch).loss  # peft's forward adds γ R
    assert with_penalty - plain == pytest.approx(cfg.orth_reg_weight * orth_penalty(model).item(), rel=1e-5)
    assert orth_penalty(model).item() > 0.1


def test_peft_allocator_masks_as_peft_update_and_allocate():
    ours, cfg = adalora_model()
    theirs, _ = adalora_model()  # the same seed: the same model
    allocator = PeftAllocator(ours, cfg, T)
    tuner = theirs.__dict__["_peft_tuner"]
    peft_cfg = tuner.peft_config["default"]
    peft_cfg.tinit, peft_cfg.tfinal, peft_cfg.total_step = allocator.warmup_steps, allocator.final_steps, T
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (ours, theirs)]
    allocations = []
    for step, batch in enumerate(batches(T), start=1):
        for model, opt in zip((ours, theirs), opts):
            model(**batch).loss.backward()
            opt.step()
        allocation = allocator.update_and_allocate(step)
        tuner.update_and_allocate(step)
        if allocation is not None:
            allocations.append(allocation)
        for opt in opts:
            opt.zero_grad()
        lam = [p for n, p in ours.named_parameters() if "lora_E" in n]
        ref = [p for n, p in theirs.named_parameters() if "lora_E" in n]
        assert all(torch.equal(a, b) for a, b in zip(lam, ref)), f"λ differs at step {step}"
    assert len(allocations) == 10 and allocations[-1].final and allocator.fixed
    assert allocations[-1].kept == sum(allocator.ranks().values()) == 2 * 12  # b(T) = target_r x matrices
    assert allocations[0].budget == allocator.budget_at(4) and allocations[0].kept == allocations[0].budget
    # after the final allocation the pattern holds: masked λ stay zero
    kept = {n: sum(v) for n, v in peft_cfg.rank_pattern.items()}
    assert {k.rsplit(".lora_E", 1)[0]: v for k, v in kept.items()} == allocator.ranks()


def test_peft_adalora_trains_in_our_loop(compose_run):
    from adabudget.training import train

    result = train(
        compose_run(
            "method=peft_adalora",
            "method.init_r=4",
            "method.target_r=2",
            "method.mask_interval=2",
            "export_adapter=false",
        )
    )
    assert result["status"] == "completed"
    assert sum(result["ranks"].values()) == 24
    lines = (result["run_dir"] + "/ranks.jsonl").strip()
    assert open(lines).read().count("\n") >= 3


def test_our_lora_computes_what_peft_lora_computes():
    """The parity check's premise: on the same backbone and the same targets, our LoRA r=8 and
    peft's LoRA r=8 (method=peft_lora) hold the same trainable parameters and, given the same A and
    B, compute the same function (so the README's accuracy comparison differs only in the draws)."""
    models, layers = [], []
    for name in ("lora", "peft_lora"):
        torch.manual_seed(0)
        model = load_model(ModelConfig(name="tiny-bert"), 2, False)
        freeze_backbone(model, train_head=True)
        layers.append(apply_method(model, method_config_from_dict({"name": name, "r": 8, "alpha": 16})))
        models.append(model.eval())
    ours, theirs = layers
    assert len(ours) == len(theirs) > 0
    count = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in models]
    assert count[0] == count[1]
    batch = next(batches(1))
    with torch.no_grad():  # B = 0 in both: the backbone's function
        base = models[0](input_ids=batch["input_ids"]).logits
    g = torch.Generator().manual_seed(1)
    theirs_by_name = {n: m for n, m in models[1].named_modules() if hasattr(m, "lora_A")}
    matched = 0
    for name, layer in ours.items():
        peft_layer = next(m for n, m in theirs_by_name.items() if n.endswith(name))
        A, B = torch.randn(layer.A.shape, generator=g), torch.randn(layer.B.shape, generator=g)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
            peft_layer.lora_A["default"].weight.copy_(A)
            peft_layer.lora_B["default"].weight.copy_(B)
        matched += 1
    assert matched == len(theirs)
    with torch.no_grad():
        logits = [m(input_ids=batch["input_ids"]).logits for m in models]
    assert not torch.allclose(logits[0], base, atol=1e-3)  # the adapters are in the path
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
