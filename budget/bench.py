"""``adabudget bench step``: the per-step cost of AdaLoRA against LoRA, ours and peft's.

Invariants: one process, one set of backbone weights, one fixed batch; every variant runs the
full training step (forward + loss + backward + AdamW step + allocator call + zero_grad, dropout
0) in the same precision, the variants take turns in an order that rotates every round and the
reported time is the median over rounds; memory is counted from the tensors on CPU (no peak
counter there) and as CUDA peaks on a GPU. The last printed line is the machine-readable summary
``ratio adalora/lora=X shrunk/lora_final=Y adalora/peft_adalora=Z allocator/peft_allocator=W``.

``adabudget bench load``: the peak memory of loading a backbone three ways, each in a fresh
process (``load_main``). The variants, the options and the columns:
docs/results/benchmark.md#what-bench-step-runs.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from adabudget.allocator import RankAllocator
from adabudget.bench_args import load_parser, step_parser
from adabudget.config import ModelConfig
from adabudget.methods import apply_method, method_config_from_dict
from adabudget.methods.adalora import orth_penalty
from adabudget.models import load_model, pick_device
from adabudget.modules import find_targets, freeze_backbone, resolve_targets
from adabudget.precision import autocast as amp_autocast
from torch import nn

MASK_INTERVAL = 10  # ΔT for both allocators
BUDGET_STEPS = 100_000  # T: large, so every benchmarked step stays in the budgeting phase
LR = 1e-3


@dataclass
class Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[dict], torch.Tensor]  # batch -> scalar loss, orth penalty included
    allocate: Callable[[int], None] | None = None  # the allocator call after optimizer.step()
    allocator_state: Callable[[], list[torch.Tensor]] = lambda: []
    step_count: int = 0
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU time, all threads
    alloc_times: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    state: dict[str, int] = field(default_factory=dict)
    allocator: RankAllocator | None = None


# ---------------------------------------------------------------- measuring
def nbytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and expands counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def account(v: Variant, batch: dict) -> dict[str, int]:
    """One untimed forward/backward: the activations saved for backward (parameters
    excluded), then the persistent state while the gradients are alive."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in v.model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = v.loss_fn(batch)
    loss.backward()
    params = list(v.model.parameters())
    state = {
        "activations": sum(storages.values()),
        "params": nbytes(params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "grads": nbytes(p.grad for p in params),
        "optim": nbytes(optimizer_tensors(v.optimizer)),
        "alloc": nbytes(v.allocator_state()),
    }
    v.optimizer.zero_grad()
    return state


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(v: Variant, batch: dict, device: torch.device, record: bool) -> None:
    """One full training step; when ``record``, its time (and CUDA peak) are kept."""
    cuda = device.type == "cuda"
    if cuda:
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    loss = v.loss_fn(batch)
    loss.backward()
    v.optimizer.step()
    v.step_count += 1
    alloc_time = 0.0
    if v.allocate is not None:  # host time of the call (no extra device sync inside the step)
        a0 = time.perf_counter()
        v.allocate(v.step_count)
        alloc_time = time.perf_counter() - a0
    v.optimizer.zero_grad()
    sync(device)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    if record:
        v.times.append(elapsed)
        v.cpu_times.append(cpu)
        v.alloc_times.append(alloc_time)
        if cuda:
            v.peaks.append(torch.cuda.max_memory_allocated(device) - base)


# ---------------------------------------------------------------- variants
def _adam(model: nn.Module, method=None) -> torch.optim.Optimizer:
    """The optimizer of ``adabudget.training`` for our variants (AdaLoRA's λ in its own lr group),
    plain AdamW over the trainable parameters for peft's."""
    from adabudget.methods import adalora_config_of
    from adabudget.methods.adalora import param_groups

    if method is None:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return torch.optim.AdamW(param_groups(model, adalora_config_of(method), LR), lr=LR)


def ours_lora(base: nn.Module, r: int) -> Variant:
    model = copy.deepcopy(base)
    cfg = method_config_from_dict({"name": "lora", "r": r})
    apply_method(model, cfg)
    return Variant(f"lora r={r}", model, _adam(model, cfg), lambda b: model(**b).loss)


def ours_adalora(base: nn.Module, init_r: int, target_r: int, total_steps: int, final_steps: int) -> Variant:
    model = copy.deepcopy(base)
    cfg = method_config_from_dict(
        {
            "name": "adalora",
            "init_r": init_r,
            "target_r": target_r,
            "warmup_steps": 0,
            "final_steps": final_steps,
            "mask_interval": MASK_INTERVAL,
        }
    )
    layers = apply_method(model, cfg)
    adapted = list(layers.values())
    optimizer = _adam(model, cfg)
    allocator = RankAllocator(layers, cfg, total_steps)

    def loss_fn(batch):
        return model(**batch).loss + cfg.orth_reg_weight * orth_penalty(adapted, cfg.orth_squared)

    def allocate(step):
        allocation = allocator.update_and_allocate(step)
        if allocation is not None and allocation.shrink:
            allocator.shrink_(optimizer)

    v = Variant(f"adalora {init_r}->{target_r}", model, optimizer, loss_fn, allocate)
    v.allocator_state = lambda: [t for t in vars(allocator).values() if torch.is_tensor(t)]
    v.allocator = allocator
    return v


def ours_adalora_shrunk(base: nn.Module, init_r: int, target_r: int, batch: dict, device) -> Variant:
    """AdaLoRA trained for 3 steps of a 4-step schedule (t_i = 0, t_f = 1): step 3 makes the
    final allocation and the physical shrink; every later call is the fixed phase's, and the
    orth penalty stays in the loss as in training."""
    v = ours_adalora(base, init_r, target_r, total_steps=4, final_steps=1)
    for _ in range(3):
        train_step(v, batch, device, record=False)
    ranks = v.allocator.ranks()
    v.name = f"adalora shrunk (avg r={sum(ranks.values()) / len(ranks):g})"
    return v


def _at_lora_count(name: str, knobs: dict, base: nn.Module, target: int):
    """The method's config at ``target`` trainable parameters where it has a knob for that: a
    ``budget`` knob gets it (with a size knob too, as RoSA: half to each), a size knob the size
    whose count is closest. A method that no size brings within 10% of ``target`` (Quantum-PEFT's
    few angles) keeps its defaults, at its own count."""
    import dataclasses

    from adabudget.arch import arch_of
    from adabudget.methods import REGISTRY, closest_size, count_method

    cfg = method_config_from_dict({"name": name, **knobs})
    fields = {f.name for f in dataclasses.fields(cfg)}
    size = REGISTRY[name].size
    size = None if size in knobs or size == "budget" else size
    has_budget = "budget" in fields and "budget" not in knobs
    if size is None:
        return dataclasses.replace(cfg, budget=target) if has_budget else cfg
    arch = arch_of(base)
    # with a budget knob too, its size part is counted with a one-entry budget (then taken off)
    sized = dataclasses.replace(cfg, budget=1) if has_budget else cfg
    goal = target / 2 if has_budget else target
    best = closest_size(sized, arch, goal + has_budget)
    part = count_method(dataclasses.replace(sized, **{size: best}), arch) - has_budget
    if abs(part - goal) > 0.1 * goal:
        return cfg
    if has_budget:
        return dataclasses.replace(cfg, **{size: best}, budget=target - part)
    return dataclasses.replace(cfg, **{size: best})


def spec_label(spec: str) -> str:
    """``NAME`` or ``NAME[k:v,k:v]`` for ``NAME:k=v;k=v``: one ratio key per --methods entry, free of
    the ``=`` and spaces the ratio line uses."""
    name, _, rest = spec.partition(":")
    knobs = [kv.replace("=", ":", 1) for kv in rest.split(";") if kv]
    return f"{name}[{','.join(knobs)}]".replace(" ", "") if knobs else name


def method_variant(base: nn.Module, spec: str, target: int, batch: dict) -> Variant:
    """A registered method (``NAME`` or ``NAME:k=v;k=v``) as a variant at ``target`` parameters."""
    import yaml
    from adabudget.arch import arch_of
    from adabudget.methods import apply_plan, plan_of, step_hooks

    name, _, rest = spec.partition(":")
    knobs = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in rest.split(";") if kv)}
    model = copy.deepcopy(base)
    cfg = _at_lora_count(name, knobs, base, target)
    cfg.validate()
    plan = plan_of(cfg, arch_of(model))
    wrapped = apply_plan(model, plan)
    hooks = step_hooks(model, plan, wrapped)
    for h in hooks:
        h.calibrate(lambda b: model(**b).loss, lambda n: (batch for _ in range(n)))
    optimizer = _adam(model, cfg)
    steps = [0]

    def loss_fn(b):
        for h in hooks:
            h.before_step(steps[0])
        return model(**b).loss

    def after(step):
        for h in hooks:
            h.after_step(steps[0], optimizer)
        steps[0] += 1

    sizes = [k for k in ("r", "r_max", "bottleneck", "budget", "rank") if hasattr(cfg, k)]
    knob_text = ", ".join(f"{k}={getattr(cfg, k)}" for k in sizes + [k for k in knobs if k not in sizes])
    return Variant(f"{name} ({knob_text})" if knob_text else name, model, optimizer, loss_fn, after)


def peft_variants(base: nn.Module, targets: list[str], init_r: int, target_r: int) -> list[Variant]:
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    lora = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=init_r, lora_alpha=2 * init_r, lora_dropout=0.0, target_modules=targets),
    )
    ada_cfg = AdaLoraConfig(
        init_r=init_r,
        target_r=target_r,
        tinit=0,
        tfinal=0,
        deltaT=MASK_INTERVAL,
        total_step=BUDGET_STEPS,
        lora_dropout=0.0,
        target_modules=targets,
    )
    ada = get_peft_model(copy.deepcopy(base), ada_cfg)
    rank_allocator = ada.base_model.rankallocator

    p_lora = Variant(f"peft lora r={init_r}", lora, _adam(lora), lambda b: lora(**b).loss)
    p_ada = Variant(
        f"peft adalora {init_r}->{target_r}",
        ada,
        _adam(ada),
        lambda b: ada(**b).loss,  # orth penalty added inside peft's forward
        lambda step: ada.base_model.update_and_allocate(step),
    )
    p_ada.allocator_state = lambda: [
        t
        for d in (rank_allocator.ipt, rank_allocator.exp_avg_ipt, rank_allocator.exp_avg_unc)
        for t in d.values()
    ]
    return [p_lora, p_ada]


# ---------------------------------------------------------------- the allocator alone
def time_allocators(ours: Variant, peft: Variant | None, batch: dict, device, reps: int) -> dict[str, float]:
    """Median seconds of one allocator call on non-allocation and allocation steps.

    Both models get one forward/backward first so that gradients exist; the calls then
    alternate ours / peft's at the same step numbers (all in the budgeting phase)."""
    contenders = [v for v in (ours, peft) if v is not None]
    for v in contenders:
        v.loss_fn(batch).backward()
    out: dict[str, list[float]] = {}
    for i in range(reps):
        for kind, step in (("plain", 10_000 + 10 * i + 1), ("alloc", 10_000 + 10 * i + 10)):
            for v in contenders if i % 2 == 0 else contenders[::-1]:
                sync(device)
                t0 = time.perf_counter()
                v.allocate(step)
                sync(device)
                out.setdefault(f"{v.name}|{kind}", []).append(time.perf_counter() - t0)
    for v in contenders:
        v.optimizer.zero_grad()
    # Median: robust to the odd descheduled call on a shared machine.
    return {k: statistics.median(ts) for k, ts in out.items()}


# ---------------------------------------------------------------- main
def make_batch(
    model: nn.Module, batch_size: int, seq_len: int, device, seed: int, causal_lm: bool = False
) -> dict:
    """A fixed batch of random tokens: a 2-class label each, or (causal LM) the tokens themselves as
    labels (every position predicts the next, as a packed SFT batch does)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(1000, vocab, (batch_size, seq_len), generator=g)  # skip [PAD], [CLS], unused
    labels = ids.clone() if causal_lm else torch.randint(0, 2, (batch_size,), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: t.to(device) for k, t in batch.items()}


def quiet_load(name: str, causal_lm: bool = False) -> nn.Module:
    """The backbone with a 2-class head (or its LM head), without transformers' load report on stdout."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load_model(ModelConfig(name=name), 2, False, causal_lm=causal_lm)
    finally:
        hf_logging.set_verbosity(level)


def under_autocast(loss_fn: Callable[[dict], torch.Tensor], autocast) -> Callable[[dict], torch.Tensor]:
    """``loss_fn`` with its forward under ``autocast`` (``adabudget.precision.autocast``'s factory)."""

    def run(batch: dict) -> torch.Tensor:
        with autocast():
            return loss_fn(batch)

    return run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = step_parser()  # adabudget.bench_args: the --help that imports no torch
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.alloc_reps < 1:
        p.error("--steps and --alloc-reps must be >= 1, --warmup >= 0")
    if not 0 < args.target_r < args.init_r:
        p.error(f"--target-r must be in (0, --init-r={args.init_r})")
    return args


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark; returns {variant: {...}} plus the four ratios under ``ratios``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    load_before = os.getloadavg()[0]
    torch.manual_seed(args.seed)
    causal_lm = args.task == "causal-lm"
    base = quiet_load(args.model, causal_lm)
    for m in base.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    freeze_backbone(base, train_head=False)  # every variant trains its adapters only
    base.to(device).train()
    targets = find_targets(
        base, resolve_targets(base, None, "method.target_modules"), "method.target_modules"
    )
    batch = make_batch(base, args.batch_size, args.seq_len, device, args.seed, causal_lm)
    autocast = amp_autocast(args.precision, device)

    use_peft = not args.no_peft
    if use_peft:
        try:
            import peft  # noqa: F401
        except ImportError:
            use_peft = False
    r0, r1 = args.init_r, args.target_r
    variants = {
        "lora": ours_lora(base, r0),
        "adalora": ours_adalora(base, r0, r1, BUDGET_STEPS, final_steps=0),
        "shrunk": ours_adalora_shrunk(base, r0, r1, batch, device),
        "lora_final": ours_lora(base, r1),
    }
    if use_peft:
        variants["peft_lora"], variants["peft_adalora"] = peft_variants(base, targets, r0, r1)
    lora_count = sum(p.numel() for p in variants["lora"].model.parameters() if p.requires_grad)
    lora_count -= sum(p.numel() for p in base.parameters() if p.requires_grad)  # the head, if trained
    for spec in filter(None, args.methods.split(",")):
        variants[f"method:{spec}"] = method_variant(base, spec, lora_count, batch)
    del base
    for v in variants.values():  # every variant, ours and peft's, in the same precision
        v.loss_fn = under_autocast(v.loss_fn, autocast)
    order = list(variants.values())

    # Interleaved rounds; the starting variant rotates every round.
    for rnd in range(args.warmup + args.steps):
        k = rnd % len(order)
        for v in order[k:] + order[:k]:
            gc.collect()
            train_step(v, batch, device, record=rnd >= args.warmup)
    for v in order:
        v.state = account(v, batch)

    alloc = time_allocators(variants["adalora"], variants.get("peft_adalora"), batch, device, args.alloc_reps)

    results = {}
    for key, v in variants.items():
        results[key] = {
            "name": v.name,
            "median_s": statistics.median(v.times),
            "min_s": min(v.times),
            "cpu_s": statistics.median(v.cpu_times),
            "alloc_s": statistics.mean(v.alloc_times),
            # The first measured step may create AdamW's moments inside its window (no warm-up).
            "peak_bytes": (
                max(v.peaks[1:] or v.peaks) + v.state["params"] + v.state["optim"] + v.state["alloc"]
            )
            if v.peaks
            else None,
            **v.state,
        }
    mix = 1.0 / MASK_INTERVAL  # one allocation step every ΔT steps

    def mixed(name):
        return (1 - mix) * alloc[f"{name}|plain"] + mix * alloc[f"{name}|alloc"]

    nan = float("nan")
    ratios = {
        "adalora/lora": results["adalora"]["median_s"] / results["lora"]["median_s"],
        "shrunk/lora_final": results["shrunk"]["median_s"] / results["lora_final"]["median_s"],
        "adalora/peft_adalora": results["adalora"]["median_s"] / results["peft_adalora"]["median_s"]
        if use_peft
        else nan,
        "allocator/peft_allocator": mixed(variants["adalora"].name) / mixed(variants["peft_adalora"].name)
        if use_peft
        else nan,
    }
    for key in results:
        if key.startswith("method:"):
            ratios[f"{spec_label(key[7:])}/lora"] = results[key]["median_s"] / results["lora"]["median_s"]
    cpu = {k: r["cpu_s"] for k, r in results.items()}
    cpu_ratios = {
        "adalora/lora": cpu["adalora"] / cpu["lora"],
        "shrunk/lora_final": cpu["shrunk"] / cpu["lora_final"],
        "adalora/peft_adalora": cpu["adalora"] / cpu["peft_adalora"] if use_peft else nan,
    }
    return {
        "cpu_ratios": cpu_ratios,
        "variants": results,
        "allocator": alloc,
        "ratios": ratios,
        "device": str(device),
        "tokens": args.batch_size * args.seq_len,
        "peft": use_peft,
        "load": (load_before, os.getloadavg()[0]),
    }


def report(args: argparse.Namespace, res: dict) -> None:
    mb = 1 / 2**20
    v = res["variants"]
    cuda = res["device"].startswith("cuda")
    print(
        f"bench step: model={args.model} task={args.task} precision={args.precision} "
        f"batch={args.batch_size}x{args.seq_len} device={res['device']} "
        f"threads={torch.get_num_threads()} rounds={args.steps} (+{args.warmup} warm-up), "
        f"AdaLoRA {args.init_r}->{args.target_r}, ΔT={MASK_INTERVAL}, head frozen (adapters only)"
    )
    cores = os.cpu_count()
    print(f"1-min load average {res['load'][0]:.2f} before, {res['load'][1]:.2f} after ({cores} cores)")
    head = f"{'variant':<32}{'median ms':>10}{'min ms':>9}{'cpu ms':>9}{'vs lora':>8}{'tok/s':>8}"
    head += f"{'alloc ms':>9}{'trainable':>10}"
    head += f"{'state MB':>9}{'act MB':>8}" + (f"{'peak MB':>9}" if cuda else "")
    print(head)
    ref = v["lora"]["median_s"]
    for r in v.values():
        state = r["params"] + r["grads"] + r["optim"] + r["alloc"]
        line = f"{r['name']:<32}{r['median_s'] * 1e3:>10.1f}{r['min_s'] * 1e3:>9.1f}{r['cpu_s'] * 1e3:>9.1f}"
        line += f"{r['median_s'] / ref:>8.3f}{res['tokens'] / r['median_s']:>8.0f}"
        line += (
            f"{r['alloc_s'] * 1e3:>9.2f}{r['trainable']:>10,}{state * mb:>9.1f}{r['activations'] * mb:>8.1f}"
        )
        if cuda:
            line += f"{r['peak_bytes'] * mb:>9.1f}"
        print(line)
    print(
        "state MB = persistent training state counted from the tensors: parameters "
        "(frozen backbone included) "
        "+ gradients + AdamW moments + allocator buffers (EMAs, scratch);"
    )
    print(
        "act MB = activations saved for backward by one forward (hooks; parameters excluded)"
        + (
            "; peak MB = CUDA max_memory_allocated within each step's own window + persistent state."
            if cuda
            else ". CPU has no peak counter: neither column is a measured peak."
        )
    )
    print(f"{'state detail (MB)':<32}{'params':>9}{'grads':>9}{'AdamW':>9}{'alloc':>9}")
    for r in v.values():
        print(
            f"{r['name']:<32}{r['params'] * mb:>9.2f}{r['grads'] * mb:>9.3f}"
            f"{r['optim'] * mb:>9.3f}{r['alloc'] * mb:>9.3f}"
        )
    print(
        f"allocator call alone, median ms over {args.alloc_reps} calls each "
        "(same step numbers, budgeting phase; "
        f"the ratio weighs them as the schedule does, 1 allocation step in {MASK_INTERVAL}):"
    )
    for key, t in res["allocator"].items():
        name, kind = key.split("|")
        print(f"  {name:<30}{'allocation step' if kind == 'alloc' else 'other step':<17}{t * 1e3:>9.3f}")
    c = res["cpu_ratios"]
    print(
        f"cpu-time ratios (process CPU time: with --threads 1 this ignores time spent descheduled on a "
        f"shared machine): adalora/lora={c['adalora/lora']:.3f} "
        f"shrunk/lora_final={c['shrunk/lora_final']:.3f} "
        f"adalora/peft_adalora={c['adalora/peft_adalora']:.3f}"
    )
    r = res["ratios"]
    extra = {k: x for k, x in r.items() if k.endswith("/lora") and k != "adalora/lora"}
    if extra:  # the methods of --methods, before the summary (which stays the last line)
        print("ratio " + " ".join(f"{k}={x:.3f}" for k, x in extra.items()))
    print(
        f"ratio adalora/lora={r['adalora/lora']:.3f} shrunk/lora_final={r['shrunk/lora_final']:.3f} "
        f"adalora/peft_adalora={r['adalora/peft_adalora']:.3f} "
        f"allocator/peft_allocator={r['allocator/peft_allocator']:.3f}"
    )


# ---------------------------------------------------------------- bench load
# The three ways a frozen base gets to memory. Each load runs in a process of its own: ru_maxrss
# is a process's high-water mark and freed memory is not always given back to the OS, so two
# loads in one process would measure each other.
LOADS = ("fp32", "quantize-after", "nf4-at-load")
_LOAD_CHILD = "import sys; from adabudget.bench import measure_load; measure_load(*sys.argv[1:])"


def measure_load(model: str, how: str, task: str = "auto") -> dict:
    """Load ``model`` once, ``how`` one of ``LOADS``, in this process, and print (last line) and
    return its memory: ``rss_before`` (everything imported, config read), ``peak`` (the peak
    RSS after the load, ``VmHWM``), ``rss_after`` and ``weights`` (bytes the model's tensors hold), in bytes,
    and ``seconds``. ``task``: ``classification``, ``causal-lm``, or ``auto`` (causal-lm for a
    decoder). Meant for a fresh process (``bench_load``)."""
    import json

    import psutil
    from adabudget.models import ENCODERS
    from adabudget.quantize import _nf4_api, quantize_base, tensor_bytes
    from adabudget.session import peak_rss_bytes, reset_peak_memory

    if how not in LOADS:
        raise ValueError(f"how={how}: one of {', '.join(LOADS)}")
    _nf4_api()  # torchao imported by every variant alike, before the baseline
    config = _load_config(model)
    causal_lm = config.model_type not in ENCODERS if task == "auto" else task == "causal-lm"
    gc.collect()
    reset = reset_peak_memory(torch.device("cpu"))  # else the peak of the imports above may hide the load's
    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    cfg = ModelConfig(name=model, quantize="nf4" if how == "nf4-at-load" else None)
    loaded = load_model(cfg, 2, False, 0, causal_lm)
    if how == "quantize-after":
        quantize_base(loaded, "nf4")
    seconds = time.perf_counter() - start
    gc.collect()
    res = {
        "model": model,
        "load": how,
        "task": "causal-lm" if causal_lm else "classification",
        "rss_before": rss_before,
        "peak": peak_rss_bytes(),
        "peak_reset": reset,
        "rss_after": psutil.Process().memory_info().rss,
        "weights": sum(tensor_bytes(t) for t in [*loaded.parameters(), *loaded.buffers()]),  # tied: once
        "seconds": seconds,
    }
    print(json.dumps(res))
    return res


def _load_config(model: str):
    from adabudget.hub import PACKAGED, TINY, packaged_path, pretrained_kwargs
    from adabudget.models import tiny_config
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if model in TINY:
        return tiny_config(model, 2, False)
    path = packaged_path(model) if model in PACKAGED else model
    return AutoConfig.from_pretrained(path, **pretrained_kwargs(model))


def bench_load(models: list[str], task: str = "auto", repeat: int = 1, threads: int = 1) -> list[dict]:
    """``measure_load`` of every model and way in a fresh interpreter each (``repeat`` times, the
    median kept); the rows in the order of ``models`` x ``LOADS``."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    rows = []
    for model in models:
        for how in LOADS:
            runs = []
            for _ in range(repeat):
                proc = subprocess.run(
                    [sys.executable, "-c", _LOAD_CHILD, model, how, task],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                if proc.returncode:
                    raise RuntimeError(f"bench load {model} {how} failed:\n{proc.stderr[-3000:]}")
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            runs.sort(key=lambda r: r["peak"])
            rows.append(runs[len(runs) // 2])
    return rows


def load_report(rows: list[dict]) -> None:
    """The table, then one ratio line per model (the last lines)."""
    mb = 1 / 2**20
    print(
        f"{'model':<28}{'load':<16}{'task':<16}{'peak MB':>9}{'+load MB':>9}{'after MB':>9}"
        f"{'weights MB':>11}{'s':>7}{'peak/fp32':>10}{'+load/fp32':>11}"
    )
    fp32 = {r["model"]: r for r in rows if r["load"] == "fp32"}
    ratios = {}
    for r in rows:
        ref = fp32[r["model"]]
        grow, ref_grow = r["peak"] - r["rss_before"], ref["peak"] - ref["rss_before"]
        ratios.setdefault(r["model"], {})[r["load"]] = grow / ref_grow
        print(
            f"{r['model'][-27:]:<28}{r['load']:<16}{r['task']:<16}{r['peak'] * mb:>9.0f}{grow * mb:>9.0f}"
            f"{r['rss_after'] * mb:>9.0f}{r['weights'] * mb:>11.1f}{r['seconds']:>7.1f}"
            f"{r['peak'] / ref['peak']:>10.2f}{grow / ref_grow:>11.2f}"
        )
    for model, x in ratios.items():
        print(
            f"ratio {model} +load nf4-at-load/fp32={x['nf4-at-load']:.3f} "
            f"quantize-after/fp32={x['quantize-after']:.3f} "
            f"nf4-at-load/quantize-after={x['nf4-at-load'] / x['quantize-after']:.3f}"
        )


def load_main(argv: list[str] | None = None) -> list[dict]:
    """``adabudget bench load [--models minilm,smollm2] [--repeat N]``: peak process memory (RSS) of
    loading each model fp32, fp32 then ``quantize_base`` (load-then-quantise), and with
    ``model.quantize=nf4`` (quantised while read), each load in a fresh process.

    Columns: ``peak MB`` the process's peak RSS during the load (ru_maxrss after it, the peak reset
    to the current RSS just before it on Linux), ``+load MB`` that peak above the RSS just before
    the load (the load's own cost, the fairer comparison: imports and the config are not in it),
    ``after MB`` the RSS once loaded, ``weights MB`` the bytes the model's tensors hold."""
    p = load_parser()
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    print(
        f"bench load: {os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.2f}, "
        f"{args.threads} thread(s), {args.repeat} load(s) of each kind in a fresh process"
    )
    rows = bench_load(args.models.split(","), args.task, args.repeat, args.threads)
    if not all(r["peak_reset"] for r in rows):
        print("peak RSS could not be reset before the loads (not Linux?): the peaks include the imports")
    load_report(rows)
    print(f"1-min load average after: {os.getloadavg()[0]:.2f}")
    return rows


def main(argv: list[str] | None = None) -> None:
    """``adabudget bench step [options]``: print the table and, last, the ratio line.
    ``adabudget bench lr [options]``: the learning-rate grid of ``adabudget.bench_lr``.
    ``adabudget bench load [options]``: peak memory of the three loads (``load_main``)."""
    if argv and argv[0] == "lr":
        from adabudget.bench_lr import main as lr_main

        return lr_main(argv[1:])
    if argv and argv[0] == "load":
        load_main(argv[1:])
        return
    args = parse_args(argv)
    report(args, run(args))


if __name__ == "__main__":
    main()
