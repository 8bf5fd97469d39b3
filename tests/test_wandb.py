"""W&B for searches: every trial a real offline W&B run (read back from its ``.wandb`` file), a
W&B failure never failing a trial, and the sweep export, down to the command an agent runs."""

from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from adabudget.config import ConfigError
from conftest import TINY_ADALORA, TINY_RUN
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- reading an offline run
def wandb_records(run_dir: Path, run_id: str = "*"):
    """The records of the one offline W&B run under ``run_dir`` (or of the one with ``run_id``):
    its ``.wandb`` file is a LevelDB-style log (a 7-byte ``:W&B`` header, then 32 KiB blocks of
    chunks with a 7-byte header each: CRC, length, type full/first/middle/last) of
    ``wandb_internal_pb2.Record`` messages. W&B 0.31 has no Python reader of its own (wandb-core
    writes it), and offline it writes no summary file."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob(f"wandb/offline-run-*/run-{run_id}.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def read_offline_run(run_dir: Path, run_id: str = "*") -> dict:
    """group, config (key -> value), summary (key -> value, nested keys joined with '.') of a run."""
    import json

    out = {"group": None, "config": {}, "summary": {}}
    for record in wandb_records(run_dir, run_id):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["group"] = record.run.run_group
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            for item in record.summary.update:
                key = item.key or ".".join(item.nested_key)
                out["summary"][key] = json.loads(item.value_json)
    return out


# ---------------------------------------------------------------- the per-trial mirror
def search_cfg(tmp_path, *overrides: str):
    from adabudget.compose import compose
    from adabudget.search.config import register_schema

    register_schema()
    base = [
        *TINY_RUN,
        *TINY_ADALORA,
        f"runs_root={tmp_path / 'runs'}",
        "search.enqueue=[]",
        "search.sampler=random",
        "search.threads=1",
    ]
    return compose(base + list(overrides), config_name="search")


def test_search_trials_are_offline_wandb_runs_in_the_study_group(tmp_path, monkeypatch):
    """Two trials of an AdaLoRA search: one offline W&B run each, grouped by the study, the config
    under dotted keys, the trial's number, parameters and objectives (the values Optuna got) and the
    rank table in the summary."""
    from adabudget.search.command import run_search

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = search_cfg(
        tmp_path,
        "logger=wandb",
        "search.space=adalora",
        "search.n_trials=2",
        "search.objectives=[dev.accuracy,params]",
        "train.eval_every=0",
    )
    report = run_search(cfg)
    assert report["finished"] == 2
    for row in report["trials"]:
        assert row["state"] == "complete"
        run_dir = Path(row["run_dir"])
        run = read_offline_run(run_dir)
        assert run["group"] == report["study"] == "adalora-mr"
        config, summary = run["config"], run["summary"]
        assert config["method.name"] == "adalora" and config["model.name"] == "tiny-bert"
        assert config["train.max_steps"] == 24 and config["logger.group"] == "adalora-mr"
        assert config["meta.trial"] == row["number"] and config["meta.study"] == "adalora-mr"
        assert not any(k.startswith("meta.summary") for k in config)  # those go to the summary only
        assert not any(isinstance(v, dict) and v for v in config.values())  # flat
        assert summary["trial/number"] == row["number"]
        assert {
            k[len("trial/params/") :]: v for k, v in summary.items() if k.startswith("trial/params/")
        } == (row["params"])
        assert summary["objective/dev.accuracy"] == pytest.approx(row["values"][0])
        assert summary["objective/params"] == row["values"][1] == row["budget_params"]
        assert summary["trainable_params"] > 0 and summary["status"] == "completed"
        assert summary["rank_table._type"] == "table-file"
        (table,) = run_dir.glob("wandb/offline-run-*/files/media/table/rank_table_*.table.json")
        assert "budget" in table.read_text()
        assert (run_dir / "wandb_id.txt").read_text().strip() in str(table)


def test_wandb_summary_adds_the_callers_entries_to_the_runs_recorded_inside_it(tmp_path, monkeypatch):
    """``adabudget.log.wandb_summary(fn)``: a run whose record opens inside the block gets
    ``fn(result)`` in its W&B summary, computed from the result it ends with; a run recorded after
    the block gets none; an error in ``fn`` stops the mirror, never the run."""
    from adabudget.config import LoggerConfig
    from adabudget.log import RunRecord, wandb_summary

    monkeypatch.setenv("WANDB_MODE", "offline")
    seen = []

    def entries(result: dict) -> dict:
        seen.append(result["status"])
        return {"caller/number": 7, "caller/accuracy": result["final"]["dev"]["accuracy"] * 100}

    def record(folder: Path) -> RunRecord:
        return RunRecord(folder, {"run_name": folder.name}, LoggerConfig(wandb=True), header={"x": 1})

    def completed(rec: RunRecord) -> None:  # one W&B run at a time: a second init finishes the first
        rec.result({"status": "completed", "final": {"dev": {"accuracy": 0.5}}})
        rec.close()

    with wandb_summary(entries):
        inside = record(tmp_path / "inside")
    completed(inside)  # entries are the caller's from where the record opened, not where it ends
    completed(record(tmp_path / "outside"))
    assert seen == ["completed"]
    summary = read_offline_run(tmp_path / "inside")["summary"]
    assert summary["caller/number"] == 7 and summary["caller/accuracy"] == 50.0
    assert summary["final/dev/accuracy"] == 0.5 and summary["status"] == "completed"
    assert not any(k.startswith("caller/") for k in read_offline_run(tmp_path / "outside")["summary"])
    with wandb_summary(entries):
        failing = record(tmp_path / "failing")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        failing.result({"status": "failed", "error": "boom"})  # no final metrics: entries raises KeyError
    failing.close()
    assert any("W&B mirror disabled" in str(w.message) for w in caught)
    assert json.loads((tmp_path / "failing" / "result.json").read_text())["status"] == "failed"


def test_trial_summary_is_what_optuna_is_told(tmp_path):
    """A trial's summary entries: its number and parameters, its objectives read as Optuna reads
    them (``params`` the budget count, known before the run), an objective missing from a failed
    run's result left out."""
    from adabudget.search.study import prepare
    from adabudget.search.trial import trial_summary

    setup = prepare(
        search_cfg(
            tmp_path,
            "logger=wandb",
            "search.space=adalora",
            "search.objectives=[dev.accuracy,wall_time,params]",
        )
    )
    entries = trial_summary(setup, 3, {"method.init_r": 4}, 1234)
    done = {"status": "completed", "final": {"dev": {"accuracy": 0.75, "f1": 0.7}}, "wall_time_s": 12.5}
    assert entries(done) == {
        "trial/number": 3,
        "trial/params/method.init_r": 4,
        "objective/dev.accuracy": 0.75,
        "objective/wall_time": 12.5,
        "objective/params": 1234,
    }
    assert entries({"status": "failed", "error": "boom"}) == {
        "trial/number": 3,
        "trial/params/method.init_r": 4,
        "objective/params": 1234,
    }


class _BrokenRun:
    """A W&B run whose summary cannot be written (the server went away mid-run)."""

    id = "broken"

    class _Summary(dict):
        def __setitem__(self, key, value):
            raise ConnectionError("W&B server unreachable")

    summary = _Summary()

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


@pytest.mark.parametrize("failure", ["init", "summary"])
def test_a_wandb_failure_never_fails_a_trial(tmp_path, monkeypatch, failure):
    import wandb

    def broken_init(**kwargs):
        if failure == "init":
            raise wandb.errors.CommError("Timed out while retrying: no network")
        return _BrokenRun()

    monkeypatch.setattr(wandb, "init", broken_init)
    cfg = search_cfg(tmp_path, "logger.wandb=true", "search.space=lora_rank_lr", "search.n_trials=1")
    from adabudget.search.command import run_search

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run_search(cfg)
    assert report["finished"] == 1 and report["trials"][0]["state"] == "complete"
    assert any("W&B mirror" in str(w.message) for w in caught)


@pytest.mark.slow
def test_an_unreachable_wandb_server_only_delays_a_trial(tmp_path, monkeypatch):
    """The real thing: online, nothing listening; wandb.init gives up after its 30 s init_timeout."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    cfg = search_cfg(
        tmp_path, "logger.wandb=true", "logger.mode=online", "search.space=lora_rank_lr", "search.n_trials=1"
    )
    from adabudget.search.command import run_search

    report = run_search(cfg)
    assert report["trials"][0]["state"] == "complete"


# ---------------------------------------------------------------- sweep export
SWEEP_TINY = [*TINY_RUN, "data.max_eval_samples=32", "train.eval_every=12"]


def export(tmp_path, *overrides: str) -> dict:
    from adabudget.cli import main

    out = tmp_path / "sweep.yaml"
    main(["search", "export-wandb-sweep", *overrides, "--out", str(out)])
    return yaml.safe_load(out.read_text())


def test_export_wandb_sweep_writes_every_field(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # `program` is relative to the checkout an agent runs in
    runs = tmp_path / "runs"
    sweep = export(
        tmp_path,
        *SWEEP_TINY,
        f"runs_root={runs}",
        "search.space=lora_rank_lr",
        "search.n_trials=7",
        "search.pruner=median",
        "search.sampler=tpe",
        'search.trial_overrides=["train.max_steps=12"]',
    )
    assert sweep["name"] == "lora_rank_lr-mr" and sweep["project"] == "adabudget"
    assert sweep["program"] == "budget/cli.py" and (ROOT / sweep["program"]).is_file()
    assert sweep["method"] == "bayes" and sweep["run_cap"] == 7
    assert sweep["metric"] == {"name": "dev/accuracy", "goal": "maximize"}
    assert sweep["early_terminate"] == {"type": "hyperband", "min_iter": 1, "eta": 3}
    # configs/search/space/lora_rank_lr.yaml, in W&B's grammar; method.name -> the group override
    assert sweep["parameters"] == {
        "method": {"value": "lora"},
        "method.alpha": {"value": 16},
        "method.r": {"values": [2, 4, 8, 16]},
        "train.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 3e-3},
    }
    assert sweep["command"] == [
        "${env}",
        "${interpreter}",
        "${program}",
        "train",
        *SWEEP_TINY,
        f"runs_root={runs}",
        "train.max_steps=12",
        "logger.wandb=true",
        "train.checkpoint=none",
        "train.progress=false",
        "${args_no_hyphens}",
    ]
    assert "entity" not in sweep


def test_export_without_pruner_or_with_random_sampler(tmp_path):
    sweep = export(
        tmp_path, "model=tiny-bert", "search.space=lora_rank_lr", "search.sampler=random", "logger.entity=lab"
    )
    assert sweep["method"] == "random" and "early_terminate" not in sweep and sweep["entity"] == "lab"
    assert sweep["run_cap"] == 20  # search.n_trials' default


def sample_parameters(spec: dict, rng: random.Random) -> dict:
    """One draw from a sweep's parameters, as W&B's random search draws (values, value, int_uniform,
    uniform, log_uniform_values)."""
    out = {}
    for name, p in spec.items():
        if "value" in p:
            out[name] = p["value"]
        elif "values" in p:
            out[name] = rng.choice(p["values"])
        elif p["distribution"] == "int_uniform":
            out[name] = rng.randint(p["min"], p["max"])
        elif p["distribution"] == "uniform":
            out[name] = rng.uniform(p["min"], p["max"])
        else:
            assert p["distribution"] == "log_uniform_values"
            out[name] = math.exp(rng.uniform(math.log(p["min"]), math.log(p["max"])))
    return out


def agent_command(sweep: dict, values: dict) -> list[str]:
    """The command ``wandb agent`` runs for one suggestion (wandb/wandb_agent.py, Agent._command_run):
    W&B's own ``create_sweep_command_args`` formats the arguments; the macros are replaced alike."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    sweep_vars = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    sweep_vars.update(env=["/usr/bin/env"], interpreter=[sys.executable], program=[sweep["program"]])
    command = []
    for c in sweep_utils.create_sweep_command(list(sweep["command"])):
        c = str(c)
        command += sweep_vars.get(c[2:-1]) or [] if c.startswith("${") and c.endswith("}") else [c]
    return command


def test_the_command_a_wandb_agent_runs_trains_the_sampled_configuration(tmp_path, monkeypatch):
    """The exported sweep, one sampled parameter set, the agent's command run as a subprocess in the
    checkout (``python budget/cli.py train ...``): it trains, and the run folder holds the sample."""
    monkeypatch.chdir(ROOT)
    runs = tmp_path / "runs"
    sweep = export(
        tmp_path, *SWEEP_TINY, "train.max_steps=8", f"runs_root={runs}", "search.space=lora_rank_lr"
    )
    values = sample_parameters(sweep["parameters"], random.Random(0))
    command = agent_command(sweep, values)
    assert command[:4] == ["/usr/bin/env", sys.executable, "budget/cli.py", "train"]
    assert "method.r=" + str(values["method.r"]) in command and "method=lora" in command
    # PYTHONPATH would pick the package up anyway: run without it, as an agent in a checkout does
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p.parent for p in runs.rglob("result.json")]
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.method.name == "lora" and cfg.method.r == values["method.r"] and cfg.method.alpha == 16
    assert cfg.train.lr == pytest.approx(values["train.lr"]) and cfg.train.max_steps == 8
    assert cfg.logger.wandb and cfg.train.checkpoint == "none"
    assert OmegaConf.load(run_dir / "result.json").status == "completed"
    # the run's W&B mirror (offline here, online under a real agent) has the sampled keys as W&B sent them
    config = read_offline_run(run_dir)["config"]
    assert config["method.r"] == values["method.r"] and config["train.lr"] == pytest.approx(
        values["train.lr"]
    )


# ---------------------------------------------------------------- what the export refuses
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["search.space=s4"], "search.space=s4: a space written in code"),
        (["search.space=[lora_rank_lr,lr]"], "search.space=lr: a space written in code"),
        (["search.space=lora_rank_lr", "search.objectives=[dev.accuracy,params]"], "wandb/wandb#3032"),
        (["search.space=lora_rank_lr", "search.budget=4000"], "search.budget: a W&B sweep cannot skip"),
        (
            ["search.space=lora_rank_lr", "search.sampler=grid"],
            "search.sampler=grid: train.lr is a continuous",
        ),
    ],
)
def test_export_refuses_what_wandb_cannot_express(tmp_path, overrides, message):
    from adabudget.search.wandb import sweep_config

    all_overrides = ["model=tiny-bert", *overrides]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        sweep_config(search_cfg(tmp_path, *all_overrides), all_overrides)


def test_export_exits_2_with_the_reason(tmp_path, capsys):
    from adabudget.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["search", "export-wandb-sweep", "model=tiny-bert", "search.space=autopeft"])
    assert exit_.value.code == 2
    assert "search.space=autopeft" in capsys.readouterr().err


def test_every_grammar_form_maps_to_a_wandb_parameter():
    from adabudget.search.declarative import compile_params
    from adabudget.search.wandb import parameter

    space = compile_params(
        {
            "a": "choice(2, 4, 8)",
            "b": "range(8, 32, step=8)",
            "c": "int(interval(1, 9))",
            "d": "interval(0.0, 0.2)",
            "e": "tag(log, interval(1e-4, 3e-3))",
            "f": "range(0.1, 0.3, step=0.1)",
            "g": "choice([1,2], [3])",
        }
    )
    got = {k: parameter(k, d) for k, d in space.distributions.items()}
    assert got == {
        "a": {"values": [2, 4, 8]},
        "b": {"values": [8, 16, 24, 32]},  # the stop included, as the search samples it
        "c": {"distribution": "int_uniform", "min": 1, "max": 9},
        "d": {"distribution": "uniform", "min": 0.0, "max": 0.2},
        "e": {"distribution": "log_uniform_values", "min": 1e-4, "max": 3e-3},
        "f": {"values": [0.1, 0.2, 0.3]},
        "g": {"values": ["[1,2]", "[3]"]},  # Hydra strings: the agent passes g=[1,2], Hydra reads a list
    }
    log_int = compile_params({"h": "tag(log, int(interval(1, 64)))"}).distributions["h"]
    with pytest.raises(ConfigError, match="no integer log-uniform"):
        parameter("h", log_int)


# ---------------------------------------------------------------- a resumed run's mirror
def history_steps(run_dir: Path, run_id: str) -> dict[int, dict]:
    """step -> the row W&B recorded at it, in the offline run ``run_id`` under ``run_dir``."""
    import json

    rows: dict[int, dict] = {}
    for record in wandb_records(run_dir, run_id):
        if record.WhichOneof("record_type") == "history":
            row = {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            assert row["_step"] not in rows, f"step {row['_step']} recorded twice"
            rows[row["_step"]] = row
    return rows


def test_a_resumed_run_is_mirrored_offline_by_one_run_holding_each_step_once(compose_run, monkeypatch):
    """Killed at step 16 with its last checkpoint at step 8 (the record and the mirror went on past
    it), then resumed: offline there is no rewind (a W&B server feature), so the mirror is a new
    W&B run (``wandb_id.txt``) into which the record, cut at step 8, is replayed before training
    goes on. It holds every step of metrics.jsonl exactly once, with the record's values."""
    import json

    from adabudget.compose import resume_config
    from adabudget.training import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    knobs = ("logger=wandb", "run_name=killed", "train.log_every=1", "train.checkpoint_every=8")
    first = train(compose_run(*knobs, "train.stop_after_step=8"))
    run_dir = Path(first["run_dir"])
    at_8 = (run_dir / "checkpoints" / "last.pt").read_bytes()
    train(resume_config(run_dir, ["train.stop_after_step=16"]))
    # what a kill at step 16 leaves: the record and its mirror at 16, the checkpoint of step 8
    (run_dir / "checkpoints" / "last.pt").write_bytes(at_8)
    killed = (run_dir / "wandb_id.txt").read_text().strip()
    assert max(history_steps(run_dir, killed)) == 16
    resumed = train(resume_config(run_dir))
    assert resumed["status"] == "completed" and resumed["steps"] == 24
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert run_id != killed
    rows = history_steps(run_dir, run_id)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(rows) == sorted({m["step"] for m in metrics}) and max(rows) == 24
    for m in metrics:  # replayed (steps <= 8) and logged after the resume alike
        split = m.get("split", "train")
        for key, value in m.items():
            if key not in ("step", "split"):
                assert rows[m["step"]][f"{split}/{key}"] == pytest.approx(value), (m["step"], key)
    ranks = [json.loads(line) for line in (run_dir / "ranks.jsonl").read_text().splitlines()]
    for r in ranks[1:]:  # step 0 is not plotted
        assert rows[r["step"]]["budget/kept"] == r["kept"]
    config = read_offline_run(run_dir, run_id)["config"]
    assert config["mirror.replaces"] == killed and config["mirror.replayed_to_step"] == 8


class _OnlineRun:
    """What ``wandb.init`` returns online, as far as the mirror uses it."""

    def __init__(self, run_id: str):
        self.id, self.logged, self.config = run_id, [], {}
        self.summary = {}

    def log(self, data, step=None):
        self.logged.append((step, data))

    def finish(self):
        pass


@pytest.mark.parametrize("server", ["rewinds", "forks", "neither"])
def test_online_a_resumed_run_is_rewound_else_forked_else_replayed(
    tmp_path, monkeypatch, compose_run, server
):
    """Online the W&B server does the work: ``resume_from={id}?_step={checkpoint step}`` (rewind,
    a preview feature) where it is enabled, else ``fork_from`` (a new run id), else a new run with
    the record replayed, as offline. The server's answers are faked; the order and arguments of
    the calls, wandb_id.txt and the replay are ours."""
    import json

    import wandb
    from adabudget.log import _init_wandb

    calls = []

    class Config(dict):
        def update(self, values):
            super().update(values)

    def init(**kwargs):
        how = next((k for k in ("resume_from", "fork_from") if kwargs.get(k)), None)
        calls.append((how, kwargs.get(how)))
        if how == "resume_from" and server != "rewinds" or how == "fork_from" and server != "forks":
            raise wandb.errors.CommError(f"{how}: this feature is not enabled on the server")
        run = _OnlineRun({"resume_from": "old", "fork_from": "forked"}.get(how, "new"))
        run.config = Config()
        return run

    monkeypatch.setattr(wandb, "init", init)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb_id.txt").write_text("old")
    (run_dir / "metrics.jsonl").write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"step": 4, "loss": 0.9},
                {"step": 8, "loss": 0.7},
                {"step": 8, "split": "dev", "accuracy": 0.5},
            ]
        )
    )
    (run_dir / "ranks.jsonl").write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"step": 0, "budget": 48, "kept": 48, "ranks": {"m": 4}},
                {"step": 6, "budget": 40, "kept": 40, "ranks": {"m": 3}},
            ]
        )
    )
    logger = compose_run("logger=wandb", "logger.mode=online").logger
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = _init_wandb(run_dir, {"train": {"lr": 1e-3}}, logger, resume_step=8)
    expected = {
        "rewinds": [("resume_from", "old?_step=8")],
        "forks": [("resume_from", "old?_step=8"), ("fork_from", "old?_step=8")],
        "neither": [("resume_from", "old?_step=8"), ("fork_from", "old?_step=8"), (None, None)],
    }[server]
    assert calls == expected
    assert (
        (run_dir / "wandb_id.txt").read_text()
        == run.id
        == {"rewinds": "old", "forks": "forked", "neither": "new"}[server]
    )
    assert len([w for w in caught if "refused" in str(w.message)]) == len(expected) - 1
    if server == "neither":  # the record up to the checkpoint, in step order, then the mirror goes on
        assert run.logged == [
            (4, {"train/loss": 0.9}),
            (6, {"budget/scheduled": 40, "budget/kept": 40, "rank/m": 3}),
            (8, {"train/loss": 0.7}),
            (8, {"dev/accuracy": 0.5}),
        ]
        assert run.config == {"mirror.replaces": "old", "mirror.replayed_to_step": 8}
    else:
        assert run.logged == []
