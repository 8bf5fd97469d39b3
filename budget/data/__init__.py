"""Tasks as tokenized examples, and the batches the training loop eats.

``load_task(cfg, tokenizer)`` turns a :class:`adabudget.config.DataConfig` into a :class:`TaskData`:
three lists of tokenized examples (no padding) plus the label kind; ``make_batches`` pads each batch to
its longest sequence. The sources (packaged, causal-LM, hub, local files), how they are read, cleaned
and split, and the labels: see docs/training.md#how-the-data-is-read-and-split.

Invariants:

- No text is both trained on and scored on: a split this package cuts deals out whole groups of
  copies of a text (:func:`adabudget.data.split.seeded_split`); splits a dataset ships are used as given.
- Batches are shuffled by a ``torch.Generator`` seeded from ``(seed, epoch)``, so a resumed run skips
  the batches it already saw and gets exactly the rest of the epoch.
- Each :class:`TaskData` states what data it holds (``version``, ``source``, ``split_note``): a change
  to what a task reads, cleans or splits is a new version.
- Every problem with the config or the data raises :class:`adabudget.config.ConfigError` naming the
  ``data.<field>`` to change, before anything is tokenized.

Modules: ``task`` (``TaskData``, ``load_task``, ``describe``: dispatch on ``data.task``),
``packaged`` (fetch, read and clean the VADER sets), ``instruct`` (the packaged causal-LM
tasks), ``hub``, ``local``, ``raw`` (the untokenized rows and the tail hub and local data share),
``split`` (seeded splits and subsets), ``labels`` (label kind and ids) and ``batching`` (tokenizer,
tokenize, pad, shuffle). This file only re-exports the public names.
"""

from adabudget.data.batching import load_tokenizer, make_batches, num_batches
from adabudget.data.instruct import LM_TASKS
from adabudget.data.packaged import PACKAGED_TASKS, PACKAGED_VERSION, VADER_SDIST, cache_root, ensure_vader
from adabudget.data.task import TaskData, describe, load_task

__all__ = [
    "LM_TASKS",
    "PACKAGED_TASKS",
    "PACKAGED_VERSION",
    "VADER_SDIST",
    "TaskData",
    "cache_root",
    "describe",
    "ensure_vader",
    "load_task",
    "load_tokenizer",
    "make_batches",
    "num_batches",
]
