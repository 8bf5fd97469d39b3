"""Shared fixtures: the real composed config, shrunk to run in seconds on a tiny model."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A tiny real run: 2-layer random BERT on 128 real movie-review sentences, 24 steps.
TINY_RUN = [
    "model=tiny-bert",
    "data.max_train_samples=128",
    "data.max_eval_samples=64",
    "train.max_steps=24",
    "train.batch_size=8",
    "train.eval_every=12",
    "train.log_every=4",
    "train.progress=false",
    "train.lr=5e-3",
]
# AdaLoRA shrunk alike: 12 matrices, init_r 4 -> average rank 2 (b(0) = 48, b(T) = 24).
TINY_ADALORA = ["method.init_r=4", "method.target_r=2", "method.mask_interval=2"]


# ---------------------------------------------------------------- CI: no green by skipping
# Tests that skip when a system package or an extra is missing. Under CI (the CI variable set,
# as .ci/run and every CI service do) such a skip fails the session: a machine that lacks
# PostgreSQL, Chromium, pdflatex or peft must not pass CI by skipping what needs them.
# Entries are node ids, a file (all its tests, and its collection) or an fnmatch pattern.
MUST_RUN_IN_CI = {
    "PostgreSQL (apt-get install postgresql)": ["tests/test_search.py::*postgresql*"],
    "Chromium (apt-get install chromium)": ["tests/test_dashboard.py"],
    "pdflatex (apt-get install texlive-latex-base texlive-latex-recommended)": [
        "tests/test_tables.py::test_latex_escapes_and_compiles"
    ],
    'peft, the parity reference (pip install -e ".[dev]")': [
        "tests/test_peft_ref.py",
        "tests/test_export.py",
        "tests/test_adalora_layer.py",
        "tests/test_allocator.py",
        "tests/test_delta_lora.py",
        "tests/test_dylora.py",
        "tests/test_bench.py",
    ],
    'gguf and accelerate (pip install -e ".[smollm2]", the slow step)': ["tests/test_smollm2.py"],
}
_skipped_in_ci: list[tuple[str, str, str]] = []  # (node id, what it needs, pytest's reason)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def must_run_in_ci(nodeid: str) -> str | None:
    """What a must-run test needs (a ``MUST_RUN_IN_CI`` key), or None for any other test."""
    import fnmatch

    for need, patterns in MUST_RUN_IN_CI.items():
        for pattern in patterns:
            if nodeid == pattern or nodeid.startswith(pattern + "::") or fnmatch.fnmatchcase(nodeid, pattern):
                return need
    return None


def _note_skip(report) -> None:
    if not (in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    need = must_run_in_ci(report.nodeid)
    if need is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped_in_ci.append((report.nodeid, need, reason))


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):
    _note_skip(report)  # a module-level importorskip skips the whole file at collection


def pytest_sessionfinish(session, exitstatus):
    if _skipped_in_ci and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if not _skipped_in_ci:
        return
    terminalreporter.section("skipped tests that must run in CI", sep="=", red=True, bold=True)
    for nodeid, need, reason in _skipped_in_ci:
        terminalreporter.write_line(f"{nodeid}: needs {need}; skipped: {reason}")
    terminalreporter.write_line(
        f"{len(_skipped_in_ci)} must-run test(s) skipped with CI set: the session fails (install what they need)"
    )


@pytest.fixture
def compose_run(tmp_path):
    """compose_run(*overrides) -> the composed Hydra config of a tiny run under tmp_path."""
    from adabudget.compose import compose

    def _compose(*overrides: str, tiny: bool = True):
        base = (TINY_RUN if tiny else []) + [f"runs_root={tmp_path / 'runs'}"]
        if tiny and not any(o.startswith("method=") for o in overrides):
            base += TINY_ADALORA
        return compose(base + list(overrides))

    return _compose


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run fastest on one thread (and a loaded 2-core machine stalls on two)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- a tiny model and batch, no data
def tiny_model(arch_name: str = "tiny-bert", seed: int = 0):
    """A random tiny HF classifier (``adabudget.models.tiny_config``), backbone frozen, in eval mode."""
    import torch
    from adabudget.models import tiny_config
    from adabudget.modules import freeze_backbone
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(arch_name, 2, False)).eval()
    freeze_backbone(model, train_head=False)
    return model


def tiny_batch() -> dict:
    """Four fixed sequences of 9 token ids and their labels."""
    import torch

    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(5, 1000, (4, 9), generator=g), "labels": torch.tensor([0, 1, 1, 0])}


def tiny_logits(model):
    import torch

    with torch.no_grad():
        return model(input_ids=tiny_batch()["input_ids"]).logits
