"""W&B for searches: the per-trial mirror's labels and the export of a study as a W&B sweep.

Every trial's run mirrors itself to W&B as any run does, in the group named after the study, its
summary holding the trial's number, parameters and objectives (``search.trial.trial_summary``).
``adabudget search export-wandb-sweep`` writes a declarative space as a W&B sweep YAML
(``sweep_config``) whose program is ``adabudget train``. The mapping and what is refused:
docs/sweeper.md#wb-search-trials-and-sweeps.

Invariants: the summary's objectives are the values Optuna is told (``optuna_factory.objective_value``);
only declarative spaces with one objective and no ``search.budget`` are exported (W&B sweeps have no
code, conditions or constraints and optimise one metric), refused otherwise with the reason.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from adabudget.config import ConfigError

SAMPLER_METHODS = {
    **dict.fromkeys(("tpe", "gp", "nsga2", "nsgaii", "nsga3", "nsgaiii", "cmaes"), "bayes"),
    **dict.fromkeys(("random", "qmc"), "random"),
    **dict.fromkeys(("grid", "bruteforce"), "grid"),
}
# What the sweep's runs get besides the search's own overrides: the W&B mirror (the sweep reads
# its metric from it), and what a search trial gets (adabudget.search.study.trial_config): no checkpoints
# (a stopped run is re-run, not resumed; W&B's early termination sends SIGTERM) and no bar.
SWEEP_RUN_OVERRIDES = ("logger.wandb=true", "train.checkpoint=none", "train.progress=false")


# ---------------------------------------------------------------- sweep export
def metric_name(objective: str) -> str:
    """The W&B key a sweep reads for an objective: ``dev/accuracy`` is logged at every dev
    evaluation (early termination watches it) and ends on the final one."""
    if objective.startswith("dev."):
        return f"dev/{objective[4:]}"
    return {"wall_time": "wall_time_s", "params": "trainable_params"}[objective]


def parameter(key: str, dist) -> dict:
    """One W&B sweep parameter from the Optuna distribution a ``params`` entry compiles to."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return {"values": list(dist.choices)}
    if dist.step is not None and (isinstance(dist, FloatDistribution) or dist.step != 1):
        count = int(round((dist.high - dist.low) / dist.step)) + 1
        values = [dist.low + k * dist.step for k in range(count)]
        return {"values": [round(v, 12) if isinstance(v, float) else v for v in values]}
    if isinstance(dist, IntDistribution):
        if dist.log:
            raise ConfigError(
                f"search.space: {key}: W&B sweeps have no integer log-uniform distribution; "
                f"use choice(...) of the values, or int(interval(...)) without tag(log, ...)"
            )
        return {"distribution": "int_uniform", "min": dist.low, "max": dist.high}
    if dist.log:
        return {"distribution": "log_uniform_values", "min": dist.low, "max": dist.high}
    return {"distribution": "uniform", "min": dist.low, "max": dist.high}


def _hydra_value(value) -> str:
    """A fixed value as a Hydra override's right-hand side (``null``, ``true``, ``[1,2]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return str(value)


def program_path() -> str:
    """``budget/cli.py``, relative to the current folder when it is the checkout (run ``wandb agent``
    there), else the installed file's absolute path; ``python <it> train ...`` is ``adabudget train``."""
    import importlib.util

    path = Path(importlib.util.find_spec("adabudget.cli").origin).resolve()  # found, not imported
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def sweep_config(cfg, overrides: list[str]) -> dict:
    """The W&B sweep of ``adabudget search <overrides>``, as a dict (``sweep_yaml`` writes it).

    Args:
        cfg: the composed search config (``configs/search.yaml`` with ``overrides``).
        overrides: the command's overrides; those outside ``search.`` are fixed in the sweep's
            command, with ``search.trial_overrides`` after them.

    Raises:
        ConfigError: a code space (naming ``search.space``), several objectives, a budget (W&B has
            no constraints: every sampled configuration would train), a grid over intervals.
    """
    from adabudget.search.config import SearchConfig
    from adabudget.search.spaces import get_space
    from adabudget.search.study import prepare
    from omegaconf import OmegaConf

    # what W&B cannot express fails first; then everything is checked as for a search
    scfg = SearchConfig(**OmegaConf.to_container(cfg.search, resolve=True))
    objectives = scfg.objective_names()
    if len(objectives) > 1:
        raise ConfigError(
            f"search.objectives={objectives}: a W&B sweep optimises one metric (no multi-objective "
            "sweeps: wandb/wandb#3032); export one objective, or run the Optuna search"
        )
    if scfg.budget is not None or scfg.budget_percent is not None:
        raise ConfigError(
            "search.budget: a W&B sweep cannot skip the configurations that miss the budget (Optuna "
            "constraints have no W&B equivalent; every sampled configuration would train); export "
            "without search.budget / search.budget_percent, or run the Optuna search"
        )
    spaces = {name: get_space(name) for name in scfg.space_names()}
    for name, space in spaces.items():
        if not hasattr(space, "distributions"):
            raise ConfigError(
                f"search.space={name}: a space written in code (conditional choices, budget solving) "
                "cannot be written in W&B's sweep grammar; export a declarative space "
                "(configs/search/space/<name>.yaml), or run the Optuna search"
            )
    setup = prepare(cfg)  # the run config, the space and the objective, checked as for a search
    objectives = scfg.objective_names(setup.primary)
    parameters: dict = {}
    for space in spaces.values():
        for key, value in space.fixed.items():
            parameters[key] = {
                "value": value if isinstance(value, (str, int, float)) else _hydra_value(value)
            }
        for key, dist in space.distributions.items():
            parameters[key] = parameter(key, dist)
    replaces_method = "method.name" in parameters
    if replaces_method:  # method=X: Hydra's group override builds X's node, as a name does in the search
        parameters = {("method" if k == "method.name" else k): v for k, v in parameters.items()}
        _check_presets(parameters["method"], parameters)
    if scfg.sampler == "grid":
        ranged = [k for k, v in parameters.items() if "values" not in v and "value" not in v]
        if ranged:
            raise ConfigError(
                f"search.sampler=grid: {', '.join(ranged)} is a continuous range; a grid needs choice(...) "
                "or range(...) for every parameter"
            )
    fixed = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key.startswith(("search.", "hydra.")) or key == "search":
            continue
        if replaces_method and (key == "method" or key.startswith("method.")):
            continue  # the space's method.name replaces the method node: the search drops these too
        fixed.append(item)
    objective = objectives[0]
    direction = scfg.direction_names(setup.primary)[0]
    config = {
        "name": setup.study,
        "project": setup.base["logger"]["project"],
        "program": program_path(),
        "method": SAMPLER_METHODS[scfg.sampler],
        "metric": {"name": metric_name(objective), "goal": direction},
        "run_cap": scfg.n_trials,
        "parameters": parameters,
        "command": [
            "${env}",
            "${interpreter}",
            "${program}",
            "train",
            *fixed,
            *scfg.trial_overrides,
            *SWEEP_RUN_OVERRIDES,
            "${args_no_hyphens}",
        ],
    }
    if setup.base["logger"]["entity"]:
        config["entity"] = setup.base["logger"]["entity"]
    if scfg.pruner != "none":
        # Optuna's reduction factor 3; an iteration is one logged dev evaluation (train.eval_every)
        config["early_terminate"] = {"type": "hyperband", "min_iter": 1, "eta": 3}
    return config


def _check_presets(method, parameters: dict) -> None:
    """``method=X`` starts from configs/method/X.yaml, the search from X's dataclass defaults:
    refuse a preset that sets knobs the space leaves alone (the two would train different runs)."""
    from adabudget.compose import config_dir, preset

    names = method.get("values") or [method.get("value")]
    for name in names:
        if not (Path(config_dir()) / "method" / f"{name}.yaml").is_file():
            raise ConfigError(f"search.space: method.name={name}: no preset configs/method/{name}.yaml")
        extra = sorted(k for k in preset("method", name) if k != "name" and f"method.{k}" not in parameters)
        if extra:
            raise ConfigError(
                f"search.space: method.name={name}: configs/method/{name}.yaml sets {', '.join(extra)}, "
                "which the search leaves at the dataclass defaults; set them in the space to export it"
            )


def sweep_yaml(config: dict, overrides: list[str]) -> str:
    import yaml
    from adabudget.search.credentials import scrub

    head = (  # the command without a storage's password (search.storage is not in the sweep itself)
        f"# W&B sweep of: adabudget search {scrub(' '.join(overrides))}\n"
        "# Written by `adabudget search export-wandb-sweep`. W&B sweeps need the W&B server:\n"
        "#   wandb sweep <this file>   then, from the folder `program` is relative to,\n"
        "#   wandb agent <entity>/<project>/<sweep id>\n"
        "# Each run is `python budget/cli.py train <fixed overrides> <sampled key=value ...>`, i.e.\n"
        "# adabudget train; under an agent it mirrors to the sweep online (budget/log.py).\n"
    )
    return head + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def export_main(argv: list[str]) -> None:
    """``adabudget search export-wandb-sweep [overrides] [--out FILE]``: print or write the YAML."""
    from adabudget.compose import compose
    from adabudget.search.config import register_schema
    from hydra.errors import HydraException

    args, out = list(argv), None
    if "--out" in args:
        i = args.index("--out")
        if i + 1 >= len(args):
            print("usage: adabudget search export-wandb-sweep [key=value ...] [--out FILE]", file=sys.stderr)
            sys.exit(2)
        out = args[i + 1]
        del args[i : i + 2]
    try:
        register_schema()
        text = sweep_yaml(sweep_config(compose(args, config_name="search"), args), args)
    except (ConfigError, HydraException) as err:  # a bad value, or an override Hydra cannot parse
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    if out is None:
        sys.stdout.write(text)
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    print(f"wrote {out}: wandb sweep {out}  (then wandb agent <sweep id>, run from {os.getcwd()})")
