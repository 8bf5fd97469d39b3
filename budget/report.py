"""What the CLI prints about a run, built from its result record alone."""

from __future__ import annotations

from collections import Counter

# Short column names of the rank grid, by matrix role (adabudget.arch.LinearSpec.role).
ROLE_NAMES = {"q": "q", "k": "k", "v": "v", "qkv": "qkv", "o": "o", "ffn_in": "ffn_in", "ffn_out": "ffn_out"}


def summary(result: dict) -> str:
    """The end-of-run summary: status, metrics, layer groups, the final rank grid, sizes and time."""
    lines = [f"status: {result['status']}  run folder: {result['run_dir']}"]
    final = result.get("final") or {}
    for split, metrics in final.items():
        lines.append(f"{split}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if result["status"] != "completed" and result.get("best"):
        best = result["best"]
        lines.append(
            f"best dev so far (step {best['step']}): "
            + "  ".join(f"{k}={v:.4f}" for k, v in best["dev"].items())
        )
    groups = result.get("groups") or []
    if len(groups) > 1:
        lines.append("layer groups (trainable params at start):")
        for g in groups:
            methods = g["methods"]
            what = (
                "none"
                if methods == "none"
                else " + ".join(f"{m} {v['params']:,}" for m, v in methods.items())
            )
            lines.append(f"  group {g['group']} layers {g['layers']}: {what}")
    if result.get("ranks") and result["status"] in ("completed", "interrupted", "pruned"):
        ranks = result["ranks"]
        when = "final" if result["status"] == "completed" else f"at step {result['steps']}"
        lines.append(f"{when} rank allocation (sum {sum(ranks.values())} over {len(ranks)} matrices):")
        lines.extend(rank_grid(ranks, result.get("modules")))
    if "trainable_params_final" in result:
        lines.append(
            f"trainable params: {result['trainable_params']:,} at start, "
            f"{result['trainable_params_final']:,} at end  wall time {result['wall_time_s']:.0f}s  "
            f"peak memory {result['peak_memory_mb']:.0f} MiB"
        )
    if result.get("error"):
        lines.append(f"error: {result['error']}")
    if result.get("resume_with"):
        lines.append(f"continue with: {result['resume_with']}")
    return "\n".join(lines)


def rank_grid(ranks: dict[str, int], modules: list[dict] | None = None) -> list[str]:
    """Ranks as a layer x matrix grid (the rank-allocation picture of the paper's Fig. 1).

    Columns are matrix roles (q, k, v, o, ffn_in, ffn_out) from the record's modules table;
    two matrices of one role in a block (LLaMA's gate and up) are told apart by their name.
    """
    info = {m["name"]: m for m in modules or []}
    per_layer_roles = Counter((info[n]["layer"], info[n]["role"]) for n in ranks if n in info)
    rows: dict = {}
    cols: list[str] = []
    for name, r in ranks.items():
        m = info.get(name)
        short = name.rsplit(".", 1)[-1].removesuffix("_proj")
        if m is None:
            layer, col = None, short
        else:
            layer = m["layer"]
            col = ROLE_NAMES.get(m["role"], short)
            if per_layer_roles[(layer, m["role"])] > 1 or m["role"] == "other":
                col = short
        if col not in cols:
            cols.append(col)
        rows.setdefault(layer, {})[col] = r
    width = max(3, *(len(c) for c in cols))
    out = ["  layer " + " ".join(c.rjust(width) for c in cols)]
    for layer, row in rows.items():
        label = "-" if layer is None else str(layer)
        out.append(f"  {label:>5} " + " ".join(str(row.get(c, "-")).rjust(width) for c in cols))
    return out
