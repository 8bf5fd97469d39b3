"""The one schema of a run: nested dataclasses that hold every default.

Hydra YAML under ``configs/`` only holds named presets and experiments; the CLI only
overrides. ``adabudget.compose.resolve(cfg)`` turns a composed Hydra config into these
dataclasses and ``validate(run)`` checks every cross-field rule before any model or data is
loaded, with an error that names the field and the fix. This module imports no other part
of ``budget`` (the methods import ``ConfigError`` from here).
"""

from __future__ import annotations

import codecs
import dataclasses
import importlib.util
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

CHECKPOINT_POLICIES = ("periodic", "end", "none")
QUANTIZE = (None, "nf4")  # model.quantize
PRECISIONS = ("fp32", "bf16", "fp16")  # train.precision (autocast) and model.dtype (the frozen base)
ANSWERS = ("text", "last_number", "gsm8k", "label_word")  # data.answer: what exact match compares
LM_METRICS = ("exact_match", "rouge", "perplexity")  # data.metric: the primary metric of a causal-LM task
PROMPT_TRUNCATION = (None, "left")  # data.prompt_truncation
# torchao has no dependencies of its own, so this pulls no other torch or CUDA package
QLORA_INSTALL = 'pip install -e ".[qlora]" (or pip install "torchao>=0.16")'


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


def checker(prefix: str):
    """``check(cond, field, msg)``: a ``ConfigError("<prefix>.<field>: <msg>")`` unless ``cond``,
    the one form of the ``validate()`` checks (``check = checker("method")``)."""

    def check(cond: bool, field: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{prefix}.{field}: {msg}")

    return check


@dataclass
class ModelConfig:
    """The backbone.

    ``name`` is ``minilm`` (the packaged all-MiniLM-L6-v2, no network needed), any
    HuggingFace hub id (``bert-base-uncased``, ``microsoft/deberta-v3-base``) or local
    path, or a tiny random-weight model built from a config for tests: ``tiny-bert``,
    ``tiny-roberta``, ``tiny-deberta``, ``tiny-gpt2``, ``tiny-llama``.
    """

    name: str = "minilm"
    revision: Optional[str] = None
    # Also train the freshly initialised task head (classifier / score), as peft's
    # modules_to_save does for sequence classification: a frozen random head cannot learn.
    train_head: bool = True
    gradient_checkpointing: bool = False
    # Override every dropout probability of the backbone (hidden, attention; None keeps the
    # checkpoint's). 0 makes runs comparable step by step (e.g. 1 x 32 against 2 x 16 under torchrun).
    dropout: Optional[float] = None
    # QLoRA (Dettmers et al., 2023): null, or nf4 = the frozen linear weights of the transformer
    # blocks stored as 4-bit NormalFloat with double-quantised scales (torchao), dequantised in
    # forward; whatever method trains on top stays in 32 bits. Needs `pip install -e ".[qlora]"`.
    quantize: Optional[str] = None
    # The dtype the frozen base is loaded in: null (fp32), bf16 or fp16 (half the memory); the
    # trainable parameters stay fp32 whatever it is (train.precision sets the compute).
    dtype: Optional[str] = None


@dataclass
class DataConfig:
    """The task.

    ``task`` is a packaged task (``mr`` binary movie-review polarity, ``tweets``,
    ``amazon``, ``nyt`` sentiment regression; real human-rated data fetched from the
    ``vaderSentiment==3.3.2`` sdist on first use), an HF hub dataset (``glue/sst2``,
    ``glue/stsb``, ``imdb``), or ``csv`` / ``jsonl`` with ``path`` set to a local file or a
    folder holding ``train`` / ``dev`` (``validation``) / ``test`` files.
    """

    task: str = "mr"
    path: Optional[str] = None
    # Column names for hub and local data; None picks the known GLUE columns or "text".
    text_column: Optional[str] = None
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    # Regression when the label is a real number; None infers it from the task / labels.
    regression: Optional[bool] = None
    max_length: int = 64
    # Fixed seeded splits for tasks that ship without them (the packaged ones).
    split_seed: int = 0
    dev_fraction: float = 0.1
    test_fraction: float = 0.1
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    cache_dir: Optional[str] = None  # default: $ADABUDGET_CACHE or ~/.cache/adabudget
    # Text encoding of csv / jsonl files (any Python codec name); utf-8-sig also reads a
    # spreadsheet's byte-order mark, which would otherwise glue onto the first column name.
    encoding: str = "utf-8-sig"
    # Causal-LM supervised fine-tuning (a decoder): prompt -> completion pairs, the loss on the
    # completion tokens only. Packaged tasks (mr_instruct, aclsum, gsm8k_100) set these themselves;
    # for hub and local data, naming both columns makes the task a causal-LM one.
    prompt_column: Optional[str] = None
    completion_column: Optional[str] = None
    chat_template: bool = False  # wrap the prompt in the tokenizer's chat template (refused without one)
    # The prompt as the model sees it: "{prompt}" stands for the prompt column's text, e.g. peft's
    # method comparison's "Question: {prompt} Think step by step.\nAnswer:"; null: the text as it is.
    prompt_template: Optional[str] = None
    packing: bool = False  # concatenate short training examples into max_length rows
    # A prompt longer than max_length is refused unless this says what to cut: left keeps its end.
    prompt_truncation: Optional[str] = None
    # Scoring by generation (None: the task's own choice): what exact match compares (text |
    # last_number | gsm8k | label_word), the primary metric (exact_match | rouge | perplexity),
    # how many tokens to generate and where to stop.
    answer: Optional[str] = None
    metric: Optional[str] = None
    max_new_tokens: Optional[int] = None
    stop: Optional[list] = None
    aclsum_source: str = "abstract"  # aclsum's input: abstract | full (the whole paper, ~1,300 tokens)
    # Score on another task: dev and test come from this data section (``data.*`` keys that differ,
    # e.g. {task: gsm8k_100} or {task: "gsm8k:main", prompt_column: question, completion_column: answer}),
    # train from this one; both causal-LM tasks (peft's protocol: train on MetaMathQA, test on GSM8K).
    eval_data: Any = None  # a dict (Any: OmegaConf cannot override a None Optional[dict] node)


@dataclass
class TrainConfig:
    """The optimisation loop. Steps are optimizer steps (after gradient accumulation)."""

    epochs: float = 1.0
    # T; inferred from the data and epochs when None; 0 = zero-shot: the model as the method
    # initialises it (the base model, for every method that starts at identity) is only evaluated
    max_steps: Optional[int] = None
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06  # linear LR warmup, then decay to 0
    lr_schedule: str = "linear"  # the decay: linear | cosine (peft's method comparison uses cosine)
    max_grad_norm: Optional[float] = 1.0  # > 0; null turns gradient clipping off
    eval_every: int = 100  # also evaluates at the end; 0 = only at the end
    eval_batch_size: int = 128
    log_every: int = 10
    # Causal-LM tasks: perplexity at every evaluation, generation (exact match, ROUGE) at the end and
    # every generate_every steps (0: only at the end).
    generate_every: int = 0
    # fp32 | bf16 | fp16: the forward and backward under autocast (CPU and CUDA); the trainable
    # parameters and the optimizer stay fp32; fp16 adds a gradient scaler.
    precision: str = "fp32"
    # periodic: a checkpoint (trainable state, optimizer, allocator, RNG) every checkpoint_minutes
    # of wall time and every checkpoint_every steps (0 = no step interval), at the end and on
    # Ctrl-C / SIGTERM, so a killed run loses at most one interval; end: only at the end and on
    # an interrupt; none: never (search trials that will not be resumed)
    checkpoint: str = "periodic"
    checkpoint_minutes: float = 5.0
    checkpoint_every: int = 0
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    num_threads: Optional[int] = None
    progress: bool = True
    # Simulated pre-emption for tests: save a checkpoint after this step and stop.
    stop_after_step: Optional[int] = None


@dataclass
class LoggerConfig:
    wandb: bool = False
    project: str = "adabudget"
    entity: Optional[str] = None
    # offline unless the user set WANDB_MODE; a missing network never blocks a run.
    mode: Optional[str] = None
    tags: list = field(default_factory=list)
    group: Optional[str] = None  # W&B run group (a search: the study name)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # One of the method dataclasses of adabudget.methods (AdaLoRAConfig, LoRAConfig, ...).
    method: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run_name: str = "default"  # runs land in <runs_root>/<run_name>/<timestamp>
    runs_root: str = "runs"
    run_dir: Optional[str] = None  # default: <runs_root>/<run_name>/<YYYY-mm-dd_HH-MM-SS>
    resume: Optional[str] = None  # a run folder to continue
    export_adapter: bool = True  # write adapter/ in peft's LoRA format
    export_merged: bool = False  # also write merged/ as a plain HF checkpoint
    # Free-form labels recorded with the run (config.yaml, result.json): a search trial's study,
    # number and parameters. Training never reads them.
    meta: dict = field(default_factory=dict)


def _check(cond: bool, fld: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{fld}: {msg}")


def validate(run: RunConfig) -> None:
    """Cross-field checks that need no model or data. Raises ConfigError."""
    t, d = run.train, run.data
    _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    _check(math.isfinite(t.lr) and t.lr > 0, "train.lr", f"must be a finite number > 0, got {t.lr}")
    _check(
        math.isfinite(t.epochs),
        "train.epochs",
        f"must be a finite number, got {t.epochs}; set train.max_steps to give the length in steps",
    )
    _check(t.epochs > 0 or t.max_steps is not None, "train.epochs", "must be > 0 (or set train.max_steps)")
    # A negative norm flips every clipped gradient (gradient ascent); 0 reads as "no clipping"
    # but is not how to say it.
    _check(
        t.max_grad_norm is None or t.max_grad_norm > 0,
        "train.max_grad_norm",
        f"must be > 0 (the norm gradients are clipped to), got {t.max_grad_norm}; "
        "use train.max_grad_norm=null to turn clipping off",
    )
    _check(
        math.isfinite(t.weight_decay) and t.weight_decay >= 0,
        "train.weight_decay",
        f"must be a finite number >= 0 (AdamW's decoupled decay; 0 = none), got {t.weight_decay}",
    )
    _check(t.eval_batch_size >= 1, "train.eval_batch_size", f"must be >= 1, got {t.eval_batch_size}")
    _check(
        0 <= t.seed < 2**32,
        "train.seed",
        f"must be in [0, 2**32 - 1] (numpy's seed range), got {t.seed}",
    )
    _check(
        t.max_steps is None or t.max_steps >= 0,
        "train.max_steps",
        f"must be >= 0 (0 = zero-shot, evaluation only) or null, got {t.max_steps}",
    )
    _check(0 <= t.warmup_ratio < 1, "train.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
    _check(t.eval_every >= 0, "train.eval_every", "must be >= 0 (0 = only at the end)")
    _check(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0 = no step interval)")
    _check(
        t.checkpoint in CHECKPOINT_POLICIES,
        "train.checkpoint",
        f"unknown policy '{t.checkpoint}'; use one of {CHECKPOINT_POLICIES}",
    )
    _check(t.checkpoint_minutes > 0, "train.checkpoint_minutes", f"must be > 0, got {t.checkpoint_minutes}")
    _check(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
    _check(
        run.model.dropout is None or 0 <= run.model.dropout < 1,
        "model.dropout",
        f"must be in [0, 1) or null, got {run.model.dropout}",
    )
    _check(
        run.model.quantize in QUANTIZE,
        "model.quantize",
        f"unknown '{run.model.quantize}'; use null (full precision) or nf4 (QLoRA's 4-bit NormalFloat)",
    )
    if run.model.quantize is not None:
        _check(
            importlib.util.find_spec("torchao") is not None,
            "model.quantize",
            f"{run.model.quantize} stores the base weights with torchao's NF4 tensor, and torchao is not "
            f"installed: {QLORA_INSTALL}",
        )
        # NF4 weights cannot take gradient steps: the methods that train the base weights are refused
        # by adabudget.methods.check_quantized_base (the registry's Method.trains_base), which
        # train() and the search call after this (this module imports no other part of budget)
    _check(
        t.precision in PRECISIONS,
        "train.precision",
        f"unknown '{t.precision}'; use one of {PRECISIONS} (bf16/fp16: autocast, fp32 trainable weights)",
    )
    _check(
        run.model.dtype is None or run.model.dtype in PRECISIONS,
        "model.dtype",
        f"unknown '{run.model.dtype}'; use null (fp32) or one of {PRECISIONS}",
    )
    _check(
        run.model.dtype in (None, "fp32") or t.precision != "fp32",
        "model.dtype",
        f"{run.model.dtype} stores the frozen base in half precision, which fp32 compute cannot multiply "
        f"with the fp32 trainable weights; set train.precision={run.model.dtype} (autocast) "
        "or model.dtype=null",
    )
    _check(
        t.lr_schedule in ("linear", "cosine"),
        "train.lr_schedule",
        f"unknown '{t.lr_schedule}'; use linear or cosine",
    )
    _check(t.generate_every >= 0, "train.generate_every", "must be >= 0 (0 = generate only at the end)")
    _check(
        d.answer is None or d.answer in ANSWERS,
        "data.answer",
        f"unknown '{d.answer}'; use one of {ANSWERS} (or null: the task's own)",
    )
    _check(
        d.metric is None or d.metric in LM_METRICS,
        "data.metric",
        f"unknown '{d.metric}'; use one of {LM_METRICS} (or null: the task's own)",
    )
    _check(
        d.max_new_tokens is None or d.max_new_tokens >= 1,
        "data.max_new_tokens",
        f"must be >= 1 or null, got {d.max_new_tokens}",
    )
    _check(
        d.prompt_truncation in PROMPT_TRUNCATION,
        "data.prompt_truncation",
        f"unknown '{d.prompt_truncation}'; use null (refuse a prompt longer than data.max_length) or left "
        "(keep its end)",
    )
    _check(
        d.aclsum_source in ("abstract", "full"),
        "data.aclsum_source",
        f"unknown '{d.aclsum_source}'; use abstract (the default) or full",
    )
    _check(
        (d.prompt_column is None) == (d.completion_column is None),
        "data.completion_column" if d.completion_column is None else "data.prompt_column",
        "a causal-LM task needs both data.prompt_column and data.completion_column (or neither)",
    )
    _check(
        d.prompt_template is None or "{prompt}" in d.prompt_template,
        "data.prompt_template",
        "must contain {prompt} (where the prompt column's text goes), or be null",
    )
    if d.eval_data is not None:
        known = {f.name for f in dataclasses.fields(DataConfig)} - {"eval_data"}
        unknown = sorted(set(d.eval_data) - known)
        _check(
            not unknown and isinstance(d.eval_data.get("task", d.task), str),
            "data.eval_data",
            f"unknown key(s) {unknown}; it holds data.* keys for the evaluation task, e.g. "
            "{task: gsm8k_100} (known: " + ", ".join(sorted(known)) + ")",
        )
    _check(d.max_length >= 8, "data.max_length", f"must be >= 8, got {d.max_length}")
    try:
        codecs.lookup(d.encoding)
    except (LookupError, TypeError):
        raise ConfigError(
            f"data.encoding: unknown text encoding {d.encoding!r}; use a Python codec name such as "
            "utf-8-sig (the default), utf-16, cp1252 or latin-1"
        ) from None
    _check(0 < d.dev_fraction < 1, "data.dev_fraction", f"must be in (0, 1), got {d.dev_fraction}")
    _check(0 <= d.test_fraction < 1, "data.test_fraction", f"must be in [0, 1), got {d.test_fraction}")
    _check(
        d.dev_fraction + d.test_fraction < 0.9,
        "data.dev_fraction",
        f"dev_fraction + test_fraction = {d.dev_fraction + d.test_fraction:g} leaves too little "
        "to train on; keep the sum below 0.9",
    )
    for key in ("max_train_samples", "max_eval_samples"):
        v = getattr(d, key)
        _check(v is None or v >= 1, f"data.{key}", f"must be >= 1 or null, got {v}")
    _check(d.task in ("csv", "jsonl") or d.path is None or d.task != "", "data.task", "empty task name")
    _check(
        d.task not in ("csv", "jsonl") or bool(d.path),
        "data.path",
        f"data.task={d.task} reads a local file: set data.path=/path/to/file.{d.task} (or a folder)",
    )
    _check(
        run.logger.mode in (None, "offline", "online", "disabled"),
        "logger.mode",
        "use offline | online | disabled",
    )
    for where, knobs in method_knobs(run.method):
        check_method_knobs(where, knobs)
    validate_method = getattr(run.method, "validate", None)
    if validate_method is not None:
        validate_method()


def method_knobs(method: Any) -> list[tuple[str, dict]]:
    """(field prefix, knobs) of a method config and, for a hybrid, of each method of each group
    (``method.groups[1].lora``), so that rules shared by every method are checked in one place."""
    if not dataclasses.is_dataclass(method):
        return []
    out = [("method", {f.name: getattr(method, f.name) for f in dataclasses.fields(method)})]
    for g, entry in enumerate(getattr(method, "groups", None) or []):
        for name, knobs in entry.items() if isinstance(entry, dict) else ():
            if isinstance(knobs, dict):
                out.append((f"method.groups[{g}].{name}", knobs))
    return out


def check_method_knobs(where: str, knobs: dict) -> None:
    """The knobs every method means the same by: the LoRA scale numerator and target patterns."""
    for key in ("alpha", "lora_alpha"):
        value = knobs.get(key)
        if value is not None:
            # alpha / r scales every update: 0 trains nothing, a negative one flips the update,
            # inf or nan poison the first step
            _check(
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
                f"{where}.{key}",
                f"must be a finite number > 0 (the scale is {key} / r), got {value}",
            )
    for pattern in knobs.get("target_modules") or []:
        try:
            re.compile(rf"(.*\.)?(?:{pattern})")
        except re.error as err:
            raise ConfigError(
                f"{where}.target_modules: {str(pattern)!r} is not a valid regular expression ({err}); "
                r"each pattern is a regex matched against the end of a module name, e.g. [query,value] "
                r"or ['layer\.\d+\.output\.dense']"
            ) from None


def to_dict(run: RunConfig) -> dict:
    """Plain nested dict (for config.yaml, W&B, the result record)."""
    out = dataclasses.asdict(run)
    out["method"] = dataclasses.asdict(run.method)
    return out
