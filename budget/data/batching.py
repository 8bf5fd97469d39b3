"""Tokenized examples and the padded, seeded batches the training loop eats."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from adabudget.config import ConfigError

if TYPE_CHECKING:
    from adabudget.data.raw import Rows

_TOKENIZE_CHUNK = 4096  # texts per tokenizer call: bounds peak memory on large datasets


def load_tokenizer(model_name: str, revision: Optional[str] = None):
    """Load the tokenizer that goes with ``model.name``.

    Args:
        model_name: ``minilm`` (the packaged all-MiniLM-L6-v2), a ``tiny-*`` test model
            (these reuse the MiniLM tokenizer, vocabulary 30522), or any hub id / path.
        revision: Hub revision, only used for hub ids.

    Returns:
        A transformers tokenizer whose ``pad_token`` is set; decoder tokenizers without
        one (GPT-2, LLaMA) pad with their end-of-sequence token.
    """
    from adabudget.hub import PACKAGED, packaged_path, pretrained_kwargs
    from transformers import AutoTokenizer

    if model_name == "minilm" or model_name.startswith("tiny-"):
        tokenizer = AutoTokenizer.from_pretrained(packaged_path("minilm"))
    elif model_name in PACKAGED:
        tokenizer = AutoTokenizer.from_pretrained(packaged_path(model_name), **pretrained_kwargs(model_name))
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_name, revision=revision)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"model.name={model_name}: no tokenizer found; use the packaged model (minilm), a tiny "
                f"test model (tiny-bert, ...), a local folder, or a hub id on a machine with internet ({err})"
            ) from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def num_batches(n_examples: int, batch_size: int) -> int:
    """Batches per epoch; the last one may be short (``ceil(n / batch_size)``)."""
    return math.ceil(n_examples / batch_size)


def make_batches(
    examples: list[dict],
    batch_size: int,
    pad_token_id: int,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    skip_batches: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield one epoch of padded batches.

    The order depends only on ``(seed, epoch)``, drawn from a private
    ``torch.Generator``, so it is unaffected by any other use of the global RNG. A run
    resumed mid-epoch passes ``skip_batches`` (batches already consumed) and gets exactly
    the batches the uninterrupted run would have seen next.

    Args:
        examples: Tokenized examples as in :class:`TaskData`.
        batch_size: Examples per batch; the last batch may be smaller.
        pad_token_id: Fills ``input_ids`` beyond each sequence (right padding).
        shuffle: Permute the examples; otherwise keep their order.
        seed: Run seed.
        epoch: Epoch index; each epoch gets its own permutation.
        skip_batches: Batches to skip at the start of the epoch.

    Yields:
        ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the examples have
        them) as ``(B, T)`` long tensors with ``T`` the longest sequence in the batch, and
        ``labels`` ``(B,)``: long for classification, float for regression; a causal-LM task's
        ``labels`` are ``(B, T)``, padded with ``IGNORE_INDEX``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(examples)
    if shuffle:
        generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        order = torch.randperm(n, generator=generator).tolist()
    else:
        order = list(range(n))
    for start in range(max(skip_batches, 0) * batch_size, n, batch_size):
        yield _collate([examples[i] for i in order[start : start + batch_size]], pad_token_id)


def tokenize(rows: Rows, tokenizer, max_length: int) -> list[dict]:
    """Tokenize one split into the unpadded examples of :class:`adabudget.data.TaskData`."""
    examples: list[dict] = []
    for start in range(0, len(rows), _TOKENIZE_CHUNK):
        stop = start + _TOKENIZE_CHUNK
        pairs = None if rows.pair is None else rows.pair[start:stop]
        encoded = tokenizer(rows.text[start:stop], pairs, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        for j, label in enumerate(rows.label[start:stop]):
            example = {k: list(encoded[k][j]) for k in keys}
            example["labels"] = label
            examples.append(example)
    return examples


IGNORE_INDEX = -100  # a label the causal-LM loss skips (transformers' and torch's default)


def lm_eos_id(tokenizer) -> int:
    """The token a completion ends with: the tokenizer's EOS, else its SEP (the MiniLM vocabulary
    of the tiny test decoders has no EOS)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ConfigError(
            "model.name: its tokenizer has neither an EOS nor a SEP token to end completions with"
        )
    return eos


def tokenize_lm(rows: Rows, tokenizer, cfg, split: str) -> list[dict]:
    """Tokenize one split of a causal-LM task (``cfg``: ``DataConfig``).

    Each example is ``prompt + completion + EOS`` with ``labels`` equal to ``input_ids`` on the
    completion and its EOS and ``IGNORE_INDEX`` on the prompt, so the loss covers the completion
    only. ``prompt_len`` and ``target`` (the completion text) are kept for generation; ``make_batches``
    does not put them in a batch. With ``data.chat_template`` the prompt is the tokenizer's chat
    template around one user turn, opened for the assistant's answer.

    A prompt that leaves no room in ``data.max_length`` for one completion token is refused
    (naming the row), unless ``data.prompt_truncation=left`` cuts its start, as far as the whole
    completion needs; a completion that still does not fit is cut at the end (the EOS then falls
    off: the model is not taught to stop early).
    """
    if cfg.chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "data.chat_template=true: this tokenizer has no chat template; set data.chat_template=false "
            "(plain prompts) or use a model whose tokenizer ships one (e.g. an -Instruct checkpoint)"
        )
    eos = lm_eos_id(tokenizer)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []
    examples = []
    for i, (prompt, completion) in enumerate(zip(rows.text, rows.label)):
        if cfg.prompt_template is not None:
            prompt = cfg.prompt_template.replace("{prompt}", prompt)
        if cfg.chat_template:
            prompt_ids = list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
                )
            )
            prompt_ids = _ids(prompt_ids)
        else:
            prompt_ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
        if len(prompt_ids) > cfg.max_length - 1:  # not even one completion token fits
            if cfg.prompt_truncation != "left":
                raise ConfigError(
                    f"data.max_length={cfg.max_length}: the prompt of {split} row {i} has {len(prompt_ids)} "
                    "tokens and leaves no room for its completion; raise data.max_length or set "
                    "data.prompt_truncation=left (keep the prompt's end)"
                )
        if cfg.prompt_truncation == "left" and len(prompt_ids) + len(completion_ids) > cfg.max_length:
            room = max(cfg.max_length - len(completion_ids), 1)  # the whole completion, if it fits at all
            prompt_ids = prompt_ids[max(len(prompt_ids) - room, 0) :]
        ids = (prompt_ids + completion_ids)[: cfg.max_length]
        n = len(prompt_ids)
        examples.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": [IGNORE_INDEX] * n + ids[n:],
                "prompt_len": n,
                "target": completion,
            }
        )
    return examples


def _ids(encoded) -> list[int]:
    """``apply_chat_template``'s token ids, whichever form this transformers returns them in."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """``data.packing``: training examples concatenated in order into rows of ``max_length`` tokens
    (the last one shorter), their labels kept, so short examples stop wasting padded positions.
    Attention crosses example boundaries inside a row, as in TRL's plain packing."""
    rows, ids, labels = [], [], []
    for ex in examples:
        ids += ex["input_ids"]
        labels += ex["labels"]
        while len(ids) >= max_length:
            rows.append((ids[:max_length], labels[:max_length]))
            ids, labels = ids[max_length:], labels[max_length:]
    if ids:
        rows.append((ids, labels))
    return [{"input_ids": i, "attention_mask": [1] * len(i), "labels": lab} for i, lab in rows]


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence mixes (seed, epoch) so that nearby pairs give unrelated permutations
    # and no two pairs collide, unlike seed * K + epoch.
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])


def _collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(ex["input_ids"]) for ex in batch)
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0}
    if isinstance(batch[0]["labels"], list):  # causal LM: a label per token, padding ignored
        pad_values["labels"] = IGNORE_INDEX
    out = {}
    for key, pad in pad_values.items():
        if key in batch[0]:
            out[key] = torch.tensor(
                [ex[key] + [pad] * (longest - len(ex[key])) for ex in batch], dtype=torch.long
            )  # (B, T)
    if "labels" not in out:
        labels = [ex["labels"] for ex in batch]
        dtype = torch.float if isinstance(labels[0], float) else torch.long
        out["labels"] = torch.tensor(labels, dtype=dtype)  # (B,)
    return out
