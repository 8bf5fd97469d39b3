"""``adabudget bench supernet``: does a weight-sharing supernet rank hybrid PEFT configurations the
way training them does, what does a score cost, and what does it find at equal compute?

Five phases (supernets, stand-alone trainings, agreement, cost, equal compute), each a study or a
run folder under ``--root``, so a stopped bench resumes where it stopped. What each phase does and
what it prints: docs/results/supernet.md#what-the-bench-does.

Invariant: the agreement and both searches use dev metrics only; test is read only for the
equal-compute winners, re-trained with ``--seeds``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="adabudget bench supernet", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--experiment",
        default="minilm_budget/mr",
        help="the run every configuration starts from (configs/experiment/..., or 'none' for the defaults)",
    )
    p.add_argument("--budget", type=int, default=165888, help="search.budget (default: LoRA r=4 on MiniLM)")
    p.add_argument("--configs", type=int, default=16, help="configurations trained stand-alone and scored")
    p.add_argument(
        "--variants",
        default="sandwich:4",
        help="supernets, SAMPLING:K[,...]: search.supernet."
        "sampling for K x T steps (e.g. sandwich:4,random:4,sandwich:1)",
    )
    p.add_argument("--calibration", default="0,32", help="calibration steps before each inherited score")
    p.add_argument(
        "--trials",
        type=int,
        default=200,
        help="equal-compute comparison: configurations the supernet search scores (0: skip the comparison)",
    )
    p.add_argument("--seeds", default="42,1,2", help="re-training seeds of the comparison")
    p.add_argument("--workers", type=int, default=1, help="processes training stand-alone configurations")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--seed", type=int, default=0, help="picks the configurations and seeds the samplers")
    p.add_argument("--root", default="runs/bench/supernet", help="where the studies and runs go (resumable)")
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    p.add_argument("overrides", nargs="*", help="more overrides of every run and study (key=value)")
    a = p.parse_args(argv)
    try:
        a.variants = [(s, float(k)) for s, k in (v.split(":") for v in a.variants.split(","))]
        a.calibration = [int(c) for c in a.calibration.split(",")]
        a.seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError as err:
        p.error(f"--variants SAMPLING:K,..., --calibration N,..., --seeds N,...: {err}")
    for sampling, k in a.variants:
        if sampling not in ("sandwich", "random", "largest") or k <= 0:
            p.error(f"--variants {sampling}:{k}: SAMPLING is sandwich, random or largest, K > 0")
    if a.configs < 3:
        p.error("--configs: at least 3 configurations to rank")
    return a


def _variant_name(sampling: str, k: float) -> str:
    return f"sn-{sampling}-{k:g}".replace(".", "p")


def make_setup(args, study: str, *extra: str):
    """The prepared search of one phase (``search.study.prepare``), on the bench's common base."""
    from adabudget.compose import compose
    from adabudget.search.config import register_schema
    from adabudget.search.study import prepare

    register_schema()
    base = [f"experiment={args.experiment}"] if args.experiment not in ("", "none") else []
    base += [
        f"search.budget={args.budget}",
        "search.space=supernet",
        "search.enqueue=[]",
        f"search.study={study}",
        f"search.root={Path(args.root).resolve()}",
        f"search.seed={args.seed}",
        "logger.wandb=false",
        "train.progress=false",
    ]
    if args.threads:
        base.append(f"search.threads={args.threads}")
    return prepare(compose(base + list(args.overrides) + list(extra), config_name="search"))


def total_steps(setup) -> int:
    """T of one stand-alone training of the base run."""
    from adabudget.compose import resolve
    from adabudget.data import load_task, load_tokenizer
    from adabudget.session import total_steps_for

    run = resolve(dict(setup.base))
    task = load_task(run.data, load_tokenizer(run.model.name, run.model.revision))
    return total_steps_for(run, len(task.train))


def supernet_setup(args, sampling: str, k: float, steps: int, trials: int = 0):
    return make_setup(
        args,
        _variant_name(sampling, k),
        "search.scorer=supernet",
        "search.sampler=evolution",
        f"search.supernet.sampling={sampling}",
        f"search.supernet.steps={steps}",
        f"search.n_trials={max(trials, 1)}",
    )


def train_supernets(args, T: int, log=print) -> dict:
    from adabudget.search.supernet import ensure_supernet

    out = {}
    for sampling, k in args.variants:
        setup = supernet_setup(args, sampling, k, max(1, round(k * T)))
        stored = Path(setup.root) / "supernet_cost.json"
        fresh = not (Path(setup.root) / "supernet" / "config.yaml").exists()
        t0 = time.time()
        result = ensure_supernet(setup, log=log)
        if fresh:  # trained whole in this call: its cost is the call (build, data, loop, final evaluation)
            stored.write_text(json.dumps({"seconds": round(time.time() - t0, 2)}))
        seconds = json.loads(stored.read_text())["seconds"] if stored.exists() else result["wall_time_s"]
        out[(sampling, k)] = {"setup": setup, "result": result, "seconds": seconds}
        log(
            f"supernet {_variant_name(sampling, k)}: {result['steps']} steps in {result['wall_time_s']:.0f} s"
        )
    return out


def standalone(args, space, subs, log=print) -> list[dict]:
    """Train ``subs`` stand-alone through the study ``standalone`` (enqueued, resumable); returns one
    row per sub: its dev metrics, params, run wall time and the phase's wall time."""
    from adabudget.search.optuna_factory import finished
    from adabudget.search.study import open_study
    from adabudget.search.workers import run_workers
    from optuna.trial import TrialState

    setup = make_setup(
        args,
        "standalone",
        "search.scorer=train",
        f"search.n_trials={len(subs)}",
        f"search.workers={args.workers}",
        "search.sampler=random",
    )
    study = open_study(setup, create=True)
    have = {space.from_params(t.params) for t in study.get_trials(deepcopy=False) if t.params}
    for sub in subs:
        if sub not in have:
            study.enqueue_trial(space.params(sub))
    todo = len(subs) - sum(finished(t) for t in study.get_trials(deepcopy=False))
    t0 = time.time()
    if todo > 0:
        log(f"stand-alone: training {todo} of {len(subs)} configurations, {args.workers} worker(s)")
        run_workers(setup)
    phase = time.time() - t0
    rows = {}
    for t in open_study(setup).get_trials(deepcopy=False):
        if t.state != TrialState.COMPLETE or not t.params:
            continue
        sub = space.from_params(t.params)
        result = json.loads((Path(t.user_attrs["run_dir"]) / "result.json").read_text())
        rows[sub] = {
            "dev": result["final"]["dev"],
            "params": t.user_attrs["trainable_params"],
            "wall_time_s": result["wall_time_s"],
            "run_dir": t.user_attrs["run_dir"],
        }
    missing = [s for s in subs if s not in rows]
    if missing:
        raise RuntimeError(
            f"stand-alone: {len(missing)} configuration(s) did not complete; run again to retry"
        )
    stored = Path(setup.root) / "phase.json"
    if todo > 0 and todo == len(subs):  # the whole phase ran in this call: its wall time is the cost
        stored.write_text(json.dumps({"seconds": phase, "workers": args.workers, "configs": len(subs)}))
    timing = json.loads(stored.read_text()) if stored.exists() else None
    return [rows[s] for s in subs], timing


def agreement(inherited: list[float], trained: list[float]) -> dict:
    from scipy import stats

    tau = stats.kendalltau(inherited, trained)
    rho = stats.spearmanr(inherited, trained)
    best = max(range(len(trained)), key=trained.__getitem__)
    picked = max(range(len(inherited)), key=inherited.__getitem__)
    return {
        "kendall_tau": float(tau.statistic),
        "kendall_p": float(tau.pvalue),
        "spearman_rho": float(rho.statistic),
        "spearman_p": float(rho.pvalue),
        "picked_rank": sorted(trained, reverse=True).index(trained[picked]) + 1,
        "picked_gap": trained[best] - trained[picked],
    }


def equal_compute(args, variant: dict, per_training_s: float, log=print) -> dict:
    """The first variant's supernet search against a plain search given the same time."""
    from adabudget.search.record import top_trials
    from adabudget.search.retraining import retrain_one
    from adabudget.search.study import open_study
    from adabudget.search.supernet import run_evolution
    from adabudget.search.workers import run_workers

    sampling, k = args.variants[0]
    steps = variant["result"]["steps"]
    sn = supernet_setup(args, sampling, k, steps, args.trials)
    open_study(sn, create=True)
    run_evolution(sn)
    study = open_study(sn)
    scored = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.user_attrs.get("scorer") == "supernet" and t.values is not None and "inherited" in t.user_attrs
    ]
    sn_cost = variant["seconds"] + sum(t.user_attrs["wall_time_s"] for t in scored)
    budget_trials = max(2, math.floor(sn_cost / per_training_s))
    plain = make_setup(
        args,
        "plain",
        "search.scorer=train",
        "search.sampler=tpe",
        f"search.n_trials={budget_trials}",
        f"search.workers={args.workers}",
    )
    open_study(plain, create=True)
    t0 = time.time()
    run_workers(plain)
    plain_s = time.time() - t0
    log(f"plain search: {budget_trials} trainings in {plain_s:.0f} s")
    plain_study = open_study(plain)
    out = {
        "supernet_search": {"trials": len(scored), "seconds": round(sn_cost, 1)},
        "plain_search": {"trials": budget_trials},
    }
    for label, setup, st in (("supernet_search", sn, study), ("plain_search", plain, plain_study)):
        best = top_trials(st, setup, 1)[0]
        results = []
        for seed in args.seeds:
            folder = Path(setup.root) / "retrain" / f"trial_{best.number}" / f"s{seed}"
            results.append(
                retrain_one(
                    setup,
                    best.user_attrs["overrides"],
                    folder,
                    {"study": setup.study, "retrain_of": f"trial {best.number}", "seed": seed},
                    seed,
                )
            )
        test = [r["final"]["test"][setup.primary] for r in results if r["status"] == "completed"]
        out[label].update(
            {
                "best_trial": best.number,
                "best_sub": best.user_attrs.get("sub"),
                "search_value": best.values[0],
                "params": best.user_attrs.get("trainable_params"),
                "test": test,
                "test_mean": statistics.mean(test),
                "test_std": statistics.stdev(test) if len(test) > 1 else 0.0,
            }
        )
    out["plain_search"]["seconds"] = round(plain_s, 1)  # this call's share when the study resumed
    return out


def run(args, log=print) -> dict:
    import numpy as np
    from adabudget.search.supernet import load_supernet, score

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    first = supernet_setup(args, *args.variants[0], 1)
    T = total_steps(first)
    log(
        f"bench supernet: {args.experiment}, budget {args.budget:,}, T = {T} steps, "
        f"{args.configs} configurations, variants {', '.join(_variant_name(*v) for v in args.variants)}, "
        f"calibration {args.calibration}"
    )
    nets = train_supernets(args, T, log)
    first_net = nets[args.variants[0]]
    net = load_supernet(Path(first_net["setup"].root) / "supernet")
    space = net.space  # the same on every variant: menus, budget and band come from the same setup
    subs = space.spread(args.configs, np.random.default_rng(args.seed))
    rows, timing = standalone(args, space, subs, log)
    metric = first.primary
    trained = [r["dev"][metric] for r in rows]
    report = {
        "experiment": args.experiment,
        "budget": args.budget,
        "band": list(space.band()),
        "T": T,
        "metric": metric,
        "configs": [
            {
                "sub": s.key(),
                "params": r["params"],
                "standalone_dev": r["dev"][metric],
                "standalone_s": r["wall_time_s"],
            }
            for s, r in zip(subs, rows)
        ],
        "standalone_phase": timing,
        "variants": {},
    }
    cache_path = root / "scores.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    for (sampling, k), variant in nets.items():
        name = _variant_name(sampling, k)
        entry = {"steps": variant["result"]["steps"], "train_s": variant["seconds"], "scores": {}}
        for c in args.calibration:
            key = f"{name}/c{c}/{entry['steps']}"
            if key not in cache:  # scores of a finished variant are kept: a resumed bench skips them
                net = net or load_supernet(Path(variant["setup"].root) / "supernet")
                t0 = time.time()
                cache[key] = {
                    "inherited": [score(net, s, c)[metric] for s in subs],
                    "seconds": (time.time() - t0) / len(subs),
                    "subs": [s.key() for s in subs],
                }
                cache_path.write_text(json.dumps(cache))
            if cache[key]["subs"] != [s.key() for s in subs]:
                raise RuntimeError(
                    f"{cache_path}: scored other configurations (--configs or --seed changed); "
                    "give another --root"
                )
            inherited, seconds = cache[key]["inherited"], cache[key]["seconds"]
            entry["scores"][c] = {
                "inherited": inherited,
                "seconds_per_score": seconds,
                **agreement(inherited, trained),
            }
            for cfg, value in zip(report["configs"], inherited):
                cfg[f"{name}/c{c}"] = value
        report["variants"][name] = entry
        net = None
    report["cost"] = cost(report, args)
    if args.trials > 0 and report["cost"]:
        report["equal_compute"] = equal_compute(
            args, first_net, report["cost"]["standalone_s_per_config"], log
        )
    print_report(report, args, log)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return report


def cost(report: dict, args) -> dict | None:
    timing = report["standalone_phase"]
    if not timing:
        return None
    per_training = timing["seconds"] / timing["configs"]
    name = _variant_name(*args.variants[0])
    entry = report["variants"][name]
    score_s = entry["scores"][args.calibration[0]]["seconds_per_score"]
    out = {
        "standalone_s_per_config": per_training,
        "standalone_workers": timing["workers"],
        "supernet_train_s": entry["train_s"],
        "score_s": score_s,
        "per_hour": {},
    }
    out["per_hour"]["standalone"] = 3600 / per_training
    for n in (args.configs, max(args.trials, args.configs), 1000):
        out["per_hour"][f"supernet_N{n}"] = n * 3600 / (entry["train_s"] + n * score_s)
    out["per_hour"]["supernet_score_only"] = 3600 / score_s
    return out


def print_report(report: dict, args, log=print) -> None:
    metric = report["metric"]
    names = list(report["variants"])
    cols = [f"{n}/c{c}" for n in names for c in args.calibration]
    log("")
    log(
        f"{'#':>2} {'params':>8} {'stand-alone':>11} "
        + " ".join(f"{c:>18}" for c in cols)
        + "  sub-configuration"
    )
    for i, cfg in enumerate(report["configs"]):
        log(
            f"{i:>2} {cfg['params']:>8,} {cfg['standalone_dev']:>11.4f} "
            + " ".join(f"{cfg[c]:>18.4f}" for c in cols)
            + f"  {cfg['sub']}"
        )
    log(f"(dev {metric}; stand-alone = trained alone, the others inherited from each supernet)")
    for name in names:
        entry = report["variants"][name]
        for c, s in entry["scores"].items():
            log(
                f"tau {name} calibration={c}: kendall_tau={s['kendall_tau']:.3f} (p={s['kendall_p']:.3f}) "
                f"spearman={s['spearman_rho']:.3f} picked_rank={s['picked_rank']}/{len(report['configs'])} "
                f"gap={s['picked_gap']:.4f} supernet_steps={entry['steps']} "
                f"score_s={s['seconds_per_score']:.2f}"
            )
    c = report.get("cost")
    if c:
        ph = c["per_hour"]
        n = max(args.trials, args.configs)
        log(
            f"cost configs_per_hour standalone={ph['standalone']:.0f} (workers={c['standalone_workers']}) "
            + " ".join(f"{k}={v:.0f}" for k, v in ph.items() if k != "standalone")
            + f" ratio_N{n}={ph[f'supernet_N{n}'] / ph['standalone']:.1f}x"
            f" supernet_train_s={c['supernet_train_s']:.0f}"
        )
    else:
        log("cost: not measured (the stand-alone phase resumed: its wall time is not one run's)")
    e = report.get("equal_compute")
    if e:
        s, p = e["supernet_search"], e["plain_search"]
        log(
            f"equal-compute supernet_search: {s['trials']} scored, best test "
            f"{s['test_mean']:.4f} ± {s['test_std']:.4f} ({len(s['test'])} seeds, {s['params']} params) | "
            f"plain_search: {p['trials']} trained, best test {p['test_mean']:.4f} ± {p['test_std']:.4f} "
            f"({len(p['test'])} seeds, {p['params']} params)"
        )


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
