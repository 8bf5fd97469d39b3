"""The Mix-And-Match adapter (He et al., ICLR 2022, "Towards a Unified View of
Parameter-Efficient Transfer Learning", Sec. 4.6): prefix-tuning on attention (30 prefix
vectors) plus a scaled parallel adapter on the FFN (bottleneck 512, scale s = 4,
LoRA-style init), in every layer:

    attention over [P_k; K], [P_v; V];   h_ffn = FFN(x) + s * up(relu(down(x)))

It is a named composition of ``prefix`` and ``parallel_adapter``; its parameters are
theirs (``count`` is their sum). Not the base function at init (the prefix adds keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from adabudget.config import ConfigError
from adabudget.methods import parallel_adapter, prefix


@dataclass
class MAMConfig:
    name: str = "mam"
    prefix_length: int = 30  # l, prefix vectors per layer (attention)
    prefix_reparam_dim: int = 0  # > 0: prefix MLP reparameterisation while training, folded at export
    bottleneck: int = 512  # r of the FFN parallel adapter
    scale: float = 4.0  # s
    layers: Optional[list] = None
    # the methods it is made of (adabudget.methods.methods_in); a class constant, not a knob
    components: ClassVar[tuple] = ("parallel_adapter", "prefix")

    def validate(self) -> None:
        if self.prefix_length < 1:
            raise ConfigError(f"method.prefix_length: must be >= 1, got {self.prefix_length}")
        if self.bottleneck < 1:
            raise ConfigError(f"method.bottleneck: must be >= 1, got {self.bottleneck}")
        if self.scale <= 0:
            raise ConfigError(f"method.scale: must be > 0, got {self.scale}")
        self.parts()

    def parts(self):
        p = prefix.PrefixConfig(length=self.prefix_length, reparam_dim=self.prefix_reparam_dim)
        a = parallel_adapter.ParallelAdapterConfig(
            bottleneck=self.bottleneck, scale=self.scale, position="ffn", init="lora"
        )
        p.validate()
        a.validate()
        return a, p


def apply(model, cfg: MAMConfig, layers: list[int] | None = None) -> dict:
    layers = layers if layers is not None else cfg.layers
    adapter_cfg, prefix_cfg = cfg.parts()
    wrapped = parallel_adapter.apply(model, adapter_cfg, layers)
    wrapped.update(prefix.apply(model, prefix_cfg, layers))
    return wrapped


def count(cfg: MAMConfig, arch, layers: list[int] | None = None) -> int:
    layers = layers if layers is not None else cfg.layers
    adapter_cfg, prefix_cfg = cfg.parts()
    return parallel_adapter.count(adapter_cfg, arch, layers) + prefix.count(prefix_cfg, arch, layers)
