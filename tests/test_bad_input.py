"""Every bad input fails with a ConfigError that names the field, before any training and
without creating a run folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from adabudget.config import ConfigError
from adabudget.training import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

CASES = [
    (["model.name=no-such-org/no-such-model"], "model.name"),
    (["data.task=no_such_task"], "data.task"),
    (["method.target_modules=[no_such_layer]"], "method.target_modules"),
    (["method.target_r=4"], "method.target_r"),  # not below init_r=4
    (["method.target_r=0"], "method.target_r"),
    (["method.target_total_rank=0"], "method.target_total_rank"),
    (["method.target_total_rank=48"], "method.target_total_rank"),  # = b(0)
    (["method.warmup_steps=12", "method.final_steps=12"], "method.warmup_steps"),  # t_i + t_f >= T
    (["method.mask_interval=0"], "method.mask_interval"),
    (["method.score=random"], "method.score"),
    (["data.dev_fraction=0.6", "data.test_fraction=0.4"], "data.dev_fraction"),
    (["data.dev_fraction=1.5"], "data.dev_fraction"),
    (["data.task=csv"], "data.path"),
    (["train.batch_size=0"], "train.batch_size"),
    # harmful values: each used to start a run (or train wrongly) before failing, if ever
    (["train.max_grad_norm=-1"], "train.max_grad_norm"),  # flipped every gradient: ascent
    (["train.max_grad_norm=0"], "train.max_grad_norm"),  # read as "no clipping"; null says it
    (["train.max_grad_norm=nan"], "train.max_grad_norm"),
    (["method.alpha=0"], "method.alpha"),
    (["method.alpha=-8"], "method.alpha"),
    (["method.alpha=inf"], "method.alpha"),
    (["method=lora", "method.alpha=nan"], "method.alpha"),
    (["method=dylora", "method.alpha=-1"], "method.alpha"),
    (["method=unipelt", "method.lora_alpha=inf"], "method.lora_alpha"),
    (["train.weight_decay=-0.01"], "train.weight_decay"),  # AdamW raised once a record existed
    (["train.weight_decay=nan"], "train.weight_decay"),
    (["train.eval_batch_size=0"], "train.eval_batch_size"),  # failed at the final evaluation
    (["train.seed=-1"], "train.seed"),
    (["train.seed=4294967296"], "train.seed"),
    (["train.lr=inf"], "train.lr"),
    (["train.epochs=inf"], "train.epochs"),
    (["train.epochs=inf", "train.max_steps=null"], "train.epochs"),
    # one pattern matches, the other nothing: it was dropped and b(T) shrank without a word
    (["method.target_modules=[query,no_such_layer]"], "method.target_modules"),
    (["method=lora", "method.target_modules=[value,valeu]"], "method.target_modules"),
    (["method.target_modules=['que(ry']"], "method.target_modules"),  # not a regex
    (["data.max_length=4096"], "data.max_length"),  # tiny-bert's position table holds 128
    (["data.encoding=no-such-codec"], "data.encoding"),
]


@pytest.mark.parametrize("overrides,field", CASES, ids=[c[1] + ":" + ",".join(c[0]) for c in CASES])
def test_bad_input_names_the_field(compose_run, tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        train(compose_run(*overrides))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))


def test_unknown_method_name(compose_run):
    from adabudget.compose import resolve

    cfg = compose_run()
    cfg.method.name = "no_such_method"
    with pytest.raises(ConfigError, match=r"method\.name.*known methods"):
        resolve(cfg)


def test_bad_label_column(compose_run, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"sentence {i},{i % 2}\n" for i in range(40)))
    with pytest.raises(ConfigError, match=r"data\.label_column"):
        train(compose_run("data.task=csv", f"data.path={path}", "data.label_column=gold"))


def test_unknown_key_fails_at_compose(compose_run):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_run("method.no_such_knob=1")


def test_messages_say_the_fix(compose_run):
    """The refusals name the way out, not only the field."""
    cases = {
        "train.max_grad_norm=0": "train.max_grad_norm=null to turn clipping off",
        "method.alpha=0": "must be a finite number > 0",
        "method.target_modules=[query,no_such_layer]": "['no_such_layer'] match no linear layer",
        "method.target_modules=['que(ry']": "is not a valid regular expression",
        "data.max_length=4096": "set data.max_length <= 128",
    }
    for override, fix in cases.items():
        with pytest.raises(ConfigError) as err:
            train(compose_run(override))
        assert fix in str(err.value), (override, str(err.value))


def test_hybrid_group_alpha_and_pattern_are_checked(compose_run):
    """A hybrid's groups hold method knobs too: the same rules, naming the group."""
    from adabudget.compose import resolve
    from adabudget.config import validate

    run = resolve(compose_run("method=s4"))
    assert "lora" in run.method.groups[0]
    run.method.groups[0]["lora"] = {**run.method.groups[0]["lora"], "alpha": -16}
    with pytest.raises(ConfigError, match=r"method\.groups\[0\]\.lora\.alpha: must be a finite number > 0"):
        validate(run)
    # two groups on tiny-bert's two blocks; the pattern that matches nothing is in group 1
    lora = {"r": 4, "target_modules": ["query", "no_such_layer"]}
    run.method = dataclasses.replace(
        run.method,
        num_groups=2,
        grouping="uniform",
        groups=["none", {"lora": lora}],
        budget=None,
        budget_percent=None,
        allocation="uniform",
    )
    with pytest.raises(ConfigError, match=r"method\.groups\[1\]\.lora\.target_modules: \['no_such_layer'\]"):
        train(run)


def test_pattern_outside_the_chosen_blocks_is_refused(compose_run):
    """``method.layers`` restricts the candidates: a pattern naming only another block matches nothing."""
    with pytest.raises(ConfigError, match=r"method\.target_modules: .*in blocks \[1\]"):
        train(
            compose_run(
                "method=lora",
                r"method.target_modules=[value,'layer\.0\.attention\.self\.query']",
                "method.layers=[1]",
            )
        )


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"text,label\n" + "caf\u00e9 au lait,1\n".encode("cp1252") * 20, "is not valid utf-8-sig"),
        ("text,label\n" + "sentence,1\n" * 20, "holds a NUL character"),  # UTF-16 read as UTF-8
        (b"text,label\nab\x00c,1\n" * 20, "holds a NUL character"),  # binary garbage
    ],
    ids=["cp1252", "utf-16", "nul"],
)
def test_undecodable_csv_names_the_file_and_data_encoding(compose_run, tmp_path, data, problem):
    path = tmp_path / "d.csv"
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-16-le"))
    with pytest.raises(ConfigError) as err:
        train(compose_run("data.task=csv", f"data.path={path}"))
    msg = str(err.value)
    assert msg.startswith("data.encoding: ") and str(path) in msg and problem in msg
    assert "data.encoding=" in msg  # the fix
    assert not (tmp_path / "runs").exists()


def test_undecodable_jsonl_names_the_file(compose_run, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "na\xefve", "label": 1}\n' * 20)  # latin-1 bytes
    with pytest.raises(ConfigError, match=r"data\.encoding: .*d\.jsonl is not valid utf-8-sig"):
        train(compose_run("data.task=jsonl", f"data.path={path}"))


def test_search_grace_period_must_be_positive(compose_run, tmp_path):
    from adabudget.search.command import run_search
    from adabudget.search.config import SearchConfig

    for bad in (0, -5):
        with pytest.raises(ConfigError, match=r"search\.grace_period: must be > 0"):
            SearchConfig(grace_period=bad).validate()
    with pytest.raises(ConfigError, match=r"search\.grace_period"):
        run_search({**compose_run(), "search": {"grace_period": 0}})
    assert not (tmp_path / "runs").exists()


PRESETS = sorted(
    str(p.relative_to(CONFIGS).with_suffix(""))
    for group in ("model", "data", "method", "train", "logger", "debug", "experiment")
    for p in (CONFIGS / group).rglob("*.yaml")
    if "schedule" not in p.parts  # parts merged by the AdaLoRA presets, not presets themselves
)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_validates(preset):
    """Each shipped preset, composed alone, passes the checks a run starts with."""
    from adabudget.compose import compose, resolve
    from adabudget.config import validate

    group, name = preset.split("/", 1)
    validate(resolve(compose([f"{group}={name}", "runs_root=/nonexistent"])))
