"""analysis.records reads what budget and search write: real run folders of every status (made
here with tiny models, one of them killed with SIGKILL), a real study, and old or unknown
record versions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from adabudget.analysis.records import RecordError, load, read_result, run_dirs, trials
from adabudget.compose import compose
from adabudget.training import train
from conftest import TINY_ADALORA, TINY_RUN


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """One run of each status under one folder."""
    root = tmp_path_factory.mktemp("zoo")
    base = TINY_RUN + TINY_ADALORA + [f"runs_root={root}"]
    train(compose(base + ["run_name=completed"]))
    train(
        compose(base + ["run_name=failed", "train.lr=1e30", "train.max_grad_norm=null", "train.log_every=1"])
    )
    train(compose(base + ["run_name=pruned"]), on_eval=lambda step, metrics: True)
    train(compose(base + ["run_name=interrupted", "train.stop_after_step=5"]))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-c",
        "from adabudget.cli import main; main()",
        "train",
        *base,
        "run_name=killed",
        "train.max_steps=5000",
        "train.log_every=1",
        "train.eval_every=0",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((root / "killed").rglob("metrics.jsonl")):
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return root


def test_status_filter_and_every_row_knows_its_folder(zoo):
    assert set(load([zoo]).runs["status"]) == {"completed"}
    everything = load([zoo], status=None).runs
    assert sorted(everything["status"]) == ["completed", "failed", "interrupted", "pruned", "running"]
    for _, row in everything.iterrows():
        assert (Path(row["run_dir"]) / "result.json").exists()
    killed = everything[everything["status"] == "running"].iloc[0]
    assert not killed["alive"]  # its pid is gone
    assert set(load([zoo], status=["failed", "pruned"]).runs["status"]) == {"failed", "pruned"}
    with pytest.raises(RecordError, match="status"):
        load([zoo], status="bogus")


def test_tables_of_a_completed_run(zoo):
    rec = load([zoo / "completed"])
    run = rec.runs.iloc[0]
    assert run["method"] == "adalora" and run["dev.accuracy"] > 0 and run["cfg.train.seed"] == 42
    assert run["record_version"] == 2 and run["primary_metric"] == "accuracy"
    ranks = rec.ranks
    assert set(ranks["role"]) == {"q", "k", "v", "o", "ffn_in", "ffn_out"} and set(ranks["layer"]) == {0, 1}
    final = ranks[ranks["final"]]
    assert final["rank"].sum() == 24  # b(T)
    assert ranks[ranks["step"] == 0]["rank"].sum() == 48  # b(0), the step-0 row
    scores = rec.scores
    assert len(scores) and scores.groupby("step")["kept"].sum().max() <= 48
    assert {"train", "dev", "test"} <= set(rec.metrics["split"])
    result = json.loads(next((zoo / "completed").glob("*/result.json")).read_text())
    assert run["final_params"] == result["adapter_params_final"]  # AdaLoRA's kept triplets, no head
    assert result["groups"][0]["methods"]["adalora"]["ranks_move"] is True  # what analysis reads


def test_final_params_follow_the_groups_ranks_move_flag_not_a_list_of_names(tmp_path):
    """A record's group says whether its method's ranks move (the registry's ``ranks_move``), so a
    method analysis has never heard of reports its kept components; older records without the
    flag fall back to the four methods that had moving ranks then."""

    def write(name: str, methods: dict, kept: int | None = 300) -> None:
        run = tmp_path / name
        run.mkdir()
        params = sum(m["params"] for m in methods.values())
        (run / "result.json").write_text(
            json.dumps(
                {
                    "record_version": 2,
                    "status": "completed",
                    "method": "hybrid",
                    "task": "mr",
                    "total_steps": 10,
                    "trainable_params": params + 50,
                    "adapter_params_final": kept,
                    "groups": [{"group": 0, "params": params, "methods": methods}],
                }
            )
        )

    write("new_method", {"newlora": {"params": 1000, "ranks_move": True}, "bitfit": {"params": 40}})
    write("old_record", {"sora": {"params": 1000}, "bitfit": {"params": 40}})
    write("fixed_rank", {"lora": {"params": 1000}, "bitfit": {"params": 40}}, kept=None)
    final = load([tmp_path]).runs.set_index("run_dir")["final_params"]
    assert {Path(k).name: v for k, v in final.items()} == {
        "new_method": 340,
        "old_record": 340,
        "fixed_rank": 1040,
    }


def test_versions(tmp_path, zoo):
    old = tmp_path / "old"
    old.mkdir()
    (old / "result.json").write_text(
        json.dumps(
            {  # what the first record version wrote: no record_version, no modules
                "status": "completed",
                "method": "adalora",
                "task": "mr",
                "final": {"dev": {"accuracy": 0.7}},
                "ranks": {"bert.encoder.layer.3.attention.self.query": 5},
            }
        )
    )
    (old / "ranks.jsonl").write_text(
        json.dumps(
            {
                "step": 10,
                "budget": 5,
                "kept": 5,
                "final": True,
                "ranks": {"bert.encoder.layer.3.attention.self.query": 5},
            }
        )
        + "\n"
    )
    rec = load([old])
    assert rec.runs.iloc[0]["record_version"] == 1
    assert rec.ranks.iloc[0][["layer", "role"]].tolist() == [3, "q"]
    new = tmp_path / "new"
    new.mkdir()
    (new / "result.json").write_text(json.dumps({"record_version": 99, "status": "completed"}))
    with pytest.raises(RecordError, match="record_version 99"):
        read_result(new)
    with pytest.raises(RecordError, match="no such"):
        run_dirs([tmp_path / "nowhere"])


def test_a_study_reads_the_same_from_its_folder_and_its_storage(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-c",
        "from adabudget.cli import main; main()",
        "search",
        "model=tiny-bert",
        "debug=fast",
        "train.max_steps=6",
        "train.num_threads=1",
        "search.space=s4",
        "search.n_trials=3",
        "search.budget=3000",
        f"runs_root={tmp_path}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = tmp_path / "search" / "s4-mr"
    table = trials(study)
    trained = table[table["state"] == "complete"]
    assert len(trained) >= 3 and trained["run_dir"].notna().all()
    assert "dev.accuracy" in table and table["trainable_params"].notna().any()
    from_study = load([study]).runs.set_index("run_dir")
    from_runs = load(list(trained["run_dir"])).runs.set_index("run_dir")
    assert set(from_runs.index) <= set(from_study.index)
    cols = ["dev.accuracy", "final_params", "meta.trial"]
    assert from_study.loc[from_runs.index, cols].equals(from_runs[cols])
    same = trials(study / "journal.log", "s4-mr")
    assert same["number"].tolist() == table["number"].tolist()


def test_the_recorded_commit_is_the_one_the_process_started_with(tmp_path):
    """A worker that runs many cells ran the code it imported: a commit made meanwhile in the
    checkout must not be named in its later records."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    code = (Path(__file__).resolve().parents[1] / "budget" / "log.py").read_text()
    (repo / "pkg" / "log.py").write_text(code)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    script = (
        "import importlib.util, subprocess, sys\n"
        f"spec = importlib.util.spec_from_file_location('lg', {str(repo / 'pkg' / 'log.py')!r})\n"
        "lg = importlib.util.module_from_spec(spec); spec.loader.exec_module(lg)\n"
        "first = lg.git_commit()\n"
        f"subprocess.run({git!r} + ['commit', '-q', '--allow-empty', '-m', 'two'], check=True)\n"
        "print(first == lg.git_commit(), first)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    head_now = subprocess.run([*git, "rev-parse", "HEAD~1"], capture_output=True, text=True).stdout.strip()
    assert out.split() == ["True", head_now]
