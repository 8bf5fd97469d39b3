"""Paper tables from run records, in the layout of AdaLoRA's Table 1: one row per configuration
(method at a budget), its trainable parameters, one column per task with its metric(s), an
"All" column, mean ± std over seeds with n shown, the best value of each column in bold,
missing cells shown as missing (never filled in), and a provenance footer (commits, seeds,
data versions, date).

    adabudget table runs/reproduce/minilm-budget --layout packaged --format latex

Rows group the runs by ``meta.label`` (set by ``adabudget reproduce``), else by method and
parameter count; columns by ``task``. Where a row ran a learning-rate grid (``meta.lr``), each
(row, task) keeps the rate with the best mean dev over seeds (the layout's first metric of that
column) and reports its split at that rate, the rate shown in the cell and the rule in the footer.
Where a row has a level (``meta.level_params``), a count more than 2% away from it is flagged.
A layout names the tasks, their order, heading and metrics; without one every task found gets a
column with its primary metric. Values are scaled by 100 as the paper prints them.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from datetime import date

import pandas as pd

MISSING = "–"
LEVEL_TOLERANCE = 0.02  # a row's trainable parameters may differ from its level by this fraction
FLAG = "†"


@dataclass
class Column:
    task: str  # the run's data.task
    heading: str
    metrics: list[str]  # dev metrics, shown as m1/m2


@dataclass
class Layout:
    columns: list[Column]
    split: str = "dev"  # the paper's Table 1 reports GLUE dev
    scale: float = 100.0
    all_column: bool = True
    title: str = ""
    notes: list[str] = field(default_factory=list)


LAYOUTS = {
    # AdaLoRA Table 1 (DeBERTaV3-base, GLUE dev). MNLI's mismatched dev is not loaded (one dev split).
    "table1": Layout(
        [
            Column("glue/mnli", "MNLI", ["accuracy"]),
            Column("glue/sst2", "SST-2", ["accuracy"]),
            Column("glue/cola", "CoLA", ["matthews"]),
            Column("glue/qqp", "QQP", ["accuracy", "f1"]),
            Column("glue/qnli", "QNLI", ["accuracy"]),
            Column("glue/rte", "RTE", ["accuracy"]),
            Column("glue/mrpc", "MRPC", ["accuracy"]),
            Column("glue/stsb", "STS-B", ["pearson"]),
        ],
        title="GLUE dev (AdaLoRA Table 1 layout)",
    ),
    # The packaged counterpart (MiniLM on the four human-rated sets); test is our held-out split.
    "packaged": Layout(
        [
            Column("mr", "MR", ["accuracy"]),
            Column("tweets", "Tweets", ["pearson"]),
            Column("amazon", "Amazon", ["pearson"]),
            Column("nyt", "NYT", ["pearson"]),
        ],
        split="test",
        title="packaged tasks, test split",
    ),
    # The packaged decoder tasks (configs/reproduce/smollm2-instruct.yaml), scored by generation.
    "instruct": Layout(
        [
            Column("mr_instruct", "MR instruct (EM)", ["exact_match"]),
            Column("aclsum", "ACLSum (ROUGE-L)", ["rougeL"]),
            Column("gsm8k_100", "GSM8K-100 (EM)", ["exact_match"]),
        ],
        split="test",
        title="packaged decoder tasks, test split",
    ),
}


def adapter_params(row: pd.Series) -> float | None:
    """The trainable parameters a PEFT table reports (``records``' ``final_params``)."""
    value = row.get("final_params")
    return None if value is None or pd.isna(value) else value


def build(runs: pd.DataFrame, layout: Layout | None = None, rows: str = "label") -> pd.DataFrame:
    """The table as a DataFrame of cells: index = row labels, columns = headings (+ params, All);
    every cell a dict {mean, std, n} (or None when no run has it), per metric."""
    if runs.empty:
        raise ValueError("no completed runs to tabulate (check the paths and the status filter)")
    runs = runs.copy()
    if layout is None:
        tasks = sorted(runs["task"].dropna().unique())
        primary = {t: runs.loc[runs["task"] == t, "primary_metric"].iloc[0] for t in tasks}
        layout = Layout([Column(t, t, [primary[t]]) for t in tasks])
    else:  # a layout's tasks no run has (a protocol variant on fewer tasks) are left out, not shown empty
        found = set(runs["task"].dropna())
        columns = [c for c in layout.columns if c.task in found] or layout.columns
        layout = replace(layout, columns=columns, all_column=layout.all_column and len(columns) > 1)
    runs["_row"] = _row_labels(runs) if rows == "label" else runs[rows].astype(str)
    # rows in a protocol's order (meta.row, written by adabudget reproduce), else as found
    ordered = runs.sort_values("meta.row", kind="stable") if "meta.row" in runs else runs
    order = list(dict.fromkeys(ordered["_row"]))
    out, levels, chosen_any = {}, {}, False
    for label in order:
        mine = runs[runs["_row"] == label]
        cells = {"params": _params(mine)}
        level = _level(mine)
        if level is not None:
            levels[label] = level
        reported, row_chose = [], False  # the runs the row's cells report (with a grid: the chosen rate's)
        for col in layout.columns:
            task_runs = mine[mine["task"] == col.task]
            task_runs, lr = _chosen_lr(task_runs, f"dev.{col.metrics[0]}")
            reported.append(task_runs)
            row_chose = row_chose or lr is not None
            cells[col.heading] = [_stats(task_runs, f"{layout.split}.{m}", layout.scale) for m in col.metrics]
            if lr is not None and cells[col.heading][0] is not None:
                cells[col.heading][0]["lr"] = lr
                chosen_any = True
        if row_chose and any(len(r) for r in reported):  # the count of what the cells report
            cells["params"] = _params(pd.concat(reported)) or cells["params"]
        if layout.all_column:
            firsts = [cells[c.heading][0] for c in layout.columns]
            cells["All"] = [
                None
                if any(c is None for c in firsts)
                else {
                    "mean": statistics.mean(c["mean"] for c in firsts),
                    "std": None,
                    "n": min(c["n"] for c in firsts),
                }
            ]
        out[label] = cells
    table = pd.DataFrame.from_dict(out, orient="index")
    table.attrs["levels"] = levels  # label -> (level name, level params); render flags the far ones
    table.attrs["lr_rule"] = (
        f"learning rate per row and task: the rate of its grid with the best mean dev over seeds, shown as "
        f"@rate; {layout.split} reported at that rate"
        + (" (dev both chooses and reports: optimistic)" if layout.split == "dev" else "")
        if chosen_any
        else ""
    )
    return table


def _chosen_lr(task_runs: pd.DataFrame, dev_column: str) -> tuple[pd.DataFrame, float | None]:
    """The runs at the learning rate with the best mean ``dev_column`` over seeds, and that rate;
    all runs and None when the row ran no grid (no ``meta.lr``) or one rate only."""
    if "meta.lr" not in task_runs or dev_column not in task_runs:
        return task_runs, None
    rates = task_runs["meta.lr"].dropna().unique()
    if len(rates) < 2:
        return task_runs, (float(rates[0]) if len(rates) == 1 else None)
    means = {
        float(r): task_runs.loc[task_runs["meta.lr"] == r, dev_column].dropna().mean() for r in sorted(rates)
    }
    scored = {r: m for r, m in means.items() if not pd.isna(m)}
    if not scored:
        return task_runs, None
    best = max(scored, key=lambda r: (scored[r], -r))  # a tie goes to the smaller rate
    return task_runs[task_runs["meta.lr"] == best], best


def _level(runs: pd.DataFrame) -> tuple[str, int] | None:
    if "meta.level_params" not in runs:
        return None
    values = runs["meta.level_params"].dropna()
    if values.empty:
        return None
    name = runs["meta.level"].dropna().iloc[0] if "meta.level" in runs else ""
    return str(name), int(values.iloc[0])


def _off_level(table: pd.DataFrame, label) -> float | None:
    """The row's relative distance from its level when beyond ``LEVEL_TOLERANCE``, else None."""
    level = table.attrs.get("levels", {}).get(label)
    params = table.loc[label, "params"]
    if level is None or params is None or pd.isna(params):
        return None
    off = params / level[1] - 1
    return off if abs(off) > LEVEL_TOLERANCE else None


# Config keys that do not make a configuration different: the seed (rows average over it), the
# task (it picks the column), and where / how a run was run and logged.
_NOT_IDENTITY = (
    "cfg.train.seed",
    "cfg.data.",
    "cfg.run_dir",
    "cfg.run_name",
    "cfg.runs_root",
    "cfg.resume",
    "cfg.meta",
    "cfg.logger.",
    "cfg.train.progress",
    "cfg.train.num_threads",
    "cfg.train.device",
    "cfg.train.checkpoint",
    "cfg.train.eval_batch_size",
    "cfg.train.stop_after_step",
    "cfg.export_",
    # Records written before RunConfig.search went (commit 2831a5d) still hold a `search:` node in
    # their config.yaml (null for a plain run, the study's search settings for a trial or a
    # supernet): it never made a configuration different, and such records must still share rows.
    "cfg.search",
)


def _row_labels(runs: pd.DataFrame) -> pd.Series:
    """One row per configuration: runs that differ only in seed (and task) share it. The label is
    ``meta.label`` or "method (params)"; distinct configurations with one label get #1, #2, ..."""
    keys = [c for c in runs.columns if c.startswith("cfg.") and not c.startswith(_NOT_IDENTITY)]

    def identity(row) -> str:
        meta = row.get("meta.label")
        if isinstance(meta, str) and meta:
            return meta
        return repr(
            [
                (k, None if pd.isna(row[k]) else row[k])
                if not isinstance(row[k], (list, dict))
                else (k, row[k])
                for k in keys
            ]
        )

    def label(row) -> str:
        meta = row.get("meta.label")
        if isinstance(meta, str) and meta:
            return meta
        p = adapter_params(row)
        return f"{row['method']} ({_short(p)})" if p is not None else str(row["method"])

    ids = runs.apply(identity, axis=1)
    labels = runs.apply(label, axis=1)
    out = labels.copy()
    for lab in labels.unique():
        distinct = list(dict.fromkeys(ids[labels == lab]))
        if len(distinct) > 1:
            for k, i in enumerate(distinct, 1):
                out[(labels == lab) & (ids == i)] = f"{lab} #{k}"
    return out


def _params(runs: pd.DataFrame) -> float | None:
    values = [v for v in runs.apply(adapter_params, axis=1) if v is not None and not pd.isna(v)]
    return statistics.median(values) if values else None


def _stats(runs: pd.DataFrame, column: str, scale: float) -> dict | None:
    if column not in runs:
        return None
    values = [v * scale for v in runs[column] if v is not None and not pd.isna(v)]
    if not values:
        return None
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _short(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K" if n >= 1e3 else f"{int(n)}"


def _best(table: pd.DataFrame, heading: str, k: int) -> float | None:
    means = [c[k]["mean"] for c in table[heading] if c and c[k] is not None]
    return max(means) if means else None  # every Table 1 metric is higher-is-better


def render(table: pd.DataFrame, fmt: str = "markdown", provenance: str = "") -> str:
    """Markdown or LaTeX text of ``build``'s table."""
    headings = [h for h in table.columns if h != "params"]
    best = {
        (h, k): _best(table, h, k) for h in headings for k in range(max(len(c or [None]) for c in table[h]))
    }

    def cell(h, cells, latex):
        if cells is None:
            return MISSING
        parts = []
        for k, c in enumerate(cells):
            if c is None:
                parts.append(MISSING)
                continue
            text = f"{c['mean']:.2f}"
            if c["std"] is not None:
                text += f" ± {c['std']:.2f}" if not latex else f" $\\pm$ {c['std']:.2f}"
            if c["n"] is not None and h != "All":
                text += f" ({c['n']})"
            if c.get("lr") is not None:
                text += f" @{c['lr']:g}"
            if best[(h, k)] is not None and math.isclose(c["mean"], best[(h, k)]):
                text = f"**{text}**" if not latex else f"\\textbf{{{text}}}"
            parts.append(text)
        return " / ".join(parts)

    def params_text(label, row) -> str:
        if row["params"] is None or pd.isna(row["params"]):
            return MISSING
        return _short(row["params"]) + (f" {FLAG}" if _off_level(table, label) is not None else "")

    provenance = "\n".join(p for p in [*_notes(table), provenance] if p)
    if fmt == "markdown":
        lines = ["| method | params | " + " | ".join(headings) + " |", "|---|---:|" + "---:|" * len(headings)]
        for label, row in table.iterrows():
            params = params_text(label, row)
            lines.append(
                f"| {label} | {params} | " + " | ".join(cell(h, row[h], False) for h in headings) + " |"
            )
        return "\n".join(lines) + (f"\n\n{provenance}" if provenance else "") + "\n"
    if fmt != "latex":
        raise ValueError(f"format={fmt}: use markdown or latex")
    lines = [
        "\\begin{tabular}{l r " + "r " * len(headings) + "}",
        "\\toprule",
        "Method & Params & " + " & ".join(latex_escape(h) for h in headings) + " \\\\",
        "\\midrule",
    ]
    for label, row in table.iterrows():
        params = params_text(label, row).replace(FLAG, "$^\\dagger$")
        lines.append(
            f"{latex_escape(str(label))} & {params if '$' in params else latex_escape(params)} & "
            + " & ".join(cell(h, row[h], True).replace(MISSING, "--") for h in headings)
            + " \\\\"
        )
    lines += ["\\bottomrule", "\\end{tabular}"]
    if provenance:  # a comment, in ASCII
        ascii_text = provenance.replace("±", "+-").replace(MISSING, "--").replace(FLAG, "(dagger)")
        lines.append("% " + ascii_text.replace("\n", "\n% "))
    return "\n".join(lines) + "\n"


def _notes(table: pd.DataFrame) -> list[str]:
    """The footer lines of the learning-rate rule and of the levels (with the rows far from theirs)."""
    notes = [table.attrs["lr_rule"].capitalize() + "."] if table.attrs.get("lr_rule") else []
    levels = table.attrs.get("levels", {})
    if levels:
        named = dict.fromkeys(f"{name} = {params:,}" for name, params in levels.values())
        far = [
            f"{label} holds {int(table.loc[label, 'params']):,} "
            f"({_off_level(table, label):+.1%} from {levels[label][0]})"
            for label in table.index
            if _off_level(table, label) is not None
        ]
        notes.append(
            f"Levels in trainable adapter parameters: {'; '.join(named)}; every row within "
            f"{LEVEL_TOLERANCE:.0%} of its level"
            + (f" but those marked {FLAG}: {'; '.join(far)}." if far else ".")
        )
    return notes


def latex_escape(text: str) -> str:
    """LaTeX's special characters, escaped (the labels come from config files and run names)."""
    out = []
    for ch in text:
        out.append(
            {
                "&": r"\&",
                "%": r"\%",
                "$": r"\$",
                "#": r"\#",
                "_": r"\_",
                "{": r"\{",
                "}": r"\}",
                "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}",
                "\\": r"\textbackslash{}",
                "–": "--",
                "±": r"$\pm$",
            }.get(ch, ch)
        )
    return "".join(out)


def provenance(runs: pd.DataFrame, layout: Layout | None, made: str | None = None) -> str:
    commits = sorted({str(c)[:12] for c in runs["git_commit"].dropna()}) if "git_commit" in runs else []
    seeds = sorted({int(s) for s in runs["seed"].dropna()}) if "seed" in runs else []
    versions = sorted({str(v) for v in runs["data_version"].dropna()}) if "data_version" in runs else []
    split = layout.split if layout else "dev"
    return (
        f"Mean ± std over seeds ({', '.join(map(str, seeds)) or 'unknown'}), n in parentheses, "
        f"{split} split, x100; best per column in bold; {MISSING} = no run. {len(runs)} runs, commit(s) "
        f"{', '.join(commits) or 'unknown'}, data {', '.join(versions) or 'unknown'}, "
        f"made {made or date.today()}."
    )


def table(
    paths, layout: str | None = None, rows: str = "label", fmt: str = "markdown", made: str | None = None
) -> str:
    """``adabudget table``: the text of the table of the completed runs at ``paths``."""
    from adabudget.analysis.records import load

    if layout and layout not in LAYOUTS:
        raise ValueError(f"layout={layout}: use one of {sorted(LAYOUTS)}")
    chosen = LAYOUTS[layout] if layout else None
    runs = load(paths, status="completed").runs
    if "meta.supernet" in runs:  # a study's weight-sharing supernet scores configurations, it is not one
        runs = runs[runs["meta.supernet"] != True]  # noqa: E712 (NaN for ordinary runs)
    return render(build(runs, chosen, rows), fmt, provenance(runs, chosen, made))
