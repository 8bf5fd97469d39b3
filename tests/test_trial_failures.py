"""One bad trial never ends a search (``search.workers.run_trial``): any exception inside a trial
is a failed trial with its error recorded, the search goes on to exactly ``n_trials`` trained
ones; only ``MAX_CONSECUTIVE_FAILURES`` in a row end it, naming the errors; a stop and the search's
own refusals still end it at once; a trial failed by mistake while it trained finishes without a
crash. The failures are injected into the real ``adabudget.training.train`` (a wrapper that raises for
chosen calls and trains for the others); everything else is the real search on tiny-bert.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from conftest import search_here
from optuna.trial import TrialState

TINY = ["model=tiny-bert", "debug=fast", "train.max_steps=4", "train.num_threads=1", "search.threads=1"]
LR_STUDY = [*TINY, "method=lora", "search.space=lr", "search.enqueue=[]"]


def inject(monkeypatch, failures: dict):
    """``adabudget.training.train`` raising ``failures[n]`` on its n-th call (from 1), training otherwise."""
    import adabudget.training

    real, calls = adabudget.training.train, []

    def train(cfg, on_eval=None):
        calls.append(cfg["meta"]["trial"])
        if len(calls) in failures:
            raise failures[len(calls)]
        return real(cfg, on_eval=on_eval)

    monkeypatch.setattr(adabudget.training, "train", train)
    return calls


def stored(root: Path, study: str) -> list:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(root / "journal.log")))
    return optuna.load_study(study_name=study, storage=storage).get_trials()


def trained(t) -> bool:
    return t.state == TrialState.PRUNED or (
        t.state == TrialState.COMPLETE
        and "infeasible" not in t.user_attrs
        and "duplicate_of" not in t.user_attrs
    )


def test_trials_that_raise_are_failed_trials_and_the_search_goes_on(tmp_path, capsys, monkeypatch):
    """Calls 1, 3 and 4 of ``train`` raise (CUDA out of memory, a ConfigError of the sampled
    configuration, an OSError on export): those trials are FAIL with their errors in the user
    attributes, search.json and the printed lines, and the study still ends with exactly 3
    trained trials (two failures in a row are below the limit)."""
    from adabudget.config import ConfigError

    failures = {
        1: RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        3: ConfigError("method.r: 0 is not a rank; use r >= 1"),
        4: OSError(28, "No space left on device"),
    }
    calls = inject(monkeypatch, failures)
    code, out, err = search_here(capsys, *LR_STUDY, "search.n_trials=3", f"runs_root={tmp_path}")
    assert code == 0, err[-3000:]
    root = tmp_path / "search" / "lr-mr"
    trials = stored(root, "lr-mr")
    assert len(calls) == 6 and [t.number for t in trials] == calls
    assert [t.state for t in trials] == [
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    assert sum(trained(t) for t in trials) == 3
    errors = {
        0: "RuntimeError: CUDA out of memory",
        2: "ConfigError: method.r: 0 is not a rank",
        3: "OSError: [Errno 28] No space left on device",
    }
    rows = {r["number"]: r for r in json.loads((root / "search.json").read_text())["trials"]}
    for number, error in errors.items():
        assert trials[number].user_attrs["error"].startswith(error)
        assert rows[number]["state"] == "fail" and rows[number]["error"].startswith(error)
        assert any(
            line.startswith(f"trial {number:>3} fail") and error in line for line in out.splitlines()
        ), out
    assert json.loads((root / "search.json").read_text())["finished"] == 3
    assert "Traceback" in err and "CUDA out of memory" in err  # the failure's traceback is on stderr


def test_failures_in_a_row_end_the_search_naming_the_last_errors(tmp_path, capsys, monkeypatch):
    """Every trial raising: the search stops after MAX_CONSECUTIVE_FAILURES of them with exit code
    1 and a message listing their errors; the record is written and nothing is left RUNNING."""
    from adabudget.search.workers import MAX_CONSECUTIVE_FAILURES

    n = MAX_CONSECUTIVE_FAILURES
    inject(monkeypatch, {i: RuntimeError(f"boom {i}") for i in range(1, n + 5)})
    code, out, err = search_here(capsys, *LR_STUDY, "search.n_trials=2", f"runs_root={tmp_path}")
    assert code == 1
    assert f"{n} trials in a row failed on this worker" in err
    for i in range(1, n + 1):
        assert f"trial {i - 1}: RuntimeError: boom {i}" in err
    root = tmp_path / "search" / "lr-mr"
    trials = stored(root, "lr-mr")
    assert [t.state for t in trials] == [TrialState.FAIL] * n
    assert [r["state"] for r in json.loads((root / "search.json").read_text())["trials"]] == ["fail"] * n


def setup_of(tmp_path, *args: str):
    from adabudget.compose import compose
    from adabudget.search.config import register_schema
    from adabudget.search.study import open_study, prepare

    register_schema()
    setup = prepare(compose([*LR_STUDY, *args, f"runs_root={tmp_path}"], config_name="search"))
    return setup, open_study(setup, create=True)


def test_ctrl_c_in_a_trial_still_stops_the_worker(tmp_path, monkeypatch):
    """KeyboardInterrupt inside a trial (a second Ctrl-C: the first one checkpoints) keeps its
    meaning: the trial is failed and the worker stops there, starting no next trial."""
    from adabudget.search.workers import worker_loop

    setup, study = setup_of(tmp_path, "search.n_trials=2")
    inject(monkeypatch, {1: KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        worker_loop(setup)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]


def test_the_searchs_own_refusal_still_ends_it_at_once(tmp_path):
    """A study whose draws were all infeasible (more than 20 per wanted trial): the worker refuses
    at once ("widen the space"), starting no trial, rather than counting failures."""
    from adabudget.config import ConfigError
    from adabudget.search.workers import worker_loop
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    setup, study = setup_of(tmp_path, "search.n_trials=1")
    for i in range(21):
        study.add_trial(
            create_trial(
                values=[0.0],
                params={"x": i / 100},
                distributions={"x": FloatDistribution(0, 1)},
                user_attrs={"infeasible": "over the budget"},
            )
        )
    with pytest.raises(ConfigError, match="widen the space"):
        worker_loop(setup)
    assert len(study.get_trials()) == 21


def test_a_trial_failed_by_mistake_while_it_trains_finishes_without_a_crash(
    tmp_path, capsys, monkeypatch, caplog
):
    """While trial 0 trains, another worker fails it as stale (a mistake: its worker lives) and
    queues it again, as ``recover_stale`` does. Trial 0 trains on; its end is a lost race: logged,
    its result kept as a COMPLETE trial ``duplicate_of`` 0 (not counted), the worker goes on, and
    the re-queued copy trains: exactly n_trials=2 trained."""
    import adabudget.training

    real = adabudget.training.train
    calls = []

    def train(cfg, on_eval=None):
        calls.append(cfg["meta"]["trial"])
        if len(calls) == 1:
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            root = Path(cfg["run_dir"]).parents[1]
            other = optuna.load_study(
                study_name="lr-mr", storage=JournalStorage(JournalFileBackend(str(root / "journal.log")))
            )
            [t] = other.get_trials(states=(TrialState.RUNNING,))
            other._storage.set_trial_user_attr(t._trial_id, "failed_because", "no heartbeat (by mistake)")
            other._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            other.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "retries": 1})
        return real(cfg, on_eval=on_eval)

    monkeypatch.setattr(adabudget.training, "train", train)
    code, out, err = search_here(
        capsys, *LR_STUDY, "search.n_trials=2", "search.pruner=median", f"runs_root={tmp_path}"
    )
    assert code == 0, err[-3000:]
    trials = stored(tmp_path / "search" / "lr-mr", "lr-mr")
    first = trials[0]
    assert (
        first.state == TrialState.FAIL and first.user_attrs["failed_because"] == "no heartbeat (by mistake)"
    )
    [dup] = [t for t in trials if t.user_attrs.get("duplicate_of") == 0]
    assert (
        dup.state == TrialState.COMPLETE
        and dup.params == first.params
        and "by mistake" in dup.user_attrs["lost_race"]
    )
    result = json.loads((Path(first.user_attrs["run_dir"]) / "result.json").read_text())
    assert result["status"] == "completed" and dup.values == [result["final"]["dev"]["accuracy"]]
    [retry] = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert trained(retry) and retry.params == first.params
    assert sum(trained(t) for t in trials) == 2 and not [t for t in trials if t.state == TrialState.RUNNING]
    # logged through Hydra's logging config (stdout)
    assert (
        "trial 0 finished, but it had been failed while it ran (no heartbeat (by mistake)): a lost race"
        in out
    )
