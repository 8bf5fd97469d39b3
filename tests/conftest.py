"""Shared fixtures and helpers: the real composed config shrunk to run in seconds on a tiny model,
tiny models and batches, the CLI in a subprocess, a throwaway PostgreSQL; the test tiers."""

from __future__ import annotations

import fnmatch
import os
import socket
import subprocess
import sys
from pathlib import Path

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
    "PostgreSQL (apt-get install postgresql)": [
        "tests/test_search.py::*postgresql*",
        "tests/test_storage.py::*postgresql*",
    ],
    "Chromium (apt-get install chromium)": ["tests/test_dashboard.py", "tests/test_dashboard_scale.py"],
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
        "tests/test_lora_variants.py",
    ],
    'gguf and accelerate (pip install -e ".[smollm2]", the slow step)': ["tests/test_smollm2.py"],
    'hydra-joblib-launcher, hydra-submitit-launcher (pip install -e ".[dev]")': ["tests/test_launchers.py"],
    "zsh (apt-get install zsh)": ["tests/test_cli_help.py::test_zsh_completes_a_search_key"],
}
_skipped_in_ci: list[tuple[str, str, str]] = []  # (node id, what it needs, pytest's reason)


def matches(nodeid: str, pattern: str) -> bool:
    """A node id against an entry of ``MUST_RUN_IN_CI`` / ``INTEGRATION``: the node id itself, a file
    or a test (all its tests or parameters), or an fnmatch pattern."""
    return (
        nodeid == pattern
        or nodeid.startswith((pattern + "::", pattern + "["))
        or fnmatch.fnmatchcase(nodeid, pattern)
    )


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def must_run_in_ci(nodeid: str) -> str | None:
    """What a must-run test needs (a ``MUST_RUN_IN_CI`` key), or None for any other test."""
    for need, patterns in MUST_RUN_IN_CI.items():
        if any(matches(nodeid, pattern) for pattern in patterns):
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
        f"{len(_skipped_in_ci)} must-run test(s) skipped with CI set: the session fails "
        "(install what they need)"
    )


# ---------------------------------------------------------------- tiers: a first signal in minutes
# ``integration``: whole programs and whole runs. Tests that start another process (the CLI in a
# fresh interpreter, search workers, torchrun, PostgreSQL, a browser, pdflatex, a pytest session),
# and tests that run a whole program in this one: a training run to its end or its resume, a
# search, sweep, benchmark or reproduce protocol, an HF Trainer. ``pytest -m "not integration"``
# is the fast first tier, the pieces (layers, every method on tiny models, allocator, schedules,
# data, configs, exports; one whole run, test_train's test_adalora_run_record, as a smoke test):
# about 2.5 minutes at one thread where the default tier takes about 10. Plain ``pytest`` runs
# both (README, .ci/run). Entries as in MUST_RUN_IN_CI: a file, a test or an fnmatch pattern; an
# entry naming no test of its collected file fails the collection, so a renamed test cannot drop
# out of the tier unnoticed.
INTEGRATION = [
    # another process
    "tests/test_api.py::test_the_api_works_from_a_folder_with_its_own_search_and_analysis",
    "tests/test_api.py::test_cli_and_a_search_run_from_a_folder_with_its_own_search_py",
    "tests/test_api.py::test_import_adabudget_is_cheap",
    "tests/test_callbacks_ddp.py",
    "tests/test_ci_skips.py::test_a_skipped_must_run_test_fails_the_session_under_ci",
    "tests/test_ci_skips.py::test_outside_ci_the_same_skips_pass",
    "tests/test_ci_skips.py::test_under_ci_other_skips_pass",
    "tests/test_cli.py",
    "tests/test_cli_help.py",
    "tests/test_credentials.py::test_a_reader_takes_the_password_from_pgpassword_and_says_so_when_refused",
    "tests/test_credentials.py::test_no_byte_of_the_password_is_written_printed_or_mirrored",
    "tests/test_dashboard.py",
    "tests/test_dashboard_scale.py::test_non_loopback_host_warns_and_refuses_foreign_names",
    "tests/test_dashboard_scale.py::test_large_study_renders_with_reduced_axes",
    "tests/test_dashboard_scale.py::test_plotly_js_is_served_once_and_cacheable",
    "tests/test_dashboard_scale.py::test_foreign_host_is_refused_and_security_headers_sent",
    "tests/test_dashboard_scale.py::test_bench_dashboard_prints_its_figures",
    "tests/test_devices.py::test_search_*",
    "tests/test_devices.py::test_reproduce_*",
    "tests/test_devices.py::test_sweeper_*",
    "tests/test_distributed.py",
    "tests/test_fetch.py::test_a_venv_without_pip_fetches_through_the_index",
    "tests/test_fetch.py::test_looking_for_pip_leaves_setuptools_importable",
    "tests/test_hub_access.py::test_unreachable_hub_*",
    "tests/test_launchers.py::test_*_multirun_lands_in_one_sweep_folder_and_counts_every_job",
    "tests/test_launchers.py::test_sweeper_launches_its_trials_through_submitit_local",
    "tests/test_launchers.py::test_slurm_preset_asks_for_gpus_time_and_usr1_before_the_limit",
    "tests/test_launchers.py::test_ctrl_c_stops_waiting_for_a_launched_batch",
    "tests/test_liveness.py",
    "tests/test_package.py::test_the_wheel_holds_license_types_configs_and_its_metadata",
    "tests/test_package.py::test_without_the_optional_extras_*",
    "tests/test_progress.py::test_training_off_a_terminal_prints_a_line_per_logging_step",
    "tests/test_records.py",
    "tests/test_search.py",
    "tests/test_slurm_search.py::test_search_through_submitit_local_jobs_*",
    "tests/test_slurm_search.py::test_wait_false_returns_and_the_same_command_resumes_after_the_jobs_died",
    "tests/test_slurm_search.py::test_sigusr1_to_a_job_stops_its_trial_requeues_it_and_ends_the_job",
    "tests/test_storage.py",
    "tests/test_sweeper.py",
    "tests/test_tables.py::test_latex_escapes_and_compiles",
    "tests/test_wandb.py",
    # a whole run, search, benchmark, protocol or Trainer in this process
    "tests/test_bench.py",
    "tests/test_bench_search.py",
    "tests/test_slurm_search.py::test_retraining_is_skipped_while_another_process_holds_its_claim",
    "tests/test_causal_lm.py::test_sft_end_to_end_records_generation_metrics",
    "tests/test_causal_lm.py::test_half_precision_on_the_cpu_trains_fp32_adapters",
    "tests/test_causal_lm.py::test_zero_shot_evaluates_the_base_model_without_a_step",
    "tests/test_causal_lm.py::test_eval_data_scores_on_another_task_with_its_own_scoring",
    "tests/test_causal_lm.py::test_a_search_its_table_and_dashboard_on_a_causal_lm_task",
    "tests/test_causal_lm.py::test_gradient_checkpointing_trains_every_method_to_the_same_weights",
    "tests/test_callbacks.py::test_trainer_*",
    "tests/test_callbacks.py::test_orth_penalty_*",
    "tests/test_callbacks.py::test_adalora_optimizer_groups_follow_the_trainer_scheduler",
    "tests/test_callbacks.py::test_no_shrink_under_ddp_trains",
    "tests/test_trainer_checkpoint.py",
    "tests/test_delta_lora.py::test_merge_and_adapter_reproduce_the_trained_model",
    "tests/test_delta_lora.py::test_resume_continues_exactly",
    "tests/test_delta_lora.py::test_update_ratio_zero_trains_as_lora",
    "tests/test_dylora.py::test_ranks_follow_the_stream_and_resume_samples_the_same",
    "tests/test_dylora.py::test_record_holds_the_rank_curve",
    "tests/test_final_phase.py",
    "tests/test_geolora.py::test_a_run_reaches_the_level_records_the_ranks_and_resumes_before_and_after_the_cut",
    "tests/test_geolora.py::test_a_run_stopped_mid_round_resumes_exactly",
    "tests/test_hybrid.py::test_train_s4_end_to_end_on_mr",
    "tests/test_hybrid.py::test_adalora_in_two_groups_shares_one_budget_and_merges",
    "tests/test_longlora.py::test_tiny_llama_trains_through_the_loop",
    "tests/test_peft_ref.py::test_peft_adalora_trains_in_our_loop",
    "tests/test_qlora.py::test_lora_and_adalora_train_on_nf4",
    "tests/test_qlora.py::test_an_interrupted_nf4_run_resumes_to_the_same_result",
    "tests/test_quantum_peft.py::test_trains_and_exports_through_the_loop",
    "tests/test_reproduce.py",
    "tests/test_sparse.py::test_run_*",
    "tests/test_sparse.py::test_rosa_warmup_run_resumes_inside_the_collection_window",
    "tests/test_sparse.py::test_rosa_restarts_on_the_mask_of_a_warmed_up_run",
    "tests/test_supernet.py",
    "tests/test_torn_files.py::test_a_torn_last_line_is_dropped_on_resume_and_kept_in_a_bak",
    "tests/test_torn_files.py::test_corruption_in_the_middle_of_a_record_is_refused_naming_the_line",
    "tests/test_torn_files.py::test_config_yaml_is_written_atomically_and_only_when_it_changes",
    "tests/test_torn_files.py::test_a_broken_last_checkpoint_falls_back_to_the_previous_one",
    "tests/test_torn_files.py::test_resuming_a_live_run_is_refused_and_a_dead_ones_lock_is_taken_over",
    "tests/test_torn_files.py::test_without_flock_the_holders_host_pid_and_start_time_decide",
    "tests/test_torn_files.py::test_the_hydra_sweeper_repairs_its_journal_when_it_resumes",
    "tests/test_train.py::test_[!a]*",  # every run but the smoke test (and the allocator's unit test)
    "tests/test_trial_failures.py",
]
# The tiers a ``-m`` expression keeps out when it names neither: ``pytest -m "not integration"``
# means "... and not slow and not gpu", as plain ``pytest`` does (pyproject's addopts).
KEPT_OUT = ("slow", "gpu")


def pytest_configure(config):
    expr = config.option.markexpr
    if expr and not any(marker in expr for marker in KEPT_OUT):
        config.option.markexpr = f"({expr}) and " + " and ".join(f"not {m}" for m in KEPT_OUT)


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the marker must be there when it does
def pytest_collection_modifyitems(config, items):
    modules = {}  # file -> its test module, for the files collected
    for item in items:
        if item.module is not None:
            modules.setdefault(item.nodeid.split("::")[0], item.module)
        if any(matches(item.nodeid, pattern) for pattern in INTEGRATION):
            item.add_marker(pytest.mark.integration)
    for pattern in INTEGRATION:
        file, _, name = pattern.partition("::")
        module = modules.get(file)
        if name and module is not None and not fnmatch.filter(dir(module), name.split("::")[0]):
            raise pytest.UsageError(f"tests/conftest.py INTEGRATION: {pattern} names no test of {file}")


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
_BUILT: dict = {}


def pristine(key, make):
    """``make()``'s model, built once per ``key`` and deep-copied after: the copy and the torch RNG
    state after it are those of a fresh build (the matrix builds thousands of tiny models; their
    weight init was half its time)."""
    import copy

    import torch

    try:
        hash(key)
    except TypeError:
        return make()
    if key not in _BUILT:
        model = make()
        _BUILT[key] = (copy.deepcopy(model), torch.get_rng_state())
        return model
    model, rng = _BUILT[key]
    torch.set_rng_state(rng)
    return copy.deepcopy(model)


def tiny_model(arch_name: str = "tiny-bert", seed: int = 0, layers: int | None = None, **config):
    """A random tiny HF classifier (``adabudget.models.tiny_config``), backbone frozen, in eval mode.

    ``layers``: the number of blocks (default 2); ``config``: other HF config fields to change
    (``num_attention_heads=4``).
    """
    key = ("classifier", arch_name, seed, layers, tuple(sorted(config.items())))
    return pristine(key, lambda: _build_tiny_model(arch_name, seed, layers, **config))


def _build_tiny_model(arch_name: str, seed: int, layers: int | None, **config):
    import torch
    from adabudget.models import tiny_config
    from adabudget.modules import freeze_backbone
    from transformers import AutoModelForSequenceClassification

    hf_config = tiny_config(arch_name, 2, False)
    if layers is not None:
        config["n_layer" if hasattr(hf_config, "n_layer") else "num_hidden_layers"] = layers
    for key, value in config.items():
        setattr(hf_config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(hf_config).eval()
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


# ---------------------------------------------------------------- a tiny causal-LM task
LM_WORDS = {
    "good": "positive",
    "great": "positive",
    "fine": "positive",
    "bad": "negative",
    "awful": "negative",
}


def write_lm_task(folder: Path, n: int = 96) -> Path:
    """A jsonl sentiment task in prompt -> completion form (``prompt`` / ``completion`` columns;
    adabudget carves the seeded dev and test): ``folder/sst.jsonl``."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sst.jsonl"
    keys = list(LM_WORDS)
    with path.open("w") as f:
        for i in range(n):
            word = keys[i % len(keys)]
            row = {
                "prompt": f"Review: a {word} film, take {i}\nSentiment:",
                "completion": f" {LM_WORDS[word]}",
            }
            f.write(json.dumps(row) + "\n")
    return path


# ---------------------------------------------------------------- the CLI in a fresh interpreter
CLI = [sys.executable, "-c", "from adabudget.cli import main; main()"]  # the console script's main


def cli_env(**extra: str) -> dict:
    """The environment of a CLI subprocess: this one's (hub and W&B offline), one torch thread
    unless ``OMP_NUM_THREADS`` says otherwise, plus ``extra``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def cli(
    args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``adabudget <args>`` in a fresh interpreter, its output captured (``env``: default ``cli_env()``)."""
    env = cli_env() if env is None else env
    return subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def search_here(capsys, *args: str) -> tuple[int, str, str]:
    """``adabudget search *args`` in this process: (exit code, stdout, stderr)."""
    from adabudget.cli import main

    code = 0
    try:
        main(["search", *args])
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def popen_cli(args: list[str], cwd: Path, env: dict | None = None, **popen) -> subprocess.Popen:
    """``adabudget <args>`` started in a fresh interpreter, stdout and stderr piped (``env``: default
    ``cli_env()``; ``popen``: more ``subprocess.Popen`` arguments, which win over those defaults:
    ``stdout=subprocess.DEVNULL``, ``start_new_session=True``)."""
    env = cli_env() if env is None else env
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen([*CLI, *args], cwd=cwd, env=env, **options)


# ---------------------------------------------------------------- network and PostgreSQL
def closed_port() -> int:
    """A local TCP port nothing listens on (bound for a moment, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server for the module (``tests/pg.py``); skipped without its binaries
    (which fails the session under CI for the tests in MUST_RUN_IN_CI)."""
    from pg import PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    with PostgresServer(bindir) as server:
        yield server
