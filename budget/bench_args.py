"""The options of ``adabudget bench step`` and ``bench load`` (``adabudget.bench`` parses with them):
apart from the benchmark, which imports torch, so that ``--help`` does not."""

from __future__ import annotations

import argparse

STEP = "The per-step cost of AdaLoRA against LoRA, ours and peft's (time, memory, the allocator's share)."
LOAD = (
    "Peak process memory (RSS) of loading each model fp32, fp32 then quantised (load-then-quantise), "
    "and with model.quantize=nf4 (quantised while read), each load in a fresh process."
)


def step_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adabudget bench step", description=STEP)
    p.add_argument("what", nargs="?", default="step", choices=["step"], help="what to benchmark")
    p.add_argument("--model", default="minilm", help="minilm, a tiny-* model or an HF id (default minilm)")
    p.add_argument(
        "--task",
        default="classification",
        choices=["classification", "causal-lm"],
        help="a 2-class head on the batch, or the LM head with the tokens as labels "
        "(a decoder: smollm2, tiny-llama)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="the forward and backward of every variant under autocast in this dtype "
        "(trainable weights fp32)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument(
        "--steps", type=int, default=10, help="measured rounds (one step of each variant per round)"
    )
    p.add_argument("--warmup", type=int, default=3, help="unmeasured rounds first")
    p.add_argument("--init-r", type=int, default=12)
    p.add_argument("--target-r", type=int, default=8)
    p.add_argument("--alloc-reps", type=int, default=20, help="repetitions of the allocator-only timing")
    p.add_argument("--no-peft", action="store_true", help="skip peft's variants")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--methods",
        default="",
        help="more variants: registered methods at LoRA r=init_r's count, "
        "NAME or NAME:key=value;key=value, comma-separated (e.g. dylora,sparse,rosa)",
    )
    return p


def load_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adabudget bench load", description=LOAD)
    p.add_argument("--models", default="minilm,smollm2", help="comma-separated model names or folders")
    p.add_argument("--task", default="auto", choices=["auto", "classification", "causal-lm"])
    p.add_argument("--repeat", type=int, default=1, help="loads of each kind (the median is shown)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the loading processes")
    return p
