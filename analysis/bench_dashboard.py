"""``adabudget bench dashboard``: the dashboard of a study at a thousand trials, timed.

    adabudget bench dashboard                          # 1,000 trials, 500 run records, in a temp folder
    adabudget bench dashboard --trials 200 --runs 100 --out /tmp/s4-bench --keep

Generates a finished study shaped like ``search.space=[s4,lr]`` with
``search.objectives=[dev.accuracy,params]`` on a 12-layer encoder: the S4 space's conditional
parameters (``num_groups``, ``grouping``, ``allocation``, ``g<i>.<method>`` and
``g<i>.<method>.share``: up to 40 per trial, ``train.lr``), four enqueued baselines, the user
attributes a search writes (``worker``, ``overrides``, ``run_dir``, ``status``, ``wall_time_s``,
``trainable_params``, ``budget_params``, ``infeasible``), pruned, failed and infeasible trials, in
a journal file with its ``search.json``; and the run records of the first ``--runs`` trials
(``result.json``, ``metrics.jsonl``, ``ranks.jsonl`` with AdaLoRA's allocations and triplet
scores where a trial trains AdaLoRA). Then it builds the dashboard as ``adabudget dashboard
STUDY`` does and prints the time of each part, the page's size and the time of one ``/stamp``.

The study is written with optuna directly (``analysis`` imports no ``search``): the space is
mimicked, not sampled from ``search.spaces.s4``, and the metric is a made-up function of the
parameters (learning rate first, then the groups' methods) so that the importances have something
to find.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

PATTERNS = ("uniform", "spindle", "increasing", "decreasing")  # budget.groups.PATTERNS
ALLOCATIONS = ("uniform", "increasing", "decreasing")  # budget.groups.ALLOCATIONS
METHODS = ("adapter", "prefix", "bitfit", "lora", "adalora")  # search.spaces.context.S4_METHODS
SCALABLE = ("adapter", "prefix", "lora", "adalora")  # bitfit has no size
BASELINES = ("lora", "adalora", "adapter", "bitfit")
LAYERS = 12
ROLES = (  # (leaf of a BERT-style module name, role in the run record)
    ("attention.self.query", "q"),
    ("attention.self.key", "k"),
    ("attention.self.value", "v"),
    ("attention.output.dense", "o"),
    ("intermediate.dense", "ffn_in"),
    ("output.dense", "ffn_out"),
)
BUDGET = 300_000  # search.budget: the trainable parameters every trial is sized to
TOTAL_STEPS = 400
ALLOCATE_EVERY = 40  # allocations at steps 40, 80, ..., 280: AdaLoRA's t_i .. T - t_f
STUDY = "s4-mr"


# ---------------------------------------------------------------- the space, mimicked
def _distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    d = {
        "num_groups": IntDistribution(1, 4),
        "grouping": CategoricalDistribution(PATTERNS),
        "allocation": CategoricalDistribution(ALLOCATIONS),
        "train.lr": FloatDistribution(1e-5, 1e-2, log=True),
    }
    for g in range(4):
        for m in METHODS:
            d[f"g{g}.{m}"] = CategoricalDistribution((True, False))
            if m in SCALABLE:
                d[f"g{g}.{m}.share"] = FloatDistribution(0.1, 1.0)
    return d


def _split(n_groups: int) -> list[list[int]]:
    """Contiguous layer groups (the uniform pattern's split; enough for a record's shape)."""
    edges = [round(i * LAYERS / n_groups) for i in range(n_groups + 1)]
    return [list(range(edges[i], edges[i + 1])) for i in range(n_groups)]


def _sample(rng: random.Random) -> tuple[dict, list[list[str]]]:
    """One draw of the S4 space as ``search.spaces.s4.s4_space`` makes it with a budget."""
    p: dict = {"num_groups": rng.randint(1, 4)}
    if p["num_groups"] > 1:
        p["grouping"] = rng.choice(PATTERNS)
        p["allocation"] = rng.choice(ALLOCATIONS)
    chosen: list[list[str]] = []
    for g in range(p["num_groups"]):
        picked = []
        for m in METHODS:
            if m == "adalora" and "lora" in picked:
                continue  # both would wrap the same matrices
            last = g == p["num_groups"] - 1 and m == METHODS[-1]
            if last and not picked and not any(chosen):
                picked.append(m)
                continue
            p[f"g{g}.{m}"] = rng.random() < 0.4
            if p[f"g{g}.{m}"]:
                picked.append(m)
        scalable = [m for m in picked if m in SCALABLE]
        if len(scalable) > 1:
            for m in scalable:
                p[f"g{g}.{m}.share"] = rng.uniform(0.1, 1.0)
        chosen.append(picked)
    p["train.lr"] = math.exp(rng.uniform(math.log(1e-5), math.log(1e-2)))
    return p, chosen


def _accuracy(p: dict, chosen: list[list[str]], rng: random.Random) -> float:
    """A made-up dev accuracy: best near lr 1e-3, LoRA and AdaLoRA help, prefix alone does not."""
    acc = 0.86 - 0.035 * (math.log10(p["train.lr"]) + 3) ** 2
    methods = {m for picked in chosen for m in picked}
    acc += 0.012 * ("adalora" in methods) + 0.008 * ("lora" in methods) - 0.01 * (methods == {"prefix"})
    acc += 0.004 * (p["num_groups"] - 1) * (p.get("allocation") == "increasing")
    return round(min(max(acc + rng.gauss(0, 0.01), 0.5), 0.99), 4)


# ---------------------------------------------------------------- the study
def generate(root: str | Path, n_trials: int = 1000, n_runs: int = 500, seed: int = 0) -> Path:
    """Write the study folder ``root/search/s4-mr`` (journal, ``search.json``, ``trials/<n>/`` run
    records of the first ``n_runs`` trials that trained) and return it."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(seed)
    folder = Path(root) / "search" / STUDY
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "trials").mkdir(parents=True)
    storage = JournalStorage(JournalFileBackend(str(folder / "journal.log")))
    objectives, directions = ["dev.accuracy", "params"], ["maximize", "minimize"]
    study = optuna.create_study(study_name=STUDY, storage=storage, directions=directions)
    study.set_user_attr(
        "adabudget",
        {
            "space": ["s4", "lr"],
            "objectives": objectives,
            "directions": directions,
            "budget": BUDGET,
            "model": "minilm",
            "task": "mr",
            "trial_overrides": [],
            "scorer": "train",
        },
    )
    study.set_user_attr("adabudget:root", {"path": str(folder), "host": socket.gethostname(), "token": "0"})
    dists = _distributions()
    start = dt.datetime(2026, 12, 1, 9, 0, 0)
    made, runs = [], 0
    for n in range(n_trials):
        baseline = BASELINES[n] if n < len(BASELINES) else None
        if baseline:
            params, chosen = {}, [[baseline]]  # enqueued with no parameters, sized by its overrides
            shape = {"num_groups": 1, "train.lr": 1e-3}
        else:
            params, chosen = _sample(rng)
            shape = params
        methods = {m for picked in chosen for m in picked}
        seconds = round(rng.uniform(40, 400), 3)
        run_dir = str(folder / "trials" / str(n))
        attrs = {
            "worker": {"host": socket.gethostname(), "pid": 4000 + n % 8, "id": f"w{n % 8}"},
            "overrides": [f"method={baseline}"] if baseline else _overrides(params, chosen),
            "budget_params": BUDGET,
        }
        if baseline:
            attrs["baseline"] = baseline
        roll = rng.random()
        state, values, system = TrialState.COMPLETE, None, {"constraints": [-1.0]}
        intermediate = {}
        if not baseline and roll < 0.04:  # the solver found no sizes within the budget: never trained
            attrs["infeasible"] = "the fixed-size methods alone exceed the budget"
            values, system = [0.0, float(BUDGET * 10)], {"constraints": [1.0]}
            seconds = 0.01
        elif not baseline and roll < 0.06:
            state, attrs["error"] = TrialState.FAIL, "CUDA out of memory. Tried to allocate 20.00 MiB"
            attrs["run_dir"] = run_dir
        else:
            trainable = int(BUDGET * rng.uniform(0.9, 1.0)) if len(methods - {"bitfit"}) else 102_000
            acc = _accuracy(shape, chosen, rng)
            attrs.update(run_dir=run_dir, trainable_params=trainable, wall_time_s=seconds)
            intermediate = {
                s: round(acc - 0.1 * (1 - s / TOTAL_STEPS), 4) for s in range(100, TOTAL_STEPS, 100)
            }
            if not baseline and roll < 0.16:  # the pruner stopped it at its second report
                state, intermediate = TrialState.PRUNED, dict(list(intermediate.items())[:2])
                attrs["status"] = "pruned"
            else:
                attrs["status"] = "completed"
                values = [acc, float(trainable)]
                if runs < n_runs:
                    write_run(Path(run_dir), n, shape, chosen, acc, trainable, seconds, rng)
                    runs += 1
        made.append(
            create_trial(
                state=state,
                values=values,
                params={k: v for k, v in params.items()},
                distributions={k: dists[k] for k in params},
                user_attrs=attrs,
                system_attrs=system,
                intermediate_values=intermediate,
            )
        )
        made[-1].datetime_start = start + dt.timedelta(seconds=60 * n)
        made[-1].datetime_complete = made[-1].datetime_start + dt.timedelta(seconds=seconds)
    study.add_trials(made)
    (folder / "search.json").write_text(
        json.dumps(
            {
                "study": STUDY,
                "storage": str(folder / "journal.log"),
                "space": ["s4", "lr"],
                "objectives": objectives,
                "directions": directions,
                "budget": BUDGET,
                "n_trials": n_trials,
                "finished": n_trials,
                "model": "minilm",
                "task": "mr",
                "generated_by": "adabudget bench dashboard",
            },
            indent=1,
        )
    )
    return folder


def _overrides(params: dict, chosen: list[list[str]]) -> list[str]:
    groups = [{m: {} for m in picked} or "none" for picked in chosen]
    return [
        "method=hybrid",
        f"method.num_groups={params['num_groups']}",
        f"method.grouping={params.get('grouping', 'uniform')}",
        f"method.groups={json.dumps(groups)}",
        f"train.lr={params['train.lr']:.6g}",
    ]


# ---------------------------------------------------------------- a run record
def write_run(run_dir: Path, number: int, params, chosen, acc, trainable, seconds, rng) -> None:
    """``result.json``, ``metrics.jsonl`` and ``ranks.jsonl`` of one trained trial, in the shape a
    real run writes them (README "The run record"; copied from a tiny-bert run's record)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    layers = _split(params["num_groups"])
    modules, groups = [], []
    for g, picked in enumerate(chosen):
        share = trainable // max(1, sum(len(p) for p in chosen))
        groups.append({"group": g, "layers": layers[g], "methods": {m: {"params": share} for m in picked}})
        if "adalora" in picked:
            for layer in layers[g]:
                for leaf, role in ROLES:
                    name = f"bert.encoder.layer.{layer}.{leaf}"
                    modules.append({"name": name, "layer": layer, "role": role, "group": g, "init_rank": 12})
    allocations, ranks = [], {m["name"]: 12 for m in modules}
    if modules:
        steps = list(range(0, TOTAL_STEPS - 3 * ALLOCATE_EVERY + 1, ALLOCATE_EVERY))
        budget0 = 12 * len(modules)
        target = 8 * len(modules)
        for i, step in enumerate(steps):
            budget = round(target + (budget0 - target) * (1 - i / (len(steps) - 1)) ** 3)
            scores = {
                m: sorted((round(rng.lognormvariate(-18, 1), 12) for _ in range(12)), reverse=True)
                for m in ranks
            }
            cut = sorted((s for v in scores.values() for s in v), reverse=True)[budget - 1]
            mask = {m: [int(s >= cut) for s in v] for m, v in scores.items()}
            ranks = {m: sum(k) for m, k in mask.items()}
            allocations.append(
                {
                    "step": step,
                    "budget": budget,
                    "kept": sum(ranks.values()),
                    "kept_params": sum(ranks.values()) * 768,
                    "final": step == steps[-1],
                    "ranks": ranks,
                    **({"scores": scores, "kept_mask": mask} if step else {}),
                }
            )
    metrics = [
        {
            "step": s,
            "split": "train",
            "loss": round(0.7 * math.exp(-s / 200) + 0.2, 4),
            "lr": params["train.lr"],
        }
        for s in range(10, TOTAL_STEPS + 1, 10)
    ]
    for s in range(100, TOTAL_STEPS + 1, 100):
        metrics.append({"step": s, "split": "dev", "accuracy": round(acc - 0.1 * (1 - s / TOTAL_STEPS), 4)})
    metrics.append({"step": TOTAL_STEPS, "split": "test", "accuracy": round(acc - 0.01, 4)})
    final_params = sum(ranks.values()) * 768 if modules else None
    result = {
        "record_version": 2,
        "status": "completed",
        "host": socket.gethostname(),
        "pid": 4000 + number % 8,
        "run_dir": str(run_dir),
        "run_name": "trials",
        "method": "hybrid",
        "model": "minilm",
        "task": "mr",
        "num_labels": 2,
        "data_version": "vader-3.3.2/groups-v2",
        "split_sizes": {"train": 8530, "dev": 1066, "test": 1066},
        "primary_metric": "accuracy",
        "task_kind": "classification",
        "regression": False,
        "total_steps": TOTAL_STEPS,
        "trainable_params": trainable + 1538,
        "total_params": 33_361_538,
        "groups": groups,
        "modules": modules,
        "meta": {"study": STUDY, "trial": number, "params": params},
        "steps": TOTAL_STEPS,
        "trainable_params_final": (trainable + 1538) if final_params is None else None,
        "adapter_params_final": final_params,
        "ranks": ranks,
        "best": {"step": TOTAL_STEPS, "dev": {"accuracy": acc}},
        "wall_time_s": seconds,
        "peak_memory_mb": 1402.5,
        "final": {"dev": {"accuracy": acc}, "test": {"accuracy": round(acc - 0.01, 4)}},
    }
    (run_dir / "result.json").write_text(json.dumps(result))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run_dir / "ranks.jsonl").write_text("".join(json.dumps(a) + "\n" for a in allocations))


# ---------------------------------------------------------------- the benchmark
def measure(folder: Path, stamp_calls: int = 5) -> dict:
    """Build the dashboard of the study ``folder`` as the CLI does; the time of each part."""
    from adabudget.analysis import dashboard
    from adabudget.analysis.records import load_study, run_dirs, trials

    out: dict = {}
    t0 = time.perf_counter()
    study = load_study(folder)
    dashboard._trial_ranks(trials(study, folder=folder))
    out["read_s"] = time.perf_counter() - t0  # what build reads (it reads them again)
    out["runs"] = len(run_dirs(folder))
    t0 = time.perf_counter()
    dash = dashboard.build([str(folder)])
    out["build_s"] = time.perf_counter() - t0  # reads + figures
    t0 = time.perf_counter()
    served = dashboard.to_html(dash, stamp="x", plotly_src=dashboard.plotly_js()[0])
    out["html_s"] = time.perf_counter() - t0
    out["page_bytes"] = len(served.encode())
    out["file_bytes"] = len(dashboard.to_html(dash).encode())  # --out: plotly.js inlined
    out["figures"] = sum(1 for _ in dash.figures())
    watch = dashboard.Watch([str(folder)])
    t0 = time.perf_counter()
    watch.stamp()
    out["stamp_first_s"] = time.perf_counter() - t0  # lists the record files once
    t0 = time.perf_counter()
    for _ in range(stamp_calls):
        watch.stamp()
    out["stamp_s"] = (time.perf_counter() - t0) / stamp_calls  # what a page's poll costs
    return out


def measure_optuna_dashboard(folder: Path) -> dict | None:
    """optuna-dashboard's answer for the same study: its API call that the page loads (the
    study's trials, importances excluded), timed in-process through its WSGI app."""
    try:
        import optuna_dashboard
    except ImportError:
        return None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(folder / "journal.log")))
    app = optuna_dashboard.wsgi(storage)
    study_id = storage.get_study_id_from_name(STUDY)

    def get(path: str) -> tuple[float, int]:
        body: list[bytes] = []
        t0 = time.perf_counter()
        from wsgiref.util import setup_testing_defaults

        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path}
        setup_testing_defaults(environ)
        status: list[str] = []
        chunks = app(environ, lambda s, headers, exc=None: status.append(s))
        body += list(chunks)
        if not status or not status[0].startswith("200"):
            raise RuntimeError(f"optuna-dashboard {path}: {status} {b''.join(body)[:300]!r}")
        return time.perf_counter() - t0, sum(map(len, body))

    first, size = get(f"/api/studies/{study_id}")
    again, _ = get(f"/api/studies/{study_id}")
    imp, _ = get(f"/api/studies/{study_id}/param_importances")
    return {"study_api_s": first, "study_api_again_s": again, "study_api_bytes": size, "importances_s": imp}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="adabudget bench dashboard",
        description="Generate a study shaped like the S4 space's (trials, user attributes, run "
        "records) and time its dashboard: build, page size, /stamp.",
    )
    p.add_argument("--trials", type=int, default=1000, help="trials in the study (default 1000)")
    p.add_argument("--runs", type=int, default=500, help="run records written for the first trained trials")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder to generate into (default: a temporary folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep the generated folder")
    p.add_argument("--html", help="also write the self-contained page to this file")
    p.add_argument(
        "--optuna-dashboard", action="store_true", help="also time optuna-dashboard's API on the same study"
    )
    a = p.parse_args(argv)
    for name in ("trials", "runs"):
        if getattr(a, name) < 0 or (name == "trials" and a.trials < len(BASELINES) + 2):
            p.error(
                f"--{name}={getattr(a, name)}: give at least {len(BASELINES) + 2 if name == 'trials' else 0}"
            )
    root = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="adabudget-bench-dashboard-"))
    try:
        t0 = time.perf_counter()
        folder = generate(root, a.trials, a.runs, a.seed)
        made = time.perf_counter() - t0
        r = measure(folder)
        print(f"study: {folder} ({a.trials} trials, {r['runs']} run records; generated in {made:.1f} s)")
        print(f"reading the study and records: {r['read_s']:.2f} s")
        print(f"build (read + {r['figures']} figures): {r['build_s']:.2f} s")
        print(f"HTML: {r['html_s']:.2f} s")
        print(f"total (build + HTML): {r['build_s'] + r['html_s']:.2f} s")
        print(f"served page: {r['page_bytes'] / 1e6:.2f} MB (plotly.js apart, cached by the browser)")
        print(f"--out file: {r['file_bytes'] / 1e6:.2f} MB (plotly.js inlined)")
        print(
            f"/stamp: {1000 * r['stamp_s']:.1f} ms "
            f"({1000 * r['stamp_first_s']:.0f} ms the first, listing the record files)"
        )
        if a.optuna_dashboard:
            o = measure_optuna_dashboard(folder)
            if o is None:
                print("optuna-dashboard: not installed (pip install optuna-dashboard)")
            else:
                print(
                    f"optuna-dashboard API /api/studies/<id>: {o['study_api_s']:.2f} s "
                    f"({o['study_api_bytes'] / 1e6:.2f} MB; again {o['study_api_again_s']:.2f} s), "
                    f"param_importances: {o['importances_s']:.2f} s"
                )
        if a.html:
            from adabudget.analysis.dashboard import write_html

            print(f"wrote {write_html([str(folder)], a.html)}")
    finally:
        if not a.keep and not a.out:
            shutil.rmtree(root, ignore_errors=True)
        elif a.keep or a.out:
            print(f"kept {root}", file=sys.stderr)


if __name__ == "__main__":
    main()
