"""Search spaces: every built-in space samples valid, budget-feasible configurations on every
backbone; infeasible ones are marked without training; the declarative grammar; composition."""

from __future__ import annotations

import optuna
import pytest
from adabudget.compose import resolve
from adabudget.config import ConfigError, validate
from adabudget.methods import apply_method, count_trainable, method_config_from_dict, methods_in
from adabudget.methods.hybrid import HybridConfig
from adabudget.models import tiny_config
from adabudget.modules import count_params, freeze_backbone
from adabudget.search.declarative import compile_params, distribution_from_override
from adabudget.search.spaces import SPACES, get_space
from adabudget.search.spaces.context import SpaceContext, merge_overrides
from adabudget.search.spaces.sampling import check_space, sample
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

optuna.logging.set_verbosity(optuna.logging.WARNING)

MODELS = ["tiny-bert", "tiny-gpt2", "tiny-llama", "minilm"]
LORA8 = {"name": "lora", "r": 8}  # the budget: LoRA r=8's count on each backbone (331,776 on MiniLM)
_configs: dict = {}


def hf_config(model: str):
    if model not in _configs:
        if model == "minilm":
            from adabudget.hub import packaged_path
            from transformers import AutoConfig

            _configs[model] = AutoConfig.from_pretrained(packaged_path("minilm"), num_labels=2)
        else:
            _configs[model] = tiny_config(model, num_labels=2, regression=False)
    return _configs[model]


def lora8_budget(model: str) -> int:
    return count_trainable(method_config_from_dict(LORA8), hf_config(model))


def context(model: str, budgeted: bool = True, **kwargs) -> SpaceContext:
    budget = lora8_budget(model) if budgeted else None
    return SpaceContext.from_config(hf_config(model), 2, budget=budget, **kwargs)


def draw(space, ctx: SpaceContext, n: int, seed: int = 0):
    """(trial, sample) pairs from a seeded random sampler on an in-memory study."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((trial, sample(trial, space, ctx)))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return study, out


def test_lora8_budget_on_minilm_is_the_papers_count():
    assert lora8_budget("minilm") == 331_776  # 6 x (4 x 8 x 768 + 2 x 8 x 1920)


# ---------------------------------------------------------------- every built-in space, every backbone
@pytest.mark.parametrize("budgeted", [False, True], ids=["free", "budget"])
@pytest.mark.parametrize("name", ["s4", "autopeft", "adalora"])
@pytest.mark.parametrize("model", MODELS)
def test_space_samples_valid_feasible_configurations(model, name, budgeted):
    ctx = context(model, budgeted)
    n = 40 if model == "minilm" else 60
    _, drawn = draw(SPACES[name], ctx, n)
    feasible = 0
    for trial, s in drawn:
        constraint = trial.storage.get_trial_system_attrs(trial._trial_id)["constraints:budget"]
        if not s.feasible:
            assert constraint > 0 and trial.user_attrs["infeasible"] == s.infeasible
            continue
        feasible += 1
        assert constraint == 0.0 and "infeasible" not in trial.user_attrs
        # the overrides alone (merged onto a run) resolve and validate as `adabudget train` would
        run = resolve(merge_overrides({"model": {"name": model}}, s.overrides))
        validate(run)
        assert count_trainable(run.method, hf_config(model)) == s.trainable_params
        assert trial.user_attrs["trainable_params"] == s.trainable_params > 0
        if budgeted:
            budget = ctx.budget
            assert abs(s.budget_params - budget) <= 0.02 * budget, (s.budget_params, budget)
            if "adalora" not in methods_in(run.method):
                assert s.budget_params == s.trainable_params
            else:  # AdaLoRA starts above its final budget b(T) (b(0) = 1.25-2 b(T))
                assert s.trainable_params > s.budget_params
        if isinstance(run.method, HybridConfig):
            assert run.method.num_groups <= ctx.arch.num_layers
            assert run.method.budget == ctx.budget  # None without search.budget
    assert feasible / n >= 0.85, f"{feasible}/{n} feasible"


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_s4_on_two_layers_samples_at_most_two_groups(model):
    ctx = context(model)
    assert ctx.arch.num_layers == 2
    _, drawn = draw(SPACES["s4"], ctx, 40, seed=1)
    groups = {s.overrides["method"]["num_groups"] for _, s in drawn}
    assert groups == {1, 2}


def test_s4_on_minilm_reaches_every_dimension():
    _, drawn = draw(SPACES["s4"], context("minilm"), 60, seed=2)
    methods = [s.overrides["method"] for _, s in drawn]
    assert {m["num_groups"] for m in methods} == {1, 2, 3, 4}
    assert {m["grouping"] for m in methods if m["num_groups"] > 2} == {
        "uniform",
        "spindle",
        "increasing",
        "decreasing",
    }
    assert {m["allocation"] for m in methods if m["num_groups"] > 1} == {
        "uniform",
        "increasing",
        "decreasing",
    }
    used = {k for m in methods for g in m["groups"] if g != "none" for k in g}
    assert used == {"adapter", "prefix", "bitfit", "lora", "adalora"}
    # AdaLoRA groups start at b(0) = 1.5 b(T) (the solver keeps the ratio given)
    for m in methods:
        for g in m["groups"]:
            if g != "none" and "adalora" in g:
                assert g["adalora"]["init_r"] == 1.5 * g["adalora"]["target_r"]


def test_s4_shares_become_the_parameter_split_of_a_group():
    """Two methods at shares 0.75 / 0.25 of one group: the solved sizes split its budget so."""
    from adabudget.arch import arch_from_config
    from adabudget.methods.hybrid import report

    ctx = context("minilm")
    trial = optuna.trial.FixedTrial(
        {
            "num_groups": 1,
            "g0.adapter": False,
            "g0.prefix": True,
            "g0.bitfit": False,
            "g0.lora": True,
            "g0.prefix.share": 0.25,
            "g0.lora.share": 0.75,
        }
    )
    s = sample(trial, SPACES["s4"], ctx)
    assert s.feasible
    (group,) = report(s.method, arch_from_config(hf_config("minilm")))
    lora, prefix = group["methods"]["lora"]["params"], group["methods"]["prefix"]["params"]
    assert lora / (lora + prefix) == pytest.approx(0.75, abs=0.02)


def test_prefix_never_sampled_on_deberta():
    ctx = context("tiny-deberta", extra_methods=["ia3", "parallel_adapter", "prompt"])
    assert "prefix" not in ctx.methods and "prefix" in ctx.excluded
    assert "cannot apply to model_type 'deberta-v2'" in ctx.excluded["prefix"]
    for name in ("s4", "autopeft"):
        _, drawn = draw(SPACES[name], ctx, 40)
        assert all("prefix" not in methods_in(s.method) for _, s in drawn)
        assert not any(k.endswith("prefix") or k.startswith("prefix") for t, _ in drawn for k in t.params)


def test_context_adapts_methods_to_the_architecture():
    llama = context("tiny-llama")
    assert llama.knobs == {"bitfit": {"add_missing": True}}  # no biases to train otherwise
    assert llama.methods == ("adapter", "prefix", "bitfit", "lora", "adalora")
    assert context("tiny-bert").extra_methods == ()
    asked = context("tiny-bert", extra_methods=["prompt", "ia3"])
    assert asked.extra_methods == ("ia3", "prompt")
    with pytest.raises(ConfigError, match="search.extra_methods"):
        context("tiny-bert", extra_methods=["dora"])
    pct = SpaceContext.from_config(hf_config("minilm"), budget_percent=1.0)
    assert pct.budget == round(22_713_216 / 100)
    with pytest.raises(ConfigError, match="search.budget"):
        SpaceContext.from_config(hf_config("minilm"), budget=100, budget_percent=1.0)


def test_context_from_model_name():
    ctx = SpaceContext.from_model("tiny-gpt2", budget=5000)
    assert ctx.arch.model_type == "gpt2" and ctx.budget == 5000
    assert SpaceContext.from_model("minilm").arch.num_layers == 6


@pytest.mark.parametrize("model", ["tiny-bert", "minilm"])
def test_extra_methods_in_s4_with_the_soft_prompt_in_one_group(model):
    from types import SimpleNamespace

    from adabudget.methods import plan_of
    from adabudget.training import check_positions

    ctx = context(model, extra_methods=["ia3", "parallel_adapter", "prompt"], max_length=64)
    _, drawn = draw(SPACES["s4"], ctx, 60, seed=3)
    used, prompted = set(), 0
    for _, s in drawn:
        groups = [g for g in s.overrides["method"]["groups"] if g != "none"]
        assert sum("prompt" in g for g in groups) <= 1
        used |= {k for g in groups for k in g}
        if s.feasible and any("prompt" in g for g in groups):
            prompted += 1
            assert s.budget_params == pytest.approx(ctx.budget, rel=0.02)
            # the train loop's own position check passes on the solved plan
            run = resolve(merge_overrides({"data": {"max_length": 64}}, s.overrides))
            plan = plan_of(run.method, ctx.arch)
            check_positions(run, SimpleNamespace(config=hf_config(model)), plan)
    assert {"ia3", "parallel_adapter", "prompt"} <= used and prompted >= 3
    assert sum(s.feasible for _, s in drawn) >= 0.75 * len(drawn)


def test_autopeft_layers_and_sizes():
    ctx = context("minilm")
    _, drawn = draw(SPACES["autopeft"], ctx, 30)
    for trial, s in drawn:
        method = s.overrides["method"]
        assert method["num_groups"] == 6 and method["grouping"] == "uniform"
        on = [g != "none" for g in method["groups"]]
        assert any(on)
        assert on[:5] == [trial.params[f"layer{i}"] for i in range(5)]
        for key in ("serial_adapter", "parallel_adapter", "prefix_length"):
            assert trial.params[key] in (0, 1, 3, 6, 12, 24, 48, 96, 192, 384)  # h / 2^k, h = 384


def test_adalora_space_targets_the_budget():
    ctx = context("minilm")
    _, drawn = draw(SPACES["adalora"], ctx, 20)
    for trial, s in drawn:
        m = s.overrides["method"]
        assert s.feasible and m["target_params"] == ctx.budget == s.budget_params
        assert s.trainable_params == pytest.approx(trial.params["init_ratio"] * ctx.budget, rel=0.15)
        assert m["warmup_steps"] + m["final_steps"] < 0.9
        assert m["orth_reg_weight"] in (0.1, 0.3, 0.5)
    free = context("minilm", budgeted=False)
    _, drawn = draw(SPACES["adalora"], free, 20)
    assert all(s.overrides["method"]["init_r"] in (4, 6, 12) for _, s in drawn)


# ---------------------------------------------------------------- infeasible configurations
def test_impossible_budget_makes_check_space_raise():
    ctx = SpaceContext.from_config(hf_config("tiny-bert"), budget=10)
    for name in ("s4", "autopeft", "adalora"):
        with pytest.raises(ConfigError, match="search.budget=10: none of 16 configurations"):
            check_space(get_space(name), ctx, n=16)


def test_check_space_returns_the_feasible_fraction():
    assert check_space(get_space("s4"), context("tiny-bert"), n=32) >= 0.8
    ctx = context("minilm", budgeted=False, method={"name": "lora", "r": 0})
    with pytest.raises(ConfigError, match="search.space=lr: none of 8 .* method.r: must be >= 1"):
        check_space(get_space("lr"), ctx, n=8)


def test_infeasible_sample_is_marked_without_training(monkeypatch):
    import adabudget.methods
    import adabudget.models

    def no_model(*args, **kwargs):
        raise AssertionError("sample() must not build or change a model")

    monkeypatch.setattr(adabudget.models, "load_model", no_model)
    monkeypatch.setattr(adabudget.methods, "apply_method", no_model)
    ctx = context("minilm")

    def lora_r2(trial, ctx):
        return {"method": {"name": "lora", "r": trial.suggest_int("r", 2, 2)}}

    study = optuna.create_study()
    trial = study.ask()
    s = sample(trial, lora_r2, ctx)  # r=2 holds a quarter of the r=8 budget
    assert not s.feasible and "search.budget=331776" in s.infeasible and "-75.0%" in s.infeasible
    assert s.trainable_params == 82_944 and trial.user_attrs["trainable_params"] == 82_944
    assert trial.user_attrs["infeasible"] == s.infeasible
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    assert study.trials[0].constraints == {"budget": pytest.approx(0.75 - 0.02)}
    # an unreachable hybrid: the solver refuses it, the constraint is set, nothing raises
    tiny = SpaceContext.from_config(hf_config("minilm"), budget=10)
    trial = study.ask()
    s = sample(trial, SPACES["s4"], tiny)
    assert not s.feasible and s.infeasible.startswith("method.budget")
    assert trial.user_attrs["infeasible"] == s.infeasible
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    assert study.trials[1].constraints["budget"] > 0


def test_lora_and_adalora_on_the_same_matrices_are_infeasible():
    """count_trainable accepts them, apply would fail: the second finds the linears wrapped."""
    both = {
        "name": "hybrid",
        "num_groups": 1,
        "groups": [{"lora": {"r": 2}, "adalora": {"init_r": 3, "target_r": 2}}],
    }
    s = sample(
        optuna.trial.FixedTrial({}), lambda t, c: {"method": both}, context("tiny-bert", budgeted=False)
    )
    assert not s.feasible and "lora and adalora would both wrap" in s.infeasible
    apart = dict(
        both,
        groups=[
            {
                "lora": {"r": 2, "target_modules": ["query", "value"]},
                "adalora": {"init_r": 3, "target_r": 2, "target_modules": ["key"]},
            }
        ],
    )
    assert sample(
        optuna.trial.FixedTrial({}), lambda t, c: {"method": apart}, context("tiny-bert", budgeted=False)
    ).feasible
    for _, s in draw(SPACES["s4"], context("minilm"), 60, seed=4)[1]:
        assert not any(g != "none" and {"lora", "adalora"} <= set(g) for g in s.overrides["method"]["groups"])


def test_broken_spaces_raise():
    ctx = context("tiny-bert")
    trial = optuna.trial.FixedTrial({})
    broken = [
        ({"method": {"name": "lora", "rank": 4}}, "search.space: .*method.rank"),
        ({"method": {"name": "dora"}}, "search.space: .*unknown method"),
        ({"trian": {"lr": 1e-3}}, "search.space: the space sets 'trian'"),
        ({"train": {"learning_rate": 1e-3}}, "search.space: the space sets train.learning_rate"),
        (
            {"method": {"name": "hybrid", "num_groups": 1, "groups": [{"lora": {"rank": 2}}]}},
            r"groups\[0\].lora.rank",
        ),
        ({"method": {"name": "hybrid", "num_groups": 1, "groups": [{"full": {}}]}}, r"groups\[0\].full"),
        ({"method": {"r": 4}}, "neither it nor the run names a method"),
    ]
    for overrides, message in broken:
        with pytest.raises(ConfigError, match=message):
            sample(trial, lambda t, c, o=overrides: o, ctx)


def test_space_without_method_counts_the_runs_method():
    ctx = context("tiny-bert", method=LORA8)
    _, drawn = draw(SPACES["lr"], ctx, 4)
    for _, s in drawn:
        assert s.feasible and s.trainable_params == ctx.budget
        assert 1e-4 <= s.overrides["train"]["lr"] <= 3e-3 and 0 <= s.overrides["train"]["warmup_ratio"] <= 0.2
    # the run's own hybrid gets search.budget when it sets none
    s4 = {"name": "hybrid", "num_groups": 1, "groups": [{"lora": {"r": 1}, "prefix": {"length": 1}}]}
    _, drawn = draw(SPACES["lr"], context("tiny-bert", method=s4), 1)
    ((_, s),) = drawn
    assert s.overrides["method"] == {"budget": lora8_budget("tiny-bert")}
    assert s.feasible and abs(s.trainable_params - lora8_budget("tiny-bert")) <= 0.02 * lora8_budget(
        "tiny-bert"
    )


# ---------------------------------------------------------------- a sampled hybrid really builds
@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_sampled_hybrids_build_with_the_counted_parameters(model):
    from transformers import AutoModelForSequenceClassification

    checked = 0
    for name, seed in (("s4", 0), ("autopeft", 1)):
        _, drawn = draw(SPACES[name], context(model), 12, seed=seed)
        for _, s in [d for d in drawn if d[1].feasible][:3]:
            model_ = AutoModelForSequenceClassification.from_config(hf_config(model))
            freeze_backbone(model_, train_head=False)
            apply_method(model_, method_config_from_dict(s.overrides["method"]))
            assert count_params(model_)[0] == s.trainable_params, s.overrides
            checked += 1
    assert checked == 6


# ---------------------------------------------------------------- declarative grammar
@pytest.mark.parametrize(
    "value, expected",
    [
        ("choice(2, 4, 8)", CategoricalDistribution([2, 4, 8])),
        ("choice(0.1, 0.5)", CategoricalDistribution([0.1, 0.5])),
        ("choice(adam, sgd, 'two words')", CategoricalDistribution(["adam", "sgd", "two words"])),
        ("choice(true, false)", CategoricalDistribution([True, False])),
        ("range(1, 10)", IntDistribution(1, 10)),  # the stop is included, as in hydra-optuna-sweeper
        ("range(2, 10, step=2)", IntDistribution(2, 10, step=2)),
        ("range(0.0, 1.0, 0.25)", FloatDistribution(0.0, 1.0, step=0.25)),
        ("shuffle(range(1, 4))", CategoricalDistribution([1, 2, 3])),
        ("interval(0.1, 1.0)", FloatDistribution(0.1, 1.0)),
        ("interval(1, 10)", FloatDistribution(1.0, 10.0)),  # Hydra reads interval bounds as floats
        ("tag(log, interval(1e-4, 1e-2))", FloatDistribution(1e-4, 1e-2, log=True)),
        ("int(interval(1, 10))", IntDistribution(1, 10)),
        ("tag(log, int(interval(1, 1024)))", IntDistribution(1, 1024, log=True)),
        ("5", 5),
        ("1e-3", 1e-3),
        ("lora", "lora"),
        ("[query, value]", ["query", "value"]),
        ("null", None),
    ],
)
def test_grammar_form_maps_to_its_distribution(value, expected):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_override(f"method.x={value}")
    assert distribution_from_override(override) == expected
    space = compile_params({"method.x": value})
    assert space.distributions.get("method.x", space.fixed.get("method.x")) == expected


def test_compiled_params_sample_nested_typed_overrides():
    space = compile_params(
        {
            "method.name": "lora",
            "method.r": "choice(2, 4, 8)",
            "method.target_modules": "choice([query,value],[query,key,value])",
            "method.dropout": "interval(0.0, 0.2)",
            "train.lr": "tag(log, interval(1e-4, 1e-2))",
            "train.batch_size": "int(interval(8, 64))",
            "train.epochs": 3,
        }
    )
    _, drawn = draw(space, context("tiny-bert", budgeted=False), 20)
    modules = set()
    for trial, s in drawn:
        m, t = s.overrides["method"], s.overrides["train"]
        assert m["name"] == "lora" and m["r"] in (2, 4, 8) and 0 <= m["dropout"] <= 0.2
        assert isinstance(m["target_modules"], list)  # sampled as Hydra text, given back as a list
        modules.add(tuple(m["target_modules"]))
        assert 1e-4 <= t["lr"] <= 1e-2 and isinstance(t["batch_size"], int) and t["epochs"] == 3
        assert set(trial.params) == {
            "method.r",
            "method.target_modules",
            "method.dropout",
            "train.lr",
            "train.batch_size",
        }
        assert s.feasible and s.trainable_params == count_trainable(
            method_config_from_dict(m), hf_config("tiny-bert")
        )
    assert modules == {("query", "value"), ("query", "key", "value")}


@pytest.mark.parametrize(
    "params, message",
    [
        ({"method.r": "choice(2, 4"}, "search.space: method.r: cannot parse"),
        ({"method.r": "glob(*)"}, "search.space: .*Optuna cannot sample"),
        ({"method..r": "2"}, "not a dotted config key"),
        ({"method.r": "interval(1.0, 0.1)"}, "search.space: method.r: .* not a valid range"),
        ({"method": "lora", "method.r": "2"}, "'method' is already set to a value"),
    ],
)
def test_bad_params_name_the_key(params, message):
    with pytest.raises(ConfigError, match=message):
        compile_params(params)(optuna.trial.FixedTrial({}), None)


def test_yaml_space_compiles_and_samples():
    ctx = context("minilm", budgeted=False)
    _, drawn = draw(get_space("lora_rank_lr"), ctx, 12)
    for trial, s in drawn:
        assert s.overrides["method"] == {"name": "lora", "r": trial.params["method.r"], "alpha": 16}
        assert s.overrides["train"]["lr"] == trial.params["train.lr"]
        assert s.trainable_params == 41_472 * trial.params["method.r"]
    # at the LoRA r=8 budget only r=8 is feasible
    _, drawn = draw(get_space("lora_rank_lr"), context("minilm"), 24)
    assert {t.params["method.r"] for t, s in drawn if s.feasible} == {8}


def test_yaml_spaces_from_the_config_dir(tmp_path, monkeypatch):
    folder = tmp_path / "search" / "space"
    folder.mkdir(parents=True)
    (folder / "adapter_width.yaml").write_text(
        "params:\n  method.name: adapter\n  method.bottleneck: range(8, 64, step=8)\n"
        "  train.warmup_ratio: interval(0.0, 0.1)\n"
    )
    (folder / "broken.yaml").write_text("space:\n  method.r: 2\n")
    monkeypatch.setenv("ADABUDGET_CONFIGS", str(tmp_path))
    space = get_space("adapter_width")
    assert space.distributions["method.bottleneck"] == IntDistribution(8, 64, step=8)
    s = sample(
        optuna.trial.FixedTrial({"method.bottleneck": 16, "train.warmup_ratio": 0.05}),
        space,
        context("tiny-bert", budgeted=False),
    )
    assert s.overrides == {"method": {"name": "adapter", "bottleneck": 16}, "train": {"warmup_ratio": 0.05}}
    with pytest.raises(ConfigError, match="must hold one `params:` mapping"):
        get_space("broken")
    with pytest.raises(
        ConfigError,
        match=r"search.space=nope: unknown space; known spaces: s4, autopeft, "
        r"adalora, lr, supernet, methods, longlora, adapter_width, broken",
    ):
        get_space("nope")


# ---------------------------------------------------------------- composition
def test_compose_s4_with_lr():
    space = get_space(["s4", "lr"])
    _, drawn = draw(space, context("tiny-bert"), 10)
    for trial, s in drawn:
        assert s.overrides["method"]["name"] == "hybrid" and "lr" in s.overrides["train"]
        assert {"num_groups", "train.lr", "train.warmup_ratio"} <= set(trial.params)
    assert sum(s.feasible for _, s in drawn) >= 8


def test_two_method_spaces_fail_naming_both():
    with pytest.raises(ConfigError, match=r"both s4 and lora_rank_lr set method.name"):
        sample(optuna.create_study().ask(), get_space(["s4", "lr", "lora_rank_lr"]), context("tiny-bert"))


def test_unknown_space_lists_the_known_ones():
    with pytest.raises(
        ConfigError, match=r"search.space=s5: unknown space; known spaces: s4, autopeft, adalora, lr"
    ):
        get_space("s5")
    with pytest.raises(ConfigError, match="search.space"):
        get_space(["s4", "../train"])


def test_merge_overrides_replaces_a_named_method_and_merges_the_rest():
    base = {"method": {"name": "adalora", "init_r": 12}, "train": {"lr": 1e-3, "epochs": 2}}
    assert merge_overrides(base, {"method": {"name": "lora", "r": 4}, "train": {"lr": 5e-4}}) == {
        "method": {"name": "lora", "r": 4},
        "train": {"lr": 5e-4, "epochs": 2},
    }
    assert merge_overrides(base, {"method": {"init_r": 6}})["method"] == {"name": "adalora", "init_r": 6}


def test_grid_needs_an_enumerable_declarative_space():
    """One grid rule for the search and the sweeper (search.optuna_factory): choices and stepped
    ranges, float steps too; an interval without a step is refused, naming it."""
    from adabudget.search.optuna_factory import grid_of, make_sampler

    assert grid_of(get_space("lora_grid").distributions) == {
        "method.r": [2, 4, 8, 16],
        "train.lr": [2e-4, 5e-4, 1e-3],
    }
    stepped = compile_params({"train.warmup_ratio": "range(0.1, 0.3, step=0.1)"})
    assert grid_of(stepped.distributions) == {"train.warmup_ratio": [0.1, 0.2, 0.3]}
    with pytest.raises(ConfigError, match="train.lr is a continuous range"):
        grid_of(get_space("lora_rank_lr").distributions)
    with pytest.raises(ConfigError, match="declarative space"):
        make_sampler("grid", 0, getattr(get_space("s4"), "distributions", None))


# ---------------------------------------------------------------- the methods space
@pytest.mark.parametrize("budgeted", [False, True], ids=["free", "budget"])
@pytest.mark.parametrize("model", ["tiny-bert", "minilm"])
def test_methods_space_sizes_every_method_to_the_budget(model, budgeted):
    """``search.space=methods``: each method is a choice, sized to the budget through its own knob;
    the overrides train as drawn (resolve, validate, count), and only methods that cannot come
    near the budget at any size are infeasible."""
    from adabudget.search.spaces.methods import SINGLE_METHODS

    ctx = context(model, budgeted)
    seen = {}
    choices = [(n, {}) for n in SINGLE_METHODS if n != "quantum_peft"]
    choices += [(f"quantum_peft-{u}", {"quantum_peft.unitary": u}) for u in ("pauli", "lie")]
    for key, fixed in choices:
        name = key.split("-")[0]
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        study.enqueue_trial({"method": name, **fixed})
        trial = study.ask()
        s = sample(trial, SPACES["methods"], ctx)
        assert s.overrides["method"]["name"] == name
        assert s.overrides["method"].get("unitary") == fixed.get("quantum_peft.unitary")
        seen[key] = s
        if not s.feasible:
            continue
        run = resolve(merge_overrides({"model": {"name": model}}, s.overrides))
        validate(run)
        assert count_trainable(run.method, hf_config(model)) == s.trainable_params > 0
        if budgeted:
            assert abs(s.budget_params - ctx.budget) <= 0.02 * ctx.budget, (name, s.budget_params)
    feasible = {n for n, s in seen.items() if s.feasible}
    if not budgeted:
        assert feasible == {key for key, _ in choices}
        return
    assert {
        "lora",
        "adalora",
        "dylora",
        "delta_lora",
        "rosa",
        "sparse",
        "quantum_peft-lie",
        "sora",
        "increlora",
        "geolora",
    } <= feasible  # size steps: others may miss 2%
    for name in ("sora", "increlora", "geolora"):  # judged by the size they end at: their final cut
        assert seen[name].budget_params == seen[name].overrides["method"]["target_params"] == ctx.budget
    assert "quantum_peft-pauli" not in feasible and "ia3" not in feasible  # a few angles; a fixed size
    assert seen["sparse"].overrides["method"]["budget"] == ctx.budget  # exact
    rosa = seen["rosa"].overrides["method"]
    assert seen["rosa"].trainable_params == ctx.budget and rosa["budget"] == ctx.budget - rosa["r"] * (
        lora8_budget(model) // 8
    )


# ---------------------------------------------------------------- the longlora space
@pytest.mark.parametrize("budgeted", [False, True], ids=["free", "budget"])
def test_longlora_space_draws_the_papers_axes(budgeted):
    """``search.space=longlora`` on a LLaMA: group sizes N/8, N/4, N/2 of data.max_length, the
    embeddings and norms on or off, LoRA's rank sized to what the budget leaves (a choice whose
    embeddings alone pass the budget is infeasible); every feasible draw trains as drawn."""
    from adabudget.methods import REGISTRY

    ctx = context("tiny-llama", budgeted, max_length=64)
    _, drawn = draw(SPACES["longlora"], ctx, 40)
    groups, embeds = set(), set()
    for _, s in drawn:
        m = s.overrides["method"]
        assert m["name"] == "longlora"
        groups.add(m["group_size"])
        embeds.add(m["train_embeddings"])
        if not s.feasible:
            assert budgeted and m["train_embeddings"]
            alone = REGISTRY["longlora"].count(REGISTRY["longlora"].config(**{**m, "r": 1}), ctx.arch)
            assert alone > (1 + ctx.tolerance) * ctx.budget
            continue
        run = resolve(merge_overrides({"model": {"name": "tiny-llama"}}, s.overrides))
        validate(run)
        assert count_trainable(run.method, hf_config("tiny-llama")) == s.trainable_params > 0
        if budgeted:
            assert abs(s.budget_params - ctx.budget) <= ctx.tolerance * ctx.budget, m
        else:
            assert m["r"] in (2, 4, 8, 16)  # SIZES["lora"]
    assert groups == {8, 16, 32} and embeds == {True, False}
    assert any(s.feasible for _, s in drawn)


def test_longlora_space_refuses_a_model_it_cannot_apply_to():
    with pytest.raises(ConfigError, match=r"search\.space=longlora: .*LLaMA"):
        draw(SPACES["longlora"], context("tiny-bert"), 1)
