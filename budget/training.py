"""The training loop: ``train(cfg, on_eval=None) -> dict``, for the CLI, the tests and every search trial.

Read ``train`` top to bottom: set-up (config, data and backbone, plan and method, the session,
optimizer), then one ``while`` loop over optimizer steps, then the final phase (evaluation, the
methods' final hooks, export) under the same signal handler. Every loss term is visible in the
loop; the methods' hooks are plain calls. Under ``torchrun`` the same code runs on every rank
(``adabudget.ddp``): batches are sharded, rank 0 writes.

A run stops early, with a complete record, when ``on_eval(step, metrics)`` says so (status
``pruned``: a search pruner), on Ctrl-C, SIGTERM, SIGHUP or SIGUSR1 (``interrupted``, after a
checkpoint, with the command that resumes it; in the final phase the checkpoint at T stands and
a resume runs that phase alone) or on non-finite weights or loss (``failed``, before any
checkpoint or allocation keeps them). What is not the loop lives beside it: ``adabudget.session``
(set-up, run folder, record, checkpoints, stop requests, result), ``adabudget.evaluate``,
``adabudget.checkpoint`` (what a resume may change) and ``adabudget.signals``.

Everything a run calls is imported with this module, none of it at the end of a run: a worker
that trains for hours while its checkout is edited runs the code it started with throughout (the
export once imported a newer ``adabudget.export`` than the methods it had loaded, and failed).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from adabudget import ddp
from adabudget.allocator import RankAllocator
from adabudget.arch import arch_of
from adabudget.compose import resolve, resumed
from adabudget.config import ConfigError, RunConfig, validate
from adabudget.evaluate import batch_stream, evaluate, forward_inputs
from adabudget.export import export_peft_adapter, save_adapter, save_merged
from adabudget.hub import PACKAGED, packaged_path
from adabudget.log import group_ranks, log, module_table
from adabudget.methods import (
    REGISTRY,
    apply_plan,
    check_quantized_base,
    hook_states,
    load_hook_states,
    methods_in,
    plan_of,
    step_hooks,
)
from adabudget.methods.adalora import SVDLinear, kept_params, param_groups
from adabudget.methods.peft_ref import PeftAllocator
from adabudget.methods.prompt import position_limit
from adabudget.metrics import primary_metric
from adabudget.models import pick_device
from adabudget.modules import count_params
from adabudget.precision import Scaler, check_device, trainable_to_fp32
from adabudget.precision import autocast as amp_autocast
from adabudget.preflight import check_against_model
from adabudget.progress import StepProgress
from adabudget.schedule import lr_factor
from adabudget.session import RunSession, reset_peak_memory, setup, total_steps_for

OnEval = Callable[[int, dict], object]


def keeps_torch_threads(fn):
    """``train.num_threads`` holds for the call only: torch's thread count is put back after it (a
    notebook, a test runner or a worker that trains in its own process keeps its own setting)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    return wrapper


@keeps_torch_threads
def train(cfg, on_eval: OnEval | None = None) -> dict:
    """Train one configuration end to end; returns the result record (also in result.json).

    Args:
        cfg: a composed config (Hydra/OmegaConf, dict or ``RunConfig``). With ``resume`` set it
            must be the run's saved config, changed only in ``adabudget.checkpoint.RESUMABLE``
            knobs (``adabudget.compose.resume_config`` builds it).
        on_eval: called at every dev evaluation with ``(step, metrics)``; a true return stops
            the run with status ``pruned`` (a search pruner's hook; ``budget`` knows no optuna).
    """
    run = resolve(cfg)
    if run.resume:
        run = resumed(run)  # the saved config, changed only in RESUMABLE knobs
    validate(run)
    check_quantized_base(run)
    check_exports(run)
    tc = run.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    dist = ddp.init(tc.device)
    device = pick_device(tc.device, dist.local_rank if dist.active else None)
    memory_reset = reset_peak_memory(device)  # the record's peak_memory_mb is this run's, from here
    check_device(tc.precision, device)
    autocast, scaler = amp_autocast(tc.precision, device), Scaler(tc.precision, device)

    # 1. data and backbone, as the supernet sets them up (same calls, same order, same seed)
    task, tokenizer, model = setup(run, dist)
    total_steps = total_steps_for(run, len(task.train))  # T
    pad_id = tokenizer.pad_token_id

    # 2. plan and method; the allocator of the run's one rank budget (ours, or peft's) is built
    #    after the model is on its device: its buffers follow the factors
    try:
        arch = arch_of(model)
    except ConfigError:  # lora / adalora / full with explicit targets work on any model
        arch = None
    plan = plan_of(run.method, arch)  # a hybrid's sizes are solved here, once
    check_positions(run, model, plan)
    check_against_model(run, model, plan)  # target patterns, data.max_length vs the position table
    wrapped = apply_plan(model, plan)
    trainable_to_fp32(model)  # on a bf16 / fp16 base the methods' weights still train in fp32
    groups = plan.report(arch) if arch is not None else None
    modules = module_table(wrapped, arch, plan)
    model.to(device)
    ada = plan.adalora
    allocator = make_allocator(model, wrapped, ada, total_steps)
    hooks = step_hooks(model, plan, wrapped)
    for h in hooks:  # the run's T, for a method's own schedule (SoRA's cut, IncreLoRA's rounds)
        h.start(total_steps)
    inputs = forward_inputs(model)

    # 3. the session: a resumed run's checkpoint restores what must exist before the optimizer
    #    (the methods' masks and base weights, the allocator's shrunk shapes); a new run's
    #    methods calibrate on batches of their own
    metric = primary_metric(task.regression, task.scoring)
    session = RunSession(run, dist, device, total_steps, metric, "adabudget train resume={run_dir}")
    if session.completed is not None:  # nothing to do: never append a second ending
        session.close()
        return session.completed
    if session.checkpoint is not None:
        load_hook_states(hooks, session.checkpoint.get("hooks"))
    elif hooks:
        with autocast():
            calibrate(hooks, model, task, tc, pad_id, inputs, device)
    trainable_params, total_params = count_params(model)  # after calibration: it may add parameters
    if session.checkpoint is not None and allocator is not None:
        allocator.load_state_dict(session.checkpoint["allocator"])
    header = {
        "run_name": run.run_name,
        "method": run.method.name,
        "model": run.model.name,
        "task": run.data.task,
        "num_labels": task.num_labels,
        "data_version": getattr(task, "version", None),
        "split_sizes": task.sizes(),
        "primary_metric": metric,
        "task_kind": task.kind,
        "scoring": task.record()["scoring"],  # a causal-LM task's answer extraction, metric, stops
        "precision": tc.precision,
        "base_dtype": run.model.dtype or "fp32",
        "regression": task.regression,
        "total_steps": total_steps,
        "trainable_params": trainable_params,
        "total_params": total_params,
        "world_size": dist.world,
        "device": str(device),  # and the GPUs its process was given (search.devices: one set per worker)
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        # peak_memory_mb counts from this run's start ("run"), or from its process's ("process": macOS)
        "peak_memory_scope": "run" if memory_reset else "process",
        "groups": groups,
        "modules": modules,
        "meta": run.meta,
    }

    # 4. optimizer: AdamW (AdaLoRA's λ in its own group), linear warm-up, linear or cosine decay over T
    optimizer = torch.optim.AdamW(param_groups(model, ada, tc.lr), lr=tc.lr, weight_decay=tc.weight_decay)
    warmup = int(tc.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total_steps, tc.lr_schedule)
    )
    # running: the open logging window's summed (task loss, orth penalty); window: its steps
    step, window, running = session.restore(model, optimizer, scheduler, torch.zeros(2, device=device))
    if session.checkpoint is not None:
        scaler.load_state_dict(session.checkpoint.get("scaler"))
    params = [p for p in model.parameters() if p.requires_grad]
    train_model = ddp.wrap(model, dist, device)
    stream = batch_stream(task.train, tc, pad_id, inputs, step)

    def scores(split: str, generate: bool = True) -> dict:
        """Metrics of the model as it is on ``split`` (every rank gets them); a causal-LM task
        generates only when ``generate``."""
        examples = getattr(task, split)
        return evaluate(
            model, examples, task, tc.eval_batch_size, pad_id, device, dist, autocast, tokenizer, generate
        )

    # 5. the loop: one iteration = one optimizer step of grad_accum micro-batches
    status, fields = None, {}  # how the run ends: an early stop sets them, else the final phase
    # a bar on a terminal; off one (Slurm, nohup, a pipe) a plain line at each logging step
    bar = StepProgress(total_steps, step, run.run_name, enabled=tc.progress and dist.main)
    with session.open(header, lambda: summary(model, allocator, wrapped, hooks)), bar:
        if session.checkpoint is None and allocator is not None:  # step 0: every matrix at init_r
            ranks0 = allocator.ranks()
            session.ranks(
                {
                    "step": 0,
                    "budget": allocator.budget_at(0),
                    "kept": sum(ranks0.values()),
                    "kept_params": kept_params(ranks0, wrapped),
                    "final": False,
                    "ranks": ranks0,
                }
            )
        for h in hooks if session.checkpoint is None else ():  # SoRA's, IncreLoRA's initial ranks
            if (row := h.allocation(0)) is not None:
                session.ranks(row)
        model.train()
        while step < total_steps:
            for h in hooks:
                h.before_step(step)
            for micro in range(tc.grad_accum):
                batch, weight = ddp.shard(next(stream), dist)  # weight: the shard's share of the batch
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                sync = micro == tc.grad_accum - 1 or not dist.active  # DDP all-reduces on the last one
                with nullcontext() if sync else train_model.no_sync(), autocast():
                    task_loss = train_model(**batch).loss
                    orth = allocator.orth_penalty() if allocator is not None else None
                    if orth is not None:  # eq. 4: the orthogonality regulariser R(P, Q), weight γ
                        loss = weight * task_loss + ada.orth_reg_weight * orth
                    else:
                        loss = weight * task_loss
                    scaler.scale(loss / tc.grad_accum).backward()
                running[0] += weight * task_loss.detach() / tc.grad_accum
                if orth is not None:
                    running[1] += orth.detach() / tc.grad_accum
            scaler.unscale_(optimizer)
            if tc.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            stepped = scaler.step(optimizer)  # False: fp16's scaler skipped an overflowed step
            for h in hooks:
                h.after_step(step, optimizer)
            scheduler.step()
            step = session.advance()
            bar.update(1)
            # Importance needs this step's gradients: allocate after the update, before zero_grad.
            # A step the scaler skipped has inf gradients: it is not scored (as the Trainer callback).
            allocation = allocator.update_and_allocate(step) if allocator is not None and stepped else None
            if allocation is not None:
                if error := session.nonfinite([*params, running], step, "an allocation"):
                    status, fields = "failed", {"error": error}
                    break
                session.ranks({**allocation.to_record(), **group_ranks(allocation.ranks, modules, groups)})
                if allocation.shrink:
                    allocator.shrink_(optimizer)
                    params = [p for p in model.parameters() if p.requires_grad]
                    train_model = ddp.wrap(model, dist, device)  # DDP bucketed the old parameters
                elif getattr(ada, "reset_pruned_momentum", False):
                    allocator.reset_pruned_momentum_(optimizer)
            for h in hooks:  # a method's own rank allocation (SoRA's gates, IncreLoRA's growth)
                if (row := h.allocation(step)) is not None:
                    session.ranks(row)
            optimizer.zero_grad(set_to_none=True)
            window += 1

            if step % tc.log_every == 0 or step == total_steps:
                mean_loss = ddp.mean(running[0] / window, dist).item()  # host sync only at log steps
                entry = {"step": step, "split": "train", "loss": mean_loss, "lr": scheduler.get_last_lr()[0]}
                if allocator is not None:
                    entry.update(orth=(running[1] / window).item(), budget=allocator.budget_at(step))
                error = session.train_line(entry)
                bar.report(mean_loss)
                running.zero_()
                window = 0
                if error is not None:
                    status, fields = "failed", {"error": error}
                    break
            if tc.eval_every and step % tc.eval_every == 0 and step < total_steps:
                generate = bool(tc.generate_every) and step % tc.generate_every == 0
                if session.evaluated(step, scores("dev", generate), on_eval):
                    status, fields = "pruned", {"pruned_at": step}
                    break
            # The checkpoint at T comes before the final phase, so that an error or a signal in
            # evaluation, the methods' final hooks or export loses no training step.
            cause = session.stop_requested(step)
            if step == total_steps or cause or session.should_checkpoint(step):
                before = "the final checkpoint" if step == total_steps else "a checkpoint"
                if error := session.nonfinite([*params, running], step, before):
                    status, fields = "failed", {"error": error}
                    break
                session.save(
                    step,
                    model,
                    optimizer,
                    scheduler,
                    window,
                    running,
                    allocator=allocator.state_dict() if allocator is not None else None,
                    hooks=hook_states(hooks),
                    scaler=scaler.state_dict(),
                )
                if cause and step < total_steps:
                    log.warning("%s: checkpoint at step %d, then exit", cause, step)
                    status, fields = "interrupted", session.interruption(cause)
                    break

        # 6. the final phase, under the same handler (a resume after its checkpoint runs it alone):
        #    a signal ends it interrupted, an error failed, like the loop
        if status is None:
            final = {"dev": scores("dev")}
            session.evaluated(step, final["dev"], on_eval)
            if task.test and not session.signalled():
                final["test"] = scores("test")
                session.metrics({"step": step, "split": "test", **final["test"]})
            if not session.signalled():
                for h in hooks:
                    fields.update(h.final(scores) or {})
            if cause := session.signalled():
                log.warning("%s in the final phase: the checkpoint at step %d stands", cause, step)
                status, fields = "interrupted", session.interruption(cause)
            else:
                if dist.active:  # every rank must hold the same adapters: say so in the record
                    same = ddp.identical_on_all_ranks(model, dist)
                    fields["ddp"] = {"world_size": dist.world, "identical_on_all_ranks": same}
                task_type = "CAUSAL_LM" if task.causal_lm else "SEQ_CLS"
                exports = (
                    export(run, model, wrapped, plan, tokenizer, session.dir, hooks, task_type)
                    if dist.main
                    else {}
                )
                status, fields = "completed", {"final": final, "exports": exports, **fields}
        result = session.result(status, **fields)
    return result


# ---------------------------------------------------------------- the set-up's pieces
def check_exports(run: RunConfig) -> None:
    """A merged checkpoint needs every method of the run to merge: fail before training."""
    if not run.export_merged:
        return
    unmergeable = [m for m in methods_in(run.method) if m in REGISTRY and not REGISTRY[m].mergeable]
    if unmergeable:
        mergeable = sorted(m for m, spec in REGISTRY.items() if spec.mergeable)
        raise ConfigError(
            f"export_merged=true: {', '.join(unmergeable)} cannot merge into the base weights (these can: "
            f"{', '.join(mergeable)}); set export_merged=false (adapter/ holds the modules)"
        )


def check_positions(run: RunConfig, model, plan) -> None:
    """Soft prompt + the longest tokenized example must fit an absolute position table."""
    limit = position_limit(model.config)
    for p in (c for g in plan.groups for name, c in g.methods.items() if name == "prompt"):
        if limit is not None and run.data.max_length + p.length > limit:
            raise ConfigError(
                f"method.length={p.length}: with data.max_length={run.data.max_length} the prompted input "
                f"needs {run.data.max_length + p.length} positions, the model has {limit}; lower one of them"
            )


def make_allocator(model, wrapped: dict, ada, total_steps: int):
    """The allocator of the run's one rank budget (ours, or peft's for peft_adalora), or None."""
    svd = {name: m for name, m in wrapped.items() if isinstance(m, SVDLinear)}
    if svd:
        return RankAllocator(svd, ada, total_steps)
    if ada is not None and ada.name == "peft_adalora":
        return PeftAllocator(model, ada, total_steps)
    return None


def calibrate(hooks: list, model, task, tc, pad_id: int, inputs: set[str], device) -> None:
    """The methods' ``calibrate`` on a new run, on the training stream's batches under seed + 2
    (endless seeded epochs, as the loop's own) with the RNG forked: the training stream and its
    randomness are left as they are."""
    stream = batch_stream(task.train, dataclasses.replace(tc, seed=tc.seed + 2), pad_id, inputs, 0)

    def batches(n: int):
        for _ in range(n):
            yield {k: v.to(device) for k, v in next(stream).items()}

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(tc.seed + 2)
        for h in hooks:
            h.calibrate(lambda batch: model(**batch).loss, batches)


def summary(model, allocator, wrapped: dict, hooks: list = ()) -> dict:
    """What every ending of a run reports of its model: trainable parameters, and the kept ranks
    with the parameters they hold (AdaLoRA's allocator, or a method's hooks: SoRA, IncreLoRA)."""
    ranks = allocator.ranks() if allocator is not None else None
    if ranks is not None:
        return {
            "trainable_params_final": count_params(model)[0],
            "adapter_params_final": kept_params(ranks, wrapped),
            "ranks": ranks,
        }
    kept = next((k for h in hooks if (k := h.kept()) is not None), {})
    return {
        "trainable_params_final": count_params(model)[0],
        "adapter_params_final": kept.get("kept_params"),
        "ranks": kept.get("ranks"),
    }


def export(
    run: RunConfig,
    model,
    wrapped: dict,
    plan,
    tokenizer,
    run_dir: Path,
    hooks: list,
    task_type: str = "SEQ_CLS",
) -> dict:
    """``adapter/`` (peft's LoRA format where the method has one, ``Method.peft_export``, with peft's
    ``task_type``: ``SEQ_CLS`` or ``CAUSAL_LM``) and ``merged/`` as the run asks; returns where each went."""
    base = packaged_path(run.model.name) if run.model.name in PACKAGED else run.model.name
    exports = {}
    if run.export_adapter and REGISTRY[run.method.name].peft_export:
        exports["adapter"] = export_peft_adapter(model, wrapped, run_dir / "adapter", base, task_type)
    elif run.export_adapter:
        exports["adapter"] = save_adapter(model, run.method, wrapped, run_dir / "adapter", base, hooks)
    if run.export_merged:
        save_merged(model, wrapped, run_dir / "merged", tokenizer, plan.methods())
        exports["merged"] = str(run_dir / "merged")
    return exports
