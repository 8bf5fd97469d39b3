"""What every training loop shares: the set-up of a run, and its session from folder to result.

``setup(run)`` loads the data, the tokenizer and the backbone for ``adabudget.training.train``
and the supernet's loop alike; ``RunSession`` is the run's bookkeeping (claim, record, restore,
stop signals, checkpoints, result), so that a loop keeps only its own step. How a loop uses it:
docs/run-record.md#one-session-for-every-loop.

Invariants:

- ``setup`` makes the same calls in the same order with the same seed, so both loops start from the
  same initial weights.
- ``RunSession.result`` is the one exit that writes the status; an exception ends the run failed.
- Under ``torchrun`` every rank holds a session: decisions (stop, checkpoint, non-finite) are
  agreed by all ranks, and only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import random
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from adabudget import ddp
from adabudget.checkpoint import has_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from adabudget.config import ConfigError, RunConfig, to_dict
from adabudget.data import TaskData, load_task, load_tokenizer, num_batches
from adabudget.hub import prepare_hub_access
from adabudget.log import RunRecord, claim_run_dir, environment, log
from adabudget.methods import adalora_config_of
from adabudget.models import load_model
from adabudget.modules import freeze_backbone
from adabudget.schedule import phase_steps
from adabudget.signals import StopSignals
from torch import nn


# ---------------------------------------------------------------- set-up
def setup(run: RunConfig, dist: ddp.Dist | None = None) -> tuple[TaskData, object, nn.Module]:
    """The task, tokenizer and backbone of ``run`` (a validated ``RunConfig``), before any method.

    The data comes first: bad paths, columns and splits, and a schedule that does not fit the
    run's T, fail before the model is loaded. Under torchrun rank 0 fetches and caches first and
    the others then read the cache. ``train.seed`` then fixes the head's initialisation, and
    with it everything drawn after it (the methods' factors), the same on every rank.
    """
    dist = dist or ddp.Dist()
    if not dist.main:
        ddp.barrier(dist)
    prepare_hub_access(run.model.name, run.model.revision)  # offline: the cache, or a clear error, at once
    tokenizer = load_tokenizer(run.model.name, run.model.revision)
    task = load_task(run.data, tokenizer)
    if dist.main:
        ddp.barrier(dist)
    total_steps = total_steps_for(run, len(task.train))
    if total_steps and not task.train:
        raise ConfigError(
            f"data.task={run.data.task}: no training examples (an evaluation-only task); set "
            "train.max_steps=0 for a zero-shot evaluation, or train on another task"
        )
    check_schedule(run.method, total_steps)
    seed_everything(run.train.seed)
    model = load_model(run.model, task.num_labels, task.regression, tokenizer.pad_token_id, task.causal_lm)
    if run.model.dropout is not None:
        set_dropout(model, run.model.dropout)
    freeze_backbone(model, run.model.train_head)
    return task, tokenizer, model


def total_steps_for(run: RunConfig, n_train: int) -> int:
    """T in optimizer steps: ``train.max_steps`` (0: zero-shot), or epochs x batches / grad_accum."""
    if run.train.max_steps is not None:
        return run.train.max_steps
    batches = num_batches(n_train, run.train.batch_size)
    return max(1, math.ceil(run.train.epochs * batches / run.train.grad_accum))


def check_schedule(method, total_steps: int) -> None:
    """The AdaLoRA phases must leave a budgeting phase (peft#2337 crashes instead); a method
    config with ``validate_steps(T)`` checks its own step schedule (RoSA's warm-up)."""
    ada = adalora_config_of(method)
    if ada is not None:
        phase_steps(ada.warmup_steps, ada.final_steps, total_steps)
    if callable(getattr(method, "validate_steps", None)):
        method.validate_steps(total_steps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout probability of the backbone: nn.Dropout modules and LLaMA's float attribute."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = p


def reset_peak_memory(device) -> bool:
    """Start the peak the record reports (``peak_memory_mb``) from now, so a process that runs many
    runs (a reproduce or search worker, a notebook) reports each run's own peak: CUDA's peak
    allocation counter, and on the CPU the process's peak RSS (Linux >= 4.0: ``clear_refs`` 5
    resets ``VmHWM`` to the current RSS). False where that is not possible: the peak is then the
    process's since it started (macOS)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak RSS in bytes: ``VmHWM`` (which ``reset_peak_memory`` resets), else
    ``ru_maxrss``. Not ``ru_maxrss`` first: across an exec Linux keeps the larger of the old
    image's peak and the new one's there, so a child of a large process (a test runner) would
    report its parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss if sys.platform == "darwin" else rss * 1024


def peak_memory_mb(device) -> float:
    """The peak since ``reset_peak_memory``: CUDA's allocated bytes, or the process's RSS, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_bytes() / 2**20


# ---------------------------------------------------------------- the session
class RunSession:
    """One run's bookkeeping: its folder and record, checkpoints, stop requests and result.

    Args:
        run: the run's config (``resume`` set: the run continues from its folder's checkpoint).
        dist: the torchrun process group (``ddp.init``); ``close`` shuts it down.
        device: where the run trains.
        total_steps: T.
        main_metric: the dev metric the best evaluation is chosen by.
        resume_command: how to continue the run, ``{run_dir}`` standing for its folder (an
            interrupted run's result says it).

    A resumed run's checkpoint is loaded here (``checkpoint``; None for a new run), so that the
    loop can restore what must exist before its optimizer (the allocator's shapes, the methods'
    masks) and ``restore`` the rest after it. ``completed`` is the saved result of a run that has
    nothing left to do (resumed after it completed), else None.
    """

    def __init__(
        self, run: RunConfig, dist: ddp.Dist, device, total_steps: int, main_metric: str, resume_command: str
    ):
        self.run, self.tc, self.dist, self.device = run, run.train, dist, device
        self.main_metric, self.resume_command = main_metric, resume_command
        self.dir: Path | None = Path(run.resume) if run.resume else None
        self.checkpoint = load_checkpoint(self.dir / "checkpoints" / "last.pt") if run.resume else None
        self.step = self.checkpoint["step"] if self.checkpoint is not None else 0
        # stopped in its final phase (its checkpoint is at T; a resume runs that phase alone), or completed
        self.final_only = self.checkpoint is not None and self.step >= total_steps
        self.completed = None
        if self.final_only:
            saved = _saved_result(self.dir)
            if saved.get("status") == "completed":  # never append a second ending
                self.completed = {
                    **saved,
                    "note": "already completed; nothing to resume (raise train.max_steps to go on)",
                }
        self.best: dict = self.checkpoint["best"] if self.checkpoint is not None else {}
        self.elapsed_before = self.checkpoint.get("elapsed", 0.0) if self.checkpoint is not None else 0.0
        self.start_time = self.last_save = time.time()
        self.record: RunRecord | None = None
        self.header: dict = {}
        self.summary: Callable[[], dict] = dict
        self.signals = StopSignals()

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / "checkpoints" / "last.pt"

    @property
    def resume_with(self) -> str:
        return self.resume_command.format(run_dir=self.dir)

    def interruption(self, cause: str) -> dict:
        """The result fields of a run stopped by ``cause``: what stopped it, how to continue it."""
        return {"interrupted_by": cause, "resume_with": self.resume_with}

    # ---- start
    def restore(self, model: nn.Module, optimizer, scheduler=None, running: torch.Tensor | None = None):
        """Where the loop starts: ``(step, window, running)``, the open logging window being its
        step count and ``running`` (the loop's summed losses, zeros for a new run). A resumed run
        gets its trainable weights, optimizer, LR schedule and every RNG from its checkpoint."""
        if self.dist.active:  # the same init everywhere, then each rank its own dropout stream
            torch.manual_seed(self.tc.seed + 7919 * self.dist.rank)
        window, ckpt = 0, self.checkpoint
        if ckpt is not None:
            model.load_state_dict(ckpt["trainable"], strict=False)
            optimizer.load_state_dict(ckpt["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(ckpt["scheduler"])
            rngs = (
                ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
            )  # one process's: older supernets
            set_rng_state(rngs[self.dist.rank] if len(rngs) == self.dist.world else rngs[0], self.device)
            if "window" in ckpt and running is not None:
                window = ckpt["window"]
                running = ckpt["running"].to(running.device, running.dtype).reshape(running.shape)
        self.start_time = self.last_save = time.time()
        return self.step, window, running

    def open(self, header: dict, summary: Callable[[], dict]) -> RunSession:
        """Claim the run folder (a new one, by rank 0; a resumed run keeps its own), write its
        ``config.yaml`` and hold its lock until ``close`` (``RunRecord``: a live run is never
        resumed twice). ``header``: what ``result.json`` says from now on; ``summary()``: the fields
        every ending reports of the model as it then is. Enter it (``with``) around the loop."""
        if self.dir is None:
            claimed = (
                claim_run_dir(self.run.runs_root, self.run.run_name, self.run.run_dir)
                if self.dist.main
                else None
            )
            self.dir = ddp.broadcast(claimed, self.dist)
        self.header, self.summary = {"run_dir": str(self.dir), **header}, summary
        if self.dist.main:
            resume_step = self.checkpoint["step"] if self.checkpoint is not None else None
            self.record = RunRecord(
                self.dir,
                to_dict(self.run),
                self.run.logger,
                resume_step,
                self.header,
                final_again=self.final_only,
            )
        return self

    def __enter__(self) -> RunSession:
        self.signals.__enter__()
        return self

    def __exit__(self, kind, err, tb) -> bool:
        """An exception ends the record ``failed`` (a second Ctrl-C: ``interrupted``, the last
        checkpoint standing) and goes on; the folder's lock and the process group are given back."""
        self.signals.__exit__()
        try:
            if isinstance(err, KeyboardInterrupt):
                resume_with = self.resume_with if has_checkpoint(self.checkpoint_path) else None
                self.result("interrupted", interrupted_by="SIGINT (twice)", resume_with=resume_with)
            elif err is not None:
                self.result("failed", error=f"{type(err).__name__}: {err}")
        finally:
            self.close()
        return False

    def close(self) -> None:
        """Give back the run folder's lock and the process group."""
        if self.record is not None:
            self.record.close()
            self.record = None
        ddp.shutdown(self.dist)

    # ---- during the loop
    def advance(self) -> int:
        """One optimizer step done: the step every later record and result says."""
        self.step += 1
        return self.step

    def metrics(self, row: dict) -> None:
        if self.record is not None:
            self.record.metrics(row)

    def ranks(self, row: dict) -> None:
        if self.record is not None:
            self.record.ranks(row)

    def heartbeat(self, step: int) -> None:
        if self.record is not None:
            self.record.heartbeat(step)

    def train_line(self, row: dict) -> str | None:
        """Write a train line of the record and the heartbeat; returns the error that ends the run
        when its loss is not finite (both loops stop on it), else None."""
        self.metrics(row)
        self.heartbeat(row["step"])
        if math.isfinite(row["loss"]):
            return None
        log.error("non-finite loss %s at step %d: stopping", row["loss"], row["step"])
        return f"non-finite training loss ({row['loss']}) at step {row['step']}"

    def track_best(self, step: int, metrics: dict) -> None:
        """Keep ``metrics`` as the best dev evaluation if its main metric beats the best so far."""
        if self.main_metric not in metrics:  # a causal-LM evaluation without generation
            return
        if not self.best or metrics[self.main_metric] > self.best["dev"][self.main_metric]:
            self.best.update({"step": step, "dev": metrics})

    def evaluated(
        self, step: int, metrics: dict, on_eval: Callable[[int, dict], object] | None = None
    ) -> bool:
        """Record a dev evaluation (its metrics line, the best so far) and whether ``on_eval(step,
        metrics)`` asks to stop (a search pruner); rank 0 asks, every rank gets the answer."""
        self.metrics({"step": step, "split": "dev", **metrics})
        self.track_best(step, metrics)
        stop = bool(on_eval(step, metrics)) if on_eval is not None and self.dist.main else False
        return ddp.broadcast(stop, self.dist)

    def nonfinite(self, tensors: list[torch.Tensor], step: int, before: str) -> str | None:
        """The error when ``tensors`` (the trainable weights, the open window's losses) hold a
        non-finite value on some rank, else None. Checked before every checkpoint and allocation
        (one host sync), so that neither keeps NaN weights: the loss itself is looked at only at
        log steps."""
        finite = torch.stack([t.detach().isfinite().all() for t in tensors]).all()
        if not ddp.any_flag([not finite.item()], self.dist, self.device)[0]:
            return None
        log.error("non-finite weights or loss at step %d, before %s: stopping", step, before)
        return f"non-finite training loss or weights at step {step} (found before {before})"

    def signalled(self) -> str | None:
        """The stop signal some rank received (every rank agrees), or None."""
        if not ddp.any_flag([self.signals.received is not None], self.dist, self.device)[0]:
            return None
        return self.signals.received or "a stop signal to another rank"

    def stop_requested(self, step: int) -> str | None:
        """Why the run stops after ``step`` (a stop signal, ``train.stop_after_step``), or None."""
        cause = self.signalled()
        if cause is None and self.tc.stop_after_step is not None and step >= self.tc.stop_after_step:
            cause = f"train.stop_after_step={self.tc.stop_after_step}"
        return cause

    def should_checkpoint(self, step: int) -> bool:
        """A periodic checkpoint is due (``train.checkpoint=periodic``: every ``checkpoint_every``
        steps, or ``checkpoint_minutes`` after the last one); every rank agrees."""
        tc = self.tc
        due = tc.checkpoint == "periodic" and (
            (tc.checkpoint_every and step % tc.checkpoint_every == 0)
            or time.time() - self.last_save > 60 * tc.checkpoint_minutes
        )
        return ddp.any_flag([bool(due)], self.dist, self.device)[0]

    def save(
        self, step: int, model: nn.Module, optimizer, scheduler=None, window: int = 0, running=None, **extra
    ):
        """Checkpoint the run at ``step``: trainable weights, optimizer, LR schedule, every rank's
        RNG, the best evaluation, the open logging window (so that a resumed run logs the same mean
        losses) and ``extra`` (what else the loop's resume needs). A collective: every rank calls
        it, rank 0 writes (unless ``train.checkpoint=none``)."""
        rngs = ddp.gather(rng_state(self.device), self.dist)
        if self.dist.main and self.tc.checkpoint != "none":
            state = {
                "step": step,
                "best": self.best,
                "elapsed": self.elapsed_before + time.time() - self.start_time,
                "trainable": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                "optimizer": optimizer.state_dict(),
                "rng": rngs,
                "window": window,
                **({"scheduler": scheduler.state_dict()} if scheduler is not None else {}),
                **({"running": running.detach().cpu()} if running is not None else {}),
                **extra,
            }
            save_checkpoint(self.checkpoint_path, state)
        self.last_save = time.time()

    # ---- the end
    def result(self, status: str, **fields) -> dict:
        """The run's result record (``status``: completed, failed, interrupted, pruned), written
        to ``result.json`` by rank 0 and returned."""
        out = {
            **self.header,
            "status": status,
            "steps": self.step,
            **self.summary(),
            "best": self.best,
            "wall_time_s": round(self.elapsed_before + time.time() - self.start_time, 2),
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
            **environment(),
            **fields,
        }
        if self.record is not None:
            self.record.result(out)
        return out


def _saved_result(run_dir: Path) -> dict:
    path = run_dir / "result.json"
    return json.loads(path.read_text()) if path.exists() else {}
