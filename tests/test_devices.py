"""GPUs per worker (search/devices.py): the assignment as a table (device lists, worker counts,
GPUs per trial, packing), its refusals naming the field, and that the processes of
``adabudget search``, ``adabudget reproduce --workers`` and the sweeper's ``n_jobs`` pool really
start with their own ``CUDA_VISIBLE_DEVICES`` (each run's record says which).

This machine has no GPU: the process tests start the real CLI with the GPU list faked
(``FAKE_GPUS``: ``devices.visible_gpus`` answers three GPUs whose driver names are 4, 5, 6, as under
``CUDA_VISIBLE_DEVICES=4,5,6``); everything after that list is the code as users run it. The
``gpu``-marked test at the end runs on a real device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from adabudget.config import ConfigError
from adabudget.search import devices
from conftest import cli_env, search_here

# ---------------------------------------------------------------- the assignment, as a table
V4 = ["0", "1", "2", "3"]


@pytest.mark.parametrize(
    "visible, workers, per_trial, wanted, expected",
    [
        ([], 3, None, None, [None, None, None]),  # a CPU machine: nothing changes
        (V4, 4, None, None, [["0"], ["1"], ["2"], ["3"]]),
        (V4, 2, None, None, [["0"], ["1"]]),
        (V4, 2, 2, None, [["0", "1"], ["2", "3"]]),  # a trial that runs torchrun on 2 GPUs
        (V4, 1, 4, None, [["0", "1", "2", "3"]]),
        (V4, 8, "1/2", None, [["0"], ["1"], ["2"], ["3"], ["0"], ["1"], ["2"], ["3"]]),  # packed 2 per GPU
        (V4, 3, 0.5, None, [["0"], ["1"], ["2"]]),  # spread before packing
        (V4, 3, "1/3", [2], [["2"], ["2"], ["2"]]),
        (V4, 3, 0.333, [2], [["2"], ["2"], ["2"]]),  # 0.333 is 1/3
        (V4, 2, 1.0, "3,1", [["3"], ["1"]]),  # --gpus 3,1: in the order given
        # CUDA_VISIBLE_DEVICES=4,5,6,7 in the shell: index 1 is the driver's 5
        (["4", "5", "6", "7"], 2, 1, [1, 3], [["5"], ["7"]]),
        (["GPU-aa", "GPU-bb"], 1, 2, None, [["GPU-aa", "GPU-bb"]]),  # UUIDs pass through
    ],
)
def test_assignment(visible, workers, per_trial, wanted, expected):
    gpus = devices.assign(workers, per_trial, wanted, visible=visible)
    assert gpus == expected
    envs = [devices.worker_env(g) for g in gpus]
    if expected[0] is None:
        assert envs == [{}] * workers and devices.describe(gpus) == ""
    else:
        assert envs == [{"CUDA_VISIBLE_DEVICES": ",".join(g)} for g in expected]


@pytest.mark.parametrize(
    "visible, workers, per_trial, wanted, names, message",
    [
        # more GPUs per trial than visible
        (
            ["0", "1"],
            1,
            4,
            None,
            devices.SEARCH,
            r"search\.gpus_per_trial: 4 GPUs per trial, but 2 are visible",
        ),
        (V4, 1, 3, [0, 1], devices.SEARCH, r"search\.gpus_per_trial: 3 GPUs per trial, but 2 are given"),
        # a device index that does not exist
        (
            ["0", "1"],
            1,
            None,
            [0, 5],
            devices.SEARCH,
            r"search\.devices: device 5 does not exist: 2 GPU\(s\) visible, indices 0-1",
        ),
        ([], 1, None, [0], devices.SEARCH, r"search\.devices: device 0 does not exist: 0 GPU\(s\) visible"),
        ([], 2, "1", None, devices.SEARCH, r"search\.gpus_per_trial: 1 GPUs per trial, but 0 are visible"),
        # workers x gpus_per_trial beyond the devices: packing named as the fix
        (
            V4,
            8,
            None,
            None,
            devices.SEARCH,
            r"search\.workers: 8 workers x search\.gpus_per_trial=1 need 8 GPUs, 4 available; lower "
            r"search\.workers, or pack trials with search\.gpus_per_trial=1/2",
        ),
        (V4, 5, "1/2", [0, 1], devices.SEARCH, r"need 2\.5 GPUs, 2 available.*gpus_per_trial=1/3"),
        (
            V4,
            3,
            2,
            None,
            devices.SEARCH,
            r"search\.workers: 3 workers x search\.gpus_per_trial=2 need 6 GPUs",
        ),
        # the other callers' fields
        (
            ["0"],
            2,
            None,
            None,
            devices.REPRODUCE,
            r"--workers: 2 workers x --gpus-per-cell=1 .*--gpus-per-cell=1/2",
        ),
        (["0"], 1, None, "0,1", devices.REPRODUCE, r"--gpus: device 1 does not exist"),
        (
            ["0"],
            3,
            None,
            None,
            devices.SWEEPER,
            r"hydra\.sweeper\.n_jobs: 3 workers x hydra\.sweeper\.gpus_per_trial",
        ),
        # forms that are no GPU count or device list
        (
            V4,
            1,
            1.5,
            None,
            devices.SEARCH,
            r"search\.gpus_per_trial: 1\.5 is not a GPU count; give an integer",
        ),
        (V4, 1, "2/3", None, devices.SEARCH, r"search\.gpus_per_trial: '2/3' is not a GPU count"),
        (V4, 1, 0, None, devices.SEARCH, r"search\.gpus_per_trial: 0 is not a GPU count"),
        (V4, 1, -1, None, devices.SEARCH, r"search\.gpus_per_trial: -1 is not a GPU count"),
        (V4, 1, True, None, devices.SEARCH, r"search\.gpus_per_trial: True is not a GPU count"),
        (V4, 1, "two", None, devices.REPRODUCE, r"--gpus-per-cell: 'two' is not a GPU count"),
        (V4, 1, None, [0, 0], devices.SEARCH, r"search\.devices: \[0, 0\]: give distinct GPU indices"),
        (V4, 1, None, "a,b", devices.REPRODUCE, r"--gpus: 'a,b': give GPU indices as this process sees them"),
    ],
)
def test_refusals_name_the_field_and_the_fix(visible, workers, per_trial, wanted, names, message):
    with pytest.raises(ConfigError, match=message):
        devices.assign(workers, per_trial, wanted, names, visible=visible)


def test_visible_gpus_honour_cuda_visible_devices(monkeypatch):
    """The driver's names for the GPUs this process sees: as many as ``torch.cuda.device_count()``
    counts (it reads CUDA_VISIBLE_DEVICES itself, stopping at an entry that does not exist)."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.visible_gpus() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6, 3,99")
    assert devices.visible_gpus() == ["6", "3"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert devices.visible_gpus() == []


def test_environ_is_restored_and_the_one_in_process_worker_gets_its_gpus(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with devices.environ({"CUDA_VISIBLE_DEVICES": "3"}):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with devices.in_this_process(["2"], ["0", "1", "2"]):  # CUDA not initialised here (a CPU build)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    with devices.in_this_process(["0"], ["0", "1"]):  # what cuda:0 is anyway: left as it is
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with devices.in_this_process(None, []):
        assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_a_bad_form_is_refused_by_the_search_config():
    from adabudget.search.config import SearchConfig

    with pytest.raises(ConfigError, match=r"search\.gpus_per_trial: '3/4' is not a GPU count"):
        SearchConfig(gpus_per_trial="3/4").validate()
    with pytest.raises(ConfigError, match=r"search\.devices: \[1, -1\]: give distinct GPU indices >= 0"):
        SearchConfig(devices=[1, -1]).validate()
    SearchConfig(devices=[0, 1], gpus_per_trial="1/2", workers=4).validate()  # the GPUs: at the start


# ---------------------------------------------------------------- the processes receive them
# the CLI with three fake GPUs, named by the driver 4, 5, 6 (as under CUDA_VISIBLE_DEVICES=4,5,6)
FAKE_GPUS = [
    sys.executable,
    "-c",
    "import adabudget.search.devices as d; d.visible_gpus = lambda: ['4', '5', '6']; "
    "from adabudget.cli import main; main()",
]
TINY = ["model=tiny-bert", "debug=fast", "train.num_threads=1"]


def fake_gpu_cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = cli_env() if env is None else env
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run([*FAKE_GPUS, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def record_of(run_dir) -> dict:
    return json.loads((Path(run_dir) / "result.json").read_text())


def test_search_workers_start_with_their_own_gpus(tmp_path):
    """``search.workers=2 search.devices=[2,0]``: worker 0 on the driver's GPU 6, worker 1 on 4;
    every trial's record says the GPUs of the worker that ran it (its pid in the trial)."""
    runs = tmp_path / "runs"
    args = ["search", *TINY, "method=lora", "search.space=lr", "search.enqueue=[]", "search.threads=1"]
    args += ["train.max_steps=20", "search.n_trials=4", "search.workers=2", "search.devices=[2,0]"]
    proc = fake_gpu_cli([*args, f"runs_root={runs}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GPUs per worker: 0: 6, 1: 4" in proc.stdout
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(runs / "search" / "lr-mr" / "journal.log"))
    )
    trials = optuna.load_study(study_name="lr-mr", storage=storage).get_trials()
    by_worker: dict[int, set] = {}
    for t in trials:
        record = record_of(t.user_attrs["run_dir"])
        assert record["device"] == "cpu"  # the fake GPUs are only names: training stays on the CPU
        by_worker.setdefault(t.user_attrs["worker"]["pid"], set()).add(record["cuda_visible_devices"])
    assert sorted(map(sorted, by_worker.values())) == [["4"], ["6"]]  # one GPU per worker, its own


def test_the_search_command_refuses_more_workers_than_gpus_and_a_missing_device(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(devices, "visible_gpus", lambda: ["4", "5", "6"])
    args = ["search", *TINY, "search.space=lr", f"runs_root={tmp_path / 'runs'}"]
    code, _, err = search_here(capsys, *args[1:], "search.workers=4")
    assert code == 2
    assert (
        "config error: search.workers: 4 workers x search.gpus_per_trial=1 need 4 GPUs, 3 available; "
        "lower search.workers, or pack trials with search.gpus_per_trial=1/2" in err
    )
    code, _, err = search_here(capsys, *args[1:], "search.devices=[3]")
    assert code == 2
    assert "config error: search.devices: device 3 does not exist: 3 GPU(s) visible, indices 0-2" in err


REPRODUCE = """name: tiny
seeds: [42]
base: [model=tiny-bert, debug=fast, train.max_steps=8, train.num_threads=1, method=lora, method.r=2]
tasks:
  mr: [data=mr]
rows:
  - {label: "lr 1e-3", overrides: [train.lr=1e-3]}
  - {label: "lr 3e-3", overrides: [train.lr=3e-3]}
"""


def test_reproduce_workers_start_with_their_own_gpus(tmp_path):
    """``reproduce --workers 2 --gpus 1,2``: the two cells ran on the driver's GPUs 5 and 6; packing
    both on one GPU is asked for with ``--gpus-per-cell 1/2``, refused without it."""
    proto = tmp_path / "tiny.yaml"
    proto.write_text(REPRODUCE)
    base = ["reproduce", str(proto), "--workers", "2", "--runs-root", str(tmp_path / "runs")]
    refused = fake_gpu_cli([*base, "--gpus", "1"], tmp_path)
    assert refused.returncode == 2
    assert "config error: --workers: 2 workers x --gpus-per-cell=1 need 2 GPUs, 1 available" in refused.stderr
    proc = fake_gpu_cli([*base, "--gpus", "1,2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GPUs per worker: 0: 5, 1: 6" in proc.stdout
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "reproduce").rglob("result.json")]
    assert len(records) == 2 and {r["cuda_visible_devices"] for r in records} == {"5", "6"}


def test_sweeper_pool_slots_keep_their_gpus(tmp_path):
    """``hydra.sweeper.n_jobs=2 hydra.sweeper.devices=[2,0]``: the first two jobs start together on
    the driver's GPUs 6 and 4; the third takes the slot (and the GPU) of the job that ended."""
    from test_sweeper import SWEEP, journal_study, only, sweep_env

    args = [*SWEEP, *TINY, f"runs_root={tmp_path}", "hydra.sweeper.sampler=grid", "hydra.sweeper.n_jobs=2"]
    args += ["hydra.sweeper.devices=[2,0]", "method=lora", "train.lr=choice(1e-3,2e-3,3e-3)"]
    proc = fake_gpu_cli(args, tmp_path, sweep_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GPUs per job slot: 0: 6, 1: 4" in proc.stdout
    record = json.loads(only((tmp_path / "default" / "sweeps").glob("*/sweep.json")).read_text())
    trials = journal_study(Path(record["storage"]), record["study"]).trials
    seen = [record_of(t.user_attrs["run_dir"])["cuda_visible_devices"] for t in trials]
    assert len(seen) == 3 and set(seen[:2]) == {"6", "4"} and seen[2] in ("6", "4")


# ---------------------------------------------------------------- on a real GPU
@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_search_workers_on_real_gpus(tmp_path):
    """Two search workers on the GPUs of this machine: one each where there are two or more, both
    packed on one (``gpus_per_trial=1/2``) where there is one. Each trial trained on the first GPU
    of its own process (``train.device=auto``: ``cuda``), and its record names the GPU its worker
    was given."""
    import torch

    visible = devices.visible_gpus()
    assert len(visible) == torch.cuda.device_count() >= 1
    packing = ["search.gpus_per_trial=1/2"] if len(visible) == 1 else []
    runs = tmp_path / "runs"
    args = ["search", *TINY, "method=lora", "search.space=lr", "search.enqueue=[]", "search.threads=1"]
    args += ["train.max_steps=20", "search.n_trials=4", "search.workers=2", *packing, f"runs_root={runs}"]
    env = cli_env()  # this process's CUDA_VISIBLE_DEVICES, if any: visible_gpus() above saw it too
    proc = subprocess.run(
        [sys.executable, "-c", "from adabudget.cli import main; main()", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(runs / "search" / "lr-mr" / "journal.log"))
    )
    trials = optuna.load_study(study_name="lr-mr", storage=storage).get_trials()
    expected = {visible[0]} if len(visible) == 1 else {visible[0], visible[1]}
    seen = set()
    for t in trials:
        record = record_of(t.user_attrs["run_dir"])
        assert record["device"] == "cuda" and record["status"] == "completed"  # cuda:0 of its own set
        seen.add(record["cuda_visible_devices"])
    assert seen == expected
    refused = subprocess.run(
        [
            sys.executable,
            "-c",
            "from adabudget.cli import main; main()",
            *args,
            f"search.devices=[{len(visible)}]",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (
        refused.returncode == 2 and f"search.devices: device {len(visible)} does not exist" in refused.stderr
    )
