"""Every bad input fails with a ConfigError that names the field, before any training and
without creating a run folder."""

from __future__ import annotations

import pytest

from budget.config import ConfigError
from budget.train import train

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
]


@pytest.mark.parametrize("overrides,field", CASES, ids=[c[1] + ":" + c[0][0] for c in CASES])
def test_bad_input_names_the_field(compose_run, tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        train(compose_run(*overrides))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))


def test_unknown_method_name(compose_run):
    from budget.compose import resolve

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
