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
from adabudget.analysis.records import (  # the private two: one rule each, in one place
    RecordError,
    _final_params,
    _guess_module,
    _with_driver,
    hide_password,
    load,
    load_study,
    read_result,
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
    controls: dict = field(default_factory=dict)  # figure name -> HTML shown above it


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
    cells: dict = {}  # a dict, not pivot_table: ~50x faster, and a study draws one grid per trial
    for m, layer, rank in zip(ranks["matrix"], ranks["layer"], ranks["rank"]):
        if rank is not None and not pd.isna(rank):
            cells[m, layer] = cells.get((m, layer), 0) + int(rank)
    return [[cells.get((m, layer)) for layer in layers] for m in matrices]


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


def rank_trajectory(ranks: pd.DataFrame):
    """Every module's rank over the whole run: one heatmap, a row per module (layer, then matrix in
    block order) and a column per allocation step (at most ``MAX_SLIDER_STEPS``, evenly spaced)."""
    import plotly.graph_objects as go

    r = _with_matrix(ranks)
    layers, matrices = _axes(r)
    steps = _evenly(sorted(r["step"].unique()), MAX_SLIDER_STEPS)
    rows = [(layer, m) for layer in layers for m in matrices]
    cells: dict = {}
    for layer, m, step, rank in zip(r["layer"], r["matrix"], r["step"], r["rank"]):
        if rank is not None and not pd.isna(rank):
            cells[layer, m, step] = cells.get((layer, m, step), 0) + int(rank)
    rows = [row for row in rows if any((*row, s) in cells for s in steps)]  # no empty rows
    z = [[cells.get((layer, m, s)) for s in steps] for layer, m in rows]  # (modules, steps)
    zmax = r["init_rank"].max() if r["init_rank"].notna().any() else r["rank"].max()
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[str(int(s)) for s in steps],
            y=[f"layer {layer} · {m}" for layer, m in rows],
            customdata=[[[layer, m]] * len(steps) for layer, m in rows],
            zmin=0,
            zmax=zmax,
            colorscale="Viridis",
            colorbar={"title": {"text": "rank"}},
            xgap=1 if len(steps) <= 60 else 0,
            ygap=1,
            texttemplate="%{z}" if len(steps) <= 30 else None,
            hovertemplate="step %{x}, %{y}: rank %{z}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"Rank trajectory: {len(rows)} modules x {len(steps)} allocations (click a row)",
        height=max(HEIGHT, 18 * len(rows) + 160),
    )
    fig.update_xaxes(title="allocation step", type="category")
    fig.update_yaxes(title="module", type="category", autorange="reversed")
    return fig


# Links the trajectory and the final heatmap: a click on a module (a row of the trajectory, a cell
# of the final heatmap) outlines it in both.
_TRAJECTORY_GLUE = """(function () {
  const fin = document.getElementById(%(final)s), traj = document.getElementById(%(trajectory)s);
  function mark(layer, matrix) {
    const rows = traj.data[0].y, row = rows.indexOf("layer " + layer + " · " + matrix);
    const col = fin.data[0].x.map(String).indexOf(String(layer)), cell = fin.data[0].y.indexOf(matrix);
    const box = {type: "rect", line: {color: "#e4002b", width: 3}, fillcolor: "rgba(0,0,0,0)"};
    Plotly.relayout(traj, {shapes: row < 0 ? [] : [Object.assign({}, box,
      {xref: "paper", x0: 0, x1: 1, yref: "y", y0: row - 0.5, y1: row + 0.5})]});
    Plotly.relayout(fin, {shapes: col < 0 || cell < 0 ? [] : [Object.assign({}, box,
      {xref: "x", x0: col - 0.5, x1: col + 0.5, yref: "y", y0: cell - 0.5, y1: cell + 0.5})]});
  }
  fin.on("plotly_click", (ev) => mark(ev.points[0].x, ev.points[0].y));
  traj.on("plotly_click", (ev) => mark(ev.points[0].customdata[0], ev.points[0].customdata[1]));
})();"""


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
        sec.figures.append(("rank_trajectory", rank_trajectory(ranks)))
        sec.figures.append(("rank_steps", allocation_slider(ranks)))
        sec.script += _TRAJECTORY_GLUE % {
            "final": json.dumps(_div_id(sec.slug, "rank_final")),
            "trajectory": json.dumps(_div_id(sec.slug, "rank_trajectory")),
        }
        sec.notes.append("Click a module in the rank trajectory or the final heatmap to outline it in both.")
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
            marker={"size": 10 if len(sampled) <= 200 else 6},
            hovertemplate="trial %{customdata}<br>%{x}<br>%{y}<extra></extra>",
            **kw,
        )
    )
    fig.add_trace(
        go.Scatter(
            x=base[x],
            y=base[y],
            mode="markers",
            name="baseline",
            customdata=base["number"],
            text=base["baseline"],
            marker={"size": 15, "symbol": "star", "color": "#ff7f0e"},
            hovertemplate="trial %{customdata} (baseline %{text})<br>%{x}<br>%{y}<extra></extra>",
            **kw,
        )
    )
    for label in baseline_labels(base[x].tolist(), base[y].tolist(), base["baseline"].tolist(), tr[x]):
        fig.add_annotation(
            **label, showarrow=True, arrowhead=0, arrowcolor="#ff7f0e", font={"size": 11}, bgcolor="white"
        )


LABEL_STEP_PX = 18  # vertical distance between two stacked baseline labels (11 px text + margin)


def baseline_labels(xs: list, ys: list, names: list, every_x) -> list[dict]:
    """One annotation per baseline: its name on a leader line above its point. Baselines whose x
    lie within 15% of the axis' span of each other (sized to one budget, or enqueued one after the
    other) share a column: their labels are stacked, the lowest point's label nearest, each next
    one ``LABEL_STEP_PX`` higher, so no two labels overlap; baselines at one (x, y) share a label."""
    span = (max(every_x) - min(every_x)) if len(every_x) else 0
    points: dict = {}
    for x, y, name in zip(xs, ys, names):
        if x is None or y is None or pd.isna(x) or pd.isna(y):
            continue
        points.setdefault((x, y), []).append(str(name))
    order = sorted(points, key=lambda p: p[0])
    clusters: list[list] = []
    for p in order:
        if clusters and p[0] - clusters[-1][0][0] <= 0.15 * span:
            clusters[-1].append(p)
        else:
            clusters.append([p])
    labels = []
    for cluster in clusters:
        for k, (x, y) in enumerate(sorted(cluster, key=lambda p: p[1])):  # lowest y first
            labels.append(
                {"x": x, "y": y, "text": " / ".join(points[x, y]), "ax": 0, "ay": -(22 + LABEL_STEP_PX * k)}
            )
    return labels


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
    """Optuna's parameter importances (its default evaluator), one bar per objective; None, a
    reason and {} when fewer than two sampled trials completed. Also returns the importances per
    objective (the parallel coordinates order their axes by the objective they colour by)."""
    import optuna
    import plotly.graph_objects as go

    copy, keep = _sampled_study(study)
    if len(keep) < 2:
        return (
            None,
            f"Parameter importances need two or more completed sampled trials; this study has {len(keep)}.",
            {},
        )
    fig, notes, top = go.Figure(), [], {}
    for i, name in enumerate(objectives):
        values = {t.values[i] for t in keep}
        if len(values) < 2:
            notes.append(f"{name} is the same in every sampled trial: its importances are uninformative.")
        sign = -1.0 if study.directions[i].name == "MAXIMIZE" else 1.0  # the evaluator looks for low values
        with warnings.catch_warnings():  # a small study makes it warn about every parameter
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(copy, target=lambda t, i=i, s=sign: s * t.values[i])
        top[name] = dict(imp) if len(values) > 1 else {}
        params = list(imp)[::-1]
        fig.add_trace(go.Bar(x=[imp[p] for p in params], y=params, orientation="h", name=name))
    fig.update_layout(
        title="Parameter importances (Optuna)", barmode="group", height=max(HEIGHT, 24 * len(params) + 160)
    )
    fig.update_xaxes(title="importance")
    fig.update_yaxes(title="parameter")
    return fig, " ".join(notes), top


MAX_PARALLEL_AXES = 8  # parameter axes drawn at first; the others wait behind a checkbox each
NOT_SAMPLED = "not sampled"


def _parallel_axis(name: str, values: pd.Series, dist) -> dict:
    """One parallel-coordinates dimension; a trial that did not sample the parameter (a conditional
    space) sits on a "not sampled" tick below the axis' range."""
    import optuna

    present = values.dropna()
    categorical = isinstance(dist, optuna.distributions.CategoricalDistribution) or not (
        pd.api.types.is_numeric_dtype(present) and not pd.api.types.is_bool_dtype(present)
    )
    if categorical:
        choices = list(dist.choices) if dist is not None else sorted(set(present), key=str)
        index = {c: i for i, c in enumerate(choices)}
        coded = values.map(lambda v: index.get(v) if v is not None and not pd.isna(v) else None)
        tickvals, ticktext = list(range(len(choices))), [str(c) for c in choices]
        lo, hi = 0.0, float(max(len(choices) - 1, 1))
    else:
        log = bool(getattr(dist, "log", False)) and (present > 0).all()
        coded = values.astype(float).map(math.log10) if log else values.astype(float)
        lo, hi = float(coded.min()), float(coded.max())
        if log:
            decades = range(math.floor(lo), math.ceil(hi) + 1)
            tickvals, ticktext = list(decades), [f"1e{d}" for d in decades]
        else:
            tickvals, ticktext = None, None
    if hi <= lo:
        hi = lo + 1.0
    dim = {"label": name, "range": [lo, hi]}
    if coded.isna().any():
        missing = lo - 0.2 * (hi - lo)
        coded = coded.fillna(missing)
        dim["range"] = [missing, hi]
        if tickvals is None:  # plotly's own ticks, plus the missing one
            tickvals = [lo + (hi - lo) * i / 4 for i in range(5)]
            ticktext = [f"{v:.3g}" for v in tickvals]
        tickvals, ticktext = [missing, *tickvals], [NOT_SAMPLED, *ticktext]
    if tickvals is not None:
        dim.update(tickvals=tickvals, ticktext=ticktext)
    dim["values"] = [float(v) for v in coded]
    return dim


def parallel_figure(tr: pd.DataFrame, objective: str, maximise: bool, order: dict, dists: dict):
    """Parallel coordinates of the sampled, completed trials against ``objective``: one axis per
    parameter, the ``MAX_PARALLEL_AXES`` most important (``order``: Optuna's importances) drawn,
    the others hidden until their checkbox (``parallel_controls``) shows them."""
    import plotly.graph_objects as go

    done = tr[(tr["state"] == "complete") & tr["baseline"].isna() & tr[objective].notna()]
    cols = [c for c in tr.columns if c.startswith("param.") and done[c].notna().any()]
    if not len(done) or not cols:
        return None, "Parallel coordinates need a completed sampled trial; this study has none.", []
    names = [c.removeprefix("param.") for c in cols]
    # most important first; then the parameters most trials have; then by name
    names.sort(key=lambda n: (-order.get(n, -1.0), -int(done["param." + n].notna().sum()), n))
    dims = [_parallel_axis(n, done["param." + n], dists.get(n)) for n in names]
    for i, d in enumerate(dims):
        d["visible"] = i < MAX_PARALLEL_AXES
    dims.append({"label": objective, "values": [float(v) for v in done[objective]]})
    fig = go.Figure(
        go.Parcoords(
            dimensions=dims,
            line={
                "color": [float(v) for v in done[objective]],
                "colorscale": "Viridis",
                "reversescale": not maximise,
                "showscale": True,
                "colorbar": {"title": {"text": objective}},
            },
            labelangle=-20,
        )
    )
    shown = min(len(names), MAX_PARALLEL_AXES)
    fig.update_layout(
        title=_parallel_title(shown, len(names), objective), height=HEIGHT + 60, margin={"t": 130, "l": 80}
    )
    return fig, "", names


def _parallel_title(shown: int, total: int, objective: str) -> str:
    return f"Parallel coordinates: {shown} of {total} parameters (most important first) and {objective}"


# A parameter's checkbox shows or hides its axis (plotly's ``dimensions[i].visible``) and retitles.
_AXES_GLUE = """(function () {
  const gd = document.getElementById(%(id)s), box = document.getElementById(%(id)s + "-axes");
  box.addEventListener("change", (ev) => {
    const i = Number(ev.target.dataset.axis);
    const shown = box.querySelectorAll("input:checked").length;
    Plotly.restyle(gd, {["dimensions[" + i + "].visible"]: ev.target.checked}, [0]);
    Plotly.relayout(gd, {"title.text": %(before)s + shown + %(after)s});
  });
})();"""


def parallel_controls(fig_id: str, names: list[str], objective: str) -> tuple[str, str]:
    """The checkbox list under the parallel coordinates (one per parameter, the drawn ones ticked)
    and the glue that shows or hides an axis when its box changes."""
    boxes = "".join(
        f'<label><input type="checkbox" data-axis="{i}"{" checked" if i < MAX_PARALLEL_AXES else ""}>'
        f"{html.escape(n)}</label> "
        for i, n in enumerate(names)
    )
    control = (
        f'<details class="axes" id="{fig_id}-axes"><summary>Axes: {len(names)} parameters '
        f"({min(len(names), MAX_PARALLEL_AXES)} drawn, most important first)</summary>{boxes}</details>"
    )
    glue = _AXES_GLUE % {
        "id": json.dumps(fig_id),
        "before": json.dumps("Parallel coordinates: "),
        "after": json.dumps(
            _parallel_title(0, len(names), objective).removeprefix("Parallel coordinates: 0")
        ),
    }
    return control, glue


def _trial_ranks(tr: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Each trial's final ranks (rank rows as ``records.load`` gives them) and final parameters,
    read from its ``result.json`` alone (its ``ranks`` and ``modules``): a study's view needs no
    metric or allocation history, and reading 500 records whole took seconds. A trial still
    training has no final ranks yet: its last allocation (the last line of ``ranks.jsonl``)."""
    rows, final = [], {}
    for d in tr["run_dir"].dropna().unique():
        path = Path(d)
        try:
            result = read_result(path)
        except RecordError:
            continue  # not trained yet (no record), or being written: the next build reads it
        rid = str(path.resolve())
        final[rid] = _final_params(result)
        ranks, step = result.get("ranks"), result.get("steps")
        if not ranks and (path / "ranks.jsonl").is_file():
            lines = (path / "ranks.jsonl").read_text().splitlines()
            last = next((json.loads(x) for x in reversed(lines) if x.strip().endswith("}")), {})
            ranks, step = last.get("ranks"), last.get("step")
        modules = {m["name"]: m for m in result.get("modules") or []}
        for name, rank in (ranks or {}).items():
            info = modules.get(name) or _guess_module(name)
            rows.append(
                {
                    "run_dir": rid,
                    "step": step or 0,
                    "module": name,
                    "layer": info["layer"],
                    "role": info["role"],
                    "init_rank": info.get("init_rank"),
                    "rank": rank,
                }
            )
    columns = ["run_dir", "step", "module", "layer", "role", "init_rank", "rank"]
    return pd.DataFrame(rows, columns=columns), final


def trial_ranks_figure(tr: pd.DataFrame, ranks: pd.DataFrame, first: int | None):
    """The rank pattern of one trial at a time: a menu over the trials (and the Pareto front's and
    history's click handler) swaps the heatmap."""
    import plotly.graph_objects as go

    by_dir = {str(Path(d).resolve()): n for n, d in zip(tr["number"], tr["run_dir"]) if isinstance(d, str)}
    ranks = ranks[ranks["run_dir"].isin(by_dir)]
    if not len(ranks):
        return None
    r = _with_matrix(ranks)
    layers, matrices = _axes(r)
    zmax = r["init_rank"].max() if r["init_rank"].notna().any() else r["rank"].max()
    own_rows = dict(tuple(r.groupby("run_dir")))
    baselines = dict(zip(tr["number"], tr["baseline"]))
    buttons = []
    for rid, n in sorted(by_dir.items(), key=lambda kv: kv[1]):
        own = own_rows.get(rid)
        what = f"baseline {baselines[n]}" if isinstance(baselines[n], str) else "sampled"
        if own is not None:
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
    ranks, final = _trial_ranks(tr)
    if final:  # the params a table reports: final, the head excluded
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
    with_ranks = set(ranks["run_dir"])
    has_ranks = done["run_dir"].map(lambda d: isinstance(d, str) and str(Path(d).resolve()) in with_ranks)
    # the rank figure opens on the best trial that has an allocation
    pool = done[has_ranks] if has_ranks.any() else done
    best = pool.sort_values(objective, ascending=not maximise[k]).iloc[0]["number"]
    sec.figures.append(("history", history_figure(tr, objective, maximise[k])))
    if tr[params].notna().any():
        sec.figures.append(("pareto", pareto_figure(tr, objective, params, maximise[k])))
    fig, note, importance = importance_figure(study, objectives)
    if fig is not None:
        sec.figures.append(("importances", fig))
    if note:
        sec.notes.append(note)
    dists: dict = {}
    for t in study.get_trials(deepcopy=False):
        dists.update(t.distributions)
    fig, note, axes = parallel_figure(tr, objective, maximise[k], importance.get(objective, {}), dists)
    if fig is not None:
        sec.figures.append(("parallel", fig))
        sec.wide.add("parallel")
        if len(axes) > MAX_PARALLEL_AXES:
            control, glue = parallel_controls(_div_id(slug, "parallel"), axes, objective)
            sec.controls["parallel"] = control
            sec.script += glue
    if note:
        sec.notes.append(note)
    ranks_fig = trial_ranks_figure(tr, ranks, int(best)) if len(ranks) else None
    if ranks_fig is not None:
        sec.figures.append(("trial_ranks", ranks_fig))
        sources = [
            _div_id(slug, n) for n in ("history", "pareto") if any(name == n for name, _ in sec.figures)
        ]
        sec.script += _CLICK_GLUE % {
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
details.axes { font-size: .85em; padding: .3em .5em; }
details.axes label { white-space: nowrap; margin-right: .6em; }
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


NONCE = "@@adabudget-nonce@@"  # in a served page's script tags; each response puts its own nonce there


def plotly_js() -> tuple[str, bytes]:
    """plotly.js and the URL the served page loads it from: named by its content's hash, so a
    browser may cache it for good (a new plotly gets a new name)."""
    if "js" not in _PLOTLY:
        from plotly.offline import get_plotlyjs

        js = get_plotlyjs().encode()
        _PLOTLY["js"] = (f"plotly-{hashlib.sha256(js).hexdigest()[:16]}.min.js", js)
    return _PLOTLY["js"]


_PLOTLY: dict = {}


def to_html(
    dash: Dashboard, stamp: str | None = None, refresh_s: float = 5.0, plotly_src: str | None = None
) -> str:
    """One HTML page holding every figure. plotly.js is inlined (the page opens with no network)
    unless ``plotly_src`` names the URL it is served at (the served page; then every script tag
    carries the ``NONCE`` placeholder that the server fills per response, for its CSP).
    With ``stamp`` (served pages), the page reloads when the server's stamp changes while runs live."""
    import plotly.io as pio

    nonce = f' nonce="{NONCE}"' if plotly_src else ""
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
            if nonce:  # plotly's own tags (``<script>``, ``<script type="text/javascript">``)
                div = re.sub(r"<script(?=[\s>])", f"<script{nonce}", div)
            wide = " wide" if name in s.wide else ""
            body.append(f'<div class="figure{wide}">{s.controls.get(name, "")}{div}</div>')
        body.append("</div></section>")
    scripts = [s.script for s in dash.sections if s.script]
    if dash.live and stamp is not None:
        scripts.append(_POLL % {"stamp": json.dumps(stamp), "ms": int(refresh_s * 1000)})
    glue = "\n".join(scripts)
    sources = ", ".join(html.escape(hide_password(s)) for s in dash.sources)
    if plotly_src:
        plotly = f'<script src="{html.escape(plotly_src)}"{nonce}></script>'
    else:
        plotly = f'<script type="text/javascript">{plotly_js()[1].decode()}</script>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>adabudget dashboard</title>
<style>{_STYLE}</style>
{plotly}
<script{nonce}>{_EXPORT}</script>
</head><body>
<header><h1>adabudget dashboard</h1><nav>{nav}</nav>
<button type="button" id="export-png">Download every figure (PNG)</button>
<button type="button" id="export-svg">(SVG)</button>
<span class="note">PDF: adabudget dashboard … --png DIR</span></header>
<p class="note">{sources} · built {built}</p>{state}
{"".join(body)}
<script{nonce}>window.addEventListener("load", () => {{
document.getElementById("export-png").addEventListener("click", () => exportAll("png"));
document.getElementById("export-svg").addEventListener("click", () => exportAll("svg"));
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
class Watch:
    """The fingerprint of the records under ``paths`` (what a live page polls, every few seconds
    per open tab): cheap. The record files (``RECORD_FILES``) are listed once and again every
    ``RELIST_S`` seconds, or as soon as a folder holding them changes (a new run folder, a new
    trial); each poll only stats them and those folders. A database study is one query: its
    trials' count, largest id and last completion per state, and its last intermediate value."""

    RELIST_S = 60.0
    SKIP = {"checkpoints", "adapter", "merged", ".git", "__pycache__"}  # large, and never a record

    def __init__(self, paths: list[str]):
        self.paths = [str(p) for p in paths]
        self._files: list[Path] = []
        self._dirs: dict[Path, int] = {}  # folder -> mtime when listed
        self._listed = -math.inf
        self._engines: dict = {}

    def _list(self) -> None:
        files, dirs = [], {}
        for p in self.paths:
            if "://" in p and not p.startswith("sqlite:///"):
                continue
            base = Path(p.removeprefix("sqlite:///"))
            if base.is_file():
                files.append(base)
                continue
            for top, subdirs, names in os.walk(base):
                subdirs[:] = [d for d in subdirs if d not in self.SKIP]
                found = [Path(top, n) for n in names if n in RECORD_FILES]
                files += found
                if found or top == str(base) or Path(top).name in ("trials", "search"):
                    for d in (Path(top), Path(top).parent):
                        dirs[d] = _mtime(d)
        self._files, self._dirs, self._listed = sorted(files), dirs, time.monotonic()

    def _query(self, url: str) -> str:
        """One cheap query on an Optuna RDB storage (no trial is loaded)."""
        import sqlalchemy

        if url not in self._engines:
            self._engines[url] = sqlalchemy.create_engine(
                _with_driver(url), poolclass=sqlalchemy.pool.NullPool
            )
        with self._engines[url].connect() as c:
            states = c.execute(
                sqlalchemy.text(
                    "SELECT state, COUNT(*), MAX(trial_id), MAX(datetime_complete) FROM trials GROUP BY state"
                )
            ).all()
            last = c.execute(
                sqlalchemy.text("SELECT MAX(trial_intermediate_value_id) FROM trial_intermediate_values")
            )
            return repr(sorted(map(tuple, states), key=str)) + repr(last.scalar())

    def stamp(self) -> str:
        h = hashlib.sha1()
        if time.monotonic() - self._listed > self.RELIST_S or any(
            _mtime(d) != m for d, m in self._dirs.items()
        ):
            self._list()
        for p in self.paths:
            if p.startswith(("postgresql", "mysql", "sqlite:")):
                h.update(self._query(p).encode())
            elif p.startswith("grpc://"):  # a proxy answers for trials only: their number and states
                t = trials(p)
                h.update(t[["number", "state"]].to_csv().encode())
        for f in self._files:
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()[:16]


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return -1


def stamp(paths: list[str]) -> str:
    """A fingerprint of every record file under ``paths`` (size and mtime): it changes whenever a
    run logs, allocates or finishes, or a study records a trial. (One-off; a server keeps a ``Watch``.)"""
    return Watch(paths).stamp()


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def allowed_hosts(host: str, port: int) -> set[str]:
    """The ``Host`` headers the server answers: the loopback names (and, bound beyond loopback,
    this machine's names and the ``--host`` given) with its port. Any other name is refused: a page
    on another site whose name an attacker points at 127.0.0.1 (DNS rebinding) sends its own name."""
    import socket

    names = set(LOOPBACK_NAMES)
    if not is_loopback(host):
        names |= {host, socket.gethostname(), socket.getfqdn()}
    out = set()
    for n in names:
        n = n.strip("[]").lower()
        out.add(f"[{n}]:{port}" if ":" in n else f"{n}:{port}")
    return out


def _host_ok(header: str | None, allowed: set[str], port: int) -> bool:
    """``header`` names an allowed host (an IP literal is always fine: no DNS, no rebinding)."""
    import ipaddress

    if not header:
        return False
    header = header.strip().lower()
    if header in allowed:
        return True
    name, _, got = header.rpartition(":")
    if not name or got != str(port):
        return False
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


def csp(nonce: str) -> str:
    """The served page's Content-Security-Policy: scripts only from this server or with this
    response's nonce; plotly.js's WebGL traces (parallel coordinates) compile their shaders' glue
    with ``new Function`` (regl), hence 'unsafe-eval'; plotly sets inline styles, hence
    style-src 'unsafe-inline'; the image downloads draw through data: and blob: URLs."""
    return (
        f"default-src 'none'; script-src 'self' 'nonce-{nonce}' 'unsafe-eval'; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def make_server(
    paths: list[str], host: str = "127.0.0.1", port: int = 8050, status=None, refresh_s: float = 5.0
) -> http.server.ThreadingHTTPServer:
    """An HTTP server whose ``/`` is the dashboard, rebuilt from the records when they changed,
    ``/stamp`` their fingerprint (what a live page polls) and ``/plotly-<hash>.min.js`` plotly.js,
    cacheable for good. ``port=0`` picks a free port. A request whose ``Host`` header is not this
    server's (``allowed_hosts``) gets 403."""
    import secrets

    run_dirs(p for p in paths if not _is_study(p))  # fail now on a missing path, not on the first request
    lock, cache, watch = threading.Lock(), {}, Watch(paths)
    js_name, js = plotly_js()
    js_etag = f'"{js_name}"'

    def page() -> tuple[bytes, str]:
        with lock:
            now = watch.stamp()
            if cache.get("stamp") != now:
                dash = build(paths, status)
                cache["html"] = to_html(dash, stamp=now, refresh_s=refresh_s, plotly_src=js_name).encode()
                cache["stamp"] = now
            return cache["html"], now

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if not _host_ok(self.headers.get("Host"), server.allowed, server.server_address[1]):
                self.send_error(
                    403,
                    explain=f"Host {self.headers.get('Host')!r} is not this dashboard's "
                    f"({', '.join(sorted(server.allowed))}): refused (DNS rebinding)",
                )
                return
            path = self.path.split("?")[0]
            headers = {"Cache-Control": "no-store"}
            if path in ("/", "/index.html"):
                try:
                    body, _ = page()
                except (RecordError, OSError, ValueError) as err:  # e.g. a record being rewritten: retry
                    self.send_error(500, explain=str(err))
                    return
                nonce = secrets.token_urlsafe(16)
                body = body.replace(NONCE.encode(), nonce.encode())
                kind = "text/html; charset=utf-8"
                headers["Content-Security-Policy"] = csp(nonce)
            elif path == "/stamp":
                with lock:
                    body, kind = watch.stamp().encode(), "text/plain"
            elif path == "/" + js_name:
                headers = {"Cache-Control": "public, max-age=31536000, immutable", "ETag": js_etag}
                if self.headers.get("If-None-Match") == js_etag:
                    self.send_response(304)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    return
                body, kind = js, "text/javascript; charset=utf-8"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def send_error(self, code, message=None, explain=None):
            self.error_message_format = "%(code)d %(message)s: %(explain)s\n"
            self.error_content_type = "text/plain; charset=utf-8"
            super().send_error(code, message, explain)

        def end_headers(self):  # every answer, errors and 304 included
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            super().end_headers()

        def log_message(self, *args):  # quiet: the address is printed once
            pass

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.allowed = allowed_hosts(host, server.server_address[1])
    return server


def serve(
    paths: list[str], host: str = "127.0.0.1", port: int = 8050, status=None, refresh_s: float = 5.0
) -> None:
    """Serve the dashboard until Ctrl-C, printing its address (and a warning on stderr when
    ``host`` is not a loopback address: the records are then readable by whoever reaches it)."""
    import sys

    server = make_server(paths, host, port, status, refresh_s)
    name = f"[{host}]" if ":" in host else host
    shown = ", ".join(hide_password(p) for p in paths)
    if not is_loopback(host):
        print(
            f"warning: --host {host} serves the dashboard beyond this machine: anyone who reaches "
            f"port {server.server_address[1]} reads these records (no login, plain HTTP); prefer the "
            "default 127.0.0.1 and an SSH tunnel (ssh -L 8050:127.0.0.1:8050 HOST)",
            file=sys.stderr,
            flush=True,
        )
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
