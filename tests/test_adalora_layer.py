"""The AdaLoRA layer (``adabudget.methods.adalora``): SVDLinear around nn.Linear and GPT-2's
Conv1D, its init (λ = 0, orthonormal P and Q), ΔW = s P diag(λ) Q against the forward,
which parameters train once ``apply_method`` has wrapped a tiny real model, the orthogonal
penalty (eq. 4 squared, and peft's unsquared form) against a hand computation and against
peft itself, and a bf16 base layer with fp32 factors (peft#1309).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from adabudget.config import ModelConfig
from adabudget.methods import apply_method, method_config_from_dict
from adabudget.methods.adalora import AdaLoRAConfig, SVDLinear, orth_penalty, scaling_of
from adabudget.models import load_model
from adabudget.modules import freeze_backbone, is_head
from torch import nn
from transformers.pytorch_utils import Conv1D

D_IN, D_OUT, R = 16, 24, 4
MODELS = {"tiny-bert": 12, "tiny-gpt2": 8, "tiny-llama": 14}  # name: adapted matrices (defaults)


def make_base(kind: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(D_IN, D_OUT).to(dtype)
    base = Conv1D(D_OUT, D_IN).to(dtype)  # Conv1D(nf=out, nx=in), weight stored (in, out)
    nn.init.normal_(base.weight, std=0.2)
    nn.init.normal_(base.bias, std=0.2)
    return base


def dense_weight(base: nn.Module) -> torch.Tensor:
    """W0 in nn.Linear layout (out, in)."""
    return base.weight.T if isinstance(base, Conv1D) else base.weight


def batch(model_name: str, n: int = 3, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(1)
    # Token 0 is the pad id of the tiny configs; avoid it so GPT-2 / LLaMA pool the last token.
    ids = torch.randint(1, 1000, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1][:n])}


def is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("P", "lam", "Q")


# ---------------------------------------------------------------- the layer alone
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_init_equals_base_exactly(kind):
    base = make_base(kind)
    layer = SVDLinear(base, R, scaling=2.0)
    assert layer.fan_in_fan_out == (kind == "conv1d")
    assert (layer.in_features, layer.out_features) == (D_IN, D_OUT)
    assert layer.P.shape == (D_OUT, R) and layer.lam.shape == (R,) and layer.Q.shape == (R, D_IN)
    assert torch.equal(layer.lam, torch.zeros(R))  # peft#1836: Λ must start at zero
    x = torch.randn(2, 5, D_IN)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.delta_weight()) == 0


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_factors_orthonormal_at_init(kind):
    layer = SVDLinear(make_base(kind), R, scaling=2.0)
    eye = torch.eye(R)
    torch.testing.assert_close(layer.P.T @ layer.P, eye, atol=1e-5, rtol=0)  # columns of P
    torch.testing.assert_close(layer.Q @ layer.Q.T, eye, atol=1e-5, rtol=0)  # rows of Q
    assert orth_penalty([layer], squared=True).item() < 1e-10
    assert orth_penalty([layer], squared=False).item() < 1e-5
    # The unsquared norm is not differentiable at 0 through sqrt; the penalty must still give
    # finite gradients at init, or the first step would write NaN into P and Q.
    orth_penalty([layer], squared=False).backward()
    assert torch.isfinite(layer.P.grad).all() and torch.isfinite(layer.Q.grad).all()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_delta_weight_matches_forward(kind):
    base = make_base(kind)
    layer = SVDLinear(base, R, scaling=1.5)
    with torch.no_grad():
        layer.lam.copy_(torch.tensor([0.7, -1.2, 0.3, 2.0]))
        layer.P.add_(0.1 * torch.randn_like(layer.P))  # off the orthonormal manifold too
    x = torch.randn(4, 3, D_IN)
    delta = layer.delta_weight()  # (out, in)
    assert delta.shape == (D_OUT, D_IN)
    # ΔW = s P diag(λ) Q, entry by entry.
    expected = 1.5 * sum(layer.lam[i] * torch.outer(layer.P[:, i], layer.Q[i]) for i in range(R))
    torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - base(x), x @ delta.T, atol=1e-5, rtol=1e-5)
        merged = F.linear(x, dense_weight(base) + delta, base.bias)
        torch.testing.assert_close(layer(x), merged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("knobs", "expected"),
    [
        (dict(init_r=12), 2.0),  # alpha defaults to 2 init_r
        (dict(init_r=4, alpha=16.0), 4.0),  # alpha / r
        (dict(init_r=4, alpha=16.0, rslora=True), 8.0),  # alpha / sqrt(r)
    ],
)
def test_scaling(knobs, expected):
    assert scaling_of(AdaLoRAConfig(**knobs)) == expected


# ---------------------------------------------------------------- on tiny real models
@pytest.mark.parametrize("model_name", list(MODELS))
def test_only_adapters_and_head_train(model_name):
    torch.manual_seed(0)
    model = load_model(ModelConfig(name=model_name), 2, False)
    freeze_backbone(model, train_head=True)
    cfg = method_config_from_dict({"name": "adalora", "init_r": 4, "target_r": 2})
    layers = apply_method(model, cfg)
    assert len(layers) == MODELS[model_name]
    for name, layer in layers.items():
        assert model.get_submodule(name) is layer
        assert not any(p.requires_grad for p in layer.base.parameters())

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(**batch(model_name))
    loss = out.loss + cfg.orth_reg_weight * orth_penalty(list(layers.values()), cfg.orth_squared)
    loss.backward()
    trainable = set()
    for name, p in model.named_parameters():
        expected = is_adapter(name) or is_head(name)
        assert p.requires_grad == expected, name
        assert (p.grad is not None) == expected, name
        if expected:
            trainable.add(name)
    assert sum(is_adapter(n) for n in trainable) == 3 * len(layers)
    assert any(is_head(n) for n in trainable)

    # An optimizer over *every* parameter must still leave the frozen backbone untouched.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        if name in trainable and name.endswith((".lam", ".weight")):
            assert changed, f"{name} did not move"
        if name not in trainable:
            assert not changed, f"frozen {name} moved"


def test_apply_freezes_the_wrapped_layers_itself():
    """Without freeze_backbone, the rest of the model trains, but never a wrapped W0 (peft does the same).

    The wrapped layer's bias is left to the backbone's freezing, so BitFit or layer freezing
    applied before AdaLoRA in a hybrid group keeps training it."""
    model = load_model(ModelConfig(name="tiny-bert"), 2, False)
    layers = apply_method(model, method_config_from_dict({"name": "adalora", "init_r": 4, "target_r": 2}))
    for layer in layers.values():
        assert not layer.base.weight.requires_grad
        assert all(p.requires_grad for p in (layer.P, layer.lam, layer.Q))
    assert model.bert.embeddings.word_embeddings.weight.requires_grad


@pytest.mark.parametrize("model_name", list(MODELS))
def test_wrapped_model_equals_base_at_step0(model_name):
    torch.manual_seed(0)
    base = load_model(ModelConfig(name=model_name), 2, False).eval()
    model = copy.deepcopy(base)
    apply_method(model, method_config_from_dict({"name": "adalora", "init_r": 4, "target_r": 2}))
    inputs = {k: v for k, v in batch(model_name).items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base(**inputs).logits)


# ---------------------------------------------------------------- orthogonal penalty
def perturbed_layers() -> list[SVDLinear]:
    """Layers of two shapes (so the penalty batches two groups), plus one pruned to rank 0."""
    torch.manual_seed(3)
    layers = [SVDLinear(nn.Linear(d_in, d_out), R, 2.0) for d_in, d_out in ((16, 24), (16, 24), (10, 6))]
    with torch.no_grad():
        for layer in layers:
            layer.P.add_(0.3 * torch.randn_like(layer.P))
            layer.Q.add_(0.3 * torch.randn_like(layer.Q))
    empty = SVDLinear(nn.Linear(8, 8), R, 2.0)
    empty.shrink_(torch.empty(0, dtype=torch.long))
    assert empty.rank == 0
    return layers + [empty]


def test_orth_penalty_squared_eq4():
    layers = perturbed_layers()
    # eq. 4 per matrix, ||PᵀP - I||²_F + ||QQᵀ - I||²_F, averaged over the 4 adapted matrices
    # (the rank-0 one contributes 0 but still counts).
    total = 0.0
    for layer in layers[:3]:
        p, q = layer.P.detach().double(), layer.Q.detach().double()
        gp, gq = p.T @ p, q @ q.T
        for gram in (gp, gq):
            total += sum((float(gram[i, j]) - float(i == j)) ** 2 for i in range(R) for j in range(R))
    expected = float(total) / 4
    assert orth_penalty(layers, squared=True).item() == pytest.approx(expected, rel=1e-5)


def test_orth_penalty_unsquared_is_peft_form():
    """peft (and QingruZhang/AdaLoRA's compute_orth_regu) sum ||·||_F over every lora_A and
    lora_B matrix and divide by the number of those matrices: 2 per adapted layer."""
    layers = perturbed_layers()
    norms = []
    for layer in layers:
        for gram in (layer.P.T @ layer.P, layer.Q @ layer.Q.T):
            diff = gram.detach().double() - torch.eye(layer.rank, dtype=torch.float64)
            norms.append(float(diff.pow(2).sum().sqrt()))
    assert len(norms) == 8
    expected = sum(norms) / len(norms)
    assert orth_penalty(layers, squared=False).item() == pytest.approx(expected, rel=1e-5)


def test_orth_penalty_unsquared_matches_live_peft():
    peft = pytest.importorskip("peft")

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 24), nn.Linear(24, 16), nn.Linear(16, 6)

        def forward(self, x):
            return SimpleNamespace(loss=self.c(self.b(self.a(x))).pow(2).mean())

    torch.manual_seed(0)
    toy = Toy()
    ours = copy.deepcopy(toy)
    cfg = peft.AdaLoraConfig(
        init_r=R,
        target_r=2,
        tinit=1,
        tfinal=1,
        total_step=10,
        orth_reg_weight=0.5,
        target_modules=["a", "b", "c"],
    )
    peft_model = peft.get_peft_model(toy, cfg)
    method = {"name": "adalora", "init_r": R, "target_r": 2, "target_modules": ["a", "b", "c"]}
    layers = apply_method(ours, method_config_from_dict(method))
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, layer in layers.items():
            layer.P.add_(0.3 * torch.randn_like(layer.P))
            layer.Q.add_(0.3 * torch.randn_like(layer.Q))
            theirs = inner.get_submodule(name)
            theirs.lora_B["default"].copy_(layer.P)
            theirs.lora_A["default"].copy_(layer.Q)
    x = torch.randn(5, 16)
    with torch.no_grad():
        task = inner(x).loss  # the wrapped model alone: no penalty added
        # AdaLoraModel.forward adds 0.5 * penalty to the loss (a bare PeftModel's forward skips it).
        peft_penalty = (peft_model.base_model(x).loss - task) / 0.5
    assert peft_penalty.item() > 0.1  # the factors really are off the manifold
    ours_penalty = orth_penalty(list(layers.values()), squared=False)
    assert ours_penalty.item() == pytest.approx(peft_penalty.item(), rel=1e-4)


# ---------------------------------------------------------------- dtypes
def test_bf16_base_with_fp32_factors():
    base = make_base("linear", torch.bfloat16)
    layer = SVDLinear(base, R, scaling=2.0)
    assert layer.P.dtype == layer.lam.dtype == layer.Q.dtype == torch.float32
    with torch.no_grad():
        layer.lam.copy_(torch.tensor([0.5, -0.25, 1.0, 0.75]))
    x = torch.randn(3, D_IN).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = base(x).float() + x.float() @ layer.delta_weight().T
    torch.testing.assert_close(out.float(), expected.detach(), atol=0.05, rtol=0.02)
    out.float().sum().backward()
    assert layer.lam.grad.dtype == torch.float32 and torch.isfinite(layer.lam.grad).all()


def test_bf16_model_trains():
    torch.manual_seed(0)
    model = load_model(ModelConfig(name="tiny-bert"), 2, False).to(torch.bfloat16)
    freeze_backbone(model, train_head=True)
    layers = apply_method(model, method_config_from_dict({"name": "adalora", "init_r": 4, "target_r": 2}))
    out = model(**batch("tiny-bert"))
    assert out.logits.dtype == torch.bfloat16
    (out.loss + 0.5 * orth_penalty(list(layers.values()))).backward()
    for layer in layers.values():
        assert layer.lam.grad is not None and layer.lam.grad.dtype == torch.float32
