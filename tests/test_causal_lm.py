"""Causal-LM supervised fine-tuning on the tiny decoders: the prompt masked out of the loss,
packing, greedy generation scored by exact match / ROUGE / perplexity, bf16 and fp16 on the CPU,
and the refusals (an encoder, a too-long prompt, a missing chat template)."""

from __future__ import annotations

import json
from pathlib import Path

import adabudget
import pytest
import torch
from adabudget.checkpoint import load_checkpoint
from adabudget.config import ConfigError, DataConfig
from adabudget.data import load_tokenizer
from adabudget.data.batching import IGNORE_INDEX, make_batches, pack, tokenize_lm
from adabudget.data.raw import Rows, Scoring
from adabudget.generation import _StopAt, cut_at_stop, exact_match, extract_answer, generate, rouge
from adabudget.models import load_model
from adabudget.precision import Scaler
from conftest import LM_WORDS, write_lm_task


def lm_run(tmp_path: Path, *extra: str) -> list[str]:
    path = write_lm_task(tmp_path / "data")
    return [
        "model=tiny-llama",
        "data.task=jsonl",
        f"data.path={path}",
        "data.prompt_column=prompt",
        "data.completion_column=completion",
        "data.metric=exact_match",
        "data.answer=label_word",
        "data.max_new_tokens=3",
        "method=lora",
        "train.max_steps=16",
        "train.batch_size=8",
        "train.lr=1e-2",
        "train.eval_every=8",
        "train.log_every=4",
        "train.progress=false",
        f"runs_root={tmp_path / 'runs'}",
        *extra,
    ]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")


def rows(prompts: list[str], completions: list[str]) -> Rows:
    return Rows(text=prompts, pair=None, label=completions, ids=list(range(len(prompts))))


# ---------------------------------------------------------------- tokenization
def test_the_prompt_is_masked_and_the_completion_ends_with_eos(tokenizer):
    (ex,) = tokenize_lm(rows(["Review: fine\nSentiment:"], [" positive"]), tokenizer, DataConfig(), "train")
    prompt = tokenizer("Review: fine\nSentiment:", add_special_tokens=False)["input_ids"]
    completion = tokenizer(" positive", add_special_tokens=False)["input_ids"]
    eos = tokenizer.sep_token_id  # the MiniLM vocabulary of the tiny decoders ends with SEP
    assert ex["input_ids"] == prompt + completion + [eos]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + completion + [eos]
    assert ex["prompt_len"] == len(prompt) and ex["target"] == " positive"
    (batch,) = make_batches([ex, {**ex, "input_ids": ex["input_ids"][:-1]}], 2, 0, False)
    assert batch["labels"].shape == batch["input_ids"].shape  # (B, T): a label per token
    assert "prompt_len" not in batch and "target" not in batch


def test_a_prompt_longer_than_max_length_is_refused_unless_truncated_left(tokenizer):
    long = "word " * 40 + "\nSentiment:"
    with pytest.raises(
        ConfigError, match=r"data.max_length=16: the prompt of dev row 1 .*prompt_truncation=left"
    ):
        tokenize_lm(rows(["short", long], [" a", " b"]), tokenizer, DataConfig(max_length=16), "dev")
    cfg = DataConfig(max_length=16, prompt_truncation="left")
    ex = tokenize_lm(rows([long], [" positive"]), tokenizer, cfg, "dev")[0]
    assert len(ex["input_ids"]) == 16 and ex["prompt_len"] == 14  # room for " positive" and EOS
    assert tokenizer.decode(ex["input_ids"][: ex["prompt_len"]]).endswith("sentiment :")  # the end is kept


def test_a_chat_template_is_refused_when_the_tokenizer_has_none(tokenizer):
    with pytest.raises(ConfigError, match="data.chat_template=true: this tokenizer has no chat template"):
        tokenize_lm(rows(["hi"], [" there"]), tokenizer, DataConfig(chat_template=True), "train")


def test_packing_fills_rows_and_keeps_every_label(tokenizer):
    examples = tokenize_lm(
        rows([f"Review: {w}\nSentiment:" for w in LM_WORDS], [f" {v}" for v in LM_WORDS.values()]),
        tokenizer,
        DataConfig(),
        "train",
    )
    packed = pack(examples, 16)
    assert all(len(r["input_ids"]) == 16 for r in packed[:-1]) and len(packed[-1]["input_ids"]) <= 16
    assert sum((r["input_ids"] for r in packed), []) == sum((e["input_ids"] for e in examples), [])
    assert sum((r["labels"] for r in packed), []) == sum((e["labels"] for e in examples), [])


# ---------------------------------------------------------------- scoring
@pytest.mark.parametrize(
    "text, answer, expected",
    [
        ("  The Answer\n is  ", "text", "the answer is"),
        ("so 1,234.0 apples and then 7", "last_number", "7"),
        ("she pays 1,234.0 dollars", "last_number", "1234"),
        ("3 + 4 = 7\n#### 1,000", "gsm8k", "1000"),
        ("no marker, 12 then 0.5", "gsm8k", "0.5"),
        (" Positive!", "label_word", "positive"),
        (" it is negative, not positive", "label_word", "negative"),
        (" unsure", "label_word", ""),
    ],
)
def test_answer_extraction(text, answer, expected):
    assert extract_answer(text, answer, ("negative", "positive")) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (" positive\n\nReview:", " positive"),
        ("\nThis paper describes a parser.\nIt", "\nThis paper describes a parser."),  # a leading newline
        ("\n\n  x", "\n\n  x"),  # no stop after the leading whitespace: all of it
        ("", ""),
        (" a ### b \n c", " a "),  # the first of several stops
    ],
)
def test_a_stop_ends_a_generation_only_after_its_leading_whitespace(text, expected):
    assert cut_at_stop(text, ("\n", "###")) == expected


class _Chars:
    """A character-level tokenizer (token id = code point): the tiny models' word-piece vocabulary
    has no newline, and _StopAt only decodes."""

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(map(chr, row.tolist())) for row in rows]


def test_generation_stops_at_a_stop_after_text_not_at_a_leading_newline():
    prompt = [ord(c) for c in "Summary:"]
    stop = _StopAt(_Chars(), len(prompt), ("\n",))

    def done(new_text: str) -> bool:
        return bool(stop(torch.tensor([prompt + [ord(c) for c in new_text]]), None)[0])

    assert not done("\n") and not done("\nThis paper") and done("\nThis paper.\n") and done(" x\n")


def test_exact_match_compares_extracted_answers_and_never_matches_an_empty_one():
    scoring = Scoring(metric="exact_match", answer="gsm8k")
    preds = ["... so #### 18", "it is 17", "nothing here"]
    refs = ["work\n#### 18", "work\n#### 18", "no number either"]
    assert exact_match(preds, refs, scoring) == pytest.approx(1 / 3)


def test_rouge_is_the_rouge_score_f_measure():
    # 'the cat sat' against 'the cat sat down': P = 1, R = 3/4 for unigrams -> F = 6/7;
    # bigrams 2/2, 2/3 -> 4/5
    scores = rouge(["the cat sat"], ["the cat sat down"])
    assert scores["rouge1"] == pytest.approx(6 / 7) and scores["rougeL"] == pytest.approx(6 / 7)
    assert scores["rouge2"] == pytest.approx(4 / 5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tokenizer, name):
    torch.manual_seed(0)
    model = load_model(adabudget.config.ModelConfig(name=name), 0, False, tokenizer.pad_token_id, True).eval()
    prompts = ["Review: good\nSentiment:", "Review: a long and rather awful film indeed\nSentiment:", "Hi:"]
    examples = tokenize_lm(rows(prompts, [" x"] * 3), tokenizer, DataConfig(), "dev")
    scoring = Scoring(metric="rouge", max_new_tokens=6, stop=())
    from contextlib import nullcontext

    together = generate(model, examples, tokenizer, scoring, torch.device("cpu"), nullcontext)
    alone = [
        generate(model, [ex], tokenizer, scoring, torch.device("cpu"), nullcontext)[0] for ex in examples
    ]
    assert together == alone and all(t.strip() for t in together)


def test_fp16_scaler_reports_a_skipped_step():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = Scaler("fp16", torch.device("cpu"))
    scaler.scale((p * float("inf")).sum()).backward()
    scaler.unscale_(opt)
    assert scaler.step(opt) is False and torch.equal(p.detach(), torch.ones(2))  # not applied
    opt.zero_grad()
    scaler.scale(p.sum()).backward()
    scaler.unscale_(opt)
    assert scaler.step(opt) is True and not torch.equal(p.detach(), torch.ones(2))


# ---------------------------------------------------------------- whole runs
def test_sft_end_to_end_records_generation_metrics(tmp_path):
    result = adabudget.train(*lm_run(tmp_path, "train.generate_every=16"))
    assert result["status"] == "completed" and result["task_kind"] == "causal_lm"
    assert result["primary_metric"] == "exact_match" and result["precision"] == "fp32"
    final = result["final"]["dev"]
    assert {"exact_match", "rouge1", "rouge2", "rougeL", "perplexity", "loss"} <= set(final)
    assert 0 <= final["exact_match"] <= 1 and final["perplexity"] == pytest.approx(
        2.718281828 ** final["loss"]
    )
    lines = [json.loads(x) for x in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    dev = [x for x in lines if x.get("split") == "dev"]
    assert "perplexity" in dev[0] and "exact_match" not in dev[0]  # step 8: perplexity only
    assert "exact_match" in dev[-1]  # the end generates
    train = [x["loss"] for x in lines if x.get("split") == "train"]
    assert train[-1] < train[0]  # the completion loss goes down


@pytest.mark.parametrize("precision, dtype", [("bf16", "null"), ("bf16", "bf16"), ("fp16", "fp16")])
def test_half_precision_on_the_cpu_trains_fp32_adapters(tmp_path, precision, dtype):
    result = adabudget.train(
        *lm_run(tmp_path, f"train.precision={precision}", f"model.dtype={dtype}", "method=adalora"),
        "method.init_r=4",
        "method.target_r=2",
        "method.mask_interval=2",
        "train.max_steps=12",
    )
    assert result["status"] == "completed" and result["precision"] == precision
    assert result["base_dtype"] == (precision if dtype != "null" else "fp32")
    state = load_checkpoint(Path(result["run_dir"]) / "checkpoints" / "last.pt")
    assert state["trainable"] and all(t.dtype == torch.float32 for t in state["trainable"].values())
    assert (state["scaler"] is not None) == (precision == "fp16")


def test_a_causal_lm_task_on_an_encoder_is_refused_before_a_run_folder(tmp_path):
    with pytest.raises(ConfigError, match="model.name=tiny-bert: a causal-LM task .* needs a decoder"):
        adabudget.train(*lm_run(tmp_path, "model=tiny-bert"))
    assert not (tmp_path / "runs").exists()


def test_model_dtype_needs_a_half_precision_compute(tmp_path):
    with pytest.raises(ConfigError, match="model.dtype: bf16 .* set train.precision=bf16"):
        adabudget.train(*lm_run(tmp_path, "model.dtype=bf16"))


def test_zero_shot_evaluates_the_base_model_without_a_step(tmp_path):
    result = adabudget.train(*lm_run(tmp_path, "train.max_steps=0", "export_adapter=false"))
    assert result["status"] == "completed" and result["total_steps"] == 0
    assert {"exact_match", "rougeL", "perplexity"} <= set(result["final"]["dev"])
    lines = (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert not [x for x in map(json.loads, lines) if x.get("split") == "train"]  # nothing trained
    # LoRA starts at identity (B = 0): the zero-shot numbers are the base model's
    again = adabudget.train(*lm_run(tmp_path, "train.max_steps=0", "export_adapter=false", "method=full"))
    assert again["final"]["dev"]["loss"] == pytest.approx(result["final"]["dev"]["loss"], rel=1e-5)


def test_eval_data_scores_on_another_task_with_its_own_scoring(tmp_path):
    """peft's protocol in small: train on one prompt/completion set, score on another (gsm8k_100 style)."""
    other = tmp_path / "other"
    other.mkdir()
    with (other / "math.jsonl").open("w") as f:
        for i in range(40):
            f.write(
                json.dumps({"q": f"Question: {i} plus 1?\nAnswer:", "a": f" {i} + 1 = {i + 1}\n#### {i + 1}"})
                + "\n"
            )
    evaluation = (
        "{task: jsonl, path: " + str(other / "math.jsonl") + ", prompt_column: q, completion_column: a"
    )
    result = adabudget.train(
        *lm_run(tmp_path, "train.max_steps=4", f"data.eval_data={evaluation}, answer: gsm8k}}")
    )
    assert result["status"] == "completed"
    # the training task's own scoring (label_word, exact_match) did not leak into the evaluation task's
    assert result["scoring"]["answer"] == "gsm8k" and result["scoring"]["metric"] == "rouge"
    assert result["primary_metric"] == "rougeL"
    assert result["split_sizes"]["dev"] + result["split_sizes"]["test"] == 8  # 40 rows: 10% dev, 10% test


def test_eval_data_with_an_unknown_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"data.eval_data: unknown key\(s\) \['tsk'\]"):
        adabudget.train(*lm_run(tmp_path, "data.eval_data={tsk: gsm8k_100}"))


def test_the_prompt_template_wraps_the_prompt_column(tokenizer):
    cfg = DataConfig(prompt_template="Question: {prompt} Think step by step.\nAnswer:")
    (ex,) = tokenize_lm(rows(["2 + 2?"], [" 4"]), tokenizer, cfg, "train")
    expected = tokenizer("Question: 2 + 2? Think step by step.\nAnswer:", add_special_tokens=False)[
        "input_ids"
    ]
    assert ex["input_ids"][: ex["prompt_len"]] == expected
    with pytest.raises(ConfigError, match="data.prompt_template: must contain"):
        adabudget.config.validate(adabudget.config.RunConfig(data=DataConfig(prompt_template="Q:")))


def test_a_search_its_table_and_dashboard_on_a_causal_lm_task(tmp_path, capsys):
    """A search ranks causal-LM trials by the task's primary metric; the table and dashboard read them."""
    from conftest import search_here

    args = [
        *lm_run(tmp_path, "train.max_steps=6"),
        "search.space=lr",
        "search.n_trials=2",
    ]
    code, out, err = search_here(capsys, *args)
    assert code == 0, err[-3000:]
    (record,) = list((tmp_path / "runs" / "search").glob("*/search.json"))
    trials = json.loads(record.read_text())["trials"]
    trained = [t for t in trials if t.get("state") == "complete"]
    assert len(trained) >= 2 and all(t["values"] and 0 <= t["values"][0] <= 1 for t in trained)
    runs = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("result.json")]
    assert {t["values"][0] for t in trained} == {r["final"]["dev"]["exact_match"] for r in runs}
    frames = adabudget.records(str(tmp_path / "runs"))
    assert set(frames.runs["primary_metric"]) == {"exact_match"} and len(frames.runs) == 2
    table = adabudget.table(str(tmp_path / "runs"))  # the primary metric per task, x100
    assert "| jsonl |" in table and "2 runs" in table
    html = adabudget.dashboard(str(tmp_path / "runs"), out=tmp_path / "dash.html")
    assert Path(html).stat().st_size > 0


CHECKPOINTED = [
    "lora",
    "adalora",
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
    "bitfit method.add_missing=true",
    "mam",
    "unipelt",
    # the S4 pattern's first and last groups on the tiny decoder's 2 blocks
    "s4 method.num_groups=2 method.groups=[{adapter:{bottleneck:16},lora:{r:8}},"
    "{prefix:{length:10},bitfit:{add_missing:true},lora:{r:8}}]",
    "hybrid",
    "longlora",
]


@pytest.mark.parametrize("method", CHECKPOINTED, ids=[m.split()[0] for m in CHECKPOINTED])
def test_gradient_checkpointing_trains_every_method_to_the_same_weights(tmp_path, method):
    """Recomputing activations in backward changes memory, not the numbers: three steps of a causal LM
    with and without model.gradient_checkpointing end at the same dev loss."""
    name, *knobs = method.split()
    losses = []
    for checkpointing in ("false", "true"):
        run = lm_run(
            tmp_path / checkpointing, f"method={name}", *knobs, "train.max_steps=3", "train.eval_every=0"
        )
        result = adabudget.train(
            *run,
            f"model.gradient_checkpointing={checkpointing}",
            "export_adapter=false",
            "data.max_eval_samples=8",
        )
        assert result["status"] == "completed", result.get("error")
        losses.append(result["final"]["dev"]["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_gradient_checkpointing_is_on_in_the_loaded_decoder(tokenizer):
    cfg = adabudget.config.ModelConfig(name="tiny-llama", gradient_checkpointing=True)
    assert load_model(cfg, 0, False, tokenizer.pad_token_id, causal_lm=True).is_gradient_checkpointing


def test_bf16_on_a_gpu_without_bf16_is_refused_before_compute(monkeypatch):
    from adabudget.precision import check_device

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(
        ConfigError, match="train.precision=bf16: Tesla V100 has no bf16 support; use train.precision=fp16"
    ):
        check_device("bf16", torch.device("cuda"))
    check_device("fp16", torch.device("cuda"))  # fp16 is what such a GPU runs
    check_device("bf16", torch.device("cpu"))  # and bf16 on the CPU always works


def test_adaloras_orth_penalty_backpropagates_under_autocast():
    """R(P, Q) is computed in the factors' fp32 even inside a bf16 autocast region, so its
    hand-written backward (outside autocast) multiplies tensors of one dtype."""
    from adabudget.methods.adalora import SVDLinear, orth_penalty

    torch.manual_seed(0)
    layers = [SVDLinear(torch.nn.Linear(16, 8), 4, 1.0), SVDLinear(torch.nn.Linear(16, 8), 3, 1.0)]
    with torch.no_grad():
        for layer in layers:
            layer.P.add_(0.1 * torch.randn_like(layer.P))  # off the manifold: a nonzero penalty
    grads = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            value = orth_penalty(layers)
        value.backward()
        grads.append([layer.P.grad.clone() for layer in layers])
        for layer in layers:
            layer.P.grad = layer.Q.grad = None
        assert value.dtype == torch.float32
    for plain, autocast in zip(*grads):
        assert torch.equal(plain, autocast)
