"""Scoring a causal-LM task: perplexity of the completions, greedy generation, and what is
compared (exact match after answer extraction, ROUGE-1/2/L).

Invariants: generation is greedy (``do_sample=False``) with the KV cache, prompts left-padded,
so the numbers do not depend on a seed; a generation is cut at the first of the task's stop
sequences after its leading whitespace (a model that opens with a newline is not cut to nothing by
a ``"\n"`` stop) before it is scored; exact match compares extracted answers (``Scoring.answer``),
never raw strings with their whitespace. ROUGE is Google's ``rouge-score`` package (F-measure,
Porter stemming), as the summarisation papers report it.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from adabudget.data.batching import IGNORE_INDEX, lm_eos_id, make_batches
from adabudget.data.raw import Scoring

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_SPACES = re.compile(r"\s+")
LM_EVAL_BATCH = 16  # at most this many sequences per forward: a (B, T, vocab) logit tensor is large


# ---------------------------------------------------------------- what is compared
def stop_index(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the first stop sequence starts in ``text``, searched after its leading whitespace
    (``"\n Positive\n"`` with stop ``"\n"`` ends at the second newline); None when none occurs."""
    start = len(text) - len(text.lstrip())
    ends = [i for i in (text.find(s, start) for s in stop if s) if i >= 0]
    return min(ends) if ends else None


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """``text`` up to the first stop sequence after its leading whitespace (the stop dropped)."""
    end = stop_index(text, stop)
    return text if end is None else text[:end]


def _number(text: str) -> str:
    """A number as a canonical string: commas dropped, ``3.0`` -> ``3``, ``.5`` -> ``0.5``."""
    text = text.replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else repr(value)


def extract_answer(text: str, answer: str, label_words: Optional[tuple[str, ...]] = None) -> str:
    """What exact match compares of a generation or a reference (``Scoring.answer``).

    * ``text``: the whole text, whitespace collapsed, case-folded.
    * ``last_number``: the last number in it (``"... so 1,234.0 apples"`` -> ``"1234"``).
    * ``gsm8k``: the number after GSM8K's ``####``, else the last number.
    * ``label_word``: the first of ``label_words`` that occurs as a word (case-folded), else ``""``.
    """
    if answer == "text":
        return _SPACES.sub(" ", text).strip().casefold()
    if answer == "gsm8k" and "####" in text:
        numbers = _NUMBER.findall(text.split("####", 1)[1])
        return _number(numbers[0]) if numbers else ""
    if answer in ("last_number", "gsm8k"):
        numbers = _NUMBER.findall(text)
        return _number(numbers[-1]) if numbers else ""
    if answer == "label_word":
        words = re.findall(r"\w+", text.casefold())
        for word in words:
            if word in {w.casefold() for w in label_words or ()}:
                return word
        return ""
    raise ValueError(f"unknown answer extraction {answer!r}")


def exact_match(predictions: list[str], references: list[str], scoring: Scoring) -> float:
    """The share of generations whose extracted answer equals the reference's (an empty answer never
    matches)."""
    hits = 0
    for pred, ref in zip(predictions, references):
        p = extract_answer(pred, scoring.answer, scoring.label_words)
        hits += bool(p) and p == extract_answer(ref, scoring.answer, scoring.label_words)
    return hits / max(len(references), 1)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (``rouge-score``, Porter stemmer), as fractions in [0, 1]."""
    scorer = _rouge_scorer_module().RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for key in totals:
            totals[key] += scores[key].fmeasure
    n = max(len(references), 1)
    return {key: value / n for key, value in totals.items()}


def _rouge_scorer_module():
    """``rouge_score.rouge_scorer``, imported with ``sys.stderr`` the process's own: its dependency
    absl binds a log handler to the ``sys.stderr`` of the moment it is first imported and closes
    that stream when ``logging`` shuts its handlers down (Hydra's logging set-up does), unless it
    is the process's own; a redirected stderr (a capture, a notebook's) would be closed."""
    saved = sys.stderr
    sys.stderr = sys.__stderr__ or saved
    try:
        from rouge_score import rouge_scorer
    finally:
        sys.stderr = saved
    return rouge_scorer


# ---------------------------------------------------------------- model passes
@torch.no_grad()
def completion_nll(model, examples: list[dict], pad_id: int, device, autocast) -> tuple[float, int]:
    """Summed negative log-likelihood of the completion tokens of ``examples`` and their count."""
    total, count = 0.0, 0
    for batch in make_batches(examples, LM_EVAL_BATCH, pad_id, shuffle=False):
        labels = batch.pop("labels").to(device)
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        with autocast():
            logits = model(**batch).logits  # (B, T, V)
        shifted = labels[:, 1:]  # token t is predicted at position t - 1
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            shifted.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += nll.item()
        count += int((shifted != IGNORE_INDEX).sum())
    return total, count


class _StopAt:
    """A stopping criterion: a sequence is done once its new tokens decode to a stop sequence after
    their leading whitespace (``stop_index``)."""

    def __init__(self, tokenizer, prompt_len: int, stop: tuple[str, ...]):
        self.tokenizer, self.prompt_len, self.stop = tokenizer, prompt_len, [s for s in stop if s]

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        done = [stop_index(text, self.stop) is not None for text in new]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(
    model,
    examples: list[dict],
    tokenizer,
    scoring: Scoring,
    device,
    autocast,
    batch_size: int = LM_EVAL_BATCH,
) -> list[str]:
    """Greedy completions of the examples' prompts, cut at the stop sequences."""
    from transformers import StoppingCriteriaList

    pad_id, eos = tokenizer.pad_token_id, lm_eos_id(tokenizer)
    out: list[str] = []
    for start in range(0, len(examples), batch_size):
        prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in examples[start : start + batch_size]]
        longest = max(len(p) for p in prompts)
        ids = torch.tensor(
            [[pad_id] * (longest - len(p)) + p for p in prompts], device=device
        )  # left padding
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
        stop = StoppingCriteriaList([_StopAt(tokenizer, longest, scoring.stop)]) if scoring.stop else None
        with autocast():
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=scoring.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
                eos_token_id=eos,
                stopping_criteria=stop,
                use_cache=True,
            )
        texts = tokenizer.batch_decode(generated[:, longest:], skip_special_tokens=True)
        out += [cut_at_stop(text, scoring.stop) for text in texts]
    return out


def score_generations(predictions: list[str], references: list[str], scoring: Scoring) -> dict[str, float]:
    """``exact_match`` and ``rouge1`` / ``rouge2`` / ``rougeL`` of generations against references."""
    return {"exact_match": exact_match(predictions, references, scoring), **rouge(predictions, references)}


def perplexity_metrics(nll: float, count: int) -> dict[str, float]:
    """``loss`` (mean NLL per completion token), ``perplexity`` and ``neg_perplexity``."""
    loss = nll / max(count, 1)
    ppl = math.exp(min(loss, 700.0))  # exp overflows a float beyond ~709
    return {"loss": loss, "perplexity": ppl, "neg_perplexity": -ppl}
