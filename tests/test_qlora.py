"""QLoRA (Dettmers et al., 2023): ``model.quantize=nf4`` stores the frozen block linears as
4-bit NormalFloat (torchao's NF4Tensor) and every method trains on top in 32 bits.

Checks: the weights really are 4-bit (bytes, 16 levels per block of 64), the quantised model
stays close to the fp32 one, the methods that wrap or hook linears train on top with the same
trainable parameters, LoRA and AdaLoRA runs of ``adabudget.training.train`` lower the loss, and bad
values or a missing torchao fail early with the fix.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from adabudget.compose import resolve, resume_config
from adabudget.config import ConfigError
from adabudget.export import load_adapter, save_adapter
from adabudget.methods import REGISTRY, apply_method, check_quantized_base, lora, method_config_from_dict
from adabudget.modules import is_head, is_linear
from adabudget.quantize import dequantize_base, quantize_base, tensor_bytes
from adabudget.training import train
from safetensors.torch import load_file
from test_methods import ROWS, batch, build, logits, trainable

needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason='torchao missing: pip install -e ".[qlora]"'
)
ARCHS = ("tiny-bert", "tiny-gpt2", "tiny-llama")


def is_nf4(t: torch.Tensor) -> bool:
    return type(t).__name__ == "NF4Tensor"


def quantized(arch_name: str, seed: int = 0):
    """(fp32 model, the same weights quantised, names of the quantised modules)."""
    model = build(arch_name, seed)
    q = copy.deepcopy(model)
    return model, q, quantize_base(q, "nf4")


def block_linears(model) -> dict:
    return {
        n: m for n, m in model.named_modules() if n and is_linear(m) and not is_head(n) and ".pooler" not in n
    }


@needs_torchao
@pytest.mark.parametrize("arch_name", ARCHS)
def test_block_linears_hold_nf4_and_the_rest_stays_fp32(arch_name):
    model, q, done = quantized(arch_name)
    assert set(done) == set(block_linears(model)), "every linear of every block is quantised"
    for name in done:
        weight = q.get_submodule(name).weight
        assert is_nf4(weight) and not weight.requires_grad
        assert weight.shape == model.get_submodule(name).weight.shape  # linear_shape reads it
        assert weight.dtype == torch.float32  # the wrappers' dtype logic reads it
    others = [
        (n, p)
        for n, p in q.named_parameters()
        if not n.endswith(".weight") or n.rsplit(".", 1)[0] not in done
    ]
    assert others and not any(is_nf4(p) for _, p in others)  # embeddings, norms, biases, head
    # bytes of the base weights: 4-bit codes + one int8 absmax per 64 weights + one fp32 per
    # second-level block (16 or 32 blocks in these tiny matrices) + the 16-entry fp32 table
    bits = (
        8
        * sum(tensor_bytes(q.get_submodule(n).weight) for n in done)
        / sum(model.get_submodule(n).weight.numel() for n in done)
    )
    assert 4.2 < bits < 4.7, bits  # 0.13 - 0.15 of the fp32 bytes


@needs_torchao
def test_a_minilm_sized_matrix_takes_the_papers_4_127_bits():
    """QLoRA sec. 3: 4 + 8/64 + 32/(64 * 256) = 4.127 bits per weight with double quantisation."""
    linear = torch.nn.Linear(384, 1536)  # MiniLM's intermediate.dense
    model = torch.nn.Module()
    model.layer = torch.nn.ModuleList([torch.nn.Module()])
    model.layer[0].dense = linear
    fp32_bytes = tensor_bytes(linear.weight)
    quantize_base(model, "nf4")
    weight = model.layer[0].dense.weight
    ratio = tensor_bytes(weight) / fp32_bytes  # 0.129: 7.75x smaller
    # + the per-matrix 16-entry table and mean: 544 bits / 589,824 weights = 0.001 bits more
    assert ratio == pytest.approx((4 + 8 / 64 + 32 / (64 * 256)) / 32, rel=1e-3), 32 * ratio


@needs_torchao
def test_each_block_of_64_takes_16_levels_and_a_typical_nf4_error():
    model, q, done = quantized("tiny-llama")
    for name in done:
        w = model.get_submodule(name).weight.detach()
        w_hat = q.get_submodule(name).weight.get_original_weight()
        blocks = w_hat.reshape(-1, 64)
        assert max(len(torch.unique(b)) for b in blocks) <= 16  # 4 bits: 16 codes times one scale
        # Gaussian weights in blocks of 64: absmax ~ 2.4 sigma, 15 steps over +-absmax give an
        # RMS error ~ 0.32 sigma / sqrt(12) ~ 0.09 sigma (NF4's quantiles do a bit better)
        rel = ((w_hat - w).norm() / w.norm()).item()
        assert 0.05 < rel < 0.12, (name, rel)


@needs_torchao
@pytest.mark.parametrize("arch_name", ["tiny-bert", "tiny-gpt2"])
def test_gradients_flow_through_the_dequantised_weight(arch_name):
    """Forward and backward (which dequantises again) are those of y = x Ŵᵀ + b with the plain Ŵ."""
    _, q, done = quantized(arch_name)
    for name in done:
        layer = q.get_submodule(name)
        w_hat = layer.weight.get_original_weight()  # (out, in) for Linear, (in, out) for Conv1D
        w_hat = w_hat if isinstance(layer, torch.nn.Linear) else w_hat.t()
        x = torch.randn(3, 5, w_hat.shape[1], requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        g = torch.randn(3, 5, w_hat.shape[0])
        y, y_ref = layer(x), torch.nn.functional.linear(x_ref, w_hat, layer.bias.detach())
        torch.testing.assert_close(y, y_ref)
        (y * g).sum().backward()
        (y_ref * g).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
        assert layer.weight.grad is None  # W stays frozen


@needs_torchao
@pytest.mark.parametrize("arch_name", ARCHS)
def test_outputs_stay_close_to_the_fp32_model(arch_name):
    """Each quantised layer is off by its ~9 % weight error (the test above). A block adds at most one
    such error to the residual stream, and independent errors add in quadrature, so after i
    blocks the hidden state is off by at most ~0.1 sqrt(i) (measured: 0.002 BERT, 0.05 GPT-2,
    0.13 LLaMA after 4 blocks; its RMSNorm scales every error up with the state)."""
    model, q, done = quantized(arch_name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in done:
            fp32, nf4 = model.get_submodule(name), q.get_submodule(name)
            in_features = fp32.in_features if isinstance(fp32, torch.nn.Linear) else fp32.weight.shape[0]
            x = torch.randn(16, in_features, generator=g)
            y, y_hat = fp32(x), nf4(x)
            xw = y if fp32.bias is None else y - fp32.bias  # the error is in x W alone
            rel = ((y_hat - y).norm() / xw.norm()).item()
            assert 0.02 < rel < 0.15, (name, rel)
        b = {k: v for k, v in batch().items() if k != "labels"}
        hs = model(**b, output_hidden_states=True).hidden_states
        hs_hat = q(**b, output_hidden_states=True).hidden_states
    errors = [((y - x).norm() / x.norm()).item() for x, y in zip(hs, hs_hat)]
    assert errors[0] == 0  # the embeddings stay fp32
    for i, err in enumerate(errors[1:], start=1):
        assert 0 < err < 0.1 * i**0.5, errors


# the methods that wrap, hook or add to the quantised linears (and two that only add tokens)
ON_TOP = [
    "lora",
    "adalora",
    "ia3",
    "adapter",
    "parallel_adapter",
    "bitfit",
    "bitfit-add",
    "prefix",
    "prompt",
    "mam",
    "unipelt",
    "peft_lora",
]
FAMILY = {"tiny-bert": "bert", "tiny-gpt2": "gpt2", "tiny-llama": "llama"}
ON_TOP_CELLS = [
    (r, a) for r in ROWS if r[0] in ON_TOP for a in ARCHS if FAMILY[a] not in r[2].get("unsupported", {})
]


@needs_torchao
@pytest.mark.parametrize("row, arch_name", ON_TOP_CELLS, ids=[f"{a}-{r[0]}" for r, a in ON_TOP_CELLS])
def test_methods_train_on_top_of_the_nf4_base(row, arch_name, tmp_path):
    model, q, _ = quantized(arch_name)
    cfg = method_config_from_dict(row[1])
    apply_method(model, cfg)
    wrapped = apply_method(q, cfg)
    # quantisation changes no count: the frozen weights are stored differently, nothing else
    assert {n: p.numel() for n, p in trainable(q).items()} == {
        n: p.numel() for n, p in trainable(model).items()
    }
    assert sum(p.numel() for p in q.parameters()) == sum(p.numel() for p in model.parameters())
    if row[2].get("identity", True):  # an identity method starts as the quantised base
        torch.testing.assert_close(
            logits(q, batch()), logits(quantized(arch_name)[1], batch()), atol=1e-5, rtol=0
        )
    q.train()
    for m in q.modules():  # no dropout noise: the check is the optimisation itself
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    opt = torch.optim.AdamW(list(trainable(q).values()), lr=row[2].get("lr", 1e-2))
    losses = []
    for _ in range(6):
        loss = q(**batch()).loss
        losses.append(loss.item())
        loss.backward()
        assert all(p.grad is not None for p in trainable(q).values())
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0], losses
    still = [p for p in q.parameters() if is_nf4(p)]
    assert still and not any(p.requires_grad or p.grad is not None for p in still)
    if row[1]["name"] != "peft_lora":  # the adapter, loaded onto a freshly quantised base, computes the same
        q.eval()
        expected = logits(q, batch())
        save_adapter(q, cfg, wrapped, tmp_path / "adapter", arch_name)
        fresh = quantized(arch_name)[1]
        load_adapter(fresh, tmp_path / "adapter")
        torch.testing.assert_close(logits(fresh, batch()), expected, atol=1e-6, rtol=0)


@needs_torchao
@pytest.mark.parametrize("method", ["full", "freeze", "sparse", "rosa", "delta_lora"])
def test_methods_that_train_the_base_weights_are_refused(compose_run, method):
    with pytest.raises(ConfigError, match="model.quantize.*nf4 stores"):
        train(compose_run("model.quantize=nf4", f"method={method}"))
    if method not in ("full", "freeze"):
        return  # sparse / rosa / delta_lora write into W or read it densely: refused at validation only
    model, q, _ = quantized("tiny-bert")  # applied directly: the first forward refuses
    apply_method(q, method_config_from_dict({"name": method}))
    with pytest.raises(ConfigError, match="model.quantize=nf4: a method made a 4-bit base weight trainable"):
        q(**batch())


@needs_torchao
@pytest.mark.parametrize("arch_name", ["tiny-bert", "tiny-gpt2"])
def test_dequantize_then_merge_keeps_the_quantised_outputs(arch_name):
    _, q, done = quantized(arch_name)
    wrapped = apply_method(q, method_config_from_dict({"name": "lora", "r": 4}))
    with torch.no_grad():
        for layer in wrapped.values():
            layer.B.normal_(std=0.05)
    expected = logits(q, batch())
    assert sorted(dequantize_base(q)) == sorted(f"{n}.base" for n in done)
    lora.merge(q, wrapped)
    assert not any(is_nf4(p) for p in q.parameters())
    torch.testing.assert_close(logits(q, batch()), expected, atol=1e-5, rtol=0)


def train_losses(result: dict) -> list[float]:
    lines = Path(result["run_dir"], "metrics.jsonl").read_text().splitlines()
    return [m["loss"] for m in map(json.loads, lines) if m["split"] == "train"]


# 16 training sentences seen over and over: the loss must fall within 24 steps
OVERFIT = [
    "data.max_train_samples=16",
    "train.lr=2e-2",
    "train.log_every=2",
    "train.warmup_ratio=0",
    "model.dropout=0",
    "train.eval_every=0",
]
# the tiny knobs of each method (AdaLoRA's as in tests/conftest.py)
SMALL = {
    "lora": ["method.r=4"],
    "adalora": ["method.init_r=4", "method.target_r=2", "method.mask_interval=2"],
}


@needs_torchao
@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_lora_and_adalora_train_on_nf4(compose_run, method):
    full = train(compose_run(f"method={method}", *SMALL[method], *OVERFIT, "run_name=fp32"))
    nf4 = train(
        compose_run(f"method={method}", *SMALL[method], *OVERFIT, "run_name=nf4", "model.quantize=nf4")
    )
    assert nf4["status"] == "completed"
    assert nf4["trainable_params"] == full["trainable_params"] and nf4["total_params"] == full["total_params"]
    losses, fp32_losses = train_losses(nf4), train_losses(full)
    assert losses[-1] < losses[0] - 0.03, losses
    # the same run on 4-bit weights: close to the fp32 run's losses, but not the same numbers
    assert losses != fp32_losses
    assert max(abs(a - b) for a, b in zip(losses[:4], fp32_losses[:4])) < 0.01
    factors = load_file(str(Path(nf4["run_dir"], "adapter", "adapter_model.safetensors")))
    lora_b = [t for k, t in factors.items() if k.endswith("lora_B.weight")]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # the adapters moved off B = 0


@needs_torchao
def test_an_interrupted_nf4_run_resumes_to_the_same_result(compose_run):
    """The checkpoint holds the trainable state only; the resumed run quantises the same base again."""
    full = train(compose_run("model.quantize=nf4", "run_name=full"))
    first = train(compose_run("model.quantize=nf4", "run_name=killed", "train.stop_after_step=9"))
    assert first["status"] == "interrupted"
    resumed = train(resume_config(first["run_dir"]))
    assert resumed["status"] == "completed"
    assert resumed["final"] == full["final"] and resumed["ranks"] == full["ranks"]


def test_unknown_quantize_fails_before_anything_loads(compose_run, monkeypatch):
    import adabudget.session

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded before the config was checked")

    monkeypatch.setattr(adabudget.session, "load_tokenizer", must_not_load)
    with pytest.raises(ConfigError, match=r"model.quantize: unknown 'int3'; use null .* or nf4"):
        train(compose_run("model.quantize=int3", "method=lora"))


TRAINS_BASE = sorted(name for name, spec in REGISTRY.items() if spec.trains_base)


@pytest.mark.parametrize("method", TRAINS_BASE)
def test_a_method_that_trains_the_base_is_refused_on_nf4_before_anything_loads(
    compose_run, monkeypatch, method
):
    """The refusal reads the registry (``Method.trains_base``), not a list of names beside it."""
    import adabudget.session

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded before the config was checked")

    monkeypatch.setattr(adabudget.session, "load_tokenizer", must_not_load)
    assert {"full", "freeze", "sparse", "rosa", "delta_lora"} <= set(TRAINS_BASE)
    with pytest.raises(ConfigError, match=rf"model.quantize: method=.*{method}.* trains or updates the base"):
        train(compose_run("model.quantize=nf4", f"method={method}"))


def test_methods_on_top_of_the_base_pass_the_nf4_check(compose_run):
    for method in ("lora", "adalora", "dylora", "adapter"):
        run = resolve(compose_run("model.quantize=nf4", f"method={method}"))
        assert not REGISTRY[method].trains_base
        check_quantized_base(run)  # no refusal
        run.method = method_config_from_dict({"name": "full"})
        with pytest.raises(ConfigError, match=r"model.quantize: method=full trains or updates"):
            check_quantized_base(run)


@needs_torchao
def test_export_merged_is_the_dequantised_base_plus_the_adapter(compose_run):
    """QLoRA's merge: the 4-bit weights dequantised, ΔW added, saved as a plain fp32 checkpoint that
    computes what the adapter on the 4-bit base computes."""
    from adabudget.models import load_model
    from transformers import AutoModelForSequenceClassification

    run = compose_run("model.quantize=nf4", "method=lora", "export_merged=true", "model.dropout=0")
    result = train(run)
    merged = AutoModelForSequenceClassification.from_pretrained(Path(result["run_dir"]) / "merged").eval()
    assert not any(is_nf4(p) for p in merged.parameters()) and all(
        p.dtype == torch.float32 for p in merged.parameters()
    )
    from adabudget.session import seed_everything

    seed_everything(run.train.seed)  # the tiny backbone's random init, as train() draws it
    on_nf4 = load_model(run.model, 2, False)  # quantised again, as the run's base was
    assert any(is_nf4(m.weight) for m in on_nf4.modules() if hasattr(m, "weight"))
    apply_method(on_nf4, run.method)  # the trained LoRA from the run's last checkpoint
    state = torch.load(Path(result["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)["trainable"]
    missing, unexpected = on_nf4.load_state_dict(state, strict=False)
    assert not unexpected and set(state) <= {n for n, _ in on_nf4.named_parameters()}, unexpected
    ids = batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, on_nf4.eval()(input_ids=ids).logits, atol=1e-5, rtol=1e-4
        )


def test_missing_torchao_names_the_option_and_the_install(compose_run, monkeypatch):
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")] + ["torchao"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import torchao...` now raises ImportError
    with pytest.raises(ConfigError, match=r'model.quantize.*torchao.*pip install -e "\.\[qlora\]"'):
        train(compose_run("model.quantize=nf4", "method=lora"))  # validate(), before any loading
    with pytest.raises(ConfigError, match=r'model.quantize=nf4.*pip install -e "\.\[qlora\]"'):
        quantize_base(build("tiny-bert"), "nf4")  # and the import itself


@needs_torchao
@pytest.mark.gpu
def test_nf4_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _, q, _ = quantized("tiny-llama")
    apply_method(q, method_config_from_dict({"name": "lora", "r": 4}))
    expected = logits(q, batch())
    q.to("cuda")
    assert all(p.is_cuda for p in q.parameters()) and any(is_nf4(p) for p in q.parameters())
    b = {k: v.cuda() for k, v in batch().items()}
    torch.testing.assert_close(logits(q, b).cpu(), expected, atol=1e-4, rtol=1e-4)
    q(**b).loss.backward()
