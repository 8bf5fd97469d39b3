"""(IA)³ (Liu et al., NeurIPS 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning", Sec. 3.3): learned vectors rescale keys, values and the
FFN's inner activations,

    k = l_k ⊙ (W_k x + b_k),   v = l_v ⊙ (W_v x + b_v),   FFN(x) = W_out (l_ff ⊙ act(W_in x)),

with l_k, l_v ∈ R^{kv_dim} and l_ff ∈ R^{intermediate} initialised to ones (identity).

The vectors live in ``<block>.adabudget_ia3`` (parameters ``k``, ``v``, ``ffn``) and act
through hooks: a forward hook scales the key / value linear's output (GPT-2's fused
``c_attn``: only the k and v thirds of [q | k | v]) and a forward pre-hook scales the input
of the FFN output linear (LLaMA: act(gate) ⊙ up, the same place PEFT puts it).

Under LoRA / AdaLoRA the hooks sit on the innermost frozen ``.base`` linear, so (IA)³
rescales the pretrained path only: k = l_k ⊙ (W0 x + b) + s B A x, and the LoRA branch of
the FFN output linear sees the unscaled activations. That makes ``merge`` (scale the rows
of W0 and b, or the input columns of W_out) exact while LoRA is still unmerged; merge
(IA)³ *before* LoRA, in the reverse of the apply order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from adabudget.arch import Arch, arch_of
from adabudget.config import ConfigError
from adabudget.modules import base_linear, linear_shape
from torch import nn

TARGETS = ("k", "v", "ffn")


@dataclass
class IA3Config:
    """Which activations to rescale.

    Example: on MiniLM (L = 6, h = 384, FFN 1536) the default targets train
    6 x (384 + 384 + 1536) = 13,824 parameters; on LLaMA with GQA the k and v vectors
    are num_kv_heads x head_dim wide.
    """

    name: str = "ia3"
    targets: list = field(default_factory=lambda: list(TARGETS))  # any of k (l_k), v (l_v), ffn (l_ff)
    layers: Optional[list] = None  # restrict to these block indices (None = all)

    def validate(self) -> None:
        bad = [t for t in self.targets if t not in TARGETS]
        if not self.targets or bad or len(set(self.targets)) != len(self.targets):
            raise ConfigError(
                f"method.targets={list(self.targets)}: must be a non-empty subset of {list(TARGETS)} "
                "without repeats"
            )


class IA3Vectors(nn.Module):
    """l_k, l_v, l_ff of one block and the hooks that apply them (bound methods: deepcopy-safe)."""

    def __init__(self, sizes: dict[str, int], device: torch.device, dtype: torch.dtype):
        super().__init__()
        for target, size in sizes.items():
            self.register_parameter(target, nn.Parameter(torch.ones(size, device=device, dtype=dtype)))
        self._handles: list = []
        # block-relative path of each hooked linear -> (hook name, wrapped by LoRA/AdaLoRA at apply)
        self._hooked: dict[str, tuple[str, bool]] = {}

    def scale_k(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out * self.k.to(out.dtype)  # (B, T, kv_dim)

    def scale_v(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out * self.v.to(out.dtype)  # (B, T, kv_dim)

    def scale_qkv(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out * self.qkv_scale().to(out.dtype)  # (B, T, 3h) = [q | k | v]

    def scale_ffn_input(self, module: nn.Module, args: tuple) -> tuple:
        return (args[0] * self.ffn.to(args[0].dtype), *args[1:])  # (B, T, intermediate)

    def qkv_scale(self) -> torch.Tensor:
        """(3h,) = [1 | l_k | l_v] for GPT-2's fused c_attn (ones for an untargeted k or v)."""
        ones = torch.ones_like(self.k if hasattr(self, "k") else self.v)
        return torch.cat([ones, getattr(self, "k", ones), getattr(self, "v", ones)])

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={p.numel()}" for n, p in self.named_parameters(recurse=False))


def apply(model: nn.Module, cfg: IA3Config, layers: list[int] | None = None) -> dict[str, IA3Vectors]:
    """Attach ``<block>.adabudget_ia3`` (ones: identity) to each block in ``layers`` and hook it in."""
    layers = layers if layers is not None else cfg.layers
    arch = arch_of(model)
    hooks = []  # (block-relative path of the linear, hook name)
    if arch.by_role("qkv"):  # GPT-2: one fused linear, one hook for both l_k and l_v
        if {"k", "v"} & set(cfg.targets):
            hooks.append((arch.by_role("qkv")[0].rel, "scale_qkv"))
    else:
        hooks += [(arch.by_role(t)[0].rel, f"scale_{t}") for t in ("k", "v") if t in cfg.targets]
    if "ffn" in cfg.targets:
        hooks.append((arch.by_role("ffn_out")[0].rel, "scale_ffn_input"))
    sizes = {"k": arch.kv_dim, "v": arch.kv_dim, "ffn": arch.intermediate}
    wrapped = {}
    for i in arch.layers(layers):
        block_name = arch.block(i)
        block = model.get_submodule(block_name)
        if hasattr(block, "adabudget_ia3"):
            raise ConfigError(
                f"method.layers: (IA)^3 is already applied to block {i}; give each block one group"
            )
        weight = base_linear(block.get_submodule(hooks[0][0])).weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        vectors = IA3Vectors({t: sizes[t] for t in TARGETS if t in cfg.targets}, weight.device, dtype)
        block.adabudget_ia3 = vectors
        for rel, hook in hooks:
            module = block.get_submodule(rel)
            base = base_linear(module)  # under LoRA: scale W0 x + b only (see the module docstring)
            register = (
                base.register_forward_pre_hook if hook == "scale_ffn_input" else base.register_forward_hook
            )
            vectors._handles.append(register(getattr(vectors, hook)))
            vectors._hooked[rel] = (hook, base is not module)
        wrapped[f"{block_name}.adabudget_ia3"] = vectors
    return wrapped


def count(cfg: IA3Config, arch: Arch, layers: list[int] | None = None) -> int:
    """L' x (kv_dim [k] + kv_dim [v] + intermediate [ffn]) over the chosen targets and L' layers.

    kv_dim = num_kv_heads x head_dim (= h without GQA, and for GPT-2's fused c_attn).
    """
    layers = layers if layers is not None else cfg.layers
    sizes = {"k": arch.kv_dim, "v": arch.kv_dim, "ffn": arch.intermediate}
    return len(arch.layers(layers)) * sum(sizes[t] for t in cfg.targets)


@torch.no_grad()
def merge(model: nn.Module, wrapped: dict[str, nn.Module]) -> None:
    """Fold the vectors into the frozen base weights, then remove hooks and vectors.

    k / v: W ← diag(l) W, b ← l ⊙ b (the rows of an (out, in) nn.Linear, the columns of an
    (in, out) Conv1D; GPT-2's c_attn by [1 | l_k | l_v]). ffn: W_out ← W_out diag(l_ff) (its
    input columns; Conv1D: rows). Merge (IA)³ before LoRA on the same layers: a merged LoRA
    update inside W would otherwise be rescaled too.
    """
    for name, vectors in wrapped.items():
        if not isinstance(vectors, IA3Vectors):
            continue
        block_name = name.removesuffix(".adabudget_ia3")
        block = model.get_submodule(block_name)
        for rel, (hook, was_wrapped) in vectors._hooked.items():
            module = block.get_submodule(rel)
            base = base_linear(module)
            if was_wrapped and base is module:
                raise RuntimeError(
                    f"ia3 merge: the LoRA/AdaLoRA wrapper of {block_name}.{rel} was merged before (IA)^3; "
                    "merge methods in the reverse of their apply order (ia3 before lora)"
                )
            w = base.weight
            in_out = linear_shape(base)[2]  # Conv1D stores W as (in, out)
            if hook == "scale_ffn_input":
                scale = vectors.ffn.to(w.dtype)  # over W_out's input dim
                w.mul_(scale[:, None] if in_out else scale)
                continue
            if hook == "scale_qkv":
                scale = vectors.qkv_scale()
            else:
                scale = vectors.k if hook == "scale_k" else vectors.v
            scale = scale.to(w.dtype)  # over the output dim
            w.mul_(scale if in_out else scale[:, None])
            if base.bias is not None:
                base.bias.mul_(scale.to(base.bias.dtype))
        vectors.remove_hooks()
        delattr(block, "adabudget_ia3")
