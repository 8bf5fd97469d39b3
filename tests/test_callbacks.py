"""AdaBudgetCallback inside a real ``transformers.Trainer`` (tiny-bert, CPU, random token ids).

Covers: outputs at init equal the base model's; allocations at optimizer steps (not
micro-batches) under gradient accumulation, each keeping exactly the scheduled budget; the
final shrink of layers and optimizer state with training going on after it; the orthogonal
penalty's gradient added exactly once per optimizer step and before gradient clipping;
``adalora_optimizer``'s λ group under the Trainer's own scheduler; and the loud failures (no
allocation planned, training stopped before the first allocation, phases that do not fit T,
factors missing from the optimizer, λ at the wrong learning rate, shrinking under DDP).
"""

from __future__ import annotations

import copy

import pytest
import torch
from adabudget.callbacks import AdaBudgetCallback, adalora_optimizer, add_adalora
from adabudget.config import ConfigError, ModelConfig
from adabudget.methods import method_config_from_dict
from adabudget.methods.adalora import orth_penalty
from adabudget.models import load_model
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

# 12 adapted matrices (2 layers x 6) at rank 4: b(0) = 48, b(T) = 24. λ at the same learning
# rate as P and Q, so the Trainer's default single-group optimizer is the right one.
CFG = {
    "init_r": 4,
    "target_r": 2,
    "warmup_steps": 2,
    "final_steps": 4,
    "mask_interval": 2,
    "lambda_lr_ratio": 1,
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a busy CPU two threads make each
    32 x 32 matmul ~100x slower (measured): run this module single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq_len: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 30522, (n, seq_len), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def tiny_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = load_model(ModelConfig(name="tiny-bert"), 2, False)
    for m in model.modules():  # deterministic gradients whatever the batch order
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def make_args(tmp_path, args_class=TrainingArguments, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return args_class(**kwargs)


class GradProbe(TrainerCallback):
    """Copies the P / Q gradients and the total gradient norm where the optimizer will see them."""

    def __init__(self, layers):
        self.layers = layers
        self.grads, self.norms = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.grads.append({n: (lay.P.grad.clone(), lay.Q.grad.clone()) for n, lay in self.layers.items()})
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())


class LamProbe(TrainerCallback):
    """Counts the live (non-zero) λ after every optimizer step, and the total rank."""

    def __init__(self, layers):
        self.layers = layers
        self.live, self.rank = {}, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.live[state.global_step] = sum(int((lay.lam != 0).sum()) for lay in self.layers.values())
        self.rank[state.global_step] = sum(lay.rank for lay in self.layers.values())


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_outputs_at_init_equal_base_model():
    base = tiny_bert().eval()
    model = copy.deepcopy(base)
    layers, _ = add_adalora(model, CFG)
    assert len(layers) == 12
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[-1] in ("P", "lam", "Q") or "classifier" in n for n in trainable)
    batch = RandomTokens(4)[:4]
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits, rtol=0, atol=0)


def test_trainer_allocates_at_optimizer_steps_and_shrinks(tmp_path):
    model = tiny_bert()
    layers, callback = add_adalora(model, CFG)
    probe = LamProbe(layers)
    # 32 samples / batch 2 = 16 micro-batches per epoch, / accumulation 2 = 8 optimizer steps; 2 epochs.
    args = make_args(tmp_path)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(32), callbacks=[callback, probe])
    trainer.train()
    alloc = callback.allocator
    assert trainer.state.global_step == alloc.total_steps == 16
    # T - t_f = 12: allocations every ΔT = 2 optimizer steps after t_i = 2, the final one at 12.
    assert [h["step"] for h in callback.history] == [4, 6, 8, 10, 12]
    assert [h["final"] for h in callback.history] == [False] * 4 + [True]
    for h in callback.history:
        assert h["budget"] == alloc.budget_at(h["step"])
        assert sum(h["ranks"].values()) == h["kept"] == h["budget"]
    assert callback.history[0]["budget"] < 48 and callback.history[-1]["budget"] == 24
    # The masks act right after the optimizer step they are labelled with (not one step late).
    assert probe.live[3] == 48
    for h in callback.history:
        assert probe.live[h["step"]] == h["kept"]
    assert probe.rank == {s: 48 if s < 12 else 24 for s in range(1, 17)}
    logged = [e for e in trainer.state.log_history if "adalora/kept" in e]
    assert [(e["step"], e["adalora/kept"]) for e in logged] == [
        (h["step"], h["kept"]) for h in callback.history
    ]

    # Shrunk at step 12 to the final pattern, and the optimizer trained the new tensors 4 more steps.
    final = callback.history[-1]["ranks"]
    assert {n: lay.rank for n, lay in layers.items()} == final == alloc.ranks()
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around torch's AdamW
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for lay in layers.values():
        for p in (lay.P, lay.lam, lay.Q):
            assert id(p) in held
            if p.numel():
                state = optimizer.state[p]
                assert state["exp_avg"].shape == state["exp_avg_sq"].shape == p.shape
                assert int(state["step"]) == 16
                assert all(torch.isfinite(p).all() for p in (lay.P, lay.lam, lay.Q))


def perturbed_copies(gammas, seed: int = 0):
    """Identical AdaLoRA models, one per γ, with non-zero λ and non-orthogonal P, Q (R and ∇R ≠ 0)."""
    model = tiny_bert()
    layers, _ = add_adalora(model, CFG)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lay in layers.values():
            lay.lam.copy_(torch.randn(lay.lam.shape, generator=g))
            lay.P.add_(0.3 * torch.randn(lay.P.shape, generator=g))
            lay.Q.add_(0.3 * torch.randn(lay.Q.shape, generator=g))
    out = []
    for gamma in gammas:
        m = copy.deepcopy(model)
        lays = {n: m.get_submodule(n) for n in layers}
        cfg = method_config_from_dict({"name": "adalora", **CFG, "orth_reg_weight": gamma})
        out.append((m, lays, AdaBudgetCallback(lays, cfg)))
    return out


def first_step_grads(tmp_path, gamma: float, **overrides) -> GradProbe:
    """Train a perturbed copy with penalty weight γ; 4 samples, batch 2, accumulation 2: every
    optimizer step sees the whole data set in two micro-batches, so step 1 has the same task
    gradient whatever the shuffling."""
    model, layers, callback = perturbed_copies([gamma])[0]
    probe = GradProbe(layers)
    args = make_args(tmp_path, num_train_epochs=8, **overrides)  # 8 optimizer steps: T fits t_i + t_f
    Trainer(model=model, args=args, train_dataset=RandomTokens(4), callbacks=[callback, probe]).train()
    assert len(probe.norms) == 8
    return probe


def test_orth_penalty_gradient_added_once_per_optimizer_step(tmp_path):
    gamma = 0.5
    with_pen = first_step_grads(tmp_path, gamma, max_grad_norm=0.0).grads[0]  # no clipping
    without = first_step_grads(tmp_path, 0.0, max_grad_norm=0.0).grads[0]
    # Expected difference: γ ∇R(P, Q) at the initial factors, once (not once per micro-batch).
    _, ref_layers, _ = perturbed_copies([gamma])[0]
    (gamma * orth_penalty(list(ref_layers.values()), True)).backward()
    for name, lay in ref_layers.items():
        (p_with, q_with), (p_without, q_without) = with_pen[name], without[name]
        assert lay.P.grad.abs().max() > 1e-3 and p_without.abs().max() > 1e-6  # both terms present
        torch.testing.assert_close(p_with - p_without, lay.P.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(q_with - q_without, lay.Q.grad, rtol=1e-4, atol=1e-6)


def test_orth_penalty_is_added_before_gradient_clipping(tmp_path):
    # γ = 10 makes the penalty's gradient dominate; had it been added after the clip, the
    # gradient the optimizer sees would be far above max_grad_norm.
    max_norm = 1e-3
    probe = first_step_grads(tmp_path, 10.0, max_grad_norm=max_norm)
    assert all(n <= max_norm * (1 + 1e-4) for n in probe.norms)
    unclipped = first_step_grads(tmp_path, 10.0, max_grad_norm=0.0)
    assert unclipped.norms[0] > 100 * max_norm


def test_no_planned_allocation_fails_before_training(tmp_path):
    # total_steps counted in samples (32 x 2 epochs) instead of optimizer steps (16): t_i = 0.3 T = 19.
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    _, callback = add_adalora(model, {**CFG, "warmup_steps": 0.3, "final_steps": 0.3}, total_steps=64)
    trainer = Trainer(
        model=model, args=make_args(tmp_path), train_dataset=RandomTokens(32), callbacks=[callback]
    )
    with pytest.warns(UserWarning, match="total_steps=64"), pytest.raises(RuntimeError) as err:
        trainer.train()
    msg = str(err.value)
    assert "no rank allocation can run in 16 optimizer steps: the first one is due at step 20" in msg
    assert "total_steps=64 exceeds the Trainer's max_steps=16" in msg and "total_steps=None" in msg
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k in before)


def test_training_stopped_before_first_allocation_raises_at_end(tmp_path):
    model = tiny_bert()
    _, callback = add_adalora(model, CFG)
    args = make_args(tmp_path)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(32), callbacks=[callback, StopAt(3)])
    with pytest.raises(RuntimeError, match="no rank allocation ran in 3 optimizer steps") as err:
        trainer.train()
    assert "first one is due at step 4" in str(err.value) and "stopped early" in str(err.value)
    assert callback.history == []


def test_phases_that_do_not_fit_fail_before_any_step(tmp_path):
    with pytest.raises(ConfigError, match="t_i=10 \\+ t_f=8 >= T=16"):
        add_adalora(tiny_bert(), {**CFG, "warmup_steps": 10, "final_steps": 8}, total_steps=16)
    model = tiny_bert()
    _, callback = add_adalora(model, {**CFG, "warmup_steps": 10, "final_steps": 8})  # T from the Trainer
    trainer = Trainer(
        model=model, args=make_args(tmp_path), train_dataset=RandomTokens(32), callbacks=[callback]
    )
    with pytest.raises(ConfigError, match="T=16"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_factors_missing_from_a_user_optimizer_fail(tmp_path):
    model = tiny_bert()
    optimizer = torch.optim.AdamW([p for p in model.parameters()], lr=1e-3)  # built before wrapping
    _, callback = add_adalora(model, CFG)
    trainer = Trainer(
        model=model,
        args=make_args(tmp_path),
        train_dataset=RandomTokens(32),
        callbacks=[callback],
        optimizers=(optimizer, None),
    )
    with pytest.raises(RuntimeError, match="optimizer does not hold the AdaLoRA factors"):
        trainer.train()


class LrProbe(TrainerCallback):
    """The learning rate of each optimizer group at every optimizer step, as the step used it."""

    def __init__(self):
        self.lrs = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])  # the scheduler steps after this event


def test_adalora_optimizer_groups_follow_the_trainer_scheduler(tmp_path):
    model = tiny_bert()
    layers, callback = add_adalora(model, {**CFG, "lambda_lr_ratio": 64})
    optimizer = adalora_optimizer(model, callback.cfg, lr=1e-3)
    rest, lam = optimizer.param_groups
    assert lam["lr"] == 64e-3 and rest["lr"] == 1e-3
    assert {id(p) for p in lam["params"]} == {id(lay.lam) for lay in layers.values()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in rest["params"]} == trainable - {id(lay.lam) for lay in layers.values()}

    probe = LrProbe()
    args = make_args(tmp_path, learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=4)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=RandomTokens(32),
        callbacks=[callback, probe],
        optimizers=(optimizer, None),
    )
    trainer.train()
    # HF's linear schedule over T = 16 with 4 warm-up steps, applied to both groups alike.
    factor = [k / 4 if k < 4 else (16 - k) / 12 for k in range(16)]
    assert len(probe.lrs) == 16
    for (lr_rest, lr_lam), f in zip(probe.lrs, factor):
        assert lr_rest == pytest.approx(1e-3 * f, rel=1e-6, abs=1e-12)
        assert lr_lam == pytest.approx(64e-3 * f, rel=1e-6, abs=1e-12)
    # The shrink at T - t_f = 12 put the new, smaller λ into the λ group.
    assert callback.history[-1]["final"] and callback.history[-1]["step"] == 12
    assert [id(p) for p in trainer.optimizer.param_groups[1]["params"]] == [
        id(lay.lam) for lay in layers.values()
    ]
    assert sum(lay.rank for lay in layers.values()) == 24


@pytest.mark.parametrize("user_ratio", [None, 8], ids=["trainer_default", "wrong_ratio"])
def test_lambda_at_the_wrong_learning_rate_fails_before_training(tmp_path, user_ratio):
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    _, callback = add_adalora(model, {**CFG, "lambda_lr_ratio": 64})
    optimizers = (None, None)
    if user_ratio is not None:  # an optimizer built for another ratio than the callback's
        optimizers = (adalora_optimizer(model, {**CFG, "lambda_lr_ratio": user_ratio}, lr=1e-2), None)
    trainer = Trainer(
        model=model,
        args=make_args(tmp_path, lr_scheduler_type="linear", warmup_steps=2),  # warm-up: every lr starts at 0
        train_dataset=RandomTokens(32),
        callbacks=[callback],
        optimizers=optimizers,
    )
    with pytest.raises(ConfigError) as err:
        trainer.train()
    msg = str(err.value)
    assert msg.startswith("method.lambda_lr_ratio=64: the optimizer trains λ of ")
    assert f"(ratio {user_ratio or 1})" in msg
    assert "adalora_optimizer(model, cfg, lr)" in msg and "optimizers=(optimizer, None)" in msg
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k in before)


class TwoProcessArgs(TrainingArguments):
    """TrainingArguments as the Trainer sees them under DDP with two processes (one process here;
    tests/test_callbacks_ddp.py runs the real two-process case, marked slow)."""

    @property
    def world_size(self):
        return 2


@pytest.mark.parametrize("shrink", ["final", "every"])
def test_shrink_under_ddp_is_refused(tmp_path, shrink):
    model = tiny_bert()
    _, callback = add_adalora(model, {**CFG, "shrink": shrink})
    args = make_args(tmp_path, TwoProcessArgs)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(32), callbacks=[callback])
    with pytest.raises(ConfigError, match=f'method.shrink={shrink}: .*world_size=2.*shrink="never"'):
        trainer.train()
    assert trainer.state.global_step == 0


def test_no_shrink_under_ddp_trains(tmp_path):
    model = tiny_bert()
    layers, callback = add_adalora(model, {**CFG, "shrink": "never"})
    args = make_args(tmp_path, TwoProcessArgs)
    Trainer(model=model, args=args, train_dataset=RandomTokens(32), callbacks=[callback]).train()
    assert callback.history[-1]["final"] and callback.history[-1]["kept"] == 24
    assert sum(lay.rank for lay in layers.values()) == 48  # masked, not removed
