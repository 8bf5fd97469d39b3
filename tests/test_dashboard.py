"""adabudget dashboard in a real headless Chromium (Debian's ``chromium``, driven by playwright
with ``executable_path``; CI installs it): built from real tiny records (two AdaLoRA runs that
differ in ``method.score``, a run that is still alive, a study of three trials), the exported file
opened from disk with every network request refused, the served page, the allocation slider, a
click on a study trial, the live reload, and the PNG/PDF export through kaleido."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from adabudget.compose import compose
from adabudget.training import train
from conftest import TINY_ADALORA, TINY_RUN

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)"
)
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
CLI = [sys.executable, "-c", "from adabudget.cli import main; main()"]
# Chromium resolves no host name at all (the pages need none); 127.0.0.1 stays reachable
NO_DNS = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Real records: runs ``adalora`` and ``sensitivity`` (trained here), a live run (a subprocess
    stopped with SIGSTOP after its first allocations: its pid lives, so its record reads as live),
    and a study (``search.space=lr`` over AdaLoRA, the AdaLoRA baseline enqueued, 3 trials)."""
    root = tmp_path_factory.mktemp("dash")
    base = TINY_RUN + TINY_ADALORA + [f"runs_root={root}"]
    search = CLI + [
        "search",
        "model=tiny-bert",
        "debug=fast",
        "train.max_steps=6",
        "train.eval_every=3",
        "train.num_threads=1",
        *TINY_ADALORA,
        "search.space=lr",
        "search.objectives=[dev.accuracy,params]",
        "search.enqueue=[adalora]",
        "search.n_trials=3",
        f"runs_root={root}",
    ]
    study_proc = subprocess.Popen(
        search, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    live_cmd = CLI + [
        "train",
        *base,
        "run_name=live",
        # Long enough that it cannot end before it is stopped, however fast the machine (CI's ran
        # 400 steps while this process trained the two runs above): allocations from step 8.
        "train.max_steps=1000000",
        "method.warmup_steps=8",
        "method.final_steps=8",
        "train.log_every=1",
        "train.eval_every=0",
    ]
    live = subprocess.Popen(live_cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        runs = {
            score: Path(train(compose(base + [f"run_name={score}", f"method.score={score}"]))["run_dir"])
            for score in ("adalora", "sensitivity")
        }
        deadline = time.time() + 300
        while time.time() < deadline and not any(
            _lines(p) >= 3 for p in (root / "live").rglob("ranks.jsonl")
        ):
            assert live.poll() is None, "the live run ended before its first allocations"
            time.sleep(0.2)
        assert live.poll() is None, "the live run ended before it was stopped"
        live.send_signal(signal.SIGSTOP)  # alive (its pid exists), silent, and no CPU while the tests run
        out, _ = study_proc.communicate(timeout=600)
        assert study_proc.returncode == 0, out[-3000:]
        yield {
            **runs,
            "live": next((root / "live").glob("*/result.json")).parent,
            "live_proc": live,
            "study": root / "search" / "lr-mr",
            "root": root,
        }
    finally:
        study_proc.kill()
        live.kill()
        live.wait()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", NO_DNS])
        yield b
        b.close()


def _open(browser, url: str, allowed: str):
    """A page on ``url`` whose every request to anything but ``allowed`` is aborted (and recorded)."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    refused, errors = [], []

    def route(r):
        if r.request.url.startswith(allowed) or r.request.url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            refused.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on(
        "request", lambda r: None if r.url.startswith((allowed, "data:", "blob:")) else refused.append(r.url)
    )
    page.goto(url)
    page.wait_for_load_state("load")
    page.wait_for_function(
        "document.querySelectorAll('.js-plotly-plot').length > 0 && "
        "[...document.querySelectorAll('.js-plotly-plot')].every((g) => g._fullLayout)"
    )
    return page, refused, errors


def _check_every_figure_drawn(page) -> list[str]:
    """Every figure div holds a drawn SVG (plotly's main-svg with marks of non-zero size) and a title."""
    figures = page.evaluate("""[...document.querySelectorAll('.js-plotly-plot')].map((gd) => {
        const svg = gd.querySelector('svg.main-svg');
        const sel = 'g.hm image, g.trace path, g.point, g.parcoords g.y-axis path.domain';
        const marks = [...gd.querySelectorAll(sel)].filter((m) => {
            const b = m.getBoundingClientRect(); return b.width > 0 || b.height > 0; });
        const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
        return {id: gd.id, w: box.width, h: box.height, marks: marks.length, traces: gd.data.length,
                title: (gd.layout.title && gd.layout.title.text) || ''};
    })""")
    for f in figures:
        assert f["w"] > 200 and f["h"] > 200 and f["marks"] > 0 and f["traces"] > 0, f
        assert f["title"], f
    return [f["id"] for f in figures]


def _slider_changes_heatmap(page, fig_id: str) -> None:
    """Drag the allocation slider to its first step: the heatmap's z (and title) must change."""
    before = page.evaluate(f"document.getElementById('{fig_id}').data[0].z")
    page.locator(f"#{fig_id}").scroll_into_view_if_needed()
    rail = page.locator(f"#{fig_id} .slider-rail-rect").bounding_box()
    grip = page.locator(f"#{fig_id} .slider-grip-rect").bounding_box()
    page.mouse.move(grip["x"] + grip["width"] / 2, grip["y"] + grip["height"] / 2)
    page.mouse.down()
    page.mouse.move(rail["x"] + 1, rail["y"] + rail["height"] / 2, steps=8)
    page.mouse.up()
    page.wait_for_function(f"document.getElementById('{fig_id}').layout.title.text.includes('step 0:')")
    after = page.evaluate(f"document.getElementById('{fig_id}').data[0].z")
    assert after != before
    assert {v for row in after for v in row if v is not None} == {4}  # step 0: every matrix at init_r


def _click_changes_trial(page, source: str, target: str) -> None:
    """Click a trial in ``source`` (history or Pareto front): ``target`` shows that trial's ranks."""
    shown = page.evaluate(f"document.getElementById('{target}').layout.updatemenus[0].active")
    labels = page.evaluate(
        f"document.getElementById('{target}').layout.updatemenus[0].buttons.map((b) => b.label)"
    )
    page.locator(f"#{source}").scroll_into_view_if_needed()
    points = page.evaluate(f"""(() => {{
        const gd = document.getElementById('{source}');
        const out = [];
        gd.querySelectorAll('g.trace.scatter').forEach((g, i) => {{
            const cd = gd._fullData[i].customdata;
            g.querySelectorAll('path.point').forEach((p, j) => {{
                const b = p.getBoundingClientRect();
                if (cd && b.width) out.push({{n: cd[j], x: b.x + b.width / 2, y: b.y + b.height / 2}});
            }});
        }});
        return out;
    }})()""")
    pick = next(p for p in points if labels.index(f"trial {p['n']}") != shown)
    page.mouse.move(pick["x"], pick["y"])
    page.mouse.click(pick["x"], pick["y"])
    i = labels.index(f"trial {pick['n']}")
    page.wait_for_function(f"document.getElementById('{target}').layout.updatemenus[0].active === {i}")
    state = page.evaluate(f"""(() => {{ const gd = document.getElementById('{target}');
        return {{z: gd.data[0].z, title: gd.layout.title.text,
                 want: gd.layout.updatemenus[0].buttons[{i}].args[0].z[0]}}; }})()""")
    assert state["z"] == state["want"] and f"trial {pick['n']}" in state["title"].lower()


def _click_links_trajectory_and_final(page, run: str) -> None:
    """Click a cell of the final heatmap: that module is outlined there and its row in the rank
    trajectory; then click another row of the trajectory: the outline moves in both."""
    final, traj = f"fig-{run}-rank_final", f"fig-{run}-rank_trajectory"

    def click_cell(div: str, x_index: int, y_index: int) -> None:
        page.locator(f"#{div}").scroll_into_view_if_needed()
        at = page.evaluate(f"""(() => {{ const gd = document.getElementById('{div}');
            const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
            const box = gd.querySelector('.nsewdrag').getBoundingClientRect();
            return {{x: box.x + xa.l2p({x_index}), y: box.y + ya.l2p({y_index})}}; }})()""")
        page.mouse.move(at["x"], at["y"])
        page.mouse.click(at["x"], at["y"])

    def outlines() -> dict:
        return page.evaluate(f"""(() => {{ const f = document.getElementById('{final}'),
            t = document.getElementById('{traj}');
            return {{final: (f.layout.shapes || []).map((s) => [s.x0 + 0.5, s.y0 + 0.5]),
                     traj: (t.layout.shapes || []).map((s) => s.y0 + 0.5),
                     rows: t.data[0].y, cols: f.data[0].x.map(String), cells: f.data[0].y}}; }})()""")

    click_cell(final, 1, 0)  # layer at x index 1, the first matrix
    page.wait_for_function(f"(document.getElementById('{traj}').layout.shapes || []).length === 1")
    got = outlines()
    assert got["final"] == [[1, 0]]
    assert got["rows"][int(got["traj"][0])] == f"layer {got['cols'][1]} · {got['cells'][0]}"
    other = next(i for i, row in enumerate(got["rows"]) if row != got["rows"][int(got["traj"][0])])
    click_cell(traj, 0, other)  # the first allocation's column, another module's row
    page.wait_for_function(f"(document.getElementById('{traj}').layout.shapes || [])[0].y0 + 0.5 === {other}")
    got = outlines()
    layer, matrix = got["rows"][other].removeprefix("layer ").split(" · ")
    assert got["final"] == [[got["cols"].index(layer), got["cells"].index(matrix)]]


def _screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    data = path.read_bytes()
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and width >= 1400 and height > 3000 and len(data) > 100_000
    print(f"screenshot: {path} ({width}x{height}, {len(data) // 1024} KiB)")


@needs_chromium
def test_exported_file_opens_offline(records, browser, tmp_path, capsys):
    from adabudget.cli import main

    out = tmp_path / "dashboard.html"
    paths = [records["adalora"], records["sensitivity"], records["live"], records["study"]]
    main(["dashboard", *map(str, paths), "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    text = out.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", text)  # no CDN, no file beside it: plotly.js is inlined
    assert text.count("Plotly.newPlot(") >= 20 and 4_000_000 < len(text) < 8_000_000
    assert "still running" in text  # the live run, as a snapshot

    page, refused, errors = _open(browser, out.as_uri(), "file://")
    ids = _check_every_figure_drawn(page)
    sections = {
        "study-lr-mr": {"history", "pareto", "importances", "parallel", "trial_ranks"},
        "compare": {"metrics", "ranks", "ranks_diff"},
    }
    for slug, names in sections.items():
        assert {f"fig-{slug}-{n}" for n in names} <= set(ids), ids
    run = "run-adalora-" + records["adalora"].name
    assert {
        f"fig-{run}-{n}" for n in ("rank_final", "rank_steps", "budget", "scores", "training", "params")
    } <= set(ids)
    assert any(i.startswith("fig-run-live-") for i in ids)
    _slider_changes_heatmap(page, f"fig-{run}-rank_steps")
    _click_changes_trial(page, "fig-study-lr-mr-history", "fig-study-lr-mr-trial_ranks")
    _click_changes_trial(page, "fig-study-lr-mr-pareto", "fig-study-lr-mr-trial_ranks")
    _screenshot(page, tmp_path / "dashboard-file.png")
    assert not refused and not errors, (refused, errors)
    page.context.close()


@needs_chromium
def test_served_page_and_live_reload(records, browser, tmp_path):
    paths = [records["adalora"], records["sensitivity"], records["live"], records["study"]]
    cmd = CLI + ["dashboard", *map(str, paths), "--port", "0", "--refresh", "0.5"]
    server = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, line + (server.stdout.read() if server.poll() is not None else "")
        page, refused, errors = _open(browser, url.group(0), url.group(0))
        assert page.locator(".live").inner_text().startswith("Live: 1 still running")
        ids = _check_every_figure_drawn(page)
        assert len(ids) >= 20
        run = "run-adalora-" + records["adalora"].name
        _slider_changes_heatmap(page, f"fig-{run}-rank_steps")
        _click_links_trajectory_and_final(page, run)
        _click_changes_trial(page, "fig-study-lr-mr-history", "fig-study-lr-mr-trial_ranks")
        # The live run logs again: the page notices the changed record and reloads itself.
        metrics = records["live"] / "metrics.jsonl"
        logged = _lines(metrics)
        with page.expect_event("load", timeout=60_000):
            records["live_proc"].send_signal(signal.SIGCONT)
            deadline = time.time() + 60
            while _lines(metrics) == logged and time.time() < deadline:
                time.sleep(0.05)
            records["live_proc"].send_signal(signal.SIGSTOP)
        page.wait_for_function(
            "[...document.querySelectorAll('.js-plotly-plot')].every((g) => g._fullLayout)"
        )
        _check_every_figure_drawn(page)
        _screenshot(page, tmp_path / "dashboard-served.png")
        assert not refused and not errors, (refused, errors)
        page.context.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


@needs_chromium
def test_png_and_pdf_per_figure(records, tmp_path, capsys):
    from adabudget.analysis.dashboard import build
    from adabudget.cli import main

    paths = [str(records["adalora"]), str(records["sensitivity"]), str(records["study"])]
    main(["dashboard", *paths, "--png", str(tmp_path / "figures")])
    assert "images to" in capsys.readouterr().out
    stems = [stem for stem, _ in build(paths).figures()]
    assert len(stems) >= 17
    for stem in stems:
        png = (tmp_path / "figures" / f"{stem}.png").read_bytes()
        pdf = (tmp_path / "figures" / f"{stem}.pdf").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, stem
        assert int.from_bytes(png[16:20], "big") == 1800  # 900 px at scale 2
        assert pdf[:5] == b"%PDF-" and len(pdf) > 5_000, stem


def test_records_read_for_the_dashboard(records):
    """What the views read: the live run's status, the groups table, a study's trial rank patterns."""
    from adabudget.analysis.dashboard import build
    from adabudget.analysis.records import load

    rec = load([records["root"]], status=None)
    live = rec.runs[rec.runs["status"] == "running"]
    assert len(live) == 1 and bool(live.iloc[0]["alive"])
    assert set(rec.groups["method"]) == {"adalora"} and (rec.groups["params"] > 0).all()
    dash = build([str(records["study"])])
    (study,) = dash.sections
    fig = dict(study.figures)["trial_ranks"]
    menu = fig.layout.updatemenus[0]
    assert [b.label for b in menu.buttons] == ["trial 0", "trial 1", "trial 2"]
    assert all(json.dumps(b.args[0]["z"]) != "[[]]" for b in menu.buttons)


def test_rank_trajectory_is_modules_by_allocation_steps(records):
    """The trajectory of a real run: one row per adapted module, one column per allocation of
    ranks.jsonl, each cell that allocation's rank; its final column is the final heatmap's."""
    from adabudget.analysis.dashboard import rank_heatmap, rank_trajectory
    from adabudget.analysis.records import load

    run = records["adalora"]
    allocations = [json.loads(x) for x in (run / "ranks.jsonl").read_text().splitlines() if x.strip()]
    modules = json.loads((run / "result.json").read_text())["modules"]
    rec = load([run])
    fig = rank_trajectory(rec.ranks)
    z = fig.data[0].z
    assert (len(z), len(z[0])) == (len(modules), len(allocations))  # modules x steps
    assert list(fig.data[0].x) == [str(a["step"]) for a in allocations]
    for i, m in enumerate(modules):  # rows in layer, then block order: query, key, value, o, ffn_in, ffn_out
        assert fig.data[0].y[i] == f"layer {m['layer']} · {m['role']}"
        assert [row for row in z[i]] == [a["ranks"][m["name"]] for a in allocations]
    final = rank_heatmap(rec.ranks).data[0]
    for i, m in enumerate(modules):
        assert final.z[list(final.y).index(m["role"])][list(final.x).index(str(m["layer"]))] == z[i][-1]
