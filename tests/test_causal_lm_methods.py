"""Methods on causal LMs beyond the matrix (tests/test_methods.py's causal-LM column):

* LongLoRA on a long-context LM task: the tiny LLaMA on sequences of several groups, S²-Attn in
  training (it changes the logits; ``shift_wrap=false`` keeps every position causal, the paper's
  wrapped shift lets early positions see the last tokens), the LM loss goes down, and decoding
  uses full attention (the paper's inference): with the cache, without it and merged alike.
* Whole causal-LM runs through ``adabudget.train`` for the methods that change what the model
  reads (prompt, prefix, LongLoRA) or hold AdaLoRA in hybrid groups: the run completes
  with generation metrics, the completion loss goes down, and the run's adapter loaded back
  (``adabudget.load``) generates the texts the run's final evaluation generated.
"""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext
from pathlib import Path

import adabudget
import adabudget.generation
import pytest
import torch
from adabudget.export import merge_methods
from adabudget.methods import apply_method, method_config_from_dict, methods_in
from conftest import write_lm_task
from test_methods import greedy_without_cache, tiny_lm, trainable

GROUP = 8  # G: LongLoRA's group, 1/4 of the 32-token training sequences (the paper's N / 4)
SEQ = 32


def longlora(**knobs):
    """The tiny LLaMA (4 blocks, LM head) with LongLoRA, dropout off, and the method's config."""
    model = tiny_lm("tiny-llama-lm")
    cfg = method_config_from_dict({"name": "longlora", "r": 4, "group_size": GROUP, **knobs})
    wrapped = apply_method(model, cfg)
    with torch.no_grad():  # a trained-like adapter: B != 0, so LoRA matters too
        g = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model, cfg, wrapped


def sequences(n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    return torch.randint(5, 5000, (n, SEQ), generator=g)  # (B, N), N = 4 G


@torch.no_grad()
def train_logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.train()
    out = model(input_ids=ids).logits  # (B, N, V)
    model.eval()
    return out


def test_longlora_trains_a_causal_lm_with_s2_attn_and_decodes_with_full_attention():
    model, _, _ = longlora(shift_wrap=False)
    ids = sequences()
    with torch.no_grad():
        full = model.eval()(input_ids=ids).logits
    shifted = train_logits(model, ids)
    # beyond the first group S²-Attn sees less than full attention; inside it they agree (the
    # unshifted heads' first group is the causal prefix, the shifted heads' first half-group too)
    assert (shifted[:, GROUP:] - full[:, GROUP:]).abs().max() > 1e-4
    torch.testing.assert_close(shifted[:, : GROUP // 2], full[:, : GROUP // 2], atol=1e-5, rtol=0)
    # shift_wrap=false (the official flash code's groups): no position sees a later token in training
    later = ids.clone()
    later[:, 20:] = torch.randint(5, 5000, later[:, 20:].shape, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(train_logits(model, later)[:, :20], shifted[:, :20], atol=1e-5, rtol=0)


@pytest.mark.parametrize("wrap", [True, False])
def test_only_the_wrapped_shift_looks_ahead_in_training(wrap):
    """Algorithm 1 as printed (``shift_wrap=true``, the default): in the shifted heads the first G/2
    tokens share a group with the last G/2 (LongLoRA issues #15, #90), a look-ahead for a causal-LM
    loss in training (docs/methods.md advises shift_wrap=false there); without the wrap a change of
    the last G/2 tokens reaches no earlier position."""
    model, _, _ = longlora(shift_wrap=wrap)
    ids = sequences()
    later = ids.clone()
    later[:, -GROUP // 2 :] += 1  # only the last G/2 tokens change
    changed = (train_logits(model, later) - train_logits(model, ids)).abs().amax(dim=(0, 2))  # (N,)
    if wrap:
        assert changed[: GROUP // 2].min() > 1e-5  # the first half-group sees them
    else:
        assert changed[: SEQ - GROUP // 2].max() == 0


def test_longlora_lm_loss_decreases_and_the_merged_model_generates_the_same(lm_tokenizer):
    from adabudget.data.batching import lm_eos_id
    from adabudget.data.raw import Scoring
    from adabudget.generation import generate

    model, cfg, wrapped = longlora(shift_wrap=False)
    ids = sequences(4)
    opt = torch.optim.AdamW(list(trainable(model).values()), lr=1e-3)
    model.train()
    losses = []
    for _ in range(8):  # S²-Attn in every step: the module is in training mode
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0], losses
    model.eval()
    # prompts of 3 to 2 G tokens, left-padded: the cache and full attention at every step
    examples = [
        {"input_ids": ids[i, :n].tolist(), "prompt_len": n, "target": ""}
        for i, n in enumerate((3, 9, 16, 12))
    ]
    pad, eos = lm_tokenizer.pad_token_id, lm_eos_id(lm_tokenizer)
    scoring = Scoring(metric="rouge", max_new_tokens=6, stop=())
    texts = generate(model, examples, lm_tokenizer, scoring, torch.device("cpu"), nullcontext)
    reference = greedy_without_cache(model, examples, pad, eos)
    assert texts == lm_tokenizer.batch_decode(reference, skip_special_tokens=True)
    memo: dict = {}
    merged = copy.deepcopy(model, memo)  # merged as save_merged merges: a copy with its own wrappers
    merge_methods(merged, {n: memo[id(m)] for n, m in wrapped.items()}, methods_in(cfg))
    assert merged.config._attn_implementation in ("sdpa", "eager")  # standard attention back
    assert generate(merged, examples, lm_tokenizer, scoring, torch.device("cpu"), nullcontext) == texts


@pytest.fixture(scope="module")
def lm_tokenizer():
    from adabudget.data import load_tokenizer

    return load_tokenizer("tiny-llama")


# ---------------------------------------------------------------- whole causal-LM runs


HYBRID_ADALORA = (
    "method.groups=[{adapter: {bottleneck: 8}, adalora: {init_r: 4, target_r: 2, mask_interval: 2}},"
    " {prefix: {length: 3}, bitfit: {add_missing: true},"
    " adalora: {init_r: 4, target_r: 2, mask_interval: 2}}]"
)
RUNS = {
    "prompt": ["method=prompt", "method.length=4"],
    "prefix": ["method=prefix", "method.length=4"],
    # the prompts run ~12 tokens, the packed-free batches up to ~16: beyond G = 4, so S²-Attn groups
    "longlora": [
        "method=longlora",
        "method.r=4",
        "method.group_size=4",
        "method.shift_wrap=false",
        "train.lr=1e-3",
    ],
    # AdaLoRA in two groups of the tiny LLaMA's 2 blocks, one rank budget (S4 needs 4 blocks: the matrix)
    "hybrid-adalora": ["method=hybrid", "method.num_groups=2", HYBRID_ADALORA, "train.lr=1e-3"],
}


@pytest.mark.integration
@pytest.mark.parametrize("method", list(RUNS))
def test_a_causal_lm_run_trains_and_its_adapter_generates_what_the_run_evaluated(
    method, tmp_path, monkeypatch
):
    path = write_lm_task(tmp_path / "data", n=64)
    calls = []
    real = adabudget.generation.generate

    def recorded(model, examples, *args, **kwargs):
        texts = real(model, examples, *args, **kwargs)
        calls.append((examples, texts))
        return texts

    monkeypatch.setattr(adabudget.generation, "generate", recorded)
    result = adabudget.train(
        "model=tiny-llama",
        "data.task=jsonl",
        f"data.path={path}",
        "data.prompt_column=prompt",
        "data.completion_column=completion",
        "data.metric=exact_match",
        "data.answer=label_word",
        "data.max_new_tokens=3",
        "train.max_steps=12",
        "train.batch_size=8",
        "train.lr=1e-2",
        "train.eval_every=12",
        "train.log_every=2",
        "train.progress=false",
        f"runs_root={tmp_path / 'runs'}",
        *RUNS[method],
    )
    assert result["status"] == "completed" and result["task_kind"] == "causal_lm"
    assert {"exact_match", "rougeL", "perplexity"} <= set(result["final"]["dev"])
    lines = [json.loads(x) for x in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    train = [x["loss"] for x in lines if x.get("split") == "train"]
    assert train[-1] < train[0], train  # the completion loss goes down
    monkeypatch.undo()
    examples, texts = calls[-1]  # the final dev evaluation's generations
    from adabudget.data import load_tokenizer
    from adabudget.data.raw import Scoring

    model = adabudget.load(result["run_dir"])
    tokenizer = load_tokenizer("tiny-llama")
    scoring = Scoring(metric="exact_match", answer="label_word", max_new_tokens=3, stop=())
    assert (
        adabudget.generation.generate(model, examples, tokenizer, scoring, torch.device("cpu"), nullcontext)
        == texts
    )
