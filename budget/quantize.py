"""QLoRA's frozen 4-bit NF4 base (``model.quantize=nf4``): ``quantize_base`` and its undo.

Dettmers et al. (2023), "QLoRA: Efficient Finetuning of Quantized LLMs", sec. 3: each frozen
weight in blocks of 64 as 4-bit NormalFloat codes (NF4, quantiles of N(0, 1)) times the
block's absmax; those absmax constants double-quantised to 8 bits in blocks of 256. torchao's
NF4Tensor does both in plain PyTorch (CPU and CUDA) and keeps the logical shape and dtype, so
``linear_shape`` and every wrapper's ``base.weight.dtype`` / ``.device`` read as before.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from adabudget.config import QLORA_INSTALL, ConfigError
from adabudget.modules import block_index, is_head, is_linear, model_type, set_module
from torch import nn

log = logging.getLogger(__name__)

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


def is_quantizable(name: str, module: nn.Module) -> bool:
    """Whether ``model.quantize`` stores this module's weight in 4 bits: an nn.Linear / Conv1D
    inside a transformer block (``block_index``), not the task head."""
    return bool(name) and is_linear(module) and not is_head(name) and block_index(name) is not None


def nf4_twin(module: nn.Module, weight: torch.Tensor) -> nn.Module | None:
    """An ``NF4Linear`` / ``NF4Conv1D`` shaped as ``module`` that holds ``weight`` in NF4 (blocks
    of 64, double-quantised scales) and ``module``'s bias; None when ``weight`` has no whole
    number of blocks of 64 (the layer then stays in full precision).

    The one place a weight is quantised: ``quantize_base`` (after a load) and the load-time path
    of ``adabudget.models`` (one tensor at a time) give the same codes for the same weight.
    """
    from transformers.pytorch_utils import Conv1D

    if weight.numel() % NF4_BLOCK:
        return None
    nf4 = _nf4_api()(weight.contiguous(), NF4_BLOCK, _scaler_block(weight.numel() // NF4_BLOCK))
    with torch.device("meta"):  # the shell only: its own weight is replaced at once
        if isinstance(module, Conv1D):
            new = _nf4_conv1d_class()(module.nf, weight.shape[0])
        else:
            new = NF4Linear(module.in_features, module.out_features, bias=False)
    new.weight = nn.Parameter(nf4, requires_grad=False)
    new.bias = module.bias
    new.train(module.training)
    return new


def check_kind(kind: str) -> None:
    """``model.quantize`` is nf4 and torchao imports (ConfigError naming the fix otherwise)."""
    if kind != "nf4":
        raise ConfigError(f"model.quantize={kind}: use null or nf4")
    _nf4_api()


class QuantizeReport:
    """What was quantised, for the one log line and the no-linear error of a whole model."""

    def __init__(self, kind: str):
        self.kind, self.done, self.kept, self.n_weights, self.before, self.after = kind, [], [], 0, 0, 0

    def add(self, name: str, weight: torch.Tensor, new: nn.Module | None) -> None:
        if new is None:
            self.kept.append(name)  # torchao needs whole blocks of 64
            return
        self.done.append(name)
        self.n_weights += weight.numel()
        self.before += tensor_bytes(weight)
        self.after += tensor_bytes(new.weight)

    def finish(self, model: nn.Module) -> list[str]:
        if not self.done:
            raise ConfigError(
                f"model.quantize={self.kind}: this {model_type(model) or 'model'} has no linear layer "
                "in its transformer blocks to quantise"
            )
        if self.kept:
            log.warning(
                "model.quantize=%s: %d linear(s) kept in full precision (size not a multiple of %d): %s",
                self.kind,
                len(self.kept),
                NF4_BLOCK,
                ", ".join(self.kept[:4]),
            )
        log.info(
            "model.quantize=%s: %d linear weights %.2f MB -> %.2f MB (%.2f bits per weight)",
            self.kind,
            len(self.done),
            self.before / 2**20,
            self.after / 2**20,
            8 * self.after / self.n_weights,
        )
        return self.done


def quantize_base(model: nn.Module, kind: str) -> list[str]:
    """Store the frozen linear weights of the transformer blocks in 4 bits (QLoRA), in place.

    Every nn.Linear / Conv1D inside a block (``is_quantizable``) becomes an ``NF4Linear`` /
    ``NF4Conv1D`` holding the same bias and an NF4 weight (blocks of 64, double-quantised
    scales); embeddings, norms, the pooler and the task head stay in full precision, as in
    the paper (which keeps everything but the linear layers in 16 bits). Call it before the
    method wraps the linears: the wrappers then hold the quantised module as their ``base``.
    ``model.to(device)`` keeps the NF4 weights; ``model.to(dtype)`` / ``.float()`` would
    dequantise them (torchao's rule for an explicit dtype). ``adabudget.models.load_model``
    quantises while it reads the checkpoint instead, with the same ``nf4_twin``.

    Args:
        model: the loaded backbone (on any device; quantisation runs where the weights are).
        kind: ``model.quantize``; only ``nf4``.

    Returns:
        The names of the quantised modules.

    Raises:
        ConfigError: an unknown ``kind``, or torchao missing.
    """
    check_kind(kind)
    report = QuantizeReport(kind)
    for name, module in list(model.named_modules()):
        if not is_quantizable(name, module):
            continue
        weight = module.weight.detach()
        new = nf4_twin(module, weight)
        if new is not None:
            set_module(model, name, new)
        report.add(name, weight, new)
    return report.finish(model)


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
