"""Under torch.distributed the allocator keeps the masks identical on every rank: it
averages the triplet scores before the top-k (two real gloo processes on CPU)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from adabudget.allocator import RankAllocator
    from adabudget.config import ModelConfig
    from adabudget.methods import apply_method, method_config_from_dict
    from adabudget.models import load_model
    from adabudget.modules import freeze_backbone

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


@pytest.mark.slow  # 18 s: two torchrun processes; test_masks_identical_across_ranks stays default
def test_torchrun_two_processes_equal_one(tmp_path):
    """`torchrun --nproc_per_node 2 adabudget train ...` (gloo, CPU): the global batch of 32 is
    sharded 2 x 16; the losses and rank allocations equal a 1 x 32 run's, both ranks end with
    identical adapters, and one record is written (rank 0's)."""
    import json
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    script = Path(sysconfig.get_path("scripts")) / "adabudget"  # the console script itself
    common = [
        "train",
        "model=tiny-bert",
        "debug=fast",
        "method.init_r=4",
        "method.target_r=2",
        "train.num_threads=1",
        "model.dropout=0.0",
        "train.batch_size=32",
        "train.log_every=1",
        "train.lr=5e-3",
        "method.mask_interval=2",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(script),
            *common,
            f"runs_root={tmp_path / 'two'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("status: completed") == 1  # rank 0 speaks for the run
    one = subprocess.run(
        [str(script), *common, f"runs_root={tmp_path / 'one'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    (run2,) = (tmp_path / "two" / "default").iterdir()  # one record
    (run1,) = (tmp_path / "one" / "default").iterdir()
    result = json.loads((run2 / "result.json").read_text())
    assert result["world_size"] == 2 and result["ddp"]["identical_on_all_ranks"] is True

    def rows(run, name):
        return [json.loads(line) for line in (run / name).read_text().splitlines()]

    loss1 = [r["loss"] for r in rows(run1, "metrics.jsonl") if r["split"] == "train"]
    loss2 = [r["loss"] for r in rows(run2, "metrics.jsonl") if r["split"] == "train"]
    assert len(loss1) == len(loss2) == 20
    for a, b in zip(loss1, loss2):
        assert abs(a - b) <= 1e-5 * abs(a)
    assert [r["ranks"] for r in rows(run1, "ranks.jsonl")] == [r["ranks"] for r in rows(run2, "ranks.jsonl")]
    assert (
        len(rows(run2, "ranks.jsonl")) > 3 and rows(run2, "ranks.jsonl")[-1]["final"]
    )  # shrunk, re-wrapped, went on


@pytest.mark.slow  # ~70 s on 2 busy cores: two two-node runs (stopped, then resumed)
def test_torchrun_on_two_nodes_writes_one_record_from_global_rank_0(tmp_path):
    """``torchrun --nnodes=2 --nproc_per_node=1`` started twice, as on two nodes: two launchers meet
    at a c10d rendezvous (here on localhost), each from its own working directory, with
    ``runs_root`` a folder both see (a shared filesystem on a cluster). The run stops at step 6
    and is resumed the same way: the rank on the other node reads the checkpoint rank 0 wrote in
    the shared folder. The run has one record, written by global rank 0 alone (its launcher
    prints the result, the other says nothing of it), both ranks end with identical adapters,
    and nothing lands in either node's working directory."""
    import json
    import socket
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    script = Path(sysconfig.get_path("scripts")) / "adabudget"
    shared = tmp_path / "shared"
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline")

    def on_two_nodes(*args: str) -> list[str]:
        """``adabudget train *args`` under two torchrun launchers (one per "node"); their stdout."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
        launcher += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=run{port}"]
        launcher += ["--local-addr=127.0.0.1", str(script), "train", *args]
        options = {"env": env, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        procs = [subprocess.Popen(launcher, cwd=node, **options) for node in nodes]
        outs = [p.communicate(timeout=600) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
        return [out for out, _ in outs]

    run = ["model=tiny-bert", "debug=fast", "method.init_r=4", "method.target_r=2", "train.num_threads=1"]
    run += ["train.max_steps=12", "method.mask_interval=2", f"runs_root={shared}"]
    outs = on_two_nodes(*run, "train.stop_after_step=6")
    assert sorted(out.count("status: interrupted") for out in outs) == [0, 1]  # global rank 0's launcher
    (run_dir,) = (shared / "default").iterdir()
    assert json.loads((run_dir / "result.json").read_text())["status"] == "interrupted"

    outs = on_two_nodes(f"resume={run_dir}")
    assert sorted(out.count("status: completed") for out in outs) == [0, 1]
    assert [p.name for p in (shared / "default").iterdir()] == [run_dir.name]  # one record
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["world_size"] == 2
    assert result["ddp"]["identical_on_all_ranks"] is True  # every rank's adapter digest, gathered
    assert any((run_dir / "adapter").glob("*.safetensors"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["split"] == "train"]
    assert steps == [5, 10, 12]  # one writer: each logged step once (every 5 steps and the last)
    assert [list(node.iterdir()) for node in nodes] == [[], []]
