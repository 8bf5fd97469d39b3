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
        ``labels`` ``(B,)``: long for classification, float for regression.
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


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence mixes (seed, epoch) so that nearby pairs give unrelated permutations
    # and no two pairs collide, unlike seed * K + epoch.
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])


def _collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(ex["input_ids"]) for ex in batch)
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0}
    out = {}
    for key, pad in pad_values.items():
        if key in batch[0]:
            out[key] = torch.tensor(
                [ex[key] + [pad] * (longest - len(ex[key])) for ex in batch], dtype=torch.long
            )  # (B, T)
    labels = [ex["labels"] for ex in batch]
    dtype = torch.float if isinstance(labels[0], float) else torch.long
    out["labels"] = torch.tensor(labels, dtype=dtype)  # (B,)
    return out
