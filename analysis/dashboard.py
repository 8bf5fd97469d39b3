"""Dashboards of run records and studies: plotly figures on one page, served on localhost or
written as one self-contained HTML file, every figure exportable as PNG and PDF.

    adabudget dashboard runs/default/2026-11-22_13-29-50            # serve, print the address
    adabudget dashboard runs/ablation/* runs/search/lr-mr --out dashboard.html
    adabudget dashboard runs/search/lr-mr --png figures/             # PNG + PDF per figure

Built from ``analysis.records`` only (run folders and Optuna storages; nothing from ``budget``
or ``search``). One figure function per view; every chart is plotly's (or Optuna's, which is
plotly too), and the only JavaScript written here is glue: a study's click handler that shows
the clicked trial's rank pattern, the "download every figure" buttons, and the served page's
polling that reloads it when a live run's record changes.
"""

from __future__ import annotations

import hashlib
import html
import http.server
import json
import math
import os
import re
import shutil
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from adabudget.analysis.extras import require
from adabudget.analysis.records import (
    RecordError,
    hide_password,
    load,
    load_study,
    run_dirs,
    study_folder,
    trials,
)

# Matrix roles in the order of a transformer block (README "The run record": modules table).
ROLES = ("q", "k", "v", "qkv", "o", "ffn_in", "ffn_out")
RECORD_FILES = {"result.json", "metrics.jsonl", "ranks.jsonl", "search.json", "journal.log"}
MAX_SLIDER_STEPS = 200  # allocations kept on a slider (evenly spaced, first and last always)
MAX_SCORE_STEPS = 30  # allocations shown in the triplet-score view
MAX_RUN_SECTIONS = 20
MAX_COMPARED = 6
HEIGHT = 440
EXPORT_SIZE = (900, 520)  # width, height of the --png images (PNG at scale 2)
PLOT_CONFIG = {"displaylogo": False, "responsive": True}


class DashboardError(RuntimeError):
    """Something the dashboard cannot do here; the message names the fix."""


@dataclass
class Section:
    """One part of the page: a run, the comparison of runs, or a study."""

    slug: str
    title: str
    figures: list = field(default_factory=list)  # (name, plotly Figure)
    notes: list[str] = field(default_factory=list)
    script: str = ""  # glue run once every figure of the page is drawn
    live: bool = False  # something in it still runs
    wide: set = field(default_factory=set)  # figures given the page's full width


@dataclass
class Dashboard:
    sections: list[Section]
    sources: list[str]
    live: list[str]  # what still runs: run folders and studies
    built_at: float = field(default_factory=time.time)

    def figures(self):
        """(file stem, figure) of every figure on the page, in page order."""
        for s in self.sections:
            for name, fig in s.figures:
                yield f"{s.slug}_{name}", fig


# ---------------------------------------------------------------- grids of ranks
def _with_matrix(ranks: pd.DataFrame) -> pd.DataFrame:
    """``ranks`` plus a ``matrix`` label: the role, or role and leaf name where a layer has two
    matrices of one role (LLaMA's gate and up are both ffn_in)."""
    r = ranks.copy()
    r["layer"] = r["layer"].map(lambda v: "other" if v is None or pd.isna(v) else str(int(v)))
    r["role"] = r["role"].fillna("other")
    per_step = r.groupby(["run_dir", "step", "layer", "role"])["module"].transform("count")
    leaf = r["module"].str.rsplit(".", n=1).str[-1]
    r["matrix"] = r["role"].where(per_step == 1, r["role"] + " (" + leaf + ")")
    return r


def _axes(ranks: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Layers (numeric order, "other" last) and matrices (block order) present in ``ranks``."""
    layers = sorted(set(ranks["layer"]), key=lambda v: (v == "other", int(v) if v != "other" else 0))
    order = {role: i for i, role in enumerate(ROLES)}
    matrices = sorted(set(ranks["matrix"]), key=lambda m: (order.get(m.split(" ")[0], len(ROLES)), m))
    return layers, matrices


def _grid(ranks: pd.DataFrame, layers: list[str], matrices: list[str]) -> list[list]:
    """z[matrix][layer]: the rank of each cell of one allocation (None where no matrix)."""
    table = ranks.pivot_table(index="matrix", columns="layer", values="rank", aggfunc="sum")
    table = table.reindex(index=matrices, columns=layers)
    return [[None if pd.isna(v) else int(v) for v in row] for row in table.to_numpy()]


def _heatmap(z, layers, matrices, **kw):
    import plotly.graph_objects as go

    return go.Heatmap(
        z=z,
        x=layers,
        y=matrices,
        texttemplate="%{z}",
        xgap=1,
        ygap=1,
        hovertemplate="layer %{x}, %{y}: rank %{z}<extra></extra>",
        **kw,
    )


def _heatmap_layout(fig, title: str, n_matrices: int, panels: bool = False) -> None:
    fig.update_layout(title=title, height=max(HEIGHT, 60 * n_matrices + 160))
    fig.update_xaxes(title="layer", type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_yaxes(title="matrix", **({"col": 1} if panels else {}))


def _evenly(values: list, k: int) -> list:
    """At most ``k`` of ``values``, evenly spaced, the first and the last always kept."""
    if len(values) <= k:
        return list(values)
    idx = sorted({round(i * (len(values) - 1) / (k - 1)) for i in range(k)})
    return [values[i] for i in idx]


# ---------------------------------------------------------------- a run
def rank_heatmap(ranks: pd.DataFrame, title: str = "Final rank allocation"):
    """AdaLoRA's figure of the allocation: the final rank of every matrix, layer x matrix."""
    import plotly.graph_objects as go

    r = _with_matrix(ranks)
    last = r[r["step"] == r["step"].max()]
    layers, matrices = _axes(r)
    zmax = r["init_rank"].max() if r["init_rank"].notna().any() else r["rank"].max()
    fig = go.Figure(
        _heatmap(
            _grid(last, layers, matrices),
            layers,
            matrices,
            zmin=0,
            zmax=zmax,
            colorscale="Viridis",
            colorbar={"title": {"text": "rank"}},
        )
    )
    total = int(last["rank"].sum())
    _heatmap_layout(fig, f"{title} (step {int(last['step'].iloc[0])}, total rank {total})", len(matrices))
    return fig


def allocation_slider(ranks: pd.DataFrame):
    """The allocation at every step: one heatmap, a slider over the allocations."""
    import plotly.graph_objects as go

    r = _with_matrix(ranks)
    layers, matrices = _axes(r)
    steps = _evenly(sorted(r["step"].unique()), MAX_SLIDER_STEPS)
    zmax = r["init_rank"].max() if r["init_rank"].notna().any() else r["rank"].max()
    frames = []
    for step in steps:
        at = r[r["step"] == step]
        budget, kept = at["budget"].iloc[0], at["kept"].iloc[0]
        title = (
            f"Allocation at step {int(step)}: scheduled b(t) = {_fmt(budget)}, "
            f"kept {_fmt(kept)}, total rank {int(at['rank'].sum())}"
        )
        frames.append((step, _grid(at, layers, matrices), title))
    fig = go.Figure(
        _heatmap(
            frames[-1][1],
            layers,
            matrices,
            zmin=0,
            zmax=zmax,
            colorscale="Viridis",
            colorbar={"title": {"text": "rank"}},
        )
    )
    _heatmap_layout(fig, frames[-1][2], len(matrices))
    fig.update_layout(
        height=max(HEIGHT, 60 * len(matrices) + 230),
        sliders=[
            {
                "active": len(frames) - 1,
                "currentvalue": {"prefix": "step "},
                "pad": {"t": 60},
                "steps": [
                    {"label": str(int(s)), "method": "update", "args": [{"z": [z]}, {"title.text": t}]}
                    for s, z, t in frames
                ],
            }
        ],
    )
    return fig


def budget_figure(ranks: pd.DataFrame, metrics: pd.DataFrame):
    """Scheduled b(t) (AdaLoRA Appendix A) against the budget the allocator kept."""
    import plotly.graph_objects as go

    per_step = ranks.groupby("step").agg(budget=("budget", "first"), kept=("kept", "first")).reset_index()
    # b(t) at every allocation and at every training log line: together, the schedule's shape
    logged = metrics[(metrics["split"] == "train") & (metrics["metric"] == "budget")]
    schedule = pd.concat(
        [per_step[["step", "budget"]], logged[["step", "value"]].rename(columns={"value": "budget"})]
    )
    schedule = schedule.dropna().drop_duplicates("step").sort_values("step")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=schedule["step"], y=schedule["budget"], mode="lines", name="scheduled b(t)"))
    fig.add_trace(
        go.Scatter(
            x=per_step["step"],
            y=per_step["kept"],
            mode="markers+lines",
            line={"shape": "hv"},
            name="kept (triplets above the threshold)",
        )
    )
    fig.update_layout(title="Budget: scheduled b(t) and kept", height=HEIGHT)
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="total rank (triplets)")
    return fig


def scores_figure(scores: pd.DataFrame):
    """Every triplet's importance score S_i (AdaLoRA Eq. 9) at each allocation, kept vs pruned."""
    import plotly.express as px

    steps = _evenly(sorted(scores["step"].unique()), MAX_SCORE_STEPS)
    s = scores[scores["step"].isin(steps)].copy()
    s["triplet"] = s["kept"].map({True: "kept", False: "pruned"})
    s["allocation step"] = s["step"].astype(int).astype(str)
    fig = px.strip(
        s,
        x="allocation step",
        y="score",
        color="triplet",
        hover_data=["module"],
        category_orders={"triplet": ["kept", "pruned"], "allocation step": [str(int(v)) for v in steps]},
        color_discrete_map={"kept": "#1f77b4", "pruned": "#d62728"},
    )
    fig.update_layout(title="Triplet scores S_i at each allocation: kept vs pruned", height=HEIGHT)
    fig.update_xaxes(title="allocation step")
    fig.update_yaxes(
        title="score S_i" + (" (log)" if (s["score"] > 0).all() else ""),
        type="log" if (s["score"] > 0).all() else "linear",
    )
    return fig


def training_figure(metrics: pd.DataFrame, title: str = "Training"):
    """Train loss and every dev metric over the steps."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("train loss", "dev metrics"))
    loss = metrics[(metrics["split"] == "train") & (metrics["metric"] == "loss")].sort_values("step")
    fig.add_trace(go.Scatter(x=loss["step"], y=loss["value"], mode="lines", name="train loss"), row=1, col=1)
    dev = metrics[metrics["split"] == "dev"]
    for name, m in dev.groupby("metric", sort=True):
        m = m.sort_values("step")
        fig.add_trace(
            go.Scatter(x=m["step"], y=m["value"], mode="lines+markers", name=f"dev {name}"), row=1, col=2
        )
    fig.update_layout(title=title, height=HEIGHT)
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="loss", row=1, col=1)
    fig.update_yaxes(title="value", row=1, col=2)
    return fig


def params_figure(groups: pd.DataFrame):
    """Trainable parameters per layer group and method (a hybrid's split of its budget)."""
    import plotly.express as px

    g = groups.copy()
    g["layer group"] = [f"group {gr} (layers {_layers(ls)})" for gr, ls in zip(g["group"], g["layers"])]
    fig = px.bar(g, x="layer group", y="params", color="method", text="params")
    fig.update_layout(
        title="Trainable parameters per layer group and method (at the start)", height=HEIGHT, barmode="stack"
    )
    fig.update_xaxes(title="layer group")
    fig.update_yaxes(title="trainable parameters")
    return fig


def run_section(rec, run: pd.Series) -> Section:
    """Every view of one run."""
    rid = run["run_dir"]
    ranks = rec.ranks[rec.ranks["run_dir"] == rid]
    metrics = rec.metrics[rec.metrics["run_dir"] == rid]
    scores = rec.scores[rec.scores["run_dir"] == rid]
    groups = rec.groups[rec.groups["run_dir"] == rid]
    sec = Section(_slug("run-" + _short(rid)), f"Run {_short(rid)}: {_describe(run)}")
    if len(ranks):
        sec.figures.append(("rank_final", rank_heatmap(ranks)))
        sec.figures.append(("rank_steps", allocation_slider(ranks)))
        sec.figures.append(("budget", budget_figure(ranks, metrics)))
    else:
        sec.notes.append(f"No rank allocation in this record (method {run.get('method')}).")
    if len(scores):
        sec.figures.append(("scores", scores_figure(scores)))
    elif len(ranks):
        sec.notes.append("No triplet scores in ranks.jsonl (a record written before they were logged).")
    if len(metrics):
        sec.figures.append(("training", training_figure(metrics)))
    if len(groups):
        sec.figures.append(("params", params_figure(groups)))
    return sec


# ---------------------------------------------------------------- comparing runs
def run_labels(runs: pd.DataFrame) -> dict[str, str]:
    """A short label per run: the config keys in which the runs differ (``method.score=sensitivity``),
    else the run folder."""
    skip = re.compile(r"^cfg\.(run_dir|run_name|runs_root|resume|logger\.|meta)")
    keys = [
        c
        for c in runs.columns
        if c.startswith("cfg.") and not skip.match(c) and runs[c].astype(str).nunique() > 1
    ]
    names = {rid: Path(rid).parent.name for rid in runs["run_dir"]}  # run_name, unless a sweep's job
    if len(set(names.values())) < len(names):
        names = {rid: _short(rid) for rid in names}
    labels = {}
    for _, row in runs.iterrows():
        parts = [f"{k.removeprefix('cfg.')}={row[k]}" for k in keys]
        labels[row["run_dir"]] = ", ".join(parts) if parts and len(keys) <= 2 else names[row["run_dir"]]
    if len(set(labels.values())) < len(labels):
        labels = {rid: f"{lab} ({_short(rid)})" for rid, lab in labels.items()}
    return labels


def compare_metrics(runs: pd.DataFrame, metrics: pd.DataFrame, labels: dict[str, str]):
    """Final dev/test metrics side by side, and the primary dev metric over the steps."""
    import plotly.colors
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    primary = runs["primary_metric"].dropna().iloc[0] if runs["primary_metric"].notna().any() else "accuracy"
    cols = [
        c for c in runs.columns if re.match(r"^(dev|test)\.", c) and pd.api.types.is_numeric_dtype(runs[c])
    ]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("final metrics", f"dev {primary} over steps"))
    palette = plotly.colors.qualitative.Plotly
    for i, (_, run) in enumerate(runs.iterrows()):
        label, color = labels[run["run_dir"]], palette[i % len(palette)]
        fig.add_trace(
            go.Bar(x=cols, y=[run[c] for c in cols], name=label, legendgroup=label, marker_color=color),
            row=1,
            col=1,
        )
        m = metrics[
            (metrics["run_dir"] == run["run_dir"])
            & (metrics["split"] == "dev")
            & (metrics["metric"] == primary)
        ].sort_values("step")
        fig.add_trace(
            go.Scatter(
                x=m["step"],
                y=m["value"],
                mode="lines+markers",
                name=label,
                legendgroup=label,
                showlegend=False,
                line={"color": color},
            ),
            row=1,
            col=2,
        )
    fig.update_layout(title="Metrics side by side", barmode="group", height=HEIGHT)
    fig.update_xaxes(title="split.metric", row=1, col=1)
    fig.update_xaxes(title="step", row=1, col=2)
    fig.update_yaxes(title="value", row=1, col=1)
    fig.update_yaxes(title=f"dev {primary}", row=1, col=2)
    return fig


def _final_grids(ranks: pd.DataFrame, run_ids: list[str]):
    r = _with_matrix(ranks[ranks["run_dir"].isin(run_ids)])
    layers, matrices = _axes(r)
    grids = {}
    for rid in run_ids:
        own = r[r["run_dir"] == rid]
        grids[rid] = _grid(own[own["step"] == own["step"].max()], layers, matrices)
    return layers, matrices, grids


def _panels(n: int, titles: list[str]):
    from plotly.subplots import make_subplots

    cols = min(n, 3)
    rows = math.ceil(n / cols)
    return make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=titles,
        horizontal_spacing=0.04,
        shared_yaxes=True,
        vertical_spacing=0.18 if rows > 1 else 0.1,
    ), cols


def compare_heatmaps(ranks: pd.DataFrame, labels: dict[str, str]):
    """The final rank heatmaps of several runs side by side, on one colour scale."""
    run_ids = list(labels)
    layers, matrices, grids = _final_grids(ranks, run_ids)
    fig, cols = _panels(len(run_ids), [labels[r] for r in run_ids])
    for i, rid in enumerate(run_ids):
        fig.add_trace(
            _heatmap(grids[rid], layers, matrices, coloraxis="coloraxis"), row=i // cols + 1, col=i % cols + 1
        )
    top = ranks["init_rank"].max() if ranks["init_rank"].notna().any() else ranks["rank"].max()
    fig.update_layout(
        coloraxis={"colorscale": "Viridis", "cmin": 0, "cmax": top, "colorbar": {"title": {"text": "rank"}}}
    )
    _heatmap_layout(
        fig, "Final rank allocation side by side", len(matrices) * math.ceil(len(run_ids) / cols), True
    )
    return fig


def difference_heatmap(ranks: pd.DataFrame, labels: dict[str, str]):
    """Final ranks of each run minus those of the first (red: more rank than the first)."""
    run_ids = list(labels)
    layers, matrices, grids = _final_grids(ranks, run_ids)
    base = grids[run_ids[0]]
    others = run_ids[1:]
    fig, cols = _panels(len(others), [labels[r] for r in others])
    for i, rid in enumerate(others):
        z = [
            [None if a is None or b is None else a - b for a, b in zip(ra, rb)]
            for ra, rb in zip(grids[rid], base)
        ]
        fig.add_trace(
            _heatmap(z, layers, matrices, coloraxis="coloraxis"), row=i // cols + 1, col=i % cols + 1
        )
    fig.update_layout(
        coloraxis={
            "colorscale": "RdBu",
            "reversescale": True,
            "cmid": 0,
            "colorbar": {"title": {"text": "rank difference"}},
        }
    )
    _heatmap_layout(
        fig,
        f"Rank difference: each run minus {labels[run_ids[0]]}",
        len(matrices) * math.ceil(len(others) / cols),
        True,
    )
    return fig


def compare_section(rec, runs: pd.DataFrame) -> Section:
    sec = Section("compare", f"Comparing {len(runs)} runs")
    labels = run_labels(runs)
    sec.figures.append(("metrics", compare_metrics(runs, rec.metrics, labels)))
    with_ranks = [rid for rid in labels if (rec.ranks["run_dir"] == rid).any()]
    if len(with_ranks) > MAX_COMPARED:
        sec.notes.append(
            f"Rank heatmaps of the first {MAX_COMPARED} of {len(with_ranks)} runs with allocations."
        )
        with_ranks = with_ranks[:MAX_COMPARED]
    if len(with_ranks) >= 2:
        shown = {rid: labels[rid] for rid in with_ranks}
        sec.figures.append(("ranks", compare_heatmaps(rec.ranks, shown)))
        sec.wide.update({"ranks", "ranks_diff"} if len(shown) > 2 else {"ranks"})
        sec.figures.append(("ranks_diff", difference_heatmap(rec.ranks, shown)))
    else:
        sec.notes.append("Fewer than two of these runs have a rank allocation: no heatmaps to compare.")
    return sec


# ---------------------------------------------------------------- a study
def _front(points: pd.DataFrame, x: str, y: str, maximise: bool) -> pd.DataFrame:
    """The non-dominated points: fewer parameters and a better metric."""
    best, keep = -math.inf, []
    for idx, row in points.sort_values([x, y], ascending=[True, not maximise]).iterrows():
        value = row[y] if maximise else -row[y]
        if value > best:
            best = value
            keep.append(idx)
    return points.loc[keep]


def _trial_markers(fig, tr: pd.DataFrame, x: str, y: str, **kw) -> None:
    import plotly.graph_objects as go

    sampled = tr[tr["baseline"].isna()]
    base = tr[tr["baseline"].notna()]
    fig.add_trace(
        go.Scatter(
            x=sampled[x],
            y=sampled[y],
            mode="markers",
            name="sampled trial",
            customdata=sampled["number"],
            marker={"size": 10},
            hovertemplate="trial %{customdata}<br>%{x}<br>%{y}<extra></extra>",
            **kw,
        )
    )
    fig.add_trace(
        go.Scatter(
            x=base[x],
            y=base[y],
            mode="markers+text",
            name="baseline",
            customdata=base["number"],
            text=base["baseline"],
            textposition="top center",
            marker={"size": 15, "symbol": "star", "color": "#ff7f0e"},
            hovertemplate="trial %{customdata} (baseline %{text})<br>%{x}<br>%{y}<extra></extra>",
            **kw,
        )
    )


def history_figure(tr: pd.DataFrame, objective: str, maximise: bool):
    """The objective of every trained trial in order, the best so far, baselines marked."""
    import plotly.graph_objects as go

    done = tr[tr["state"] == "complete"].sort_values("number")
    fig = go.Figure()
    _trial_markers(fig, done, "number", objective)
    best = done[objective].cummax() if maximise else done[objective].cummin()
    fig.add_trace(
        go.Scatter(
            x=done["number"], y=best, mode="lines", line={"shape": "hv"}, name="best so far", hoverinfo="skip"
        )
    )  # clicks and hovers go to the trials beneath it
    pruned = tr[(tr["state"] == "pruned") & tr["last_report"].notna()] if "last_report" in tr else tr[:0]
    if len(pruned):
        fig.add_trace(
            go.Scatter(
                x=pruned["number"],
                y=pruned["last_report"],
                mode="markers",
                name="pruned (last report)",
                customdata=pruned["number"],
                marker={"symbol": "x", "color": "grey"},
            )
        )
    fig.update_layout(
        title=f"Optimisation history: {objective} ({'max' if maximise else 'min'}imised)", height=HEIGHT
    )
    fig.update_xaxes(title="trial", dtick=1 if len(tr) <= 20 else None)
    fig.update_yaxes(title=objective)
    return fig


def pareto_figure(tr: pd.DataFrame, objective: str, params: str, maximise: bool):
    """Metric against trainable parameters: every trial, the Pareto front, baselines marked."""
    import plotly.graph_objects as go

    done = tr[(tr["state"] == "complete") & tr[params].notna() & tr[objective].notna()]
    fig = go.Figure()
    front = _front(done, params, objective, maximise)
    fig.add_trace(
        go.Scatter(
            x=front[params],
            y=front[objective],
            mode="lines",
            line={"shape": "hv", "dash": "dot"},
            name="Pareto front",
            hoverinfo="skip",
        )
    )
    _trial_markers(fig, done, params, objective)
    fig.update_layout(title=f"Pareto front: {objective} against trainable parameters", height=HEIGHT)
    fig.update_xaxes(title=f"trainable parameters ({params})")
    fig.update_yaxes(title=objective)
    return fig


def _sampled_study(study):
    """An in-memory copy of the study's sampled, feasible, completed trials (the baselines have no
    sampled parameters; an infeasible trial's values are a sentinel)."""
    import optuna

    keep = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state == optuna.trial.TrialState.COMPLETE and t.params and not t.user_attrs.get("infeasible")
    ]
    copy = optuna.create_study(directions=study.directions)
    copy.add_trials(keep)
    return copy, keep


def importance_figure(study, objectives: list[str]):
    """Optuna's parameter importances (its default evaluator), one bar per objective; None and a
    reason when fewer than two sampled trials completed."""
    import optuna
    import plotly.graph_objects as go

    copy, keep = _sampled_study(study)
    if len(keep) < 2:
        return (
            None,
            f"Parameter importances need two or more completed sampled trials; this study has {len(keep)}.",
        )
    fig, notes = go.Figure(), []
    for i, name in enumerate(objectives):
        values = {t.values[i] for t in keep}
        if len(values) < 2:
            notes.append(f"{name} is the same in every sampled trial: its importances are uninformative.")
        sign = -1.0 if study.directions[i].name == "MAXIMIZE" else 1.0  # the evaluator looks for low values
        with warnings.catch_warnings():  # a small study makes it warn about every parameter
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(copy, target=lambda t, i=i, s=sign: s * t.values[i])
        params = list(imp)[::-1]
        fig.add_trace(go.Bar(x=[imp[p] for p in params], y=params, orientation="h", name=name))
    fig.update_layout(
        title="Parameter importances (Optuna)", barmode="group", height=max(HEIGHT, 24 * len(params) + 160)
    )
    fig.update_xaxes(title="importance")
    fig.update_yaxes(title="parameter")
    return fig, " ".join(notes)


def parallel_figure(study, objective: str, index: int):
    """Optuna's parallel coordinates of the sampled trials against ``objective``."""
    import optuna

    copy, keep = _sampled_study(study)
    if not keep:
        return None, "Parallel coordinates need a completed sampled trial; this study has none."
    target = (lambda t: t.values[index]) if len(study.directions) > 1 else None
    fig = optuna.visualization.plot_parallel_coordinate(copy, target=target, target_name=objective)
    fig.update_layout(title=f"Parallel coordinates: sampled parameters and {objective}", height=HEIGHT)
    fig.update_xaxes(title="parameter (each axis spans its own range)")
    fig.update_yaxes(title="scaled value")
    return fig, ""


def trial_ranks_figure(tr: pd.DataFrame, rec, first: int | None):
    """The rank pattern of one trial at a time: a menu over the trials (and the Pareto front's and
    history's click handler) swaps the heatmap."""
    import plotly.graph_objects as go

    by_dir = {str(Path(d).resolve()): n for n, d in zip(tr["number"], tr["run_dir"]) if isinstance(d, str)}
    ranks = rec.ranks[rec.ranks["run_dir"].isin(by_dir)]
    if not len(ranks):
        return None
    r = _with_matrix(ranks)
    layers, matrices = _axes(r)
    zmax = r["init_rank"].max() if r["init_rank"].notna().any() else r["rank"].max()
    buttons = []
    for rid, n in sorted(by_dir.items(), key=lambda kv: kv[1]):
        own = r[r["run_dir"] == rid]
        row = tr[tr["number"] == n].iloc[0]
        what = f"baseline {row['baseline']}" if isinstance(row["baseline"], str) else "sampled"
        if len(own):
            last = own[own["step"] == own["step"].max()]
            z, title = (
                _grid(last, layers, matrices),
                f"Rank pattern of trial {n} ({what}), total rank {int(last['rank'].sum())}",
            )
        else:
            z = [[None] * len(layers) for _ in matrices]
            title = f"Trial {n} ({what}): no rank allocation in its record"
        buttons.append(
            {"label": f"trial {n}", "method": "update", "args": [{"z": [z]}, {"title.text": title}]}
        )
    active = next((i for i, b in enumerate(buttons) if b["label"] == f"trial {first}"), 0)
    fig = go.Figure(
        _heatmap(
            buttons[active]["args"][0]["z"][0],
            layers,
            matrices,
            zmin=0,
            zmax=zmax,
            colorscale="Viridis",
            colorbar={"title": {"text": "rank"}},
        )
    )
    _heatmap_layout(fig, buttons[active]["args"][1]["title.text"], len(matrices))
    fig.update_layout(
        updatemenus=[
            {
                "buttons": buttons,
                "active": active,
                "x": 1.0,
                "xanchor": "right",
                "y": 1.18,
                "yanchor": "top",
                "direction": "down",
            }
        ]
    )
    return fig


# The one piece of JavaScript beyond plotly's own: a click (or box/lasso selection) on a trial in
# the history or the Pareto front applies that trial's entry of the rank figure's menu.
_CLICK_GLUE = """(function () {
  const target = document.getElementById(%(target)s);
  function show(n) {
    if (n === undefined || n === null) return;
    const menu = target.layout.updatemenus[0];
    const i = menu.buttons.findIndex((b) => b.label === "trial " + n);
    if (i < 0) return;
    const layout = Object.assign({}, menu.buttons[i].args[1], {"updatemenus[0].active": i});
    Plotly.update(target, menu.buttons[i].args[0], layout);
  }
  for (const id of %(sources)s) {
    const gd = document.getElementById(id);
    gd.on("plotly_click", (ev) => show(ev.points[0].customdata));
    gd.on("plotly_selected", (ev) => { if (ev && ev.points.length) show(ev.points[0].customdata); });
  }
})();"""


def study_section(storage) -> Section:
    """History, Pareto front, importances, parallel coordinates and per-trial rank patterns."""
    study = load_study(storage)
    tr = trials(study, folder=study_folder(storage))  # run folders found under it, from any directory
    info = study.user_attrs.get("adabudget") or {}
    objectives = info.get("objectives") or [f"value{i}" for i in range(len(study.directions))]
    maximise = [d.name == "MAXIMIZE" for d in study.directions]
    objective = next((o for o in objectives if o.startswith("dev.")), objectives[0])
    k = objectives.index(objective)
    slug = _slug("study-" + study.study_name)
    counts = tr["state"].value_counts().to_dict() if len(tr) else {}
    sec = Section(
        slug,
        f"Study {study.study_name}: {len(tr)} trials ("
        + ", ".join(f"{v} {s}" for s, v in sorted(counts.items()))
        + ")",
    )
    sec.live = bool(counts.get("running"))
    if not len(tr) or "baseline" not in tr:
        sec.notes.append("No trials yet.")
        return sec
    dirs = [d for d in tr["run_dir"].dropna() if Path(d).is_dir()]
    rec = load(dirs, status=None) if dirs else None
    if rec is not None and len(rec.runs):  # the params a table reports: final, the head excluded
        final = dict(zip(rec.runs["run_dir"], rec.runs["final_params"]))
        tr["final_params"] = [
            final.get(str(Path(d).resolve())) if isinstance(d, str) else None for d in tr["run_dir"]
        ]
    params = (
        "params" if "params" in objectives else "final_params" if "final_params" in tr else "trainable_params"
    )
    done = tr[tr["state"] == "complete"]
    if not len(done):
        sec.notes.append("No completed trial yet.")
        return sec
    if (tr["state"] == "infeasible").any():
        sec.notes.append(
            f"{int((tr['state'] == 'infeasible').sum())} infeasible trial(s) left out (never trained)."
        )
    with_ranks = set(rec.ranks["run_dir"]) if rec is not None else set()
    has_ranks = done["run_dir"].map(lambda d: isinstance(d, str) and str(Path(d).resolve()) in with_ranks)
    # the rank figure opens on the best trial that has an allocation
    pool = done[has_ranks] if has_ranks.any() else done
    best = pool.sort_values(objective, ascending=not maximise[k]).iloc[0]["number"]
    sec.figures.append(("history", history_figure(tr, objective, maximise[k])))
    if tr[params].notna().any():
        sec.figures.append(("pareto", pareto_figure(tr, objective, params, maximise[k])))
    fig, note = importance_figure(study, objectives)
    if fig is not None:
        sec.figures.append(("importances", fig))
    if note:
        sec.notes.append(note)
    fig, note = parallel_figure(study, objective, k)
    if fig is not None:
        sec.figures.append(("parallel", fig))
    if note:
        sec.notes.append(note)
    ranks_fig = trial_ranks_figure(tr, rec, int(best)) if rec is not None else None
    if ranks_fig is not None:
        sec.figures.append(("trial_ranks", ranks_fig))
        sources = [
            _div_id(slug, n) for n in ("history", "pareto") if any(name == n for name, _ in sec.figures)
        ]
        sec.script = _CLICK_GLUE % {
            "target": json.dumps(_div_id(slug, "trial_ranks")),
            "sources": json.dumps(sources),
        }
        sec.notes.append(
            "Click a trial in the history or the Pareto front (or pick one in the menu) "
            "to see its rank pattern."
        )
    else:
        sec.notes.append("No trial of this study has a rank allocation (no AdaLoRA in its space).")
    return sec


# ---------------------------------------------------------------- the page
def _is_study(path: str) -> bool:
    if str(path).startswith(("sqlite:", "postgresql", "mysql", "grpc://")):
        return True
    p = Path(path)
    return (p.is_dir() and (p / "search.json").is_file()) or (p.is_file() and p.suffix == ".log")


def build(paths: list[str], status=None) -> Dashboard:
    """The dashboard of ``paths``: run folders (or folders above them) and studies (a study folder,
    its journal file, or a database URL). ``status`` filters the runs as ``records.load`` does."""
    require("plotly", "dashboard", "adabudget dashboard (plotly's figures)")
    studies = [str(p) for p in paths if _is_study(p)]
    run_paths = [p for p in paths if str(p) not in studies]
    sections, live = [], []
    for s in studies:
        sec = study_section(s)
        sections.append(sec)
        if sec.live:
            live.append(s)
    if run_paths:
        rec = load(run_paths, status=status)
        runs = rec.runs
        if not len(runs):
            raise RecordError(f"{', '.join(map(str, run_paths))}: no runs with status {status or 'any'}")
        live += [r for r, s, a in zip(runs["run_dir"], runs["status"], runs["alive"]) if s == "running" and a]
        if len(runs) >= 2:
            sections.append(compare_section(rec, runs))
        for i, (_, run) in enumerate(runs.iterrows()):
            if i == MAX_RUN_SECTIONS:
                sections.append(
                    Section(
                        "more",
                        f"{len(runs) - i} more runs",
                        notes=["Pass fewer run folders to see each of them."],
                    )
                )
                break
            sections.append(run_section(rec, run))
    return Dashboard(sections, [str(p) for p in paths], live)


def _div_id(section_slug: str, name: str) -> str:
    return f"fig-{section_slug}-{name}"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 1.5em 2em; color: #222; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd; padding: .6em 0;
         z-index: 10; }
header h1 { font-size: 1.25em; display: inline; margin-right: 1em; }
nav a { margin-right: .8em; font-size: .9em; }
.note { color: #555; font-size: .9em; }
.live { color: #a00; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 1em; }
.figure { border: 1px solid #eee; min-width: 0; }
.figure.wide { grid-column: 1 / -1; }
"""

# Served pages poll the server's stamp of the record files and reload when a live record changed.
_POLL = """const STAMP = %(stamp)s;
setInterval(() => {
  fetch("stamp", {cache: "no-store"}).then((r) => r.text())
    .then((s) => { if (s !== STAMP) location.reload(); }).catch(() => {});
}, %(ms)d);"""

_EXPORT = """function exportAll(format) {
  document.querySelectorAll(".js-plotly-plot").forEach((gd) =>
    Plotly.downloadImage(gd, {format: format, scale: 2, filename: gd.id.replace(/^fig-/, "")}));
}"""


def to_html(dash: Dashboard, stamp: str | None = None, refresh_s: float = 5.0) -> str:
    """One HTML page holding plotly.js once (inlined: it opens with no network) and every figure.
    With ``stamp`` (served pages), the page reloads when the server's stamp changes while runs live."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    built = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(dash.built_at))
    nav = " ".join(f'<a href="#{s.slug}">{html.escape(s.title.split(":")[0])}</a>' for s in dash.sections)
    if dash.live and stamp is not None:
        state = (
            f'<p class="note live">Live: {len(dash.live)} still running; '
            "this page reloads when their records change.</p>"
        )
    elif dash.live:
        state = f'<p class="note live">Snapshot of {built}: {len(dash.live)} still running then.</p>'
    else:
        state = ""
    body = []
    for s in dash.sections:
        body.append(f'<section id="{s.slug}"><h2>{html.escape(s.title)}</h2>')
        body += [f'<p class="note">{html.escape(n)}</p>' for n in s.notes]
        body.append('<div class="grid">')
        for name, fig in s.figures:
            config = dict(
                PLOT_CONFIG,
                toImageButtonOptions={"format": "png", "scale": 2, "filename": f"{s.slug}_{name}"},
            )
            div = pio.to_html(
                fig,
                full_html=False,
                include_plotlyjs=False,
                div_id=_div_id(s.slug, name),
                config=config,
                default_height=f"{fig.layout.height or HEIGHT}px",
            )
            body.append(f'<div class="figure{" wide" if name in s.wide else ""}">{div}</div>')
        body.append("</div></section>")
    scripts = [_EXPORT] + [s.script for s in dash.sections if s.script]
    if dash.live and stamp is not None:
        scripts.append(_POLL % {"stamp": json.dumps(stamp), "ms": int(refresh_s * 1000)})
    glue = "\n".join(scripts[1:])
    sources = ", ".join(html.escape(hide_password(s)) for s in dash.sources)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>adabudget dashboard</title>
<style>{_STYLE}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
<script>{scripts[0]}</script>
</head><body>
<header><h1>adabudget dashboard</h1><nav>{nav}</nav>
<button type="button" onclick="exportAll('png')">Download every figure (PNG)</button>
<button type="button" onclick="exportAll('svg')">(SVG)</button>
<span class="note">PDF: adabudget dashboard … --png DIR</span></header>
<p class="note">{sources} · built {built}</p>{state}
{"".join(body)}
<script>window.addEventListener("load", () => {{
document.querySelectorAll(".js-plotly-plot").forEach((gd) => Plotly.Plots.resize(gd));
{glue}
}});</script>
</body></html>
"""


def write_html(paths: list[str], out: str | Path, status=None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_html(build(paths, status)))
    return out


# ---------------------------------------------------------------- images
def export_images(dash: Dashboard, out_dir: str | Path, formats=("png", "pdf")) -> list[Path]:
    """Every figure as an image per format, through kaleido and the system's Chromium (no
    browser is downloaded; MathJax is off, so nothing is fetched). Menus and sliders are left out."""
    kaleido = require("kaleido", "dashboard", "adabudget dashboard --png (kaleido)")

    if not any(
        shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome")
    ) and not os.environ.get("BROWSER_PATH"):
        raise DashboardError(
            "--png needs Chromium for kaleido: apt-get install chromium (or set BROWSER_PATH)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs, written = [], []
    for stem, fig in dash.figures():
        fig = fig.to_dict()
        fig["layout"].pop("sliders", None)
        fig["layout"].pop("updatemenus", None)
        height = max(EXPORT_SIZE[1], int(fig["layout"].get("height") or 0))
        for fmt in formats:
            path = out_dir / f"{stem}.{fmt}"
            opts = {
                "format": fmt,
                "width": EXPORT_SIZE[0],
                "height": height,
                "scale": 2 if fmt == "png" else 1,
            }
            jobs.append({"fig": fig, "path": str(path), "opts": opts})
            written.append(path)
    errors = kaleido.write_fig_from_object_sync(jobs, kopts={"mathjax": False})
    if errors:
        raise DashboardError(f"kaleido could not write {len(errors)} image(s): {errors[0]}")
    return written


# ---------------------------------------------------------------- serving
def stamp(paths: list[str]) -> str:
    """A fingerprint of every record file under ``paths`` (size and mtime): it changes whenever a
    run logs, allocates or finishes, or a study records a trial."""
    h = hashlib.sha1()
    for p in paths:
        if str(p).startswith(("postgresql", "mysql", "grpc://")):
            t = trials(p)  # no file to watch: the trials themselves
            h.update(t[["number", "state"]].to_csv().encode())
            continue
        base = Path(str(p).removeprefix("sqlite:///"))
        files = [base] if base.is_file() else sorted(f for f in base.rglob("*") if f.name in RECORD_FILES)
        for f in files:
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def make_server(
    paths: list[str], host: str = "127.0.0.1", port: int = 8050, status=None, refresh_s: float = 5.0
) -> http.server.ThreadingHTTPServer:
    """An HTTP server whose ``/`` is the dashboard, rebuilt from the records when they changed, and
    ``/stamp`` their fingerprint (what a live page polls). ``port=0`` picks a free port."""
    run_dirs(p for p in paths if not _is_study(p))  # fail now on a missing path, not on the first request
    lock, cache = threading.Lock(), {}

    def page() -> bytes:
        with lock:
            now = stamp(paths)
            if cache.get("stamp") != now:
                cache["html"] = to_html(build(paths, status), stamp=now, refresh_s=refresh_s).encode()
                cache["stamp"] = now
            return cache["html"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            path = self.path.split("?")[0]
            if path in ("/", "/index.html"):
                try:
                    body, kind = page(), "text/html; charset=utf-8"
                except (RecordError, OSError, ValueError) as err:  # e.g. a record being rewritten: retry
                    self.send_error(500, explain=str(err))
                    return
            elif path == "/stamp":
                body, kind = stamp(paths).encode(), "text/plain"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet: the address is printed once
            pass

    return http.server.ThreadingHTTPServer((host, port), Handler)


def serve(
    paths: list[str], host: str = "127.0.0.1", port: int = 8050, status=None, refresh_s: float = 5.0
) -> None:
    """Serve the dashboard until Ctrl-C, printing its address."""
    server = make_server(paths, host, port, status, refresh_s)
    name = f"[{host}]" if ":" in host else host
    shown = ", ".join(hide_password(p) for p in paths)
    print(f"dashboard of {shown}: http://{name}:{server.server_address[1]}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ---------------------------------------------------------------- small helpers
def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{int(v)}"


def _layers(layers) -> str:
    if isinstance(layers, str):
        layers = json.loads(layers)
    layers = list(layers or [])
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))


def _short(run_dir: str) -> str:
    p = Path(run_dir)
    return f"{p.parent.name}/{p.name}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _describe(run: pd.Series) -> str:
    bits = [str(run.get("method")), str(run.get("status"))]
    if run.get("status") == "running":
        bits[-1] += " (live)" if run.get("alive") else " (its process is gone)"
    metric = run.get("primary_metric")
    value = run.get(f"dev.{metric}")
    if value is not None and not pd.isna(value):
        bits.append(f"dev {metric} {value:.4f}")
    if run.get("final_params") is not None and not pd.isna(run.get("final_params")):
        bits.append(f"{int(run['final_params']):,} params")
    return ", ".join(bits)
