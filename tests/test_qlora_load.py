"""``model.quantize=nf4`` at load: the block linears are quantised while the checkpoint is read
(``adabudget.models.load_quantized``), so the full-precision model is never in memory, and the
model is the one load-then-quantise gives, bit for bit (NF4 codes, scales, every other tensor,
the task head's random draws, the logits). Gradient checkpointing works on it with every method.

The checkpoints are tiny random models saved to a temp folder (safetensors, sharded, and a
``pytorch_model.bin`` that falls back to load-then-quantise); the packaged SmolLM2 GGUF and the
memory measurement are ``slow``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import adabudget.models
import pytest
import torch
from adabudget.compose import compose
from adabudget.config import ConfigError, ModelConfig
from adabudget.methods import REGISTRY, apply_method, method_config_from_dict, methods_in
from adabudget.models import load_model, tiny_config
from adabudget.quantize import is_quantized, quantize_base
from adabudget.training import train
from test_causal_lm import lm_run
from test_methods import ARCHS, ROWS, batch, build
from test_qlora import train_losses

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason='torchao missing: pip install -e ".[qlora]"'
)


def save_tiny(folder, arch: str, safe: bool = True, shard: str | None = None) -> str:
    """A random tiny checkpoint as a hub model ships it: BERT's encoder alone (as MiniLM), the
    decoders with their LM head (tied to the embeddings, so not stored)."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(123)
    auto = AutoModel if arch == "tiny-bert" else AutoModelForCausalLM
    model = auto.from_config(tiny_config(arch, 2, False))
    if not safe:  # transformers 5 writes safetensors only; it still reads a torch pickle
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        return str(folder)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return str(folder)


def load(folder: str, causal_lm: bool, seed: int = 7, **model) -> torch.nn.Module:
    torch.manual_seed(seed)  # the classification head's draws
    return load_model(ModelConfig(name=folder, **model), 2, False, 0, causal_lm)


def load_then_quantize(folder: str, causal_lm: bool, **model) -> torch.nn.Module:
    """What ``model.quantize=nf4`` did before: the whole model loaded, then ``quantize_base``."""
    reference = load(folder, causal_lm, **model)
    quantize_base(reference, "nf4")
    return reference


def nf4_parts(weight) -> dict:
    inner, _ = weight.__tensor_flatten__()  # codes, int8 scales, their factors and mean, the table
    return {name: getattr(weight, name) for name in inner}


def assert_same_model(got: torch.nn.Module, expected: torch.nn.Module) -> int:
    """Every module, parameter and buffer the same, NF4 weights code for code; returns the number
    of NF4 weights."""
    assert [(n, type(m)) for n, m in got.named_modules()] == [
        (n, type(m)) for n, m in expected.named_modules()
    ]
    params, ref = dict(got.named_parameters()), dict(expected.named_parameters())
    assert params.keys() == ref.keys()
    n_nf4 = 0
    for name, p in params.items():
        assert (p.dtype, p.shape, p.requires_grad) == (
            ref[name].dtype,
            ref[name].shape,
            ref[name].requires_grad,
        )
        if hasattr(p, "get_original_weight"):
            n_nf4 += 1
            a, b = nf4_parts(p), nf4_parts(ref[name])
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        else:
            assert torch.equal(p, ref[name]), name
    buffers, ref_buffers = dict(got.named_buffers()), dict(expected.named_buffers())
    assert buffers.keys() == ref_buffers.keys()
    assert all(torch.equal(buffers[k], ref_buffers[k]) for k in buffers)
    assert got.training == expected.training
    return n_nf4


def assert_same_logits(got, expected) -> None:
    ids = batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, expected(input_ids=ids).logits)


def no_whole_load(monkeypatch) -> None:
    """The load-time path must not go through from_pretrained (which builds the whole model)."""

    def whole(*args, **kwargs):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(adabudget.models, "_from_pretrained", whole)


CASES = [
    ("tiny-bert", False),
    ("tiny-gpt2", False),
    ("tiny-gpt2", True),
    ("tiny-llama", False),
    ("tiny-llama", True),
]


@pytest.mark.parametrize("arch, causal_lm", CASES, ids=[f"{a}-{'lm' if c else 'cls'}" for a, c in CASES])
def test_nf4_at_load_is_load_then_quantize_bit_for_bit(tmp_path, monkeypatch, arch, causal_lm):
    folder = save_tiny(tmp_path / "ckpt", arch)
    expected = load_then_quantize(folder, causal_lm)
    no_whole_load(monkeypatch)
    got = load(folder, causal_lm, quantize="nf4")
    assert assert_same_model(got, expected) == 2 * (
        6 if arch == "tiny-bert" else 4 if arch == "tiny-gpt2" else 7
    )
    assert_same_logits(got, expected)
    if not causal_lm:  # the new head is drawn, and drawn as from_pretrained draws it
        head = got.classifier if arch == "tiny-bert" else got.score
        assert head.weight.abs().max() > 0
        other_seed = load(folder, causal_lm, seed=8, quantize="nf4")
        head_8 = other_seed.classifier if arch == "tiny-bert" else other_seed.score
        assert not torch.equal(head.weight, head_8.weight)
    else:  # GPT-2's LM head is the loaded embedding matrix (tied, not stored), as from_pretrained ties it
        tied = got.get_output_embeddings().weight is got.get_input_embeddings().weight
        assert tied == (arch == "tiny-gpt2") == got.config.tie_word_embeddings


def test_nf4_at_load_in_bf16_and_from_shards(tmp_path, monkeypatch):
    folder = save_tiny(tmp_path / "ckpt", "tiny-llama", shard="40KB")
    assert json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(list((tmp_path / "ckpt").glob("model-*.safetensors"))) > 2
    expected = load_then_quantize(folder, True, dtype="bf16")
    no_whole_load(monkeypatch)
    got = load(folder, True, quantize="nf4", dtype="bf16")
    assert assert_same_model(got, expected) == 14
    assert got.model.embed_tokens.weight.dtype == torch.bfloat16
    assert got.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # NF4 of the bf16 weight
    assert_same_logits(got, expected)


def test_the_safetensors_reader_gives_safe_open_s_tensors_without_mapping_the_file(tmp_path):
    """``_read_tensor`` (plain reads, so no page of the file stays resident) returns what
    safetensors' own loader returns, for every dtype it knows, empty and 0-d tensors included;
    a file cut short or a dtype it does not know is an error naming the tensor."""
    from adabudget.models import SAFETENSORS_DTYPES, _read_tensor, safetensors_header
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        f"t.{dtype}".replace("torch.", ""): (torch.randn(3, 5, generator=g) * 50).to(dtype)
        for dtype in SAFETENSORS_DTYPES.values()
    }
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    path = str(tmp_path / "all.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    expected = load_file(path)
    entries, start = safetensors_header(path)
    assert set(entries) == set(tensors)
    with open(path, "rb", buffering=0) as f:
        got = {name: _read_tensor(f, entries[name], start, path, name) for name in entries}
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), (
            name
        )

    Path(path).write_bytes(Path(path).read_bytes()[:-4])  # the last tensor's bytes cut short
    last = max(entries, key=lambda n: entries[n]["data_offsets"][1])
    with open(path, "rb", buffering=0) as f, pytest.raises(ValueError, match=f"ends inside tensor {last}"):
        _read_tensor(f, entries[last], start, path, last)
    with open(path, "rb", buffering=0) as f, pytest.raises(ValueError, match="dtype C64"):
        _read_tensor(f, {**entries["scalar"], "dtype": "C64"}, start, path, "scalar")


def test_a_bin_checkpoint_is_loaded_whole_then_quantised_with_a_warning(tmp_path, caplog):
    folder = save_tiny(tmp_path / "ckpt", "tiny-gpt2", safe=False)
    assert (tmp_path / "ckpt" / "pytorch_model.bin").exists()
    expected = load_then_quantize(folder, False)
    with caplog.at_level(logging.WARNING, logger="adabudget.models"):
        got = load(folder, False, quantize="nf4")
    assert "loaded whole, then quantised (its checkpoint is not safetensors)" in caplog.text
    assert_same_model(got, expected)


def test_a_checkpoint_lacking_a_weight_is_loaded_whole_too(tmp_path, caplog):
    """Names this loader cannot map (here: a block weight missing) leave it to from_pretrained,
    which reports the missing weight; the model is the same as load-then-quantise's."""
    from safetensors.torch import load_file, save_file

    folder = save_tiny(tmp_path / "ckpt", "tiny-llama")
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    expected = load_then_quantize(folder, True)
    with caplog.at_level(logging.WARNING, logger="adabudget.models"):
        got = load(folder, True, quantize="nf4")
    assert "some of its tensor names are not the model's" in caplog.text
    assert "model.layers.1.mlp.up_proj.weight" in caplog.text  # from_pretrained's report, as before
    assert_same_model(got, expected)


# ---------------------------------------------------------------- gradient checkpointing
# Every method of the matrix on the three tiny architectures: on the NF4 base where the method
# allows it (it does not train the base), else fp32. With checkpointing the blocks run forward
# twice (the second time in backward) and the gradients are those without it.
FAMILY = {"tiny-bert": "bert", "tiny-gpt2": "gpt2", "tiny-llama": "llama"}
GC_CELLS = [(r, a) for r in ROWS for a in ARCHS if FAMILY[a] not in r[2].get("unsupported", {})]


def _counting_forward(module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


def _grads(model) -> dict:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # no dropout noise: the two passes must compute the same
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch()).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _applies_on_nf4(arch_name: str, cfg) -> bool:
    """Whether the method builds on a 4-bit base: an initialisation that rewrites W0 (PiSSA's and
    OLoRA's residual) is refused there, naming model.quantize; it is checkpointed in full precision."""
    model = build(arch_name)
    quantize_base(model, "nf4")
    try:
        apply_method(model, cfg)
    except ConfigError as err:
        if "model.quantize" not in str(err):
            raise
        return False
    return True


@pytest.mark.parametrize("row, arch_name", GC_CELLS, ids=[f"{a}-{r[0]}" for r, a in GC_CELLS])
def test_gradient_checkpointing_gives_the_same_gradients_with_every_method(row, arch_name):
    cfg = method_config_from_dict(row[1])
    on_nf4 = not any(REGISTRY[m].trains_base for m in methods_in(cfg)) and _applies_on_nf4(arch_name, cfg)
    models = []
    for checkpointing in (False, True):
        model = build(arch_name)
        if on_nf4:
            quantize_base(model, "nf4")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(3)  # the methods' own draws (DyLoRA's rank, init) alike in both
        apply_method(model, cfg)
        models.append(model)
    plain, checkpointed = models
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    assert on_nf4 == any(is_quantized(m) for m in checkpointed.modules())
    # a norm inside the first block: transformers checkpoints a block's forward (its own hooks stay
    # outside), so the modules inside it run twice
    norm = next(
        m
        for n, m in checkpointed.named_modules()
        if n.endswith(("layer.0.attention.output.LayerNorm", "h.0.ln_1", "layers.0.input_layernorm"))
    )
    calls = _counting_forward(norm)
    torch.manual_seed(4)
    expected = _grads(plain)
    torch.manual_seed(4)
    got = _grads(checkpointed)
    assert calls[0] == 2  # forward, then again in backward: checkpointing is on
    assert expected and got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


SMALL = {
    "lora": ["method=lora", "method.r=4"],
    "adalora": ["method=adalora", "method.init_r=4", "method.target_r=2", "method.mask_interval=2"],
}


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_nf4_with_checkpointing_trains_tiny_bert_classification_as_without(compose_run, method):
    runs = [
        train(
            compose_run(
                *SMALL[method], "model.quantize=nf4", f"model.gradient_checkpointing={gc}", f"run_name=gc{gc}"
            )
        )
        for gc in ("false", "true")
    ]
    assert [r["status"] for r in runs] == ["completed", "completed"]
    plain, checkpointed = (train_losses(r) for r in runs)
    assert len(plain) > 3
    assert checkpointed == pytest.approx(plain, abs=1e-5)
    assert runs[1]["final"] == runs[0]["final"]


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_nf4_with_checkpointing_trains_a_tiny_llama_causal_lm_as_without(tmp_path, method):
    runs = []
    for gc in ("false", "true"):
        overrides = lm_run(
            tmp_path, *SMALL[method], "model.quantize=nf4", f"model.gradient_checkpointing={gc}"
        )
        runs.append(train(compose([*overrides, f"run_name=gc{gc}"])))
    assert [r["status"] for r in runs] == ["completed", "completed"]
    plain, checkpointed = (train_losses(r) for r in runs)
    assert len(plain) > 3 and plain[-1] < plain[0]
    assert checkpointed == pytest.approx(plain, abs=1e-5)


# ---------------------------------------------------------------- the packaged GGUF and memory
needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None,
    reason='needs pip install -e ".[smollm2]"',
)


@pytest.mark.slow
@needs_gguf
def test_smollm2_gguf_nf4_at_load_is_load_then_quantize_bit_for_bit(monkeypatch):
    """One GGUF tensor dequantised at a time (LLaMA's q/k rows un-permuted as transformers does)
    gives the NF4 codes of transformers' whole-file dequantisation followed by quantize_base."""
    expected = load_then_quantize("smollm2", True)
    no_whole_load(monkeypatch)
    got = load("smollm2", True, quantize="nf4")
    assert assert_same_model(got, expected) == 30 * 7
    assert_same_logits(got, expected)
    assert got.generation_config.to_dict() == expected.generation_config.to_dict()


@pytest.mark.slow
@pytest.mark.integration
def test_bench_load_shows_nf4_at_load_below_load_then_quantize(tmp_path, capsys):
    """``adabudget bench load`` on a 77M-parameter random LLaMA (294 MB fp32 safetensors), each
    load in a fresh process: quantising while reading holds the NF4 weights, one fp32 tensor and
    torchao's bounded temporaries (its quantiser works in chunks of 2^20 weights, ~130-200 MB),
    load-then-quantise the whole fp32 model plus those temporaries. The model is large enough
    that the fp32 weights, not the temporaries or the allocator's whims, set the gap (at 25M
    parameters CI once measured 305 against 326 MB, while the file was still mapped)."""
    from adabudget.bench import load_main
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=768,
        num_hidden_layers=8,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=128,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama77m")
    rows = {r["load"]: r for r in load_main(["--models", str(tmp_path / "llama77m")])}
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-2].startswith(f"ratio {tmp_path / 'llama77m'} +load nf4-at-load/fp32=")
    grow = {k: r["peak"] - r["rss_before"] for k, r in rows.items()}
    fp32_weights = rows["fp32"]["weights"]
    assert rows["nf4-at-load"]["weights"] < 0.2 * fp32_weights
    assert grow["nf4-at-load"] < grow["quantize-after"] - 0.4 * fp32_weights, grow
