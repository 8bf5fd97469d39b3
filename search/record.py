"""The record of a study: ``search.json`` (every trial, the best or the Pareto front, settings,
provenance) and ``best.yaml`` (the best configuration as an experiment preset), and the choice of
the best (``best_trials``) and of the configurations to re-train (``top_trials``). The Hydra
sweeper's ``sweep.json`` lists its best with ``best_trials`` too.
"""

from __future__ import annotations

import copy
from pathlib import Path

import optuna
from adabudget.search.optuna_factory import finished
from adabudget.search.spaces.context import merge_overrides
from adabudget.search.spaces.supernet import SupernetSpace, describe
from adabudget.search.study import make_context
from adabudget.search.trial import Setup, trial_row
from optuna.trial import TrialState


def best_trials(study: optuna.Study, setup: Setup) -> list:
    """Single objective: the best feasible trial; several: the Pareto front of the feasible ones."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and finished(t)]
    if not done:
        return []
    directions = setup.scfg.direction_names(setup.primary)
    sign = [1 if d == "maximize" else -1 for d in directions]
    if len(directions) == 1:
        return [max(done, key=lambda t: sign[0] * t.values[0])]
    front = [t for t in done if not any(_dominates(o, t, sign) for o in done)]
    return sorted(front, key=lambda t: -sign[0] * t.values[0])


def top_trials(study: optuna.Study, setup: Setup, k: int) -> list:
    """The ``k`` configurations to re-train, best first: single objective, the ``k`` best feasible
    trials; several, the Pareto front in order of the first objective. Repeats of a trained
    configuration (not ``finished``) and the LoRA / AdaLoRA baselines (re-trained as such) are
    left out, so ``k`` counts distinct configurations."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and finished(t)]
    done = [t for t in done if t.user_attrs.get("baseline") not in RETRAINED]
    sign = [1 if d == "maximize" else -1 for d in setup.scfg.direction_names(setup.primary)]
    if len(sign) > 1:
        done = [t for t in done if not any(_dominates(o, t, sign) for o in done)]
    return sorted(done, key=lambda t: (-sign[0] * t.values[0], t.number))[:k]


RETRAINED = ("lora", "adalora")  # the baselines every final evaluation re-trains


def _dominates(a, b, sign) -> bool:
    va = [s * v for s, v in zip(sign, a.values)]
    vb = [s * v for s, v in zip(sign, b.values)]
    return all(x >= y for x, y in zip(va, vb)) and any(x > y for x, y in zip(va, vb))


def write_outputs(study: optuna.Study, setup: Setup, retrain: dict | None = None) -> dict:
    """``search.json`` (every trial, the best or the Pareto front, settings, provenance) and
    ``best.yaml`` (the best configuration as an experiment preset)."""
    from adabudget.log import environment, write_json_atomic
    from adabudget.search.credentials import without_password

    scfg = setup.scfg
    best = best_trials(study, setup)
    trials = [trial_row(t) for t in study.get_trials(deepcopy=False)]
    out = {
        "study": setup.study,
        "storage": without_password(setup.storage),
        "space": scfg.space_names(),
        "objectives": scfg.objective_names(setup.primary),
        "directions": scfg.direction_names(setup.primary),
        "sampler": scfg.sampler,
        "pruner": scfg.pruner,
        "budget": scfg.budget,
        "budget_percent": scfg.budget_percent,
        "n_trials": scfg.n_trials,
        "finished": sum(finished(t) for t in study.get_trials(deepcopy=False)),
        "model": setup.base["model"]["name"],
        "task": setup.base["data"]["task"],
        "trial_overrides": list(scfg.trial_overrides),
        "trials": trials,
        ("best" if len(best) <= 1 and len(scfg.objective_names(setup.primary)) == 1 else "pareto_front"): [
            trial_row(t) for t in best
        ],
        "retrain": retrain,
        "scorer": scfg.scorer,
        **environment(),
    }
    if scfg.scorer == "supernet":
        out["supernet"] = {
            "run_dir": str(setup.supernet_dir),
            "calibration_steps": scfg.supernet.calibration_steps,
            **describe(SupernetSpace.from_context(make_context(setup))),
        }
    root = Path(setup.root)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "search.json", out)
    if best:
        (root / "best.yaml").write_text(best_yaml(best[0], setup))
    return out


def best_yaml(trial, setup: Setup) -> str:
    """The trial's configuration as an experiment preset: ``adabudget train experiment=<this file>``.

    It holds the trial's whole method node and selects that method's preset: merged into the
    default method (AdaLoRA) a LoRA node fails (``Key 'r' not in 'AdaLoRAConfig'``), and a study
    whose space sets no method (``method=lora search.space=lr``) would otherwise train AdaLoRA.
    """
    from adabudget.compose import config_dir, resolve
    from adabudget.config import to_dict
    from omegaconf import OmegaConf

    overrides = copy.deepcopy(trial.user_attrs.get("overrides") or {})
    method = to_dict(resolve(merge_overrides(setup.base, overrides)))["method"]
    preset = method["name"] if (Path(config_dir()) / "method" / f"{method['name']}.yaml").exists() else None
    body = {"defaults": [{"override /method": preset}], **overrides, "method": method}
    values = ", ".join(
        f"{n}={v:.4g}" for n, v in zip(setup.scfg.objective_names(setup.primary), trial.values)
    )
    head = (
        f"# @package _global_\n# Trial {trial.number} of study {setup.study} ({values}), "
        f"{trial.user_attrs.get('trainable_params'):,} trainable adapter parameters.\n"
        f"# Run it: adabudget train experiment={Path(setup.root) / 'best.yaml'}\n"
    )
    return head + OmegaConf.to_yaml(OmegaConf.create(body))
