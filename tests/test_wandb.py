"""W&B for searches: every trial a real offline W&B run (read back from its ``.wandb`` file), and
a W&B failure never failing a trial."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import pytest
from conftest import TINY_ADALORA, TINY_RUN


# ---------------------------------------------------------------- reading an offline run
def wandb_records(run_dir: Path):
    """The records of the one offline W&B run under ``run_dir``: its ``.wandb`` file is a LevelDB-style
    log (a 7-byte ``:W&B`` header, then 32 KiB blocks of chunks with a 7-byte header each: CRC,
    length, type full/first/middle/last) of ``wandb_internal_pb2.Record`` messages. W&B 0.31 has
    no Python reader of its own (wandb-core writes it), and offline it writes no summary file."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
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


def read_offline_run(run_dir: Path) -> dict:
    """group, config (key -> value), summary (key -> value, nested keys joined with '.') of a run."""
    import json

    out = {"group": None, "config": {}, "summary": {}}
    for record in wandb_records(run_dir):
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
    from budget.compose import compose
    from search.config import register_schema

    register_schema()
    base = [*TINY_RUN, *TINY_ADALORA, f"runs_root={tmp_path / 'runs'}", "search.enqueue=[]",
            "search.sampler=random", "search.threads=1"]  # fmt: skip
    return compose(base + list(overrides), config_name="search")


def test_search_trials_are_offline_wandb_runs_in_the_study_group(tmp_path, monkeypatch):
    """Two trials of an AdaLoRA search: one offline W&B run each, grouped by the study, the config
    under dotted keys, the trial's number, parameters and objectives (the values Optuna got) and the
    rank table in the summary."""
    from search.study import run_search

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = search_cfg(tmp_path, "logger=wandb", "search.space=adalora", "search.n_trials=2",
                     "search.objectives=[dev.accuracy,params]", "train.eval_every=0")  # fmt: skip
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
    from search.study import run_search

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
    cfg = search_cfg(tmp_path, "logger.wandb=true", "logger.mode=online", "search.space=lora_rank_lr",
                     "search.n_trials=1")  # fmt: skip
    from search.study import run_search

    report = run_search(cfg)
    assert report["trials"][0]["state"] == "complete"
