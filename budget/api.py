"""The public Python API, for notebooks and scripts: what ``import adabudget`` offers.

    import adabudget

    result = adabudget.train(method="lora", **{"method.r": 8, "train.max_steps": 50})
    model = adabudget.load(result["run_dir"])            # the backbone with its trained adapter
    runs = adabudget.records("runs/")                    # runs, metrics, ranks as DataFrames
    adabudget.dashboard("runs/", out="dashboard.html")   # one self-contained page
    print(adabudget.table("runs/reproduce/minilm-budget"))

Like ``budget/cli.py`` this module names the engine, the search and the analysis: it is the front
door, and imports what each call needs only when it is called (``import adabudget`` stays cheap).
"""

from __future__ import annotations

from pathlib import Path

# Config groups a keyword selects a preset of (``method="lora"`` is ``method=lora``); any other
# keyword is a value (``**{"train.lr": 1e-3}`` or ``train__lr=1e-3`` is ``train.lr=0.001``).
GROUPS = ("model", "data", "method", "experiment", "debug", "logger")


def overrides_of(args: tuple[str, ...], knobs: dict) -> list[str]:
    """Hydra override strings from ``train``'s positional strings and keywords."""
    out = list(args)
    for key, value in knobs.items():
        key = key.replace("__", ".")
        if isinstance(value, bool):
            value = str(value).lower()
        elif value is None:
            value = "null"
        elif isinstance(value, (list, tuple)):
            value = "[" + ",".join(str(v) for v in value) + "]"
        out.append(f"{key}={value}")
    return out


def train(*overrides: str, return_model: bool = False, **knobs) -> dict:
    """Train one configuration, as ``adabudget train`` does; returns its result record.

    Args:
        *overrides: Hydra override strings (``"method=lora"``, ``"train.lr=1e-3"``).
        return_model: also load the trained model (``load(run_dir)``) into ``result["model"]``.
        **knobs: the same as keywords: a config group takes a preset name (``method="s4"``), any
            other key a value (``**{"method.r": 8}``, or ``method__r=8``).

    Returns:
        ``result.json``'s content (``status``, ``final``, ``run_dir``, ...), plus ``model`` when asked.
    """
    from adabudget.compose import compose
    from adabudget.training import train as run

    result = run(compose(overrides_of(overrides, knobs)))
    if return_model:
        result = {**result, "model": load(result["run_dir"])}
    return result


def load(run_dir: str | Path):
    """The model of a finished run: its backbone with the trained adapter (and head), in eval mode.

    Built as the run built it (same config, seed and task head), then the run's ``adapter/``: a
    peft adapter (LoRA, AdaLoRA, DyLoRA runs) comes back as a ``peft.PeftModel``, any other
    method's as the backbone with adabudget's modules (``adabudget.export.load_adapter``).
    """
    import json

    from adabudget.compose import resolve, saved_config
    from adabudget.data import load_tokenizer
    from adabudget.export import load_adapter
    from adabudget.models import load_model
    from adabudget.session import seed_everything

    run_dir = Path(run_dir)
    adapter = run_dir / "adapter"
    if not (run_dir / "config.yaml").exists() or not (run_dir / "result.json").exists():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml / result.json)")
    if not adapter.is_dir():
        raise FileNotFoundError(
            f"{run_dir}: no adapter/ (the run did not finish, or ran with export_adapter=false); "
            f"resume it with `adabudget train resume={run_dir}`"
        )
    run = resolve(saved_config(run_dir))  # an older version's retired keys left out
    record = json.loads((run_dir / "result.json").read_text())
    tokenizer = load_tokenizer(run.model.name, run.model.revision)
    seed_everything(run.train.seed)  # an untrained head is drawn as the run drew it
    causal_lm = record.get("task_kind") == "causal_lm"
    model = load_model(
        run.model, record["num_labels"], record["regression"], tokenizer.pad_token_id, causal_lm
    )
    if (adapter / "adabudget_adapter.json").exists():
        load_adapter(model, adapter)
    else:
        from adabudget.extras import require

        peft = require("peft", "peft", f"adabudget.load of a peft adapter ({adapter})")
        model = peft.PeftModel.from_pretrained(model, adapter)
    return model.eval()


def records(paths, status="completed"):
    """Runs, metrics, ranks and scores of the run folders under ``paths`` as DataFrames
    (``adabudget.analysis.records.load``)."""
    from adabudget.analysis.records import load as load_records

    return load_records(paths, status=status)


def dashboard(paths, out: str | Path | None = None):
    """The dashboard of run folders and studies: written to ``out`` (one self-contained HTML file)
    and its path returned, or, without ``out``, the built ``Dashboard`` (its figures)."""
    from adabudget.analysis import dashboard as dash

    paths = [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    return dash.write_html(paths, out) if out is not None else dash.build(paths)


def table(paths, layout: str | None = None, fmt: str = "markdown") -> str:
    """A paper table (AdaLoRA Table 1's layout) of the completed runs under ``paths``, as text."""
    from adabudget.analysis.tables import table as make_table

    paths = [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    return make_table(paths, layout, fmt=fmt)
