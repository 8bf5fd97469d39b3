"""The weight-sharing supernet (``search/supernet.py``) on a tiny model.

- slicing: a sub-configuration of the supernet computes what the stand-alone hybrid of the same
  configuration computes when it holds the supernet's sliced weights (LoRA rank, adapter and
  parallel-adapter bottleneck, prefix length, methods switched off per block);
- counts: every sampled sub-configuration's count (the space's unit table, the supernet's active
  slices) is ``count_trainable`` of its stand-alone hybrid and the built model's trainable count;
  sampling keeps every sub-configuration in the budget band;
- training: only the active slices move, and a slice trained on the supernet follows the
  stand-alone model trained with ``torch.optim.AdamW``; an interrupted supernet run resumed from
  its checkpoint ends with the uninterrupted run's weights;
- scoring: inherited-weight metrics equal the stand-alone model's, calibration restores weights;
- search: ``search.scorer=supernet`` (Optuna and ``search.sampler=evolution``) end to end.

The stand-alone side is always built with the engine's own path (``adabudget.methods.plan_of`` and
``apply_plan``, the hybrid a trial would train), never with the supernet's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from adabudget.config import ConfigError

# A 2-layer random BERT (h = 32) on 64 real movie reviews; the menus fit h = 32.
TINY = [
    "model=tiny-bert",
    "data.max_train_samples=64",
    "data.max_eval_samples=32",
    "train.batch_size=8",
    "train.eval_batch_size=16",
    "train.max_steps=6",
    "train.eval_every=0",
    "train.log_every=2",
    "train.progress=false",
    "train.num_threads=1",
    "train.lr=1e-2",
    "train.warmup_ratio=0",
    "model.dropout=0",
]
MENUS = [
    "search.supernet.lora=[0,2,4,8]",
    "search.supernet.adapter=[0,4,8,16]",
    "search.supernet.prefix=[0,3,6]",
    "search.supernet.parallel_adapter=[0,4,8]",
]


def search_config(tmp_path, *overrides: str) -> dict:
    """The composed ``adabudget search`` config of a tiny supernet, as a plain dict."""
    from adabudget.compose import compose
    from adabudget.search.config import register_schema
    from omegaconf import OmegaConf

    register_schema()
    cfg = compose(TINY + MENUS + [f"runs_root={tmp_path / 'runs'}", *overrides], config_name="search")
    return OmegaConf.to_container(cfg, resolve=True)


def standalone(net, sub):
    """The stand-alone model of ``sub``: the supernet's backbone, the hybrid ``sub`` names applied
    by the engine, and the supernet's sliced trainable weights (``state_of``) loaded."""
    from adabudget.methods import apply_plan, method_config_from_dict, plan_of
    from adabudget.models import load_model
    from adabudget.modules import freeze_backbone
    from adabudget.session import set_dropout

    run = net.run
    model = load_model(run.model, net.task.num_labels, net.task.regression, net.pad_id)
    set_dropout(model, run.model.dropout)  # as ``build`` does (0 in TINY)
    freeze_backbone(model, run.model.train_head)
    apply_plan(model, plan_of(method_config_from_dict(net.space.to_method(sub)), net.space.arch))
    state = net.state_of(sub)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(state), (
        f"stand-alone trainable {sorted(trainable ^ set(state))} differ from the slice"
    )
    full = net.model.state_dict()

    def frozen(
        key: str,
    ) -> torch.Tensor:  # the backbone's weight; a linear LoRA wraps holds it as <name>.base
        parent, _, leaf = key.rpartition(".")
        return full[key] if key in full else full[f"{parent}.base.{leaf}"]

    model.load_state_dict({k: state[k] if k in state else frozen(k) for k in model.state_dict()})
    return model


def first_batch(net, split: str = "dev") -> dict:
    from adabudget.data import make_batches

    batch = next(make_batches(getattr(net.task, split), 16, net.pad_id, False))
    return {k: v for k, v in batch.items() if k in net.inputs}


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """A supernet (LoRA, Houlsby adapter, parallel adapter, prefix) with every trainable weight
    randomised: zero-initialised factors (B, W_up) would hide a wrong slice."""
    from adabudget.search.supernet import build, supernet_run

    net = build(*supernet_run(search_config(tmp_path_factory.mktemp("net"))))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.params.values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    net.model.eval()
    return net


def sub_of(net, **per_method):
    """The full sub-configuration with some methods' per-block sizes replaced."""
    from adabudget.search.supernet import Sub

    sizes = net.space.full().as_dict()
    sizes.update({m: list(v) for m, v in per_method.items()})
    return Sub.of(sizes)


SLICES = {
    "lora rank": {"lora": [4, 2]},
    "adapter bottleneck": {"adapter": [8, 4]},
    "parallel adapter bottleneck": {"parallel_adapter": [4, 8]},
    "prefix length": {"prefix": [3, 6]},
    "methods off per block": {
        "lora": [8, 0],
        "adapter": [0, 16],
        "prefix": [6, 0],
        "parallel_adapter": [0, 4],
    },
    "block 0 without any method": {
        "lora": [0, 2],
        "adapter": [0, 4],
        "prefix": [0, 3],
        "parallel_adapter": [0, 0],
    },
}


# ---------------------------------------------------------------- slicing
def test_the_supernet_holds_every_method_at_its_largest(net):
    assert net.space.methods == ("lora", "adapter", "parallel_adapter", "prefix")
    assert net.space.full().as_dict() == {
        "lora": [8, 8],
        "adapter": [16, 16],
        "parallel_adapter": [8, 8],
        "prefix": [6, 6],
    }


@pytest.mark.parametrize("case", list(SLICES))
def test_slice_computes_the_standalone_model(net, case):
    sub = sub_of(net, **SLICES[case])
    model = standalone(net, sub)
    model.eval()
    batch = first_batch(net)
    with torch.no_grad():
        net.activate(net.space.full())
        full = net.model(**batch).logits
        net.activate(sub)
        sliced = net.model(**batch).logits
        alone = model(**batch).logits
    assert not torch.allclose(sliced, full, atol=1e-3), (
        "the slice must change the function (else the test is void)"
    )
    torch.testing.assert_close(sliced, alone, rtol=1e-5, atol=1e-6)


def test_sampled_slices_compute_the_standalone_model(net):
    batch = first_batch(net)
    for sub in net.space.sample(np.random.default_rng(3), 4):
        model = standalone(net, sub)
        model.eval()
        with torch.no_grad():
            net.activate(sub)
            torch.testing.assert_close(net.model(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-6)


def test_reparameterised_prefix_slice():
    """A reparameterised PrefixKV sliced to k vectors is the stand-alone k-long one holding E[:k] and
    the same MLP (the supernet's prefix is direct by default; this path is the method file's)."""
    from adabudget.methods.prefix import PrefixKV, SlicedPrefixKV, set_active

    torch.manual_seed(0)
    big = SlicedPrefixKV(6, 2, 4, hidden=8, reparam_dim=5)
    small = PrefixKV(2, 2, 4, hidden=8, reparam_dim=5)
    with torch.no_grad():
        small.embedding.copy_(big.embedding[:2])
        small.mlp.load_state_dict(big.mlp.state_dict())
    regions = set_active(big, 2)
    for got, want in zip(big(), small()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert regions["embedding"] == (slice(0, 2),) and set(regions) == {
        "embedding",
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
    }
    assert set_active(big, 0) == {} and big.active == 0
    assert set_active(big, None) == set_active(big, 6) and big.active is None
    with pytest.raises(ValueError, match="outside"):
        set_active(big, 7)


# ---------------------------------------------------------------- counts and the budget
def test_counts_of_sampled_subs_are_the_standalone_counts(net):
    from adabudget.methods import count_trainable, method_config_from_dict
    from adabudget.modules import count_params

    space, head = net.space, space_head(net)
    subs = space.sample(np.random.default_rng(1), 40) + [
        space.full(),
        sub_of(net, **SLICES["methods off per block"]),
    ]
    for k, sub in enumerate(subs):
        counted = count_trainable(method_config_from_dict(space.to_method(sub)), net.model.config)
        assert space.count(sub) == counted == net.active_count(sub), sub.key()
        if k % 8 == 0:  # the built model too (a few: building is the slow part)
            assert count_params(standalone(net, sub))[0] - head == counted, sub.key()


def space_head(net) -> int:
    return sum(net.params[n].numel() for n in net.shared)


def test_sampling_honours_the_budget(tmp_path):
    """With search.budget every sampled, sandwich and evolved sub-configuration is in the band, and
    the sandwich trains the band's largest and smallest first."""
    from adabudget.search.spaces.context import SpaceContext
    from adabudget.search.supernet import SupernetSpace, path_at, supernet_run

    cfg = search_config(tmp_path, "search.budget=6000", "search.supernet.tolerance=0.05")
    run, settings = supernet_run(cfg)
    from adabudget.search.config import SupernetConfig

    scfg = SupernetConfig(**settings["supernet"])
    space = SupernetSpace.from_context(SpaceContext.from_model("tiny-bert", budget=6000), scfg)
    lo, hi = space.band()
    assert (lo, hi) == (5700, 6300)
    subs = space.sample(np.random.default_rng(0), 200)
    counts = [space.count(s) for s in subs]
    assert all(lo <= c <= hi for c in counts) and len(set(subs)) > 100
    largest, smallest = space.extreme("largest"), space.extreme("smallest")
    assert lo <= space.count(smallest) <= min(counts) <= max(counts) <= space.count(largest) <= hi
    paths = [path_at(space, scfg, 42, step, 0) for step in range(8)]
    assert [w for w, _ in paths] == ["largest", "smallest", "random", "random"] * 2
    assert paths[0][1] == largest and paths[1][1] == smallest
    assert all(lo <= space.count(s) <= hi for _, s in paths)
    assert path_at(space, scfg, 42, 2, 0) == paths[2]  # a pure function of (seed, step): resumable
    rng = np.random.default_rng(1)
    for a, b in zip(subs[:20], subs[20:40]):
        assert lo <= space.count(space.mutate(a, rng, 0.3)) <= hi
        assert lo <= space.count(space.crossover(a, b, rng)) <= hi
    # the full model is the supernet itself, whatever the budget
    assert run.method.groups == [space.to_method(space.full())["groups"][0]]


def test_an_unreachable_budget_fails_before_any_compute(tmp_path):
    from adabudget.config import ConfigError
    from adabudget.search.supernet import supernet_run

    with pytest.raises(ConfigError, match="search.budget=10000000"):
        supernet_run(search_config(tmp_path, "search.budget=10000000"))


# ---------------------------------------------------------------- training
def test_masked_step_moves_only_the_slice_and_matches_adamw(net):
    """Three MaskedAdamW steps on a slice of the supernet move exactly that slice (and the head),
    along the trajectory of torch.optim.AdamW on the stand-alone model."""
    from adabudget.search.supernet import MaskedAdamW

    sub = sub_of(net, **SLICES["methods off per block"])
    saved = {n: p.detach().clone() for n, p in net.params.items()}
    model = standalone(net, sub)
    alone = [p for p in model.parameters() if p.requires_grad]
    reference = torch.optim.AdamW(alone, lr=1e-2, weight_decay=0.01)
    masked = MaskedAdamW(net.params, weight_decay=0.01)
    batch = first_batch(net, "train")  # labels included: the loss is the model's own
    try:
        for _ in range(3):
            regions = net.activate(sub)
            net.model(**batch).loss.backward()
            masked.step({n: [i] for n, i in regions.items()}, 1e-2)
            masked.zero_grad()
            model(**batch).loss.backward()
            reference.step()
            reference.zero_grad()
        trained = net.state_of(sub)
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(trained[n], p.detach(), rtol=1e-4, atol=1e-6)
        regions = net.activate(sub)
        for n, p in net.params.items():
            used = torch.zeros_like(p, dtype=torch.bool)
            if n in regions:
                used[regions[n]] = True
            assert torch.equal(p.detach()[~used], saved[n][~used]), f"{n}: an unused element moved"
            assert not torch.equal(p.detach()[used], saved[n][used]) or not used.any(), (
                f"{n}: the slice did not train"
            )
    finally:
        with torch.no_grad():
            for n, p in net.params.items():
                p.copy_(saved[n])


def trainable_of(folder) -> dict:
    from adabudget.checkpoint import load_checkpoint

    return load_checkpoint(folder / "checkpoints" / "last.pt")


def test_train_then_resume_an_interrupted_run(tmp_path):
    """Sandwich training for 6 steps; the same run stopped after 3 and resumed from its checkpoint
    ends with the same weights, optimizer state and training losses."""
    from adabudget.compose import resume_config
    from adabudget.search.supernet import train_supernet

    straight = train_supernet(
        {**search_config(tmp_path, "search.budget=6000"), "run_dir": str(tmp_path / "a")}
    )
    assert straight["status"] == "completed" and straight["steps"] == 6
    stopped = train_supernet(
        {
            **search_config(tmp_path, "search.budget=6000", "train.stop_after_step=3"),
            "run_dir": str(tmp_path / "b"),
        }
    )
    assert stopped["status"] == "interrupted" and stopped["steps"] == 3
    resumed = train_supernet(resume_config(tmp_path / "b"))
    assert resumed["status"] == "completed" and resumed["steps"] == 6
    a, b = trainable_of(tmp_path / "a"), trainable_of(tmp_path / "b")
    assert a["step"] == b["step"] == 6
    for name, value in a["trainable"].items():
        assert torch.equal(value, b["trainable"][name]), name
    for name, state in a["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"][name][key]), (name, key)
    init = train_supernet(
        {**search_config(tmp_path, "search.budget=6000", "train.max_steps=1"), "run_dir": str(tmp_path / "c")}
    )
    assert init["status"] == "completed"
    moved = [
        n
        for n, v in a["trainable"].items()
        if not torch.equal(v, trainable_of(tmp_path / "c")["trainable"][n])
    ]
    assert moved, "training changed nothing"

    def losses(folder):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]

    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 3
    dev = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("path") for r in dev if r["split"] == "dev"} == {"largest", "smallest"}
    # a completed run is not trained again
    again = train_supernet(resume_config(tmp_path / "a"))
    assert "already completed" in again["note"]


def test_settings_live_in_supernet_yaml_and_an_older_folder_resumes(tmp_path):
    """What defines the supernet is its folder's supernet.yaml, not a node of its run config; a
    folder an older version wrote (the settings as a ``search`` node of config.yaml, no
    supernet.yaml) resumes with those settings, which move to supernet.yaml, and loads; other
    settings are refused on resume."""
    from adabudget.compose import resume_config
    from adabudget.search.supernet import load_supernet, saved_settings, train_supernet
    from omegaconf import OmegaConf

    folder = tmp_path / "sn"
    cfg = search_config(tmp_path, "search.budget=6000", "search.supernet.random_paths=1")
    stopped = train_supernet({**cfg, "run_dir": str(folder), "train": {**cfg["train"], "stop_after_step": 3}})
    assert stopped["status"] == "interrupted"
    settings = yaml.safe_load((folder / "supernet.yaml").read_text())
    menus = {
        "lora": [0, 2, 4, 8],
        "adapter": [0, 4, 8, 16],
        "prefix": [0, 3, 6],
        "parallel_adapter": [0, 4, 8],
    }
    assert settings["budget"] == 6000 and settings["budget_percent"] is None
    assert {k: settings["supernet"][k] for k in menus} == menus and settings["supernet"]["random_paths"] == 1
    assert not OmegaConf.load(folder / "config.yaml").get("search")  # the run config carries none of it

    def as_older_version_wrote_it() -> None:
        saved = OmegaConf.load(folder / "config.yaml")
        saved.search = settings
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(saved))
        (folder / "supernet.yaml").unlink()

    as_older_version_wrote_it()
    assert saved_settings(folder) == settings
    resumed = train_supernet(resume_config(folder))
    assert resumed["status"] == "completed" and resumed["steps"] == 6
    assert resumed["supernet"]["menus"] == menus and resumed["supernet"]["band"] == [5700, 6300]
    assert yaml.safe_load((folder / "supernet.yaml").read_text()) == settings  # moved there
    assert not OmegaConf.load(folder / "config.yaml").get("search")
    as_older_version_wrote_it()
    net = load_supernet(folder)
    assert {m: list(v) for m, v in net.space.menus.items()} == menus
    assert net.space.band() == (5700, 6300)
    # other settings would score with a supernet trained for something else
    other = search_config(tmp_path, "search.budget=6000", "search.supernet.lora=[0,4]")
    with pytest.raises(ConfigError, match=r"search\.supernet\.lora \(\[0, 2, 4, 8\] -> \[0, 4\]\)"):
        train_supernet({**other, "resume": str(folder)})
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.yaml").write_text("run_name: plain\nsearch: null\n")
    with pytest.raises(ConfigError, match="no supernet.yaml there"):
        saved_settings(plain)


# ---------------------------------------------------------------- scoring
def test_score_is_the_standalone_evaluation(tmp_path):
    """On a regression task (a continuous metric): the inherited score of a sub-configuration is
    the stand-alone model's dev evaluation; different slices score differently; calibration
    trains the slice for a while and then restores every weight."""
    from adabudget.evaluate import evaluate
    from adabudget.search.supernet import load_supernet, score, train_supernet

    folder = tmp_path / "sn"
    cfg = search_config(tmp_path, "data.task=tweets")
    assert train_supernet({**cfg, "run_dir": str(folder)})["status"] == "completed"
    net = load_supernet(folder)
    before = {n: p.detach().clone() for n, p in net.params.items()}
    subs = [
        net.space.full(),
        sub_of(net, **SLICES["lora rank"]),
        sub_of(net, **SLICES["methods off per block"]),
    ]
    scores = []
    for sub in subs:
        got = score(net, sub)
        want = evaluate(standalone(net, sub), net.task.dev, net.task, 16, net.pad_id, net.device)
        assert got.keys() == want.keys() and "mse" in got
        for k in got:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), (sub.key(), k)
        scores.append(got["mse"])
    assert len(set(scores)) == 3
    calibrated = score(net, subs[1], calibration_steps=2)
    assert calibrated["mse"] != scores[1]
    for n, p in net.params.items():
        assert torch.equal(p.detach(), before[n]), f"{n}: calibration left a trace"
    assert score(net, subs[1])["mse"] == scores[1]


# ---------------------------------------------------------------- search
def search(tmp_path, capsys, *overrides: str) -> tuple[int, dict]:
    from adabudget.cli import main

    args = [o for o in TINY + MENUS] + [
        f"runs_root={tmp_path / 'runs'}",
        "search.threads=1",
        "search.scorer=supernet",
        "search.study=sn",
        *overrides,
    ]
    code = 0
    try:
        main(["search", *args])
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    capsys.readouterr()
    path = tmp_path / "runs" / "search" / "sn" / "search.json"
    return code, json.loads(path.read_text()) if path.exists() else {}


@pytest.mark.slow  # 26 s; the default suite keeps the supernet space trained stand-alone
def test_search_with_the_supernet_scorer(tmp_path, capsys):
    """Trials score sub-configurations of the study's supernet (trained once, then reused); each
    trial's value is its inherited score, its count the stand-alone count, and out-of-band draws
    are infeasible, never scored."""
    from adabudget.search.supernet import Sub, load_supernet, score

    code, record = search(
        tmp_path, capsys, "search.n_trials=4", "search.budget=6000", "search.sampler=random"
    )
    assert code == 0
    assert record["scorer"] == "supernet" and record["space"] == ["supernet"]
    folder = tmp_path / "runs" / "search" / "sn" / "supernet"
    assert json.loads((folder / "result.json").read_text())["status"] == "completed"
    scored = [
        t
        for t in record["trials"]
        if t["state"] == "complete" and not t["infeasible"] and t["duplicate_of"] is None
    ]
    assert len(scored) == 4
    net = load_supernet(folder)
    for t in scored:
        sub = Sub.from_key(t["sub"])
        assert t["trainable_params"] == net.space.count(sub) and 5700 <= t["trainable_params"] <= 6300
        assert t["values"] == [t["inherited"]["accuracy"]] == [score(net, sub)["accuracy"]]
        assert t["run_dir"] is None
    for t in record["trials"]:
        if t["infeasible"]:
            assert not 5700 <= t["trainable_params"] <= 6300 and t["sub"] is None
    assert record["best"][0]["values"][0] == max(t["values"][0] for t in scored)
    assert record["supernet"]["band"] == [5700, 6300]
    stamp = (folder / "result.json").read_text()
    code, record = search(
        tmp_path, capsys, "search.n_trials=6", "search.budget=6000", "search.sampler=random"
    )
    assert (
        code == 0
        and sum(
            1
            for t in record["trials"]
            if t["state"] == "complete" and not t["infeasible"] and t["duplicate_of"] is None
        )
        == 6
    )
    assert (folder / "result.json").read_text() == stamp, "the study's supernet was trained again"


def test_supernet_space_trained_stand_alone(tmp_path, capsys):
    """``search.space=supernet`` with the default scorer trains each sub-configuration (the plain
    search to compare inherited scores with): exact menu sizes, never rescaled to the budget."""
    code, record = search(
        tmp_path,
        capsys,
        "search.scorer=train",
        "search.space=supernet",
        "search.n_trials=2",
        "search.budget=6000",
        "search.enqueue=none",
    )
    assert code == 0 and record["scorer"] == "train" and "supernet" not in record
    trained = [t for t in record["trials"] if t["state"] == "complete" and not t["infeasible"]]
    assert len(trained) == 2
    for t in trained:
        result = json.loads((Path(t["run_dir"]) / "result.json").read_text())
        assert result["status"] == "completed" and result["method"] == "hybrid"
        groups = t["overrides"]["method"]["groups"]
        assert "budget" not in t["overrides"]["method"]  # not handed to the solver
        sizes = {
            g[m].get("r", g[m].get("bottleneck", g[m].get("length")))
            for g in groups
            if g != "none"
            for m in g
        }
        assert sizes <= {2, 4, 8, 16, 3, 6}, sizes  # menu sizes as drawn
        assert 5700 <= t["trainable_params"] <= 6300
        head = result["trainable_params"] - t["trainable_params"]
        assert head == 32 * 2 + 2  # tiny-bert's classifier: the rest is exactly the counted sub


def test_search_resumes_an_interrupted_supernet(tmp_path, capsys):
    code, _ = search(tmp_path, capsys, "search.n_trials=2", "train.stop_after_step=2")
    assert code != 0
    folder = tmp_path / "runs" / "search" / "sn" / "supernet"
    assert json.loads((folder / "result.json").read_text())["status"] == "interrupted"
    code, record = search(tmp_path, capsys, "search.n_trials=2")
    assert code == 0 and len([t for t in record["trials"] if t["state"] == "complete"]) >= 2
    result = json.loads((folder / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == 6
    # the supernet belongs to the study: other menus are refused, not silently mixed
    code, _ = search(tmp_path, capsys, "search.n_trials=3", "search.supernet.lora=[0,4]")
    assert code != 0


def test_evolution_search(tmp_path, capsys):
    code, record = search(
        tmp_path,
        capsys,
        "search.sampler=evolution",
        "search.n_trials=8",
        "search.budget=6000",
        "search.supernet.population=4",
        "search.supernet.parents=2",
    )
    assert code == 0
    trials = [t for t in record["trials"] if t["state"] == "complete"]
    assert len(trials) == 8 and len({t["sub"] for t in trials}) == 8
    assert all(5700 <= t["trainable_params"] <= 6300 and not t["infeasible"] for t in trials)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"scorer": "supernet", "pruner": "median"}, "search.pruner"),
        ({"scorer": "supernet", "space": ["s4", "lr"]}, "search.space"),
        ({"sampler": "evolution"}, "search.sampler"),
        ({"scorer": "weights"}, "search.scorer"),
        ({"supernet": {"lora": [2, 2]}}, "search.supernet.lora"),
        ({"supernet": {"rank": [2]}}, "search.supernet.rank"),
    ],
)
def test_bad_supernet_settings_are_refused(overrides, field):
    from adabudget.config import ConfigError
    from adabudget.search.config import SearchConfig

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        SearchConfig(**overrides).validate("accuracy")


@pytest.mark.slow
def test_bench_supernet_end_to_end_and_resume(tmp_path, capsys):
    """``adabudget bench supernet`` on a tiny model: every configuration trained stand-alone and
    scored on the supernet, τ from those numbers, cost and the equal-compute comparison; a second
    call trains and scores nothing again and prints the same figures."""
    from adabudget.cli import main
    from scipy import stats

    args = [
        "bench",
        "supernet",
        "--experiment",
        "none",
        "--budget",
        "6000",
        "--configs",
        "4",
        "--variants",
        "sandwich:1",
        "--calibration",
        "0,2",
        "--trials",
        "4",
        "--seeds",
        "42,1",
        "--root",
        str(tmp_path / "b"),
        "--threads",
        "1",
        "--out",
        str(tmp_path / "r.json"),
        *TINY,
        "data.task=tweets",
        *MENUS[:3],
        "search.supernet.population=2",
        "search.supernet.parents=1",
    ]
    main(args)
    first = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    configs = report["configs"]
    assert len(configs) == 4 and len({c["sub"] for c in configs}) == 4
    assert all(5700 <= c["params"] <= 6300 for c in configs)
    trained = [c["standalone_dev"] for c in configs]
    for c in (0, 2):
        entry = report["variants"]["sn-sandwich-1"]["scores"][str(c)]  # JSON keys are strings
        inherited = [cfg[f"sn-sandwich-1/c{c}"] for cfg in configs]
        assert entry["inherited"] == inherited
        assert entry["kendall_tau"] == pytest.approx(stats.kendalltau(inherited, trained).statistic)
    # the stand-alone numbers are those of the run folders the bench trained
    runs = [json.loads(p.read_text()) for p in (tmp_path / "b" / "standalone").rglob("result.json")]
    assert sorted(r["final"]["dev"]["pearson"] for r in runs) == sorted(trained)
    equal = report["equal_compute"]
    assert equal["supernet_search"]["trials"] == 4 and len(equal["supernet_search"]["test"]) == 2
    assert equal["plain_search"]["trials"] >= 2 and len(equal["plain_search"]["test"]) == 2
    assert "kendall_tau=" in first and "equal-compute" in first
    n_results = len(list((tmp_path / "b").rglob("result.json")))
    main(args)
    second = capsys.readouterr().out
    assert len(list((tmp_path / "b").rglob("result.json"))) == n_results  # nothing trained again
    tau = [line for line in first.splitlines() if line.startswith("tau ")]
    assert tau and tau == [line for line in second.splitlines() if line.startswith("tau ")]


def test_two_paths_per_step_average_their_gradients(tmp_path):
    """``paths_per_step=2`` (BigNAS's per-step sandwich): one optimizer step sums half the gradient
    of each of the step's two sub-configurations (the band's largest and smallest) on the same
    batch and updates the union of their slices, as a hand-written step on the same init does;
    the largest path alone would give other weights."""
    from adabudget.evaluate import batch_stream
    from adabudget.schedule import lr_factor
    from adabudget.search.config import SupernetConfig
    from adabudget.search.supernet import MaskedAdamW, build, path_at, supernet_run, train_supernet
    from adabudget.session import total_steps_for

    overrides = ("search.budget=6000", "search.supernet.paths_per_step=2", "train.max_steps=1")
    result = train_supernet({**search_config(tmp_path, *overrides), "run_dir": str(tmp_path / "sn")})
    assert result["status"] == "completed"
    trained = trainable_of(tmp_path / "sn")["trainable"]
    run, settings = supernet_run(search_config(tmp_path, *overrides))
    scfg = SupernetConfig(**settings["supernet"])

    def by_hand(k_paths: int) -> dict:
        net = build(run, settings)  # the same calls in the same order: the same initial weights
        tc = run.train
        paths = [path_at(net.space, scfg, tc.seed, 0, k)[1] for k in range(k_paths)]
        net.model.train()
        batch = next(batch_stream(net.task.train, tc, net.pad_id, net.inputs, 0))
        regions: dict = {}
        for sub in paths:
            for name, index in net.activate(sub).items():
                regions.setdefault(name, []).append(index)
            (net.model(**batch).loss / k_paths).backward()
        torch.nn.utils.clip_grad_norm_(list(net.params.values()), tc.max_grad_norm)
        T = total_steps_for(run, len(net.task.train))
        MaskedAdamW(net.params, weight_decay=tc.weight_decay).step(
            regions, tc.lr * lr_factor(0, int(tc.warmup_ratio * T), T)
        )
        return {n: p.detach() for n, p in net.params.items()}

    both, largest_only = by_hand(2), by_hand(1)
    for name, value in both.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(trained[n], v, rtol=1e-5, atol=1e-7) for n, v in largest_only.items())
