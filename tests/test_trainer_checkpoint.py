"""Trainer checkpoints with AdaBudgetCallback: a peft adapter at the current rank pattern in every
``checkpoint-N/``, and ``trainer.train(resume_from_checkpoint=...)`` continuing the allocation.

A real ``transformers.Trainer`` on tiny-bert (dropout off, CPU, ``report_to=[]``): 32 random
samples, batch 2, accumulation 2, 2 epochs = T = 16 optimizer steps; AdaLoRA allocates at steps
4, 6, 8, 10 and 12 (final, physical shrink), b(T) = 8 over 12 matrices at init_r 4, so some
modules end at rank 0 and their factors leave the optimizer. Checkpoints every 4 steps.

Resumed from checkpoint-4 (mid-epoch: the Trainer skips the batches already seen; before the
shrink: the EMAs decide the allocations at 6 to 12) and from checkpoint-12 (after the shrink: the
fresh model takes the shrunk shapes while the Trainer loads the weights), a fresh model, callback,
optimizer and Trainer end where the uninterrupted run ends: same allocations, same allocator
state (Ī, Ū, mask), same weights. Nothing is expected to differ: the Trainer seeds the data
order per epoch and restores the RNG state, the backbone is frozen and dropout off; the
comparison allows float round-off only (1e-6), and the ranks and masks must be identical.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from adabudget.callbacks import ADAPTER_DIR, ALLOCATOR_FILE, adalora_optimizer, add_adalora
from adabudget.config import ConfigError
from adabudget.export import export_peft_adapter
from test_callbacks import RandomTokens, make_args, tiny_bert
from transformers import Trainer, TrainerCallback

# 12 matrices at init_r 4: b(0) = 48 -> b(T) = 8; λ at 4x the learning rate of P and Q.
CFG = {
    "init_r": 4,
    "target_total_rank": 8,
    "warmup_steps": 2,
    "final_steps": 4,
    "mask_interval": 2,
    "lambda_lr_ratio": 4,
}
LR = 1e-2
SAVE_STEPS = 4
TOL = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def probe_batch() -> dict:
    batch = RandomTokens(4, seed=1)[:4]
    batch.pop("labels")
    return batch


class LogitsAtSave(TrainerCallback):
    """The model's logits on a fixed batch at every checkpoint: the adabudget model at that step."""

    def __init__(self):
        self.logits = {}

    @torch.no_grad()
    def on_save(self, args, state, control, model=None, **kwargs):
        self.logits[state.global_step] = model(**probe_batch()).logits.clone()


def trainer_for(output_dir, cfg=CFG, own_optimizer=True, callbacks=(), **callback_options):
    """A fresh tiny-bert with AdaLoRA, its callback and a Trainer saving every SAVE_STEPS steps."""
    model = tiny_bert()
    layers, callback = add_adalora(model, cfg, **callback_options)
    optimizers = (adalora_optimizer(model, callback.cfg, lr=LR), None) if own_optimizer else (None, None)
    args = make_args(output_dir, learning_rate=LR, save_strategy="steps", save_steps=SAVE_STEPS)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=RandomTokens(32),
        callbacks=[callback, *callbacks],
        optimizers=optimizers,
    )
    return model, layers, callback, trainer


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def uninterrupted(root, **kw):
    probe = LogitsAtSave()
    model, layers, callback, trainer = trainer_for(root, callbacks=[probe], **kw)
    trainer.train()
    # the export at the end, as README and docs/run-record.md show it
    export_peft_adapter(model, layers, root / "adapter", base_model_name_or_path=model.name_or_path)
    return {
        "dir": root,
        "history": callback.history,
        "allocator": callback.allocator.state_dict(),
        "ranks": {n: lay.rank for n, lay in layers.items()},
        "weights": trainable(model),
        "logits": probe.logits,
        "final_logits": model(**probe_batch()).logits.detach(),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, with the user's optimizer (adalora_optimizer, λ at 4x)."""
    return uninterrupted(tmp_path_factory.mktemp("reference"))


def assert_same_run(resumed: dict, ref: dict) -> None:
    assert [h["step"] for h in resumed["history"]] == [4, 6, 8, 10, 12]
    for got, want in zip(resumed["history"], ref["history"]):
        assert {k: got[k] for k in ("step", "budget", "kept", "final", "ranks", "kept_mask")} == {
            k: want[k] for k in ("step", "budget", "kept", "final", "ranks", "kept_mask")
        }
        for name in want["scores"]:  # rounded to 4 significant digits when recorded
            assert got["scores"][name] == pytest.approx(want["scores"][name], rel=1e-3, abs=1e-9)
    got, want = resumed["allocator"], ref["allocator"]
    assert got["ranks"] == want["ranks"] == ref["ranks"] == resumed["ranks"]
    assert got["fixed"] is want["fixed"] is True
    assert torch.equal(got["mask"], want["mask"])
    for key in ("ibar", "ubar"):
        torch.testing.assert_close(got[key], want[key], **TOL)
    assert resumed["weights"].keys() == ref["weights"].keys()
    for name, w in ref["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], w, **TOL)
    torch.testing.assert_close(resumed["final_logits"], ref["final_logits"], **TOL)


def resume(output_dir, checkpoint, **kw) -> dict:
    model, layers, callback, trainer = trainer_for(output_dir, **kw)
    trainer.train(resume_from_checkpoint=checkpoint)
    return {
        "history": callback.history,
        "allocator": callback.allocator.state_dict(),
        "ranks": {n: lay.rank for n, lay in layers.items()},
        "weights": trainable(model),
        "final_logits": model(**probe_batch()).logits.detach(),
        "callback": callback,
        "trainer": trainer,
    }


def test_the_reference_run_prunes_modules_to_rank_0(reference):
    ranks = reference["history"][-1]["ranks"]
    assert sum(ranks.values()) == 8 and 0 in ranks.values()  # emptied factors: the hard case
    for step in (4, 8, 12, 16):
        folder = reference["dir"] / f"checkpoint-{step}"
        assert (folder / ALLOCATOR_FILE).is_file()
        assert (folder / ADAPTER_DIR / "adapter_config.json").is_file()
        assert (folder / ADAPTER_DIR / "adapter_model.safetensors").is_file()


def test_resume_before_the_shrink_in_the_output_dir(reference, tmp_path):
    # checkpoint-4 sits in epoch 1 (8 steps each): the Trainer skips the 8 micro-batches seen;
    # the EMAs restored from it decide the allocations at steps 6 to 12.
    shutil.copytree(reference["dir"] / "checkpoint-4", tmp_path / "checkpoint-4")
    resumed = resume(tmp_path, True)  # the last checkpoint of args.output_dir
    assert resumed["trainer"].state.global_step == 16
    assert_same_run(resumed, reference)


def test_resume_after_the_shrink_from_another_folder(reference, tmp_path):
    # checkpoint-12 holds shrunk factors (some empty); a fresh model at init_r takes those shapes,
    # its optimizer (built at init_r, given to the Trainer) the new parameters, and the
    # allocator state is read from the folder named by resume_from.
    checkpoint = reference["dir"] / "checkpoint-12"
    resumed = resume(tmp_path / "out", str(checkpoint), resume_from=checkpoint)
    assert_same_run(resumed, reference)
    optimizer = resumed["trainer"].optimizer.optimizer
    layers = resumed["callback"].layers
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for lay in layers.values():
        assert (id(lay.lam) in held) == (lay.rank > 0)
        if lay.rank:
            assert optimizer.state[lay.P]["exp_avg"].shape == lay.P.shape
            assert int(optimizer.state[lay.P]["step"]) == 16


def test_resume_with_the_trainers_own_optimizer(tmp_path):
    # The Trainer builds its optimizer after loading the checkpoint: from the shrunk parameters.
    cfg = {**CFG, "lambda_lr_ratio": 1}
    ref = uninterrupted(tmp_path / "ref", cfg=cfg, own_optimizer=False)
    shutil.copytree(ref["dir"] / "checkpoint-12", tmp_path / "out" / "checkpoint-12")
    resumed = resume(tmp_path / "out", str(tmp_path / "out" / "checkpoint-12"), cfg=cfg, own_optimizer=False)
    assert_same_run(resumed, ref)


def test_every_checkpoint_adapter_loads_in_peft_with_the_ranks_of_its_step(reference):
    peft = pytest.importorskip("peft")
    history = reference["history"]
    for step, logits in reference["logits"].items():
        folder = reference["dir"] / f"checkpoint-{step}" / ADAPTER_DIR
        ranks = [h for h in history if h["step"] <= step][-1]["ranks"]  # the last allocation before
        config = json.loads((folder / "adapter_config.json").read_text())
        live = {n: r for n, r in ranks.items() if r > 0}
        assert sorted(config["target_modules"]) == sorted(live)  # rank-0 modules left out
        assert {n: config["rank_pattern"].get(n, config["r"]) for n in live} == live
        model = peft.PeftModel.from_pretrained(tiny_bert(), str(folder)).eval()
        with torch.no_grad():
            got = model(**probe_batch()).logits
        torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-5)
    # and the adapter is the step's own: the ranks moved between checkpoints 4 and 12
    assert history[0]["ranks"] != history[-1]["ranks"]
    # the final export: the final ranks, the trained model's logits
    config = json.loads((reference["dir"] / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(n for n, r in reference["ranks"].items() if r > 0)
    model = peft.PeftModel.from_pretrained(tiny_bert(), str(reference["dir"] / "adapter")).eval()
    with torch.no_grad():
        got = model(**probe_batch()).logits
    torch.testing.assert_close(got, reference["final_logits"], rtol=1e-5, atol=1e-5)


def test_resume_refuses_a_changed_config(reference, tmp_path):
    shutil.copytree(reference["dir"] / "checkpoint-8", tmp_path / "checkpoint-8")
    _, _, _, trainer = trainer_for(tmp_path, cfg={**CFG, "mask_interval": 4})
    with pytest.raises(ConfigError, match=r"method.mask_interval=4: .* was trained with mask_interval=2"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 8  # nothing trained


def test_resume_without_the_allocator_state_says_where_it_looked(reference, tmp_path):
    shutil.copytree(reference["dir"] / "checkpoint-8", tmp_path / "checkpoint-8")
    (tmp_path / "checkpoint-8" / ALLOCATOR_FILE).unlink()
    _, _, _, trainer = trainer_for(tmp_path)
    with pytest.raises(RuntimeError, match="resumes at step 8 but no allocator state") as err:
        trainer.train(resume_from_checkpoint=True)
    assert f"checkpoint-8/{ALLOCATOR_FILE} (missing)" in str(err.value) and "resume_from=" in str(err.value)
