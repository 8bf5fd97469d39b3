"""``adabudget search``: prepare the study, run the workers to ``search.n_trials`` trained trials,
write the record, re-train the best. The one module that drives every part of the search wing
(``study``, ``workers``, ``supernet``, ``record``, ``retraining``); none of them imports it.
"""

from __future__ import annotations

from pathlib import Path

from adabudget.search.credentials import without_password
from adabudget.search.optuna_factory import finished
from adabudget.search.record import write_outputs
from adabudget.search.retraining import retrain, retrain_table
from adabudget.search.study import open_study, prepare
from adabudget.search.supernet import ensure_supernet, run_evolution
from adabudget.search.trial import SearchInterrupted
from adabudget.search.workers import run_workers


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
        else:
            run_workers(setup)
    except (RuntimeError, SearchInterrupted):  # a worker died or was stopped: record what exists, then say so
        write_outputs(open_study(setup), setup)
        raise
    study = open_study(setup)
    report = write_outputs(study, setup)
    if setup.scfg.retrain_top_k:
        report = write_outputs(study, setup, retrain(study, setup))
        print(retrain_table(report["retrain"]))
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
