"""Checkpoints: the RNG state of a process, and save / load that survive a kill at any moment.

    <run_dir>/checkpoints/last.pt   the newest checkpoint
    <run_dir>/checkpoints/prev.pt   the one before it, the fallback when last.pt is unreadable

A save writes a uniquely named temporary file (``mkstemp``: two writers never truncate each
other's), fsyncs it, moves ``last.pt`` to ``prev.pt``, renames the temporary file to ``last.pt``
and fsyncs the folder, so that a crash or a full disk leaves at least one whole checkpoint.

A checkpoint is what a resume continues from, and ``RESUMABLE`` says what a resumed run may
change; ``check_resume`` is the one check of both (``adabudget.compose.resume_config`` checks
the overrides of a resume with it, ``adabudget.compose.resumed`` a whole config).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from adabudget.config import ConfigError
from adabudget.log import flat_config, fsync_dir, log, temp_beside

PREVIOUS = "prev.pt"
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


def resumable(key: str) -> bool:
    """The dotted config key ``key`` may change when a run is resumed (``RESUMABLE``)."""
    return key in ("resume", "run_dir") or any(key == r or key.startswith(r + ".") for r in RESUMABLE)


def check_resume(run_dir: str | Path, changes: dict[str, str] | None = None) -> Path:
    """Refuse a resume of ``run_dir`` that cannot be one; returns the folder.

    ``run_dir`` must be a run folder (its ``config.yaml``) with a checkpoint to continue from,
    and ``changes`` ({dotted key: the change as the error shows it}) may touch only ``RESUMABLE``
    knobs: a resumed run keeps its config. Every refusal is a ConfigError naming the keys.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"resume={run_dir}: not a run folder (no config.yaml); pass a folder under runs/")
    if not has_checkpoint(run_dir / "checkpoints" / "last.pt"):
        raise ConfigError(
            f"resume={run_dir}: no checkpoints/last.pt to continue from (the run was killed before its first "
            "checkpoint, or ran with train.checkpoint=none)"
        )
    refused = [shown for key, shown in (changes or {}).items() if not resumable(key)]
    if refused:
        raise ConfigError(
            f"resume={run_dir}: {', '.join(refused[:6])} cannot change on resume: a resumed run keeps its "
            f"config, and these differ from its config.yaml. What may change: {', '.join(RESUMABLE)}. Start "
            "a new run for anything else"
        )
    return run_dir


def config_changes(saved: dict, mine: dict) -> dict[str, str]:
    """{dotted key: ``key (old -> new)``} of every knob in which two configs (as plain dicts) differ."""
    old, new = flat_config(saved), flat_config(mine)
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return {k: f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in keys}


def rng_state(device) -> dict:
    """Every RNG of this process as tensors and plain values (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
    }


def set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])  # a CPU byte tensor: the checkpoint is loaded on the CPU
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )


def previous_of(path: Path) -> Path:
    """Where ``save_checkpoint`` keeps the checkpoint before ``path``."""
    return Path(path).with_name(PREVIOUS)


def has_checkpoint(path: Path) -> bool:
    """``path`` or its previous checkpoint exists (a save killed between its two renames leaves
    only the previous one)."""
    return Path(path).exists() or previous_of(path).exists()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically, keeping the checkpoint it replaces as ``prev.pt``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before any rename points at them
        if path.exists():
            os.replace(path, previous_of(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path``, or, when it is missing or unreadable (a zero-byte or torn
    file), the previous one with a warning naming both. Tensors and plain values only: a
    crafted file in a shared run folder cannot run code."""
    path = Path(path)
    prev = previous_of(path)
    try:
        return _load(path)
    except Exception as err:
        why = _why(path, err)
    if not prev.exists():
        raise ConfigError(
            f"{why}, and there is no {prev} to fall back to: no checkpoint is left to continue "
            "from; start a new run"
        ) from None
    try:
        state = _load(prev)
    except Exception as err:
        raise ConfigError(
            f"{why}, and {_why(prev, err)}: no checkpoint is left to continue from; start a new run"
        ) from None
    log.warning(
        "%s; continuing from the previous checkpoint %s (step %s) instead", why, prev, state.get("step")
    )
    return state


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _why(path: Path, err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return f"{path} is missing"
    if path.stat().st_size == 0:
        return f"{path} is empty (0 bytes)"
    first = (str(err).strip().splitlines() or [""])[0][:120]
    return f"{path} is unreadable ({type(err).__name__}: {first})"
