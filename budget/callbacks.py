"""AdaLoRA for users who bring their own HuggingFace ``Trainer``: one callback, no custom loop.

    layers, callback = add_adalora(model, {"init_r": 12, "target_r": 8})
    optimizer = adalora_optimizer(model, callback.cfg, lr=5e-4)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback],
                      optimizers=(optimizer, None))
    trainer.train()  # or trainer.train(resume_from_checkpoint=True) after an interruption
    export_peft_adapter(model, layers, "adapter", base_model_name_or_path=model.name_or_path)

Invariants: λ trains at ``lr x method.lambda_lr_ratio`` in an AdamW group of its own
(``adalora_optimizer``: ``adalora.param_groups``, as the training loop builds them), and the
callback refuses to train at ``on_train_begin`` when the optimizer does not keep that ratio. The
orthogonal penalty is added at ``on_step_begin`` (before the clip), allocation runs at
``on_optimizer_step``. Every Trainer checkpoint gets a peft adapter at the current rank pattern
(``checkpoint-N/adabudget-adapter/``) and the allocator's state (``checkpoint-N/adabudget-allocator.pt``),
from which ``trainer.train(resume_from_checkpoint=...)`` continues the allocation as if uninterrupted.
This module never imports the training loop: the callback needs only the method, the allocator and
the peft writer. Where each piece runs in a Trainer step: docs/run-record.md#bringing-your-own-hf-trainer.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path

import torch
from adabudget.allocator import RankAllocator
from adabudget.config import ConfigError
from adabudget.export import export_peft_adapter
from adabudget.methods import method_config_from_dict
from adabudget.methods.adalora import AdaLoRAConfig, SVDLinear, apply, orth_penalty, param_groups
from adabudget.modules import freeze_backbone
from torch import nn
from transformers import TrainerCallback

ADAPTER_DIR = "adabudget-adapter"  # checkpoint-N/adabudget-adapter/: peft.PeftModel.from_pretrained loads it
ALLOCATOR_FILE = "adabudget-allocator.pt"  # checkpoint-N/adabudget-allocator.pt: what a resume restores
# peft's task type from the HF model class (its name's suffix); another class gets task_type None.
PEFT_TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForCausalLM": "CAUSAL_LM",
}


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

    Checkpoints. At ``on_save`` (the Trainer has just written ``checkpoint-N/``) the callback
    adds ``adabudget-adapter/``, a peft LoRA adapter of the model as it is at step N (the
    ``rank_pattern`` of the live triplets, the head as ``modules_to_save``; written by
    ``adabudget.export.export_peft_adapter``, as ``adabudget train`` writes ``adapter/``), and
    ``adabudget-allocator.pt``: the allocator's ``state_dict`` (Ī, Ū, mask, fixed, physical
    ranks), the allocation history, T, the config and λ of every layer. Only the process that
    saves (``args.should_save``) writes.

    Resume. ``trainer.train(resume_from_checkpoint=...)`` first loads the checkpoint's weights
    into the model: a load pre-hook on every ``SVDLinear`` gives the layer the rank its saved
    factors have (a checkpoint written after a shrink holds smaller P, λ, Q) and, when the
    Trainer was given an optimizer, swaps the new parameters into it (a factor emptied to rank
    0 leaves it, as at the shrink), so the optimizer state that the Trainer loads next fits.
    ``on_train_begin`` then finds ``adabudget-allocator.pt`` of step ``state.global_step``
    (under ``resume_from``, ``args.resume_from_checkpoint`` or
    ``args.output_dir/checkpoint-N``, the first whose saved λ equal the model's), checks that
    the config and T are those it was saved with, and restores the allocator and ``history``.
    With the Trainer's own seeded data order and RNG state the resumed run's allocations
    equal an uninterrupted run's (tests/test_trainer_checkpoint.py).

    Not supported: DeepSpeed and FSDP (they own the parameters, the backward, the step and
    the checkpoint format). Under DDP (``args.world_size > 1`` or an initialised
    ``torch.distributed``), shrinking would replace parameters that DDP has already put in
    its gradient buckets, so ``on_train_begin`` refuses any ``shrink`` but ``"never"``
    (masking still prunes; the scores are all-reduced, so every rank keeps the same masks).

    Args:
        layers: {module name: SVDLinear}, as returned by ``apply_method`` / ``add_adalora``.
        cfg: the AdaLoRA config.
        total_steps: T in optimizer steps; None takes the Trainer's ``state.max_steps``
            (recommended: it already accounts for epochs, batch size, accumulation and devices).
        save_adapter: write ``adabudget-adapter/`` into every checkpoint (the allocator's
            state is always written).
        task_type: peft's task type for the checkpoints' adapters; None infers it from the
            model's class (``...ForSequenceClassification`` -> ``SEQ_CLS``, ``...ForCausalLM``
            -> ``CAUSAL_LM``, token classification, question answering; else none).
        resume_from: the checkpoint folder to restore the allocator from, when it lies outside
            ``args.output_dir`` (None: found as the Trainer's own checkpoint of the resumed step).
    """

    def __init__(
        self,
        layers: dict[str, SVDLinear],
        cfg: AdaLoRAConfig,
        total_steps: int | None = None,
        save_adapter: bool = True,
        task_type: str | None = None,
        resume_from: str | os.PathLike | None = None,
    ):
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
        self.save_adapter = save_adapter
        self.task_type = task_type
        self.resume_from = resume_from
        self._optimizer = None  # the optimizer given to the Trainer (None: the Trainer builds one)
        for lay in layers.values():
            lay.register_load_state_dict_pre_hook(self._take_saved_rank)

    # ---------------------------------------------------------------- events
    def on_init_end(self, args, state, control, optimizer=None, **kwargs):
        self._optimizer = optimizer

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
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
        if state.global_step > 0:
            self._restore(args, state)
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
            # a module pruned to rank 0 has left the optimizer (its factors are empty)
            missing = [n for n, lay in self.layers.items() if lay.rank and id(lay.lam) not in in_optimizer]
            if missing:
                raise RuntimeError(
                    f"AdaBudgetCallback: the optimizer does not hold the AdaLoRA factors of {missing[:3]} "
                    f"({len(missing)} modules): build the optimizer after add_adalora / apply_method (and "
                    "give it to the Trainer's constructor, so that a resumed load can swap shrunk factors in)"
                )
            self._check_lambda_lr(optimizer)
        if self.save_adapter and self.task_type is None and model is not None:
            name = type(model).__name__
            self.task_type = next((t for s, t in PEFT_TASK_TYPES.items() if name.endswith(s)), None)

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

    def on_save(self, args, state, control, model=None, **kwargs):
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            raise RuntimeError(
                f"AdaBudgetCallback: the Trainer saved step {state.global_step} but {folder} does not exist "
                "(a hyperparameter search's run folder?); the adapter and allocator state have nowhere to go"
            )
        tmp = folder / f"{ALLOCATOR_FILE}.tmp"
        torch.save(self._saved_state(state), tmp)
        os.replace(tmp, folder / ALLOCATOR_FILE)  # a checkpoint never holds half a state
        if not self.save_adapter:
            return
        if all(lay.rank == 0 or not lay.lam.count_nonzero() for lay in self.layers.values()):
            warnings.warn(
                f"AdaBudgetCallback: {folder.name}: no {ADAPTER_DIR}/ written: every λ is 0, so ΔW = 0 "
                "and the base model is the adapted one (peft cannot load a rank-0 adapter)",
                stacklevel=2,
            )
            return
        base = getattr(model, "name_or_path", None) or ""
        try:
            export_peft_adapter(model, self.layers, folder / ADAPTER_DIR, base, self.task_type)
        except ValueError as err:
            raise RuntimeError(
                f"AdaBudgetCallback: {folder.name}: the model cannot be written as a peft adapter ({err}); "
                "pass add_adalora(..., save_adapter=False) to checkpoint the allocator state only"
            ) from err

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

    # ---------------------------------------------------------------- checkpoints
    def _saved_state(self, state) -> dict:
        """What ``adabudget-allocator.pt`` holds: enough to continue the allocation at step N."""
        return {
            "step": state.global_step,
            "total_steps": self.allocator.total_steps,
            "config": dataclasses.asdict(self.cfg),
            "allocator": self.allocator.state_dict(),
            "history": self.history,
            # λ at step N identifies the checkpoint: the resumed model's λ must equal them
            "lam": {n: lay.lam.detach().cpu().clone() for n, lay in self.layers.items()},
        }

    @torch.no_grad()
    def _take_saved_rank(self, layer, state_dict, prefix, *args) -> None:
        """``load_state_dict`` pre-hook: give ``layer`` the rank of the factors being loaded.

        New P, λ, Q of the saved shapes (the load fills them); in the Trainer's optimizer, when
        it was given one, the new parameters take the old ones' places and an emptied factor
        leaves, as ``replace_param`` does at a shrink, so the checkpoint's optimizer state fits.
        """
        saved = state_dict.get(prefix + "lam")
        if saved is None or saved.shape == layer.lam.shape:
            return
        rank = saved.shape[0]
        for name, dim in (("P", 1), ("lam", 0), ("Q", 0)):
            old = getattr(layer, name)
            shape = list(old.shape)
            shape[dim] = rank  # P (out, r), λ (r,), Q (r, in)
            trainable = rank > 0 and (old.requires_grad or old.numel() == 0)
            new = nn.Parameter(old.new_zeros(shape), requires_grad=trainable)
            setattr(layer, name, new)
            if self._optimizer is not None:
                _swap_param(self._optimizer, old, new)

    def _restore(self, args, state) -> None:
        """Restore the allocator and history saved with the checkpoint of ``state.global_step``."""
        step = state.global_step
        explicit = [Path(self.resume_from)] if self.resume_from is not None else []
        found = [Path(args.resume_from_checkpoint)] if isinstance(args.resume_from_checkpoint, str) else []
        candidates = explicit + found + [Path(args.output_dir) / f"checkpoint-{step}"]
        tried = []
        for folder in dict.fromkeys(candidates):
            path = folder / ALLOCATOR_FILE
            if not path.is_file():
                tried.append(f"{path} (missing)")
                continue
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["step"] != step:
                tried.append(f"{path} (step {saved['step']})")
                continue
            if not self._same_lam(saved["lam"]):
                tried.append(f"{path} (its λ differ from the loaded model's: another run's checkpoint)")
                continue
            self._load_saved(saved, path)
            return
        raise RuntimeError(
            f"AdaBudgetCallback: the Trainer resumes at step {step} but no allocator state of that "
            f"checkpoint was found: tried {'; '.join(tried)}. Checkpoints written with this callback hold "
            f"{ALLOCATOR_FILE}; to resume one from elsewhere: add_adalora(..., resume_from=<its folder>)"
        )

    def _same_lam(self, saved: dict[str, torch.Tensor]) -> bool:
        if set(saved) != set(self.layers):
            return False
        return all(torch.equal(saved[n], lay.lam.detach().cpu()) for n, lay in self.layers.items())

    def _load_saved(self, saved: dict, path: Path) -> None:
        now = dataclasses.asdict(self.cfg)
        changed = [k for k in now if saved["config"].get(k) != now[k]]
        if changed:
            k = changed[0]
            raise ConfigError(
                f"method.{k}={now[k]!r}: {path} was trained with {k}={saved['config'].get(k)!r} "
                f"(changed: {', '.join(changed)}); resume with the AdaLoRA config it was saved with"
            )
        if saved["total_steps"] != self.allocator.total_steps:
            raise ConfigError(
                f"total_steps: {path} was scheduled over T={saved['total_steps']} optimizer steps and this "
                f"run has T={self.allocator.total_steps}; keep num_train_epochs / max_steps, batch size and "
                "gradient accumulation as they were (b(t) depends on T)"
            )
        ranks = saved["allocator"]["ranks"]
        if ranks != self.allocator.physical_ranks():
            raise RuntimeError(
                f"AdaBudgetCallback: the model's AdaLoRA ranks {self.allocator.physical_ranks()} are not "
                f"those of {path} ({ranks}): the Trainer did not load that checkpoint's weights"
            )
        self.allocator.load_state_dict(saved["allocator"])
        self.history = list(saved["history"])

    # ---------------------------------------------------------------- helpers
    def _check_lambda_lr(self, optimizer) -> None:
        """λ's group must train at ``lambda_lr_ratio`` x the learning rate of P's group."""
        ratio = self.cfg.lambda_lr_ratio
        for name, lay in self.layers.items():
            if lay.rank == 0:
                continue  # pruned away: its factors left the optimizer
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


def _swap_param(optimizer, old: nn.Parameter, new: nn.Parameter) -> None:
    """Put ``new`` where ``old`` is in ``optimizer``'s groups (dropped if it takes no gradient); its
    state goes (a resume loads the checkpoint's next)."""
    for group in optimizer.param_groups:
        group["params"] = [
            new if p is old else p for p in group["params"] if p is not old or new.requires_grad
        ]
    optimizer.state.pop(old, None)


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
    model: nn.Module, cfg: AdaLoRAConfig | dict, total_steps: int | None = None, **callback_options
) -> tuple[dict[str, SVDLinear], AdaBudgetCallback]:
    """Freeze the backbone (task head stays trainable), wrap the targets in AdaLoRA, return the callback.

    Args:
        model: a HF model; changed in place.
        cfg: an ``AdaLoRAConfig`` or a dict of its knobs (``{"init_r": 12, "target_r": 8}``).
        total_steps: T in optimizer steps; None (recommended) takes the Trainer's max_steps.
        **callback_options: ``save_adapter``, ``task_type``, ``resume_from`` of ``AdaBudgetCallback``.

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
    return layers, AdaBudgetCallback(layers, cfg, total_steps, **callback_options)
