"""``adabudget bench lr``: dev/test accuracy of AdaLoRA variants, peft's AdaLoRA and LoRA over a
grid of learning rates, through the same training loop: the evidence for λ's learning rate.

Every cell (variant x learning rate x seed) is an ordinary run of ``adabudget.training.train`` on
the default job (packaged MiniLM, ``mr``, one epoch, batch 32), with the variant's overrides,
landing in ``<root>/<variant>/lr<lr>/s<seed>/<timestamp>/``. Cells that already hold a
completed run are skipped, so the command resumes; the table is built from the run records
only (``--table`` prints it without training). The variants:

    adalora-r<K>         our AdaLoRA (12 -> 8) with λ at K x train.lr (method.lambda_lr_ratio)
    adalora-r<K>-reset   the same, zeroing pruned λ's Adam momentum at each allocation
    peft_adalora         huggingface/peft's AdaLoRA layers and allocator, same schedule knobs
    lora, peft_lora      LoRA r = 8, ours and peft's (the parity check)

Example (the README's table): ``adabudget bench lr --seeds 42 1``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

VARIANTS = {
    "adalora-r1": ["method=adalora", "method.lambda_lr_ratio=1"],
    "adalora-r4": ["method=adalora", "method.lambda_lr_ratio=4"],
    "adalora-r16": ["method=adalora", "method.lambda_lr_ratio=16"],
    "adalora-r64": ["method=adalora", "method.lambda_lr_ratio=64"],
    "adalora-r64-reset": ["method=adalora", "method.lambda_lr_ratio=64", "method.reset_pruned_momentum=true"],
    "peft_adalora": ["method=peft_adalora"],
    "lora": ["method=lora"],
    "peft_lora": ["method=peft_lora"],
}
LRS = (2e-4, 5e-4, 1e-3, 2e-3)
SEEDS = (42, 1)
ROBUST_LRS = (5e-4, 1e-3, 2e-3)  # the range over which a default must stay near its own best


def cell_name(variant: str, lr: float, seed: int) -> str:
    return f"{variant}/lr{lr:g}/s{seed}"


def completed(root: Path, variant: str, lr: float, seed: int) -> dict | None:
    """The newest completed run of a cell, or None."""
    for path in sorted((root / cell_name(variant, lr, seed)).glob("*/result.json"), reverse=True):
        result = json.loads(path.read_text())
        if result.get("status") == "completed":
            return result
    return None


def run_cell(root: Path, variant: str, lr: float, seed: int, extra: list[str]) -> dict:
    from adabudget.compose import compose
    from adabudget.training import train

    overrides = [
        *VARIANTS[variant],
        f"train.lr={lr}",
        f"train.seed={seed}",
        f"runs_root={root}",
        f"run_name={cell_name(variant, lr, seed)}",
        "train.progress=false",
        "export_adapter=false",
        *extra,
    ]
    return train(compose(overrides))


def table(root: Path, variants: list[str], lrs: list[float], seeds: list[int]) -> str:
    """Markdown: per variant and lr, dev (and test) accuracy as mean ± std over the seeds found."""

    def fmt(values: list[float]) -> str:
        if not values:
            return "-"
        mean = statistics.mean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{mean:.3f} ± {sd:.3f}" if len(values) > 1 else f"{mean:.3f}"

    head = ["variant", *[f"lr {lr:g} dev" for lr in lrs], "best dev", "worst gap 5e-4..2e-3", "test at best"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        dev, test = {}, {}
        for lr in lrs:
            results = [r for s in seeds if (r := completed(root, v, lr, s)) is not None]
            dev[lr] = [r["final"]["dev"]["accuracy"] for r in results]
            test[lr] = [r["final"]["test"]["accuracy"] for r in results]
        means = {lr: statistics.mean(x) for lr, x in dev.items() if x}
        if not means:
            continue
        best_lr = max(means, key=means.get)
        gaps = [means[best_lr] - means[lr] for lr in ROBUST_LRS if lr in means]
        gap = f"{max(gaps) * 100:.1f} pts" if gaps else "-"
        row = [
            v,
            *[fmt(dev[lr]) for lr in lrs],
            f"{means[best_lr]:.3f} (lr {best_lr:g})",
            gap,
            fmt(test[best_lr]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    n = {len([s for s in seeds if completed(root, v, lr, s)]) for v in variants for lr in lrs}
    lines.append(
        f"\nseeds {', '.join(map(str, seeds))} (n per cell: {sorted(n)}); dev/test: the packaged mr split"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="adabudget bench lr", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--root", default="runs/bench-lr", help="where the cells' run folders go")
    p.add_argument("--threads", type=int, default=None, help="train.num_threads of every cell")
    p.add_argument("--table", action="store_true", help="only print the table of the runs found")
    p.epilog = "Any key=value argument is an override for every cell (e.g. train.max_steps=50)."
    argv = list(argv or [])
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = p.parse_args([a for a in argv if a not in overrides])
    root = Path(args.root)
    extra = overrides + ([f"train.num_threads={args.threads}"] if args.threads else [])
    if not args.table:
        cells = [(v, lr, s) for s in args.seeds for v in args.variants for lr in args.lrs]
        for i, (v, lr, s) in enumerate(cells, 1):
            if completed(root, v, lr, s) is not None:
                continue
            result = run_cell(root, v, lr, s, extra)
            dev = (result.get("final") or {}).get("dev", {}).get("accuracy", math.nan)
            print(
                f"[{i}/{len(cells)}] {cell_name(v, lr, s)}: {result['status']} dev accuracy {dev:.4f} "
                f"({result['wall_time_s']:.0f} s)",
                flush=True,
            )
    print(table(root, args.variants, args.lrs, args.seeds))
