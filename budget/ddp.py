"""Data-parallel training under ``torchrun``: one process per device, each global batch
sharded across the processes, gradients averaged by ``DistributedDataParallel``, and only
rank 0 writing the record, checkpoints and exports (as nanoGPT: ``ddp = RANK is set``).

    torchrun --nproc_per_node 2 $(command -v adabudget) train ...

``train.batch_size`` stays the *global* batch: with N processes each takes every N-th
example of it, so a 2 x 16 run sees the batches a 1 x 32 run sees. The loss of a shard is
weighted by its share of the batch, so that the averaged gradient is the full batch's
gradient even when the last batch of an epoch does not split evenly.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group (and so destroy it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init(device: str) -> Dist:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), its process group initialised:
    NCCL when the run uses CUDA, gloo otherwise. A plain process gets ``Dist()``."""
    if int(os.environ.get("RANK", -1)) == -1 or int(os.environ.get("WORLD_SIZE", 1)) < 2:
        return Dist()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    owns = not dist.is_initialized()
    if owns:
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local_rank, owns)


def shutdown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj, d: Dist):
    """Rank 0's ``obj`` on every rank."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, d: Dist) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not d.active:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def any_flag(flags: list[bool], d: Dist, device) -> list[bool]:
    """Element-wise OR over the ranks: one small all-reduce, so that every rank decides alike."""
    if not d.active:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of a scalar over the ranks (for logging)."""
    if not d.active:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / d.world


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def shard(batch: dict[str, torch.Tensor], d: Dist) -> tuple[dict[str, torch.Tensor], float]:
    """This rank's rows of a global batch and the weight of its mean loss (rows x world / batch).

    A rank left without a row (a last batch smaller than the world) gets the first row at
    weight 0, so that every rank still runs the forward and backward DDP waits for.
    """
    if not d.active:
        return batch, 1.0
    n = next(iter(batch.values())).shape[0]
    rows = list(range(d.rank, n, d.world))
    if not rows:
        return {k: v[:1] for k, v in batch.items()}, 0.0
    local = {k: v[rows] for k, v in batch.items()}
    if "attention_mask" in local:  # trim the padding this shard does not need
        longest = int(local["attention_mask"].sum(1).max())
        local = {k: v[:, :longest] if v.dim() == 2 else v for k, v in local.items()}
    return local, len(rows) * d.world / n


def wrap(model: torch.nn.Module, d: Dist, device) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` under torchrun, else ``model`` itself. Wrap it again
    after its trainable parameters change (an AdaLoRA shrink): DDP buckets the parameters it saw."""
    if not d.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def identical_on_all_ranks(model: torch.nn.Module, d: Dist) -> bool:
    """Every rank holds the same trainable weights (a digest of each, gathered)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return len(set(gather(h.hexdigest(), d))) == 1
