"""The training loop: one function, ``train(cfg, on_eval=None) -> dict``, for the CLI, tests and search.

Read it top to bottom: set-up (validate, data, model, plan and method, allocator, run folder,
optimizer), then one ``while`` loop over optimizer steps, then the final phase (checkpoint at T,
final evaluation, the methods' final hooks, export) under the same signal handler and ``try``.
Every loss term is visible in the loop; hooks are plain ``if``s. Under ``torchrun`` the same
code runs on every rank (``adabudget.ddp``): batches are sharded, rank 0 writes.

A run stops early, with a complete record, when ``on_eval(step, metrics)`` says so (status
``pruned``: a search pruner), on Ctrl-C, SIGTERM, SIGHUP or SIGUSR1 (``interrupted``, after a
checkpoint, with the command that resumes it; in the final phase the checkpoint at T stands and
a resume runs that phase alone) or on non-finite weights or loss (``failed``, before any
checkpoint or allocation keeps them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import random
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from adabudget import ddp
from adabudget.arch import arch_of
from adabudget.checkpoint import has_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from adabudget.compose import resolve
from adabudget.config import ConfigError, RunConfig, to_dict, validate
from adabudget.data import TaskData, load_task, load_tokenizer, make_batches, num_batches
from adabudget.hub import prepare_hub_access
from adabudget.log import RunRecord, claim_run_dir, environment, log, release_run_dir
from adabudget.methods import (
    REGISTRY,
    adalora_config_of,
    apply_plan,
    call_hooks,
    load_hook_states,
    methods_in,
    plan_of,
    step_hooks,
)
from adabudget.metrics import compute_metrics, primary_metric
from adabudget.models import load_model, pick_device
from adabudget.modules import count_params, freeze_backbone
from adabudget.preflight import check_against_model
from torch import nn

# What may change when a run is resumed: more steps (T; the LR and budget schedules are
# recomputed for the new T from the checkpoint's step on), how it is logged, evaluated,
# checkpointed and exported, and where it runs. Everything else is the run.
RESUMABLE = (
    "train.max_steps",
    "train.epochs",
    "train.stop_after_step",
    "train.progress",
    "train.num_threads",
    "train.device",
    "train.eval_batch_size",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint",
    "train.checkpoint_minutes",
    "train.checkpoint_every",
    "logger",
    "export_adapter",
    "export_merged",
    "meta",
)
OnEval = Callable[[int, dict], object]


def total_steps_for(run: RunConfig, n_train: int) -> int:
    """T in optimizer steps: ``train.max_steps``, or epochs x batches / grad_accum."""
    if run.train.max_steps:
        return run.train.max_steps
    return max(
        1, math.ceil(run.train.epochs * num_batches(n_train, run.train.batch_size) / run.train.grad_accum)
    )


def check_schedule(method, total_steps: int) -> None:
    """The AdaLoRA phases must leave a budgeting phase (peft#2337 crashes instead); a method
    config with ``validate_steps(T)`` checks its own step schedule (RoSA's warm-up)."""
    from adabudget.schedule import phase_steps

    ada = adalora_config_of(method)
    if ada is not None:
        phase_steps(ada.warmup_steps, ada.final_steps, total_steps)
    if callable(getattr(method, "validate_steps", None)):
        method.validate_steps(total_steps)


def check_exports(run: RunConfig) -> None:
    """A merged checkpoint needs every method of the run to merge: fail before training."""
    if not run.export_merged:
        return
    unmergeable = [
        m for m in methods_in(run.method) if m in REGISTRY and REGISTRY[m].merge is None and m != "full"
    ]
    if unmergeable:
        mergeable = sorted(m for m, spec in REGISTRY.items() if spec.merge is not None) + ["full"]
        raise ConfigError(
            f"export_merged=true: {', '.join(unmergeable)} cannot merge into the base weights (these can: "
            f"{', '.join(mergeable)}); set export_merged=false (adapter/ holds the modules)"
        )


def check_positions(run: RunConfig, model, plan) -> None:
    """Soft prompt + the longest tokenized example must fit an absolute position table."""
    from adabudget.methods.prompt import position_limit

    limit = position_limit(model.config)
    for p in (c for g in plan.groups for name, c in g.methods.items() if name == "prompt"):
        if limit is not None and run.data.max_length + p.length > limit:
            raise ConfigError(
                f"method.length={p.length}: with data.max_length={run.data.max_length} the prompted input "
                f"needs {run.data.max_length + p.length} positions, the model has {limit}; lower one of them"
            )


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout probability of the backbone: nn.Dropout modules and LLaMA's float attribute."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = p


def group_ranks(ranks: dict[str, int], modules: list[dict], groups: list[dict] | None) -> dict:
    """Kept AdaLoRA rank per layer group (hybrids: which group the budget flows to)."""
    if not groups or len(groups) < 2:
        return {}
    group_of = {m["name"]: m["group"] for m in modules}
    totals = [0] * len(groups)
    for name, r in ranks.items():
        totals[group_of[name]] += r
    return {"group_ranks": totals}


def module_table(wrapped: dict, arch, plan) -> list[dict]:
    """The record's ``modules`` table: every rank-carrying module with its block, matrix role,
    layer group and initial rank, so analysis can place ranks without importing budget."""
    from adabudget.modules import block_index

    roles = {}
    if arch is not None:
        roles = {name: spec.role for name, spec in arch.match_linears([".*"])}
    from adabudget.methods.adalora import SVDLinear
    from adabudget.methods.lora import LoRALinear

    rows = []
    for name, m in wrapped.items():
        if isinstance(m, SVDLinear):
            rank = m.r_initial
        elif isinstance(m, LoRALinear):
            rank = m.rank
        elif isinstance(getattr(m, "r", None), dict) and "default" in m.r:  # peft's layers: r[adapter]
            rank = m.r["default"]
        else:
            continue
        layer = block_index(name)
        group = next((g.index for g in plan.groups if g.layers is not None and layer in g.layers), 0)
        rows.append(
            {
                "name": name,
                "layer": layer,
                "role": roles.get(name, "other"),
                "group": group,
                "init_rank": rank,
            }
        )
    return rows


def make_allocator(model, wrapped: dict, ada, total_steps: int):
    """The allocator of the run's one rank budget (ours, or peft's for peft_adalora), or None.
    Built after the model is on its device: its buffers follow the factors."""
    from adabudget.methods.adalora import SVDLinear

    svd = {name: m for name, m in wrapped.items() if isinstance(m, SVDLinear)}
    if svd:
        from adabudget.allocator import RankAllocator

        return RankAllocator(svd, ada, total_steps)
    if ada is not None and ada.name == "peft_adalora":
        from adabudget.methods.peft_ref import PeftAllocator

        return PeftAllocator(model, ada, total_steps)
    return None


def param_groups(model, method, lr: float) -> list[dict]:
    """AdamW groups: AdaLoRA's λ at ``lr x method.lambda_lr_ratio``, everything else at ``lr``.

    ``method`` is the AdaLoRA config driving the run (``Plan.adalora``), or None.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if getattr(method, "lambda_lr_ratio", None) is None:
        return [{"params": [p for _, p in trainable]}]
    lam = [p for n, p in trainable if n.endswith(".lam")]
    rest = [p for n, p in trainable if not n.endswith(".lam")]
    return [{"params": rest}, {"params": lam, "lr": lr * method.lambda_lr_ratio}]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(
    model,
    examples: list[dict],
    task: TaskData,
    batch_size: int,
    pad_id: int,
    device,
    dist: ddp.Dist | None = None,
) -> dict:
    """Metrics of ``examples``; under DDP each rank scores every world-th example and the
    predictions are gathered, so every rank returns the same numbers."""
    dist = dist or ddp.Dist()
    was_training = model.training
    model.eval()
    inputs = set(inspect.signature(model.forward).parameters)
    preds, labels = [], []
    for batch in make_batches(examples[dist.rank :: dist.world], batch_size, pad_id, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**{k: v for k, v in batch.items() if k != "labels" and k in inputs}).logits
        preds.append(logits.float().cpu())
        labels.append(batch["labels"].cpu())
    model.train(was_training)
    p = torch.cat(preds).numpy() if preds else np.zeros((0,))
    y = torch.cat(labels).numpy() if labels else np.zeros((0,))
    if dist.active:
        parts = ddp.gather((p, y), dist)
        p = np.concatenate([a for a, _ in parts if len(a)])
        y = np.concatenate([b for _, b in parts if len(b)])
    return compute_metrics(p.squeeze(-1) if task.regression else p, y, task.regression)


def batch_stream(examples: list[dict], tc, pad_id: int, inputs: set[str], start_step: int):
    """The training batches from optimizer step ``start_step`` on, endlessly (``tc``: ``TrainConfig``).

    Optimizer step k consumes batches [k * grad_accum, (k+1) * grad_accum) of one endless
    stream of seeded epochs, so a resumed run sees the same batches. Keys the model's forward
    does not take (``inputs``: its parameter names) are dropped.
    """
    batches_per_epoch = num_batches(len(examples), tc.batch_size)
    epoch, skip = divmod(start_step * tc.grad_accum, batches_per_epoch)
    while True:
        for batch in make_batches(examples, tc.batch_size, pad_id, True, tc.seed, epoch, skip):
            yield {k: v for k, v in batch.items() if k in inputs}
        epoch, skip = epoch + 1, 0


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss: KiB on Linux, bytes on macOS; process-wide peak resident memory.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


# ---------------------------------------------------------------- resume
def resumed_config(run: RunConfig) -> RunConfig:
    """The saved config of the run folder ``run.resume``, with the ``RESUMABLE`` knobs of ``run``.

    Any other difference is refused, naming the keys: a resumed run keeps its config. Build
    the config to pass with ``adabudget.compose.resume_config(run_dir, overrides)``.
    """
    from omegaconf import OmegaConf

    run_dir = Path(run.resume)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"resume={run_dir}: not a run folder (no config.yaml); pass a folder under runs/")
    if not has_checkpoint(run_dir / "checkpoints" / "last.pt"):
        raise ConfigError(
            f"resume={run_dir}: no checkpoints/last.pt to continue from (the run was killed before its first "
            "checkpoint, or ran with train.checkpoint=none)"
        )
    saved = resolve(OmegaConf.load(run_dir / "config.yaml"))
    mine, theirs = _flat(to_dict(run)), _flat(to_dict(saved))
    differ = sorted(
        k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k) and k not in ("resume", "run_dir")
    )
    refused = [k for k in differ if not any(k == r or k.startswith(r + ".") for r in RESUMABLE)]
    if refused:
        changes = ", ".join(f"{k} ({theirs.get(k)!r} -> {mine.get(k)!r})" for k in refused[:6])
        raise ConfigError(
            f"resume={run_dir}: a resumed run keeps its config, but {changes} differ from its config.yaml; "
            f"only {', '.join(RESUMABLE)} may change on resume (start a new run for anything else)"
        )
    run.resume, run.run_dir = str(run_dir), str(run_dir)
    return run


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "groups":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


class StopSignals:
    """Ctrl-C, SIGTERM (what schedulers send), SIGHUP (a closed SSH session) and SIGUSR1 (Slurm's
    ``--signal=USR1@90``) ask the loop to stop at the end of the step; a second Ctrl-C stops at
    once. Installed only in the main thread, restored on exit.

    The handler only sets ``received``: the loop logs. A handler that logs can land inside a
    write to the same stream (a tqdm bar, a log line) and CPython then raises a reentrant-write
    error in the middle of training.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------- train
def train(cfg, on_eval: OnEval | None = None) -> dict:
    """Train one configuration end to end; returns the result record (also in result.json).

    Args:
        cfg: a composed config (Hydra/OmegaConf, dict or ``RunConfig``). With ``resume`` set it
            must be the run's saved config, changed only in ``RESUMABLE`` knobs
            (``adabudget.compose.resume_config`` builds it).
        on_eval: called at every dev evaluation with ``(step, metrics)``; a true return stops
            the run with status ``pruned`` (a search pruner's hook; ``budget`` knows no optuna).
    """
    run = resolve(cfg)
    if run.resume:
        run = resumed_config(run)
    validate(run)
    tc = run.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    dist = ddp.init(tc.device)
    device = pick_device(tc.device, dist.local_rank if dist.active else None)

    # 1. data (bad paths, columns and splits fail here, before the model is loaded);
    #    rank 0 fetches and caches first, the others then read the cache
    if not dist.main:
        ddp.barrier(dist)
    prepare_hub_access(run.model.name, run.model.revision)  # offline: the cache, or a clear error, at once
    tokenizer = load_tokenizer(run.model.name, run.model.revision)
    task = load_task(run.data, tokenizer)
    if dist.main:
        ddp.barrier(dist)
    total_steps = total_steps_for(run, len(task.train))  # T
    check_schedule(run.method, total_steps)
    check_exports(run)

    # 2. model, plan and method; the seed fixes the head and factor inits (the same on every rank)
    seed_everything(tc.seed)
    model = load_model(run.model, task.num_labels, task.regression, tokenizer.pad_token_id)
    if run.model.dropout is not None:
        set_dropout(model, run.model.dropout)
    freeze_backbone(model, run.model.train_head)
    try:
        arch = arch_of(model)
    except ConfigError:  # lora / adalora / full with explicit targets work on any model
        arch = None
    plan = plan_of(run.method, arch)  # a hybrid's sizes are solved here, once
    check_positions(run, model, plan)
    check_against_model(run, model, plan)  # target patterns, data.max_length vs the position table
    wrapped = apply_plan(model, plan)
    groups = plan.report(arch) if arch is not None else None
    modules = module_table(wrapped, arch, plan)
    trainable_before, total_params = count_params(model)
    model.to(device)
    allocator = make_allocator(model, wrapped, plan.adalora, total_steps)
    ada = plan.adalora

    # 3. the run folder: a new one claimed by rank 0, or the resumed run's own
    resume_dir = Path(run.resume) if run.resume else None
    ckpt = load_checkpoint(resume_dir / "checkpoints" / "last.pt") if resume_dir else None
    final_only = ckpt is not None and ckpt["step"] >= total_steps  # stopped in its final phase, or completed
    if final_only:
        saved = _saved_result(resume_dir)
        if saved.get("status") == "completed":  # nothing to do: never append a second ending
            ddp.shutdown(dist)
            return {**saved, "note": "already completed; nothing to resume (raise train.max_steps to go on)"}
    if resume_dir is not None:
        run_dir = resume_dir
    else:
        run_dir = ddp.broadcast(
            claim_run_dir(run.runs_root, run.run_name, run.run_dir) if dist.main else None, dist
        )
    checkpoint_path = run_dir / "checkpoints" / "last.pt"
    if ckpt is not None and allocator is not None:
        allocator.load_state_dict(ckpt["allocator"])  # restores shrunk shapes before the optimizer
    # methods acting outside forward/backward (adabudget.methods docstring): restored, or calibrated
    # on their own seeded batches (the training stream and its randomness are left as they are)
    # Tokenizers emit token_type_ids that some models (LLaMA) do not accept.
    try:
        inputs = set(inspect.signature(model.forward).parameters)
        hooks = step_hooks(model, plan, wrapped)
        if ckpt is not None:
            load_hook_states(hooks, ckpt.get("hooks"))
        elif any(hasattr(h, "calibrate") for h in hooks):
            # the training stream's batches under seed + 2: endless seeded epochs, as the loop's own
            calibration = batch_stream(
                task.train, dataclasses.replace(tc, seed=tc.seed + 2), tokenizer.pad_token_id, inputs, 0
            )

            def calibration_batches(n: int):
                for _ in range(n):
                    yield {k: v.to(device) for k, v in next(calibration).items()}

            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(tc.seed + 2)
                call_hooks(hooks, "calibrate", lambda batch: model(**batch).loss, calibration_batches)
    except ConfigError:  # a mask or state a method refuses: the new run folder holds nothing yet
        if resume_dir is None and dist.main:
            release_run_dir(run_dir)
        raise
    if hooks:  # calibration may have created or re-shaped trainable parameters
        trainable_before, total_params = count_params(model)
    main_metric = primary_metric(task.regression)
    header = {
        "run_dir": str(run_dir),
        "run_name": run.run_name,
        "method": run.method.name,
        "model": run.model.name,
        "task": run.data.task,
        "num_labels": task.num_labels,
        "data_version": getattr(task, "version", None),
        "split_sizes": task.sizes(),
        "primary_metric": main_metric,
        "regression": task.regression,
        "total_steps": total_steps,
        "trainable_params": trainable_before,
        "total_params": total_params,
        "world_size": dist.world,
        "groups": groups,
        "modules": modules,
        "meta": run.meta,
    }
    # 4. optimizer: AdamW with linear warm-up and decay over T optimizer steps
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, ada, tc.lr), lr=tc.lr, weight_decay=tc.weight_decay)
    warmup = int(tc.warmup_ratio * total_steps)
    from adabudget.schedule import lr_factor

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps))

    step, best, elapsed_before = 0, {}, 0.0
    if dist.active:  # the same init everywhere, then each rank its own dropout stream
        torch.manual_seed(tc.seed + 7919 * dist.rank)
    if ckpt is not None:
        model.load_state_dict(ckpt["trainable"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, best, elapsed_before = ckpt["step"], ckpt["best"], ckpt.get("elapsed", 0.0)
        rngs = ckpt["rng"]
        set_rng_state(rngs[dist.rank] if len(rngs) == dist.world else rngs[0], device)
    start_time = time.time()
    train_model = _wrap_ddp(model, dist, device)
    pad_id = tokenizer.pad_token_id

    def checkpoint(at_step: int) -> None:
        rngs = ddp.gather(rng_state(device), dist)  # a collective: every rank checkpoints together
        if dist.main and tc.checkpoint != "none":
            save_checkpoint(
                checkpoint_path,
                {
                    "step": at_step,
                    "best": best,
                    "elapsed": elapsed_before + time.time() - start_time,
                    "trainable": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "allocator": allocator.state_dict() if allocator is not None else None,
                    "rng": rngs,
                    "hooks": call_hooks(hooks, "state_dict"),
                    # the open logging window, so a resumed run logs the same mean losses
                    "window": window,
                    "running": torch.stack([running_loss, running_orth]).cpu(),
                },
            )

    def nonfinite(before: str) -> str | None:
        """The error when the weights or the open logging window's loss are not finite on some rank.
        Checked before every checkpoint and allocation (one host sync), so that neither keeps NaN
        weights: the loss itself is looked at only at log steps."""
        finite = torch.stack([p.detach().isfinite().all() for p in params] + [running_loss.isfinite()]).all()
        if not ddp.any_flag([not finite.item()], dist, device)[0]:
            return None
        log.error("non-finite weights or loss at step %d, before %s: stopping", step, before)
        return f"non-finite training loss or weights at step {step} (found before {before})"

    def dev_eval(at_step: int) -> tuple[dict, bool]:
        """Dev metrics, and whether ``on_eval`` asks to stop (rank 0 decides for everyone)."""
        metrics = evaluate(model, task.dev, task, tc.eval_batch_size, pad_id, device, dist)
        if record is not None:
            record.metrics({"step": at_step, "split": "dev", **metrics})
        if not best or metrics[main_metric] > best["dev"][main_metric]:
            best.update({"step": at_step, "dev": metrics})
        stop = bool(on_eval(at_step, metrics)) if (on_eval is not None and dist.main) else False
        return metrics, ddp.broadcast(stop, dist)

    def result(status: str, **extra) -> dict:
        ranks = allocator.ranks() if allocator is not None else None
        out = {
            **header,
            "status": status,
            "steps": step,
            "trainable_params_final": count_params(model)[0],
            "adapter_params_final": kept_params(ranks, wrapped) if ranks is not None else None,
            "ranks": ranks,
            "best": best,
            "wall_time_s": round(elapsed_before + time.time() - start_time, 2),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            **environment(),
            **extra,
        }
        if record is not None:
            record.result(out)
        return out

    # 5. the loop: one iteration = one optimizer step of grad_accum micro-batches
    model.train()
    stream = batch_stream(task.train, tc, pad_id, inputs, step)
    running_loss = torch.zeros((), device=device)
    running_orth = torch.zeros((), device=device)
    window, last_checkpoint = 0, time.time()
    if ckpt is not None and "window" in ckpt:
        window = ckpt["window"]
        running_loss.fill_(ckpt["running"][0].item())
        running_orth.fill_(ckpt["running"][1].item())
    record = None
    if dist.main:  # holds the run folder's lock until closed: a live run is never resumed twice
        record = RunRecord(
            run_dir, to_dict(run), run.logger, ckpt["step"] if ckpt else None, header, final_again=final_only
        )
        if ckpt is None and allocator is not None:  # the allocation before any step: every matrix at init_r
            ranks0 = allocator.ranks()
            record.ranks(
                {
                    "step": 0,
                    "budget": allocator.budget_at(0),
                    "kept": sum(ranks0.values()),
                    "kept_params": kept_params(ranks0, wrapped),
                    "final": False,
                    "ranks": ranks0,
                }
            )
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not (tc.progress and dist.main),
        desc=run.run_name,
        leave=False,
    )
    resume_with = f"adabudget train resume={run_dir}"
    signals = StopSignals()

    def signalled() -> str | None:
        """The stop signal some rank received (every rank agrees), or None."""
        if not ddp.any_flag([signals.received is not None], dist, device)[0]:
            return None
        return signals.received or "a stop signal to another rank"

    try:
        with signals:
            while step < total_steps:
                call_hooks(hooks, "before_step", step)
                for micro in range(tc.grad_accum):
                    batch, weight = ddp.shard(next(stream), dist)  # weight: the shard's share of the batch
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    sync = micro == tc.grad_accum - 1 or not dist.active  # DDP all-reduces on the last one
                    with nullcontext() if sync else train_model.no_sync():
                        task_loss = train_model(**batch).loss
                        orth = allocator.orth_penalty() if allocator is not None else None
                        if orth is not None:
                            loss = (
                                weight * task_loss + ada.orth_reg_weight * orth
                            )  # eq. 4 regulariser, weight γ
                        else:
                            loss = weight * task_loss
                        (loss / tc.grad_accum).backward()
                    running_loss += weight * task_loss.detach() / tc.grad_accum
                    if orth is not None:
                        running_orth += orth.detach() / tc.grad_accum
                if tc.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
                optimizer.step()
                call_hooks(hooks, "after_step", step, optimizer)
                scheduler.step()
                step += 1
                bar.update(1)
                # Importance needs this step's gradients: allocate after the update, before zero_grad.
                if allocator is not None:
                    allocation = allocator.update_and_allocate(step)
                    if allocation is not None:
                        if error := nonfinite("an allocation"):
                            return result("failed", error=error)
                        if record is not None:
                            record.ranks(
                                {**allocation.to_record(), **group_ranks(allocation.ranks, modules, groups)}
                            )
                        if allocation.shrink:
                            allocator.shrink_(optimizer)
                            params = [p for p in model.parameters() if p.requires_grad]
                            train_model = _wrap_ddp(model, dist, device)  # DDP bucketed the old parameters
                        elif getattr(ada, "reset_pruned_momentum", False):
                            allocator.reset_pruned_momentum_(optimizer)
                optimizer.zero_grad(set_to_none=True)
                window += 1

                if step % tc.log_every == 0 or step == total_steps:
                    mean_loss = ddp.mean(running_loss / window, dist).item()  # host sync only at log steps
                    entry = {
                        "step": step,
                        "split": "train",
                        "loss": mean_loss,
                        "lr": scheduler.get_last_lr()[0],
                    }
                    if allocator is not None:
                        entry.update(orth=(running_orth / window).item(), budget=allocator.budget_at(step))
                    if record is not None:
                        record.metrics(entry)
                        record.heartbeat(step)
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
                    running_loss.zero_()
                    running_orth.zero_()
                    window = 0
                    if not math.isfinite(mean_loss):
                        log.error("non-finite loss %s at step %d: stopping", mean_loss, step)
                        return result(
                            "failed", error=f"non-finite training loss ({mean_loss}) at step {step}"
                        )
                if tc.eval_every and step % tc.eval_every == 0 and step < total_steps:
                    _, prune = dev_eval(step)
                    if prune:
                        return result("pruned", pruned_at=step)
                periodic = tc.checkpoint == "periodic" and (
                    (tc.checkpoint_every and step % tc.checkpoint_every == 0)
                    or time.time() - last_checkpoint > 60 * tc.checkpoint_minutes
                )
                periodic, stop_signal = ddp.any_flag(
                    [bool(periodic), signals.received is not None], dist, device
                )
                cause = (signals.received or "a stop signal to another rank") if stop_signal else None
                if tc.stop_after_step is not None and step >= tc.stop_after_step:
                    cause = cause or f"train.stop_after_step={tc.stop_after_step}"
                if (cause or periodic) and step < total_steps:
                    if error := nonfinite("a checkpoint"):
                        return result("failed", error=error)
                    checkpoint(step)
                    last_checkpoint = time.time()
                    if cause:
                        log.warning("%s: checkpoint at step %d, then exit", cause, step)
                        return result("interrupted", interrupted_by=cause, resume_with=resume_with)

            # 6. the final phase, under the same handler: the checkpoint at T comes first, so that an
            #    error or a signal in evaluation, the methods' final hooks or export loses no training
            #    step (a resume then runs this phase alone), and the run ends completed, failed or
            #    interrupted like the loop
            if error := nonfinite("the final checkpoint"):
                return result("failed", error=error)
            checkpoint(step)
            final, extra = {"dev": dev_eval(step)[0]}, {}
            if task.test and not signalled():
                final["test"] = evaluate(model, task.test, task, tc.eval_batch_size, pad_id, device, dist)
                if record is not None:
                    record.metrics({"step": step, "split": "test", **final["test"]})
            if not signalled():
                for fields in call_hooks(
                    hooks,
                    "final",
                    lambda split: evaluate(
                        model, getattr(task, split), task, tc.eval_batch_size, pad_id, device, dist
                    ),
                ):
                    extra.update(fields or {})
            if cause := signalled():
                log.warning("%s in the final phase: the checkpoint at step %d stands", cause, step)
                return result("interrupted", interrupted_by=cause, resume_with=resume_with)
            if dist.active:  # every rank must hold the same adapters: say so in the record
                digests = ddp.gather(_digest(model), dist)
                extra["ddp"] = {"world_size": dist.world, "identical_on_all_ranks": len(set(digests)) == 1}
            exports = _export(run, model, wrapped, plan, tokenizer, run_dir, hooks) if dist.main else {}
            return result("completed", final=final, exports=exports, **extra)
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of this step; the last one stands
        has_ckpt = has_checkpoint(checkpoint_path)
        result("interrupted", interrupted_by="SIGINT (twice)", resume_with=resume_with if has_ckpt else None)
        raise
    except BaseException as err:
        result("failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        bar.close()
        if record is not None:
            record.close()  # gives back the run folder's lock
        ddp.shutdown(dist)


def kept_params(ranks: dict[str, int], wrapped: dict) -> int:
    """Adapter parameters the kept triplets hold: r (in + out + 1) per matrix."""
    return sum(r * (wrapped[n].in_features + wrapped[n].out_features + 1) for n, r in ranks.items())


def _wrap_ddp(model, dist: ddp.Dist, device):
    if not dist.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _digest(model) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _saved_result(run_dir: Path) -> dict:
    import json

    path = run_dir / "result.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _export(run: RunConfig, model, wrapped: dict, plan, tokenizer, run_dir: Path, hooks: list = ()) -> dict:
    exports = {}
    if run.export_adapter and run.method.name in ("adalora", "lora", "dylora"):  # a plain peft LoRA adapter
        from adabudget.export import export_peft_adapter

        exports["adapter"] = export_peft_adapter(model, wrapped, run_dir / "adapter", _base_name(run))
    elif run.export_adapter:
        from adabudget.export import save_adapter

        exports["adapter"] = save_adapter(
            model, run.method, wrapped, run_dir / "adapter", _base_name(run), hooks
        )
    if run.export_merged:
        from adabudget.export import save_merged

        save_merged(model, wrapped, run_dir / "merged", tokenizer, plan.methods())
        exports["merged"] = str(run_dir / "merged")
    return exports


def _base_name(run: RunConfig) -> str:
    from adabudget.hub import PACKAGED, packaged_path

    return packaged_path(run.model.name) if run.model.name in PACKAGED else run.model.name
