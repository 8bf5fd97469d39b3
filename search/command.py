"""``adabudget search``: prepare the study, run the workers to ``search.n_trials`` trained trials,
write the record, re-train the best. The one module that drives every part of the search wing
(``study``, ``workers``, ``supernet``, ``record``, ``retraining``); none of them imports it.
"""

from __future__ import annotations

import time
from pathlib import Path

from adabudget.procs import claim
from adabudget.search.credentials import without_password
from adabudget.search.optuna_factory import finished
from adabudget.search.record import write_outputs
from adabudget.search.retraining import retrain, retrain_table
from adabudget.search.study import open_study, prepare
from adabudget.search.supernet import ensure_supernet, run_evolution
from adabudget.search.trial import SearchInterrupted
from adabudget.search.workers import StartLock, counts, recover_stale, run_workers

RETRAIN_CLAIM = "retrain.claim"  # in the study folder: the one process that re-trains the best


def run_search(cfg) -> dict:
    """``adabudget search``: prepare, open or create the study, run the workers to
    ``search.n_trials`` trained trials, write the record, re-train the best."""
    setup = prepare(cfg)
    study = open_study(setup, create=True)
    print(
        f"study {setup.study} in {without_password(setup.storage)}: {setup.scfg.n_trials} trials wanted, "
        f"{sum(finished(t) for t in study.get_trials(deepcopy=False))} done"
    )
    if setup.scfg.scorer == "supernet":  # train it first (or resume, or reuse the study's)
        ensure_supernet(setup)
    try:
        if setup.scfg.sampler == "evolution":
            run_evolution(setup)
        elif setup.scfg.launcher != "processes":
            if not run_jobs(setup):  # search.wait=false: the jobs train on; the same command reports
                return write_outputs(open_study(setup), setup)
        else:
            run_workers(setup)
    except (RuntimeError, SearchInterrupted):  # a worker died or was stopped: record what exists, then say so
        write_outputs(open_study(setup), setup)
        raise
    study = open_study(setup)
    report = write_outputs(study, setup)
    if setup.scfg.retrain_top_k:
        report = retrain_once(study, setup, report)
    best = report.get("best") or report.get("pareto_front") or []
    if best:
        where = (
            f"in {best[0]['run_dir']}"
            if best[0]["run_dir"]
            else f"scored on the supernet ({best[0].get('sub')})"
        )
        print(f"best: trial {best[0]['number']} {best[0]['values']} {where}")
    print(f"record: {Path(setup.root) / 'search.json'}; best configuration: {Path(setup.root) / 'best.yaml'}")
    return report


def retrain_once(study, setup, report: dict) -> dict:
    """Re-train the best (``search.retrain_top_k``) in one process only: every machine or command
    that ends the same search reaches this point, and the one that takes ``<study>/retrain.claim``
    re-trains (finished runs are read back, not trained again); the others say who holds it."""
    path = Path(setup.root) / RETRAIN_CLAIM
    if not claim(path):
        try:
            owner = path.read_text()
        except OSError:
            owner = "?"
        print(
            f"re-training: {path} is held by another process ({owner}); it writes the table into "
            f"{Path(setup.root) / 'search.json'}; run the same command after it to see it here"
        )
        return report
    try:
        report = write_outputs(study, setup, retrain(study, setup))
    finally:
        path.unlink(missing_ok=True)
    print(retrain_table(report["retrain"]))
    return report


def run_jobs(setup) -> bool:
    """``search.launcher=slurm`` / ``local``: top the study's worker jobs up to ``search.workers``
    (the recorded ones still alive count; none once the study is full), print their ids and logs,
    then wait and report (True once none is left) or return at once (False: ``search.wait=false``)."""
    from adabudget.search.launch import Jobs
    from adabudget.search.progress import Progress
    from optuna.trial import TrialState

    scfg = setup.scfg
    study = open_study(setup)
    lock = StartLock(setup)
    lock.acquire()  # the stale trials of dead jobs are queued again before counting what is left
    try:
        recover_stale(study, setup)
        done, running, _ = counts(study)
    finally:
        lock.close()
    jobs = Jobs(setup)
    missing = scfg.workers - len(jobs.adopted) if done + running < scfg.n_trials else 0
    if missing > 0:
        jobs.submit(missing)
    if jobs.mine or jobs.adopted:
        print(
            f"{len(jobs.mine) + len(jobs.adopted)} worker job(s) ({scfg.launcher}) on the study, "
            f"{done} of {scfg.n_trials} trials done; logs in {Path(setup.root).resolve() / 'jobs'}:\n"
            + jobs.describe(),
            flush=True,
        )
    if not scfg.wait:
        if jobs.alive():
            print(
                "not waiting (search.wait=false): the jobs train on; the same command shows the progress, "
                "resumes the study if they stopped, and writes the record and the re-training once it is full"
            )
            return False
        return True
    progress = Progress(setup)
    progress.seen = {
        t.number
        for t in study.get_trials(deepcopy=False)
        if t.state not in (TrialState.RUNNING, TrialState.WAITING)
    }
    for t in study.get_trials(deepcopy=False):
        if t.number in progress.seen:
            progress.note_best(t)
    try:
        while jobs.alive():
            progress.poll(study)
            time.sleep(2.0)
        progress.poll(study)
    finally:
        progress.close()
    done, _, _ = counts(study)
    bad = jobs.failures()
    if done < scfg.n_trials or bad:
        raise RuntimeError(
            f"the worker jobs ended with {done} of {scfg.n_trials} trials done"
            + ("".join(f"\n  {b}" for b in bad))
            + "\nthe study is resumable as it is: the same command submits new jobs"
        )
    return True
