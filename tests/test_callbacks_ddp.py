"""AdaBudgetCallback under a real two-process DDP ``Trainer`` (gloo on CPU, launched as torchrun
would: RANK / WORLD_SIZE / MASTER_* in the environment). A physical shrink is refused before
the first step; with ``shrink="never"`` both ranks train and keep identical masks.

Marked slow: the two spawned interpreters import torch and transformers again (10-20 s on 2
cores). tests/test_callbacks.py covers the refusal in one process with world_size faked.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    import torch
    import torch.distributed as dist
    from adabudget.callbacks import add_adalora
    from adabudget.config import ConfigError
    from test_callbacks import CFG, RandomTokens, make_args, tiny_bert  # tests/ is on the inherited sys.path
    from transformers import Trainer

    torch.set_num_threads(1)
    args = make_args(out["tmp"], gradient_accumulation_steps=1, num_train_epochs=1)  # 16 samples per rank
    out[f"world{rank}"] = (args.world_size, dist.is_initialized())
    model = tiny_bert()
    _, callback = add_adalora(model, {**CFG, "shrink": "final"})
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(32), callbacks=[callback])
    try:
        trainer.train()
        out[f"refused{rank}"] = None
    except ConfigError as err:
        out[f"refused{rank}"] = str(err)

    model = tiny_bert()
    layers, callback = add_adalora(model, {**CFG, "shrink": "never"})
    Trainer(model=model, args=args, train_dataset=RandomTokens(32), callbacks=[callback]).train()
    out[f"history{rank}"] = [(h["step"], h["ranks"]) for h in callback.history]
    out[f"rank{rank}"] = sum(lay.rank for lay in layers.values())


def test_trainer_under_ddp_refuses_shrink_and_trains_without(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    out["tmp"] = tmp_path
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    for rank in (0, 1):
        assert out[f"world{rank}"] == (2, True)
        assert out[f"refused{rank}"].startswith(
            "method.shrink=final: the Trainer runs distributed (world_size=2)"
        )
        assert out[f"rank{rank}"] == 48  # masked, not removed
    # 16 samples per rank / batch 2 = 8 optimizer steps: one allocation, the final one at
    # T - t_f = 4; the all-reduced scores give both ranks the same masks.
    assert out["history0"] and out["history0"] == out["history1"]
    assert sum(out["history0"][-1][1].values()) == 24
