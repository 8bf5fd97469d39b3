"""Prefix-tuning (Li & Liang, ACL 2021): trainable keys and values before every sequence.

In each adapted layer every query attends over ``length`` trainable prefix vectors followed by the
sequence's keys and values, optionally produced by a reparameterisation MLP during training
(``reparam_dim``; ``fold_()`` replaces it). ``apply`` switches the model's attention implementation
to ``adabudget_prefix_<base>``, which prepends the prefix and widens the mask; DeBERTa-v2 does not
use HF's attention interface and is refused. ``PrefixKV`` is the plain prefix; ``SlicedPrefixKV``
(the supernet's) and UniPELT's gated prefix subclass it. The equations, positions and mechanism:
docs/methods.md#prefix-tuning.

Invariants:

- The queries are unchanged; every query, padded or causal, sees all l prefix positions, and the
  real tokens keep positions 0 .. T-1.
- It cannot start at the identity (the prefix adds attention positions) and cannot merge.
- ``set_active(prefix, k)`` uses the first k vectors; k = 0 is the attention without a prefix.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from adabudget.config import ConfigError
from torch import nn

KEY = "adabudget_prefix_"  # + base implementation: the attn_implementation name apply sets
BASES = ("sdpa", "eager")


@dataclass
class PrefixConfig:
    """Prefix-tuning knobs.

    Example (MiniLM: h = 384, L = 6, kv_dim = 384): ``length=20`` adds 6 x 2 x 20 x 384
    = 92,160 parameters; ``length=20, reparam_dim=64`` trains 6 x (20 x 384 + 384 x 64 + 64
    + 64 x 768 + 768) = 6 x 82,240 = 493,440 during training, folded to 92,160 for export.
    """

    name: str = "prefix"
    length: int = 20  # l, prefix vectors per layer (Li & Liang's prefix length |P_idx|)
    # m, width of Li & Liang's reparameterisation MLP (Sec. 4.3); 0 = train P_k, P_v directly
    reparam_dim: int = 0
    # std of the direct P_k, P_v ~ N(0, init_std²). With reparam_dim > 0, E ~ N(0, 1) (nn.Embedding's
    # init, as Li & Liang and peft) and the MLP has PyTorch's Linear init.
    init_std: float = 0.02
    layers: Optional[list] = None  # restrict to these block indices (None = all)

    def validate(self) -> None:
        if not isinstance(self.length, int) or self.length < 1:
            raise ConfigError(
                f"method.length: must be an integer >= 1 (prefix vectors per layer), got {self.length}"
            )
        if not isinstance(self.reparam_dim, int) or self.reparam_dim < 0:
            raise ConfigError(
                "method.reparam_dim: must be an integer >= 0 (0 = no reparameterisation), "
                f"got {self.reparam_dim}"
            )
        if not self.init_std > 0:
            raise ConfigError(f"method.init_std: must be > 0, got {self.init_std}")
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ConfigError(
                f"method.layers: must be a list of block indices >= 0 or null, got {self.layers}"
            )


class PrefixKV(nn.Module):
    """The prefix keys and values P_k, P_v of one attention module, each (kv_heads, l, d_head).

    Direct (``reparam_dim == 0``): parameters ``key`` and ``value``. Reparameterised: an
    embedding E (l, h) and an MLP h -> m -> 2 kv_dim whose output rows are laid out
    [P_k | P_v], each head-major (kv_heads, d_head).

    Args:
        length: l, the number of prefix positions.
        num_kv_heads, head_dim: of the attention module (key/value heads, before GQA repetition).
        hidden: h, the width of E (used only when ``reparam_dim > 0``).
        reparam_dim: m; 0 for direct parameters.
        init_std: std of the direct P_k, P_v.
        device, dtype: of the new parameters.
    """

    def __init__(
        self,
        length: int,
        num_kv_heads: int,
        head_dim: int,
        hidden: int,
        reparam_dim: int = 0,
        init_std: float = 0.02,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.length, self.num_kv_heads, self.head_dim = length, num_kv_heads, head_dim
        self.reparam_dim = reparam_dim
        shape = (num_kv_heads, length, head_dim)
        if reparam_dim == 0:
            self.key = nn.Parameter(torch.randn(shape, device=device, dtype=dtype) * init_std)  # P_k
            self.value = nn.Parameter(torch.randn(shape, device=device, dtype=dtype) * init_std)  # P_v
        else:
            kv_dim = num_kv_heads * head_dim
            self.embedding = nn.Parameter(torch.randn(length, hidden, device=device, dtype=dtype))  # E (l, h)
            self.mlp = nn.Sequential(
                nn.Linear(hidden, reparam_dim, device=device, dtype=dtype),  # W_1, b_1
                nn.Tanh(),
                nn.Linear(reparam_dim, 2 * kv_dim, device=device, dtype=dtype),  # W_2, b_2
            )

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_k, P_v), each (kv_heads, l, d_head)."""
        if self.reparam_dim == 0:
            return self.key, self.value
        return self.through_mlp(self.embedding)

    def through_mlp(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_k, P_v) of the reparameterisation at the rows ``embedding`` (k, h) of E: (kv_heads, k,
        d_head) each."""
        k = embedding.shape[0]
        kv = self.mlp(embedding)  # (k, 2 kv_dim)
        kv = kv.view(k, 2, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)  # (2, kvh, k, hd)
        return kv[0], kv[1]

    def keys_values(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What the attention prepends to ``key``, ``value`` (B, kv_heads, T, d_head): (P_k, P_v) in
        their dtypes, (B, kv_heads, l, d_head) each; None: nothing this forward (a sliced prefix
        switched off). UniPELT's layer gates them per example."""
        batch = key.shape[0]
        p_key, p_value = self()  # (kv_heads, l, d_head) each
        p_key = p_key.to(key.dtype).expand(batch, -1, -1, -1)  # (B, kvh, l, hd)
        p_value = p_value.to(value.dtype).expand(batch, -1, -1, -1)
        return p_key, p_value

    @torch.no_grad()
    def fold_(self) -> None:
        """Replace the reparameterisation by direct ``key``/``value`` parameters holding its output."""
        if self.reparam_dim == 0:
            return
        key, value = (t.clone().contiguous() for t in self())
        trainable = self.embedding.requires_grad
        del self.embedding, self.mlp
        self.key = nn.Parameter(key, requires_grad=trainable)
        self.value = nn.Parameter(value, requires_grad=trainable)
        self.reparam_dim = 0

    def extra_repr(self) -> str:
        shape = f"length={self.length}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"
        return f"{shape}, reparam_dim={self.reparam_dim}"


def _widen_mask(
    mask: torch.Tensor | None, length: int, query: torch.Tensor, kv_len: int, causal: bool, base: str
) -> torch.Tensor | None:
    """The attention mask over [prefix; keys]: every query sees every prefix position.

    ``mask`` is None, a boolean (True = attend, sdpa) or additive float (eager) mask of shape
    (B or 1, 1, T_q, T_k). None stays None for bidirectional attention and single queries;
    causal attention needs an explicit mask, because sdpa's ``is_causal`` aligns the
    triangle top-left when T_q != T_k (it would hide the last keys, not the prefix).
    """
    if mask is not None:
        pad = mask.new_ones if mask.dtype == torch.bool else mask.new_zeros  # attend / add 0
        return torch.cat([pad(*mask.shape[:-1], length), mask], dim=-1)  # (B|1, 1, T_q, l + T_k)
    q_len = query.shape[2]
    if not causal or q_len == 1:
        return None
    # query i (of the last q_len positions) sees keys j <= i + kv_len - q_len: bottom-right aligned
    seen = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    allowed = torch.cat([seen.new_ones(q_len, length), seen], dim=-1)[None, None]  # (1, 1, T_q, l + T_k)
    if base == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~allowed, torch.finfo(query.dtype).min
    )


def prefix_attention(module, query, key, value, attention_mask, *args, base: str, **kwargs):
    """HF attention function: prepend ``module.adabudget_prefix`` (if any), then call ``base``.

    query (B, heads, T_q, d_head); key, value (B, kv_heads, T_k, d_head).
    """
    if base == "eager":  # the model's own eager function, as HF's get_interface("eager", default) picks
        inner = sys.modules[type(module).__module__].eager_attention_forward
    else:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        inner = ALL_ATTENTION_FUNCTIONS[base]
    prefix = getattr(module, "adabudget_prefix", None)
    prefixed = None if prefix is None else prefix.keys_values(key, value)
    if prefixed is not None:
        p_key, p_value = prefixed  # (B, kvh, l, hd) each
        kv_len = key.shape[2]
        key = torch.cat([p_key, key], dim=2)  # (B, kvh, l + T_k, hd)
        value = torch.cat([p_value, value], dim=2)
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal  # sdpa's default
        attention_mask = _widen_mask(attention_mask, p_key.shape[2], query, kv_len, causal, base)
    return inner(module, query, key, value, attention_mask, *args, **kwargs)


class SlicedPrefixKV(PrefixKV):
    """A ``PrefixKV`` built with l vectors that uses its first ``active`` ones (``set_active``;
    None: all l, 0: no prefix in this layer)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active: int | None = None

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_k, P_v) of the first ``active`` vectors, each (kv_heads, k, d_head)."""
        k = self.active
        if k is None:
            return super().forward()
        if self.reparam_dim == 0:
            return self.key[:, :k], self.value[:, :k]  # views: the first k vectors
        return self.through_mlp(self.embedding[:k])

    def keys_values(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.active == 0:  # switched off: the layer attends as without a prefix
            return None
        return super().keys_values(key, value)


def set_active(prefix: SlicedPrefixKV, k: int | None) -> dict[str, tuple]:
    """Use the first ``k`` prefix vectors only (0: no prefix in this layer; None: all).

    Returns the index of each parameter's part in use (empty when off), for a supernet's
    masked optimizer: P_k, P_v their first k positions (dim 1); reparameterised, E its first k
    rows and the MLP whole.
    """
    if not isinstance(prefix, SlicedPrefixKV):
        raise TypeError(
            f"set_active: {type(prefix).__name__} uses all its vectors; build it as a SlicedPrefixKV"
        )
    if k is not None and not 0 <= k <= prefix.length:
        raise ValueError(f"prefix slice k={k} outside 0..{prefix.length}")
    prefix.active = None if k is None or k == prefix.length else k
    k = prefix.length if k is None else k
    if k == 0:
        return {}
    if prefix.reparam_dim == 0:
        return {"key": (slice(None), slice(0, k)), "value": (slice(None), slice(0, k))}
    return {
        "embedding": (slice(0, k),),
        **{f"mlp.{n}": (slice(None),) for n, _ in prefix.mlp.named_parameters()},
    }


def register() -> None:
    """Register ``adabudget_prefix_<base>`` with HF's attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for base in BASES:
        AttentionInterface.register(KEY + base, functools.partial(prefix_attention, base=base))
        # Masks are built as for the base implementation (a name without a mask function gets no mask).
        AttentionMaskInterface.register(KEY + base, ALL_MASK_ATTENTION_FUNCTIONS[base])


def _check_arch(arch) -> None:
    if not arch.prefix_attention:
        raise ConfigError(
            f"method.name=prefix: cannot apply to model_type '{arch.model_type}' "
            "(its attention does not go through HF's attention interface, "
            "so keys/values cannot be prefixed); use prompt, lora or adapter"
        )


def _use_prefix_attention(model: nn.Module) -> None:
    """Switch the model's attention implementation to ``adabudget_prefix_<current>``."""
    current = model.config._attn_implementation
    if current is not None and current.startswith(KEY):
        return  # already switched (prefix applied in an earlier call)
    if current not in BASES:
        raise ConfigError(
            f"method.name=prefix: needs the model's attention implementation to be one of {list(BASES)}, "
            f"this model uses '{current}'; load it with attn_implementation='sdpa'"
        )
    register()
    model.set_attn_implementation(KEY + current)


def apply(
    model: nn.Module, cfg: PrefixConfig, layers: list[int] | None = None, layer_cls: type = PrefixKV
) -> dict[str, PrefixKV]:
    """Give the self-attention of each block in ``layers`` a ``adabudget_prefix`` (``layer_cls``:
    PrefixKV or a subclass, the sliced one, UniPELT's gated one) child.

    Returns {module name: PrefixKV}. Raises ConfigError for DeBERTa-v2 (no attention interface).
    """
    from adabudget.arch import arch_of

    cfg.validate()
    layers = layers if layers is not None else cfg.layers
    arch = arch_of(model)
    _check_arch(arch)
    blocks = arch.layers(layers)
    attns = {i: model.get_submodule(f"{arch.block(i)}.{arch.attention}") for i in blocks}
    again = [i for i, attn in attns.items() if hasattr(attn, "adabudget_prefix")]
    if again:
        raise ConfigError(f"method.layers: blocks {again} already have a prefix; give each block one prefix")
    _use_prefix_attention(model)
    added = {}
    for i, attn in attns.items():
        path = f"{arch.block(i)}.{arch.attention}"
        used = getattr(getattr(attn, "config", model.config), "_attn_implementation", None)
        if used != model.config._attn_implementation:
            raise ConfigError(
                f"method.name=prefix: could not switch the attention of {path} (it uses '{used}')"
            )
        weight = next(p for p in attn.parameters())
        # float32 unless the base already is float32/float64 (bf16 backbones keep precise prefixes)
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        prefix = layer_cls(
            cfg.length,
            arch.num_kv_heads,
            arch.head_dim,
            arch.hidden,
            cfg.reparam_dim,
            cfg.init_std,
            weight.device,
            dtype,
        )
        attn.adabudget_prefix = prefix  # a child: saved with state_dict as <attention>.adabudget_prefix.*
        added[f"{path}.adabudget_prefix"] = prefix
    return added


def count(cfg: PrefixConfig, arch, layers: list[int] | None = None) -> int:
    """Per adapted layer, with l = length, m = reparam_dim, kv_dim = kv_heads x d_head:

    direct: 2 l kv_dim; reparameterised: l h + h m + m + 2 m kv_dim + 2 kv_dim.
    """
    layers = layers if layers is not None else cfg.layers
    _check_arch(arch)
    blocks = arch.layers(layers)
    n, m, h, kv = cfg.length, cfg.reparam_dim, arch.hidden, arch.kv_dim
    per_layer = 2 * n * kv if m == 0 else n * h + h * m + m + m * 2 * kv + 2 * kv
    return per_layer * len(blocks)


def fold(model: nn.Module, wrapped: dict[str, nn.Module]) -> None:
    """Fold the reparameterisation of every PrefixKV in ``wrapped`` (others are left alone)."""
    for module in wrapped.values():
        if isinstance(module, PrefixKV):
            module.fold_()
