"""The final evaluation of a study (``search.retrain_top_k``): the best configurations and the
LoRA / AdaLoRA baselines re-trained at the same budget on the full schedule, once per seed of
``search.retrain_seeds``, scored on dev and test (mean ± std).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import optuna
from adabudget.search.record import RETRAINED, top_trials
from adabudget.search.study import baseline_overrides, make_context, trial_config
from adabudget.search.trial import Setup


def retrain(study: optuna.Study, setup: Setup, log=print) -> dict:
    """Re-train the ``retrain_top_k`` best configurations and the LoRA / AdaLoRA baselines at the
    same budget on the full schedule (no trial overrides), once per ``retrain_seeds``, and report
    dev and test as mean ± std. Finished runs are kept, interrupted ones resumed."""
    scfg = setup.scfg
    ctx = make_context(setup)
    picks = [
        (f"trial {t.number}", t.user_attrs["overrides"]) for t in top_trials(study, setup, scfg.retrain_top_k)
    ]
    picks += [(name, baseline_overrides(name, ctx)) for name in RETRAINED]
    rows = []
    for label, overrides in picks:
        results = []
        for seed in scfg.retrain_seeds:
            folder = Path(setup.root) / "retrain" / label.replace(" ", "_") / f"s{seed}"
            results.append(
                retrain_one(
                    setup, overrides, folder, {"study": setup.study, "retrain_of": label, "seed": seed}, seed
                )
            )
            log(f"retrain {label} seed {seed}: {results[-1]['status']}")
        rows.append(_summarise(label, results, setup.primary))
    return {"seeds": list(scfg.retrain_seeds), "metric": setup.primary, "rows": rows}


def retrain_one(setup: Setup, overrides: dict, folder: Path, meta: dict, seed: int) -> dict:
    from adabudget.compose import resume_config
    from adabudget.training import train

    for path in sorted(folder.glob("*/result.json"), reverse=True):
        result = json.loads(path.read_text())
        if result.get("status") == "completed":
            return result
        if (path.parent / "checkpoints" / "last.pt").exists():
            return train(resume_config(path.parent))
    cfg = trial_config(
        setup,
        {**overrides, "train": {**overrides.get("train", {}), "seed": seed}},
        None,
        meta,
        for_search=False,
    )
    cfg["runs_root"], cfg["run_name"] = str(folder.parent), folder.name
    return train(cfg)


def _summarise(label: str, results: list[dict], metric: str) -> dict:
    def stats(split: str) -> dict:
        values = [
            r["final"][split][metric] for r in results if r["status"] == "completed" and split in r["final"]
        ]
        if not values:
            return {"mean": None, "std": None, "n": 0}
        return {
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values),
        }

    params = results[0].get("adapter_params_final") or results[0]["trainable_params"]
    return {
        "config": label,
        "trainable_params": results[0]["trainable_params"],
        "final_params": params,
        "dev": stats("dev"),
        "test": stats("test"),
        "run_dirs": [r["run_dir"] for r in results],
    }


def retrain_table(report: dict) -> str:
    lines = [
        f"| configuration | trainable params | dev {report['metric']} | test {report['metric']} | seeds |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:

        def cell(s):
            return "-" if s["mean"] is None else f"{s['mean']:.4f} ± {s['std']:.4f}"

        lines.append(
            f"| {row['config']} | {row['trainable_params']:,} | {cell(row['dev'])} | {cell(row['test'])} "
            f"| {row['test']['n']} |"
        )
    return "\n".join(lines)
