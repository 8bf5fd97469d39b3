"""LongLoRA (Chen et al., ICLR 2024): shifted sparse attention (S²-Attn) in training, LoRA+.

In training each head attends causally within groups of ``group_size`` tokens, the second half
of the heads shifted by half a group; at eval (``model.eval()``) the model uses standard full
attention. LoRA+ trains LoRA on W_q, W_k, W_v, W_o plus the input embeddings and the norms. The
model's attention implementation becomes ``adabudget_longlora_<base>`` (as prefix-tuning's).
LLaMA-family models only (llama, mistral, qwen2). Algorithm 1, the shift and its wrap, padding
and the count: docs/methods.md#longlora.

Invariants:

- Eval and the merged model use full attention; S²-Attn runs only for attention modules in
  training mode that carry ``adabudget_s2`` (the blocks in ``layers``).
- Padding tokens are never attended to; ``shift_wrap=false`` never lets a token see a later one.
- ``count`` is exact; ``merge`` folds LoRA into W and puts the base attention back (the trained
  embeddings and norms already are base weights).
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from adabudget.config import ConfigError
from adabudget.methods import lora
from torch import nn

KEY = "adabudget_longlora_"  # + base implementation: the attn_implementation name apply sets
BASES = ("sdpa", "eager")
ATTR = "adabudget_s2"  # attribute of an attention module that runs S²-Attn in training


@dataclass
class LongLoRAConfig:
    """LongLoRA knobs.

    Example (SmolLM2-135M: L = 30, h = 576, 9 query / 3 key-value heads of 64, V = 49,152):
    ``r=8`` gives LoRA 30 x 8 x ((576 + 576) + 2 (576 + 192) + (576 + 576)) = 921,600, norms
    30 x 2 x 576 + 576 = 35,136 and embeddings 49,152 x 576 = 28,311,552 trainable parameters.
    ``group_size=16`` is a quarter of ``data.max_length=64``, the paper's ratio (G = N/4).
    """

    name: str = "longlora"
    group_size: int = 16  # G, tokens per attention group in training (even; the shift is G/2)
    shift_wrap: bool = True  # Algorithm 1's roll (wraps around); false: the official flash code's groups
    pad_to_group: bool = True  # complete a sequence to a multiple of G; false: ValueError (the paper)
    r: int = 8  # LoRA rank (the official code's r = 8, alpha = 16, no dropout)
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Optional[list] = None  # regex name suffixes; None = q, k, v, o projections
    train_embeddings: bool = True  # LoRA+: the input embedding table trains (only with layers=None)
    train_norms: bool = True  # LoRA+: every RMSNorm weight trains (the final norm only with layers=None)
    layers: Optional[list] = None  # restrict LoRA, norms and S²-Attn to these block indices (None = all)

    def validate(self) -> None:
        if not isinstance(self.group_size, int) or self.group_size < 2 or self.group_size % 2:
            raise ConfigError(
                f"method.group_size: must be an even integer >= 2 (the shift is group_size / 2 tokens), "
                f"got {self.group_size}"
            )
        if self.r < 1:
            raise ConfigError(f"method.r: must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"method.dropout: must be in [0, 1), got {self.dropout}")
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ConfigError(
                f"method.layers: must be a list of block indices >= 0 or null, got {self.layers}"
            )


@dataclass(frozen=True)
class S2:
    """What one attention module does in training (``adabudget_s2``)."""

    group_size: int
    wrap: bool
    pad: bool


# ---------------------------------------------------------------- S²-Attn
def shifted_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor | None,
    group_size: int,
    wrap: bool = True,
    pad: bool = True,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """S²-Attn of Algorithm 1 over the tokens each sequence keeps.

    Args:
        query, key, value: (B, H, T, D), keys and values already repeated to H heads (GQA).
        keep: (B, T) bool, the tokens that are not padding (None: all).
        group_size: G.
        wrap: roll the shifted heads (Algorithm 1) or group them [0, G/2), [G/2, 3G/2), ...
        pad: complete each sequence to a multiple of G; False raises when one is not.
        scaling: of q kᵀ (None: D^-1/2).
        dropout: attention dropout probability.

    Returns:
        (B, H, T, D); zeros at padding tokens.
    """
    bsz, heads, seq, _ = query.shape
    if keep is None:
        keep = torch.ones(bsz, seq, dtype=torch.bool, device=query.device)
    lengths = keep.sum(1)  # (B,) tokens of each sequence
    if not pad:
        bad = (lengths % group_size).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"longlora: S²-Attn needs every sequence length to be a multiple of method.group_size="
                f"{group_size} (Algorithm 1), got {lengths[bad].tolist()} (sequences {bad} of the batch); "
                "set method.pad_to_group=true to complete sequences with invisible tokens, or pad the data"
            )
    # (B, T) token positions, each sequence's kept tokens first, in order: slot c -> order[:, c]
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    unshifted = (heads + 1) // 2  # chunk(2) on the heads: the first ceil(H/2) keep their order
    halves = []
    for lo, hi, shifted in ((0, unshifted, False), (unshifted, heads, True)):
        if hi == lo:
            continue
        tok, valid = _slots(order, lengths, group_size, shifted, wrap)
        q, k, v = (x[:, lo:hi] for x in (query, key, value))
        halves.append(_grouped(q, k, v, tok, valid, group_size, scaling, dropout))
    return torch.cat(halves, dim=2).transpose(1, 2)  # (B, H, T, D), a view of (B, T, H, D)


def _slots(order, lengths, group_size: int, shifted: bool, wrap: bool):
    """(token, valid) of every slot of the grouped sequence, each (B, T'), T' a multiple of G.

    Slot s of sequence b holds its c-th kept token: unshifted c = s; shifted with wrap (the roll
    by -G/2 over the sequence's length padded to a multiple of G, Lp) c = (s + G/2) mod Lp;
    shifted without wrap c = s - G/2. Slots with no token (c outside [0, L)) are invisible.
    """
    bsz, seq = order.shape
    half = group_size // 2
    span = seq + half if shifted and not wrap else seq
    padded = -(-span // group_size) * group_size  # T'
    s = torch.arange(padded, device=order.device)[None]  # (1, T')
    length = lengths[:, None]  # (B, 1)
    if not shifted:
        c = s.expand(bsz, -1)
    elif wrap:
        own = (-(-length // group_size) * group_size).clamp(min=group_size)  # Lp, (B, 1)
        c = torch.where(s < own, (s + half) % own, own)  # slots past Lp hold nothing
    else:
        c = (s - half).expand(bsz, -1)
    valid = (c >= 0) & (c < length)  # (B, T')
    tok = order.gather(1, c.clamp(0, seq - 1))  # (B, T'); meaningless where not valid
    return tok, valid


def _grouped(q, k, v, tok, valid, group_size: int, scaling, dropout: float) -> torch.Tensor:
    """Causal attention within consecutive groups of G slots, back in token order: (B, T, h, D)."""
    bsz, heads, seq, dim = q.shape
    padded = tok.shape[1]
    groups = padded // group_size
    index = tok[:, :, None, None].expand(bsz, padded, heads, dim)
    # (B n, h, G, D): the groups as a batch of 4D attentions, the layout fused SDPA kernels take
    qg, kg, vg = (
        x.transpose(1, 2).gather(1, index).view(bsz * groups, group_size, heads, dim).transpose(1, 2)
        for x in (q, k, v)
    )
    causal = torch.ones(group_size, group_size, dtype=torch.bool, device=q.device).tril()  # (G, G)
    # a slot sees the earlier slots of its group that hold a token, and always itself: a padding
    # token or an empty slot then has one finite score instead of none (its output is dropped)
    allowed = causal & valid.view(bsz * groups, 1, 1, group_size)  # (B n, 1, G, G)
    allowed = allowed | torch.eye(group_size, dtype=torch.bool, device=q.device)
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=allowed, dropout_p=dropout, scale=scaling)
    out = out.transpose(1, 2).reshape(bsz, padded, heads, dim)  # (B, T', h, D)
    # slot -> token; empty slots go to a scratch row T, dropped; padding tokens stay 0
    dest = torch.where(valid, tok, seq)[:, :, None, None].expand(bsz, padded, heads, dim)
    back = out.new_zeros(bsz, seq + 1, heads, dim).scatter(1, dest, out)
    return back[:, :seq]


def _kept_tokens(mask: torch.Tensor | None, bsz: int, seq: int) -> torch.Tensor | None:
    """(B, T) bool of the non-padding tokens, read off the diagonal of HF's 4D mask (a token
    always sees itself unless it is padding; causal and sliding-window masks keep the diagonal)."""
    if mask is None:
        return None
    diag = mask[:, 0, :seq, :seq].diagonal(dim1=-2, dim2=-1)  # (B | 1, T)
    keep = diag if diag.dtype == torch.bool else diag == 0  # eager: 0 = attend, min = masked
    return keep.expand(bsz, seq)


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, kv_heads, T, D) -> (B, heads, T, D), each key/value head repeated for its query heads."""
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


def _base_attention(module, base: str):
    if base == "eager":  # the model's own eager function, as HF's get_interface("eager", default) picks
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[base]


def s2_attention(module, query, key, value, attention_mask, *args, base: str, **kwargs):
    """HF attention function: S²-Attn for a module in training with ``adabudget_s2``, else ``base``.

    query (B, H, T, D); key, value (B, kv_heads, T, D), RoPE applied. Returns ((B, T, H, D), None).
    """
    s2 = getattr(module, ATTR, None)
    if s2 is None or not module.training:
        return _base_attention(module, base)(module, query, key, value, attention_mask, *args, **kwargs)
    bsz, heads, seq, _ = query.shape
    if key.shape[2] != seq:
        raise ValueError(
            f"longlora: S²-Attn in training needs as many keys as queries (no KV cache), got "
            f"{key.shape[2]} keys for {seq} queries; use model.eval() for cached decoding"
        )
    out = shifted_sparse_attention(
        query,
        _repeat_kv(key, heads),
        _repeat_kv(value, heads),
        _kept_tokens(attention_mask, bsz, seq),
        s2.group_size,
        s2.wrap,
        s2.pad,
        kwargs.get("scaling"),
        kwargs.get("dropout", 0.0) or 0.0,
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``adabudget_longlora_<base>`` with HF's attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for base in BASES:
        AttentionInterface.register(KEY + base, functools.partial(s2_attention, base=base))
        AttentionMaskInterface.register(KEY + base, ALL_MASK_ATTENTION_FUNCTIONS[base])


# ---------------------------------------------------------------- apply / count / merge
def _check_arch(cfg: LongLoRAConfig, arch, layers: list[int] | None) -> list[int]:
    blocks = arch.layers(layers)  # ConfigError for indices out of range, whatever the family
    if arch.family != "llama":
        raise ConfigError(
            f"method.name={cfg.name}: cannot apply to model_type '{arch.model_type}': "
            "S²-Attn (shifted sparse "
            "attention) is defined here for LLaMA-style causal self-attention (llama, mistral, qwen2); "
            "use method=lora for LoRA without it"
        )
    if arch.num_heads < 2:
        raise ConfigError(
            f"method.name={cfg.name}: S²-Attn shifts half of the attention heads; this {arch.model_type} "
            f"has {arch.num_heads}"
        )
    return blocks


def _lora_config(cfg: LongLoRAConfig, arch) -> lora.LoRAConfig:
    targets = cfg.target_modules or [re.escape(s.rel) for s in arch.by_role("q", "k", "v", "o")]
    return lora.LoRAConfig(
        target_modules=list(targets), r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, layers=cfg.layers
    )


def _check_implementation(cfg: LongLoRAConfig, model: nn.Module) -> None:
    current = str(model.config._attn_implementation)
    if current not in BASES and not current.startswith(KEY):
        raise ConfigError(
            f"method.name={cfg.name}: needs the model's attention implementation to be one of {list(BASES)}, "
            f"this model uses '{current}'; load it with attn_implementation='sdpa'"
        )


def _use_s2_attention(model: nn.Module) -> None:
    """Switch the model's attention implementation to ``adabudget_longlora_<current>``."""
    current = model.config._attn_implementation
    if current.startswith(KEY):
        return  # already switched (applied before)
    register()
    model.set_attn_implementation(KEY + current)


def apply(model: nn.Module, cfg: LongLoRAConfig, layers: list[int] | None = None) -> dict[str, nn.Module]:
    """LoRA on the attention projections, trainable embeddings and norms, S²-Attn in training.

    Returns {name: module} of the LoRA layers, the embedding table, the norms that train and
    the attention modules that run S²-Attn. Raises ConfigError, touching nothing, for a model
    that is not LLaMA-family or whose attention implementation is not sdpa / eager.
    """
    from adabudget.arch import arch_of

    cfg.validate()
    layers = layers if layers is not None else cfg.layers
    try:
        arch = arch_of(model)
    except ConfigError as err:
        raise ConfigError(f"method.name={cfg.name}: needs a LLaMA-family model ({err})") from err
    blocks = _check_arch(cfg, arch, layers)
    window = getattr(model.config, "sliding_window", None)
    if window and getattr(model.config, "use_sliding_window", True) and cfg.group_size > window:
        raise ConfigError(
            f"method.group_size={cfg.group_size}: larger than this model's sliding window ({window}); "
            "S²-Attn groups must fit in it"
        )
    _check_implementation(cfg, model)  # before anything changes
    wrapped: dict[str, nn.Module] = dict(lora.apply(model, _lora_config(cfg, arch), layers))
    if cfg.train_embeddings and layers is None:
        name = f"{arch.prefix}.embed_tokens"
        wrapped[name] = model.get_submodule(name)
        wrapped[name].weight.requires_grad_(True)
    if cfg.train_norms:
        names = [f"{arch.block(i)}.{n.rel}" for i in blocks for n in arch.norms]
        names += [f"{arch.prefix}.norm"] if layers is None else []
        for name in names:
            wrapped[name] = model.get_submodule(name)
            for p in wrapped[name].parameters():
                p.requires_grad_(True)
    settings = S2(cfg.group_size, cfg.shift_wrap, cfg.pad_to_group)
    for i in blocks:
        name = f"{arch.block(i)}.{arch.attention}"
        attn = model.get_submodule(name)
        setattr(attn, ATTR, settings)
        wrapped[name] = attn
    _use_s2_attention(model)
    return wrapped


def count(cfg: LongLoRAConfig, arch, layers: list[int] | None = None) -> int:
    """LoRA's r Σ (in + out) over the targets + the norms (2 h per block, RMSNorm weights, and the
    final norm's h) + the embedding table V h (``outside_params`` = V h + h for this family)."""
    layers = layers if layers is not None else cfg.layers
    blocks = _check_arch(cfg, arch, layers)
    total = lora.count(_lora_config(cfg, arch), arch, layers)
    if cfg.train_norms:
        total += len(blocks) * sum(n.size * (1 + n.bias) for n in arch.norms)
        total += arch.hidden if layers is None else 0  # the final norm
    if cfg.train_embeddings and layers is None:
        total += arch.outside_params - arch.hidden  # embed_tokens: all outside params but the final norm
    return total


@torch.no_grad()
def merge(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """W0 += s B A for the LoRA layers, then standard attention everywhere (outputs unchanged in
    eval mode; the trained embeddings and norms are base weights already)."""
    lora.merge(model, modules)
    for module in model.modules():
        if hasattr(module, ATTR):
            delattr(module, ATTR)
    current = model.config._attn_implementation
    if current is not None and current.startswith(KEY):
        model.set_attn_implementation(current[len(KEY) :])
