"""The peft round trip of a causal-LM run: a tiny LLaMA trained with LoRA and with AdaLoRA through
``adabudget.train``, its ``adapter/`` loaded by peft itself (``PeftModel.from_pretrained`` on an
``AutoModelForCausalLM`` built as adabudget builds it, same seed), and its ``merged/`` loaded by
``AutoModelForCausalLM.from_pretrained``: both give the greedy tokens of adabudget's own final
evaluation of the trained model, and its logits up to float tolerance.

"adabudget's own evaluation" is observed, not re-implemented: the final dev evaluation's call of
``adabudget.generation.generate`` is recorded (its model, examples and texts) as it runs.
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
from conftest import write_lm_task

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.integration  # whole training runs

NEW_TOKENS = 4
SEED = 3  # not the default: the base must be rebuilt with the run's seed, not by luck


METHODS = {
    "lora": ["method=lora", "method.r=4"],
    # shrinks during the run: the export holds the ranks it ended at (a per-module rank_pattern)
    "adalora": [
        "method=adalora",
        "method.init_r=4",
        "method.target_r=2",
        "method.warmup_steps=2",
        "method.final_steps=2",
        "method.mask_interval=2",
    ],
}


@pytest.fixture(scope="module", params=list(METHODS))
def trained(request, tmp_path_factory):
    """(result, the final evaluation's model, its examples and texts) of a tiny-LLaMA causal-LM run."""
    tmp = tmp_path_factory.mktemp(request.param)
    path = write_lm_task(tmp / "data", n=64)
    calls = []
    real = adabudget.generation.generate

    def recorded(model, examples, *args, **kwargs):
        texts = real(model, examples, *args, **kwargs)
        calls.append((copy.deepcopy(model), list(examples), texts))
        return texts

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adabudget.generation, "generate", recorded)
        result = adabudget.train(
            "model=tiny-llama",
            "data.task=jsonl",
            f"data.path={path}",
            "data.prompt_column=prompt",
            "data.completion_column=completion",
            "data.metric=exact_match",
            "data.answer=label_word",
            f"data.max_new_tokens={NEW_TOKENS}",
            *METHODS[request.param],
            "train.max_steps=12",
            "train.batch_size=8",
            "train.lr=1e-2",
            "train.eval_every=12",
            "train.log_every=4",
            "train.progress=false",
            f"train.seed={SEED}",
            "export_merged=true",
            f"runs_root={tmp / 'runs'}",
        )
    assert result["status"] == "completed", result
    model, examples, texts = calls[-1]  # the final dev evaluation (the last generation of the run)
    return request.param, result, model.eval(), examples, texts


def base_model():
    """The frozen base as adabudget builds it for this run: the run's seed, then the tiny LLaMA
    config with the tokenizer's pad id, as an AutoModelForCausalLM."""
    from adabudget.data import load_tokenizer
    from adabudget.models import tiny_config
    from adabudget.session import seed_everything
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer("tiny-llama")
    seed_everything(SEED)
    return AutoModelForCausalLM.from_config(
        tiny_config("tiny-llama", 0, False, tokenizer.pad_token_id)
    ), tokenizer


def batch_of(examples: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts left-padded, as generation sees them: (ids, mask), each (B, T)."""
    longest = max(ex["prompt_len"] for ex in examples)
    ids = torch.tensor(
        [[pad_id] * (longest - ex["prompt_len"]) + ex["input_ids"][: ex["prompt_len"]] for ex in examples]
    )
    return ids, (ids != pad_id).long()


@torch.no_grad()
def tokens_and_logits(model, ids, mask, pad_id: int, eos_id: int):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    return out[:, ids.shape[1] :], model(input_ids=ids, attention_mask=mask).logits


def test_the_peft_adapter_and_the_merged_checkpoint_generate_what_adabudget_evaluated(trained):
    from adabudget.data.batching import lm_eos_id
    from adabudget.data.raw import Scoring
    from adabudget.generation import generate
    from transformers import AutoModelForCausalLM

    method, result, ours, examples, texts = trained
    run_dir = Path(result["run_dir"])
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["peft_type"] == "LORA"
    if method == "adalora":  # the run shrank: the export carries mixed ranks
        assert set(result["exports"]["adapter"]["modules"].values()) != {4}
    base, tokenizer = base_model()
    pad, eos = tokenizer.pad_token_id, lm_eos_id(tokenizer)
    ids, mask = batch_of(examples, pad)
    _, base_logits = tokens_and_logits(base, ids, mask, pad, eos)

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), run_dir / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    scoring = Scoring(metric="exact_match", answer="label_word", max_new_tokens=NEW_TOKENS, stop=())
    our_tokens, our_logits = tokens_and_logits(ours, ids, mask, pad, eos)
    assert (our_logits - base_logits).abs().max() > 1e-2  # the adapter matters: a dropped one would show
    for other in (loaded, merged):
        # adabudget's scoring path on the reloaded model: the texts its final evaluation generated
        assert generate(other, examples, tokenizer, scoring, torch.device("cpu"), nullcontext) == texts
        other_tokens, other_logits = tokens_and_logits(other, ids, mask, pad, eos)
        assert torch.equal(other_tokens, our_tokens)
        torch.testing.assert_close(other_logits, our_logits, atol=1e-5, rtol=1e-5)
