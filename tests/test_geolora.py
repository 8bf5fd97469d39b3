"""GeoLoRA: the gradients of K = U S and L = V Sᵀ the layer collects (checked against autograd's
own), the integrator's steps (augmentation: orthonormal new directions, S's new blocks; truncation
by τ: ΔW kept as its leading triplets), ranks that grow up to r_max and shrink, the final global cut
to ``target_params`` (exact), the result as a LoRA (merge, the peft round trip), and a whole run:
ranks.jsonl, the record's final count, and a resume before and after the cut."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adabudget.compose import resume_config
from adabudget.config import ConfigError
from adabudget.export import export_peft_adapter, load_adapter, save_adapter
from adabudget.methods import apply_method, geolora, method_config_from_dict
from adabudget.methods.geolora import GeoLoRAConfig, GeoLoRAHooks, component_cost, cut_to, truncation_rank
from adabudget.training import train
from conftest import tiny_model as build


def batch():
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(5, 1000, (4, 7), generator=g), "labels": torch.tensor([0, 1, 1, 0])}


def logits(model):
    with torch.no_grad():
        return model(input_ids=batch()["input_ids"]).logits


def applied(**knobs):
    model = build()
    cfg = method_config_from_dict({"name": "geolora", "init_r": 2, "r_max": 8, "min_rank": 1, **knobs})
    cfg.validate()
    return model, cfg, apply_method(model, cfg)


def randomise_s(wrapped, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in wrapped.values():
            r = layer.active
            layer.S[:r, :r] = 0.3 * torch.randn(r, r, generator=g)


def trained(steps: int, **knobs):
    """GeoLoRA on tiny BERT, ``steps`` AdamW steps (weight decay on) with its hooks; returns
    (model, wrapped, hooks, the ranks after every step)."""
    model, cfg, wrapped = applied(**knobs)
    hooks = GeoLoRAHooks(wrapped, cfg)
    hooks.start(steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    history = []
    for step in range(steps):
        hooks.before_step(step)
        model(**batch()).loss.backward()
        opt.step()
        hooks.after_step(step, opt)
        opt.zero_grad()
        history.append({n: m.active for n, m in wrapped.items()})
    return model.eval(), wrapped, hooks, history


def delta(layer) -> torch.Tensor:
    return layer.delta_weight().detach().clone()


def orthonormal(layer) -> bool:
    r = layer.active
    eye = torch.eye(r)
    u, vt = layer.B[:, :r], layer.A[:r]
    return bool(torch.allclose(u.T @ u, eye, atol=1e-5) and torch.allclose(vt @ vt.T, eye, atol=1e-5))


# ---------------------------------------------------------------- the gradients of K and L
def test_the_collected_gradients_are_those_of_k_and_l():
    """∇_U = ∇_K Sᵀ, ∇_V = ∇_L S and ∇_S = Uᵀ ∇_K (autograd's own, the layer's U, V and S held
    fixed): the layer's ∇_K, ∇_L, collected from the output's gradient, satisfy all three."""
    model, _, wrapped = applied()
    randomise_s(wrapped)
    for layer in wrapped.values():
        layer.collect = True
    model.train()
    model(**batch()).loss.backward()
    for layer in wrapped.values():
        r = layer.active
        s, u = layer.S[:r, :r].detach(), layer.B[:, :r].detach()
        assert layer.grad_K.shape == (layer.out_features, r) and layer.grad_L.shape == (layer.in_features, r)
        torch.testing.assert_close(layer.grad_K @ s.T, layer.B.grad[:, :r], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(layer.grad_L @ s, layer.A.grad[:r].T, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(u.T @ layer.grad_K, layer.S.grad[:r, :r], atol=1e-6, rtol=1e-4)
        assert layer.grad_K.abs().sum() > 0


def test_under_bf16_autocast_the_gradients_are_collected_in_fp32():
    """The loop's backward runs inside its autocast: the collection stays fp32 (as the factors)."""
    model, cfg, wrapped = applied(tau=0.0)
    randomise_s(wrapped)
    hooks = GeoLoRAHooks(wrapped, cfg)
    hooks.start(4)
    hooks.before_step(0)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch()).loss.backward()
    for layer in wrapped.values():
        assert layer.grad_K.dtype == layer.grad_L.dtype == torch.float32
    hooks.after_step(0, None)
    assert all(m.active == 4 and orthonormal(m) for m in wrapped.values())


# ---------------------------------------------------------------- the integrator's steps
@pytest.mark.parametrize(
    "d, tau, rank",
    [
        ([4.0, 2.0, 1.0, 0.5, 0.1], 0.15, 3),  # the config's worked example: ||d[3:]|| = 0.51 < 0.69
        ([4.0, 2.0, 1.0, 0.5, 0.1], 0.0, 5),  # τ = 0: everything kept
        ([4.0, 2.0, 1.0, 0.5, 0.1], 0.99, 1),
        ([0.0, 0.0, 0.0], 0.15, 3),  # S = 0 (the start): nothing to judge, all kept (the authors')
    ],
)
def test_the_truncation_rank_as_a_table(d, tau, rank):
    assert truncation_rank(torch.tensor(d), tau) == rank


def test_augmentation_adds_orthonormal_directions_and_the_projected_gradient_steps():
    _, _, wrapped = applied()
    layer = next(iter(wrapped.values()))
    randomise_s(wrapped)
    g = torch.Generator().manual_seed(7)
    grad_k = torch.randn(layer.out_features, 2, generator=g)
    grad_l = torch.randn(layer.in_features, 2, generator=g)
    u0, vt0, s0 = layer.B[:, :2].clone(), layer.A[:2].clone(), layer.S[:2, :2].clone()
    layer.augment(0.1, grad_k, grad_l)
    assert layer.active == 4 and orthonormal(layer)
    u_new, v_new = layer.B[:, 2:4], layer.A[2:4].T
    torch.testing.assert_close(layer.B[:, :2], u0)
    torch.testing.assert_close(layer.A[:2], vt0)
    torch.testing.assert_close(layer.S[:2, :2], s0)  # the coefficient block is the optimizer's
    torch.testing.assert_close(layer.S[2:4, :2], -0.1 * u_new.T @ grad_k)
    torch.testing.assert_close(layer.S[:2, 2:4], -0.1 * grad_l.T @ v_new)
    assert (layer.S[2:4, 2:4] == 0).all()
    # the new directions span what the gradients add beyond the old basis
    resid = grad_k - u0 @ (u0.T @ grad_k)
    torch.testing.assert_close(u_new @ (u_new.T @ resid), resid, atol=1e-5, rtol=1e-4)
    for _ in range(3):  # at most r_max
        layer.augment(
            0.1, torch.randn(layer.out_features, layer.active), torch.randn(layer.in_features, layer.active)
        )
    assert layer.active == 8 and orthonormal(layer)


def test_truncation_keeps_the_leading_singular_triplets_of_the_update():
    _, _, wrapped = applied()
    layer = next(iter(wrapped.values()))
    layer.augment(0.0, torch.randn(layer.out_features, 2), torch.randn(layer.in_features, 2))
    with torch.no_grad():
        layer.S[:4, :4] = (
            torch.diag(torch.tensor([3.0, 1.0, 0.02, 0.01])) @ torch.linalg.qr(torch.randn(4, 4)).Q
        )
    before = delta(layer)
    d = torch.linalg.svdvals(before)[:4]
    kept = layer.truncate(tau=0.05, min_rank=1)
    assert layer.active == 2 and orthonormal(layer)
    torch.testing.assert_close(kept, d[:2] / layer.scaling, atol=1e-5, rtol=1e-4)
    assert (layer.S[2:] == 0).all() and (layer.S[:, 2:] == 0).all()
    u, s, vh = torch.linalg.svd(before)
    torch.testing.assert_close(delta(layer), u[:, :2] @ torch.diag(s[:2]) @ vh[:2], atol=1e-5, rtol=0)
    layer.truncate(tau=0.0, min_rank=1)  # τ = 0 keeps everything: ΔW unchanged
    torch.testing.assert_close(delta(layer), u[:, :2] @ torch.diag(s[:2]) @ vh[:2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("tau, moves", [(0.0, "grows"), (0.9, "shrinks")])
def test_the_rank_moves_grows_to_r_max_and_shrinks_to_min_rank(tau, moves):
    """τ = 0 keeps every direction the gradients add: every matrix doubles to r_max = 8; τ = 0.9
    keeps only the leading triplet (min_rank 1). U and V stay orthonormal through the optimizer's
    weight decay, and the model stays what U S Vᵀ computes."""
    _, wrapped, hooks, history = trained(4, tau=tau)
    ranks = [sorted(set(h.values())) for h in history]
    if moves == "grows":
        assert ranks == [[4], [8], [8], [8]]
    else:
        assert ranks[-1] == [1]
    assert all(orthonormal(m) for m in wrapped.values())
    assert hooks.kept()["kept_params"] == sum(m.active * component_cost(m) for m in wrapped.values())


def test_the_basis_changes_only_in_rounds_of_basis_interval_steps():
    """basis_interval = 3: augmented at steps 0, 3, truncated at 2, 5; U and V do not move between."""
    model, cfg, wrapped = applied(tau=0.0, basis_interval=3)
    hooks = GeoLoRAHooks(wrapped, cfg)
    hooks.start(6)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    layer = next(iter(wrapped.values()))
    seen = []
    for step in range(6):
        hooks.before_step(step)
        u = layer.B.detach().clone()
        model(**batch()).loss.backward()
        opt.step()
        hooks.after_step(step, opt)
        opt.zero_grad()
        seen.append((layer.active, hooks.augmented, not torch.equal(u, layer.B)))
        assert (hooks.allocation(step + 1) is None) == hooks.augmented
    assert [a for _, a, _ in seen] == [True, True, False, True, True, False]
    assert [r for r, _, _ in seen] == [4, 4, 4, 8, 8, 8]
    assert [moved for _, _, moved in seen] == [True, False, True, True, False, True]


def test_the_loss_scale_reaches_the_integrator_as_it_reaches_s():
    """fp16's scaler multiplies the loss and unscales only the optimizer's gradients: a step whose
    loss is scaled by 1024 (S's gradient unscaled, as ``unscale_`` does) moves U, S and V as the
    unscaled step does (the collected ∇_K, ∇_L are rescaled by what S's gradient went through)."""
    states = []
    for scale in (1.0, 1024.0):
        model, cfg, wrapped = applied(tau=0.0)
        hooks = GeoLoRAHooks(wrapped, cfg)
        hooks.start(4)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model.train()
        hooks.before_step(0)
        (scale * model(**batch()).loss).backward()
        for p in model.parameters():
            if p.grad is not None:
                p.grad /= scale
        opt.step()
        hooks.after_step(0, opt)
        states.append([t.detach().clone() for m in wrapped.values() for t in (m.A, m.B, m.S)])
    for a, b in zip(*states):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- the cut to a level
def test_the_final_cut_keeps_the_largest_singular_values_within_the_level_exactly():
    _, _, wrapped = applied(init_r=4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in wrapped.values():
            layer.S[:4, :4] = torch.diag(
                torch.sort(torch.rand(4, generator=g) + 0.01, descending=True).values
            )
    full = sum(4 * component_cost(m) for m in wrapped.values())
    target = full // 3 + 17
    entries = sorted(
        ((-m.S[i, i].item(), n, i, component_cost(m)) for n, m in wrapped.items() for i in range(4)),
    )
    kept, expected = 0, set()  # the reference: the largest first while they fit
    for _, n, i, cost in entries:
        if kept + cost > target:
            break
        kept += cost
        expected.add((n, i))
    before = {n: delta(m) for n, m in wrapped.items()}
    cut = cut_to(wrapped, target)
    left = {(n, i) for n, m in wrapped.items() for i in range(m.active)}
    assert left == expected and cut == 4 * len(wrapped) - len(left)
    kept_params = sum(m.active * component_cost(m) for m in wrapped.values())
    assert kept_params == kept <= target
    assert target - kept < max(component_cost(m) for m in wrapped.values())
    for n, m in wrapped.items():  # a matrix keeps its leading components, unchanged
        r = m.active
        torch.testing.assert_close(delta(m), m.scaling * m.B[:, :r] @ m.S[:r, :r] @ m.A[:r])
        if r == 4:
            torch.testing.assert_close(delta(m), before[n])


def test_the_cut_comes_at_t_minus_final_steps_and_the_ranks_stay_there():
    _, wrapped, hooks, history = trained(6, tau=0.0, target_params=1500, final_steps=2)
    assert hooks.cut is not None and hooks.cut > 0
    assert history[3] == history[4] == history[5]  # cut after step 3; no round after it
    assert sum(r for r in history[3].values()) < sum(r for r in history[2].values())
    assert hooks.kept()["kept_params"] <= 1500
    assert hooks.allocation(6)["final"]


# ---------------------------------------------------------------- the result is a LoRA
def test_the_trained_adapter_exports_to_peft_at_its_ranks_and_merges(tmp_path):
    model, wrapped, _, history = trained(3, tau=0.3)
    ranks = history[-1]
    assert len(set(ranks.values())) > 1  # the matrices end at different ranks: a rank_pattern
    summary = export_peft_adapter(model, wrapped, tmp_path, base_model_name_or_path="tiny-bert")
    assert summary["modules"] == {n: r for n, r in ranks.items() if r > 0}
    expected = logits(model)
    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=0)
    geolora.merge(model, wrapped)
    assert not any(isinstance(m, geolora.GeoLoRALinear) for m in model.modules())
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)


def test_save_adapter_keeps_the_ranks_and_load_adapter_computes_the_same(tmp_path):
    """The ranks live in the hooks' state (hooks.pt): a fresh model loads the adapter at them."""
    model, wrapped, hooks, history = trained(3, tau=0.3)
    cfg = method_config_from_dict({"name": "geolora", "init_r": 2, "r_max": 8, "min_rank": 1, "tau": 0.3})
    expected = logits(model)
    save_adapter(model, cfg, wrapped, tmp_path / "adapter", "tiny-bert", hooks=[hooks])
    fresh = build()
    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert {n: m.active for n, m in loaded.items() if isinstance(m, geolora.GeoLoRALinear)} == history[-1]
    torch.testing.assert_close(logits(fresh.eval()), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- a whole run
def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "ranks.jsonl").read_text().splitlines()]


RUN = ["method=geolora", "method.init_r=2", "method.r_max=8", "method.tau=0.05", "method.final_steps=6"]


def level() -> int:
    """300 parameters below rank 2 everywhere on tiny BERT's 12 matrices: min_rank = 2 holds every
    matrix at 2 or more until the cut, so the cut must bite."""
    from adabudget.arch import arch_of

    arch = arch_of(build())
    return sum(2 * component_cost(s) for _, s in arch.match_linears(arch.default_targets(), None)) - 300


def test_a_run_reaches_the_level_records_the_ranks_and_resumes_before_and_after_the_cut(compose_run):
    target = level()
    full = train(compose_run(*RUN, f"method.target_params={target}", "run_name=full"))
    assert full["status"] == "completed"
    kept = full["geolora"]["kept_params"]
    assert full["adapter_params_final"] == kept <= target and full["geolora"]["cut"] > 0
    assert target - kept < 288  # within one component of the level (tiny BERT: in + out <= 288)
    lines = rows(full["run_dir"])
    assert lines[0]["step"] == 0 and set(lines[0]["ranks"].values()) == {2}
    assert max(max(r["ranks"].values()) for r in lines) > 2  # the ranks grew before the cut
    assert lines[-1]["final"] and lines[-1]["ranks"] == full["ranks"] and lines[-1]["kept_params"] == kept
    assert [r["step"] for r in lines] == sorted({r["step"] for r in lines})
    assert Path(full["exports"]["adapter"]["path"], "adapter_config.json").exists()
    from adabudget.analysis.records import load

    assert load([full["run_dir"]]).runs["final_params"].tolist() == [kept]  # the tables' count

    for stop in (9, 20):  # before the cut (after step 17) and after it
        first = train(
            compose_run(
                *RUN, f"method.target_params={target}", f"run_name=s{stop}", f"train.stop_after_step={stop}"
            )
        )
        assert first["status"] == "interrupted"
        resumed = train(resume_config(first["run_dir"]))
        assert resumed["status"] == "completed"
        assert resumed["final"] == full["final"] and resumed["ranks"] == full["ranks"], stop
        assert resumed["geolora"] == full["geolora"]
        assert rows(resumed["run_dir"]) == lines


def test_a_run_stopped_mid_round_resumes_exactly(compose_run):
    """basis_interval = 4: augmented at step 8, truncated at 11; stopped after step 9 (rank 2r,
    S in the augmented basis) the resumed run ends as the uninterrupted one."""
    run = [*RUN, "method.basis_interval=4"]
    full = train(compose_run(*run, "run_name=full"))
    first = train(compose_run(*run, "run_name=mid", "train.stop_after_step=10"))
    assert first["status"] == "interrupted"
    resumed = train(resume_config(first["run_dir"]))
    assert resumed["final"] == full["final"] and resumed["ranks"] == full["ranks"]
    assert rows(resumed["run_dir"]) == rows(full["run_dir"])


@pytest.mark.parametrize(
    "knobs, field",
    [
        ({"r_max": 0}, "method.r_max"),
        ({"init_r": 20}, "method.init_r"),
        ({"min_rank": 9}, "method.min_rank"),
        ({"tau": 1.0}, "method.tau"),
        ({"basis_interval": 0}, "method.basis_interval"),
        ({"target_params": 0}, "method.target_params"),
        ({"final_steps": -1}, "method.final_steps"),
    ],
)
def test_bad_knobs_are_refused_naming_the_field(knobs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        GeoLoRAConfig(**knobs).validate()


def test_a_level_above_what_r_max_ends_with_or_an_r_max_above_the_matrix_is_refused(compose_run):
    with pytest.raises(ConfigError, match=r"method\.target_params.*raise method\.r_max"):
        train(
            compose_run(
                "method=geolora",
                "method.init_r=1",
                "method.r_max=1",
                "method.min_rank=1",
                "method.target_params=100000000",
            )
        )
    with pytest.raises(ConfigError, match=r"method\.r_max=100.*lower method\.r_max"):
        train(compose_run("method=geolora", "method.r_max=100"))
