"""Mixed precision: ``train.precision`` (autocast, fp16's gradient scaler) and ``model.dtype``.

Invariants: the trainable parameters and the optimizer state stay fp32 whatever the precision
(as peft and the Trainer keep them); bf16 and fp16 only change the compute, under
``torch.autocast`` on the run's device (CPU included); fp16 scales the loss and skips a step
whose gradients overflowed, and the loop then skips that step's allocation too.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
from adabudget.config import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device):
    """A factory of the context the forward runs in: ``nullcontext`` for fp32."""
    if precision == "fp32":
        return nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=DTYPES[precision])


def check_device(precision: str, device: torch.device) -> None:
    """bf16 on a GPU without bf16 support is refused before any compute (pre-Ampere NVIDIA)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"train.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
            "use train.precision=fp16 (with its gradient scaler) or fp32"
        )


def base_dtype(name: str | None) -> torch.dtype | None:
    """``model.dtype`` as a torch dtype (None: fp32, the default load)."""
    return None if name is None else DTYPES[name]


def trainable_to_fp32(model: torch.nn.Module) -> None:
    """Cast every trainable parameter to fp32 in place (a method built on a bf16 base inherits its dtype)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32 and p.is_floating_point():
            p.data = p.data.float()


class Scaler:
    """fp16's ``GradScaler``; for fp32 and bf16 every call passes straight through."""

    def __init__(self, precision: str, device: torch.device):
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> bool:
        """The optimizer step; False when the scaler skipped it (inf or NaN gradients)."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
