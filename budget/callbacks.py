"""AdaLoRA for users who bring their own HuggingFace ``Trainer``: one callback, no custom loop.

    layers, callback = add_adalora(model, {"init_r": 12, "target_r": 8})
    optimizer = adalora_optimizer(model, callback.cfg, lr=5e-4)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback],
                      optimizers=(optimizer, None))
    trainer.train()

Invariants: λ trains at ``lr x method.lambda_lr_ratio`` in an AdamW group of its own
(``adalora_optimizer``: ``adalora.param_groups``, as the training loop builds them), and the
callback refuses to train at ``on_train_begin`` when the optimizer does not keep that ratio. The
orthogonal penalty is added at ``on_step_begin`` (before the clip), allocation runs at
``on_optimizer_step``. This module never imports the training loop: the callback needs only the
method and the allocator. Where each piece runs in a Trainer step:
docs/run-record.md#bringing-your-own-hf-trainer.
"""

from __future__ import annotations

import math
import warnings

import torch
from adabudget.allocator import RankAllocator
from adabudget.config import ConfigError
from adabudget.methods import method_config_from_dict
from adabudget.methods.adalora import AdaLoRAConfig, SVDLinear, apply, orth_penalty, param_groups
from adabudget.modules import freeze_backbone
from torch import nn
from transformers import TrainerCallback


class AdaBudgetCallback(TrainerCallback):
    """Runs AdaLoRA's orthogonal penalty, rank allocation and shrinking inside ``Trainer.train()``.

    Orthogonal penalty (eq. 4). At ``on_step_begin`` (once per optimizer step, before the first
    micro-batch, on gradients that ``zero_grad`` has just cleared) the callback back-propagates
    ``γ R(P, Q)`` on its own. P and Q do not change between the micro-batches of one step and R
    does not depend on the data, so the accumulated gradient at the clip is
    ``∇(task loss of the step) + γ ∇R``: exactly the gradient of
    ``loss = task_loss + γ R`` (the Trainer divides each micro-batch loss by the accumulation
    steps, or by the step's token count, so the task part is the step's mean; γR is added
    once), and clipping acts on the sum as it would on that loss. Only the summation order of
    the floating-point accumulation differs. Hooking ``on_pre_optimizer_step`` instead would
    add γ∇R after the clip. What is *not* the same: the Trainer's logged ``loss`` is the task
    loss alone (R is not in it). The penalty does not depend on the model returning a loss,
    unlike peft, which adds it inside ``forward`` and silently skips it when ``outputs.loss``
    is None (peft#432). Under fp16 the term is scaled by the accelerated optimizer's
    ``GradScaler`` as the Trainer scales its own loss.

    Allocation. At ``on_optimizer_step`` (after ``optimizer.step()``, before ``zero_grad``,
    gradients still there) the allocator folds this step's sensitivities into its EMAs and,
    every ΔT steps after t_i, keeps the best b(t) triplets. ``state.global_step`` is
    incremented only after this event, so the optimizer steps done are ``global_step + 1``.
    Steps that a fp16 ``GradScaler`` skipped (inf gradients) are not scored. At the final
    allocation (``shrink="final"``) the pruned triplets are removed from the layers and the
    Trainer's optimizer state (AdamW moments sliced alike), and training goes on at the final
    ranks.

    Every allocation is appended to ``history`` (``Allocation.to_record()``) and to
    ``state.log_history`` (saved in ``trainer_state.json``) as ``adalora/budget``,
    ``adalora/kept`` and ``adalora/kept_params``.

    Failing loudly: a config whose phases do not fit T raises ``ConfigError`` at construction
    (``total_steps`` given) or at ``on_train_begin``; a run in which no allocation can run
    before ``state.max_steps`` raises at ``on_train_begin``, and one that ended before its
    first allocation (early stopping) at ``on_train_end`` (peft's silent failure #1327,
    #1801). Adapter factors missing from the optimizer fail at ``on_train_begin``.

    The optimizer must train λ at ``lambda_lr_ratio`` times the learning rate of P and Q
    (``adalora_optimizer`` builds it); ``on_train_begin`` raises ``ConfigError`` naming
    ``method.lambda_lr_ratio`` when it does not.

    Not supported: resuming from a Trainer checkpoint (the allocator state and the shrunk
    shapes are not in it; the callback raises), DeepSpeed and FSDP (they own the parameters,
    the backward and the step). Under DDP (``args.world_size > 1`` or an initialised
    ``torch.distributed``), shrinking would replace parameters that DDP has already put in
    its gradient buckets, so ``on_train_begin`` refuses any ``shrink`` but ``"never"``
    (masking still prunes; the scores are all-reduced, so every rank keeps the same masks).

    Args:
        layers: {module name: SVDLinear}, as returned by ``apply_method`` / ``add_adalora``.
        cfg: the AdaLoRA config.
        total_steps: T in optimizer steps; None takes the Trainer's ``state.max_steps``
            (recommended: it already accounts for epochs, batch size, accumulation and devices).
    """

    def __init__(self, layers: dict[str, SVDLinear], cfg: AdaLoRAConfig, total_steps: int | None = None):
        if not layers or not all(isinstance(m, SVDLinear) for m in layers.values()):
            raise ConfigError(
                "method.name: AdaBudgetCallback needs the SVDLinear layers that AdaLoRA wrapped"
            )
        cfg.validate()
        self.layers = layers
        self.cfg = cfg
        self.total_steps = total_steps
        if total_steps is not None:
            RankAllocator(layers, cfg, total_steps)  # fail on the user's line, not inside train()
        self.allocator: RankAllocator | None = None
        self.history: list[dict] = []

    # ---------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step > 0:
            raise RuntimeError(
                f"AdaBudgetCallback: resuming at step {state.global_step} is not supported: the Trainer "
                "checkpoint holds neither the allocator's importance state nor the rank pattern; train "
                "from scratch"
            )
        total = self.total_steps if self.total_steps is not None else state.max_steps
        if self.total_steps is not None and self.total_steps != state.max_steps:
            warnings.warn(
                f"AdaBudgetCallback: total_steps={self.total_steps} but the Trainer will run "
                f"state.max_steps={state.max_steps} optimizer steps; the budget schedule follows "
                "total_steps (pass total_steps=None to use the Trainer's count)",
                stacklevel=2,
            )
        # Built here, not in __init__: the Trainer has moved the model to its device by now.
        self.allocator = RankAllocator(self.layers, self.cfg, total)
        self.history = []
        if self._first_allocation() > state.max_steps:
            raise RuntimeError(self._no_allocation_message(state, planned=True))
        if self.cfg.shrink != "never" and _distributed(args):
            raise ConfigError(
                f"method.shrink={self.cfg.shrink}: the Trainer runs distributed (world_size="
                f"{args.world_size}), and a physical shrink would replace parameters that DDP has bucketed; "
                'use AdaLoRAConfig(shrink="never") (masking still prunes the same triplets)'
            )
        if optimizer is not None:
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [n for n, lay in self.layers.items() if id(lay.lam) not in in_optimizer]
            if missing:
                raise RuntimeError(
                    f"AdaBudgetCallback: the optimizer does not hold the AdaLoRA factors of {missing[:3]} "
                    f"({len(missing)} modules): build the optimizer after add_adalora / apply_method"
                )
            self._check_lambda_lr(optimizer)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        gamma = self.cfg.orth_reg_weight
        if gamma == 0:
            return
        with torch.enable_grad():
            penalty = gamma * orth_penalty(list(self.layers.values()), self.cfg.orth_squared)
            if not penalty.requires_grad:  # every module pruned to rank 0
                return
            scaler = getattr(optimizer, "scaler", None)  # accelerate's fp16 GradScaler, else None
            (scaler.scale(penalty) if scaler is not None else penalty).backward()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if getattr(optimizer, "step_was_skipped", False):
            return  # fp16 overflow: inf gradients must not enter the importance EMAs
        step = state.global_step + 1  # optimizer steps done; global_step moves after this event
        allocation = self.allocator.update_and_allocate(step)
        if allocation is None:
            return
        if allocation.shrink:
            # accelerate's AcceleratedOptimizer delegates to the torch optimizer it wraps.
            self.allocator.shrink_(getattr(optimizer, "optimizer", optimizer))
        self.history.append(allocation.to_record())
        state.log_history.append(
            {
                "adalora/budget": allocation.budget,
                "adalora/kept": allocation.kept,
                "adalora/kept_params": allocation.kept_params,
                "step": step,
            }
        )

    def on_train_end(self, args, state, control, **kwargs):
        if self.allocator is None:
            return
        if not self.history:
            raise RuntimeError(self._no_allocation_message(state, planned=False))
        if not self.allocator.fixed:
            warnings.warn(
                f"AdaBudgetCallback: training ended at step {state.global_step}, before the final allocation "
                f"at T - t_f = {self.allocator.final_step}: the ranks follow the last intermediate budget "
                f"{self.history[-1]['budget']}, not b(T) = {self.allocator.target_budget}",
                stacklevel=2,
            )

    # ---------------------------------------------------------------- helpers
    def _check_lambda_lr(self, optimizer) -> None:
        """λ's group must train at ``lambda_lr_ratio`` x the learning rate of P's group."""
        ratio = self.cfg.lambda_lr_ratio
        for name, lay in self.layers.items():
            lr_p, lr_lam = _base_lr(optimizer, lay.P), _base_lr(optimizer, lay.lam)
            if math.isclose(lr_lam, ratio * lr_p, rel_tol=1e-6):
                continue
            raise ConfigError(
                f"method.lambda_lr_ratio={ratio:g}: the optimizer trains λ of {name} at lr {lr_lam:g} and "
                f"its P at {lr_p:g} (ratio {lr_lam / lr_p if lr_p else float('inf'):g}), so AdaLoRA would "
                "train at a different speed than in budget's own loop. Build the optimizer with "
                "adabudget.callbacks.adalora_optimizer(model, cfg, lr) and pass "
                "Trainer(optimizers=(optimizer, None)), or set lambda_lr_ratio=1 to keep the Trainer's "
                "single learning rate (AdaLoRA then needs a larger one)"
            )

    def _first_allocation(self) -> int:
        """The first step at which ``update_and_allocate`` allocates: after t_i on the ΔT grid, or T - t_f."""
        a = self.allocator
        interval = self.cfg.mask_interval
        return min((a.warmup_steps // interval + 1) * interval, a.final_step)

    def _no_allocation_message(self, state, planned: bool) -> str:
        a = self.allocator
        steps = state.max_steps if planned else state.global_step
        head = (
            f"AdaBudgetCallback: no rank allocation {'can run' if planned else 'ran'} in {steps} optimizer "
            f"steps: the first one is due at step {self._first_allocation()} (T={a.total_steps}, "
            f"t_i={a.warmup_steps}, t_f={a.final_steps}, ΔT={self.cfg.mask_interval}), so every matrix would "
            f"keep rank init_r={self.cfg.init_r} and b(T)={a.target_budget} would never apply (the silent "
            "failure of peft#1327/#1801). "
        )
        if a.total_steps > state.max_steps:
            cause = (
                f"Cause: total_steps={a.total_steps} exceeds the Trainer's max_steps={state.max_steps}; it "
                "must count optimizer steps (batches / gradient_accumulation_steps x epochs), not samples or "
                "micro-batches. Fix: pass total_steps=None to use the Trainer's max_steps."
            )
        else:
            cause = (
                f"Cause: training stopped early at step {state.global_step} (early stopping or "
                "control.should_training_stop). Fix: lower method.warmup_steps (t_i) or train longer."
            )
        return head + cause


def _base_lr(optimizer, param: nn.Parameter) -> float:
    """The scheduler-free learning rate of ``param``'s group (``initial_lr`` once a scheduler
    wraps the optimizer: a warm-up starts every group's ``lr`` at 0)."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group.get("initial_lr", group["lr"])
    raise KeyError("parameter not in the optimizer")


def _distributed(args) -> bool:
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    return getattr(args, "world_size", 1) > 1 or initialised


def adalora_optimizer(
    model: nn.Module, cfg: AdaLoRAConfig | dict, lr: float, weight_decay: float = 0.0, **adamw_kwargs
) -> torch.optim.AdamW:
    """torch AdamW over the trainable parameters with λ in its own group, as ``adabudget.training`` builds it.

    Groups: every trainable parameter but λ at ``lr``; the λ of every ``SVDLinear`` at
    ``lr x cfg.lambda_lr_ratio``. Pass it as ``Trainer(optimizers=(optimizer, None))``: the
    Trainer then builds its scheduler over it, which scales both groups alike (with
    ``lambda_lr_ratio=64`` and lr 5e-4, λ trains at 3.2e-2 at the peak of the schedule and
    both decay to 0 together under ``lr_scheduler_type="linear"``).

    Args:
        model: the model after ``add_adalora`` (or ``apply_method``).
        cfg: its AdaLoRA config, or a dict of knobs (only ``lambda_lr_ratio`` is read).
        lr: the peak learning rate of everything but λ; use the Trainer's ``learning_rate``.
        weight_decay: AdamW weight decay of every group (``adabudget.training`` uses ``train.weight_decay``
            for all of them; unlike the Trainer's own optimizer, biases are not exempt).
        **adamw_kwargs: further ``torch.optim.AdamW`` arguments (``betas``, ``eps``, ``fused``).

    Returns:
        The optimizer, groups ``[rest, λ]``.
    """
    if isinstance(cfg, dict):
        cfg = method_config_from_dict({"name": "adalora", **cfg})
    if not any(isinstance(m, SVDLinear) for m in model.modules()):
        raise ConfigError("method.name: adalora_optimizer found no AdaLoRA layer; call add_adalora first")
    return torch.optim.AdamW(param_groups(model, cfg, lr), lr=lr, weight_decay=weight_decay, **adamw_kwargs)


def add_adalora(
    model: nn.Module, cfg: AdaLoRAConfig | dict, total_steps: int | None = None
) -> tuple[dict[str, SVDLinear], AdaBudgetCallback]:
    """Freeze the backbone (task head stays trainable), wrap the targets in AdaLoRA, return the callback.

    Args:
        model: a HF model; changed in place.
        cfg: an ``AdaLoRAConfig`` or a dict of its knobs (``{"init_r": 12, "target_r": 8}``).
        total_steps: T in optimizer steps; None (recommended) takes the Trainer's max_steps.

    Returns:
        ({module name: SVDLinear}, the callback to pass as ``Trainer(callbacks=[...])``).
    """
    if isinstance(cfg, dict):
        cfg = method_config_from_dict({"name": "adalora", **cfg})
    if not isinstance(cfg, AdaLoRAConfig):
        raise ConfigError(f"method.name={getattr(cfg, 'name', cfg)!r}: add_adalora needs an AdaLoRA config")
    cfg.validate()
    freeze_backbone(model, train_head=True)  # before wrapping: the new factors must stay trainable
    layers = apply(model, cfg)
    return layers, AdaBudgetCallback(layers, cfg, total_steps)
