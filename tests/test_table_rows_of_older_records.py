"""A table over records written before ``RunConfig.search`` went (commit 2831a5d): their
config.yaml still holds a ``search:`` node (null for a plain run, the study's settings for a
trial), which must not split one configuration into several rows."""

from __future__ import annotations

import json
from pathlib import Path

from adabudget.analysis.records import load
from adabudget.analysis.tables import build

# what each seed's config.yaml held besides the configuration: nothing (written today), a null
# node (a plain run of an older version), a trial's search settings (an older search's retrain)
SEARCH_NODES = {42: "", 1: "search: null\n", 2: "search:\n  study: s4-mr\n  n_trials: 30\n"}


def write_runs(root: Path) -> None:
    for seed, node in SEARCH_NODES.items():
        run = root / f"s{seed}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(
            f"train:\n  seed: {seed}\n  lr: 0.0005\nmethod:\n  name: lora\n  r: 2\ndata:\n  task: mr\n{node}"
        )
        dev = {"accuracy": 0.78}
        result = {
            "record_version": 2,
            "status": "completed",
            "method": "lora",
            "task": "mr",
            "model": "minilm",
            "data_version": "vader-3.3.2/groups-v2",
            "primary_metric": "accuracy",
            "regression": False,
            "trainable_params": 83714,
            "adapter_params_final": None,
            "groups": [{"group": 0, "params": 82944, "methods": {}}],
            "final": {"dev": dev, "test": {"accuracy": 0.79 + seed / 1000}},
            "best": {"step": 10, "dev": dev},
            "meta": {},
            "git_commit": "0123456789abcdef",
            "steps": 265,
        }
        (run / "result.json").write_text(json.dumps(result))


def test_an_older_search_node_does_not_split_a_row(tmp_path):
    write_runs(tmp_path / "runs")
    runs = load([tmp_path / "runs"]).runs
    assert any(c.startswith("cfg.search") for c in runs.columns)  # the old node is read
    cells = build(runs)
    assert len(cells.index) == 1, list(cells.index)  # one configuration, one row
    assert cells.iloc[0]["mr"][0]["n"] == 3
