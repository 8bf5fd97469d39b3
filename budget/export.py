"""Getting a trained model out: a peft LoRA adapter, a merged HF checkpoint, trainable-only state dicts.

A trained AdaLoRA layer, W0 x + s P diag(λ) Q x, is a LoRA layer with A = Q, B = s P diag(λ) and
alpha = r, so AdaLoRA (and our LoRA) runs export as a plain peft LoRA adapter with a per-module
``rank_pattern``; peft is not imported here, its format is written by hand. The mapping and the
format (peft 0.13 - 0.21): docs/run-record.md#the-peft-export.

Invariants:

- ``peft.PeftModel.from_pretrained`` on the exported adapter gives the run's logits; a module of
  rank 0 is left out (peft refuses r = 0; its ΔW = 0, so this is exact).
- Every module peft wraps as ``modules_to_save`` (the task head) is written under its plain name.
- ``save_merged`` merges a deep copy: the caller's model keeps its wrappers.
- The adapter applies to the UNTOUCHED base: where PiSSA / OLoRA moved s B0 A0 out of W0, the
  change relative to W0, s (B A - B0 A0), is written as a rank-2r LoRA (peft's
  ``path_initial_model_for_weight_conversion``); DoRA's magnitude goes with ``use_dora``.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from adabudget.methods import dylora
from adabudget.methods.adalora import SVDLinear
from adabudget.methods.lora import DoRA, LoRALinear
from adabudget.modules import is_head, is_linear, set_module
from torch import nn

PEFT_PREFIX = "base_model.model."
# Heads peft adds to modules_to_save by itself for these task types (peft_model.py).
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def export_peft_adapter(
    model: nn.Module,
    wrapped: dict[str, nn.Module],
    out_dir: str | Path,
    base_model_name_or_path: str,
    task_type: str = "SEQ_CLS",
    rank: int | None = None,
) -> dict:
    """Write ``out_dir/adapter_config.json`` and ``adapter_model.safetensors`` in peft's LoRA format.

    ``peft.PeftModel.from_pretrained(base, out_dir)``, with ``base`` the backbone as it was
    before the method was applied, then computes the same function as ``model``: every
    adapted module with ΔW != 0 becomes a LoRA layer with ΔW = B A exactly, and the task head
    (``classifier`` / ``score``) is saved as a peft ``modules_to_save`` module.

    Args:
        model: the model holding the ``SVDLinear`` / ``LoRALinear`` wrappers.
        wrapped: {module name: wrapper}, as returned by ``apply_method``.
        out_dir: folder to write (created if missing).
        base_model_name_or_path: recorded in the config (``AutoPeftModel`` loads it).
        task_type: peft task type; ``SEQ_CLS`` for our sequence-classification models.
        rank: DyLoRA only: export rank ``rank`` (A[:rank], B[:, :rank] at scale alpha / rank);
            None exports the rank the layers compute at (``method.export_rank``).

    Returns:
        {"path", "modules": {name: exported rank}, "pruned": [rank-0 modules left out],
        "modules_to_save": [head modules], "adapter_params", "head_params", "params"}.

    Raises:
        ValueError: nothing to export (no adapter, or every module pruned to rank 0), a
            trainable parameter the adapter cannot carry, or a module name that peft's
            matching rules would resolve to the wrong module.
    """
    adapters = _adapters(wrapped)
    for name, layer in adapters.items():
        if not isinstance(layer, (SVDLinear, LoRALinear)):
            raise ValueError(f"{name}: {type(layer).__name__} has no peft LoRA equivalent; use save_merged")
        # a LoRA layer over more than a frozen linear (RoSA's W0 + S) or whose W0 moved (Delta-LoRA):
        # B A alone is not the layer's change, and the adapter would silently compute something else
        if not is_linear(layer.base) or getattr(layer, "moves_base", False):
            raise ValueError(
                f"{name}: {type(layer).__name__} over {type(layer.base).__name__} changes more than B A "
                "(a sparse part, or an updated W0 whose start is not known); a peft LoRA adapter cannot "
                "carry it: use save_adapter (export_adapter=true) or save_merged (export_merged=true)"
            )
    if not adapters:
        raise ValueError("no adapter layers to export (full fine-tuning?); use save_merged instead")
    dora = {name for name, layer in adapters.items() if isinstance(layer, DoRA)}  # LoRA's or AdaLoRA's
    if dora and dora != set(adapters):
        raise ValueError(
            f"{sorted(set(adapters) - dora)[0]} is plain LoRA beside DoRA layers ({sorted(dora)[0]}); "
            "peft's use_dora is one flag for the whole adapter: use save_adapter or save_merged"
        )
    # method=lora at one (r, alpha, rslora): peft's own scale (lora_alpha, use_rslora), B as trained;
    # anything else (AdaLoRA, DyLoRA at a chosen rank, ...) folds its scale into B at alpha = r
    scales = {(layer.rank, getattr(layer, "peft_alpha", None)) for layer in adapters.values()}
    own = len(scales) == 1 and all(getattr(layer, "peft_alpha", None) for layer in adapters.values())
    with torch.no_grad(), dylora.at_rank(wrapped, rank):
        factors = {name: _lora_factors(layer, fold=not own) for name, layer in adapters.items()}
    for name in dora:  # DoRA at rank 0 still rescales W0 by its m: a zero rank-1 pair carries m
        a, b = factors[name]
        if a.shape[0] == 0:
            factors[name] = (a.new_zeros(1, a.shape[1]), b.new_zeros(b.shape[0], 1))
    ranks = {name: a.shape[0] for name, (a, _) in factors.items()}
    kept = {name: r for name, r in ranks.items() if r > 0}
    pruned = sorted(name for name, r in ranks.items() if r == 0)
    if not kept:
        raise ValueError(
            "every adapted module has rank 0 (pruned, or all λ = 0): ΔW = 0, the base model is the result"
        )

    names = _base_module_names(model, adapters)
    heads = sorted(n for n in names if n and "." not in n and is_head(n))  # top-level head modules
    # Every module peft will wrap as modules_to_save must have its weights in the file.
    suffixes = tuple(heads) + TASK_HEADS.get(task_type, ())
    saved = [n for n in names if n and suffixes and n.endswith(suffixes)]
    _check_trainable_covered(model, adapters, saved)

    # Most modules share one rank; only the others need a pattern entry. alpha = r: scale 1.
    r_default = Counter(kept.values()).most_common(1)[0][0]
    pattern = {name: r for name, r in sorted(kept.items()) if r != r_default}
    dropouts = [getattr(adapters[n].dropout, "p", 0.0) for n in kept]
    alpha, rslora = r_default, False
    if own:
        ((r_own, (alpha, rslora)),) = scales
        if r_default == 2 * r_own:  # PiSSA / OLoRA written as [A; A0], [B, -B0]: keep s (as peft does)
            alpha *= math.sqrt(2) if rslora else 2
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": r_default,
        "lora_alpha": alpha,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(kept),
        "modules_to_save": heads or None,
        "fan_in_fan_out": any(adapters[n].fan_in_fan_out for n in kept),
        "lora_dropout": max(dropouts),
        "bias": "none",
        "use_rslora": rslora,
        "use_dora": bool(dora),
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    _check_peft_matching(names, config, kept, suffixes)

    tensors, adapter_params = {}, 0
    for name in sorted(kept):
        a, b = factors[name]
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a  # (r, in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b  # (out, r)
        adapter_params += a.numel() + b.numel()
        if name in dora:  # m (out,)
            m = adapters[name].magnitude.detach().cpu().contiguous()
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = m
            adapter_params += m.numel()
    head_params = 0
    for name in saved:
        for key, value in model.get_submodule(name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = value.detach().cpu().contiguous()
            head_params += value.numel()

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return {
        "path": str(out),
        "modules": dict(sorted(kept.items())),
        "pruned": pruned,
        "modules_to_save": saved,
        "adapter_params": adapter_params,
        "head_params": head_params,
        "params": adapter_params + head_params,
    }


@torch.no_grad()
def merge_into_base(model: nn.Module, wrapped: dict[str, nn.Module]) -> nn.Module:
    """Fold every ΔW into its frozen base weight and put the base module back, in place.

    W0 += s P diag(λ) Q (AdaLoRA) or s B A (LoRA); GPT-2's Conv1D stores W as (in, out),
    so ΔW is transposed there. The wrappers in ``wrapped`` are detached from ``model``
    afterwards. Returns ``model``.
    """
    for name, layer in _adapters(wrapped).items():
        if model.get_submodule(name) is not layer:
            raise ValueError(f"{name}: not the wrapper of this model (already merged?)")
        base = layer.base
        delta = layer.delta_weight()  # (out, in); 0 at rank 0, but DoRA's m still rescales W0 there
        if layer.fan_in_fan_out:
            delta = delta.T  # (in, out)
        base.weight.add_(delta.to(base.weight.dtype))
        set_module(model, name, base)
    return model


@torch.no_grad()
def merge_methods(
    model: nn.Module, wrapped: dict[str, nn.Module], methods: list[str], rank: int | None = None
) -> nn.Module:
    """Fold every method of ``methods`` into the base weights with its registered ``merge``, in place.

    LoRA, AdaLoRA, (IA)³, BitFit and layer freezing merge (outputs unchanged); adapters,
    prefixes and prompts add computation and cannot: ValueError names them. ``rank``: DyLoRA
    only, merge rank ``rank`` (None: the rank the layers compute at).
    """
    from adabudget.methods import REGISTRY

    cannot = [m for m in methods if not REGISTRY[m].mergeable]
    if cannot:
        raise ValueError(
            f"{', '.join(cannot)} cannot merge into the base weights; export the adapter instead"
        )
    if rank is not None:
        dylora.choose_rank(wrapped, rank)  # the wrappers are gone after the merge: nothing to put back
    for m in reversed(methods):  # the reverse of the order they were applied in
        REGISTRY[m].merge(model, wrapped)
    return model


def save_merged(
    model: nn.Module,
    wrapped: dict[str, nn.Module],
    out_dir: str | Path,
    tokenizer=None,
    methods=None,
    rank: int | None = None,
) -> Path:
    """Save a merged copy as a plain HF checkpoint (``AutoModelFor*.from_pretrained`` loads it).

    ``model`` itself is left unmerged: a deep copy is merged and saved, with the tokenizer when
    given (a 4-bit base is dequantised in place first, computing the same; the checkpoint is fp32).
    Works for full fine-tuning too (nothing to merge). ``methods`` (names, in
    application order) selects the registered merges; by default the LoRA/AdaLoRA wrappers.
    ``rank``: DyLoRA only, merge rank ``rank`` (None: the rank the layers compute at).
    """
    from adabudget.quantize import dequantize_base

    # A 4-bit base (model.quantize=nf4) is dequantised in place first: QLoRA's merge adds ΔW to the
    # dequantised weights, and torchao's NF4 tensor cannot be deep-copied at every shape. The model
    # computes the same function afterwards (forward used exactly these weights), in fp32 storage.
    dequantize_base(model)
    memo: dict = {}
    with dylora.at_rank(wrapped, rank):  # the copy computes at that rank; ``model`` is put back
        merged = copy.deepcopy(model, memo)
    if methods is None:
        names = list(_adapters(wrapped))
        merge_into_base(merged, {name: merged.get_submodule(name) for name in names})
    else:
        # the copies of the wrapped modules (deepcopy's memo maps original ids to copies)
        merge_methods(merged, {n: memo.get(id(m), m) for n, m in wrapped.items()}, list(methods))
    out = Path(out_dir)
    merged.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def save_adapter(
    model: nn.Module,
    method_cfg,
    wrapped: dict,
    out_dir: str | Path,
    base_model: str,
    hooks: list = (),
    rank: int | None = None,
) -> str:
    """Any method's trainable state: ``adapter_model.safetensors`` + ``adabudget_adapter.json``.

    Prefix-tuning's MLP reparameterisation is folded away first, so the file holds the
    key/value prefixes themselves. ``hooks``: the run's training-loop hooks (``adabudget.methods``);
    what they hold beyond the trainable parameters (a sparse method's chosen entries, Delta-LoRA's
    change of W0) goes to ``hooks.pt``. ``load_adapter`` rebuilds the model from these files.
    ``rank``: DyLoRA only, the rank the saved adapter loads at (all r_max components are saved,
    so ``load_adapter(..., rank=k)`` can still pick another).
    """
    import dataclasses

    from adabudget.methods import fold_all
    from safetensors.torch import save_file

    if rank is not None:
        dylora.check_rank(wrapped, rank)  # refused here, before anything is written, if it cannot apply
        method_cfg = dataclasses.replace(method_cfg, export_rank=rank)
        method_cfg.validate()  # a rank outside [method.r_min, method.r_max] was not trained
    fold_all(model, wrapped)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state_dict(model), out / "adapter_model.safetensors")
    meta = {
        "base_model": base_model,
        "method": dataclasses.asdict(method_cfg),
        "folded": True,
        "ranks": {n: m.rank for n, m in wrapped.items() if hasattr(m, "lam")},
    }
    from adabudget.methods import hook_states

    states = hook_states(hooks)
    if any(state is not None for state in states):
        torch.save(states, out / "hooks.pt")
        meta["hooks"] = "hooks.pt"
    (out / "adabudget_adapter.json").write_text(json.dumps(meta, indent=2))
    return str(out)


def load_adapter(model: nn.Module, adapter_dir: str | Path, rank: int | None = None) -> dict:
    """Apply the saved method to ``model`` (the frozen base) and load its state; returns ``wrapped``.

    The model then computes exactly what the saved one did; ``rank``: DyLoRA only, compute at
    rank ``rank`` instead of the saved export rank.
    """
    from adabudget.methods import apply_method, fold_all, method_config_from_dict
    from adabudget.modules import freeze_backbone
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    meta = json.loads((adapter_dir / "adabudget_adapter.json").read_text())
    cfg = method_config_from_dict(meta["method"])
    freeze_backbone(model, train_head=False)
    wrapped = apply_method(model, cfg)
    if meta.get("folded"):
        fold_all(model, wrapped)
    for name, kept in meta.get("ranks", {}).items():  # AdaLoRA layers shrunk during training
        layer = wrapped[name]
        if layer.rank != kept:
            layer.shrink_(torch.arange(kept, device=layer.lam.device))
    if meta.get("hooks"):  # restored as a resumed run restores them: before the trainable state
        from adabudget.arch import arch_of
        from adabudget.methods import load_hook_states, plan_of, step_hooks

        states = torch.load(adapter_dir / meta["hooks"], map_location="cpu", weights_only=True)
        load_hook_states(step_hooks(model, plan_of(cfg, arch_of(model)), wrapped), states)
    state = load_file(adapter_dir / "adapter_model.safetensors")
    params = dict(model.named_parameters())
    for name in state:
        if name in params:
            params[name].requires_grad_(True)  # the head was trained and saved too
    load_trainable_state_dict(model, state)
    if rank is not None:
        dylora.choose_rank(wrapped, rank)
    return wrapped


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters with ``requires_grad`` (adapter factors and head), detached and contiguous.

    The tensors share storage with the model; ``safetensors.torch.save_file`` accepts them.
    """
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from ``trainable_state_dict``) into ``model``'s trainable parameters in place.

    The keys must be exactly the trainable parameters of ``model``. AdaLoRA layers must
    already have the saved ranks: shrink them first (``RankAllocator.load_state_dict`` or
    ``RankAllocator.shrink_to``).
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        hint = ""
        if missing and all(n.rsplit(".", 1)[-1] in ("P", "lam", "Q") for n in missing):
            hint = (
                "; the missing names are AdaLoRA factors of modules the saved run pruned to rank 0: give "
                "the layers the saved ranks first (RankAllocator.load_state_dict / shrink_to)"
            )
        raise ValueError(
            f"trainable state dict does not fit this model: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}{hint}"
        )
    for name, p in params.items():
        value = state[name]
        if value.shape != p.shape:
            raise ValueError(
                f"{name}: saved shape {tuple(value.shape)} != model shape {tuple(p.shape)}; "
                "give the AdaLoRA layers the saved ranks first (RankAllocator.load_state_dict / shrink_to)"
            )
        p.copy_(value)


# ---------------------------------------------------------------- helpers
def _few(names: list[str], n: int = 5) -> str:
    return f"{names[:n]}{' ...' if len(names) > n else ''}"


def _adapters(wrapped: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The wrapper layers of ``wrapped``; full fine-tuning's {"": model} has none."""
    layers = {}
    for name, layer in wrapped.items():
        if name == "":
            continue
        if not (hasattr(layer, "delta_weight") and hasattr(layer, "base")):
            raise TypeError(
                f"{name}: {type(layer).__name__} is not an adapter wrapper (needs base, delta_weight)"
            )
        layers[name] = layer
    return layers


def _base_module_names(model: nn.Module, adapters: dict[str, nn.Module]) -> list[str]:
    """Module names of the backbone as it was before wrapping (a wrapper's name is its base's)."""
    inside = tuple(f"{name}." for name in adapters)
    return [name for name, _ in model.named_modules() if not (inside and name.startswith(inside))]


def _lora_factors(layer: nn.Module, fold: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B A = ΔW relative to the original W0 exactly, scale folded into B (``fold``;
    else s B A = ΔW): (r, in), (out, r), on the CPU. DoRA's B A is the direction's change.

    AdaLoRA triplets with λ_i = 0 (masked but not physically removed, ``shrink: never``)
    add nothing to ΔW and are left out, so r is the effective rank. A LoRA layer computing with
    a slice (``lora.set_active``: DyLoRA's chosen rank, a supernet's sub-network) exports that slice.
    A layer whose init moved part of W0 into the adapter (PiSSA) adds its initial factors negated.
    """
    if isinstance(layer, SVDLinear):
        keep = layer.lam.nonzero().squeeze(1)
        a = layer.Q[keep]  # (r, in)
        b = layer.P[:, keep] * (layer.lam[keep] * layer.scaling)  # (out, r)
        if layer.P0 is not None:  # s P Λ Q - s P0 Λ0 Q0
            a = torch.cat([a, layer.Q0])  # (r + init_r, in)
            b = torch.cat([b, layer.P0 * (layer.lam0 * -layer.scaling)], dim=1)  # (out, r + init_r)
    else:  # LoRALinear or a subclass (Delta-LoRA's adds the change of W0)
        a, b = layer.peft_factors() if fold else layer.peft_factors(fold=False)  # (r, in), (out, r)
    return a.detach().cpu().contiguous(), b.detach().cpu().contiguous()


def _check_trainable_covered(model: nn.Module, adapters: dict[str, nn.Module], saved: list[str]) -> None:
    """Every trainable parameter is an adapter factor or in a saved head, or the export would drop it."""
    covered = {f"{name}." for name in adapters} | {f"{name}." for name in saved}
    dropped = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and not any(name.startswith(prefix) for prefix in covered)
    ]
    if dropped:
        raise ValueError(
            f"trainable parameters outside the adapters and the head cannot go into a LoRA adapter: "
            f"{_few(dropped)}; use save_merged"
        )


def _check_peft_matching(
    names: list[str], config: dict, kept: dict[str, int], heads: tuple[str, ...]
) -> None:
    """Replay peft's name matching on the backbone: exactly ``kept`` is adapted, each at its rank."""
    targets = config["target_modules"]

    def adapted(name: str) -> bool:
        # check_target_module_exists: modules_to_save wins, then exact name or "." suffix.
        if any(re.match(rf"(^|.*\.){h}($|\..*)", name) for h in heads):
            return False
        return name in targets or any(name.endswith(f".{t}") for t in targets)

    matched = {name for name in names if name and adapted(name)}
    if matched != set(kept):
        raise ValueError(
            f"peft would adapt {sorted(matched - set(kept))} and skip {sorted(set(kept) - matched)}; "
            "module names collide with peft's suffix matching"
        )
    for name, r in kept.items():
        # get_pattern_key: the first key matching as a regex suffix.
        key = next((k for k in config["rank_pattern"] if re.match(rf"(.*\.)?({k})$", name)), None)
        if config["rank_pattern"].get(key, config["r"]) != r:
            raise ValueError(
                f"{name}: peft would resolve its rank through rank_pattern key {key!r}, not to {r}"
            )
