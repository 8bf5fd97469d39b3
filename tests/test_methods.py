"""One matrix: every PEFT method (and the s4 / unipelt / mam compositions) x tiny BERT,
GPT-2 and LLaMA, through the same generic checks (as peft's test_custom_models.py).

The causal-LM column: tiny GPT-2 and LLaMA with their language-modelling head
(``AutoModelForCausalLM``, labels = the tokens, padding -100) run every method of ``LM_METHODS``
through the same checks, and greedy generation with the KV cache must give the tokens of a
loop that recomputes the whole sequence at every step (prefix, prompt and LongLoRA change
what a cached step sees).

Adding a method means adding a row to ``ROWS``. A row is (id, method knobs, options):
``lr``: the AdamW learning rate of the loss check (1e-2); ``identity``: the output right after
``apply`` equals the base model's (False for prefix / prompt, which add tokens);
``unsupported``: {model_type: text the ConfigError must contain} for architectures the method
refuses.
"""

from __future__ import annotations

import copy

import pytest
import torch
from adabudget.arch import arch_of
from adabudget.compose import preset as method_preset
from adabudget.config import ConfigError
from adabudget.export import load_adapter, merge_methods, save_adapter
from adabudget.methods import REGISTRY, apply_method, count_method, method_config_from_dict, methods_in
from conftest import pristine, tiny_model

ARCHS = ("tiny-bert", "tiny-gpt2", "tiny-llama")
LM_ARCHS = ("tiny-gpt2-lm", "tiny-llama-lm")  # the causal-LM column: the decoders with their LM head
COLUMNS = ARCHS + LM_ARCHS
# the methods a causal LM is fine-tuned with (issue 19, sec. 3); a hybrid / s4 holds AdaLoRA groups
LM_METHODS = {
    "lora",
    "adalora",
    "sora",
    "increlora",
    "geolora",
    "hybrid",
    "s4",
    "dylora",
    "delta_lora",
    "sparse",
    "rosa",
    "quantum_peft",
    "prefix",
    "prompt",
    "ia3",
    "adapter",
    "parallel_adapter",
    "freeze",
    "full",
    "longlora",
    # and what applies to decoders beyond the list
    "bitfit",
    "mam",
    "unipelt",
}
NUM_LAYERS = 4  # the tiny configs have 2 blocks; 4 lets s4 form its 4 groups


def preset(name: str) -> dict:
    return method_preset("method", name)


def _small(values: dict, **changes) -> dict:
    return {**values, **changes}


ROWS = [
    ("lora", {"name": "lora", "r": 4}, {}),
    ("dylora", {"name": "dylora", "r_min": 1, "r_max": 4}, {}),
    ("dylora-rank3", {"name": "dylora", "r_min": 2, "r_max": 4, "export_rank": 3, "frozen": False}, {}),
    ("adalora", {"name": "adalora", "init_r": 4, "target_r": 2}, {}),
    # the LoRA variants peft ships (tests/test_lora_variants.py checks them against peft itself):
    # DoRA's magnitude, PiSSA / OLoRA rewriting W0 (the residual in the base), rsLoRA's scale
    ("lora-dora", {"name": "lora", "r": 4, "dora": True}, {}),
    ("lora-pissa", {"name": "lora", "r": 4, "init": "pissa"}, {}),
    ("lora-olora-rslora", {"name": "lora", "r": 4, "init": "olora", "rslora": True}, {}),
    ("lora-pissa-niter-dora", {"name": "lora", "r": 2, "init": "pissa_niter_2", "dora": True}, {}),
    ("adalora-pissa", {"name": "adalora", "init_r": 4, "target_r": 2, "init": "pissa"}, {}),
    # DoRA's magnitude on P Λ Q (never pruned), alone and over PiSSA's principal triplets
    ("adalora-dora", {"name": "adalora", "init_r": 4, "target_r": 2, "dora": True}, {}),
    (
        "adalora-pissa-dora",
        {"name": "adalora", "init_r": 4, "target_r": 2, "init": "pissa", "dora": True},
        {},
    ),
    # EVA: apply alone leaves A Kaiming-uniform (the calibration hook sets it from data before training)
    ("lora-eva", {"name": "lora", "r": 4, "init": "eva"}, {}),
    # the variants as a hybrid group's LoRA: DoRA in one group, PiSSA in the other
    (
        "hybrid-lora-variants",
        {
            "name": "hybrid",
            "num_groups": 2,
            "groups": [{"lora": {"r": 4, "dora": True}}, {"lora": {"r": 2, "init": "pissa", "rslora": True}}],
        },
        {},
    ),
    # sora / increlora: apply alone is the gated / grown layer at its start (the gates' proximal
    # step and the rounds of growth are in the hooks: tests/test_sora.py, tests/test_increlora.py)
    ("sora", {"name": "sora", "r": 4}, {}),
    ("increlora", {"name": "increlora", "init_r": 2, "target_r": 3, "max_rank": 4}, {}),
    # geolora: apply alone is U S Vᵀ at its start, S = 0 (the integrator's rounds are in the hooks:
    # tests/test_geolora.py); the generic checks train U, S, V as plain factors
    ("geolora", {"name": "geolora", "init_r": 2, "r_max": 4}, {}),
    # adapter biases write into tiny LLaMA's 0.02-scale residual stream: 1e-2 only reaches ln 2
    ("adapter", {"name": "adapter", "bottleneck": 8}, {"lr": 1e-3}),
    ("adapter-pfeiffer", {"name": "adapter", "placement": "pfeiffer", "reduction_factor": 4}, {}),
    ("parallel_adapter", {"name": "parallel_adapter", "bottleneck": 8}, {}),
    ("parallel_adapter-attn", {"name": "parallel_adapter", "bottleneck": 8, "position": "attn"}, {}),
    ("prefix", {"name": "prefix", "length": 3}, {"identity": False}),
    ("prefix-reparam", {"name": "prefix", "length": 3, "reparam_dim": 16}, {"identity": False}),
    ("prompt", {"name": "prompt", "length": 3}, {"identity": False}),
    ("bitfit", {"name": "bitfit"}, {"unsupported": {"llama": "add_missing"}}),
    (
        "bitfit-subset",
        {
            "name": "bitfit",
            "biases": ["query", "c_attn", "q_proj", r"intermediate\.dense", "c_fc", "up_proj"],
        },
        {"unsupported": {"llama": "add_missing"}},
    ),
    # new o/down biases write straight into LLaMA's 0.02-scale residual stream: Adam at 1e-2 overshoots
    ("bitfit-add", {"name": "bitfit", "add_missing": True}, {"lr": 1e-3}),
    ("ia3", {"name": "ia3"}, {}),
    ("freeze", {"name": "freeze", "layers": [2, 3]}, {}),
    ("full", {"name": "full"}, {}),
    # longlora: S²-Attn in training (groups of 4 over the 7-token batch), full attention in eval
    (
        "longlora",
        {"name": "longlora", "r": 4, "group_size": 4},
        {"unsupported": {"bert": "LLaMA-style", "gpt2": "LLaMA-style"}},
    ),
    # delta_lora: apply alone is LoRA (W's update is in the hooks, tests/test_delta_lora.py)
    ("delta_lora", {"name": "delta_lora", "r": 4}, {}),
    ("quantum_peft", {"name": "quantum_peft", "r": 4}, {}),
    ("quantum_peft-deep", {"name": "quantum_peft", "r": 2, "depth": 3, "alpha": 4.0}, {}),
    ("quantum_peft-lie", {"name": "quantum_peft", "r": 2, "unitary": "lie"}, {}),
    # sparse / rosa: apply alone picks the entries by magnitude (calibrate is tests/test_sparse.py's)
    ("sparse", {"name": "sparse", "density": 0.05}, {}),
    ("sparse-rows", {"name": "sparse", "selection": "structured", "budget": 3000}, {}),
    ("sparse-heads", {"name": "sparse", "selection": "heads", "density": 0.5}, {}),
    ("sparse-global", {"name": "sparse", "scope": "global", "budget": 500}, {}),
    # S's Adam steps of 1e-2 on tiny LLaMA's 0.02-scale weights overshoot by step 8, as adapter's do
    ("rosa", {"name": "rosa", "r": 2, "density": 0.02}, {"lr": 1e-3}),
    ("mam", {"name": "mam", "prefix_length": 3, "bottleneck": 8}, {"identity": False}),
    (
        "unipelt",
        {"name": "unipelt", "lora_r": 4, "prefix_length": 3, "adapter_bottleneck": 8},
        {"identity": False},
    ),
    # huggingface/peft's own layers (the reference methods); peft's AdaLoRA draws P, Q ~ N(0, 0.02)
    ("peft_lora", {"name": "peft_lora", "r": 4}, {}),
    ("peft_adalora", {"name": "peft_adalora", "init_r": 4, "target_r": 2}, {}),
    ("s4", preset("s4"), {"identity": False}),
    ("hybrid-budget", _small(preset("s4"), budget=6000), {"identity": False}),
    # AdaLoRA inside a hybrid and inside the S4 pattern (its LoRA parts as AdaLoRA: one rank budget)
    (
        "hybrid-adalora",
        {
            "name": "hybrid",
            "num_groups": 2,
            "groups": [{"adalora": {"init_r": 4, "target_r": 2}}, {"adapter": {"bottleneck": 8}}],
        },
        {},
    ),
    (
        "s4-adalora",
        _small(
            preset("s4"),
            groups=[
                {"adapter": {"bottleneck": 8}, "adalora": {"init_r": 4, "target_r": 2}},
                {"adapter": {"bottleneck": 8}, "prefix": {"length": 3}},
                {"adapter": {"bottleneck": 8}, "prefix": {"length": 3}, "bitfit": {"add_missing": True}},
                {
                    "prefix": {"length": 3},
                    "bitfit": {"add_missing": True},
                    "adalora": {"init_r": 4, "target_r": 2},
                },
            ],
        ),
        # adapters and new biases into tiny LLaMA's 0.02-scale residual stream, as the adapter row
        {"identity": False, "lr": 1e-3},
    ),
]
ROW_IDS = [r[0] for r in ROWS]
FAMILY = {
    "tiny-bert": "bert",
    "tiny-gpt2": "gpt2",
    "tiny-llama": "llama",
    "tiny-gpt2-lm": "gpt2",
    "tiny-llama-lm": "llama",
}


def in_matrix(row, arch_name: str) -> bool:
    """The causal-LM column holds the methods of ``LM_METHODS``; the classifier columns every row."""
    return arch_name not in LM_ARCHS or row[1]["name"] in LM_METHODS


# (row, architecture) cells the generic checks run on; the refused ones have their own test
CELLS = [
    (r, a) for r in ROWS for a in COLUMNS if in_matrix(r, a) and FAMILY[a] not in r[2].get("unsupported", {})
]
CELL_IDS = [f"{a}-{r[0]}" for r, a in CELLS]
REFUSED = [
    (r, a) for r in ROWS for a in COLUMNS if in_matrix(r, a) and FAMILY[a] in r[2].get("unsupported", {})
]
LM_CELLS = [(r, a) for r, a in CELLS if a in LM_ARCHS]


def tiny_lm(arch_name: str, seed: int = 0, layers: int = NUM_LAYERS):
    """``tiny-gpt2-lm`` / ``tiny-llama-lm``: the tiny decoder as adabudget loads it for a causal-LM
    task (``AutoModelForCausalLM``, ``load_model(..., causal_lm=True)``), backbone frozen, in eval mode."""
    return pristine(("causal-lm", arch_name, seed, layers), lambda: _build_tiny_lm(arch_name, seed, layers))


def _build_tiny_lm(arch_name: str, seed: int, layers: int):
    from adabudget.models import tiny_config
    from adabudget.modules import freeze_backbone
    from transformers import AutoModelForCausalLM

    hf_config = tiny_config(arch_name.removesuffix("-lm"), 2, False)
    setattr(hf_config, "n_layer" if hasattr(hf_config, "n_layer") else "num_hidden_layers", layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config).eval()
    freeze_backbone(model, train_head=False)
    return model


def build(arch_name: str, seed: int = 0):
    if arch_name in LM_ARCHS:
        return tiny_lm(arch_name, seed)
    return tiny_model(arch_name, seed, layers=NUM_LAYERS)


def batch(arch_name: str = "tiny-bert"):
    """Two sequences of 7 tokens, the second padded after 5; labels: classes, or for the causal-LM
    column the tokens themselves (-100 at padding, as ``tokenize_lm`` pads them)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    ids[1, 5:] = 0  # pad token
    if arch_name in LM_ARCHS:
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}


def logits(model, b):
    with torch.no_grad():
        return model(**{k: v for k, v in b.items() if k != "labels"}).logits


def applied(row, arch_name: str, seed: int = 0):
    """(model, cfg, wrapped) of a supported cell."""
    model = build(arch_name, seed)
    cfg = method_config_from_dict(row[1])
    cfg.validate()
    return model, cfg, apply_method(model, cfg)


@pytest.mark.parametrize("row, arch_name", REFUSED, ids=[f"{a}-{r[0]}" for r, a in REFUSED])
def test_refuses_unsupported_architectures(row, arch_name):
    """A method that cannot apply fails with a ConfigError naming the method and the fix, touching nothing."""
    model = build(arch_name)
    cfg = method_config_from_dict(row[1])
    with pytest.raises(ConfigError, match=row[2]["unsupported"][FAMILY[arch_name]]) as err:
        apply_method(model, cfg)
    assert cfg.name in str(err.value) and arch_of(model).model_type in str(err.value)
    assert not trainable(model)


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("row, arch_name", CELLS, ids=CELL_IDS)
def test_only_the_method_trains(row, arch_name):
    model, cfg, _ = applied(row, arch_name)
    params = trainable(model)
    assert params, "the method made nothing trainable"
    assert not any(n.startswith(("classifier", "score")) for n in params), "the head must stay frozen"
    if cfg.name != "full":  # full fine-tuning trains an untied LM head too (tiny LLaMA's)
        assert not any(n.startswith("lm_head") for n in params), "the LM head must stay frozen"
    model.train()
    model(**batch(arch_name)).loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not no_grad, f"trainable parameters without a gradient: {no_grad[:5]}"
    assert not frozen_with_grad


@pytest.mark.parametrize("row, arch_name", CELLS, ids=CELL_IDS)
def test_starts_as_the_base_model(row, arch_name):
    """Identity methods compute the base function at init; prefix / prompt (which add
    tokens) must not, or they are not wired in."""
    base = build(arch_name)
    model, _, _ = applied(row, arch_name)
    b = batch(arch_name)
    if row[2].get("identity", True):
        torch.testing.assert_close(logits(model, b), logits(base, b), atol=1e-5, rtol=0)
    else:
        assert (logits(model, b) - logits(base, b)).abs().max() > 0


COUNTED = [(r, a) for a in COLUMNS + ("tiny-roberta", "tiny-deberta") for r in ROWS if in_matrix(r, a)]


@pytest.mark.parametrize("row, arch_name", COUNTED, ids=[f"{a}-{r[0]}" for r, a in COUNTED])
def test_analytic_count_equals_built(row, arch_name):
    model = build(arch_name)
    cfg = method_config_from_dict(row[1])
    arch = arch_of(model)
    refusal = expected_refusal(row, arch_name)
    if refusal is not None:  # refused by the count and by apply alike, saying why, building nothing
        with pytest.raises(ConfigError, match=refusal):
            count_method(cfg, arch)
        with pytest.raises(ConfigError, match=refusal):
            apply_method(model, cfg)
        assert not trainable(model)
        return
    expected = count_method(cfg, arch)
    apply_method(model, cfg)
    assert sum(p.numel() for p in trainable(model).values()) == expected


# What the count matrix expects refused beyond the rows' own ``unsupported``: RoBERTa is BERT's
# family, and DeBERTa's attention does not go through HF's attention interface, so no prefix.
NO_PREFIX = "attention does not go through HF's attention interface"
MORE_REFUSED = {
    "tiny-roberta": {"longlora": "LLaMA-style"},
    "tiny-deberta": {
        "longlora": "LLaMA-style",
        "prefix": NO_PREFIX,
        "prefix-reparam": NO_PREFIX,
        "mam": NO_PREFIX,
        "s4": NO_PREFIX,
        "hybrid-budget": NO_PREFIX,
        "s4-adalora": NO_PREFIX,
        "unipelt": "prefix-tuning part needs attention",
    },
}


def expected_refusal(row, arch_name: str) -> str | None:
    """The text of the ConfigError a (row, architecture) cell must raise, or None if it applies."""
    family = FAMILY.get(arch_name)
    if family in row[2].get("unsupported", {}):
        return row[2]["unsupported"][family]
    return MORE_REFUSED.get(arch_name, {}).get(row[0])


PER_LAYER = [
    (r, a) for a in COLUMNS for r in ROWS if r[1]["name"] not in ("full", "s4", "hybrid") and in_matrix(r, a)
]


@pytest.mark.parametrize("row, arch_name", PER_LAYER, ids=[f"{a}-{r[0]}" for r, a in PER_LAYER])
def test_layers_restrict_the_method(row, arch_name):
    """A method given ``layers=[1]`` trains block 1 alone (the prompt is model-level), counted exactly."""
    model = build(arch_name)
    cfg = method_config_from_dict({**row[1], "layers": [1]})
    arch = arch_of(model)
    refusal = expected_refusal(row, arch_name)
    if refusal is not None:
        with pytest.raises(ConfigError, match=refusal):
            apply_method(model, cfg)
        return
    n = count_method(cfg, arch, [1])
    apply_method(model, cfg)
    params = trainable(model)
    assert sum(p.numel() for p in params.values()) == n
    if row[1]["name"] != "prompt":  # the prompt is model-level
        blocks = {name.split(f"{arch.blocks}.", 1)[1].split(".")[0] for name in params if arch.blocks in name}
        assert blocks == {"1"}, f"touched blocks {blocks}"


@pytest.mark.parametrize("row, arch_name", CELLS, ids=CELL_IDS)
def test_save_load_round_trip(row, arch_name, tmp_path):
    model, cfg, wrapped = applied(row, arch_name)
    with torch.no_grad():  # move every trainable parameter off its init
        for p in trainable(model).values():
            p.add_(0.05 * torch.randn_like(p))
    b = batch(arch_name)
    expected = logits(model, b)
    save_adapter(model, cfg, wrapped, tmp_path / "adapter", arch_name)
    torch.testing.assert_close(logits(model, b), expected, atol=1e-5, rtol=0)  # folding is exact
    fresh = build(arch_name)  # same seed: same base weights
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh, b), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("row, arch_name", CELLS, ids=CELL_IDS)
def test_few_steps_lower_the_loss(row, arch_name):
    model, _, _ = applied(row, arch_name)
    model.train()
    for m in model.modules():  # no dropout noise: the check is the optimisation itself
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    opt = torch.optim.AdamW(list(trainable(model).values()), lr=row[2].get("lr", 1e-2))
    b = batch(arch_name)
    losses = []
    for _ in range(8):
        loss = model(**b).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("row, arch_name", CELLS, ids=CELL_IDS)
def test_merge_keeps_outputs(row, arch_name):
    model, cfg, wrapped = applied(row, arch_name)
    names = methods_in(cfg)
    if any(not REGISTRY[m].mergeable for m in names):
        with pytest.raises(ValueError, match="cannot merge"):
            merge_methods(copy.deepcopy(model), wrapped, names)
        return
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(0.05 * torch.randn_like(p))
    b = batch(arch_name)
    expected = logits(model, b)
    merge_methods(model, wrapped, names)
    torch.testing.assert_close(logits(model, b), expected, atol=1e-4, rtol=0)
    leftover = [n for n, _ in model.named_modules() if "adabudget" in n or n.endswith(".base")]
    assert not leftover, leftover
    hooks = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooks, f"hooks left after merge on {hooks[:3]}"


# ---------------------------------------------------------------- the causal-LM column: generation
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def lm_tokenizer():
    from adabudget.data import load_tokenizer

    return load_tokenizer("tiny-llama")  # the tiny decoders' MiniLM vocabulary


def prompts(tokenizer) -> list[dict]:
    """Three prompts of 3, 9 and 6 tokens (left padding, longer than LongLoRA's groups of 4), as
    ``tokenize_lm`` leaves them for generation: ``input_ids`` and ``prompt_len``."""
    g = torch.Generator().manual_seed(2)
    out = []
    for n in (3, 9, 6):
        ids = torch.randint(1000, 5000, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "prompt_len": n, "target": ""})
    return out


@torch.no_grad()
def greedy_without_cache(model, examples: list[dict], pad_id: int, eos_id: int) -> torch.Tensor:
    """The reference decoding: each step runs the whole left-padded sequence again (no KV cache),
    positions counted from each sequence's first token as ``generate`` counts them; a sequence
    that produced EOS goes on with padding. Returns the new tokens (B, NEW_TOKENS)."""
    longest = max(ex["prompt_len"] for ex in examples)
    ids = torch.tensor([[pad_id] * (longest - ex["prompt_len"]) + ex["input_ids"] for ex in examples])
    mask = (
        torch.arange(longest)[None] >= longest - torch.tensor([ex["prompt_len"] for ex in examples])[:, None]
    ).long()
    done = torch.zeros(len(examples), dtype=torch.bool)
    for _ in range(NEW_TOKENS):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        nxt = out.logits[:, -1].argmax(-1).masked_fill(done, pad_id)  # (B,)
        done |= nxt == eos_id
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids[:, longest:]


@pytest.mark.parametrize("row, arch_name", LM_CELLS, ids=[f"{a}-{r[0]}" for r, a in LM_CELLS])
def test_generation_with_the_kv_cache_equals_decoding_without_it(row, arch_name, lm_tokenizer):
    """``adabudget.generation.generate`` (greedy, left padding, the KV cache) gives the tokens of a
    loop that recomputes the whole sequence at every step: a soft prompt goes in once, at the
    prefill; prefix keys/values and their widened mask at every step; LongLoRA decodes with
    full attention (eval mode). The trained-like state (moved parameters) makes the method matter."""
    from contextlib import nullcontext

    from adabudget.data.batching import lm_eos_id
    from adabudget.data.raw import Scoring
    from adabudget.generation import generate

    model, _, _ = applied(row, arch_name)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained-like adapter: every trainable parameter off its init
        for p in trainable(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.dtype))
    model.eval()
    examples = prompts(lm_tokenizer)
    pad, eos = lm_tokenizer.pad_token_id, lm_eos_id(lm_tokenizer)
    scoring = Scoring(metric="rouge", max_new_tokens=NEW_TOKENS, stop=())
    texts = generate(model, examples, lm_tokenizer, scoring, torch.device("cpu"), nullcontext)
    reference = greedy_without_cache(model, examples, pad, eos)
    assert texts == lm_tokenizer.batch_decode(reference, skip_special_tokens=True)
    assert all(t.strip() for t in texts)
    # the same at the level of token ids, straight from HF's generate with the cache
    longest = max(ex["prompt_len"] for ex in examples)
    ids = torch.tensor([[pad] * (longest - ex["prompt_len"]) + ex["input_ids"] for ex in examples])
    mask = (ids != pad).long()
    cached = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=eos,
        use_cache=True,
    )
    assert torch.equal(cached[:, longest:], reference)


PER_BLOCK = [r for r in ROWS if r[1]["name"] not in ("full", "s4", "hybrid", "prompt")]


@pytest.mark.parametrize("row", PER_BLOCK, ids=[r[0] for r in PER_BLOCK])
def test_layers_out_of_range_fail_in_count_and_apply(row):
    model = build("tiny-bert")
    cfg = method_config_from_dict({**row[1], "layers": [NUM_LAYERS]})
    with pytest.raises(ConfigError, match="method.layers"):
        count_method(cfg, arch_of(model))
    with pytest.raises(ConfigError, match="method.layers"):
        apply_method(model, cfg)


# ---------------------------------------------------------------- the LoRA layers' consumers
def test_unipelt_gate_scales_the_lora_path_per_example():
    """UniPELT's LoRA layer: y = W0 x + b + G_L(x) s B A x, one gate value per example; a closed
    gate (sigmoid -> 0) leaves the base layer alone. The plain LoRALinear has no gate."""
    from adabudget.methods.lora import LoRALinear
    from adabudget.methods.unipelt import GatedLoRALinear

    model = build("tiny-bert")
    cfg = method_config_from_dict(
        {"name": "unipelt", "lora_r": 4, "prefix_length": 3, "adapter_bottleneck": 8}
    )
    layers = [m for m in apply_method(model, cfg).values() if isinstance(m, GatedLoRALinear)]
    assert layers and not hasattr(LoRALinear(torch.nn.Linear(4, 4), 2, 1.0), "gate")
    layer = layers[0]
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.B.normal_()
        base = layer.base(x)
        delta = layer.scaling * x @ layer.A.T @ layer.B.T  # (2, 5, out): s B A x
        gate = layer.gate(x)  # (2, 1, 1)
        assert gate.shape == (2, 1, 1) and not torch.allclose(gate[0], gate[1])
        torch.testing.assert_close(layer(x), base + gate * delta)
        layer.gate.proj.bias.fill_(-1e4)
        torch.testing.assert_close(layer(x), base)


def test_only_sliced_lora_layers_compute_with_part_of_their_rank():
    """``set_active`` slices a SlicedLoRALinear (DyLoRA's layers, the supernet's) to its first r
    components; a plain LoRALinear always computes at its full rank and refuses to be sliced."""
    from adabudget.methods.lora import LoRALinear, SlicedLoRALinear, set_active

    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    plain, sliced = LoRALinear(base, 4, 0.5), SlicedLoRALinear(base, 4, 0.5)
    with torch.no_grad():
        for layer in (plain, sliced):
            layer.A.copy_(torch.arange(24.0).view(4, 6) / 24)
            layer.B.copy_(torch.arange(20.0).view(5, 4) / 20)
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(sliced(x), plain(x))
        assert set_active(sliced, 2) == {"A": (slice(0, 2),), "B": (slice(None), slice(0, 2))}
        torch.testing.assert_close(sliced(x), base(x) + 0.5 * x @ plain.A[:2].T @ plain.B[:, :2].T)
        assert set_active(sliced, 0) == {}
        torch.testing.assert_close(sliced(x), base(x))
    with pytest.raises(TypeError, match="SlicedLoRALinear"):
        set_active(plain, 2)
