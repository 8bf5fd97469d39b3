"""Evaluation and the seeded stream of training batches, as every loop of adabudget uses them
(``adabudget.training``, the supernet's loop and its scoring, the methods' calibration)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import nullcontext

import numpy as np
import torch
from adabudget import ddp, generation
from adabudget.data import TaskData, make_batches, num_batches
from adabudget.generation import completion_nll, perplexity_metrics, score_generations
from adabudget.metrics import compute_metrics


@torch.no_grad()
def evaluate(
    model,
    examples: list[dict],
    task: TaskData,
    batch_size: int,
    pad_id: int,
    device,
    dist: ddp.Dist | None = None,
    autocast=nullcontext,
    tokenizer=None,
    generate: bool = True,
) -> dict:
    """Metrics of ``examples``; under DDP each rank scores every world-th example and the
    predictions are gathered, so every rank returns the same numbers.

    A causal-LM task reports ``loss``, ``perplexity`` and ``neg_perplexity`` of the completions,
    and with ``generate`` (needs ``tokenizer``) ``exact_match`` and ``rouge1/2/L`` of greedy
    generations (``adabudget.generation``). ``autocast``: the context of ``train.precision``.
    """
    dist = dist or ddp.Dist()
    if task.causal_lm:
        return _evaluate_lm(model, examples, task, pad_id, device, dist, autocast, tokenizer, generate)
    was_training = model.training
    model.eval()
    inputs = set(inspect.signature(model.forward).parameters)
    preds, labels = [], []
    for batch in make_batches(examples[dist.rank :: dist.world], batch_size, pad_id, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = model(**{k: v for k, v in batch.items() if k != "labels" and k in inputs}).logits
        preds.append(logits.float().cpu())
        labels.append(batch["labels"].cpu())
    model.train(was_training)
    p = torch.cat(preds).numpy() if preds else np.zeros((0,))
    y = torch.cat(labels).numpy() if labels else np.zeros((0,))
    if dist.active:
        parts = ddp.gather((p, y), dist)
        p = np.concatenate([a for a, _ in parts if len(a)])
        y = np.concatenate([b for _, b in parts if len(b)])
    return compute_metrics(p.squeeze(-1) if task.regression else p, y, task.regression)


def _evaluate_lm(model, examples, task, pad_id, device, dist, autocast, tokenizer, generate) -> dict:
    was_training = model.training
    model.eval()
    mine = examples[dist.rank :: dist.world]
    nll, count = completion_nll(model, mine, pad_id, device, autocast)
    texts = generation.generate(model, mine, tokenizer, task.scoring, device, autocast) if generate else []
    model.train(was_training)
    parts = ddp.gather((nll, count, texts, [ex["target"] for ex in mine]), dist)
    out = perplexity_metrics(sum(p[0] for p in parts), sum(p[1] for p in parts))
    if generate:
        predictions = [t for p in parts for t in p[2]]
        references = [t for p in parts for t in p[3]]
        out.update(score_generations(predictions, references, task.scoring))
    return out


def batch_stream(examples: list[dict], tc, pad_id: int, inputs: set[str], start_step: int) -> Iterator[dict]:
    """The training batches from optimizer step ``start_step`` on, endlessly (``tc``: ``TrainConfig``).

    Optimizer step k consumes batches [k * grad_accum, (k+1) * grad_accum) of one endless
    stream of seeded epochs, so a resumed run sees the same batches. Keys the model's forward
    does not take (``inputs``: its parameter names; tokenizers emit token_type_ids that some
    models, LLaMA, do not accept) are dropped.
    """
    batches_per_epoch = num_batches(len(examples), tc.batch_size)
    epoch, skip = divmod(start_step * tc.grad_accum, batches_per_epoch)
    while True:
        for batch in make_batches(examples, tc.batch_size, pad_id, True, tc.seed, epoch, skip):
            yield {k: v for k, v in batch.items() if k in inputs}
        epoch, skip = epoch + 1, 0


def forward_inputs(model) -> set[str]:
    """The argument names of ``model.forward`` (what ``batch_stream`` keeps of a batch)."""
    return set(inspect.signature(model.forward).parameters)
