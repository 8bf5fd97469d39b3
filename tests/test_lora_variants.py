"""The LoRA variants peft ships, as knobs of ``method=lora`` (and PiSSA and DoRA on AdaLoRA's P Λ Q).

DoRA (``dora=true``), rsLoRA (``rslora=true``) and the initialisations ``gaussian``, ``pissa``,
``pissa_niter_<k>`` and ``olora`` are checked against peft 0.21 itself, the reference:

- the start: PiSSA's and OLoRA's A, B and the residual left in W0 equal what peft's
  ``init_lora_weights="pissa"`` / ``"olora"`` computes on the same weights;
- DoRA's forward and its gradients (the column norm detached, DoRA section 4.3) equal peft's
  ``use_dora=True`` layer holding the same A, B and m;
- the round trip: a few training steps, ``export_peft_adapter``, ``PeftModel.from_pretrained`` on
  the UNTOUCHED base (PiSSA / OLoRA written as the rank-2r change relative to W0, as peft's
  ``path_initial_model_for_weight_conversion``) gives the trained model's logits, on the tiny
  classifiers and the tiny causal LMs, and the config says ``use_dora`` / ``use_rslora`` / alpha.

The generic checks (count exact, merge, save/load, few steps) run in tests/test_methods.py's rows.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft  # the parity reference (the [dev] extra): missing, these tests fail, they do not skip
import pytest
import torch
from adabudget.allocator import RankAllocator
from adabudget.arch import arch_of
from adabudget.config import ConfigError
from adabudget.export import export_peft_adapter, merge_methods
from adabudget.methods import apply_method, count_method, method_config_from_dict
from adabudget.methods.adalora import SVDLinear
from adabudget.methods.lora import DoRALinear, LoRALinear
from conftest import tiny_model
from test_methods import tiny_lm

ATOL = 1e-5
CLASSIFIERS = ("tiny-bert", "tiny-gpt2", "tiny-llama")
LMS = ("tiny-gpt2-lm", "tiny-llama-lm")
LORA = {"name": "lora", "r": 2, "alpha": 4.0}
VARIANTS = {
    "dora": {**LORA, "dora": True},
    "rslora": {**LORA, "rslora": True},
    "gaussian": {**LORA, "init": "gaussian"},
    "pissa": {**LORA, "init": "pissa"},
    "pissa-niter": {**LORA, "init": "pissa_niter_2"},
    "olora": {**LORA, "init": "olora"},
    "pissa-dora-rslora": {**LORA, "init": "pissa", "dora": True, "rslora": True},
    # AdaLoRA with P Λ Q at W0's principal triplets, shrunk to mixed ranks (one module at 0)
    "adalora-pissa": {
        "name": "adalora",
        "init_r": 4,
        "target_r": 2,
        "warmup_steps": 2,
        "final_steps": 2,
        "mask_interval": 1,
        "min_rank": 0,
        "init": "pissa",
    },
}
# DoRA's magnitude on P Λ Q: exported as peft's use_dora LoRA (a module at rank 0 as a zero rank-1
# pair, which still carries its m)
VARIANTS["adalora-dora"] = {**VARIANTS["adalora-pissa"], "init": "orthogonal", "dora": True}
VARIANTS["adalora-pissa-dora"] = {**VARIANTS["adalora-pissa"], "dora": True}
STEPS = 6


def build(arch_name: str, seed: int = 0):
    return tiny_lm(arch_name, seed, layers=2) if arch_name in LMS else tiny_model(arch_name, seed)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def trained(arch_name: str, knobs: dict):
    """(model, wrapped, base before the method, eval ids): STEPS AdamW steps at a large lr on random
    tokens, so every factor (and DoRA's m) moves far; AdaLoRA ends shrunk to ranks {0, 1, >= 2}."""
    model = build(arch_name)
    base = copy.deepcopy(model)
    cfg = method_config_from_dict(knobs)
    cfg.validate()
    wrapped = apply_method(model, cfg)
    alloc = RankAllocator(wrapped, cfg, STEPS) if cfg.name == "adalora" else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for step in range(1, STEPS + 1):
        ids = torch.randint(1, 1000, (4, 8), generator=gen)
        labels = ids if arch_name in LMS else torch.randint(0, 2, (4,), generator=gen)
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        if alloc is not None:
            allocation = alloc.update_and_allocate(step)
            if allocation is not None and allocation.shrink:
                alloc.shrink_(opt)
        opt.zero_grad()
    if alloc is not None:
        ranks = alloc.ranks()
        names = list(ranks)
        ranks[names[0]] = 0
        top = max(names[1:], key=ranks.get)  # kept at >= 2; another one with triplets left goes to 1
        ranks[next(n for n in names[1:] if n != top and ranks[n] > 0)] = 1
        alloc.shrink_to(ranks)
    return model, wrapped, base, torch.randint(1, 1000, (3, 10), generator=gen)


CELLS = [(v, a) for v in VARIANTS for a in CLASSIFIERS + LMS]


@pytest.mark.parametrize("variant, arch_name", CELLS, ids=[f"{a}-{v}" for v, a in CELLS])
def test_the_peft_adapter_on_the_untouched_base_gives_the_trained_logits(variant, arch_name, tmp_path):
    knobs = VARIANTS[variant]
    model, wrapped, base, ids = trained(arch_name, knobs)
    task_type = "CAUSAL_LM" if arch_name in LMS else "SEQ_CLS"
    summary = export_peft_adapter(model, wrapped, tmp_path, arch_name, task_type)
    expected = logits(model, ids)
    assert (logits(base, ids) - expected).abs().max() > 20 * ATOL  # the training matters
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, atol=ATOL, rtol=0)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] == knobs.get("dora", False)
    assert config["init_lora_weights"] is True  # a plain LoRA on the untouched base, whatever the init
    moved = knobs.get("init", "kaiming").startswith(("pissa", "olora"))
    built = {n: m.r["default"] for n, m in loaded.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert built == summary["modules"]
    if knobs["name"] == "lora":  # peft's own scale: B as trained, alpha and rslora as configured
        r = 2 * knobs["r"] if moved else knobs["r"]
        assert set(built.values()) == {r} and config["r"] == r
        assert config["use_rslora"] == knobs.get("rslora", False)
        growth = (2**0.5 if knobs.get("rslora") else 2) if moved else 1  # keeps s at 2r (peft's rule)
        assert config["lora_alpha"] == pytest.approx(knobs["alpha"] * growth)
    elif moved:  # AdaLoRA from PiSSA: r kept triplets + init_r initial ones per module (one pruned to 0 too)
        ranks = {n: lay.rank for n, lay in wrapped.items()}
        assert 0 in ranks.values() and not summary["pruned"]
        assert built == {n: r + knobs["init_r"] for n, r in ranks.items()}
    else:  # AdaLoRA with DoRA: the kept triplets; the module pruned to 0 as a zero rank-1 pair (its m)
        ranks = {n: lay.rank for n, lay in wrapped.items()}
        assert 0 in ranks.values() and not summary["pruned"]
        assert built == {n: max(r, 1) for n, r in ranks.items()}
        zero = next(n for n, r in ranks.items() if r == 0)
        assert not torch.allclose(wrapped[zero].magnitude, wrapped[zero].weight_norm())  # m moved
    if knobs.get("dora"):
        n_dora = sum(lay.out_features for lay in wrapped.values())
        assert summary["adapter_params"] == n_dora + sum(
            r * (wrapped[n].in_features + wrapped[n].out_features) for n, r in summary["modules"].items()
        )


@pytest.mark.parametrize(
    "variant", ["dora", "pissa-dora-rslora", "olora", "adalora-pissa", "adalora-dora", "adalora-pissa-dora"]
)
@pytest.mark.parametrize("arch_name", ["tiny-gpt2", "tiny-llama-lm"])
def test_merging_gives_the_trained_function(variant, arch_name):
    model, wrapped, _, ids = trained(arch_name, VARIANTS[variant])
    expected = logits(model, ids)
    merge_methods(model, wrapped, [VARIANTS[variant]["name"]])
    assert not any(isinstance(m, (LoRALinear, SVDLinear)) for m in model.modules())
    torch.testing.assert_close(logits(model, ids), expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- the start, against peft's inits
def peft_model(base, knobs: dict, targets: list[str], **extra):
    config = peft.LoraConfig(
        r=knobs["r"],
        lora_alpha=knobs["alpha"],
        use_rslora=knobs.get("rslora", False),
        target_modules=targets,
        lora_dropout=0.0,
        **extra,
    )
    return peft.get_peft_model(copy.deepcopy(base), config)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("arch_name", ["tiny-bert", "tiny-llama"])
def test_pissa_and_olora_start_where_peft_does(init, rslora, arch_name):
    """A, B and the residual W0 - s B A in the base equal peft's ``init_lora_weights=init``, and
    the model still computes the base function."""
    base = tiny_model(arch_name)
    knobs = {**LORA, "init": init, "rslora": rslora}
    ours = copy.deepcopy(base)
    wrapped = apply_method(ours, method_config_from_dict(knobs))
    ref = peft_model(base, knobs, sorted(wrapped), init_lora_weights=init)
    ref_layers = dict(ref.base_model.model.named_modules())
    for name, layer in wrapped.items():
        theirs = ref_layers[name]
        torch.testing.assert_close(layer.A, theirs.lora_A["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.B, theirs.lora_B["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.base.weight, theirs.base_layer.weight, atol=1e-6, rtol=1e-5)
        assert not torch.equal(layer.base.weight, base.get_submodule(name).weight)  # W0 was rewritten
    ids = torch.randint(5, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(ours, ids), logits(base, ids), atol=ATOL, rtol=0)


def test_pissa_niter_finds_the_principal_part_the_same_way_every_build():
    """The fast SVD (``pissa_niter_<k>``: torch's ``svd_lowrank`` at q = r, as peft's) draws its start
    from a fixed seed: two builds (a resumed run, ``load_adapter``) hold the same factors whatever
    the global RNG did; on a W0 with a decaying spectrum s B A is its principal part."""
    name = "bert.encoder.layer.0.intermediate.dense"
    g = torch.Generator().manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(64, 32, generator=g))
    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    spectrum = 0.5 ** torch.arange(32.0)  # (32,)
    w0 = u * spectrum @ v.T  # (64, 32)
    knobs = {**LORA, "r": 4, "init": "pissa_niter_4"}
    builds = []
    for seed in (1, 2):
        model = tiny_model("tiny-bert")
        with torch.no_grad():
            model.get_submodule(name).weight.copy_(w0)
        torch.manual_seed(seed)
        builds.append(apply_method(model, method_config_from_dict(knobs))[name])
    a, b = builds
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and torch.equal(a.base.weight, b.base.weight)
    principal = u[:, :4] * spectrum[:4] @ v[:, :4].T
    with torch.no_grad():
        torch.testing.assert_close(a.delta_weight(), principal, atol=1e-3, rtol=0)
        torch.testing.assert_close(a.base.weight + a.delta_weight(), w0, atol=1e-6, rtol=0)


def backward_both_and_compare(ours, ref, ids) -> None:
    """One backward of the same classification loss through our model and peft's, then their
    logits compared (the gradients are the caller's to compare)."""
    labels = torch.tensor([0, 1])
    for model in (ours, ref):
        model.train()
        model(input_ids=ids, labels=labels).loss.backward()
    torch.testing.assert_close(logits(ours, ids), logits(ref, ids), atol=ATOL, rtol=0)


def test_dora_forward_and_gradients_equal_peft():
    """With the same A, B and m (all off their init) our DoRA layer computes peft's outputs and
    gradients: m (W0 + s B A) x / ||W0 + s B A||_c + b with the norm detached (DoRA section 4.3); a
    norm that took gradients would change dL/dA and dL/dB."""
    base = tiny_model("tiny-llama")
    knobs = {**LORA, "dora": True}
    ours = copy.deepcopy(base)
    wrapped = apply_method(ours, method_config_from_dict(knobs))
    ref = peft_model(base, knobs, sorted(wrapped), use_dora=True)
    ref_layers = dict(ref.base_model.model.named_modules())
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, layer in wrapped.items():
            assert isinstance(layer, DoRALinear)
            theirs = ref_layers[name]
            torch.testing.assert_close(layer.magnitude, theirs.lora_magnitude_vector["default"].weight)
            for mine, their in (
                (layer.A, theirs.lora_A["default"].weight),
                (layer.B, theirs.lora_B["default"].weight),
                (layer.magnitude, theirs.lora_magnitude_vector["default"].weight),
            ):
                mine.add_(0.3 * torch.randn(mine.shape, generator=g))
                their.copy_(mine)
    backward_both_and_compare(ours, ref, torch.randint(5, 1000, (2, 7), generator=g))
    for name, layer in wrapped.items():
        theirs = ref_layers[name]
        torch.testing.assert_close(layer.A.grad, theirs.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(layer.B.grad, theirs.lora_B["default"].weight.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(
            layer.magnitude.grad, theirs.lora_magnitude_vector["default"].weight.grad, atol=1e-6, rtol=1e-4
        )


def test_counts_add_dora_magnitude_and_keep_lora_size_for_the_inits():
    model = tiny_model("tiny-bert")
    arch = arch_of(model)
    plain = count_method(method_config_from_dict(LORA), arch)
    outs = sum(
        m.out_features for m in apply_method(copy.deepcopy(model), method_config_from_dict(LORA)).values()
    )
    assert count_method(method_config_from_dict({**LORA, "dora": True}), arch) == plain + outs
    for init in ("gaussian", "pissa", "pissa_niter_3", "olora"):
        assert count_method(method_config_from_dict({**LORA, "init": init}), arch) == plain


def test_gaussian_draws_a_with_peft_std_and_leaves_w0_alone():
    """peft's "gaussian": A ~ N(0, 1/r) in std, B = 0; W0 untouched, nothing to convert at export."""
    base = tiny_model("tiny-bert")
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    wrapped = apply_method(model, method_config_from_dict({**LORA, "r": 4, "init": "gaussian"}))
    a = torch.cat([lay.A.flatten() for lay in wrapped.values()])  # 12 x 4 x in entries
    assert abs(a.std().item() - 1 / 4) < 0.02 and abs(a.mean().item()) < 0.02
    assert all(not lay.B.any() and lay.A0 is None for lay in wrapped.values())
    assert all(torch.equal(lay.base.weight, base.get_submodule(n).weight) for n, lay in wrapped.items())


# ---------------------------------------------------------------- what is refused, and how
@pytest.mark.parametrize(
    "knobs, match",
    [
        ({**LORA, "init": "lora_ga"}, r"method\.init: .*'lora_ga'.*LoRA-GA is not built"),
        ({**VARIANTS["adalora-pissa"], "init": "eva"}, r"method\.init: unknown initialisation 'eva'"),
        ({**LORA, "init": "eva", "eva_tau": 0}, r"method\.eva_tau: must be in \(0, 1\]"),
        ({**LORA, "init": "eva", "eva_batches": 1}, r"method\.eva_batches: must be >= 2"),
        ({**LORA, "init": "pissa_niter_0"}, r"method\.init: unknown initialisation 'pissa_niter_0'"),
        ({**LORA, "init": "svd"}, r"method\.init: unknown initialisation 'svd'; use one of"),
        ({**VARIANTS["adalora-pissa"], "init": "olora"}, r"method\.init: 'olora' .* no P Λ Q .*method=lora"),
    ],
)
def test_unknown_or_unfit_inits_are_refused_naming_the_field(knobs, match):
    with pytest.raises(ConfigError, match=match):
        method_config_from_dict(knobs).validate()


@pytest.mark.parametrize(
    "knobs, match",
    [
        (
            {**LORA, "r": 40, "init": "pissa"},
            r"method\.r=40: method\.init=pissa .* has only 32; lower method\.r",
        ),
        (
            {**VARIANTS["adalora-pissa"], "init_r": 40, "target_r": 8},
            r"method\.init_r=40: .*lower method\.init_r",
        ),
    ],
)
def test_more_principal_directions_than_a_matrix_has_is_refused_before_building(knobs, match):
    model = tiny_model("tiny-bert")
    cfg = method_config_from_dict(knobs)
    with pytest.raises(ConfigError, match=match):
        count_method(cfg, arch_of(model))
    with pytest.raises(ConfigError, match=match):
        apply_method(model, cfg)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("knobs", [{**LORA, "init": "pissa"}, VARIANTS["adalora-pissa"]])
def test_pissa_on_a_4bit_base_is_refused_naming_both_fields(knobs):
    pytest.importorskip("torchao")
    from adabudget.quantize import quantize_base

    model = tiny_model("tiny-bert")
    quantize_base(model, "nf4")
    with pytest.raises(ConfigError, match=r"method\.init=pissa: .*model\.quantize.*model\.quantize=null"):
        apply_method(model, method_config_from_dict(knobs))
    assert not any(isinstance(m, (LoRALinear, SVDLinear)) for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


def test_dora_on_a_4bit_base_computes_with_the_dequantised_weight():
    """QDoRA: the norm and the W0 x part read the NF4 weight dequantised; at init the layer computes
    the quantised base exactly."""
    pytest.importorskip("torchao")
    from adabudget.quantize import quantize_base

    model = tiny_model("tiny-llama", layers=1)
    quantize_base(model, "nf4")
    ids = torch.randint(5, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)  # (an NF4 weight cannot be deep-copied at this size)
    wrapped = apply_method(model, method_config_from_dict({**LORA, "dora": True}))
    torch.testing.assert_close(logits(model, ids), before, atol=ATOL, rtol=0)
    layer = next(iter(wrapped.values()))
    w = layer.base.weight.get_original_weight().float()
    torch.testing.assert_close(layer.magnitude, torch.linalg.vector_norm(w, dim=1))


# ---------------------------------------------------------------- a whole run
@pytest.mark.integration
def test_a_pissa_dora_run_resumes_exactly_and_its_peft_adapter_is_its_merged_model(compose_run):
    """Through ``adabudget.train``: W0's residual is rebuilt from W0 on resume (A0, B0 are not in the
    checkpoint), so an interrupted run ends where the straight one does; ``adabudget.load`` (peft on
    the untouched base) and ``merged/`` (our merge of the trained model) compute the same logits."""
    from adabudget.api import load
    from adabudget.compose import resume_config
    from adabudget.training import train
    from transformers import AutoModelForSequenceClassification

    knobs = ["method=pissa", "method.r=2", "method.alpha=2", "method.dora=true", "train.max_steps=12"]
    full = train(compose_run(*knobs, "run_name=full", "export_merged=true"))
    assert full["status"] == "completed"
    config = json.loads((Path(full["run_dir"]) / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["r"] == 4 and config["init_lora_weights"] is True
    first = train(compose_run(*knobs, "run_name=killed", "export_merged=true", "train.stop_after_step=5"))
    assert first["status"] == "interrupted"
    resumed = train(resume_config(first["run_dir"]))
    assert resumed["status"] == "completed" and resumed["final"] == full["final"]

    ids = torch.randint(5, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
    peft_side = load(full["run_dir"])
    assert isinstance(peft_side, peft.PeftModel)
    merged = AutoModelForSequenceClassification.from_pretrained(Path(full["run_dir"]) / "merged")
    torch.testing.assert_close(logits(peft_side, ids), logits(merged, ids), atol=ATOL, rtol=0)


# ---------------------------------------------------------------- EVA: A from the layers' inputs
def eva_batches(arch_name: str, n: int = 12) -> list[dict]:
    """n batches of 8 x 16 tokens, one row padded after 10; causal-LM labels are the tokens with the
    first 3 (a prompt) and the padding at -100."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 1000, (8, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 10:] = 0
        if arch_name in LMS:
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, :3] = -100
        else:
            labels = torch.randint(0, 2, (8,), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@pytest.mark.parametrize("arch_name", ["tiny-bert", "tiny-llama-lm"])
def test_eva_components_equal_peft(arch_name):
    """After ``calibrate`` every A holds the top-r principal components of its layer's inputs as
    peft's ``get_eva_state_dict`` (rho=1, τ=0.99; the label mask on the causal LM) computes them on
    the same batches, B is still 0 and the model is still the base model."""
    import itertools

    from adabudget.methods import REGISTRY
    from peft.tuners.lora.eva import get_eva_state_dict

    base = build(arch_name)
    data = eva_batches(arch_name)
    ours = copy.deepcopy(base)
    cfg = method_config_from_dict({**LORA, "init": "eva"})
    wrapped = apply_method(ours, cfg)
    kaiming = {n: lay.A.clone() for n, lay in wrapped.items()}
    hooks = REGISTRY["lora"].hooks(ours, wrapped, cfg)
    hooks.calibrate(lambda b: ours(**b).loss, lambda n: itertools.islice(itertools.cycle(data), n))
    assert sorted(hooks.converged) == sorted(wrapped) and not hooks.unconverged

    config = peft.LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        target_modules=sorted(wrapped),
        init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=1.0, tau=0.99, use_label_mask=arch_name in LMS),
    )
    reference = get_eva_state_dict(
        peft.get_peft_model(copy.deepcopy(base), config, low_cpu_mem_usage=True),
        data,
        show_progress_bar=False,
    )
    for name, layer in wrapped.items():
        theirs = reference[f"base_model.model.{name}"].float()  # (r, in), float64 in peft's PCA
        torch.testing.assert_close(layer.A, theirs, atol=1e-6, rtol=0)
        assert not torch.allclose(layer.A, kaiming[name]) and not layer.B.any()
    ids = data[0]["input_ids"]
    torch.testing.assert_close(logits(ours, ids), logits(base, ids), atol=ATOL, rtol=0)


@pytest.mark.integration
def test_an_eva_run_calibrates_once_and_resumes_to_the_same_result(compose_run):
    """Through ``adabudget.train``: the calibration runs on a fresh run and the record says what
    converged; a resumed run restores A from its checkpoint (no second calibration) and ends where
    the straight run does."""
    from adabudget.compose import resume_config
    from adabudget.training import train

    knobs = ["method=lora", "method.r=2", "method.init=eva", "train.max_steps=10"]
    full = train(compose_run(*knobs, "run_name=full"))
    assert full["status"] == "completed"
    eva = full["eva"]
    assert len(eva["converged_after"]) + len(eva["unconverged"]) == 12  # tiny BERT's 12 matrices
    first = train(compose_run(*knobs, "run_name=killed", "train.stop_after_step=4"))
    assert first["status"] == "interrupted"
    resumed = train(resume_config(first["run_dir"]))
    assert resumed["status"] == "completed" and resumed["final"] == full["final"]
    assert resumed["eva"] == eva
    config = json.loads((Path(full["run_dir"]) / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 2  # a plain LoRA for peft


def test_dora_with_dropout_trains_as_peft_does():
    """In training with dropout, the dropped-out x feeds both W0 x and s B A x of the rescaled term
    (peft's rule): with the same masks (same seed, same draws) outputs and gradients equal peft's."""
    base = tiny_model("tiny-bert")
    knobs = {**LORA, "dora": True, "dropout": 0.3}
    ours = copy.deepcopy(base)
    wrapped = apply_method(ours, method_config_from_dict(knobs))
    ref = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=2, lora_alpha=4.0, target_modules=sorted(wrapped), lora_dropout=0.3, use_dora=True),
    )
    ref_layers = dict(ref.base_model.model.named_modules())
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, layer in wrapped.items():
            theirs = ref_layers[name]
            layer.B.add_(0.3 * torch.randn(layer.B.shape, generator=g))
            theirs.lora_B["default"].weight.copy_(layer.B)
            theirs.lora_A["default"].weight.copy_(layer.A)
    ids = torch.randint(5, 1000, (2, 7), generator=g)
    outs = []
    for model in (ours, ref):
        model.train()
        torch.manual_seed(7)
        out = model(input_ids=ids, labels=torch.tensor([0, 1]))
        out.loss.backward()
        outs.append(out.logits)
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)
    for name, layer in wrapped.items():
        torch.testing.assert_close(
            layer.A.grad, ref_layers[name].lora_A["default"].weight.grad, atol=1e-6, rtol=1e-4
        )


def test_dora_on_adalora_computes_peft_s_dora_of_its_p_lambda_q():
    """A DoRA AdaLoRA layer with P, Λ, Q and m off their init computes, and differentiates in m, what
    peft's DoRA LoRA layer computes with A = Q and B = s P Λ (alpha = r): m (W0 + s P Λ Q) x /
    ||W0 + s P Λ Q||_c + b, the norm detached; at init (λ = 0, or PiSSA's triplets) it is the base."""
    from adabudget.methods.adalora import DoRASVDLinear

    base = tiny_model("tiny-llama")
    ids = torch.randint(5, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    for variant in ("adalora-dora", "adalora-pissa-dora"):
        start = copy.deepcopy(base)
        apply_method(start, method_config_from_dict(VARIANTS[variant]))
        torch.testing.assert_close(logits(start, ids), logits(base, ids), atol=ATOL, rtol=0)

    ours = copy.deepcopy(base)
    wrapped = apply_method(ours, method_config_from_dict(VARIANTS["adalora-dora"]))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in wrapped.values():
            assert isinstance(layer, DoRASVDLinear)
            for t in (layer.P, layer.lam, layer.Q, layer.magnitude):
                t.add_(0.3 * torch.randn(t.shape, generator=g))
    r = VARIANTS["adalora-dora"]["init_r"]
    ref = peft_model(base, {"r": r, "alpha": r}, sorted(wrapped), use_dora=True)
    ref_layers = dict(ref.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in wrapped.items():
            theirs = ref_layers[name]
            theirs.lora_A["default"].weight.copy_(layer.Q)
            theirs.lora_B["default"].weight.copy_(layer.P * (layer.lam * layer.scaling))
            theirs.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    backward_both_and_compare(ours, ref, ids)
    for name, layer in wrapped.items():
        theirs = ref_layers[name]
        torch.testing.assert_close(
            layer.magnitude.grad, theirs.lora_magnitude_vector["default"].weight.grad, atol=1e-6, rtol=1e-4
        )
        # dL/dQ = dL/dA: the norm detached in both (a norm with gradients would change it)
        torch.testing.assert_close(layer.Q.grad, theirs.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-4)


def test_dora_on_adalora_counts_its_magnitudes_outside_the_triplet_budget():
    """count = init_r triplets + out per matrix; ``target_params`` is the final adapter size, the
    magnitudes paid first (so a DoRA AdaLoRA meets the same level as a DoRA LoRA); a target they
    exceed, or DoRA inside a hybrid group's AdaLoRA, is refused naming the field."""
    from adabudget.methods.adalora import check_budget, kept_params

    model = tiny_model("tiny-bert")
    arch = arch_of(model)
    knobs = {k: v for k, v in VARIANTS["adalora-dora"].items() if k != "init"}
    plain = count_method(method_config_from_dict({**knobs, "dora": False}), arch)
    wrapped = apply_method(copy.deepcopy(model), method_config_from_dict(knobs))
    outs = sum(lay.out_features for lay in wrapped.values())
    assert count_method(method_config_from_dict(knobs), arch) == plain + outs
    assert kept_params({n: 0 for n in wrapped}, wrapped) == outs  # rank 0 keeps m

    lora_dora = count_method(method_config_from_dict({**LORA, "dora": True}), arch)  # r = 2 at every matrix
    cfg = method_config_from_dict({**knobs, "target_params": lora_dora})
    budget = check_budget(cfg, [(lay, lay.rank) for lay in wrapped.values()])
    assert budget.target == lora_dora - outs  # the triplets get what the magnitudes leave
    with pytest.raises(ConfigError, match=r"method\.target_params=\d+: DoRA's magnitudes alone hold"):
        check_budget(
            method_config_from_dict({**knobs, "target_params": outs}), [(lay, 4) for lay in wrapped.values()]
        )
    hybrid = {"name": "hybrid", "num_groups": 2, "groups": [{"adalora": {"dora": True}}, {"lora": {}}]}
    with pytest.raises(ConfigError, match=r"method\.groups\[0\]\.adalora\.dora: DoRA on AdaLoRA runs as"):
        apply_method(copy.deepcopy(model), method_config_from_dict(hybrid))


@pytest.mark.integration
def test_an_adalora_pissa_run_resumes_exactly_and_its_peft_adapter_is_its_merged_model(compose_run):
    """AdaLoRA from W0's principal triplets through the loop: the allocator prunes and shrinks them,
    a resumed run rebuilds the residual from W0 and ends where the straight one does, and the peft
    adapter (kept triplets and the initial ones negated, on the untouched base) is the merged model."""
    from adabudget.api import load
    from adabudget.compose import resume_config
    from adabudget.training import train
    from transformers import AutoModelForSequenceClassification

    knobs = ["method=adalora_pissa", "method.init_r=4", "method.target_r=2", "method.mask_interval=2"]
    full = train(compose_run(*knobs, "run_name=full", "export_merged=true"))
    assert full["status"] == "completed" and sum(full["ranks"].values()) == 2 * 12
    config = json.loads((Path(full["run_dir"]) / "adapter" / "adapter_config.json").read_text())
    ranks = {**dict.fromkeys(config["target_modules"], config["r"]), **config["rank_pattern"]}
    assert ranks == {n: r + 4 for n, r in full["ranks"].items()}  # r kept + init_r initial triplets
    first = train(compose_run(*knobs, "run_name=killed", "export_merged=true", "train.stop_after_step=13"))
    assert first["status"] == "interrupted"
    resumed = train(resume_config(first["run_dir"]))
    assert resumed["status"] == "completed"
    assert resumed["final"] == full["final"] and resumed["ranks"] == full["ranks"]

    ids = torch.randint(5, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForSequenceClassification.from_pretrained(Path(full["run_dir"]) / "merged")
    torch.testing.assert_close(logits(load(full["run_dir"]), ids), logits(merged, ids), atol=ATOL, rtol=0)


@pytest.mark.integration
def test_an_adalora_dora_run_meets_a_dora_lora_level_resumes_exactly_and_exports(compose_run, tmp_path):
    """DoRA on AdaLoRA through the loop at the level of a DoRA LoRA r=2 (``method.target_params``):
    the record's final adapter parameters (kept triplets + every matrix's m) land within one
    triplet below the level, a resumed run ends where the straight one does, and the peft adapter
    (use_dora) on the untouched base is the run's model."""
    from adabudget.api import load
    from adabudget.compose import resume_config
    from adabudget.training import train
    from transformers import AutoModelForSequenceClassification

    arch = arch_of(tiny_model("tiny-bert"))
    level = count_method(method_config_from_dict({**LORA, "dora": True}), arch)
    knobs = [
        "method=adalora",
        "method.dora=true",
        "method.init_r=4",
        f"method.target_params={level}",
        "method.mask_interval=2",
    ]
    full = train(compose_run(*knobs, "run_name=full", "export_merged=true"))
    assert full["status"] == "completed"
    wrapped = apply_method(tiny_model("tiny-bert"), method_config_from_dict({"name": "adalora", "init_r": 4}))
    largest = max(lay.in_features + lay.out_features + 1 for lay in wrapped.values())
    assert level - largest < full["adapter_params_final"] <= level
    first = train(compose_run(*knobs, "run_name=killed", "export_merged=true", "train.stop_after_step=13"))
    assert first["status"] == "interrupted"
    resumed = train(resume_config(first["run_dir"]))
    assert resumed["status"] == "completed"
    assert resumed["final"] == full["final"] and resumed["ranks"] == full["ranks"]

    config = json.loads((Path(full["run_dir"]) / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    ids = torch.randint(5, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForSequenceClassification.from_pretrained(Path(full["run_dir"]) / "merged")
    torch.testing.assert_close(logits(load(full["run_dir"]), ids), logits(merged, ids), atol=ATOL, rtol=0)
