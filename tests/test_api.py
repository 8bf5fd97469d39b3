"""``import adabudget``: the public API (train, load, records, dashboard, table) and the installed
import names, used from a folder that holds its own ``search.py``, ``analysis/`` and ``budget/``
(names a researcher's project may well have), as a notebook or script would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TINY = ["model=tiny-bert", "debug=fast", "method.init_r=4", "method.target_r=2"]


def users_folder(tmp_path: Path) -> Path:
    """A working directory whose own modules would shadow generic top-level names."""
    work = tmp_path / "project"
    (work / "analysis").mkdir(parents=True)
    (work / "budget").mkdir()
    (work / "search.py").write_text("raise ImportError('the user search.py was imported')\n")
    (work / "analysis" / "__init__.py").write_text("raise ImportError('the user analysis/ was imported')\n")
    (work / "budget" / "__init__.py").write_text("raise ImportError('the user budget/ was imported')\n")
    return work


def run_python(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH="")
    # sys.path[0] is the working directory (python -c), as in a notebook started there
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def test_the_api_works_from_a_folder_with_its_own_search_and_analysis(tmp_path):
    work = users_folder(tmp_path)
    runs = tmp_path / "runs"
    code = textwrap.dedent(f"""
        import json, sys
        import adabudget
        import torch

        torch.set_num_threads(1)
        result = adabudget.train(*{TINY!r}, runs_root={str(runs)!r}, method__target_r=2, train__num_threads=2)
        assert result["status"] == "completed", result
        assert torch.get_num_threads() == 1  # train.num_threads held for the call only
        model = adabudget.load(result["run_dir"])
        import torch
        from omegaconf import OmegaConf
        from adabudget.compose import resolve
        from adabudget.data import load_task, load_tokenizer
        from adabudget.evaluate import evaluate
        run = resolve(OmegaConf.load(result["run_dir"] + "/config.yaml"))
        tokenizer = load_tokenizer(run.model.name)
        task = load_task(run.data, tokenizer)
        dev = evaluate(model, task.dev, task, 16, tokenizer.pad_token_id, torch.device("cpu"))
        assert dev == result["final"]["dev"], (dev, result["final"]["dev"])  # the trained model, exactly
        records = adabudget.records({str(runs)!r})
        assert len(records.runs) == 1
        text = adabudget.table({str(runs)!r})
        page = adabudget.dashboard({str(runs)!r}, out={str(tmp_path / "page.html")!r})
        print(json.dumps({{"table": text, "page": str(page), "modules": sorted(m for m in sys.modules
              if m.split(".")[0] in ("search", "analysis", "budget"))}}))
    """)
    proc = run_python(code, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["modules"] == [], "a generic top-level name was imported"
    assert "| method |" in out["table"] and Path(out["page"]).stat().st_size > 100_000


def test_cli_and_a_search_run_from_a_folder_with_its_own_search_py(tmp_path):
    work = users_folder(tmp_path)
    adabudget = shutil.which("adabudget", path=str(Path(sys.executable).parent)) or "adabudget"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    args = [
        adabudget,
        "search",
        "model=tiny-bert",
        "debug=fast",
        "search.space=lr",
        "search.n_trials=1",
        "search.enqueue=[]",
        f"runs_root={tmp_path / 'runs'}",
    ]
    proc = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "runs" / "search" / "lr-mr" / "search.json").read_text())
    assert record["finished"] == 1


@pytest.mark.parametrize(
    "args, knobs, expected",
    [
        (("method=lora",), {"method.r": 8}, ["method=lora", "method.r=8"]),
        (
            (),
            {"method": "s4", "train__lr": 1e-3, "train.progress": False},
            ["method=s4", "train.lr=0.001", "train.progress=false"],
        ),
        (
            (),
            {"method.target_modules": ["query", "value"], "run_dir": None},
            ["method.target_modules=[query,value]", "run_dir=null"],
        ),
    ],
)
def test_keywords_become_overrides(args, knobs, expected):
    from adabudget.api import overrides_of

    assert overrides_of(args, knobs) == expected


def test_import_adabudget_is_cheap():
    """The API is there on import, and nothing heavy is loaded until a function is called."""
    proc = run_python(
        "import sys, adabudget; print(callable(adabudget.train), 'torch' in sys.modules)", Path("/")
    )
    assert proc.stdout.split() == ["True", "False"], proc.stderr
