"""The packaged SmolLM2-135M (a real LLaMA-architecture checkpoint, GGUF, fetched into the cache
on first use): every method applies to it, its analytic count is exact, and the identity methods
start at the base model."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from adabudget.compose import preset
from adabudget.config import ModelConfig
from adabudget.methods import apply_method, count_trainable, method_config_from_dict
from adabudget.models import load_model
from adabudget.modules import freeze_backbone

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None,
        reason='needs pip install -e ".[smollm2]"',
    ),
]

METHODS = [
    ({"name": "lora", "r": 4}, True),
    ({"name": "adalora", "init_r": 6, "target_r": 4}, True),
    ({"name": "adapter", "bottleneck": 16}, True),
    ({"name": "parallel_adapter", "bottleneck": 16}, True),
    ({"name": "ia3"}, True),
    ({"name": "bitfit", "add_missing": True}, True),
    ({"name": "prefix", "length": 5}, False),
    ({"name": "prompt", "length": 5}, False),
    ({"name": "mam", "prefix_length": 5, "bottleneck": 32}, False),
    ({"name": "unipelt", "lora_r": 4, "prefix_length": 5, "adapter_bottleneck": 16}, False),
    ({**preset("method", "s4"), "budget_percent": 0.5}, False),
]


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    model = load_model(ModelConfig(name="smollm2"), 2, False).eval()
    freeze_backbone(model, train_head=False)
    ids = torch.randint(10, 20000, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = model.config.pad_token_id
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    return model, (ids, mask), base


@pytest.mark.parametrize("values, identity", METHODS, ids=[m[0]["name"] for m in METHODS])
def test_method_on_smollm2(smollm2, values, identity):
    base_model, (ids, mask), base = smollm2
    model = copy.deepcopy(base_model)
    cfg = method_config_from_dict(values)
    cfg.validate()
    expected = count_trainable(cfg, model.config)
    apply_method(model, cfg)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    out = model(input_ids=ids, attention_mask=mask).logits
    if identity:
        torch.testing.assert_close(out.detach(), base, atol=1e-4, rtol=0)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_sft_on_the_packaged_decoder_task_end_to_end(tmp_path, method):
    """`adabudget train experiment=llm/smollm2_instruct` in small: SmolLM2 as a causal LM in bf16 on
    mr_instruct, scored by generation, exported as a peft adapter."""
    import adabudget

    result = adabudget.train(
        "experiment=llm/smollm2_instruct",
        f"method={method}",
        "train.max_steps=8",
        "data.max_eval_samples=24",
        "train.progress=false",
        f"runs_root={tmp_path}",
    )
    assert result["status"] == "completed" and result["task_kind"] == "causal_lm"
    assert result["precision"] == "bf16" and result["primary_metric"] == "exact_match"
    dev = result["final"]["dev"]
    assert {"exact_match", "rougeL", "perplexity"} <= set(dev) and dev["perplexity"] < 100
    assert result["exports"]["adapter"]  # a peft adapter of a causal LM
