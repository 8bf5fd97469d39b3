"""Backbones: the packaged MiniLM, any HF model, and tiny random-weight test models.

``load_model`` builds a sequence-classification model from ``model.*`` (its files from
``adabudget.hub``, its base quantised by ``adabudget.quantize``); ``pick_device`` checks
``train.device`` against this machine.
"""

from __future__ import annotations

import logging

import torch
from adabudget.config import ConfigError, ModelConfig
from adabudget.hub import PACKAGED, TINY, packaged_path, prepare_hub_access, pretrained_kwargs
from adabudget.modules import is_head
from adabudget.precision import base_dtype
from adabudget.quantize import quantize_base
from torch import nn

log = logging.getLogger(__name__)


def tiny_config(name: str, num_labels: int, regression: bool, pad_token_id: int = 0):
    """A 2-layer random-weight config of the named family (vocab of the MiniLM tokenizer)."""
    from transformers import BertConfig, DebertaV2Config, GPT2Config, LlamaConfig, RobertaConfig

    common = dict(num_labels=num_labels, pad_token_id=pad_token_id)
    if regression:
        common["problem_type"] = "regression"
    if name == "tiny-bert":
        return BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            **common,
        )
    if name == "tiny-roberta":
        return RobertaConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=130,
            type_vocab_size=2,
            **common,
        )
    if name == "tiny-deberta":
        return DebertaV2Config(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            position_buckets=16,
            **common,
        )
    if name == "tiny-gpt2":
        return GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=128, **common)
    if name == "tiny-llama":
        return LlamaConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            max_position_embeddings=128,
            **common,
        )
    raise ConfigError(f"model.name={name}: unknown tiny model; known: {', '.join(TINY)}")


# Encoder-only families: a causal-LM task needs a decoder (BERT's "LM head" is a masked-LM one).
ENCODERS = (
    "bert",
    "roberta",
    "deberta-v2",
    "deberta",
    "distilbert",
    "electra",
    "albert",
    "xlm-roberta",
    "mpnet",
)


def load_model(
    cfg: ModelConfig,
    num_labels: int,
    regression: bool,
    pad_token_id: int | None = None,
    causal_lm: bool = False,
) -> nn.Module:
    """A sequence-classification model (regression head when ``regression``), or with
    ``causal_lm`` the decoder with its language-modelling head; the frozen base in ``model.dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    kwargs = {} if causal_lm else dict(num_labels=num_labels)
    if regression:
        kwargs["problem_type"] = "regression"
    dtype = base_dtype(cfg.dtype)
    if cfg.name in TINY:
        config = tiny_config(cfg.name, num_labels, regression, pad_token_id or 0)
        check_decoder(config, cfg.name, causal_lm)
        model = auto.from_config(config)
        if dtype is not None:
            model.to(dtype)
    else:
        prepare_hub_access(cfg.name, cfg.revision)  # idempotent; fails fast offline for a hub id
        path = packaged_path(cfg.name) if cfg.name in PACKAGED else cfg.name
        extra = pretrained_kwargs(cfg.name)
        try:
            config = AutoConfig.from_pretrained(path, revision=cfg.revision, **kwargs, **extra)
        except OSError as err:
            raise ConfigError(
                f"model.name={cfg.name}: not a packaged model ({', '.join(PACKAGED)}), tiny model "
                f"({', '.join(TINY)}), local folder or reachable HF hub id ({err.__class__.__name__})"
            ) from err
        check_decoder(config, cfg.name, causal_lm)
        if config.pad_token_id is None and pad_token_id is not None:
            config.pad_token_id = pad_token_id  # GPT-2 / LLaMA heads pool at the last non-pad token
        if dtype is not None:
            extra = {**extra, "dtype": dtype}  # loaded in that dtype: the fp32 copy never exists
        model = _from_pretrained(auto, path, config, cfg.revision, extra)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.quantize:
        quantize_base(model, cfg.quantize)
    return model


def check_decoder(config, name: str, causal_lm: bool) -> None:
    """A causal-LM task on an encoder-only model is refused before any weight is loaded."""
    mtype = getattr(config, "model_type", "") or ""
    if causal_lm and (mtype in ENCODERS or getattr(config, "is_encoder_decoder", False)):
        raise ConfigError(
            f"model.name={name}: a causal-LM task (prompt -> completion) needs a decoder, and {mtype} is "
            "encoder-only; use model=smollm2, tiny-llama, tiny-gpt2 or a hub decoder (or a classification task)"
        )


def _from_pretrained(cls, path, config, revision, extra: dict) -> nn.Module:
    """``from_pretrained`` without transformers' load report and progress bar, which print a
    colour-coded table on every run for the one expected gap, the new task head. Missing
    weights anywhere else are a real problem and are reported, in plain text."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(
            path, config=config, revision=revision, output_loading_info=True, **extra
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = [k for k in info.get("missing_keys", []) if not is_head(k)]
    if missing:
        log.warning(
            "%s: %d weight(s) not in the checkpoint, freshly initialised: %s",
            path,
            len(missing),
            ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""),
        )
    return model


def pick_device(name: str, local_rank: int | None = None) -> torch.device:
    """``train.device`` as a torch device, checked against what this machine has (a ConfigError,
    not a CUDA assertion mid-run); under torchrun ``auto``/``cuda`` is the rank's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"train.device={name}: use auto | cpu | cuda | cuda:N | mps") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(
                f"train.device={name}: {build} (torch {torch.__version__}); use train.device=cpu (or auto)"
            )
        if local_rank is not None and device.index is None:
            device = torch.device("cuda", local_rank)
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"train.device={name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name}: MPS is not available here; use train.device=cpu")
    return device


# ---------------------------------------------------------------- QLoRA: a 4-bit NF4 base
# Dettmers et al. (2023), "QLoRA: Efficient Finetuning of Quantized LLMs", sec. 3: each frozen
