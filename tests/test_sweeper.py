"""The adabudget Hydra sweeper (``search/sweeper.py``, ``-m hydra/sweeper=adabudget``): the
hydra-optuna-sweeper grammar in every form, its configuration run by renaming the sweeper, and
real ``adabudget train`` sweeps on tiny-bert: pruning through the job's dev evaluations, the
trial in the job's record, a killed sweep resumed to exactly n_trials, several objectives read
from the records, the rolling pool, failures. The grammar -> distribution table itself is
``tests/test_space.py``'s (search.declarative); here it is the sweeper's side of it."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from adabudget.config import ConfigError
from adabudget.search.optuna_factory import objective_value
from adabudget.search.sweeper import (
    SweeperImpl,
    directions_of,
    job_outcome,
    make_pruner,
    make_sampler,
    parse_space,
)
from conftest import cli, cli_env, popen_cli
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "search" / "plugins"  # the folder pyproject maps the hydra_plugins namespace from
TINY = ["model=tiny-bert", "debug=fast", "train.num_threads=1", "method.init_r=4", "method.target_r=2"]
SWEEP = ["train", "-m", "hydra/sweeper=adabudget"]


def sweep_env() -> dict:
    """conftest's ``cli_env`` with this checkout's plugin first on the path: the editable install
    may point at another tree, or predate it."""
    path = os.pathsep.join(p for p in (str(REPO), str(PLUGINS), os.environ.get("PYTHONPATH")) if p)
    return cli_env(TOKENIZERS_PARALLELISM="false", PYTHONPATH=path)


def journal_study(path: Path, name: str | None = None) -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


def only(paths) -> Path:
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


# ---------------------------------------------------------------- the grammar, the sweeper's side
@pytest.mark.parametrize(
    "override, expected, samples",
    [
        # choice of ints / floats / strings / lists / bools, and Hydra's simple a,b,c sweep
        ("k=choice(8,12,16)", CategoricalDistribution([8, 12, 16]), [8, 16]),
        ("k=choice(0.1,0.5)", CategoricalDistribution([0.1, 0.5]), [0.5]),
        (
            "k=choice(adam, 'two words', 'a,b')",
            CategoricalDistribution(["adam", "two words", "a,b"]),
            ["adam", "two words", "a,b"],
        ),
        (
            "k=choice([query,value],[query])",
            CategoricalDistribution(["[query,value]", "[query]"]),
            ["[query,value]", "[query]"],
        ),
        ("k=choice(true,false)", CategoricalDistribution([True, False]), [True, False]),
        ("k=1,2,3", CategoricalDistribution([1, 2, 3]), [2]),
        ("method=choice(lora,adalora)", CategoricalDistribution(["lora", "adalora"]), ["adalora"]),
        # range with and without step (the stop is included, as in hydra-optuna-sweeper), floats
        ("k=range(1,5)", IntDistribution(1, 5), [1, 5]),
        ("k=range(2,10,step=2)", IntDistribution(2, 10, step=2), [4]),
        ("k=range(0.0,1.0,0.25)", FloatDistribution(0.0, 1.0, step=0.25), [0.25, 1.0]),
        ("k=shuffle(range(1,4))", CategoricalDistribution([1, 2, 3]), [3]),
        # interval, tag(log, interval), int(interval), and a log integer interval
        ("k=interval(0.0,0.2)", FloatDistribution(0.0, 0.2), [0.1234567890123]),
        ("k=tag(log, interval(1e-4, 3e-3))", FloatDistribution(1e-4, 3e-3, log=True), [1.5e-4, 2.9e-3]),
        ("k=int(interval(8,64))", IntDistribution(8, 64), [8, 63]),
        ("k=tag(log, int(interval(1,1024)))", IntDistribution(1, 1024, log=True), [512]),
        ("k=choice(1e-3,1e30)", CategoricalDistribution([1e-3, 1e30]), [1e30]),
        ("+k=choice(1,2)", CategoricalDistribution([1, 2]), [2]),  # appended keys keep their '+'
    ],
)
def test_every_sweep_form_becomes_a_distribution_and_its_samples_parse_back(override, expected, samples):
    space = parse_space(None, [override])
    ((key, dist),) = space.distributions.items()
    assert key == override.split("=")[0] and dist == expected
    parser = OverridesParser.create()
    for value in samples:
        (line,) = space.overrides({key: value})
        parsed = parser.parse_override(line)
        typed = space.decoders[key](value) if key in space.decoders else value
        assert parsed.value() == typed and type(parsed.value()) is type(typed), line


def test_fixed_values_pass_unchanged_and_the_command_line_wins_over_params():
    params = {
        "method.r": "choice(2,4)",
        "train.lr": "tag(log, interval(1e-4, 1e-2))",
        "method.name": "lora",
        "train.epochs": 3,
        "method.target_modules": ["query", "value"],
        "data.task": "mr",
    }
    args = [
        "method.r=choice(8,16)",
        "train.lr=5e-4",
        "model=tiny-bert",
        "~logger.group",
        "+meta.note='a b'",
        "runs_root=/tmp/x",
    ]
    space = parse_space(params, args)
    # a later sweep replaces an earlier one; a fixed value removes the distribution of its key
    assert space.distributions == {"method.r": CategoricalDistribution([8, 16])}
    assert space.fixed == [
        "train.lr=5e-4",
        "method.name=lora",
        "train.epochs=3",
        "method.target_modules=[query,value]",
        "data.task=mr",
        "model=tiny-bert",
        "~logger.group",
        "+meta.note='a b'",
        "runs_root=/tmp/x",
    ]
    assert space.overrides({"method.r": 16})[0] == "method.r=16"  # in the order given


@pytest.mark.parametrize(
    "args, message",
    [
        (["k=glob(*)"], "hydra.sweeper: k: .*Optuna cannot sample"),
        (["k=choice(1,2"], "hydra.sweeper: cannot parse"),
        (["k=interval(1.0, 0.1)"], "hydra.sweeper: k: .*not a valid range"),
    ],
)
def test_unsamplable_sweeps_are_config_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_space(None, args)


# ---------------------------------------------------------------- samplers, pruners, objectives
def test_samplers_by_name_and_by_target_dict():
    space = parse_space(None, ["a=choice(1,2,3)", "b=range(0,10,step=5)", "c=range(0.0,1.0,0.5)"])
    assert type(make_sampler(None, space)[0]) is optuna.samplers.TPESampler
    assert type(make_sampler("random", space)[0]) is optuna.samplers.RandomSampler
    assert type(make_sampler("nsgaii", space)[0]) is optuna.samplers.NSGAIISampler
    sampler, _ = make_sampler(
        {
            "_target_": "optuna.samplers.TPESampler",
            "seed": 3,
            "n_startup_trials": 4,
            "multivariate": True,
            "consider_prior": None,
        },
        space,
    )
    assert type(sampler) is optuna.samplers.TPESampler and sampler._n_startup_trials == 4
    # hydra-optuna-sweeper's grid option (_partial_: the space comes from the params), closed bounds
    grid, size = make_sampler(
        {"_target_": "optuna.samplers.GridSampler", "_partial_": True, "seed": None}, space
    )
    assert type(grid) is optuna.samplers.GridSampler and size == 3 * 3 * 3
    with pytest.raises(ConfigError, match="continuous range"):
        make_sampler("grid", parse_space(None, ["x=interval(0,1)"]))
    with pytest.raises(ConfigError, match="must be a class of optuna.samplers"):
        make_sampler({"_target_": "os.system", "command": "true"}, space)
    with pytest.raises(ConfigError, match="unknown sampler 'bayes'"):
        make_sampler("bayes", space)
    assert type(make_pruner(None)) is optuna.pruners.NopPruner
    assert type(make_pruner("median")) is optuna.pruners.MedianPruner
    pruner = make_pruner({"_target_": "optuna.pruners.PercentilePruner", "percentile": 25.0})
    assert type(pruner) is optuna.pruners.PercentilePruner
    with pytest.raises(ConfigError, match="must be a class of optuna.pruners"):
        make_pruner({"_target_": "builtins.print"})


def test_nested_targets_are_held_to_the_allow_list(tmp_path):
    """Hydra's instantiate builds a nested ``_target_`` before its parent: every one of them must
    name an Optuna sampler (pruner), or a sampler's kwargs could run any callable."""
    space = parse_space(None, ["a=choice(1,2,3)", "b=interval(0,1)"])
    pruner = make_pruner(
        {
            "_target_": "optuna.pruners.PatientPruner",
            "patience": 2,
            "wrapped_pruner": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 3},
        }
    )
    assert type(pruner) is optuna.pruners.PatientPruner
    assert type(pruner._wrapped_pruner) is optuna.pruners.MedianPruner
    assert pruner._wrapped_pruner._n_startup_trials == 3
    sampler, _ = make_sampler(
        {
            "_target_": "optuna.samplers.PartialFixedSampler",
            "fixed_params": {"a": 2},
            "base_sampler": {"_target_": "optuna.samplers.TPESampler", "seed": 1},
        },
        space,
    )
    assert type(sampler) is optuna.samplers.PartialFixedSampler
    assert type(sampler._base_sampler) is optuna.samplers.TPESampler
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: t.suggest_categorical("a", [1, 2, 3]) + t.suggest_float("b", 0, 1), n_trials=3)
    assert [t.params["a"] for t in study.trials] == [2, 2, 2]  # the fixed parameter held

    ran = tmp_path / "ran"
    command = f"touch {ran}"
    refused = [
        (
            make_pruner,
            {
                "_target_": "optuna.pruners.PatientPruner",
                "patience": 2,
                "wrapped_pruner": {"_target_": "os.system", "command": command},
            },
            r"hydra\.sweeper\.pruner\.wrapped_pruner: _target_ 'os\.system' "
            r"must be a class of optuna\.pruners",
        ),
        (
            make_sampler,
            {
                "_target_": "optuna.samplers.PartialFixedSampler",
                "fixed_params": {"a": 2},
                "base_sampler": {"_target_": "os.system", "command": command},
            },
            r"hydra\.sweeper\.sampler\.base_sampler: _target_ 'os\.system' "
            r"must be a class of optuna\.samplers",
        ),
        (
            make_sampler,
            {
                "_target_": "optuna.samplers.TPESampler",
                "seed": {"_target_": "builtins.exec", "_args_": [f"open({str(ran)!r}, 'w')"]},
            },
            r"hydra\.sweeper\.sampler\.seed: _target_ 'builtins\.exec'",
        ),
        (
            make_sampler,
            {
                "_target_": "optuna.samplers.PartialFixedSampler",
                "fixed_params": {"a": 2},  # deeper, in a list
                "base_sampler": {
                    "_target_": "optuna.samplers.TPESampler",
                    "_args_": [{"_target_": "os.system", "command": command}],
                },
            },
            r"hydra\.sweeper\.sampler\.base_sampler\._args_\[0\]: _target_ 'os\.system'",
        ),
        (
            make_pruner,
            {
                "_target_": "optuna.pruners.PatientPruner",
                "patience": 2,  # a sampler where a pruner goes
                "wrapped_pruner": {"_target_": "optuna.samplers.TPESampler"},
            },
            "must be a class of optuna.pruners",
        ),
    ]
    for make, spec, message in refused:
        with pytest.raises(ConfigError, match=message):
            make(spec) if make is make_pruner else make(spec, space)
    assert not ran.exists()  # nothing nested was called


def test_directions_objectives_and_what_a_job_end_means():
    assert directions_of(None, None) == ["maximize"]  # adabudget train returns the dev metric
    assert directions_of(None, ["dev.accuracy", "params", "wall_time"]) == [
        "maximize",
        "minimize",
        "minimize",
    ]
    assert directions_of(["Minimize", "maximize"], None) == ["minimize", "maximize"]
    with pytest.raises(ConfigError, match="1 direction"):
        directions_of("maximize", ["dev.accuracy", "params"])
    with pytest.raises(ConfigError, match="sees dev only"):
        SweeperImpl(objectives=["test.accuracy"])
    with pytest.raises(ConfigError, match="single-objective"):
        SweeperImpl(objectives=["dev.accuracy", "params"], pruner="median")
    with pytest.raises(ConfigError, match="max_failure_rate"):
        SweeperImpl(max_failure_rate=2)

    result = {
        "status": "completed",
        "final": {"dev": {"accuracy": 0.75}},
        "trainable_params": 3698,
        "wall_time_s": 1.5,
        "run_dir": "r",
    }
    # params: the count the budget constrains (search.optuna_factory), which the sweeper counts
    # from the job's config, not trainable_params (the count at step 0, with the task head)
    assert objective_value(result, "dev.accuracy") == 0.75
    assert objective_value(result, "params", budget_params=3000) == 3000
    with pytest.raises(KeyError, match="budget count"):
        objective_value(result, "params")
    with pytest.raises(KeyError, match="no 'f1'"):
        objective_value(result, "dev.f1")

    class Ret:  # a hydra JobReturn: return_value re-raises the job's exception
        def __init__(self, value):
            self.value = value

        @property
        def return_value(self):
            if isinstance(self.value, BaseException):
                raise self.value
            return self.value

    assert job_outcome(Ret(0.75), result, None, None, 1)["values"] == [0.75]
    assert job_outcome(Ret(0.75), result, None, ["dev.accuracy", "params"], 2, 3000)["values"] == [
        0.75,
        3000.0,
    ]
    assert job_outcome(Ret(math.nan), {**result, "status": "pruned"}, None, None, 1)["state"] == "pruned"
    assert (
        job_outcome(Ret(math.nan), {**result, "status": "interrupted"}, None, None, 1)["state"]
        == "interrupted"
    )
    failed = job_outcome(Ret(math.nan), {**result, "status": "failed", "error": "non-finite"}, None, None, 1)
    assert failed == {**failed, "state": "fail", "error": "non-finite"}
    assert job_outcome(Ret(math.nan), None, "method.target_r: ...", None, 1)["state"] == "fail"
    assert job_outcome(Ret(optuna.TrialPruned()), None, None, None, 1)["state"] == "pruned"  # any task
    assert job_outcome(Ret((1.0, 2.0)), None, None, None, 2)["values"] == [1.0, 2.0]  # tuples, as there
    assert "set hydra.sweeper.objectives" in job_outcome(Ret(1.0), None, None, None, 2)["error"]
    assert job_outcome(Ret(math.nan), None, None, None, 1)["state"] == "fail"


# ---------------------------------------------------------------- hydra-optuna-sweeper's own examples
SPHERE = """
import hydra
from adabudget.search.sweeper import current_trial

@hydra.main(version_base=None, config_path="conf", config_name="config")
def sphere(cfg) -> float:
    trial = current_trial()  # any task function can reach its trial
    trial.set_user_attr("job_saw", {"number": trial.number, "x": cfg.x, "z": cfg.z})
    return float(cfg.x) ** 2 + float(cfg.y) ** 2

def extend(cfg, trial):  # hydra-optuna-sweeper's custom_search_space: fn(cfg, trial)
    trial.suggest_int("z", 2, 4)

if __name__ == "__main__":
    sphere()
"""
# plugins/hydra_optuna_sweeper/example/conf/config.yaml, with the sweeper's name changed
SPHERE_CONF = """
defaults:
  - override hydra/sweeper: adabudget
  - override hydra/sweeper/sampler: tpe

hydra:
  sweeper:
    sampler:
      seed: 123
    direction: minimize
    study_name: sphere
    storage: null
    n_trials: 6
    n_jobs: 2
    max_failure_rate: 0.0
    params:
      x: range(-5.5, 5.5, step=0.5)
      y: choice(-5 ,0 ,5)

x: 1
y: 1
z: 1
"""


def test_a_hydra_optuna_sweeper_config_runs_by_renaming_the_sweeper(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "sphere.py").write_text(SPHERE)
    (tmp_path / "conf" / "config.yaml").write_text(SPHERE_CONF)
    cmd = [sys.executable, "sphere.py", "-m", "hydra.sweep.dir=out/sweep"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=sweep_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = yaml.safe_load((tmp_path / "out" / "sweep" / "optimization_results.yaml").read_text())
    study = journal_study(tmp_path / "out" / "sweeps" / "sphere" / "journal.log", "sphere")
    assert [d.name for d in study.directions] == ["MINIMIZE"]
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 6
    best = min(study.trials, key=lambda t: t.value)
    assert results["best_value"] == best.value == best.params["x"] ** 2 + best.params["y"] ** 2
    assert study.trials[0].distributions["x"] == FloatDistribution(-5.5, 5.5, step=0.5)
    assert all(
        t.user_attrs["job_saw"] == {"number": t.number, "x": t.params["x"], "z": 1} for t in study.trials
    )
    # several objectives from a tuple, as their multi-objective example returns
    (tmp_path / "sphere.py").write_text(SPHERE.replace("return float", "return 1.0, float"))
    proc = subprocess.run(
        [
            *cmd,
            "hydra.sweeper.direction=[minimize,minimize]",
            "hydra.sweeper.study_name=two",
            "hydra/sweeper/sampler=nsgaii",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.custom_search_space=__main__.extend",
        ],
        cwd=tmp_path,
        env=sweep_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = journal_study(tmp_path / "out" / "sweeps" / "two" / "journal.log", "two")
    assert len(two.best_trials) >= 1 and all(len(t.values) == 2 for t in two.trials)
    assert all(t.user_attrs["job_saw"]["z"] == t.params["z"] for t in two.trials)  # the extended space


# ---------------------------------------------------------------- adabudget train sweeps
def test_sweep_prunes_through_dev_evaluations_and_the_job_sees_its_trial(tmp_path):
    """Grid over train.max_steps 10 / 20 with a pruner that prunes any dev accuracy below 0.99:
    the 20-step job is evaluated at step 10 and pruned there (record status pruned, trial
    PRUNED); the 10-step job has no evaluation before its end and completes."""
    proc = cli(
        [
            *SWEEP,
            *TINY,
            f"runs_root={tmp_path}",
            "hydra.sweeper.sampler=grid",
            "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:0.99}",
            "train.max_steps=choice(10,20)",
        ],
        cwd=tmp_path,
        env=sweep_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "status: pruned" in proc.stdout
    record = json.loads(only((tmp_path / "default" / "sweeps").glob("*/sweep.json")).read_text())
    study = journal_study(Path(record["storage"]), record["study"])
    assert len(study.trials) == 2  # n_trials 20, but the grid has 2 points
    for trial in study.trials:
        result = json.loads((Path(trial.user_attrs["run_dir"]) / "result.json").read_text())
        # not the storage: a database URL may hold a password (tests/test_credentials.py)
        assert result["meta"] == {
            "study": record["study"],
            "trial": trial.number,
            "params": trial.params,
            "sweeper": "adabudget",
        }
        assert Path(result["run_dir"]).name == str(trial.number)  # <sweep dir>/<trial number>
        if trial.params["train.max_steps"] == 20:
            assert (
                trial.state == TrialState.PRUNED
                and result["status"] == "pruned"
                and result["pruned_at"] == 10
            )
            assert trial.intermediate_values.keys() == {10}
        else:
            assert trial.state == TrialState.COMPLETE and result["status"] == "completed"
            assert trial.value == result["final"]["dev"]["accuracy"]
            assert trial.intermediate_values.keys() == {10}  # the final evaluation is reported too
    sweep = only(tmp_path.glob("default/multirun_*"))
    summary = json.loads((sweep / "summary.json").read_text())
    assert sorted(r["status"] for r in summary) == ["completed", "pruned"]
    assert all("train.max_steps=" in " ".join(r["overrides"]) for r in summary)  # read from the run folders
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_params"] == {
        "train.max_steps": 10
    }
    assert record["best"][0]["command"].startswith("adabudget train model=tiny-bert")


@pytest.mark.slow  # 22 s: a sweep killed and rerun
def test_killed_sweep_resumes_to_n_trials_without_resetting(tmp_path):
    """kill -9 of the sweep's process group mid-trial; the same command finishes the study with
    exactly n_trials (the killed trial failed and re-queued), and a third run has nothing to do."""
    args = [
        *SWEEP,
        *TINY,
        f"runs_root={tmp_path}",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler=random",
        "train.max_steps=40",
        "train.lr=tag(log, interval(1e-4, 1e-2))",
    ]
    first = popen_cli(
        args,
        tmp_path,
        sweep_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    journal, deadline = None, time.time() + 400
    while time.time() < deadline:  # one trial finished and the next one running
        journal = (
            next((tmp_path / "default" / "sweeps").glob("*/journal.log"), None)
            if (tmp_path / "default" / "sweeps").exists()
            else None
        )
        if journal is not None:
            states = [t.state for t in journal_study(journal).trials]
            if TrialState.COMPLETE in states and TrialState.RUNNING in states:
                break
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed = journal_study(journal)
    running = [t.number for t in killed.trials if t.state == TrialState.RUNNING]
    done_before = sum(t.state == TrialState.COMPLETE for t in killed.trials)
    assert len(running) == 1 and 1 <= done_before < 3

    second = cli(args, cwd=tmp_path, env=sweep_env())
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{done_before} of 3 trials done, 1 stale trial(s) re-queued" in second.stdout
    study = journal_study(journal)
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 3
    stale = study.trials[running[0]]
    assert stale.state == TrialState.FAIL and "died" in stale.user_attrs["failed_because"]
    rerun = [t for t in study.trials if t.user_attrs.get("retry_of") == stale.number]
    assert len(rerun) == 1 and rerun[0].params == stale.params and rerun[0].state == TrialState.COMPLETE

    third = cli(args, cwd=tmp_path, env=sweep_env())
    assert third.returncode == 0, third.stderr[-3000:]
    assert "3 of 3 trials done" in third.stdout and "started" not in third.stdout
    assert len(journal_study(journal).trials) == len(study.trials)


def test_several_objectives_are_read_from_the_job_record(tmp_path):
    proc = cli(
        [
            *SWEEP,
            *TINY,
            f"runs_root={tmp_path}",
            "hydra.sweeper.objectives=[dev.accuracy,params]",
            "hydra.sweeper.sampler=grid",
            "hydra.sweeper.n_jobs=2",
            "method.init_r=choice(2,4)",
            "method.target_r=1",
        ],
        cwd=tmp_path,
        env=sweep_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(only((tmp_path / "default" / "sweeps").glob("*/sweep.json")).read_text())
    assert record["directions"] == ["maximize", "minimize"] and record["pareto_front"]
    study = journal_study(Path(record["storage"]), record["study"])
    counts, budgets = set(), set()
    for trial in study.trials:
        result = json.loads((Path(trial.user_attrs["run_dir"]) / "result.json").read_text())
        assert trial.values[0] == result["final"]["dev"]["accuracy"]
        counts.add(result["trainable_params"])
        budgets.add(trial.values[1])
        assert trial.values[1] < result["trainable_params"]  # no head, and b(T) below b(0)
    assert len(counts) == 2  # init_r 2 and 4 train different numbers of parameters
    # params is AdaLoRA's count at b(T) = target_r 1 (as adabudget search counts it): the same for both
    assert len(budgets) == 1
    sweep = only(tmp_path.glob("default/multirun_*"))
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["solutions"]


def test_rolling_pool_starts_the_next_job_while_a_slow_one_runs(tmp_path):
    """Three known trials enqueued in the study first: a slow one (120 steps), one that diverges
    (lr 1e30) and a fast one. With n_jobs 2 the fast one starts when the diverged one ends, long
    before the slow one does (batches would wait for both); the failure is replaced, not counted."""
    storage = tmp_path / "default" / "sweeps" / "pool" / "journal.log"
    storage.parent.mkdir(parents=True)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.create_study(
        study_name="pool", storage=JournalStorage(JournalFileBackend(str(storage))), direction="maximize"
    )
    for steps, lr in ((120, 5e-3), (4, 1e30), (4, 5e-3)):
        study.enqueue_trial({"train.max_steps": steps, "train.lr": lr})
    proc = cli(
        [
            *SWEEP,
            *TINY,
            f"runs_root={tmp_path}",
            "hydra.sweeper.study_name=pool",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.max_failure_rate=0.5",
            "train.max_grad_norm=null",
            "train.log_every=1",
            "train.max_steps=choice(4,120)",
            "train.lr=choice(5e-3,1e30)",
        ],
        cwd=tmp_path,
        env=sweep_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    slow, diverged, fast = journal_study(storage, "pool").trials
    assert (slow.state, diverged.state, fast.state) == (
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
    )
    assert "non-finite" in diverged.user_attrs["error"]
    assert diverged.datetime_complete <= fast.datetime_start < slow.datetime_complete
    summary = json.loads((only(tmp_path.glob("default/multirun_*")) / "summary.json").read_text())
    assert sorted(r["status"] for r in summary) == ["completed", "completed", "failed"]


def test_failures_beyond_max_failure_rate_stop_the_sweep(tmp_path):
    proc = cli(
        [
            *SWEEP,
            *TINY,
            f"runs_root={tmp_path}",
            "method.target_r=99",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.max_failure_rate=0",
            "train.lr=interval(1e-4, 1e-3)",
        ],
        cwd=tmp_path,
        env=sweep_env(),
    )
    assert proc.returncode != 0
    assert "1 of this sweep's jobs failed (hydra.sweeper.max_failure_rate=0" in proc.stderr
    assert "config refused: method.target_r" in proc.stderr
    assert proc.stdout.count("started (pid") == 1


def setuptools_builds_editables() -> bool:
    """Whether this environment's setuptools builds pyproject's editable wheel without the network:
    pyproject asks for >= 68, and bdist_wheel is built in from 70.1 (before, the wheel package)."""
    import importlib.util
    import re

    try:
        import setuptools
    except ImportError:
        return False
    version = tuple(int(x) for x in re.findall(r"\d+", setuptools.__version__)[:2])
    return version >= (68, 0) and (version >= (70, 1) or importlib.util.find_spec("wheel") is not None)


def test_editable_install_lets_hydra_discover_the_plugin(tmp_path):
    """``pip install -e .`` of a copy of this checkout into a fresh venv: Hydra's plugin scan finds
    the sweeper through pyproject's hydra_plugins mapping, via the real script.

    The venv depends on nothing the base interpreter happens to hold: it is made without pip and
    without system site-packages, and a .pth file puts this environment's site-packages (pip,
    hydra, torch, ...) after its own, unprocessed (this environment's own editable adabudget stays
    out). The build backend is this environment's setuptools when it can build an editable wheel
    offline (>= 70.1 has bdist_wheel; older needs the wheel package: a fresh venv's setuptools 65.5
    has neither); otherwise pip's build isolation fetches pyproject's build requirement from the
    package index, as the README's own ``pip install -e`` did."""
    import sysconfig

    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "venv",
            "runs",
            "outputs",
            "multirun",
            "wandb",
            "__pycache__",
            "*.egg-info",
            "build",
            ".pytest_cache",
            ".ruff_cache",
        ),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    here = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(site) / "_outer_environment.pth").write_text("".join(f"{p}\n" for p in here))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    offline = ["--no-build-isolation", "--no-index"] if setuptools_builds_editables() else []
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", *offline, "-e", str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    script = venv / "bin" / "adabudget"
    plugins = subprocess.run(
        [script, "train", "--info", "plugins"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plugins.returncode == 0, plugins.stderr[-3000:]
    assert "AdabudgetSweeper" in plugins.stdout
    cfg = subprocess.run(
        [script, "train", "hydra/sweeper=adabudget", "--cfg", "hydra", "-p", "hydra.sweeper"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cfg.returncode == 0, cfg.stderr[-3000:]
    node = yaml.safe_load(cfg.stdout.split("\n", 1)[1])
    assert node["_target_"] == "hydra_plugins.adabudget_sweeper.adabudget_sweeper.AdabudgetSweeper"
    assert node["sampler"]["_target_"] == "optuna.samplers.TPESampler"
    where = subprocess.run(
        [python, "-c", "import hydra_plugins.adabudget_sweeper as m; print(m.__file__)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip() == str(
        src / "search" / "plugins" / "hydra_plugins" / "adabudget_sweeper" / "__init__.py"
    )


def test_old_install_without_the_plugin_says_what_to_do(tmp_path):
    env = dict(sweep_env(), PYTHONPATH=str(REPO))  # the checkout, but no hydra_plugins on the path
    code = "import sys; sys.modules['hydra_plugins'] = None; from adabudget.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, *SWEEP, *TINY],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "pip install -e ." in proc.stderr


def _waits_on(path: Path, pid: int) -> bool:
    """Whether ``pid`` is blocked on a flock of ``path`` (a ``->`` line of /proc/locks)."""
    inode = f":{path.stat().st_ino} "
    return any(
        line.split()[1] == "->" and f" {pid} " in line and inode in line
        for line in Path("/proc/locks").read_text().splitlines()
    )


@pytest.mark.slow  # ~20 s: a sweep of two jobs in a subprocess
def test_sweep_counts_and_asks_under_the_studys_start_lock(tmp_path):
    """Two sweeps on one study (two machines on one storage, or a sweep beside ``adabudget
    search`` workers) count the study's trials and ask the next one under its start lock
    (``search.workers.StartLock``), so together they never start more than n_trials. While
    another process holds the lock the sweep waits on it and starts nothing; released, it runs."""
    import fcntl

    root = tmp_path / "default" / "sweeps" / "locked"
    root.mkdir(parents=True)
    lock = root / ".start.lock"
    held = open(lock, "a+")
    fcntl.flock(held, fcntl.LOCK_EX)
    args = [
        *SWEEP,
        *TINY,
        f"runs_root={tmp_path}",
        "hydra.sweeper.study_name=locked",
        "hydra.sweeper.n_trials=2",
        "train.max_steps=4",
        "train.lr=choice(5e-3,1e-3)",
    ]
    proc = popen_cli(args, tmp_path, sweep_env())
    try:
        deadline = time.time() + 180
        while not _waits_on(lock, proc.pid):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "the sweep never waited on the study's start lock"
            time.sleep(0.2)
        assert journal_study(root / "journal.log", "locked").trials == []  # nothing started meanwhile
    finally:
        fcntl.flock(held, fcntl.LOCK_UN)
        held.close()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    trials = journal_study(root / "journal.log", "locked").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]


# ---------------------------------------------------------------- one toolkit for both front ends
SAME_SPACE = """params:
  method.name: lora
  method.r: choice(2, 4)
  method.alpha: 16
"""


@pytest.mark.slow  # ~40 s: the same two trainings through adabudget search and through the sweeper
def test_the_search_and_the_sweeper_count_and_value_one_space_alike(tmp_path):
    """One space, one grid sampler, objectives [dev.accuracy, params]: ``adabudget search`` and
    ``adabudget train -m hydra/sweeper=adabudget`` count the same finished trials and give each
    configuration the same values (search.optuna_factory: params is the budget's count, the head
    left out, in both)."""
    (tmp_path / "same.yaml").write_text(SAME_SPACE)
    base = ["model=tiny-bert", "debug=fast", f"runs_root={tmp_path}"]
    search = cli(
        [
            "search",
            *base,
            f"search.space={tmp_path / 'same.yaml'}",
            "search.sampler=grid",
            "search.n_trials=2",
            "search.enqueue=[]",
            "search.threads=1",
            "search.objectives=[dev.accuracy,params]",
        ],
        cwd=tmp_path,
        env=sweep_env(),
    )
    assert search.returncode == 0, search.stderr[-3000:]
    sweep = cli(
        [
            *SWEEP,
            *base,
            "train.num_threads=1",
            "method=lora",
            "method.r=choice(2,4)",
            "method.alpha=16",
            "hydra.sweeper.sampler=grid",
            "hydra.sweeper.objectives=[dev.accuracy,params]",
        ],
        cwd=tmp_path,
        env=sweep_env(),
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    searched = json.loads(only(tmp_path.glob("search/*/search.json")).read_text())
    swept = json.loads(only((tmp_path / "default" / "sweeps").glob("*/sweep.json")).read_text())
    assert searched["finished"] == swept["finished"] == 2
    assert searched["directions"] == swept["directions"] == ["maximize", "minimize"]

    def values(record: dict) -> dict:
        return {t["params"]["method.r"]: t["values"] for t in record["trials"] if t["state"] == "complete"}

    assert values(searched) == values(swept)
    assert set(values(swept)) == {2, 4} and values(swept)[2][1] < values(swept)[4][1]
