"""The dashboard of a large study (``adabudget bench dashboard``'s generator: the S4 space's 20+
conditional parameters, the user attributes a search writes, run records): the parallel
coordinates draw the most important axes and a checkbox list the rest, baseline labels do not
overlap, plotly.js is served once and cacheable, the server refuses a foreign ``Host`` and sends
its security headers, ``/stamp`` watches the record files it listed; the page renders in a real
headless Chromium (Debian's, driven by playwright as in tests/test_dashboard.py)."""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
import threading

import pytest
from test_dashboard import CHROMIUM, NO_DNS, _check_every_figure_drawn, _open, needs_chromium

ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from adabudget.analysis.bench_dashboard import generate

    return generate(tmp_path_factory.mktemp("scale"), n_trials=200, n_runs=60, seed=1)


@pytest.fixture(scope="module")
def server(study):
    from adabudget.analysis.dashboard import make_server

    srv = make_server([str(study)], port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _get(srv, path: str, host: str | None = None, headers: dict | None = None):
    port = srv.server_address[1]
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.putrequest("GET", path, skip_host=True)
    c.putheader("Host", host or f"127.0.0.1:{port}")
    for k, v in (headers or {}).items():
        c.putheader(k, v)
    c.endheaders()
    r = c.getresponse()
    return r.status, dict(r.getheaders()), r.read()


def test_generated_study_has_the_s4_shape_and_valid_records(study):
    from adabudget.analysis.records import load, load_study, trials

    tr = trials(study)
    assert len(tr) == 200
    params = [c for c in tr.columns if c.startswith("param.")]
    assert len(params) >= 20 and {"param.num_groups", "param.g0.lora", "param.train.lr"} <= set(params)
    assert {"complete", "pruned", "fail", "infeasible"} <= set(tr["state"])
    assert list(tr["baseline"].dropna()) == ["lora", "adalora", "adapter", "bitfit"]
    s = load_study(study)
    attrs = s.trials[10].user_attrs
    assert {"worker", "overrides", "budget_params"} <= set(attrs)
    done = [t for t in s.trials if t.state.name == "COMPLETE" and not t.user_attrs.get("infeasible")]
    assert all({"run_dir", "trainable_params", "wall_time_s", "status"} <= set(t.user_attrs) for t in done)
    rec = load(study, status=None)  # the records read as any run's: 60 runs, AdaLoRA's with allocations
    assert len(rec.runs) == 60 and set(rec.runs["status"]) == {"completed"}
    assert len(rec.ranks) and len(rec.scores) and rec.runs["dev.accuracy"].notna().all()


def test_parallel_coordinates_draw_the_most_important_axes(study):
    from adabudget.analysis.dashboard import MAX_PARALLEL_AXES, study_section

    sec = study_section(str(study))
    figs = dict(sec.figures)
    dims = figs["parallel"].data[0].dimensions
    params = dims[:-1]
    assert len(params) >= 20
    assert [d.visible for d in params] == [True] * MAX_PARALLEL_AXES + [False] * (
        len(params) - MAX_PARALLEL_AXES
    )
    assert dims[-1].label == "dev.accuracy" and dims[-1].visible is not False
    # the drawn axes are the importances' top ones, in their order (the bars are drawn bottom-up)
    bars = figs["importances"].data[0]
    ranked = [p for _, p in sorted(zip(bars.x, bars.y), reverse=True)]
    assert [d.label for d in params[: len(ranked)]][:MAX_PARALLEL_AXES] == ranked[:MAX_PARALLEL_AXES]
    # conditional parameters: a trial that did not sample one sits on the "not sampled" tick
    share = next(d for d in params if d.label.endswith(".share"))
    assert share.ticktext[0] == "not sampled" and min(share.values) == share.tickvals[0]
    assert 'data-axis="20"' in sec.controls["parallel"] and "Axes:" in sec.controls["parallel"]


def test_baseline_labels_sharing_an_x_are_stacked():
    from adabudget.analysis.dashboard import LABEL_STEP_PX, baseline_labels

    labels = baseline_labels(
        [300_000, 300_000, 299_000, 102_000, 300_000],
        [0.85, 0.84, 0.86, 0.70, 0.85],
        ["lora", "adalora", "adapter", "bitfit", "dora"],
        every_x=[100_000, 300_000],
    )
    by = {lab["text"]: lab for lab in labels}
    assert set(by) == {"lora / dora", "adalora", "adapter", "bitfit"}  # one (x, y): one label
    ays = sorted(by[t]["ay"] for t in ("lora / dora", "adalora", "adapter"))
    assert all(b - a >= LABEL_STEP_PX for a, b in zip(ays, ays[1:]))
    assert by["adalora"]["ay"] > by["lora / dora"]["ay"] > by["adapter"]["ay"]  # lowest point nearest


def test_plotly_js_is_served_once_and_cacheable(server, study, tmp_path):
    from adabudget.analysis.dashboard import write_html

    status, headers, body = _get(server, "/")
    assert status == 200
    page = body.decode()
    src = re.search(r'<script src="(plotly-[0-9a-f]{16}\.min\.js)"', page)
    assert src and len(body) < 2_000_000  # the figures only: plotly.js (~4.6 MB) is apart
    status, js_headers, js = _get(server, "/" + src.group(1))
    assert status == 200 and len(js) > 3_000_000 and js_headers["Content-Type"].startswith("text/javascript")
    assert "immutable" in js_headers["Cache-Control"] and "max-age=31536000" in js_headers["Cache-Control"]
    status, _, again = _get(server, "/" + src.group(1), headers={"If-None-Match": js_headers["ETag"]})
    assert status == 304 and again == b""
    out = write_html([str(study)], tmp_path / "d.html").read_text()  # --out: self-contained
    assert not re.search(r"<script[^>]*\bsrc=", out) and len(out) > len(js)


def test_foreign_host_is_refused_and_security_headers_sent(server):
    port = server.server_address[1]
    for host in (f"evil.example:{port}", "attacker.test", f"localhost:{port + 1}"):
        status, headers, body = _get(server, "/", host=host)
        assert status == 403 and b"DNS rebinding" in body, host
        assert headers["X-Content-Type-Options"] == "nosniff"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        status, _, _ = _get(server, "/stamp", host=host)
        assert status == 200, host
    nonces = []
    for _ in range(2):
        status, headers, body = _get(server, "/")
        assert headers["X-Content-Type-Options"] == "nosniff"
        policy = headers["Content-Security-Policy"]
        nonce = re.search(r"'nonce-([^']+)'", policy).group(1)
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
        scripts = re.findall(rb"<script\b[^>]*>", body)
        assert scripts and all(f'nonce="{nonce}"'.encode() in s for s in scripts)
        nonces.append(nonce)
    assert nonces[0] != nonces[1]  # one per response


def test_stamp_watches_listed_files_and_sees_new_runs(study, tmp_path):
    import optuna
    from adabudget.analysis.dashboard import Watch

    watch = Watch([str(study)])
    first = watch.stamp()
    assert (
        watch.stamp() == first and len(watch._files) == 60 * 3 + 2
    )  # runs' three files, journal, search.json
    run = next((study / "trials").iterdir())
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 999, "split": "train", "loss": 0.1}\n')
    second = watch.stamp()
    assert second != first
    new = study / "trials" / "9999"  # a new trial's run folder: seen at once (its folder changed)
    new.mkdir()
    (new / "result.json").write_text('{"status": "running"}')
    assert watch.stamp() != second and new / "result.json" in watch._files
    # a database study: one query, which sees a new trial and a finished one
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    s = optuna.create_study(storage=url, study_name="s")
    db = Watch([url])
    before = db.stamp()
    t = s.ask()
    running = db.stamp()
    s.tell(t, 1.0)
    assert len({before, running, db.stamp()}) == 3


def test_bench_dashboard_prints_its_figures(tmp_path, capsys):
    from adabudget.analysis.bench_dashboard import main

    main(["--trials", "40", "--runs", "10", "--out", str(tmp_path / "b")])
    out = capsys.readouterr().out
    for what in ("40 trials, 10 run records", "build (read +", "served page:", "--out file:", "/stamp:"):
        assert what in out, out
    with pytest.raises(SystemExit):
        main(["--trials", "3"])
    assert "--trials=3: give at least 6" in capsys.readouterr().err


def test_non_loopback_host_warns_and_refuses_foreign_names(study):
    cmd = [sys.executable, "-c", "from adabudget.cli import main; main()"]
    proc = subprocess.Popen(
        [*cmd, "dashboard", str(study), "--host", "0.0.0.0", "--port", "0"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        warning = proc.stderr.readline()
        assert warning.startswith("warning: --host 0.0.0.0 serves the dashboard beyond this machine"), warning
        line = proc.stdout.readline()
        port = int(re.search(r":(\d+)/", line).group(1))

        class Srv:
            server_address = ("127.0.0.1", port)

        assert _get(Srv, "/stamp", host=f"evil.example:{port}")[0] == 403
        assert _get(Srv, "/stamp", host=f"{os.uname().nodename}:{port}")[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@needs_chromium
def test_large_study_renders_with_reduced_axes(server, study, tmp_path):
    from playwright.sync_api import sync_playwright

    url = f"http://127.0.0.1:{server.server_address[1]}/"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", NO_DNS])
        page, refused, errors = _open(browser, url, url)
        ids = _check_every_figure_drawn(page)
        par = "fig-study-s4-mr-parallel"
        assert {f"fig-study-s4-mr-{n}" for n in ("history", "pareto", "importances", "trial_ranks")} | {
            par
        } <= set(ids)
        drawn = f"document.getElementById('{par}')._fullData[0].dimensions.filter((d) => d.visible).length"
        assert page.evaluate(drawn) == 9  # 8 parameters and the objective
        assert page.locator(f"#{par} .y-axis").count() == 9  # as drawn axes in the SVG
        page.locator(f"#{par}-axes summary").click()
        page.locator(f'#{par}-axes input[data-axis="12"]').check()
        page.wait_for_function(f"{drawn} === 10")
        assert page.evaluate(f"document.getElementById('{par}').layout.title.text").startswith(
            "Parallel coordinates: 9 of"
        )
        assert page.locator(f"#{par} .y-axis").count() == 10
        for fig in ("history", "pareto"):  # no two baseline labels overlap
            boxes = page.evaluate(f"""[...document.querySelectorAll(
                '#fig-study-s4-mr-{fig} g.annotation-text-g')].map((g) => g.getBoundingClientRect())
                .map((b) => [b.x, b.y, b.width, b.height])""")
            assert len(boxes) >= 3, fig
            for i, a in enumerate(boxes):
                for b in boxes[i + 1 :]:
                    apart = (
                        a[0] + a[2] <= b[0]
                        or b[0] + b[2] <= a[0]
                        or a[1] + a[3] <= b[1]
                        or b[1] + b[3] <= a[1]
                    )
                    assert apart, (fig, a, b)
        page.screenshot(path=str(tmp_path / "scale.png"), full_page=True)
        assert not refused and not errors, (refused, errors)
        browser.close()


@pytest.mark.slow
@needs_chromium
def test_a_thousand_trials_build_and_render(tmp_path):
    """The issue's scale: 1,000 trials of the S4 space and 500 run records, built (bench's measure)
    and served to a real Chromium, which draws every figure with the reduced parallel coordinates."""
    from adabudget.analysis.bench_dashboard import generate, measure
    from adabudget.analysis.dashboard import make_server
    from playwright.sync_api import sync_playwright

    folder = generate(tmp_path, n_trials=1000, n_runs=500)
    r = measure(folder)
    print(r)
    assert r["figures"] == 5 and r["page_bytes"] < r["file_bytes"] - 3_000_000
    assert len(list((folder / "trials").iterdir())) == 500
    srv = make_server([str(folder)], port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", NO_DNS])
            page, refused, errors = _open(browser, url, url)
            ids = _check_every_figure_drawn(page)
            par = next(i for i in ids if i.endswith("-parallel"))
            drawn = (
                f"document.getElementById('{par}')._fullData[0].dimensions.filter((d) => d.visible).length"
            )
            assert page.evaluate(drawn) == 9  # the 8 most important parameters and the objective
            assert page.evaluate(f"document.getElementById('{par}')._fullData[0].dimensions.length") > 20
            assert not refused and not errors, (refused, errors)
            browser.close()
    finally:
        srv.shutdown()
        srv.server_close()
