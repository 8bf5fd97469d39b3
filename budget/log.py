"""The run record: a self-describing folder, mirrored to W&B when asked.

    <run_dir>/config.yaml    resolved config (the dataclasses, after overrides)
    <run_dir>/metrics.jsonl  one JSON object per log / eval event
    <run_dir>/ranks.jsonl    one per allocation: step, budget, kept, rank of every module
    <run_dir>/result.json    status, final and best metrics, params, time, memory, versions

Files are the truth; W&B only mirrors them, and a W&B failure (no network, no login)
never fails or blocks a run.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

log = logging.getLogger("adabudget")


def write_json_atomic(path: Path, data: dict) -> None:
    """Write via a temp file and rename, so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(obj):
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


class RunRecord:
    """Appends metrics and allocations to the run folder and the optional W&B mirror."""

    def __init__(self, run_dir: Path, config: dict, logger_cfg, resume: bool = False):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.wandb = None
        if not resume:
            from omegaconf import OmegaConf

            (self.dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
        if logger_cfg.wandb:
            self.wandb = _init_wandb(self.dir, config, logger_cfg, resume)

    def _append(self, name: str, record: dict) -> None:
        with open(self.dir / name, "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")

    def metrics(self, record: dict) -> None:
        self._append("metrics.jsonl", record)
        if self.wandb is not None:
            prefix = record.get("split", "train")
            flat = {f"{prefix}/{k}": v for k, v in record.items() if k not in ("step", "split")}
            self._wandb_call(self.wandb.log, flat, step=record["step"])

    def ranks(self, record: dict) -> None:
        self._append("ranks.jsonl", record)
        if self.wandb is not None:
            data = {"budget/scheduled": record["budget"], "budget/kept": record["kept"]}
            data.update({f"rank/{k}": v for k, v in record["ranks"].items()})
            self._wandb_call(self.wandb.log, data, step=record["step"])

    def result(self, result: dict) -> None:
        write_json_atomic(self.dir / "result.json", result)
        if self.wandb is not None:
            self._wandb_call(self._wandb_summary, result)

    def _wandb_summary(self, result: dict) -> None:
        import wandb

        for key in ("status", "trainable_params", "trainable_params_final", "wall_time_s"):
            if key in result:
                self.wandb.summary[key] = result[key]
        for split, metrics in (result.get("final") or {}).items():
            for k, v in metrics.items():
                self.wandb.summary[f"final/{split}/{k}"] = v
        path = self.dir / "ranks.jsonl"
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if rows:
                modules = list(rows[-1]["ranks"])
                table = wandb.Table(columns=["step", "budget", "kept", *modules])
                for r in rows:
                    table.add_data(
                        r["step"], r["budget"], r["kept"], *[r["ranks"].get(m, 0) for m in modules]
                    )
                self.wandb.log({"rank_table": table})

    def _wandb_call(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as err:  # the mirror must never take the run down
            warnings.warn(f"W&B mirror disabled after an error: {err}", stacklevel=2)
            self.wandb = None

    def close(self) -> None:
        if self.wandb is not None:
            self._wandb_call(self.wandb.finish)
            self.wandb = None


def _init_wandb(run_dir: Path, config: dict, logger_cfg, resume: bool):
    # Offline unless the user chose otherwise (config or their environment).
    mode = logger_cfg.mode or os.environ.get("WANDB_MODE") or "offline"
    try:
        import wandb

        run_id_file = run_dir / "wandb_id.txt"
        run_id = run_id_file.read_text().strip() if resume and run_id_file.exists() else None
        run = wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            dir=str(run_dir),
            config=config,
            mode=mode,
            tags=list(logger_cfg.tags) or None,
            name=f"{run_dir.parent.name}/{run_dir.name}",
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(init_timeout=30, silent=True),
        )
        run_id_file.write_text(run.id)
        return run
    except Exception as err:
        warnings.warn(
            f"W&B mirror not started ({err}); the run folder still records everything", stacklevel=2
        )
        return None


def environment() -> dict:
    """Package versions and the git commit, for result.json."""
    import torch
    import transformers

    import budget

    versions = {
        "python": platform.python_version(),
        "adabudget": budget.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for name in ("peft", "optuna", "hydra", "wandb"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "__version__"):
            versions[name] = mod.__version__
    return {"versions": versions, "git_commit": git_commit()}


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
