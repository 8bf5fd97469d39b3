"""UniPELT (Mao et al., ACL 2022): LoRA (query, value), prefix-tuning and a Pfeiffer bottleneck
adapter in every layer, each behind a learned per-example gate G(z) = mean_t sigmoid(W_G z_t + b_G)
(the LoRA gate replaces the scaling alpha / r), as the reference code (morningmoni/UniPELT) does.
The gated layers subclass LoRA's, the prefix's and the adapter's. The equations, what the reference
does and what is not reproduced: docs/methods.md#unipelt.

Invariants:

- The gates average over all T positions, padding included, as the reference does (so they are
  not causal on GPT-2 / LLaMA); they start near 1/2 (W_G ~ N(0, 0.02²), b_G = 0).
- LoRA B = 0 and adapter W_up = b_up = 0 at ``apply``: only the gated prefix changes the output.
- Gates depend on the input, so UniPELT cannot merge into the base weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
from adabudget.config import ConfigError
from adabudget.methods import adapter, lora, prefix
from torch import nn

ROLES = ("q", "k", "v", "qkv", "o", "ffn_in", "ffn_out")


@dataclass
class UniPELTConfig:
    """UniPELT knobs.

    Example (BERT-base: h = 768, L = 12, defaults r = 8, l = 10, d = 48): per layer
    LoRA on q and v 2 (r 2h + h + 1) = 26,114, prefix 2 l h + h + 1 = 16,129, adapter
    2 h d + d + h + h + 1 = 75,313; 117,556 per layer, 1,410,672 in all.
    """

    name: str = "unipelt"
    lora_r: int = 8  # r of LoRA (the reference's scripts: lora_r=8, lora_alpha=16, prefix_len=10)
    # None: G_L replaces the LoRA scaling (the reference code); a number: s = alpha / r times G_L
    lora_alpha: Optional[float] = None
    # roles LoRA adapts (the paper: W_Q and W_V); GPT-2 has only the fused qkv (c_attn)
    lora_targets: list = field(default_factory=lambda: ["q", "v"])
    prefix_length: int = 10  # l, prefix vectors per layer
    # m > 0: Li & Liang's prefix MLP while training, folded at export (the reference's scripts: mid_dim=512)
    prefix_reparam_dim: int = 0
    adapter_bottleneck: int = 48  # d of the FFN adapter (the reference's Pfeiffer adapter on BERT-base)
    layers: Optional[list] = None  # restrict to these block indices (None = all)
    # the methods it is made of, in application order (adabudget.methods.methods_in); not a knob
    components: ClassVar[tuple] = ("lora", "adapter", "prefix")

    def validate(self) -> None:
        if not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise ConfigError(f"method.lora_r: must be an integer >= 1, got {self.lora_r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(
                f"method.lora_alpha: must be > 0 or null (the gate alone scales LoRA), got {self.lora_alpha}"
            )
        targets = list(self.lora_targets or [])
        bad = [t for t in targets if t not in ROLES]
        if not targets or bad:
            raise ConfigError(
                f"method.lora_targets: must be a non-empty list of roles from {list(ROLES)}, "
                f"got {self.lora_targets}"
            )
        if not isinstance(self.prefix_length, int) or self.prefix_length < 1:
            raise ConfigError(f"method.prefix_length: must be an integer >= 1, got {self.prefix_length}")
        if not isinstance(self.prefix_reparam_dim, int) or self.prefix_reparam_dim < 0:
            raise ConfigError(
                f"method.prefix_reparam_dim: must be an integer >= 0 (0 = no MLP), "
                f"got {self.prefix_reparam_dim}"
            )
        if not isinstance(self.adapter_bottleneck, int) or self.adapter_bottleneck < 1:
            raise ConfigError(
                f"method.adapter_bottleneck: must be an integer >= 1, got {self.adapter_bottleneck}"
            )
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ConfigError(
                f"method.layers: must be a list of block indices >= 0 or null, got {self.layers}"
            )

    def parts(self, arch) -> tuple:
        """(LoRAConfig, AdapterConfig, PrefixConfig) of the three gated components on ``arch``."""
        patterns = [rf"{re.escape(arch.blocks)}\.\d+\.{re.escape(s.rel)}" for s in lora_specs(self, arch)]
        # alpha = r makes s = 1, so that the gate alone scales B A x (the reference)
        alpha = self.lora_r if self.lora_alpha is None else self.lora_alpha
        return (
            lora.LoRAConfig(target_modules=patterns, r=self.lora_r, alpha=alpha),
            adapter.AdapterConfig(placement="pfeiffer", bottleneck=self.adapter_bottleneck),
            prefix.PrefixConfig(length=self.prefix_length, reparam_dim=self.prefix_reparam_dim),
        )


class Gate(nn.Module):
    """G(z) = mean_t sigmoid(W_G z_t + b_G): (B, T, in) -> (B, 1, 1), one factor per example.

    The LoRA and adapter gates are called with their component's input. The prefix gate
    reads the self-attention's input, which the attention function does not see: ``attach``
    registers a forward pre-hook on the attention module that computes G_P there, and the
    prefix's attention function takes it with ``pop`` (so no tensor outlives the forward).

    Args:
        in_features: width of the gate's input.
        device, dtype: of W_G, b_G.
    """

    def __init__(
        self, in_features: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.proj = nn.Linear(in_features, 1, device=device, dtype=dtype)  # W_G (1, in), b_G
        with torch.no_grad():  # the reference's BERT init: every gate starts near sigmoid(0) = 1/2
            nn.init.normal_(self.proj.weight, std=0.02)
            nn.init.zeros_(self.proj.bias)
        self._value: torch.Tensor | None = None  # G_P of the current forward (prefix gate only)
        self._handles: list = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.proj(z.to(self.proj.weight.dtype)))  # (B, T, 1)
        return g.mean(dim=1, keepdim=True)  # (B, 1, 1): over all positions, padding included (reference)

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # BERT and GPT-2 pass hidden_states positionally, LLaMA by keyword
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self._value = self(x)

    def attach(self, attention: nn.Module) -> None:
        """Compute the gate from ``attention``'s input at each of its calls (for ``pop``)."""
        self._handles.append(attention.register_forward_pre_hook(self._capture, with_kwargs=True))

    def pop(self) -> torch.Tensor:
        """The gate computed by the pre-hook for the current forward, (B, 1, 1); clears it."""
        value, self._value = self._value, None
        if value is None:
            raise RuntimeError(
                "UniPELT prefix gate: no value; its pre-hook on the attention module did not run"
            )
        return value

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def extra_repr(self) -> str:
        return f"in={self.proj.in_features}"


class GatedLoRALinear(lora.LoRALinear):
    """UniPELT's LoRA: y = W0 x + b + s B (A x) G_L(x), the gate ``gate`` (a ``Gate``, one factor
    per example) set by ``apply`` once every layer is built (so the initial weights draw from the
    seeded stream in the reference's order: every A, then every gate)."""

    gate: Gate

    def down(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        return super().down(x, A) * self.gate(x).to(A.dtype)  # (B, T, r) * (B, 1, 1)


class GatedBottleneckAdapter(adapter.BottleneckAdapter):
    """UniPELT's adapter: y' = y + G_A(y) (W_up f(W_down y + b_down) + b_up), the gate ``gate`` (a
    ``Gate`` on the adapter's input y) set by ``apply`` once every adapter is built."""

    gate: Gate

    def delta(self, y: torch.Tensor) -> torch.Tensor:
        delta = super().delta(y)  # (B, T, h)
        return delta * self.gate(y).to(delta.dtype)  # (B, T, h) * (B, 1, 1): per-example G_A


class GatedPrefixKV(prefix.PrefixKV):
    """UniPELT's prefix: per example G_P P_k and G_P P_v, the gate ``gate`` (a ``Gate`` attached to
    the attention module, whose input it reads) set by ``apply`` once every prefix is built."""

    gate: Gate

    def keys_values(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p_key, p_value = super().keys_values(key, value)  # (B, kvh, l, hd) each
        gate = self.gate.pop().view(key.shape[0], 1, 1, 1)  # (B, 1, 1, 1)
        return p_key * gate.to(key.dtype), p_value * gate.to(value.dtype)


def lora_specs(cfg: UniPELTConfig, arch) -> list:
    """The LinearSpecs of one block that LoRA adapts: the roles of ``lora_targets``, q/k/v -> qkv on GPT-2."""
    roles = set(cfg.lora_targets)
    if arch.by_role("qkv") and roles & {"q", "k", "v"}:
        roles = (roles - {"q", "k", "v"}) | {"qkv"}  # GPT-2's fused c_attn: adapted (and gated) as a whole
    specs = arch.by_role(*roles)
    missing = sorted(roles - {s.role for s in specs})
    if missing:
        have = sorted({s.role for s in arch.linears} - {"other"})
        raise ConfigError(
            f"method.lora_targets: {arch.model_type} has no linear layer of role {missing}; its roles: {have}"
        )
    return specs


def _check(arch, layers: list[int] | None) -> list[int]:
    if not arch.prefix_attention:
        raise ConfigError(
            f"method.name=unipelt: cannot apply to model_type '{arch.model_type}' (its prefix-tuning part "
            "needs attention through HF's attention interface, which this model does not use); "
            "use lora or adapter"
        )
    return arch.layers(layers)


def apply(model: nn.Module, cfg: UniPELTConfig, layers: list[int] | None = None) -> dict[str, nn.Module]:
    """Gated LoRA, adapter and prefix on the blocks in ``layers``; returns {module name: module}.

    The gates are children of their component (``<lora>.gate``, ``<block>.adabudget_adapter_ffn.gate``,
    ``<attention>.adabudget_prefix.gate``), so they are saved and loaded with it.
    """
    from adabudget.arch import arch_of

    cfg.validate()
    layers = layers if layers is not None else cfg.layers
    arch = arch_of(model)
    _check(arch, layers)  # before anything is added: DeBERTa-v2 is refused whole
    lora_cfg, adapter_cfg, prefix_cfg = cfg.parts(arch)
    wrapped: dict[str, nn.Module] = {}
    for name, layer in lora.apply(model, lora_cfg, layers, layer_cls=GatedLoRALinear).items():
        layer.gate = Gate(layer.in_features, layer.A.device, layer.A.dtype)  # G_L, one per adapted matrix
        wrapped[name] = layer
    for name, module in adapter.apply(model, adapter_cfg, layers, layer_cls=GatedBottleneckAdapter).items():
        w = module.down.weight
        module.gate = Gate(module.up.out_features, w.device, w.dtype)  # G_A, on the adapter's input y
        wrapped[name] = module
    for name, kv in prefix.apply(model, prefix_cfg, layers, layer_cls=GatedPrefixKV).items():
        w = next(kv.parameters())
        kv.gate = Gate(arch.hidden, w.device, w.dtype)  # G_P, on the self-attention's input x
        kv.gate.attach(model.get_submodule(name.rpartition(".")[0]))
        wrapped[name] = kv
    return wrapped


def count(cfg: UniPELTConfig, arch, layers: list[int] | None = None) -> int:
    """LoRA + adapter + prefix (their own counts) + one Linear(in, 1) gate each, per block:

    sum over adapted matrices (in, out) of [r (in + out) + in + 1]
    + 2 h d + d + h + (h + 1)                         (Pfeiffer adapter on the FFN output + G_A)
    + 2 l kv_dim (or l h + h m + m + 2 m kv_dim + 2 kv_dim with m > 0) + (h + 1)   (prefix + G_P)
    """
    layers = layers if layers is not None else cfg.layers
    blocks = _check(arch, layers)
    lora_cfg, adapter_cfg, prefix_cfg = cfg.parts(arch)
    lora_gates = sum(s.in_features + 1 for _, s in arch.match_linears(lora_cfg.target_modules, layers))
    (ffn_out,) = arch.by_role(adapter.ROLE["ffn"])
    other_gates = len(blocks) * ((ffn_out.out_features + 1) + (arch.hidden + 1))
    return (
        lora.count(lora_cfg, arch, layers)
        + adapter.count(adapter_cfg, arch, layers)
        + prefix.count(prefix_cfg, arch, layers)
        + lora_gates
        + other_gates
    )
