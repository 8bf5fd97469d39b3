"""``prepare_hub_access``: a hub model name on a machine that cannot reach the hub fails in
seconds with the fix, or loads from the local HF cache, instead of ~25 s of retries per file.

The two end-to-end cases run in a fresh interpreter with ``HF_ENDPOINT`` on a closed local
port and ``HF_HUB_OFFLINE`` unset (the test session sets it), because offline mode, once
switched on, holds for the whole process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import adabudget.hub
import pytest
from adabudget.config import ConfigError
from adabudget.data import load_tokenizer
from adabudget.hub import hub_reachable, prepare_hub_access
from adabudget.models import load_model, tiny_config
from conftest import closed_port
from huggingface_hub import constants

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")  # the check would go to a proxy


@pytest.fixture
def listening():
    """A local port that accepts connections (a stand-in for a reachable hub or proxy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def run_offline(code: str, hf_home: Path) -> dict:
    """Run ``code`` in a fresh interpreter whose hub is a closed port; return its last printed JSON."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS and k.lower() not in PROXY_VARS}
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}",
        HF_HOME=str(hf_home),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=hf_home.parent, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_unreachable_hub_uncached_model_fails_fast_with_the_fix(tmp_path):
    code = """
import json, time
from adabudget.config import ConfigError, ModelConfig
from adabudget.models import load_model
start = time.perf_counter()
try:
    load_model(ModelConfig(name="bert-base-uncased"), 2, False)
    error = None
except ConfigError as err:
    error = str(err)
print(json.dumps({"error": error, "seconds": time.perf_counter() - start}))
"""
    out = run_offline(code, tmp_path / "hf")
    assert out["seconds"] < 5, out  # transformers alone spends ~25 s retrying the config
    msg = out["error"]
    assert msg.startswith("model.name=bert-base-uncased: ")
    assert "HF hub, which is unreachable from here (http://127.0.0.1:" in msg
    assert "not in the local HF cache" in msg
    assert "model=minilm" in msg and "model.name=/path/to/model" in msg and "HF_HUB_OFFLINE=1" in msg


def write_hub_cache(hub: Path, repo_id: str) -> None:
    """A model in the HF hub cache layout, as a download leaves it: refs/main -> snapshots/<commit>/."""
    from transformers import AutoModelForSequenceClassification

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    AutoModelForSequenceClassification.from_config(tiny_config("tiny-bert", 2, False)).save_pretrained(
        snapshot
    )
    load_tokenizer("minilm").save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_unreachable_hub_cached_model_loads_offline(tmp_path):
    write_hub_cache(tmp_path / "hf" / "hub", "adabudget-test/tiny-bert")
    code = """
import json, os, time
from adabudget.config import ModelConfig
from adabudget.data import load_tokenizer
from adabudget.hub import prepare_hub_access
from adabudget.models import load_model
name = "adabudget-test/tiny-bert"
start = time.perf_counter()
prepare_hub_access(name)
check = time.perf_counter() - start
tokenizer = load_tokenizer(name)
model = load_model(ModelConfig(name=name), 2, False)
print(json.dumps({
    "offline": os.environ.get("HF_HUB_OFFLINE"),
    "check_seconds": check,
    "load_seconds": time.perf_counter() - start - check,
    "layers": model.config.num_hidden_layers,
    "ids": tokenizer("hello world")["input_ids"],
}))
"""
    out = run_offline(code, tmp_path / "hf")
    assert out["offline"] == "1"
    # Offline mode reads the cache without a single request: hub retries would cost ~25 s
    # per file (the load itself takes ~3 s here, mostly transformers' lazy imports).
    assert out["check_seconds"] < 1 and out["load_seconds"] < 15, out
    assert out["layers"] == 2 and out["ids"] == [101, 7592, 2088, 102]


@pytest.fixture
def online_mode(monkeypatch):
    """This process as if HF_HUB_OFFLINE were unset (the test session sets it), with no proxy."""
    for key in OFFLINE_VARS + PROXY_VARS + tuple(k.upper() for k in PROXY_VARS):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_reachable_hub_changes_nothing(online_mode, monkeypatch, listening):
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{listening}")
    prepare_hub_access("someone/some-model")
    assert "HF_HUB_OFFLINE" not in os.environ and not constants.HF_HUB_OFFLINE


def test_no_check_for_packaged_tiny_local_or_offline(online_mode, monkeypatch, tmp_path):
    def no_check(*args, **kwargs):
        raise AssertionError("the hub was checked")

    monkeypatch.setattr(adabudget.hub, "hub_reachable", no_check)
    for name in ("minilm", "smollm2", "tiny-llama", str(tmp_path)):
        prepare_hub_access(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prepare_hub_access("someone/some-model")


def test_check_goes_through_the_configured_proxy(online_mode, monkeypatch, listening):
    unreachable = "https://hub.invalid"  # .invalid never resolves (RFC 2606)
    assert not hub_reachable(unreachable, timeout=1)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{listening}")
    assert hub_reachable(unreachable, timeout=1)
    monkeypatch.setenv("NO_PROXY", "hub.invalid")
    assert not hub_reachable(unreachable, timeout=1)


def test_load_model_refuses_unreachable_hub_id(online_mode, monkeypatch, tmp_path):
    # The same check guards load_model for callers that skip prepare_hub_access.
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    from adabudget.config import ModelConfig

    with pytest.raises(ConfigError, match="model.name=someone/some-model: .* unreachable"):
        load_model(ModelConfig(name="someone/some-model"), 2, False)
