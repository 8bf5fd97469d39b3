"""Backbones: the packaged MiniLM, any HF model, and tiny random-weight test models.

``load_model`` builds a sequence-classification model (or a causal LM) from ``model.*`` (its
files from ``adabudget.hub``); with ``model.quantize=nf4`` its block linears are quantised
while the checkpoint is read (``load_quantized``), so the full-precision model never exists;
``pick_device`` checks ``train.device`` against this machine.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from adabudget.config import ConfigError, ModelConfig
from adabudget.hub import (
    PACKAGED,
    TINY,
    packaged_path,
    prepare_hub_access,
    pretrained_kwargs,
    safetensors_files,
)
from adabudget.modules import is_head, set_module
from adabudget.precision import base_dtype
from adabudget.quantize import QuantizeReport, check_kind, is_quantizable, nf4_twin, quantize_base
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
    ``causal_lm`` the decoder with its language-modelling head; the frozen base in ``model.dtype``,
    its block linears in NF4 with ``model.quantize=nf4`` (quantised as the checkpoint is read,
    ``load_quantized``; a tiny random model is built whole, then quantised)."""
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
        if cfg.quantize:
            model = load_quantized(auto, path, config, cfg.revision, extra, dtype, cfg.quantize)
        else:
            if dtype is not None:
                extra = {**extra, "dtype": dtype}  # loaded in that dtype: the fp32 copy never exists
            model = _from_pretrained(auto, path, config, cfg.revision, extra)
    if cfg.quantize and cfg.name in TINY:
        quantize_base(model, cfg.quantize)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def check_decoder(config, name: str, causal_lm: bool) -> None:
    """A causal-LM task on an encoder-only model is refused before any weight is loaded."""
    mtype = getattr(config, "model_type", "") or ""
    if causal_lm and (mtype in ENCODERS or getattr(config, "is_encoder_decoder", False)):
        raise ConfigError(
            f"model.name={name}: a causal-LM task (prompt -> completion) needs a decoder, and {mtype} is "
            "encoder-only; use model=smollm2, tiny-llama, tiny-gpt2 or a hub decoder "
            "(or a classification task)"
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


def auto_device(distributed: bool = False) -> str:
    """``train.device=auto``: CUDA, then Apple's MPS, then the CPU. Under torchrun without CUDA the
    CPU: DDP's gloo backend reduces CPU tensors, not MPS ones (docs/install.md: on a Mac)."""
    if torch.cuda.is_available():
        return "cuda"
    if not distributed and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_device(name: str, local_rank: int | None = None) -> torch.device:
    """``train.device`` as a torch device, checked against what this machine has (a ConfigError,
    not a CUDA assertion mid-run); under torchrun ``auto``/``cuda`` is the rank's local GPU."""
    if name == "auto":
        name = auto_device(distributed=local_rank is not None)
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


# ---------------------------------------------------------------- 4-bit at load
# QLoRA's point is a base that fits where its full-precision copy does not, so model.quantize=nf4
# reads the checkpoint one tensor at a time into a model built on the meta device: a block
# linear's weight becomes its NF4 twin at once (adabudget.quantize.nf4_twin, the codes that
# load-then-quantize gives), every other tensor is set as read. What from_pretrained does around
# the tensors is done as it does it (transformers 5): tie the embeddings, give the tensors the
# checkpoint lacks (the new task head, non-persistent buffers) CPU storage, then its
# initialize_weights, which skips every tensor flagged `_is_hf_initialized`, so the head draws
# the same random numbers as from_pretrained under the same seed.


def load_quantized(auto, path: str, config, revision, extra: dict, dtype, kind: str) -> nn.Module:
    """A pretrained model whose block linears are NF4, quantised while the checkpoint is read.

    Sources: a GGUF file (``extra["gguf_file"]``, the packaged SmolLM2) is read with the gguf
    package and dequantised one tensor at a time, with transformers' own name map and tensor
    processor (LLaMA's q/k rows un-permuted as its loader does); a safetensors checkpoint (local
    folder or hub id, sharded or not) one tensor at a time with plain reads (``_read_tensor``). Anything else
    (only ``pytorch_model.bin``, names this loader cannot map, transformers < 5) is loaded whole
    and quantised after, with a warning: the same model, without the memory saving.

    Args:
        auto: the Auto class (sequence classification or causal LM).
        path: local folder or hub id; for a GGUF, the folder holding it.
        config: the model's config (from ``AutoConfig``, labels and pad token set).
        revision: ``model.revision``.
        extra: ``pretrained_kwargs`` (the GGUF file name).
        dtype: ``model.dtype`` as a torch dtype, or None (fp32).
        kind: ``model.quantize``.
    """
    import transformers

    check_kind(kind)  # torchao importable, before anything is read
    dtype = dtype or torch.get_default_dtype()
    gguf_file = extra.get("gguf_file")
    reason = None
    if int(transformers.__version__.split(".")[0]) < 5:
        reason = (
            f"transformers {transformers.__version__} initialises missing weights differently; 5 or later"
        )
    elif gguf_file is None:
        files = safetensors_files(path, revision)
        if files is None:
            reason = "its checkpoint is not safetensors"
    if reason is None:
        model = _empty_model(auto, config, dtype)
        if gguf_file is not None:
            tensors = _gguf_tensors(str(Path(path) / gguf_file), model)
        else:
            tensors = _safetensors_tensors(files, model)
            reason = None if tensors is not None else "some of its tensor names are not the model's"
    if reason is not None:
        log.warning(
            "model.quantize=%s: %s is loaded whole, then quantised (%s): peak memory is the full model's",
            kind,
            path,
            reason,
        )
        model = _from_pretrained(auto, path, config, revision, {**extra, "dtype": dtype})
        quantize_base(model, kind)
        return model
    report = QuantizeReport(kind)
    loaded = set()
    for key, tensor in tensors:
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)  # from_pretrained's cast, before the quantisation
        module_name, _, leaf = key.rpartition(".")
        module = model.get_submodule(module_name)
        new = None
        if leaf == "weight" and is_quantizable(module_name, module):
            new = nf4_twin(module, tensor)
            report.add(module_name, tensor, new)
        if new is not None:
            new.weight._is_hf_initialized = True
            set_module(model, module_name, new)
        else:
            _put(module, leaf, tensor)
        loaded.add(key)
        del tensor
        _release_freed_memory()
    report.finish(model)
    _finish(model, loaded, path)
    if model.can_generate() and gguf_file is None:  # from_pretrained reads generation_config.json too
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(path, revision=revision)
        except OSError:
            pass  # none: the one from_config built from the config stays
    model.config.name_or_path = path
    return model.eval()  # from_pretrained's mode


def _empty_model(auto, config, dtype) -> nn.Module:
    """The model's modules with every parameter and buffer on the meta device (no memory, no
    random draws)."""
    import copy

    with torch.device("meta"):
        return auto.from_config(copy.deepcopy(config), dtype=dtype)


def _put(module: nn.Module, leaf: str, tensor: torch.Tensor) -> None:
    """Set a parameter or buffer of ``module`` to ``tensor``, flagged as loaded."""
    if leaf in module._parameters:
        tensor = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)
        module._parameters[leaf] = tensor
    else:
        module._buffers[leaf] = tensor
    tensor._is_hf_initialized = True


def _finish(model: nn.Module, loaded: set[str], path: str) -> None:
    """from_pretrained's finish: tie, give what the checkpoint lacks CPU storage, initialise it."""
    expected = set(model.state_dict())
    model.tie_weights(missing_keys=expected - loaded)
    missing = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type != "meta":
            continue
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        value = torch.empty_like(tensor, device="cpu")
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(value, requires_grad=tensor.requires_grad)
            if name in expected:
                missing.append(name)
        else:
            module._buffers[leaf] = value
    model.initialize_weights()
    missing = [k for k in missing if not is_head(k)]
    if missing:
        log.warning(
            "%s: %d weight(s) not in the checkpoint, freshly initialised: %s",
            path,
            len(missing),
            ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""),
        )


def _safetensors_tensors(files: list[str], model: nn.Module):
    """(model key, tensor) of a safetensors checkpoint, read one at a time; None when a model
    weight has no tensor under a name this loader maps (the checkpoint key, or it with the base
    model's prefix added or removed, as from_pretrained matches them), tied copies and the task
    head aside. Checkpoint tensors the model has no place for are skipped, as from_pretrained does."""
    expected = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""
    headers = {file: safetensors_header(file) for file in files}  # file -> (entries, data start)
    where = {}  # model key -> (file, checkpoint key)
    for file in files:
        for key in headers[file][0]:
            for candidate in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
                if candidate in expected:
                    where.setdefault(candidate, (file, key))
                    break
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    params = {n for n, _ in model.named_parameters()}
    lacking = [k for k in expected - set(where) if k in params and k not in tied and not is_head(k)]
    if lacking:
        log.info("safetensors: no tensor for %s", ", ".join(sorted(lacking)[:8]))
        return None

    def read():
        for file in files:
            entries, start = headers[file]
            with open(file, "rb", buffering=0) as f:
                for key, (source, name) in where.items():
                    if source == file:
                        yield key, _read_tensor(f, entries[name], start, file, name)

    return read()


# safetensors dtype names (the format's header) -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def safetensors_header(file: str) -> tuple[dict, int]:
    """A safetensors file's tensor entries (name -> ``{dtype, shape, data_offsets}``, the
    ``__metadata__`` entry dropped) and the byte where their data starts: the format is an 8-byte
    little-endian header size, that many bytes of JSON, then the tensors' bytes."""
    import json
    import struct

    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _read_tensor(f, entry: dict, start: int, file: str, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, read with plain reads into a tensor of its own.

    Not ``safe_open``: it maps the whole file, and every page a tensor is read from stays in
    the process's resident memory until the file is closed, so reading a checkpoint tensor by
    tensor still made the peak RSS hold all of it (the NF4-at-load peak then rose with the fp32
    checkpoint's size, not the NF4 model's)."""
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise ValueError(f"{file}: tensor {name} has dtype {entry['dtype']}, which this loader cannot read")
    begin, end = entry["data_offsets"]
    tensor = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    if len(view) != end - begin:
        raise ValueError(f"{file}: tensor {name} holds {end - begin} bytes, its shape needs {len(view)}")
    f.seek(start + begin)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise ValueError(f"{file}: ends inside tensor {name}")
        done += n
    return tensor


def _gguf_tensors(file: str, model: nn.Module):
    """(model key, tensor) of a GGUF file, dequantised one tensor at a time.

    transformers' legacy GGUF loader, a tensor at a time: the same ``gguf.dequantize``, the same
    tensor processor (LLaMA's q/k un-permuted) and name map (``get_gguf_hf_weights_map``),
    where transformers dequantises every tensor into one state dict before loading any. A
    tensor is dequantised in slices of rows (GGUF blocks never cross a row, so the values are
    the same) into its fp32 array: numpy's dequantisation takes ~3x the output in temporaries,
    ~340 MB for SmolLM2's embedding matrix at once.
    """
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    reader = GGUFReader(file)
    architecture = read_field(reader, "general.architecture")[0]
    tensors = reader.tensors
    del reader  # its metadata fields (the tokenizer's ~50k entries, ~150 MB of objects): not needed
    parsed = {"config": model.config.to_dict(), "tensors": {}}
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(model, processor)

    def read():
        for tensor in tensors:
            weights = _dequantize_rows(tensor.data, tensor.tensor_type, dequantize)
            result = processor.process(
                weights=weights, name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed
            )
            del weights
            if result.name in names:
                # owned, writable, contiguous: no copy of a fresh array; a memmap view (F32) is copied
                array = np.require(result.weights, requirements=["C", "W", "O"])
                yield names[result.name], torch.from_numpy(array)
            while parsed["tensors"]:  # processors that split one GGUF tensor into several (MoE)
                yield parsed["tensors"].popitem()

    return read()


GGUF_ROWS_PER_SLICE = 4096  # SmolLM2's embedding: 12 slices of 4096 x 576


def _dequantize_rows(data, qtype, dequantize):
    """``dequantize(data, qtype)`` computed in slices of rows into one fp32 array."""
    import numpy as np

    if data.ndim < 2 or data.shape[0] <= GGUF_ROWS_PER_SLICE:
        return dequantize(data, qtype)
    first = dequantize(data[:GGUF_ROWS_PER_SLICE], qtype)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:GGUF_ROWS_PER_SLICE] = first
    for start in range(GGUF_ROWS_PER_SLICE, data.shape[0], GGUF_ROWS_PER_SLICE):
        out[start : start + GGUF_ROWS_PER_SLICE] = dequantize(
            data[start : start + GGUF_ROWS_PER_SLICE], qtype
        )
    return out


def _release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    Quantising interleaves large short-lived buffers (a dequantised tensor, torchao's
    temporaries) with small long-lived ones (the NF4 codes); glibc then keeps the freed
    buffers inside the heap, and on SmolLM2 the process grew by ~400 MB over the load
    without it (measured with ``adabudget bench load``).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None
