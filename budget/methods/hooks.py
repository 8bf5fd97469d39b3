"""The training loop's seam for methods that act outside forward and backward (``MethodHooks``).

A leaf module: the method files subclass ``MethodHooks`` and ``adabudget.methods`` (which imports
them) re-exports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch


class MethodHooks(Protocol):
    """What ``adabudget.training`` calls on a method's hooks object (``Method.hooks(model, modules,
    cfg)`` builds it), in this order. Every call has a no-op default: a method subclasses this
    and overrides what it needs (DyLoRA's sampled ranks, Delta-LoRA's base update, the sparse
    masks of ``sparse`` and RoSA).

    1. ``calibrate(loss_of, batches)``: once, before the optimizer exists, on a fresh run only
       (a resumed run gets ``load_state_dict`` instead): choose masks, create the parameters to
       train. ``batches(n)`` yields n training batches on the device from their own seeded stream
       (the training stream and its randomness are left as they are); ``loss_of(batch)`` is the
       task loss of one.
    2. ``before_step(step)``: before the micro-batches of optimizer step ``step`` (0-based).
    3. ``after_step(step, optimizer)``: after ``optimizer.step()``, before ``zero_grad``.
    4. ``state_dict()`` / ``load_state_dict(state)``: whatever a resumed run needs that the
       trainable parameters do not hold (masks, updated base weights); saved with every
       checkpoint and the adapter, restored before the optimizer is built. ``None``: nothing.
    5. ``final(evaluate) -> dict``: extra fields of the result record, after the final
       evaluation; ``evaluate(split)`` gives that split's metrics of the model as it is.

    A method that allocates ranks itself (SoRA's gates, IncreLoRA's growth) also gets the run's
    T once before the loop (``start(total_steps)``, fresh and resumed runs alike), and reports
    through ``allocation(step)`` (a ``ranks.jsonl`` row when its ranks changed at that step; step
    0: the initial ones) and ``kept()`` (``{"ranks", "kept_params"}`` now: the record's
    ``ranks`` and ``adapter_params_final``).
    """

    def calibrate(
        self, loss_of: Callable[[dict], torch.Tensor], batches: Callable[[int], Iterator[dict]]
    ) -> None:
        return None

    def before_step(self, step: int) -> None:
        return None

    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        return None

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None:
        return None

    def final(self, evaluate: Callable[[str], dict]) -> dict:
        return {}

    def start(self, total_steps: int) -> None:
        return None

    def allocation(self, step: int) -> dict | None:
        return None

    def kept(self) -> dict | None:
        return None


# ---------------------------------------------------------------- shared by the rank-moving methods' hooks
def restore_ranks(method: str, layers: list, ranks: list[int]) -> None:
    """Set each layer's ``active`` rank from a checkpoint's hook state (IncreLoRA, GeoLoRA); the
    state must hold one rank per adapted matrix of this model."""
    if len(ranks) != len(layers):
        raise ValueError(f"{method} state holds {len(ranks)} matrices, this model adapts {len(layers)}")
    for layer, r in zip(layers, ranks):
        layer.active = int(r)


def kept_with_cut(kept: dict, target_params: int | None, cut: int | None) -> dict:
    """The record's method entry of a method with a final cut to ``target_params`` (SoRA, GeoLoRA):
    the kept parameters and ranks, and with a target the target and the components the cut
    removed (0 when none was needed)."""
    out = {"kept_params": kept["kept_params"], "ranks": kept["ranks"]}
    if target_params is not None:
        out.update(target_params=target_params, cut=cut or 0)
    return out
