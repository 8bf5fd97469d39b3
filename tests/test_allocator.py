"""The global rank allocator (``adabudget.allocator.RankAllocator``, AdaLoRA Algorithm 1).

Invariants checked after every allocation of short real training runs on tiny-bert (a
fixed random batch): the kept triplets equal the scheduled budget b(t), masked λ are
really zero, per-module floors and caps hold, parameter budgets are met to within one
triplet. Then the choice of score, physical shrinking (outputs, AdamW moments and
importance buffers sliced alike), the three shrink modes, the state round trip, and the
config errors. Last, parity with peft 0.21.2's RankAllocator: against numbers pinned by
``tests/reference/peft_rank_allocator_scores.py`` (no peft needed), and live.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from adabudget.allocator import RankAllocator
from adabudget.config import ConfigError, ModelConfig
from adabudget.methods import apply_method, method_config_from_dict
from adabudget.methods.adalora import AdaLoRAConfig, SVDLinear, orth_penalty
from adabudget.models import load_model
from adabudget.modules import freeze_backbone
from torch import nn

PINNED = Path(__file__).parent / "reference" / "peft_rank_allocator_scores.json"

# tiny-bert has 12 adapted matrices: 8 of 32x32 (a triplet costs 65 parameters) and
# 2 x 2 of 32x64 / 64x32 (97). init_r=4, target_r=2: b(0)=48, b(T)=24.
# T=20, t_i=3, t_f=5, ΔT=2: allocations at steps 4, 6, ..., 14, then the final one at 15.
T = 20
KNOBS = {"init_r": 4, "target_r": 2, "warmup_steps": 3, "final_steps": 5, "mask_interval": 2}
ALLOCATION_STEPS = [4, 6, 8, 10, 12, 14, 15]
N_LAYERS, MAX_COST = 12, 97


def fixed_batch() -> dict:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 1000, (8, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(8) % 2}


class Run:
    """A real AdaLoRA training loop on tiny-bert, stepped by the test."""

    def __init__(self, total_steps: int = T, seed: int = 0, **knobs):
        torch.manual_seed(seed)
        self.model = load_model(ModelConfig(name="tiny-bert"), 2, False)
        freeze_backbone(self.model, train_head=True)
        self.cfg = method_config_from_dict({"name": "adalora", **KNOBS, **knobs})
        self.layers = apply_method(self.model, self.cfg)
        self.alloc = RankAllocator(self.layers, self.cfg, total_steps)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-2)
        self.batch = fixed_batch()
        self.total_steps = total_steps

    def step(self, step: int):
        """Forward, backward, optimizer step, ``update_and_allocate``; no shrink, no zero_grad."""
        out = self.model(**self.batch)
        loss = out.loss + self.cfg.orth_reg_weight * orth_penalty(
            list(self.layers.values()), self.cfg.orth_squared
        )
        loss.backward()
        self.opt.step()
        self.lam_after_opt = {n: lay.lam.detach().clone() for n, lay in self.layers.items()}
        return self.alloc.update_and_allocate(step)

    def end_step(self, allocation) -> None:
        if allocation is not None and allocation.shrink:
            self.alloc.shrink_(self.opt)
        self.opt.zero_grad()

    def train(self, on_allocation=None) -> list:
        """The whole loop; ``on_allocation(allocation)`` runs before any shrink."""
        allocations = []
        for step in range(1, self.total_steps + 1):
            a = self.step(step)
            if a is not None:
                allocations.append(a)
                if on_allocation is not None:
                    on_allocation(a)
            self.end_step(a)
        return allocations

    def live_ranks(self) -> dict[str, int]:
        """Triplets that can act: non-zero λ."""
        return {n: int(torch.count_nonzero(lay.lam)) for n, lay in self.layers.items()}

    def logits(self) -> torch.Tensor:
        self.model.eval()
        with torch.no_grad():
            out = self.model(**{k: v for k, v in self.batch.items() if k != "labels"}).logits
        self.model.train()
        return out


# ---------------------------------------------------------------- invariants over a run
@pytest.mark.parametrize("score", ["adalora", "sensitivity", "magnitude"])
@pytest.mark.parametrize("shrink", ["final", "every", "never"])
def test_every_allocation_keeps_the_scheduled_budget(score, shrink):
    run = Run(score=score, shrink=shrink)
    seen = []

    def check(a):
        seen.append(a.step)
        expected = 24 if a.final else run.alloc.budget_at(a.step)
        assert a.budget == expected
        assert a.kept == a.budget == sum(a.ranks.values())
        assert run.live_ranks() == a.ranks  # masked λ are exactly zero, kept ones are not
        assert a.shrink == (shrink == "every" or (shrink == "final" and a.final))

    allocations = run.train(check)
    assert seen == ALLOCATION_STEPS
    assert [a.final for a in allocations] == [False] * 6 + [True]
    budgets = [a.budget for a in allocations]
    assert budgets[0] < 48 and budgets == sorted(budgets, reverse=True)
    final = allocations[-1]
    assert final.budget == final.kept == run.alloc.budget_at(T) == 24
    if shrink == "never":
        assert all(lay.rank == 4 for lay in run.layers.values())
        assert run.live_ranks() == final.ranks
    else:  # physically at the final ranks
        assert {n: lay.rank for n, lay in run.layers.items()} == final.ranks
        assert run.alloc.ranks() == final.ranks


def test_min_and_max_rank_hold_for_every_module():
    run = Run(min_rank=1, max_rank=3)
    ceiling = N_LAYERS * 3

    def check(a):
        # While b(t) is above what the caps can hold (12 x 3 = 36), a capped allocation keeps 36.
        assert a.kept == min(a.budget, ceiling)
        assert run.live_ranks() == a.ranks
        assert all(1 <= r <= 3 for r in a.ranks.values()), a.ranks

    allocations = run.train(check)
    assert len(allocations) == len(ALLOCATION_STEPS)
    assert allocations[0].budget > ceiling  # the caps really bind early on
    assert allocations[-1].kept == 24


def test_parameter_budget():
    target = 1500  # of b(0) = 4 x (8 x 65 + 4 x 97) = 3632 parameters
    run = Run(target_params=target, target_r=None)
    costs = {n: lay.out_features + lay.in_features + 1 for n, lay in run.layers.items()}
    assert run.alloc.budget_at(0) == 3632

    def check(a):
        assert a.budget == (target if a.final else run.alloc.budget_at(a.step))
        ranks = run.live_ranks()
        assert ranks == a.ranks
        assert a.kept_params == sum(costs[n] * r for n, r in ranks.items())
        assert a.budget - MAX_COST < a.kept_params <= a.budget

    allocations = run.train(check)
    assert allocations[-1].budget == target
    assert sum(lay.numel() for lay in run.layers.values() for lay in (lay.P, lay.lam, lay.Q)) <= target


# ---------------------------------------------------------------- which triplets
def two_layers(score: str) -> tuple[dict[str, SVDLinear], RankAllocator]:
    torch.manual_seed(0)
    layers = {"a": SVDLinear(nn.Linear(6, 5), 3, 1.0), "b": SVDLinear(nn.Linear(6, 5), 3, 1.0)}
    cfg = AdaLoRAConfig(init_r=3, target_total_rank=3, warmup_steps=1, final_steps=1, score=score)
    return layers, RankAllocator(layers, cfg, total_steps=10)


@pytest.mark.parametrize("score", ["magnitude", "sensitivity"])
def test_magnitude_and_sensitivity_choose_differently(score):
    """|λ| ranks a0 > a1 > a2 > b0 > b1 > b2; |λ ∂L/∂λ| ranks b0 > a2 > b2 > a1 > ...
    (P and Q get zero gradients, so only λ carries sensitivity)."""
    layers, alloc = two_layers(score)
    lam = {"a": [3.0, 2.0, 1.0], "b": [0.5, 0.4, 0.3]}
    grad = {"a": [0.01, 0.1, 1.0], "b": [4.0, 0.1, 2.0]}  # |λ g|: a [.03, .2, 1], b [2, .04, .6]
    for n, lay in layers.items():
        with torch.no_grad():
            lay.lam.copy_(torch.tensor(lam[n]))
        lay.lam.grad = torch.tensor(grad[n])
        lay.P.grad, lay.Q.grad = torch.zeros_like(lay.P), torch.zeros_like(lay.Q)
    alloc.update_scores()
    scores = alloc.triplet_scores()
    if score == "magnitude":
        torch.testing.assert_close(scores, torch.tensor(lam["a"] + lam["b"]))
    else:  # one update from zero: Ī = (1 - β1) I
        sens = torch.tensor(lam["a"] + lam["b"]).abs() * torch.tensor(grad["a"] + grad["b"]).abs()
        torch.testing.assert_close(scores, 0.15 * sens)
    a = alloc.allocate(step=2, budget=3, final=False)
    kept = {n: (lay.lam != 0).tolist() for n, lay in layers.items()}
    if score == "magnitude":
        assert a.ranks == {"a": 3, "b": 0}
        assert kept == {"a": [True, True, True], "b": [False, False, False]}
    else:
        assert a.ranks == {"a": 1, "b": 2}
        assert kept == {"a": [False, False, True], "b": [True, False, True]}


@pytest.mark.parametrize(
    ("knobs", "budget", "expected"),
    [
        # |λ| alone would keep a0, a1, a2; the floor of 1 gives b its best triplet instead of a2.
        (dict(min_rank=1), 3, {"a": [True, True, False], "b": [True, False, False]}),
        # |λ| alone would keep a0, a1, a2, b0; the cap of 2 passes a2's place to b1.
        (dict(max_rank=2), 4, {"a": [True, True, False], "b": [True, True, False]}),
    ],
)
def test_min_and_max_rank_override_scores(knobs, budget, expected):
    layers = {"a": SVDLinear(nn.Linear(6, 5), 3, 1.0), "b": SVDLinear(nn.Linear(6, 5), 3, 1.0)}
    cfg = AdaLoRAConfig(
        init_r=3, target_total_rank=3, warmup_steps=1, final_steps=1, score="magnitude", **knobs
    )
    alloc = RankAllocator(layers, cfg, total_steps=10)
    with torch.no_grad():
        layers["a"].lam.copy_(torch.tensor([3.0, 2.0, 1.0]))
        layers["b"].lam.copy_(torch.tensor([0.5, 0.4, 0.3]))
    a = alloc.allocate(step=2, budget=budget, final=False)
    assert a.kept == budget
    assert {n: (lay.lam != 0).tolist() for n, lay in layers.items()} == expected


# ---------------------------------------------------------------- shrinking
def test_shrink_preserves_outputs_and_slices_optimizer_state():
    run = Run(shrink="final")
    checked = False
    for step in range(1, T + 1):
        a = run.step(step)
        if a is not None and a.shrink:
            assert a.final and step == 15
            logits = run.logits()
            keep = {n: lay.lam.nonzero().squeeze(1) for n, lay in run.layers.items()}
            old = {n: {k: getattr(lay, k) for k in ("P", "lam", "Q")} for n, lay in run.layers.items()}
            old_state = {p: copy.deepcopy(run.opt.state[p]) for f in old.values() for p in f.values()}
            old_ibar = [t.clone() for t in run.alloc.ibar]
            old_ubar = [t.clone() for t in run.alloc.ubar]

            run.end_step(a)  # shrink_(optimizer)

            torch.testing.assert_close(run.logits(), logits, atol=1e-6, rtol=0)
            group_params = [p for g in run.opt.param_groups for p in g["params"]]
            for i, (n, lay) in enumerate(run.layers.items()):
                assert lay.rank == a.ranks[n] == keep[n].numel()
                for j, (k, dim) in enumerate((("P", 1), ("lam", 0), ("Q", 0))):
                    new, prev = getattr(lay, k), old[n][k]
                    assert torch.equal(new, prev.index_select(dim, keep[n]))
                    assert any(new is p for p in group_params) and not any(prev is p for p in group_params)
                    assert prev not in run.opt.state
                    state, prev_state = run.opt.state[new], old_state[prev]
                    for moment in ("exp_avg", "exp_avg_sq"):
                        assert state[moment].shape == new.shape
                        assert torch.equal(state[moment], prev_state[moment].index_select(dim, keep[n]))
                    assert torch.equal(state["step"], prev_state["step"])
                    assert torch.equal(
                        run.alloc.ibar[3 * i + j], old_ibar[3 * i + j].index_select(dim, keep[n])
                    )
                    assert torch.equal(
                        run.alloc.ubar[3 * i + j], old_ubar[3 * i + j].index_select(dim, keep[n])
                    )
            checked = True
            shrunk = {n: lay.lam.detach().clone() for n, lay in run.layers.items()}
        else:
            run.end_step(a)
    assert checked
    # Training goes on with the sliced parameters: λ keep moving, the shapes stay.
    assert any(not torch.equal(lay.lam, shrunk[n]) for n, lay in run.layers.items())
    assert sum(lay.rank for lay in run.layers.values()) == 24


def test_shrink_never_keeps_the_pattern_fixed():
    run = Run(shrink="never")
    pattern, regrew = None, False
    for step in range(1, T + 1):
        a = run.step(step)
        if a is not None and a.final:
            pattern = {n: lay.lam != 0 for n, lay in run.layers.items()}
        elif pattern is not None:
            assert a is None
            for n, lay in run.layers.items():
                assert lay.rank == 4
                assert torch.equal(lay.lam != 0, pattern[n])  # masked λ are 0 again, kept ones live
                regrew |= bool(run.lam_after_opt[n][~pattern[n]].any())
        run.end_step(a)
    assert pattern is not None and sum(int(m.sum()) for m in pattern.values()) == 24
    assert regrew  # AdamW does move masked λ off 0: the re-masking after each step holds them there


def test_reset_pruned_momentum_zeroes_only_the_pruned_first_moments():
    run = Run(shrink="never", reset_pruned_momentum=True)
    checked = 0
    for step in range(1, T + 1):
        a = run.step(step)
        if a is not None and not a.final:
            before = {n: run.opt.state[lay.lam]["exp_avg"].clone() for n, lay in run.layers.items()}
            run.alloc.reset_pruned_momentum_(run.opt)
            for n, lay in run.layers.items():
                state, pruned = run.opt.state[lay.lam], lay.lam == 0
                assert not state["exp_avg"][pruned].any()  # momentum of pruned λ gone
                assert torch.equal(state["exp_avg"][~pruned], before[n][~pruned])  # kept λ untouched
                assert state["exp_avg_sq"][pruned].all()  # second moments kept (see the knob's comment)
            checked += int((run.alloc._mask == 0).sum())
        run.end_step(a)
    assert checked > 0


def test_shrink_every_allocation():
    run = Run(shrink="every")
    for step in range(1, T + 1):
        a = run.step(step)
        run.end_step(a)
        if a is not None:
            assert a.shrink
            assert {n: lay.rank for n, lay in run.layers.items()} == a.ranks
            assert sum(lay.rank for lay in run.layers.values()) == a.budget
            assert run.alloc.ranks() == a.ranks
            assert all(int(torch.count_nonzero(lay.lam)) == lay.rank for lay in run.layers.values())
            # factors emptied by the shrink (rank 0) take no gradient and leave the optimizer
            adapter = {
                id(getattr(lay, k))
                for lay in run.layers.values()
                for k in ("P", "lam", "Q")
                if getattr(lay, k).numel() > 0
            }
            in_opt = {id(p) for g in run.opt.param_groups for p in g["params"]}
            assert adapter <= in_opt and len(in_opt) == len(adapter) + 2  # + the head's weight, bias
            assert sum(t.numel() for t in run.alloc.ibar) == sum(
                getattr(lay, k).numel() for lay in run.layers.values() for k in ("P", "lam", "Q")
            )
    assert sum(lay.rank for lay in run.layers.values()) == 24


# ---------------------------------------------------------------- state
def test_state_dict_round_trip_mid_run():
    run = Run()
    for step in range(1, 9):
        run.end_step(run.step(step))
    state = run.alloc.state_dict()
    fresh = RankAllocator(run.layers, run.cfg, T)
    fresh.load_state_dict(state)
    again = fresh.state_dict()
    assert again["ranks"] == state["ranks"] and again["fixed"] is False
    for key in ("ibar", "ubar", "mask"):
        assert torch.equal(again[key], state[key])
    assert state["ibar"].abs().sum() > 0 and state["ubar"].abs().sum() > 0
    torch.testing.assert_close(fresh.triplet_scores(), run.alloc.triplet_scores(), rtol=0, atol=0)


def test_state_dict_round_trip_into_unshrunk_layers():
    run = Run(shrink="final")
    run.train()
    state, weights = run.alloc.state_dict(), run.model.state_dict()
    assert state["fixed"] and sum(state["ranks"].values()) == 24
    assert any(r != 4 for r in state["ranks"].values())

    fresh = Run(seed=1)  # a new process: full-rank layers, different random init
    assert all(lay.rank == 4 for lay in fresh.layers.values())
    fresh.alloc.load_state_dict(state)  # shrink_to: the saved shapes
    assert {n: lay.rank for n, lay in fresh.layers.items()} == state["ranks"]
    fresh.model.load_state_dict(weights)  # now the checkpoint fits
    torch.testing.assert_close(fresh.logits(), run.logits(), atol=0, rtol=0)
    again = fresh.alloc.state_dict()
    assert again["fixed"] and again["ranks"] == state["ranks"]
    for key in ("ibar", "ubar", "mask"):
        assert torch.equal(again[key], state[key])
    assert fresh.alloc.update_and_allocate(T) is None  # the pattern stays fixed


# ---------------------------------------------------------------- config errors
def allocator_for(total_steps: int = T, **knobs) -> RankAllocator:
    layers = {f"m{i}": SVDLinear(nn.Linear(8, 8), 4, 1.0) for i in range(3)}
    cfg = AdaLoRAConfig(**{**KNOBS, **knobs})
    return RankAllocator(layers, cfg, total_steps)


@pytest.mark.parametrize(
    ("knobs", "total", "field"),
    [
        # peft#2337: no budgeting phase left (t_i + t_f >= T), kthvalue used to crash.
        (dict(warmup_steps=10, final_steps=10), 20, "method.warmup_steps"),
        (dict(warmup_steps=15, final_steps=10), 20, "method.warmup_steps"),
        (dict(warmup_steps=0.5, final_steps=0.5), 20, "method.warmup_steps"),
        (dict(warmup_steps=2.5), 20, "method.warmup_steps"),
        (dict(final_steps=-1), 20, "method.final_steps"),
        (dict(target_r=4), T, "method.target_r"),  # b(T) = b(0)
        (dict(target_r=5), T, "method.target_r"),
        (dict(target_r=0), T, "method.target_r"),
        (dict(target_total_rank=0), T, "method.target_total_rank"),
        (dict(target_total_rank=12), T, "method.target_total_rank"),
        (dict(target_params=0), T, "method.target_params"),
        (dict(target_params=3 * 4 * 17), T, "method.target_params"),  # = b(0) in parameters
        (dict(target_r=1, min_rank=2), T, "method.min_rank"),  # 3 x 2 = 6 > b(T) = 3
        (dict(target_r=3, max_rank=2), T, "method.max_rank"),  # 3 x 2 = 6 < b(T) = 9
    ],
)
def test_bad_budgets_name_the_field(knobs, total, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        allocator_for(total, **knobs)


def test_just_enough_steps_is_fine():
    alloc = allocator_for(20, warmup_steps=10, final_steps=9)  # one budgeting step
    assert alloc.budget_at(10) == 12 and alloc.budget_at(11) == 6


@pytest.mark.parametrize(
    ("knobs", "field"),
    [
        (dict(target_r=4), "method.target_r"),
        (dict(target_r=0), "method.target_r"),
        (dict(target_total_rank=0), "method.target_total_rank"),
        (dict(target_params=0), "method.target_params"),
        (dict(min_rank=5), "method.min_rank"),
        (dict(min_rank=2, max_rank=1), "method.max_rank"),
    ],
)
def test_config_validate_names_the_field(knobs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        AdaLoRAConfig(**{**KNOBS, **knobs}).validate()


# ---------------------------------------------------------------- parity with peft
def test_scores_match_pinned_peft_numbers():
    """peft 0.21.2's RankAllocator on the case of tests/reference/peft_rank_allocator_scores.py.

    Our Ū uses Ī(t) as eq. 9 prints, and so does peft (``update_ipt`` updates
    ``exp_avg_ipt`` before using it for ``exp_avg_unc``): every EMA and score is equal,
    not scaled by β1.
    """
    ref = json.loads(PINNED.read_text())
    r = ref["init_r"]
    layers = {n: SVDLinear(nn.Linear(d_in, d_out), r, 1.0) for n, (d_in, d_out) in ref["shapes"].items()}
    cfg = AdaLoRAConfig(
        init_r=r,
        target_total_rank=ref["budget"],
        warmup_steps=1,
        final_steps=1,
        beta1=ref["beta1"],
        beta2=ref["beta2"],
    )
    alloc = RankAllocator(layers, cfg, total_steps=10)
    for step in ref["steps"]:
        for n, lay in layers.items():
            for k in ("P", "lam", "Q"):
                p = getattr(lay, k)
                with torch.no_grad():
                    p.copy_(torch.tensor(step["params"][n][k]))
                p.grad = torch.tensor(step["grads"][n][k])
        alloc.update_scores()
    for i, n in enumerate(layers):
        for j, k in enumerate(("P", "lam", "Q")):
            torch.testing.assert_close(
                alloc.ibar[3 * i + j], torch.tensor(ref["ibar"][n][k]), rtol=1e-5, atol=1e-7
            )
            torch.testing.assert_close(
                alloc.ubar[3 * i + j], torch.tensor(ref["ubar"][n][k]), rtol=1e-5, atol=1e-7
            )
    pinned = torch.tensor([s for n in layers for s in ref["scores"][n]])
    torch.testing.assert_close(alloc.triplet_scores(), pinned, rtol=1e-5, atol=0)
    alloc.allocate(step=2, budget=ref["budget"], final=False)
    assert {n: (lay.lam != 0).tolist() for n, lay in layers.items()} == ref["keep"]


def test_pinned_numbers_reproduce_with_installed_peft():
    pytest.importorskip("peft")
    import importlib.util

    spec = importlib.util.spec_from_file_location("peft_reference", PINNED.with_suffix(".py"))
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    ref = json.loads(PINNED.read_text())
    live = reference.peft_scores(
        [
            {kind: {n: {k: torch.tensor(v) for k, v in f.items()} for n, f in s[kind].items()} for kind in s}
            for s in ref["steps"]
        ]
    )
    for n in ref["shapes"]:
        torch.testing.assert_close(
            torch.tensor(live["scores"][n]), torch.tensor(ref["scores"][n]), rtol=1e-6, atol=0
        )
    assert live["keep"] == ref["keep"]


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
def test_scores_and_masks_match_live_peft():
    """Same tiny-bert backbone, same factors, the same real gradients for several steps:
    peft's ``update_ipt`` and our ``update_scores`` give the same Ī, Ū, triplet scores
    and top-k masks, and the two budget schedules agree at every step."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = load_model(ModelConfig(name="tiny-bert"), 2, False)
    freeze_backbone(base, train_head=True)
    ours = copy.deepcopy(base)
    cfg = method_config_from_dict({"name": "adalora", **KNOBS})
    layers = apply_method(ours, cfg)
    alloc = RankAllocator(layers, cfg, T)
    peft_cfg = peft.AdaLoraConfig(
        init_r=4,
        target_r=2,
        tinit=3,
        tfinal=5,
        deltaT=2,
        total_step=T,
        beta1=0.85,
        beta2=0.85,
        target_modules=list(layers),
    )
    inner = peft.get_peft_model(base, peft_cfg).base_model
    theirs = {n: inner.model.get_submodule(n) for n in layers}
    for n, lay in layers.items():
        assert torch.equal(lay.base.weight, theirs[n].get_base_layer().weight)  # identical frozen weights

    pairs = [(lay.P, theirs[n].lora_B["default"]) for n, lay in layers.items()]
    pairs += [(lay.lam, theirs[n].lora_E["default"]) for n, lay in layers.items()]  # (r,) vs (r, 1)
    pairs += [(lay.Q, theirs[n].lora_A["default"]) for n, lay in layers.items()]
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    batch = fixed_batch()
    for _ in range(4):
        # Real gradients of our model, handed to both sides; then our step, copied to peft.
        loss = ours(**batch).loss + 0.5 * orth_penalty(list(layers.values()))
        loss.backward()
        with torch.no_grad():
            for mine, peft_p in pairs:
                peft_p.copy_(mine.view_as(peft_p))
                peft_p.grad = mine.grad.view_as(peft_p).clone()
        inner.rankallocator.update_ipt(inner.model)
        alloc.update_scores()
        opt.step()
        opt.zero_grad()

    ra = inner.rankallocator
    peft_scores = []
    for i, n in enumerate(layers):
        key = f"{n}.%s.default"
        for j, name in enumerate(("lora_B", "lora_E", "lora_A")):
            shape = alloc.ibar[3 * i + j].shape
            torch.testing.assert_close(alloc.ibar[3 * i + j], ra.exp_avg_ipt[key % name].view(shape))
            torch.testing.assert_close(alloc.ubar[3 * i + j], ra.exp_avg_unc[key % name].view(shape))
        ipt_q = ra._element_score(key % "lora_A").mean(dim=1, keepdim=True)
        ipt_p = ra._element_score(key % "lora_B").mean(dim=0).view(-1, 1)
        peft_scores.append(
            ra._combine_ipt(ra._element_score(key % "lora_E"), torch.cat([ipt_q, ipt_p], dim=1))
        )
    peft_scores = torch.cat(peft_scores)
    ours_scores = alloc.triplet_scores()
    assert peft_scores.min() > 0
    torch.testing.assert_close(ours_scores, peft_scores, rtol=1e-5, atol=0)
    ratio = ours_scores / peft_scores
    assert not torch.allclose(ratio, torch.full_like(ratio, 0.85))  # not β1 x peft

    budget = 30
    pattern = ra.mask_to_budget(inner.model, budget)
    a = alloc.allocate(step=4, budget=budget, final=False)
    assert a.kept == budget
    for n, lay in layers.items():
        assert (lay.lam != 0).tolist() == pattern[f"{n}.lora_E.default"], n

    assert [alloc.budget_at(t) for t in range(T + 1)] == [ra.budget_schedule(t)[0] for t in range(T + 1)]
