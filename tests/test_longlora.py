"""LongLoRA (adabudget.methods.longlora): S²-Attn in training against references written here
from the paper's Algorithm 1 and the official flash-attention grouping, full attention at
inference, LoRA+ gradients, merge, and a tiny training run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from adabudget.arch import arch_of
from adabudget.config import ConfigError
from adabudget.methods import apply_method, count_trainable, longlora, method_config_from_dict
from adabudget.models import tiny_config
from adabudget.modules import freeze_backbone
from adabudget.training import train
from conftest import tiny_model
from transformers import AttentionInterface, AutoModelForSequenceClassification
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface


# ---------------------------------------------------------------- references (independent of longlora.py)
def algorithm_1(q, k, v, group_size: int, scaling: float) -> torch.Tensor:
    """Chen et al., Algorithm 1, line by line. q, k, v (B, H, N, D), H heads each; returns (B, N, H, D)."""
    bsz, heads, n, dim = q.shape
    g = group_size
    qkv = torch.stack([q, k, v], dim=2).permute(0, 3, 2, 1, 4)  # (B, N, 3, H, D)
    # Key line 1: split qkv on H into 2 chunks, and shift G/2 on N
    qkv = torch.cat((qkv.chunk(2, 3)[0], qkv.chunk(2, 3)[1].roll(-g // 2, 1)), 3).reshape(
        bsz * n // g, g, 3, heads, dim
    )
    # standard (causal) self-attention within each group
    qg, kg, vg = (x.transpose(1, 2) for x in qkv.unbind(2))  # (B N/G, H, G, D)
    out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scaling)
    out = out.transpose(1, 2).reshape(bsz, n, heads, dim)  # out in shape (B, N, H, D)
    # Key line 2: split out on H into 2 chunks, and then roll back G/2 on N
    return torch.cat((out.chunk(2, 2)[0], out.chunk(2, 2)[1].roll(g // 2, 1)), 2)


def flash_grouping(q, k, v, group_size: int, scaling: float) -> torch.Tensor:
    """The official flash-attention code's groups (no roll): the first half of the heads over
    [0, G), [G, 2G), ..., the second half over [0, G/2), [G/2, 3G/2), ..., [N - G/2, N)."""
    bsz, heads, n, dim = q.shape
    out = torch.empty(bsz, heads, n, dim)
    first = (heads + 1) // 2
    for lo, hi, start in ((0, first, 0), (first, heads, group_size // 2)):
        bounds = [0] + list(range(start or group_size, n, group_size)) + [n]
        for a, b in zip(bounds[:-1], bounds[1:]):
            out[:, lo:hi, a:b] = F.scaled_dot_product_attention(
                q[:, lo:hi, a:b], k[:, lo:hi, a:b], v[:, lo:hi, a:b], is_causal=True, scale=scaling
            )
    return out.transpose(1, 2)


def _reference_attention(reference):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        rep = query.shape[1] // key.shape[1]
        key, value = (x.repeat_interleave(rep, dim=1) for x in (key, value))  # GQA: one copy per query head
        return reference(query, key, value, module.s2_test_group, scaling), None

    return attention


def with_reference_attention(model, name: str, reference, group_size: int):
    """``model`` (unpatched) with every attention computed by ``reference`` through HF's interface."""
    AttentionInterface.register(name, _reference_attention(reference))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    for module in model.modules():
        if hasattr(module, "q_proj"):
            module.s2_test_group = group_size
    model.set_attn_implementation(name)
    return model


# ---------------------------------------------------------------- helpers
def build(heads: int = 2, kv_heads: int = 1, seed: int = 0):
    return tiny_model("tiny-llama", seed, num_attention_heads=heads, num_key_value_heads=kv_heads)


def applied(heads: int = 2, kv_heads: int = 1, impl: str = "sdpa", **knobs):
    base = build(heads, kv_heads)
    base.set_attn_implementation(impl)
    model = copy.deepcopy(base)
    cfg = method_config_from_dict({"name": "longlora", "group_size": 4, **knobs})
    cfg.validate()
    wrapped = apply_method(model, cfg)
    return base, model, cfg, wrapped


def ids(batch: int, length: int, seed: int = 1):
    return torch.randint(5, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids, attention_mask=None):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def states(model, input_ids, attention_mask=None):
    """The last layer's hidden states at every token (B, T, h): the logits only see the last token."""
    with torch.no_grad():
        return model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        ).hidden_states[-1]


def perturb(model):
    """Move every trainable parameter off its init (LoRA B = 0 would hide the LoRA path)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- S²-Attn in training
@pytest.mark.parametrize("heads, kv_heads", [(2, 1), (4, 2), (3, 1)])
def test_training_equals_algorithm_1(heads, kv_heads):
    """Train mode, N = 16 tokens in groups of 4: the model's logits are those of the same weights with
    every attention computed by Algorithm 1 as printed (a roll over N, causal within groups)."""
    base, model, _, _ = applied(heads, kv_heads)
    reference = with_reference_attention(copy.deepcopy(base), "test_s2_algorithm_1", algorithm_1, 4)
    x = ids(3, 16)
    model.train(), reference.train(), base.train()
    torch.testing.assert_close(states(model, x), states(reference, x), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, x), logits(reference, x), atol=1e-5, rtol=0)
    # and it is not full attention: the groups change the function
    assert (logits(model, x) - logits(base, x)).abs().max() > 1e-3


def test_training_without_wrap_equals_the_official_flash_grouping():
    base, model, _, _ = applied(4, 2, shift_wrap=False)
    reference = with_reference_attention(copy.deepcopy(base), "test_s2_official_groups", flash_grouping, 4)
    x = ids(2, 16)
    model.train(), reference.train()
    torch.testing.assert_close(states(model, x), states(reference, x), atol=1e-5, rtol=0)
    rolled = with_reference_attention(copy.deepcopy(base), "test_s2_algorithm_1", algorithm_1, 4).train()
    assert (states(model, x) - states(rolled, x)).abs().max() > 1e-4  # the two shifts differ


def test_algorithm_1_leaks_the_end_into_the_first_half_group_and_no_wrap_does_not():
    """The known leak (LongLoRA issues #15, #90): with the roll, token 0 of a shifted head sees the
    last G/2 tokens; without wrap, no output depends on a later token."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    for wrap, leaks in ((True, True), (False, False)):
        out = longlora.shifted_sparse_attention(q, k, v, None, 4, wrap=wrap)  # (B, H, T, D)
        (grad_k,) = torch.autograd.grad(out[0, 1, 0].sum(), k, retain_graph=True)  # shifted head, token 0
        assert (grad_k[0, 1, 6:].abs().sum() > 0) == leaks
        (grad_k,) = torch.autograd.grad(out[0, 0, 0].sum(), k)  # unshifted head never leaks
        assert grad_k[0, 0, 1:].abs().sum() == 0


@pytest.mark.parametrize("wrap", [True, False])
def test_one_group_unshifted_heads_are_full_attention(wrap):
    """With the sequence exactly one group, the unshifted heads compute causal full attention."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    out = longlora.shifted_sparse_attention(q, k, v, None, 8, wrap=wrap, scaling=0.25)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
    torch.testing.assert_close(out[:, :2], full[:, :2], atol=1e-6, rtol=0)
    assert (out[:, 2:] - full[:, 2:]).abs().max() > 1e-3  # the shifted heads do not


@pytest.mark.parametrize("impl", ["sdpa", "eager"])  # boolean and additive float masks
def test_padding_is_invisible_and_sequences_are_grouped_on_their_own(impl):
    """A right-padded sequence of 8 tokens in a batch of 11 gets the logits it gets alone
    (Algorithm 1 on 8 tokens); one of 6 tokens gets those of itself completed to 8."""
    _, model, _, _ = applied(impl=impl)
    assert model.config._attn_implementation == longlora.KEY + impl
    model.train()
    x = ids(2, 11)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, 8:] = 0
    mask[1, 6:] = 0
    x[0, 8:] = x[1, 6:] = 0  # pad token: LLaMA's head pools the last non-pad token
    batch, hidden = logits(model, x, mask), states(model, x, mask)
    torch.testing.assert_close(batch[0], logits(model, x[:1, :8])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden[0, :8], states(model, x[:1, :8])[0], atol=1e-5, rtol=0)
    # the 2 pad tokens of the completed sequence are not attended to either
    torch.testing.assert_close(batch[1], logits(model, x[1:, :8], mask[1:, :8])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        hidden[1, :6], states(model, x[1:, :8], mask[1:, :8])[0, :6], atol=1e-5, rtol=0
    )


def test_pad_to_group_false_refuses_uneven_lengths():
    _, model, _, _ = applied(pad_to_group=False)
    model.train()
    logits(model, ids(1, 8))  # a multiple of G = 4 runs
    with pytest.raises(ValueError, match="multiple of method.group_size=4"):
        logits(model, ids(1, 7))


# ---------------------------------------------------------------- inference, gradients, merge
def test_eval_is_full_attention_with_the_same_weights():
    _, model, _, _ = applied()
    perturb(model)
    plain = copy.deepcopy(model)
    plain.set_attn_implementation("sdpa")  # same LoRA, embeddings and norms, HF's own attention
    x = ids(2, 13)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 9:] = 0
    x[1, 9:] = 0
    torch.testing.assert_close(
        logits(model.eval(), x, mask), logits(plain.eval(), x, mask), atol=1e-6, rtol=0
    )
    model.train(), plain.train()
    assert (logits(model, x, mask) - logits(plain, x, mask)).abs().max() > 1e-3


def test_gradients_reach_lora_embeddings_and_norms_only():
    _, model, _, _ = applied()
    perturb(model)
    model.train()
    x = ids(2, 12)
    model(input_ids=x, labels=torch.tensor([0, 1])).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    kinds = {n.rsplit(".", 1)[-1] for n in trainable}
    assert kinds == {"A", "B", "weight"}
    weights = sorted(n for n in trainable if n.endswith("weight"))
    assert weights == sorted(
        ["model.embed_tokens.weight", "model.norm.weight"]
        + [
            f"model.layers.{i}.{n}.weight"
            for i in (0, 1)
            for n in ("input_layernorm", "post_attention_layernorm")
        ]
    )
    lora = {n.rsplit(".", 1)[0] for n in trainable if n.endswith((".A", ".B"))}
    assert lora == {f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qkvo"}


@pytest.mark.parametrize("embeddings, norms", [(True, True), (False, True), (True, False), (False, False)])
def test_count_follows_the_lora_plus_knobs(embeddings, norms):
    model = build()
    cfg = method_config_from_dict({"name": "longlora", "train_embeddings": embeddings, "train_norms": norms})
    arch = arch_of(model)
    # r (in + out) over q (32->32), k, v (32->16), o (32->32) per block; V h; 2 h per block + h
    expected = 2 * 8 * (64 + 48 + 48 + 64) + embeddings * 30522 * 32 + norms * (2 * 2 * 32 + 32)
    assert longlora.count(cfg, arch) == expected
    apply_method(model, cfg)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_merge_restores_standard_attention():
    base, model, cfg, wrapped = applied()
    perturb(model)
    x = ids(2, 12)
    expected = logits(model.eval(), x)
    longlora.merge(model, wrapped)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, longlora.ATTR) for m in model.modules())
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=0)
    model.train()  # training mode now runs full attention: the same function as eval
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=0)


def test_refuses_non_llama_models_in_count_and_apply():
    for name in ("tiny-bert", "tiny-gpt2"):
        model = AutoModelForSequenceClassification.from_config(tiny_config(name, 2, False))
        freeze_backbone(model, False)
        cfg = method_config_from_dict({"name": "longlora"})
        with pytest.raises(ConfigError, match="method.name=longlora: .*LLaMA-style"):
            longlora.count(cfg, arch_of(model))
        with pytest.raises(ConfigError, match="method.name=longlora: .*LLaMA-style"):
            apply_method(model, cfg)
        assert not any(p.requires_grad for p in model.parameters())
        assert model.config._attn_implementation != "adabudget_longlora_sdpa"


@pytest.mark.parametrize("group_size", [3, 0, 1])
def test_group_size_must_be_even(group_size):
    with pytest.raises(ConfigError, match="method.group_size"):
        method_config_from_dict({"name": "longlora", "group_size": group_size}).validate()


# ---------------------------------------------------------------- the training loop
def test_tiny_llama_trains_through_the_loop(compose_run, monkeypatch):
    """A real run on padded real batches: S²-Attn runs at every training forward, evaluation uses
    full attention, the count is exact and the merged export works."""
    calls = {"n": 0}
    real = longlora.shifted_sparse_attention

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(longlora, "shifted_sparse_attention", counted)
    cfg = compose_run(
        "model=tiny-llama",
        "method=longlora",
        "method.group_size=8",
        "train.max_steps=6",
        "train.eval_every=0",
        "export_merged=true",
    )
    result = train(cfg)
    assert result["status"] == "completed", result.get("error")
    assert calls["n"] == 6 * 2  # 6 steps x 2 blocks, none at evaluation
    config = tiny_config("tiny-llama", 2, False)
    method = method_config_from_dict(dict(cfg.method))
    assert result["trainable_params"] == count_trainable(method, config, train_head=True)
    merged = AutoModelForSequenceClassification.from_pretrained(Path(result["run_dir"]) / "merged")
    assert merged.config._attn_implementation in longlora.BASES
