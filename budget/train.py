"""The training loop: one function, ``train(cfg) -> dict``, for the CLI, tests and search.

Read it top to bottom: set-up (validate, data, model, method, allocator, optimizer),
then one ``while`` loop over optimizer steps, then the final evaluation and export.
Every loss term is visible in the loop; hooks are plain ``if``s.
"""

from __future__ import annotations

import inspect
import math
import os
import random
import resource
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from budget.arch import arch_of
from budget.config import ConfigError, RunConfig, resolve, to_dict, validate
from budget.data import TaskData, load_task, load_tokenizer, make_batches, num_batches
from budget.log import RunRecord, environment, log
from budget.methods import adalora_config_of, apply_method, describe, methods_in
from budget.methods.adalora import SVDLinear
from budget.metrics import compute_metrics, primary_metric
from budget.models import count_params, freeze_backbone, load_model, pick_device
from budget.schedule import lr_factor, phase_steps


def total_steps_for(run: RunConfig, n_train: int) -> int:
    """T in optimizer steps: ``train.max_steps``, or epochs x batches / grad_accum."""
    if run.train.max_steps:
        return run.train.max_steps
    return max(
        1, math.ceil(run.train.epochs * num_batches(n_train, run.train.batch_size) / run.train.grad_accum)
    )


def check_schedule(method, total_steps: int) -> None:
    """The AdaLoRA phases must leave a budgeting phase (peft#2337 crashes instead)."""
    ada = adalora_config_of(method)
    if ada is None:
        return
    phase_steps(ada.warmup_steps, ada.final_steps, total_steps)


def check_exports(run: RunConfig) -> None:
    """A merged checkpoint needs every method of the run to merge: fail before training."""
    from budget.methods import REGISTRY

    if not run.export_merged:
        return
    unmergeable = [m for m in methods_in(run.method) if m in REGISTRY and REGISTRY[m].merge is None
                   and m != "full"]  # fmt: skip
    if unmergeable:
        raise ConfigError(
            f"export_merged=true: {', '.join(unmergeable)} cannot merge into the base weights (only lora, "
            "adalora, ia3, bitfit, freeze and full can); set export_merged=false (adapter/ holds the modules)"
        )


def group_ranks(ranks: dict[str, int], groups: list[dict] | None) -> dict:
    """Kept AdaLoRA rank per layer group (hybrids: which group the budget flows to)."""
    if not groups or len(groups) < 2:
        return {}
    from budget.models import block_index

    totals = [0] * len(groups)
    for name, r in ranks.items():
        layer = block_index(name)
        for i, g in enumerate(groups):
            if layer in g["layers"]:
                totals[i] += r
    return {"group_ranks": totals}


def check_positions(run: RunConfig, model) -> None:
    """Soft prompt + the longest tokenized example must fit an absolute position table."""
    from budget.methods.hybrid import HybridConfig, parse_groups
    from budget.methods.prompt import PromptConfig, position_limit

    cfg = run.method
    prompts = [cfg] if isinstance(cfg, PromptConfig) else []
    if isinstance(cfg, HybridConfig):
        prompts = [g["prompt"] for g in parse_groups(cfg) if "prompt" in g]
    limit = position_limit(model.config)
    for p in prompts:
        if limit is not None and run.data.max_length + p.length > limit:
            raise ConfigError(
                f"method.length={p.length}: with data.max_length={run.data.max_length} the prompted input "
                f"needs {run.data.max_length + p.length} positions, the model has {limit}; lower one of them"
            )


def param_groups(model, method, lr: float) -> list[dict]:
    """AdamW groups: AdaLoRA's λ at ``lr x method.lambda_lr_ratio``, everything else at ``lr``.

    ``method`` is the AdaLoRA config driving the run (``adalora_config_of``), or None.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if getattr(method, "lambda_lr_ratio", None) is None:
        return [{"params": [p for _, p in trainable]}]
    lam = [p for n, p in trainable if n.endswith(".lam")]
    rest = [p for n, p in trainable if not n.endswith(".lam")]
    return [{"params": rest}, {"params": lam, "lr": lr * method.lambda_lr_ratio}]


def new_run_dir(run: RunConfig) -> Path:
    if run.run_dir:
        return Path(run.run_dir)
    base = Path(run.runs_root) / run.run_name / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path, k = base, 1
    while path.exists():  # never reuse (and so never overwrite) an earlier run's folder
        path, k = base.with_name(f"{base.name}_{k}"), k + 1
    return path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model, examples: list[dict], task: TaskData, batch_size: int, pad_id: int, device) -> dict:
    was_training = model.training
    model.eval()
    inputs = set(inspect.signature(model.forward).parameters)
    preds, labels = [], []
    for batch in make_batches(examples, batch_size, pad_id, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**{k: v for k, v in batch.items() if k != "labels" and k in inputs}).logits
        preds.append(logits.float().cpu())
        labels.append(batch["labels"].cpu())
    model.train(was_training)
    p, y = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    return compute_metrics(p.squeeze(-1) if task.regression else p, y, task.regression)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss: KiB on Linux, bytes on macOS; process-wide peak resident memory.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write to a temp file, then rename over the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_resume_config(cfg, run_dir: Path) -> RunConfig:
    from omegaconf import OmegaConf

    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"resume={run_dir}: not a run folder (no config.yaml); pass a folder under runs/")
    if not (run_dir / "checkpoints" / "last.pt").exists():
        raise ConfigError(f"resume={run_dir}: no checkpoints/last.pt to continue from")
    saved = resolve(OmegaConf.load(run_dir / "config.yaml"))
    current = resolve(cfg)
    # The saved config is the run; only the stop point and logging may change on resume.
    saved.train.stop_after_step = current.train.stop_after_step
    saved.train.progress = current.train.progress
    saved.resume = str(run_dir)
    saved.run_dir = str(run_dir)
    return saved


def train(cfg) -> dict:
    """Train one configuration end to end; returns the result record (also in result.json)."""
    run = resolve(cfg)
    resume_dir = Path(run.resume) if run.resume else None
    if resume_dir is not None:
        run = _load_resume_config(cfg, resume_dir)
    validate(run)
    tc = run.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    device = pick_device(tc.device)
    start_time = time.time()

    # 1. data (bad paths, columns and splits fail here, before the model is loaded)
    tokenizer = load_tokenizer(run.model.name, run.model.revision)
    task = load_task(run.data, tokenizer)
    total_steps = total_steps_for(run, len(task.train))  # T
    check_schedule(run.method, total_steps)
    check_exports(run)

    # 2. model and method; the seed fixes the head and factor inits
    seed_everything(tc.seed)
    model = load_model(run.model, task.num_labels, task.regression, tokenizer.pad_token_id)
    freeze_backbone(model, run.model.train_head)
    try:
        arch = arch_of(model)
    except ConfigError:  # lora / adalora / full with explicit targets work on any model
        arch = None
    wrapped = apply_method(model, run.method)
    svd = {name: m for name, m in wrapped.items() if isinstance(m, SVDLinear)}
    adapted = list(svd.values())
    ada = adalora_config_of(run.method, arch)  # the one global AdaLoRA budget (or peft's)
    groups = describe(run.method, arch) if arch is not None else None
    allocator = None
    if svd:
        from budget.allocator import RankAllocator

        allocator = RankAllocator(svd, ada, total_steps)
    elif run.method.name == "peft_adalora":
        from budget.methods.peft_ref import PeftAllocator

        allocator = PeftAllocator(model, ada, total_steps)
    check_positions(run, model)
    trainable_before, total_params = count_params(model)
    model.to(device)

    # 3. the run folder (resume continues the same folder and record)
    run_dir = resume_dir if resume_dir is not None else new_run_dir(run)
    checkpoint_path = run_dir / "checkpoints" / "last.pt"
    ckpt = torch.load(checkpoint_path, map_location=device, weights_only=False) if resume_dir else None
    if ckpt is not None and allocator is not None:
        allocator.load_state_dict(ckpt["allocator"])  # restores shrunk shapes before the optimizer
    record = RunRecord(run_dir, to_dict(run), run.logger, resume=resume_dir is not None)

    # 4. optimizer: AdamW with linear warm-up and decay over T optimizer steps
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, ada, tc.lr), lr=tc.lr, weight_decay=tc.weight_decay)
    warmup = int(tc.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps))

    step, best = 0, {}
    if ckpt is not None:
        model.load_state_dict(ckpt["trainable"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, best = ckpt["step"], ckpt["best"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        random.setstate(ckpt["rng"]["python"])
        np.random.set_state(ckpt["rng"]["numpy"])
    pad_id = tokenizer.pad_token_id
    # Tokenizers emit token_type_ids that some models (LLaMA) do not accept.
    inputs = set(inspect.signature(model.forward).parameters)
    main_metric = primary_metric(task.regression)
    batches_per_epoch = num_batches(len(task.train), tc.batch_size)

    def batch_stream(start_step: int):
        # Optimizer step k consumes batches [k * grad_accum, (k+1) * grad_accum) of one
        # endless stream of seeded epochs, so a resumed run sees the same batches.
        position = start_step * tc.grad_accum
        epoch, skip = divmod(position, batches_per_epoch)
        while True:
            for batch in make_batches(task.train, tc.batch_size, pad_id, True, tc.seed, epoch, skip):
                yield {k: v for k, v in batch.items() if k in inputs}
            epoch, skip = epoch + 1, 0

    def checkpoint(at_step: int) -> None:
        save_checkpoint(
            checkpoint_path,
            {
                "step": at_step,
                "best": best,
                "trainable": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "allocator": allocator.state_dict() if allocator is not None else None,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "python": random.getstate(),
                    "numpy": np.random.get_state(),
                },
            },
        )

    def dev_eval(at_step: int) -> dict:
        metrics = evaluate(model, task.dev, task, tc.eval_batch_size, pad_id, device)
        record.metrics({"step": at_step, "split": "dev", **metrics})
        if not best or metrics[main_metric] > best["dev"][main_metric]:
            best.update({"step": at_step, "dev": metrics})
        return metrics

    def result(status: str, **extra) -> dict:
        trainable_now, _ = count_params(model)
        out = {
            "status": status,
            "run_dir": str(run_dir),
            "run_name": run.run_name,
            "method": run.method.name,
            "model": run.model.name,
            "task": run.data.task,
            "steps": step,
            "total_steps": total_steps,
            "split_sizes": task.sizes(),
            "trainable_params": trainable_before,
            "trainable_params_final": trainable_now,
            "adapter_params_final": sum(p.numel() for m in adapted for p in (m.P, m.lam, m.Q)),
            "total_params": total_params,
            "ranks": allocator.ranks() if allocator is not None else None,
            "groups": groups,
            "best": best,
            "wall_time_s": round(time.time() - start_time, 2),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            **environment(),
            **extra,
        }
        record.result(out)
        return out

    # 5. the loop: one iteration = one optimizer step of grad_accum micro-batches
    model.train()
    stream = batch_stream(step)
    running_loss = torch.zeros((), device=device)
    running_orth = torch.zeros((), device=device)
    window = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not tc.progress, desc=run.run_name, leave=False)
    try:
        while step < total_steps:
            for _ in range(tc.grad_accum):
                batch = {k: v.to(device, non_blocking=True) for k, v in next(stream).items()}
                task_loss = model(**batch).loss
                orth = allocator.orth_penalty() if allocator is not None else None
                if orth is not None:
                    loss = task_loss + ada.orth_reg_weight * orth  # eq. 4 regulariser, weight γ
                else:
                    loss = task_loss
                (loss / tc.grad_accum).backward()
                running_loss += task_loss.detach() / tc.grad_accum
                if orth is not None:
                    running_orth += orth.detach() / tc.grad_accum
            if tc.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            # Importance needs this step's gradients: allocate after the update, before zero_grad.
            if allocator is not None:
                allocation = allocator.update_and_allocate(step)
                if allocation is not None:
                    record.ranks({**allocation.to_record(), **group_ranks(allocation.ranks, groups)})
                    if allocation.shrink:
                        allocator.shrink_(optimizer)
                        params = [p for p in model.parameters() if p.requires_grad]
                    elif getattr(ada, "reset_pruned_momentum", False):
                        allocator.reset_pruned_momentum_(optimizer)
            optimizer.zero_grad(set_to_none=True)
            window += 1

            if step % tc.log_every == 0 or step == total_steps:
                mean_loss = (running_loss / window).item()  # host sync only at log steps
                entry = {"step": step, "split": "train", "loss": mean_loss, "lr": scheduler.get_last_lr()[0]}
                if allocator is not None:
                    entry.update(orth=(running_orth / window).item(), budget=allocator.budget_at(step))
                record.metrics(entry)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                running_loss.zero_()
                running_orth.zero_()
                window = 0
                if not math.isfinite(mean_loss):
                    log.error("non-finite loss %s at step %d: stopping", mean_loss, step)
                    return result("failed", error=f"non-finite training loss ({mean_loss}) at step {step}")
            if tc.eval_every and step % tc.eval_every == 0 and step < total_steps:
                dev_eval(step)
            if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                checkpoint(step)
            if tc.stop_after_step is not None and step >= tc.stop_after_step and step < total_steps:
                checkpoint(step)
                return result("interrupted", resume_with=f"resume={run_dir}")
    except BaseException as err:
        result("failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        bar.close()
        if step < total_steps:  # failed, interrupted or crashed: the loop ends the record here
            record.close()

    # 6. final evaluation, record and export
    final = {"dev": dev_eval(step)}
    if task.test:
        final["test"] = evaluate(model, task.test, task, tc.eval_batch_size, pad_id, device)
        record.metrics({"step": step, "split": "test", **final["test"]})
    checkpoint(step)
    exports = {}
    if run.export_adapter and run.method.name in ("adalora", "lora"):
        from budget.export import export_peft_adapter

        base_name = _base_name(run)
        exports["adapter"] = export_peft_adapter(model, wrapped, run_dir / "adapter", base_name)
    elif run.export_adapter:
        from budget.export import save_adapter

        exports["adapter"] = save_adapter(model, run.method, wrapped, run_dir / "adapter", _base_name(run))
    if run.export_merged:
        from budget.export import save_merged

        save_merged(model, wrapped, run_dir / "merged", tokenizer, methods_in(run.method))
        exports["merged"] = str(run_dir / "merged")
    out = result("completed", final=final, exports=exports)
    record.close()
    return out


def _base_name(run: RunConfig) -> str:
    from budget.models import PACKAGED, packaged_path

    return packaged_path(run.model.name) if run.model.name in PACKAGED else run.model.name


def summary(result: dict) -> str:
    """What the CLI prints at the end of a run."""
    lines = [f"status: {result['status']}  run folder: {result['run_dir']}"]
    final = result.get("final") or {}
    for split, metrics in final.items():
        lines.append(f"{split}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    groups = result.get("groups") or []
    if len(groups) > 1:
        lines.append("layer groups (trainable params at start):")
        for g in groups:
            methods = g["methods"]
            what = (
                "none"
                if methods == "none"
                else " + ".join(f"{m} {v['params']:,}" for m, v in methods.items())
            )
            lines.append(f"  group {g['group']} layers {g['layers']}: {what}")
    if result.get("ranks"):
        ranks = result["ranks"]
        lines.append(f"final rank allocation (sum {sum(ranks.values())} over {len(ranks)} matrices):")
        lines.extend(_rank_grid(ranks))
    lines.append(
        f"trainable params: {result['trainable_params']:,} at start, {result['trainable_params_final']:,} at end"
        f"  wall time {result['wall_time_s']:.0f}s  peak memory {result['peak_memory_mb']:.0f} MiB"
    )
    if result.get("error"):
        lines.append(f"error: {result['error']}")
    return "\n".join(lines)


def _rank_grid(ranks: dict[str, int]) -> list[str]:
    """Ranks as a layer x matrix grid (the rank-allocation picture of the paper's Fig. 1)."""
    from budget.models import block_index

    rows: dict = {}
    cols: list[str] = []
    for name, r in ranks.items():
        layer = block_index(name)
        # the module's path inside its block, e.g. "attention.output.dense"
        col = name.split(f".{layer}.", 1)[-1] if layer is not None else name
        col = col.replace("attention.self.", "").replace("self_attn.", "").replace("mlp.", "")
        if col not in cols:
            cols.append(col)
        rows.setdefault(layer, {})[col] = r
    width = max(len(c) for c in cols)
    out = ["  layer  " + " ".join(c.rjust(width) for c in cols)]
    for layer, row in rows.items():
        out.append(f"  {layer!s:>5}  " + " ".join(str(row.get(c, "-")).rjust(width) for c in cols))
    return out
