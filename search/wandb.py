"""W&B for searches: the per-trial mirror's labels.

**Per-trial mirror.** With ``logger.wandb=true`` every trial's run mirrors itself to W&B as any
run does (``budget.log.RunRecord``: offline unless configured, and a W&B error never fails
the run), in the group ``logger.group`` = the study's name (``search.study.trial_config``),
with the config under dotted keys (``method.r``). ``trial_summary`` adds what makes it a trial:
its number and parameters, and its objectives, which are known only once it has trained, so
they are named by where the run's result holds them and read there when the run ends.
"""

from __future__ import annotations

# Where a trial's result (result.json) holds each objective's value (params is known before).
OBJECTIVE_PATHS = {"wall_time": "wall_time_s"}


# ---------------------------------------------------------------- per-trial mirror
def trial_summary(setup, number: int, params: dict, budget_params: int | None) -> dict:
    """The ``meta`` entries (``budget.log.RunRecord``) that put a trial's number, parameters and
    objectives in its W&B run summary; none when the run has no W&B mirror.

    ``objective/dev.accuracy`` is read from the run's ``final.dev.accuracy``, ``objective/wall_time``
    from ``wall_time_s``; ``objective/params`` is the count the search scores (AdaLoRA at b(T)).
    """
    if not setup.base["logger"]["wandb"]:
        return {}
    summary = {"trial/number": number, **{f"trial/params/{k}": v for k, v in params.items()}}
    from_result = {}
    for name in setup.scfg.objective_names(setup.primary):
        if name == "params":
            summary["objective/params"] = budget_params
        elif name.startswith("dev."):
            from_result[f"objective/{name}"] = f"final.dev.{name[4:]}"
        else:
            from_result[f"objective/{name}"] = OBJECTIVE_PATHS[name]
    return {"summary": summary, "summary_from_result": from_result}
