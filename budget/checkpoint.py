"""Checkpoints: the RNG state of a process, and save / load that survive a kill at any moment.

    <run_dir>/checkpoints/last.pt   the newest checkpoint
    <run_dir>/checkpoints/prev.pt   the one before it, the fallback when last.pt is unreadable

A save writes a uniquely named temporary file (``mkstemp``: two writers never truncate each
other's), fsyncs it, moves ``last.pt`` to ``prev.pt``, renames the temporary file to ``last.pt``
and fsyncs the folder, so that a crash or a full disk leaves at least one whole checkpoint.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from adabudget.log import fsync_dir, log, temp_beside

PREVIOUS = "prev.pt"


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
    from adabudget.config import ConfigError

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
