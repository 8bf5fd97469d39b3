"""Which GPUs each worker process gets: the processes of ``adabudget search`` (``search.workers``),
``adabudget reproduce --workers`` and the sweeper's ``n_jobs`` pool, each started with its own
``CUDA_VISIBLE_DEVICES``.

    assign(4, None)        # 4 GPUs visible: [["0"], ["1"], ["2"], ["3"]]
    assign(8, "1/2")       # 2 workers per GPU: [["0"], ["1"], ["2"], ["3"], ["0"], ["1"], ["2"], ["3"]]
    assign(2, 2)           # 2 GPUs per trial (a trial that runs torchrun): [["0", "1"], ["2", "3"]]
    assign(2, 1, [1, 3])   # CUDA_VISIBLE_DEVICES=4,5,6,7 in the shell: [["5"], ["7"]]

Invariants:

- A device is named by its index among the GPUs this process sees (``torch.cuda.device_count()``,
  which honours ``CUDA_VISIBLE_DEVICES``) and handed on as the entry the driver knows it by, so
  ``CUDA_VISIBLE_DEVICES=4,5`` in the shell and device 1 give a worker ``CUDA_VISIBLE_DEVICES=5``.
- No GPU visible and none asked for: every worker gets ``None`` (its environment is left as it is),
  so nothing changes on a CPU machine.
- Nothing is oversubscribed silently: ``workers x gpus_per_trial`` must fit the devices; packing
  ``k`` trials on one GPU is asked for explicitly (``gpus_per_trial=1/k``) and spreads the workers
  over every GPU before any GPU takes a second one. There is no memory management beyond that:
  the user picks ``k``.
"""

from __future__ import annotations

import contextlib
import os
from fractions import Fraction

from adabudget.config import ConfigError

ENV = "CUDA_VISIBLE_DEVICES"
# the config fields each caller's errors name: (workers, gpus per trial, devices)
SEARCH = ("search.workers", "search.gpus_per_trial", "search.devices")
REPRODUCE = ("--workers", "--gpus-per-cell", "--gpus")
SWEEPER = ("hydra.sweeper.n_jobs", "hydra.sweeper.gpus_per_trial", "hydra.sweeper.devices")


def visible_gpus() -> list[str]:
    """The GPUs this process sees, as ``CUDA_VISIBLE_DEVICES`` entries (ordinals or UUIDs).
    ``torch.cuda.device_count()`` asks NVML and does not initialise CUDA, so a process that
    forks its workers afterwards still may."""
    import torch

    count = torch.cuda.device_count()
    given = os.environ.get(ENV)
    if given is None:
        return [str(i) for i in range(count)]
    return [entry.strip() for entry in given.split(",")][:count]  # the driver stops at a bad entry


def per_trial(value, name: str = SEARCH[1]) -> Fraction | None:
    """``gpus_per_trial`` as a number: an integer >= 1, or ``1/k`` ("1/2", 0.5, 0.25) packing
    ``k`` trials on one GPU; None stays None (one GPU each where GPUs are visible)."""
    if value is None:
        return None
    try:
        share = Fraction(str(value).strip()) if not isinstance(value, float) else Fraction(value)
    except (ValueError, ZeroDivisionError):
        share = None
    if share is not None and share < 1 and share > 0:
        k = round(1 / share)
        share = Fraction(1, k) if abs(float(share) - 1 / k) < 1e-3 else None  # 0.333 is 1/3
    if isinstance(value, bool) or share is None or share <= 0 or (share >= 1 and share.denominator != 1):
        raise ConfigError(
            f"{name}: {value!r} is not a GPU count; give an integer >= 1 (GPUs per trial, for a trial "
            "that runs torchrun) or 1/k to pack k trials on one GPU (1/2, 1/4)"
        )
    return share


def parse_devices(value, name: str = SEARCH[2]) -> list[int] | None:
    """A device list as given: [0, 2], "0,2" (``--gpus``) or None (every visible GPU)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = [int(str(item).strip()) for item in items]
    except ValueError:
        raise ConfigError(
            f"{name}: {value!r}: give GPU indices as this process sees them (0, 1, ...; "
            f"`nvidia-smi -L` lists them, renumbered from 0 under {ENV})"
        ) from None
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise ConfigError(f"{name}: {value!r}: give distinct GPU indices >= 0, at least one")
    return out


def assign(
    workers: int,
    gpus_per_trial=None,
    devices=None,
    names: tuple[str, str, str] = SEARCH,
    visible: list[str] | None = None,
) -> list[list[str] | None]:
    """Each worker's GPUs (``CUDA_VISIBLE_DEVICES`` entries), or None for every worker on a
    machine without GPUs when none were asked for.

    Args:
        workers: worker processes started together.
        gpus_per_trial: GPUs each worker holds: an integer >= 1, or 1/k (k workers share a GPU);
            None: 1 where GPUs are visible.
        devices: indices among the visible GPUs to use; None: all of them.
        names: the config fields the errors name (``SEARCH``, ``REPRODUCE``, ``SWEEPER``).
        visible: the GPUs this process sees (default ``visible_gpus()``).

    Raises:
        ConfigError: a device index that does not exist, more GPUs per trial than the devices,
            or more workers than the devices hold at ``gpus_per_trial``.
    """
    workers_name, share_name, devices_name = names
    share, wanted = per_trial(gpus_per_trial, share_name), parse_devices(devices, devices_name)
    visible = visible_gpus() if visible is None else list(visible)
    seen = f"{len(visible)} GPU(s) visible" + (f" ({ENV}={os.environ[ENV]})" if ENV in os.environ else "")
    if not visible and wanted is None and share is None:
        return [None] * workers  # a CPU machine: the workers' environment is left as it is
    missing = [i for i in wanted or [] if i >= len(visible)]
    if missing:
        raise ConfigError(
            f"{devices_name}: device {missing[0]} does not exist: {seen}"
            + (f", indices 0-{len(visible) - 1}" if visible else "")
            + f"; name devices from that list (or leave {devices_name} unset for all of them)"
        )
    pool = [visible[i] for i in wanted] if wanted is not None else visible
    share = share or Fraction(1)
    if share > len(pool):
        raise ConfigError(
            f"{share_name}: {share} GPUs per trial, but {len(pool)} "
            + ("are given" if wanted is not None else "are visible")
            + f" ({seen}); lower {share_name} or give more devices"
        )
    if workers * share > len(pool):
        pack = -(-workers // len(pool))  # the k that fits every worker
        raise ConfigError(
            f"{workers_name}: {workers} workers x {share_name}={share} need {float(workers * share):g} "
            f"GPUs, {len(pool)} available; lower {workers_name}"
            + (f", or pack trials with {share_name}=1/{pack}" if pack > 1 and share <= 1 else "")
        )
    if share < 1:  # spread over every GPU first, then a second worker per GPU, ...
        return [[pool[i % len(pool)]] for i in range(workers)]
    g = int(share)
    return [pool[i * g : (i + 1) * g] for i in range(workers)]


def worker_env(gpus: list[str] | None) -> dict[str, str]:
    """The environment a worker process adds: its ``CUDA_VISIBLE_DEVICES``, or nothing."""
    return {} if gpus is None else {ENV: ",".join(gpus)}


def describe(assignment: list[list[str] | None], who: str = "worker") -> str:
    """One line for the command's start: which worker runs on which GPUs (empty on a CPU machine)."""
    if not any(gpus is not None for gpus in assignment):
        return ""
    return f"GPUs per {who}: " + ", ".join(f"{i}: {','.join(g)}" for i, g in enumerate(assignment) if g)


@contextlib.contextmanager
def environ(extra: dict[str, str]):
    """``os.environ`` with ``extra`` inside the block (a worker started inside it inherits them:
    spawn and fork both copy the environment at start), as it was after it."""
    before = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def in_this_process(gpus: list[str] | None, visible: list[str], devices_name: str = SEARCH[2]):
    """The one worker that runs in the calling process: its GPUs through ``CUDA_VISIBLE_DEVICES``
    while CUDA is not yet initialised here. Once it is, the visible set is fixed: the GPUs the
    process already uses first are fine, others are refused."""
    import torch

    if gpus is None or gpus == visible[: len(gpus)]:  # cuda:0.. are already these
        yield
        return
    if torch.cuda.is_initialized():
        raise ConfigError(
            f"{devices_name}: this process already uses CUDA, so it cannot switch to GPU(s) "
            f"{','.join(gpus)}; set {ENV} before Python starts, or start 2+ workers"
        )
    with environ(worker_env(gpus)):
        yield
