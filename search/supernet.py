"""A weight-sharing supernet over hybrid PEFT configurations (AutoFormer / NOAH style).

One model holds LoRA, the adapters and prefix-tuning at their largest sizes in every block; a
sub-configuration uses the leading slice of each and switches modules off per block, so one training
scores many configurations with inherited weights. ``train_supernet`` trains it (a run with a
``RunSession``), ``score`` evaluates a sub-configuration, ``run_evolution`` searches over scores.
The space, the slicing, the masked update and why AdaLoRA and BitFit are left out:
docs/supernet.md#how-it-works.

Invariants:

- A sub-configuration is a real ``hybrid`` method; its slices, copied out (``Supernet.state_of``),
  are exactly the trainable state of that stand-alone model, which computes the same outputs.
- ``MaskedAdamW`` updates only the elements in use at a step: an element follows AdamW's trajectory
  over the steps in which it was trained, never moves while inactive.
- The path trained at step t depends on (seed, t) only, so a resumed run trains the same paths.
- What defines the supernet (``settings_of``: the budget and the ``DEFINING`` menus and knobs) is
  in ``supernet.yaml``; a resume or a reuse with other settings is refused. (Folders of older
  versions held it as a ``search`` node of ``config.yaml``: read from there, moved on resume.)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch
from adabudget import ddp
from adabudget.checkpoint import check_resume, load_checkpoint
from adabudget.compose import resumed
from adabudget.config import ConfigError, RunConfig, validate
from adabudget.evaluate import batch_stream, evaluate, forward_inputs
from adabudget.log import log, write_text_atomic
from adabudget.methods import REGISTRY, adapter, lora, parallel_adapter, plan_of, prefix
from adabudget.metrics import primary_metric
from adabudget.models import pick_device
from adabudget.modules import count_params
from adabudget.schedule import lr_factor
from adabudget.search.config import SupernetConfig
from adabudget.search.spaces.supernet import Sub, SupernetSpace, space_function
from adabudget.session import RunSession, reset_peak_memory, total_steps_for
from adabudget.session import setup as setup_run
from torch import nn

# Each method's modules built as their sliceable subclass (the plain ones compute at their full size)
BUILD = {
    "lora": functools.partial(lora.apply, layer_cls=lora.SlicedLoRALinear),
    "adapter": functools.partial(adapter.apply, layer_cls=adapter.SlicedBottleneckAdapter),
    "parallel_adapter": functools.partial(
        parallel_adapter.apply, layer_cls=parallel_adapter.SlicedParallelAdapter
    ),
    "prefix": functools.partial(prefix.apply, layer_cls=prefix.SlicedPrefixKV),
}
SET_ACTIVE = {
    "lora": lora.set_active,
    "adapter": adapter.set_active,
    "parallel_adapter": parallel_adapter.set_active,
    "prefix": prefix.set_active,
}
# SupernetConfig fields that define the trained supernet (saved in its supernet.yaml, with the
# budget; a resume keeps them). The others only say how it is trained for how long (steps ->
# train.max_steps) or used.
DEFINING = (
    "lora",
    "adapter",
    "prefix",
    "parallel_adapter",
    "tolerance",
    "lora_scaling",
    "adapter_placement",
    "sampling",
    "random_paths",
    "paths_per_step",
)
# The supernet's settings (``settings_of``), beside config.yaml in its run folder: what a resume
# or a later search reads back. The run config itself carries nothing of the search.
SETTINGS = "supernet.yaml"
SETTINGS_HEAD = (
    "# What defines this supernet (adabudget search's search.budget, search.budget_percent and\n"
    "# search.supernet.*): read back on resume and when a search scores with it; changing it is refused.\n"
)


# ---------------------------------------------------------------- the space


# ---------------------------------------------------------------- the supernet
class Supernet:
    """One model with every module of ``space`` at its largest size, and the slice in use.

    ``units[(method, block)]`` lists the (module name, module) pairs a size controls (LoRA: the
    block's adapted linears; a Houlsby adapter: two). The data of its run (``task``, ``pad_id``,
    ``device``, ``inputs``, ``run``) is set by ``build``.
    """

    def __init__(self, model: nn.Module, space: SupernetSpace, units: dict):
        self.model, self.space, self.units = model, space, units
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # (trainable)
        owned = {
            f"{name}.{local}"
            for mods in units.values()
            for name, mod in mods
            for local, _ in mod.named_parameters()
        }
        self.shared = [n for n in self.params if n not in owned]  # the task head: in every slice
        self.run: RunConfig | None = None
        self.task = None
        self.pad_id = 0
        self.device = torch.device("cpu")
        self.inputs: set[str] = set()

    @classmethod
    def attach(cls, model: nn.Module, space: SupernetSpace) -> Supernet:
        """Apply ``space.full()`` (as ``adabudget.methods.apply_plan`` would apply that hybrid) to
        ``model``."""
        plan = plan_of(_method_config(space.to_method(space.full())), space.arch)
        units: dict = {}
        for group in plan.groups:
            for name, mcfg in group.methods.items():
                for path, module in BUILD.get(name, REGISTRY[name].apply)(model, mcfg, group.layers).items():
                    block = next(i for i in range(space.layers) if path.startswith(space.arch.block(i) + "."))
                    units.setdefault((name, block), []).append((path, module))
        return cls(model, space, units)

    def activate(self, sub: Sub) -> dict[str, tuple]:
        """Switch to ``sub``; returns {trainable parameter name: index of its part in use}."""
        regions = {n: (slice(None),) for n in self.shared}
        for m, sizes in sub.sizes:
            for i, size in enumerate(sizes):
                for path, module in self.units.get((m, i), []):
                    for local, index in SET_ACTIVE[m](module, size).items():
                        regions[f"{path}.{local}"] = index
        return regions

    def state_of(self, sub: Sub) -> dict[str, torch.Tensor]:
        """The trainable state of the stand-alone model of ``sub``: each part in use, copied."""
        return {n: self.params[n].detach()[index].clone() for n, index in self.activate(sub).items()}

    def active_count(self, sub: Sub) -> int:
        """Parameters in use by ``sub``, the task head excluded."""
        return sum(
            self.params[n][index].numel() for n, index in self.activate(sub).items() if n not in self.shared
        )


def _method_config(node: dict):
    from adabudget.methods import method_config_from_dict

    return method_config_from_dict(node)


def build(run: RunConfig, settings: dict) -> Supernet:
    """Data, backbone and supernet of a supernet run config and its ``settings`` (``supernet_run``),
    set up by ``adabudget.session.setup`` as every run is (same calls, same order, so the same seed
    gives the same initial weights)."""
    tc = run.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    device = pick_device(tc.device)
    task, tokenizer, model = setup_run(run)
    space = space_of(settings, model.config)
    net = Supernet.attach(model, space)
    model.to(device)
    net.run, net.task, net.pad_id, net.device = run, task, tokenizer.pad_token_id, device
    net.inputs = forward_inputs(model)
    return net


def space_of(settings: dict, model_config) -> SupernetSpace:
    """The space that a supernet's ``settings`` (budget and menus) describe on a model of ``model_config``."""
    from adabudget.search.spaces.context import SpaceContext

    ctx = SpaceContext.from_config(
        model_config, budget=settings["budget"], budget_percent=settings["budget_percent"]
    )
    return SupernetSpace.from_context(ctx, SupernetConfig(**settings["supernet"]))


# ---------------------------------------------------------------- its settings
def settings_of(search: dict) -> dict:
    """What defines a supernet, from an ``adabudget search`` node: ``budget``, ``budget_percent`` and
    ``supernet`` (its ``DEFINING`` knobs), under the names of the search's keys (``search.budget``,
    ``search.supernet.lora``); checked (``SupernetConfig.validate``)."""
    scfg = SupernetConfig(**dict(search.get("supernet") or {}))
    scfg.validate()
    return {
        "budget": search.get("budget"),
        "budget_percent": search.get("budget_percent"),
        "supernet": {k: getattr(scfg, k) for k in DEFINING},
    }


def saved_settings(run_dir: str | Path) -> dict:
    """The settings a supernet run folder was trained with: its ``supernet.yaml``; in a folder an
    older version wrote (none there), the ``search`` node of its ``config.yaml``."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    if (run_dir / SETTINGS).exists():
        return OmegaConf.to_container(OmegaConf.load(run_dir / SETTINGS), resolve=True)
    legacy = (
        OmegaConf.load(run_dir / "config.yaml").get("search") if (run_dir / "config.yaml").exists() else None
    )
    if not legacy:
        raise ConfigError(
            f"resume={run_dir}: no {SETTINGS} there (the settings a supernet was trained with): not a "
            "supernet run folder; pass the folder `adabudget search search.scorer=supernet` trained"
        )
    return settings_of(OmegaConf.to_container(legacy, resolve=True))


def write_settings(run_dir: Path, settings: dict) -> None:
    """``<run_dir>/supernet.yaml`` (atomically; left as it is when unchanged)."""
    import yaml

    text = f"{SETTINGS_HEAD}{yaml.safe_dump(settings, sort_keys=False)}"
    path = Path(run_dir) / SETTINGS
    if not path.exists() or path.read_text() != text:
        write_text_atomic(path, text, fsync=True)


def check_settings(run_dir: Path, settings: dict) -> None:
    """Refuse to continue (or reuse) the supernet in ``run_dir`` with other ``settings`` than its own."""
    from adabudget.checkpoint import config_changes

    changes = config_changes({"search": saved_settings(run_dir)}, {"search": settings})
    if changes:
        raise ConfigError(
            f"resume={run_dir}: {', '.join(list(changes.values())[:6])} cannot change on resume: they "
            f"define the supernet trained there ({run_dir / SETTINGS}); train a new one in another folder"
        )


# ---------------------------------------------------------------- masked AdamW
class MaskedAdamW:
    """AdamW (Loshchilov & Hutter; ``torch.optim.AdamW``'s update) on the elements in use only.

    Each element keeps its own moments and step count t, and a step touches only the elements
    listed in its ``regions``: they take AdamW's update with bias corrections 1 - β^t of their
    own t; every other element keeps its value and its moments. So an element follows AdamW's
    trajectory over the steps in which it was trained, and nothing moves that was not (see the
    module docstring for why zeroed gradients are not enough).
    """

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        self.params, self.betas, self.eps, self.weight_decay = params, betas, eps, weight_decay
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self, regions: dict[str, list[tuple]], lr: float) -> None:
        """Update the parts ``regions`` names ({name: [index, ...]}: their union) at learning rate ``lr``."""
        b1, b2 = self.betas
        for name, indices in regions.items():
            p = self.params[name]
            if p.grad is None:
                continue
            mask = torch.zeros_like(p, dtype=torch.bool)
            for index in indices:
                mask[index] = True
            st = self.state.get(name)
            if st is None:
                st = self.state[name] = {k: torch.zeros_like(p) for k in ("exp_avg", "exp_avg_sq", "step")}
            g, m, v, t = p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"]
            t.add_(mask.to(t.dtype))
            m.copy_(torch.where(mask, m.lerp(g, 1 - b1), m))
            v.copy_(torch.where(mask, v * b2 + (1 - b2) * g * g, v))
            correction1 = 1 - torch.pow(b1, t)  # 0 where never trained: masked out below
            correction2 = 1 - torch.pow(b2, t)
            update = lr * (m / correction1) / (v.sqrt() / correction2.sqrt() + self.eps)
            if self.weight_decay:
                p.mul_(torch.where(mask, 1 - lr * self.weight_decay, 1.0))
            p.sub_(torch.where(mask, update, 0.0))

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def state_dict(self) -> dict:
        return {n: dict(s) for n, s in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        self.state = {n: {k: v.to(self.params[n].device) for k, v in s.items()} for n, s in state.items()}


# ---------------------------------------------------------------- the run
def supernet_run(cfg) -> tuple[RunConfig, dict]:
    """The supernet's run config and settings (``settings_of``) from an ``adabudget search`` config
    (run + ``search`` node) or from a supernet run's own saved config
    (``adabudget.compose.resume_config``, its settings then read from the folder): the run, its
    method the supernet's largest hybrid, ``search.supernet.steps`` as ``train.max_steps``."""
    from adabudget.compose import resolve
    from adabudget.search.spaces.context import SpaceContext
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = copy.deepcopy(dict(cfg))
    cfg.pop("hydra", None)
    search = cfg.pop("search", None)
    if search is None and cfg.get("resume"):  # a supernet folder's own config continues with its settings
        settings = saved_settings(cfg["resume"])
    else:
        settings = settings_of(search or {})
    steps = ((search or {}).get("supernet") or {}).get("steps")
    cfg["method"] = None
    run = resolve(cfg)
    if steps is not None:
        run.train.max_steps = steps
    if run.run_name == "default":
        run.run_name = "supernet"
    run.meta = {**run.meta, "supernet": True}
    ctx = SpaceContext.from_model(
        run.model.name,
        revision=run.model.revision,
        budget=settings["budget"],
        budget_percent=settings["budget_percent"],
    )
    space = SupernetSpace.from_context(ctx, SupernetConfig(**settings["supernet"]))
    space.check()
    run.method = _method_config(space.to_method(space.full()))
    return run, settings


def path_at(space: SupernetSpace, scfg, seed: int, step: int, k: int) -> tuple[str, Sub]:
    """The k-th sub-configuration trained at optimizer step ``step`` (a pure function of them)."""
    n = step * scfg.paths_per_step + k
    if scfg.sampling == "largest":
        return "largest", space.extreme("largest")
    if scfg.sampling == "sandwich":
        position = n % (2 + scfg.random_paths)
        if position < 2:
            which = ("largest", "smallest")[position]
            return which, space.extreme(which)
    return "random", space.sample(np.random.default_rng([seed, n]), 1)[0]


def train_supernet(cfg) -> dict:
    """Train a supernet; returns its result record (also in ``result.json``).

    The run's bookkeeping is ``adabudget.session.RunSession``'s, as ``adabudget.training.train``'s
    (folder, record, checkpoints with the checkpoint at T before the final evaluation, stop
    signals, non-finite stops, result); this loop keeps only its own step.

    Args:
        cfg: an ``adabudget search`` config (the run and its ``search`` node: ``search.budget``,
            ``search.supernet.*``), or a supernet run folder's config with ``resume`` set
            (``adabudget.compose.resume_config(folder)``), which continues it.
    """
    run, settings = supernet_run(cfg)
    if run.resume:
        check_resume(run.resume)  # a run folder with a checkpoint, before anything of it is read
        check_settings(Path(run.resume), settings)  # first: a change there names the search setting
        run = resumed(run)  # the saved config, changed only in RESUMABLE knobs
        saved = _completed(Path(run.resume), run)
        if saved is not None:  # nothing to do: never append a second ending
            return {**saved, "note": "already completed; nothing to resume (raise train.max_steps to go on)"}
    validate(run)
    tc = run.train
    memory_reset = reset_peak_memory(pick_device(tc.device))  # the record's peak_memory_mb is this run's
    net = build(run, settings)
    model, space, task, device = net.model, net.space, net.task, net.device
    scfg = SupernetConfig(**settings["supernet"])
    total_steps = total_steps_for(run, len(task.train))  # T
    largest, smallest = space.extreme("largest"), space.extreme("smallest")
    resume_command = "train_supernet(adabudget.compose.resume_config('{run_dir}'))"
    session = RunSession(
        run, ddp.Dist(), device, total_steps, primary_metric(task.regression), resume_command
    )
    if session.completed is not None:
        session.close()
        return session.completed
    trainable, total_params = count_params(model)
    header = {
        "run_name": run.run_name,
        "method": "supernet",
        "model": run.model.name,
        "task": run.data.task,
        "data_version": getattr(task, "version", None),
        "split_sizes": task.sizes(),
        "primary_metric": primary_metric(task.regression),
        "regression": task.regression,
        "total_steps": total_steps,
        "trainable_params": trainable,
        "total_params": total_params,
        "world_size": 1,
        "peak_memory_scope": "run" if memory_reset else "process",
        "groups": plan_of(run.method, space.arch).report(space.arch),
        "modules": [],
        "meta": run.meta,
        "supernet": {
            "methods": list(space.methods),
            "menus": {m: list(v) for m, v in space.menus.items()},
            "budget": space.budget,
            "band": [space.band()[0], space.band()[1] if space.budget else None],
            "largest": {"sub": largest.key(), "params": space.count(largest)},
            "smallest": {"sub": smallest.key(), "params": space.count(smallest)},
            "sampling": scfg.sampling,
            "paths_per_step": scfg.paths_per_step,
        },
    }
    summary = {"trainable_params_final": trainable, "adapter_params_final": None, "ranks": None}

    optimizer = MaskedAdamW(net.params, weight_decay=tc.weight_decay)
    params = list(net.params.values())
    warmup = int(tc.warmup_ratio * total_steps)
    # running: the open logging window's summed loss; window: its steps
    step, window, running = session.restore(model, optimizer, None, torch.zeros((), device=device))
    stream = batch_stream(task.train, tc, net.pad_id, net.inputs, step)

    def dev_eval(at_step: int) -> dict:
        """Dev metrics of the largest and smallest sub-configurations (the sandwich's bounds)."""
        out = {}
        for which, sub in (("largest", largest), ("smallest", smallest)):
            out[which] = score(net, sub)
            session.metrics({"step": at_step, "split": "dev", "path": which, **out[which]})
        session.track_best(at_step, out["largest"])
        return out

    # the loop: one iteration = one optimizer step over paths_per_step sub-configurations
    status, fields = None, {}  # how the run ends: an early stop sets them, else the final evaluation
    with session.open(header, lambda: summary):
        if session.dist.main:  # beside config.yaml; an older folder's search node is moved here
            write_settings(session.dir, settings)
        model.train()
        while step < total_steps:
            paths = [path_at(space, scfg, tc.seed, step, k)[1] for k in range(scfg.paths_per_step)]
            regions: dict[str, list] = {}
            for sub in paths:
                for name, index in net.activate(sub).items():
                    regions.setdefault(name, []).append(index)
            share = 1.0 / (tc.grad_accum * len(paths))
            for _ in range(tc.grad_accum):
                batch = {k: v.to(device, non_blocking=True) for k, v in next(stream).items()}
                for sub in paths:
                    net.activate(sub)
                    task_loss = model(**batch).loss
                    (task_loss * share).backward()
                    running += task_loss.detach() * share
            if tc.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            optimizer.step(regions, tc.lr * lr_factor(step, warmup, total_steps))
            optimizer.zero_grad()
            step = session.advance()
            window += 1

            if step % tc.log_every == 0 or step == total_steps:
                mean_loss = (running / window).item()
                lr = tc.lr * lr_factor(step, warmup, total_steps)
                error = session.train_line({"step": step, "split": "train", "loss": mean_loss, "lr": lr})
                running.zero_()
                window = 0
                if error is not None:
                    status, fields = "failed", {"error": error}
                    break
            if tc.eval_every and step % tc.eval_every == 0 and step < total_steps:
                dev_eval(step)
                model.train()
            cause = session.stop_requested(step)
            if step == total_steps or cause or session.should_checkpoint(step):
                before = "the final checkpoint" if step == total_steps else "a checkpoint"
                if error := session.nonfinite([*params, running], step, before):
                    status, fields = "failed", {"error": error}
                    break
                session.save(step, model, optimizer, None, window, running)
                if cause and step < total_steps:
                    log.warning("%s: checkpoint at step %d, then exit", cause, step)
                    status, fields = "interrupted", session.interruption(cause)
                    break

        if status is None:  # the final evaluation, after the checkpoint at T
            final = dev_eval(step)
            if cause := session.signalled():
                log.warning("%s in the final evaluation: the checkpoint at step %d stands", cause, step)
                status, fields = "interrupted", session.interruption(cause)
            else:
                status, fields = "completed", {"final": {"dev": final["largest"]}, "paths": final}
        result = session.result(status, **fields)
    return result


def _completed(run_dir: Path, run: RunConfig) -> dict | None:
    """The saved result of a completed supernet run that ``run`` would not extend (same T), else None."""
    from omegaconf import OmegaConf

    path = run_dir / "result.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    if saved.get("status") != "completed":
        return None
    before = OmegaConf.load(run_dir / "config.yaml").train
    same = run.train.max_steps == before.max_steps and run.train.epochs == before.epochs
    return saved if same else None


# ---------------------------------------------------------------- scoring
def score(
    net: Supernet,
    sub: Sub,
    calibration_steps: int = 0,
    calibration_lr: float | None = None,
    split: str = "dev",
) -> dict:
    """Metrics of ``sub`` on ``split`` with inherited weights.

    With ``calibration_steps`` > 0, first trains only that slice and the head for that many steps
    (a fresh ``MaskedAdamW`` at ``calibration_lr``, default ``train.lr``, on the same seeded batches
    for every sub-configuration, dropout from a fixed seed), then restores every weight.
    """
    tc = net.run.train
    regions = net.activate(sub)
    saved = None
    if calibration_steps:
        saved = {n: p.detach().clone() for n, p in net.params.items()}
        optimizer = MaskedAdamW(net.params, weight_decay=tc.weight_decay)
        # the same seeded batches for every sub-configuration: the training stream under seed + 1
        batches = batch_stream(
            net.task.train, dataclasses.replace(tc, seed=tc.seed + 1), net.pad_id, net.inputs, 0
        )
        with torch.random.fork_rng(devices=[net.device] if net.device.type == "cuda" else []):
            torch.manual_seed(tc.seed + 1)
            net.model.train()
            for _ in range(calibration_steps):
                batch = {k: v.to(net.device) for k, v in next(batches).items()}
                net.model(**batch).loss.backward()
                if tc.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(list(net.params.values()), tc.max_grad_norm)
                optimizer.step({n: [i] for n, i in regions.items()}, calibration_lr or tc.lr)
                optimizer.zero_grad()
    examples = getattr(net.task, split)
    try:
        return evaluate(net.model, examples, net.task, tc.eval_batch_size, net.pad_id, net.device)
    finally:
        if saved is not None:
            with torch.no_grad():
                for n, p in net.params.items():
                    p.copy_(saved[n])


def load_supernet(run_dir: str | Path) -> Supernet:
    """A trained supernet from its run folder (``checkpoints/last.pt``, ``supernet.yaml``), ready to
    ``score``."""
    from adabudget.compose import resolve, saved_config

    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints" / "last.pt").exists():
        raise ConfigError(
            f"search.supernet.run_dir={run_dir}: no trained supernet there (no checkpoints/last.pt)"
        )
    net = build(resolve(saved_config(run_dir)), saved_settings(run_dir))
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")["trainable"]
    net.model.load_state_dict(state, strict=False)
    net.model.eval()
    return net


_LOADED: dict[str, Supernet] = {}


def loaded(run_dir: str | Path) -> Supernet:
    """``load_supernet``, once per process and folder."""
    key = str(Path(run_dir).resolve())
    if key not in _LOADED:
        _LOADED[key] = load_supernet(run_dir)
    return _LOADED[key]


# ---------------------------------------------------------------- search
def ensure_supernet(setup, log=print) -> dict:
    """The study's trained supernet: trained into ``setup.supernet_dir`` if that holds none, resumed if it
    holds an interrupted one, else reused (any setting that defines it must be the same)."""
    from adabudget.compose import resume_config

    folder = setup.supernet_dir
    cfg = {**copy.deepcopy(setup.base), "search": copy.deepcopy(setup.search), "run_dir": str(folder)}
    cfg["train"] = {**cfg["train"], "num_threads": setup.scfg.worker_threads()}
    if (folder / "config.yaml").exists():
        if not (folder / "checkpoints" / "last.pt").exists():
            raise ConfigError(
                f"search.supernet.run_dir={folder}: holds a supernet killed before its first checkpoint; "
                "delete the folder to train it again"
            )
        # the same run, as resume_config would give it, checked against the saved one (compose.resumed)
        # and its settings against supernet.yaml (check_settings)
        saved = resume_config(folder)
        cfg = {**cfg, "resume": str(folder), "run_name": saved.run_name, "meta": dict(saved.meta)}
        cfg["train"] = {**cfg["train"], "stop_after_step": None}
        log(f"supernet: {folder} (reused or resumed)")
    else:
        log(f"supernet: training it in {folder}")
    try:
        result = train_supernet(cfg)
    except ConfigError as err:
        if "resume=" not in str(err):
            raise
        raise ConfigError(
            f"search.supernet.run_dir={folder}: the supernet there was trained with other settings ({err}); "
            "score with it under its own settings, or give a new search.supernet.run_dir (or search.study)"
        ) from err
    if result["status"] != "completed":
        raise RuntimeError(f"supernet training ended {result['status']}: {result.get('error')}; see {folder}")
    return result


def make_objective(setup, ctx, release=lambda: None):
    """The trial function of ``search.scorer=supernet``: sample a sub-configuration (Optuna's
    sampler, or an enqueued evolution candidate), check it against the band, score it."""
    from adabudget.search.optuna_factory import objective_values
    from adabudget.search.spaces.sampling import sample
    from adabudget.search.trial import TrialFailed, infeasible_values, trained_twin

    scfg = setup.scfg
    names = scfg.objective_names(setup.primary)
    directions = scfg.direction_names(setup.primary)
    space = SupernetSpace.from_context(ctx, scfg.supernet)
    space_fn = space_function(space)
    folder = setup.supernet_dir

    def objective(trial):
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        release()
        drawn = sample(trial, space_fn, ctx)
        trial.set_user_attr("overrides", drawn.overrides)
        trial.set_user_attr("scorer", "supernet")
        if not drawn.feasible:
            return infeasible_values(drawn, names, directions)
        twin = trained_twin(trial, drawn.overrides)
        if twin is not None:
            trial.set_user_attr("duplicate_of", twin.number)
            return list(twin.values)
        sub = space.from_params(trial.params)
        if space.count(sub) != drawn.trainable_params:
            raise TrialFailed(
                f"{sub.key()}: unit table counts {space.count(sub)}, count_trainable "
                f"{drawn.trainable_params}: a count bug"
            )
        net = loaded(folder)
        t0 = time.time()
        metrics = score(net, sub, scfg.supernet.calibration_steps, scfg.supernet.calibration_lr)
        seconds = time.time() - t0
        trial.set_user_attr("sub", sub.key())
        trial.set_user_attr("inherited", metrics)
        trial.set_user_attr("calibration_steps", scfg.supernet.calibration_steps)
        trial.set_user_attr("wall_time_s", round(seconds, 3))
        trial.set_user_attr("run_dir", None)
        scored = {"final": {"dev": metrics}, "wall_time_s": seconds}  # as a trained trial's record holds them
        return objective_values(scored, names, drawn.budget_params)

    return objective


def propose(
    space: SupernetSpace,
    scored: list[tuple[Sub, float]],
    scfg: SupernetConfig,
    n: int,
    rng: np.random.Generator,
) -> list[Sub]:
    """The next ``n`` candidates of the evolution (AutoFormer, Sec. 3.3): random feasible ones until
    the first population is scored; then, from the ``parents`` best scored so far (higher is better),
    ``crossover_share`` crossovers of two parents and mutants of one for the rest. Every candidate
    is in the budget band and new (not scored, not proposed twice)."""
    seen = {s for s, _ in scored}
    out: list[Sub] = []

    def add(sub: Sub) -> bool:
        if sub in seen:
            return False
        seen.add(sub)
        out.append(sub)
        return True

    if len(scored) < scfg.population:
        for sub in space.sample(rng, 50 * n):
            if len(out) >= n:
                break
            add(sub)
    else:
        parents = [s for s, _ in sorted(scored, key=lambda x: -x[1])[: scfg.parents]]
        crossovers = round(scfg.crossover_share * n)
        for _ in range(200 * n):
            if len(out) >= n:
                break
            if len(out) < crossovers and len(parents) > 1:
                a, b = rng.choice(len(parents), size=2, replace=False)
                add(space.crossover(parents[a], parents[b], rng))
            else:
                add(space.mutate(parents[rng.integers(len(parents))], rng, scfg.mutation_prob))
    for sub in space.sample(rng, 50 * n) if len(out) < n else []:  # a small space, mostly seen: any new one
        if len(out) >= n:
            break
        add(sub)
    return out


def run_evolution(setup) -> None:
    """``search.sampler=evolution``: generations of ``population`` candidates enqueued as trials of
    the study (so the record, resume and ``retrain`` are the study's), until ``n_trials`` are scored.
    The state is the study itself: a resumed search goes on from the trials it holds."""
    import optuna
    from adabudget.search.optuna_factory import finished
    from adabudget.search.progress import Progress
    from adabudget.search.study import make_context, open_study
    from adabudget.search.trial import TrialFailed
    from optuna.trial import TrialState

    scfg = setup.scfg
    torch.set_num_threads(scfg.worker_threads())
    study = open_study(setup)
    ctx = make_context(setup)
    space = SupernetSpace.from_context(ctx, scfg.supernet)
    sign = 1 if scfg.direction_names(setup.primary)[0] == "maximize" else -1
    objective = make_objective(setup, ctx)
    progress = Progress(setup)
    try:
        while True:
            trials = study.get_trials(deepcopy=False)
            wanted = scfg.n_trials - sum(finished(t) for t in trials)
            if wanted <= 0:
                break
            waiting = [t for t in trials if t.state == TrialState.WAITING]
            if not waiting:
                scored = [
                    (space.from_params(t.params), sign * t.values[0])
                    for t in trials
                    if t.state == TrialState.COMPLETE and finished(t)
                ]
                generation = len(scored) // scfg.supernet.population
                rng = np.random.default_rng([scfg.seed, len(trials)])
                batch = propose(space, scored, scfg.supernet, min(wanted, scfg.supernet.population), rng)
                if not batch:
                    log.warning("evolution: every sub-configuration of the band is scored; stopping")
                    break
                for sub in batch:
                    study.enqueue_trial(space.params(sub), user_attrs={"generation": generation})
                waiting = batch
            study.optimize(
                objective, n_trials=min(wanted, len(waiting)), catch=(TrialFailed,), gc_after_trial=False
            )
            progress.poll(study)
    finally:
        progress.close()
    optuna.logging.set_verbosity(optuna.logging.WARNING)


__all__ = [
    "MaskedAdamW",
    "Supernet",
    "build",
    "ensure_supernet",
    "load_supernet",
    "make_objective",
    "propose",
    "run_evolution",
    "score",
    "train_supernet",
]
