"""Under torch.distributed the allocator keeps the masks identical on every rank: it
averages the triplet scores before the top-k (two real gloo processes on CPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from budget.allocator import RankAllocator
    from budget.config import ModelConfig
    from budget.methods import apply_method, method_config_from_dict
    from budget.models import freeze_backbone, load_model

    torch.manual_seed(0)  # identical model on both ranks
    model = load_model(ModelConfig(name="tiny-bert"), 2, False)
    freeze_backbone(model, train_head=True)
    cfg = method_config_from_dict(
        {
            "name": "adalora",
            "init_r": 4,
            "target_r": 2,
            "warmup_steps": 1,
            "final_steps": 2,
            "mask_interval": 1,
        }
    )
    layers = apply_method(model, cfg)
    allocator = RankAllocator(layers, cfg, total_steps=8)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # different data, so different local scores
    ranks = []
    for step in range(1, 9):
        x = torch.randint(1000, 2000, (4, 10), generator=gen)
        model(input_ids=x, labels=torch.randint(0, 2, (4,), generator=gen)).loss.backward()
        opt.step()
        allocation = allocator.update_and_allocate(step)
        if allocation is not None:
            ranks.append(allocation.ranks)
        opt.zero_grad()
    out[rank] = ranks
    out[f"local{rank}"] = allocator.triplet_scores().tolist()  # this rank's own, unreduced scores
    dist.destroy_process_group()


def test_masks_identical_across_ranks():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    assert out[0] and out[0] == out[1]
    assert len(out[0]) >= 3
    # The local scores really differ between ranks: only the reduction makes the masks agree.
    assert out["local0"] != out["local1"]
