"""Layer freezing / partial fine-tuning: full fine-tuning of the chosen blocks, the rest frozen.

The classic baseline of training only the top k blocks (e.g. Lee et al. 2019, "What Would
Elsa Do? Freezing Layers During Transformer Fine-Tuning"): ``method.layers=[4, 5]`` trains
the top two of MiniLM's six blocks. Every parameter inside a chosen block trains, so the
model starts at identity and there is nothing to merge.

``embeddings=true`` also trains the input embeddings, but only together with block 0
(``layers`` None or containing 0), so in a layer-grouped hybrid they belong to the group
that holds the bottom block:

- BERT / RoBERTa / DeBERTa-v2: ``<prefix>.embeddings`` (token, position and type tables,
  LayerNorm, DeBERTa's embed_proj), plus DeBERTa's relative-position table
  ``encoder.rel_embeddings`` and its ``encoder.LayerNorm``; not the pooler;
- GPT-2: ``wte`` and ``wpe`` (not the final ``ln_f``);
- LLaMA family: ``embed_tokens`` (not the final ``norm``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from adabudget.arch import Arch, arch_of
from adabudget.config import ConfigError
from torch import nn


@dataclass
class FreezeConfig:
    """Which blocks train.

    Example: on MiniLM (L = 6, h = 384, FFN 1536, one block = 1,774,464 parameters)
    ``layers=[4, 5]`` trains 3,548,928 parameters, 15.6% of the 22.7M backbone.
    """

    name: str = "freeze"
    layers: Optional[list] = None  # the blocks to TRAIN (None = all blocks); every other block is frozen
    embeddings: bool = False  # also train the input embeddings (with block 0 only; see the module docstring)

    def validate(self) -> None:
        if self.layers is not None and (
            not self.layers
            or not all(isinstance(i, int) and i >= 0 for i in self.layers)
            or len(set(self.layers)) != len(self.layers)
        ):
            raise ConfigError(
                f"method.layers={self.layers}: must be null (all blocks) or a non-empty list of distinct "
                "block indices >= 0"
            )


def _trains_embeddings(cfg: FreezeConfig, layers: list[int] | None) -> bool:
    return cfg.embeddings and (layers is None or 0 in layers)


def _embedding_modules(model: nn.Module, arch: Arch) -> list[str]:
    if arch.family == "gpt2":
        return [f"{arch.prefix}.wte", f"{arch.prefix}.wpe"]
    if arch.family == "llama":
        return [f"{arch.prefix}.embed_tokens"]
    names = [f"{arch.prefix}.embeddings"]
    encoder = model.get_submodule(f"{arch.prefix}.encoder")
    # DeBERTa: the relative-position table (and its norm) is an embedding shared by every block
    names += [f"{arch.prefix}.encoder.{n}" for n in ("rel_embeddings", "LayerNorm") if hasattr(encoder, n)]
    return names


def apply(model: nn.Module, cfg: FreezeConfig, layers: list[int] | None = None) -> dict[str, nn.Module]:
    """Make every parameter of the blocks in ``layers`` (and the embeddings) trainable.

    Returns {block / embedding module name: module}. Parameters that other methods attached
    to a block (``adabudget_*`` children) are theirs to manage and are left alone.
    """
    layers = layers if layers is not None else cfg.layers
    arch = arch_of(model)
    names = [arch.block(i) for i in arch.layers(layers)]  # ConfigError for indices out of range
    if _trains_embeddings(cfg, layers):
        names += _embedding_modules(model, arch)
    trained = {}
    for name in names:
        module = model.get_submodule(name)
        for pname, p in module.named_parameters():
            if not any(part.startswith("adabudget_") for part in pname.split(".")):
                p.requires_grad_(True)
        trained[name] = module
    return trained


def count(cfg: FreezeConfig, arch: Arch, layers: list[int] | None = None) -> int:
    """L' x block_params (+ the embeddings: for BERT / RoBERTa / DeBERTa every backbone parameter
    outside the blocks except the pooler, for GPT-2 / LLaMA all but the final norm's h weights).

    block_params = Σ_linears (in x out + out·bias) + Σ_norms size (1 + bias).
    """
    layers = layers if layers is not None else cfg.layers
    total = len(arch.layers(layers)) * arch.block_params()
    if _trains_embeddings(cfg, layers):
        if arch.family == "bert":
            pooler = sum(
                s.in_features * s.out_features + s.bias * s.out_features
                for name, s in arch.outside_linears.items()
                if "pooler" in name.split(".")
            )
            total += arch.outside_params + sum(arch.outside_biases.values()) - pooler
        else:
            # outside_params = embedding tables + the final norm's weight (its GPT-2 bias is an outside bias)
            total += arch.outside_params - arch.hidden
    return total


def merge(model: nn.Module, wrapped: dict[str, nn.Module]) -> None:
    """Nothing to fold: the trained blocks are the base model's own parameters."""
