"""Datasets of the HF hub (``glue/<task>``, ``name``, ``name:config``) and in-memory ``DatasetDict``s."""

from __future__ import annotations

from typing import Any, Optional

from adabudget.config import ConfigError, DataConfig
from adabudget.data.instruct import LM_TASKS
from adabudget.data.packaged import PACKAGED_TASKS
from adabudget.data.raw import (
    RawTask,
    Rows,
    as_texts,
    finish,
    finish_lm,
    lm_rows,
    refuse_classification_columns,
    require_column,
)

# GLUE task -> (text column, text pair column, dev split, test split).
GLUE = {
    "sst2": ("sentence", None, "validation", "test"),
    "cola": ("sentence", None, "validation", "test"),
    "mrpc": ("sentence1", "sentence2", "validation", "test"),
    "qqp": ("question1", "question2", "validation", "test"),
    "stsb": ("sentence1", "sentence2", "validation", "test"),
    "mnli": ("premise", "hypothesis", "validation_matched", "test_matched"),
    "qnli": ("question", "sentence", "validation", "test"),
    "rte": ("sentence1", "sentence2", "validation", "test"),
    "wnli": ("sentence1", "sentence2", "validation", "test"),
}
_DEV_SPLIT_NAMES = ("validation", "dev", "valid", "val")

TASK_HELP = (
    f"use a packaged task ({', '.join(PACKAGED_TASKS)}; for decoders {', '.join(LM_TASKS)}), a GLUE task "
    f"(glue/{', glue/'.join(GLUE)}), "
    "any HF hub dataset id (imdb, owner/name, name:config), or csv / jsonl with "
    "data.path=/path/to/file_or_folder"
)


def load_hub(task: str, cfg: DataConfig) -> RawTask:
    """Load a hub dataset and pass it through the same path as an in-memory DatasetDict."""
    if cfg.path:
        raise ConfigError(
            f"data.path: data.task={task} loads from the HF hub and reads no local file; "
            "unset data.path, or set data.task=csv / jsonl"
        )
    import datasets

    glue_task = None
    if task.lower().startswith("glue/"):
        glue_task = task.split("/", 1)[1].lower()
        if glue_task not in GLUE:
            raise ConfigError(
                f"data.task: unknown GLUE task {glue_task!r}; known: glue/{', glue/'.join(GLUE)}"
            )
        args: tuple[str, ...] = ("nyu-mll/glue", glue_task)
    elif ":" in task:
        args = tuple(task.split(":", 1))
    else:
        args = (task,)
    try:
        dataset_dict = datasets.load_dataset(*args)
    except Exception as err:
        # The hub stack reports "no such dataset" and "offline" through many unrelated
        # types (datasets, huggingface_hub, httpx, OSError); all mean the task is unusable.
        raise ConfigError(
            f"data.task: {task!r} is not a packaged task and datasets.load_dataset{args!r} failed "
            f"({type(err).__name__}: {str(err)[:300]}); {TASK_HELP}"
        ) from err
    return from_dataset_dict(task, dataset_dict, cfg, glue_task=glue_task)


def from_dataset_dict(task: str, dataset_dict, cfg: DataConfig, glue_task: Optional[str] = None) -> RawTask:
    """Columns, splits and labels of a ``datasets.DatasetDict`` (hub or in memory)."""
    import datasets

    available = list(dataset_dict.keys())
    if glue_task is not None:
        text_default, pair_default, dev_name, test_name = GLUE[glue_task]
    else:
        text_default, pair_default = "text", None
        dev_name = next((s for s in _DEV_SPLIT_NAMES if s in dataset_dict), None)
        test_name = "test"
    text_column = cfg.text_column or text_default
    pair_column = cfg.text_pair_column or pair_default
    if "train" not in dataset_dict:
        raise ConfigError(
            f"data.task: {task} has no 'train' split (splits: {available}); pick another dataset"
        )

    label_feature = dataset_dict["train"].features.get(cfg.label_column)
    class_names = list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None
    float_label = isinstance(label_feature, datasets.Value) and label_feature.dtype.startswith("float")

    found: dict[str, tuple[str, Any]] = {"train": ("train", dataset_dict["train"])}
    if dev_name is not None and dev_name in dataset_dict:
        found["dev"] = (dev_name, dataset_dict[dev_name])
    if test_name in dataset_dict:
        found["test"] = (test_name, dataset_dict[test_name])

    origin = f"HF hub dataset {task} (splits: {', '.join(f'{k}<-{v[0]}' for k, v in found.items())})"
    if cfg.prompt_column is not None:
        return _lm_from_splits(task, found, cfg, origin)

    splits: dict[str, Rows] = {}
    for split, (source_name, ds) in found.items():
        columns = list(ds.column_names)
        where = f"split {source_name!r} of {task}"
        require_column(text_column, columns, "data.text_column", where)
        if pair_column is not None:
            require_column(pair_column, columns, "data.text_pair_column", where)
        if cfg.label_column not in columns:
            if split == "test":  # an unlabeled test split is common and useless here
                continue
            require_column(cfg.label_column, columns, "data.label_column", where)
        labels = list(ds[cfg.label_column])
        if class_names is not None:
            # ClassLabel marks hidden labels (all of GLUE's test sets) with -1.
            labels = [None if value == -1 else value for value in labels]
        rows = Rows(
            text=as_texts(ds[text_column], "data.text_column", where),
            pair=None if pair_column is None else as_texts(ds[pair_column], "data.text_pair_column", where),
            label=labels,
            ids=list(range(len(ds))),
        )
        splits[split] = rows
    return finish(
        task,
        f"hf:{task}",
        origin,
        splits,
        cfg,
        (text_column, pair_column),
        class_names=class_names,
        float_label=float_label,
    )


def _lm_from_splits(task: str, found: dict[str, tuple[str, Any]], cfg: DataConfig, origin: str) -> RawTask:
    """``data.prompt_column`` -> ``data.completion_column`` pairs of each split: a causal-LM task.

    A test split without the completion column, or with every completion empty (answers withheld),
    is left out, as an unlabeled test split is for classification.
    """
    refuse_classification_columns(cfg)
    splits: dict[str, Rows] = {}
    for split, (source_name, ds) in found.items():
        columns = list(ds.column_names)
        where = f"split {source_name!r} of {task}"
        require_column(cfg.prompt_column, columns, "data.prompt_column", where)
        if cfg.completion_column not in columns and split == "test":
            continue
        require_column(cfg.completion_column, columns, "data.completion_column", where)
        rows = lm_rows(
            ds[cfg.prompt_column], ds[cfg.completion_column], range(len(ds)), where, cfg.completion_column
        )
        if rows is None and split != "test":
            raise ConfigError(
                f"data.completion_column: every completion ({cfg.completion_column!r}) of {where} is empty; "
                "name the column that holds the answers"
            )
        if rows is not None:
            splits[split] = rows
    return finish_lm(task, f"hf:{task}", origin, splits, cfg, (cfg.prompt_column, cfg.completion_column))
