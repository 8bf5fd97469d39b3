"""``adabudget bench search``: what a search costs outside ``train()``, with 1 and 2 workers.

Runs a small study per worker count the way ``adabudget search`` runs it, times ``train()`` and
``sample`` where they are called, and prints the cost per trained trial and ``overhead workers1=X
workers2=Y`` last. What each figure measures: docs/results/benchmark.md; tiny trials exaggerate the
overhead, the figures to quote come from ``--model minilm --steps 100 --train-samples 2048 --trials 6``.

Invariant: ``overhead`` = 1 - sum(train()) / sum(worker life), a worker's life ending when it finds
the study full (waiting for the slowest worker is not counted).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="adabudget bench search", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-bert", help="backbone (tiny-bert, minilm, any HF id)")
    p.add_argument(
        "--space", default="lora_rank_lr", help="search.space (built in or configs/search/space/*.yaml)"
    )
    p.add_argument("--trials", type=int, default=4, help="trained trials per study")
    p.add_argument("--steps", type=int, default=24, help="train.max_steps of every trial")
    p.add_argument("--train-samples", type=int, default=128, help="data.max_train_samples")
    p.add_argument("--eval-samples", type=int, default=64, help="data.max_eval_samples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", default="1,2", help="worker counts, side by side")
    p.add_argument("--threads", type=int, default=None, help="search.threads (default: cores / workers)")
    p.add_argument("--keep", default=None, help="keep the studies in this folder (default: a temporary one)")
    p.add_argument("overrides", nargs="*", help="more overrides of the search (key=value)")
    return p.parse_args(argv)


def study_overrides(args, workers: int, root: Path) -> list[str]:
    out = [
        f"model={args.model}",
        f"data.max_train_samples={args.train_samples}",
        f"data.max_eval_samples={args.eval_samples}",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.eval_every={max(1, args.steps // 2)}",
        "train.log_every=4",
        "logger.wandb=false",
        f"runs_root={root / 'runs'}",
        f"search.space={args.space}",
        f"search.n_trials={args.trials}",
        f"search.workers={workers}",
        "search.enqueue=[]",
        "search.sampler=random",
        f"search.study=bench-w{workers}",
        f"search.root={root}",
    ]
    if args.threads:
        out.append(f"search.threads={args.threads}")
    return out + list(args.overrides)


# ---------------------------------------------------------------- the instrumented worker
def _append(path: str, record: dict) -> None:
    with open(path, "a") as f:  # one short line per write: appends from several processes stay whole
        f.write(json.dumps(record) + "\n")


def timed_worker(setup, log_path: str, launched: float) -> None:
    """``search.workers.worker_loop`` with ``train`` and ``sample`` timed where the trial calls them."""
    import adabudget.search.study
    import adabudget.training
    import optuna
    import torch
    from adabudget.search.study import make_context
    from adabudget.search.workers import worker_loop

    torch.set_num_threads(setup.scfg.worker_threads())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    make_context(setup)  # once per process: the backbone's config and the modelling imports it pulls in
    train, sample = adabudget.training.train, adabudget.search.study.sample

    def timed_train(cfg, on_eval=None):
        t0 = time.time()
        result = train(cfg, on_eval=on_eval)
        _append(
            log_path,
            {
                "kind": "train",
                "run_dir": cfg["run_dir"],
                "s": time.time() - t0,
                "wall_time_s": result.get("wall_time_s"),
            },
        )
        return result

    def timed_sample(trial, space, ctx):
        t0 = time.time()
        drawn = sample(trial, space, ctx)
        _append(log_path, {"kind": "sample", "trial": trial.number, "s": time.time() - t0})
        return drawn

    # make_objective imports adabudget.training.train when it is called, and calls
    # adabudget.search.study.sample
    adabudget.training.train, adabudget.search.study.sample = timed_train, timed_sample
    ready = time.time()
    try:
        worker_loop(setup)
    finally:
        adabudget.training.train, adabudget.search.study.sample = train, sample
        _append(
            log_path,
            {
                "kind": "worker",
                "pid": os.getpid(),
                "launched": launched,
                "ready": ready,
                "ended": time.time(),
            },
        )


def run_study(args, workers: int, root: Path) -> dict:
    """One study with ``workers`` workers, as ``search.workers.run_workers`` runs it; its timings."""
    from adabudget.compose import compose
    from adabudget.search.config import register_schema
    from adabudget.search.study import open_study, prepare

    register_schema()
    setup = prepare(compose(study_overrides(args, workers, root), config_name="search"))
    open_study(setup, create=True)
    log_path = str(root / "timings.jsonl")
    start = time.time()
    if workers == 1:  # in this process, as run_workers does
        import torch

        threads = torch.get_num_threads()
        try:
            timed_worker(setup, log_path, time.time())
        finally:
            torch.set_num_threads(threads)
    else:
        ctx = multiprocessing.get_context("spawn")
        procs = []
        for _ in range(workers):
            p = ctx.Process(target=timed_worker, args=(setup, log_path, time.time()))
            p.start()
            procs.append(p)
        for p in procs:
            p.join()
        bad = [p.exitcode for p in procs if p.exitcode]
        if bad:
            raise RuntimeError(f"bench workers exited with {bad}; see {root}")
    elapsed = time.time() - start
    return summarise(open_study(setup), log_path, elapsed)


def summarise(study, log_path: str, elapsed: float) -> dict:
    """Seconds per trained trial of each part, and the overhead fraction."""
    from optuna.trial import TrialState

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    trains = {r["run_dir"]: r for r in records if r["kind"] == "train"}
    samples = sum(r["s"] for r in records if r["kind"] == "sample")
    workers = [r for r in records if r["kind"] == "worker"]
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_complete]
    trial_s = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)
    trained = [trains[t.user_attrs["run_dir"]] for t in trials if t.user_attrs.get("run_dir") in trains]
    train_s = sum(r["s"] for r in trained)
    loop_s = sum(r["wall_time_s"] or 0.0 for r in trained)
    life = sum(w["ended"] - w["launched"] for w in workers)
    start = sum(w["ready"] - w["launched"] for w in workers)
    n = max(1, len(trained))
    return {
        "workers": len(workers),
        "trained": len(trained),
        "trials": len(trials),
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "elapsed": elapsed,
        "trial": trial_s / n,
        "train": train_s / n,
        "loop": loop_s / n,
        "sample": samples / n,
        "other": (trial_s - train_s - samples) / n,
        "between": (life - start - trial_s) / n,
        "start": start / n,
        "overhead": (life - train_s) / life if life > 0 else float("nan"),
    }


ROWS = [
    ("trained trials", "trained", "{:.0f}"),
    ("wall clock of the study (s)", "elapsed", "{:.1f}"),
    ("per trained trial (s): trial", "trial", "{:.3f}"),
    ("  train()", "train", "{:.3f}"),
    ("    loop (wall_time_s)", "loop", "{:.3f}"),
    ("  sample (space, count, solve)", "sample", "{:.3f}"),
    ("  other (Optuna ask/tell, attrs)", "other", "{:.3f}"),
    ("between trials (lock, counts)", "between", "{:.3f}"),
    ("process start (spawn, imports)", "start", "{:.3f}"),
    ("overhead outside train()", "overhead", "{:.3f}"),
]


def report(args, results: dict[int, dict]) -> None:
    counts = sorted(results)
    print(
        f"search overhead outside train(): {args.model}, space {args.space}, {args.trials} trials of "
        f"{args.steps} steps, {os.cpu_count()} cores"
    )
    print(f"{'':<34}" + "".join(f"{f'workers={w}':>12}" for w in counts))
    for label, key, fmt in ROWS:
        print(f"{label:<34}" + "".join(f"{fmt.format(results[w][key]):>12}" for w in counts))
    print("overhead " + " ".join(f"workers{w}={results[w]['overhead']:.4f}" for w in counts))


def main(argv: list[str] | None = None) -> None:
    """``adabudget bench search [options] [key=value ...]``: the table, then the overhead line."""
    args = parse_args(argv)
    counts = [int(w) for w in str(args.workers).split(",")]
    import adabudget.training  # noqa: F401  (the search process's own imports, paid once, not per trial)

    results = {}
    with tempfile.TemporaryDirectory(prefix="adabudget-bench-search-") as tmp:
        base = Path(args.keep or tmp)
        for w in counts:
            root = base / f"workers{w}"
            if root.exists():
                raise SystemExit(f"--keep {base}: {root} exists; give a new folder")
            root.mkdir(parents=True)
            results[w] = run_study(args, w, root)
    report(args, results)


if __name__ == "__main__":
    main()
