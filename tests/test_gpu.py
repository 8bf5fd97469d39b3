"""On a CUDA device: AdaLoRA and an AdaLoRA hybrid train, stop, resume to the same result and
export (an earlier allocator crashed at step 1: its allocator's buffers stayed on the CPU). Run with
``pytest -m gpu`` on a machine with a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adabudget.compose import resume_config
from adabudget.training import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
HYBRID = [
    "method=hybrid",
    "method.num_groups=2",
    "method.grouping=uniform",
    "method.groups=[{adalora: {init_r: 4, target_r: 2, mask_interval: 2}, bitfit: {}},"
    " {adalora: {init_r: 4, target_r: 2, mask_interval: 2}, adapter: {bottleneck: 8}}]",
]


@pytest.mark.parametrize("method", [[], HYBRID], ids=["adalora", "hybrid"])
def test_train_stop_resume_export_on_cuda(compose_run, method):
    full = train(compose_run(*method, "train.device=cuda", "run_name=full"))
    assert full["status"] == "completed" and sum(full["ranks"].values()) == 24
    assert full["peak_memory_mb"] > 0
    first = train(compose_run(*method, "train.device=cuda", "run_name=killed", "train.stop_after_step=9"))
    assert first["status"] == "interrupted"
    resumed = train(resume_config(first["run_dir"]))
    assert resumed["status"] == "completed"
    assert resumed["ranks"] == full["ranks"]
    for split in ("dev", "test"):
        for k, v in full["final"][split].items():
            assert resumed["final"][split][k] == pytest.approx(v, abs=1e-3)  # CUDA kernels: near, not bitwise
    adapter = Path(resumed["run_dir"]) / "adapter"
    assert any(adapter.glob("*.safetensors"))
    assert json.loads((Path(resumed["run_dir"]) / "result.json").read_text())["status"] == "completed"


def test_allocator_lives_on_the_factors_device(compose_run):
    from adabudget.allocator import RankAllocator
    from adabudget.config import ModelConfig
    from adabudget.methods import apply_method, method_config_from_dict
    from adabudget.models import load_model
    from adabudget.modules import freeze_backbone

    model = load_model(ModelConfig(name="tiny-bert"), 2, False)
    freeze_backbone(model, True)
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
    allocator = RankAllocator(apply_method(model, cfg), cfg, 8)  # built on the CPU, then the model moves
    model.cuda()
    ids = torch.randint(1000, 2000, (4, 9), device="cuda")
    for step in range(1, 9):
        model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1], device="cuda")).loss.backward()
        allocator.update_and_allocate(step)
        model.zero_grad()
    assert allocator._ibar_flat.is_cuda and allocator._mask.is_cuda
