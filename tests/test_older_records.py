"""Run folders written by older versions keep working: their ``config.yaml`` may hold top-level
keys a run config no longer has (``adabudget.compose.RETIRED_KEYS``: ``search``, the supernet's
settings before they moved to its ``supernet.yaml``); resume and load read it without them.
(The supernet's own older folders: tests/test_supernet.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

pytestmark = pytest.mark.integration  # a training and its resume

OLD_SEARCH_NODE = {"budget": 6000, "budget_percent": None, "supernet": {"lora": [0, 2, 4, 8]}}


def with_search_node(folder: Path) -> None:
    """Make ``folder``'s config.yaml as an older version wrote it: with a ``search`` node."""
    saved = OmegaConf.load(folder / "config.yaml")
    saved.search = OLD_SEARCH_NODE
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(saved))


def test_an_older_run_folder_with_a_search_node_resumes_and_loads(compose_run):
    from adabudget.api import load
    from adabudget.compose import resolve, resume_config, saved_config
    from adabudget.training import train

    first = train(
        compose_run("run_name=old", "train.max_steps=4", "train.stop_after_step=2", "train.eval_every=0")
    )
    assert first["status"] == "interrupted"
    folder = Path(first["run_dir"])
    with_search_node(folder)
    assert "search" not in saved_config(folder)
    assert resolve(saved_config(folder)).train.max_steps == 4
    result = train(resume_config(folder))
    assert result["status"] == "completed" and result["steps"] == 4
    assert not OmegaConf.load(folder / "config.yaml").get("search")  # rewritten without it
    with_search_node(folder)
    model = load(folder)
    assert not model.training
