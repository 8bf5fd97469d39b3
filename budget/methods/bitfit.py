"""BitFit (Ben Zaken et al., ACL 2022): fine-tune the bias terms only.

Every linear layer y = W x + b and every LayerNorm y = γ ⊙ x̂ + β keeps W and γ frozen and
trains b and β. The paper's best subset (Sec. 4) is the query bias and the FFN-input bias,
``method.biases=[query, intermediate\\.dense]`` here; the default trains every bias of the
backbone (the task head is trained or not by ``model.train_head``, never by BitFit).

LLaMA-family linears and RMSNorms have no bias. ``add_missing=true`` gives each selected
bias-less linear a new zero bias (registered as the layer's own ``bias``, so its forward
uses it), which leaves the model at identity; RMSNorms get none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from adabudget.arch import Arch, arch_of
from adabudget.config import ConfigError
from adabudget.modules import model_type
from torch import nn


@dataclass
class BitFitConfig:
    """Which biases train.

    Example: on MiniLM (L = 6, h = 384, FFN 1536) ``biases=None`` trains
    6 x (4 x 384 + 1536 + 384 + 2 x 384) + 384 (embedding LayerNorm) + 384 (pooler) = 26,112
    parameters; ``biases=[query, intermediate\\.dense]`` trains 6 x (384 + 1536) = 11,520.
    """

    name: str = "bitfit"
    # regex suffixes of the module that owns the bias, matched as ``(.*\.)?(?:pattern)``
    # (like method.target_modules); None = every bias of the backbone (linears and norms)
    biases: Optional[list] = None
    # give bias-less linears (LLaMA) a new zero bias; without it BitFit refuses such layers
    add_missing: bool = False
    layers: Optional[list] = None  # restrict to these block indices (None = all, and biases outside blocks)

    def validate(self) -> None:
        if self.biases is not None:
            if not self.biases or not all(isinstance(p, str) and p for p in self.biases):
                raise ConfigError(
                    f"method.biases={self.biases}: must be a non-empty list of module-name patterns "
                    "or null (every bias)"
                )
            for p in self.biases:
                try:
                    re.compile(p)
                except re.error as err:
                    raise ConfigError(
                        f"method.biases: '{p}' is not a valid regex ({err}); escape dots as \\."
                    ) from err


def _selected(cfg: BitFitConfig, arch: Arch, layers: list[int] | None) -> list[tuple[str, int, bool]]:
    """(owning module's name, size, exists) of every bias BitFit trains; ConfigError when it can't.

    ``exists`` is False for a bias-less linear that gets a new bias (only with ``add_missing``).
    """
    layers = layers if layers is not None else cfg.layers
    slots: dict[str, tuple[int, bool]] = {}
    for i in arch.layers(layers):
        for s in arch.linears:
            slots[f"{arch.block(i)}.{s.rel}"] = (s.out_features, s.bias)
        for n in arch.norms:
            if n.bias:  # RMSNorm has no bias to train, and add_missing does not invent one
                slots[f"{arch.block(i)}.{n.rel}"] = (n.size, True)
    if layers is None:  # biases outside the blocks (embedding LayerNorm, pooler, final norm)
        for name, s in arch.outside_linears.items():
            slots[name] = (s.out_features, s.bias)
        for name, size in arch.outside_biases.items():
            slots[name.removesuffix(".bias")] = (size, True)
    if cfg.biases is not None:
        regexes = [re.compile(rf"(.*\.)?(?:{p})") for p in cfg.biases]
        picked = [(n, *v) for n, v in slots.items() if any(r.fullmatch(n) for r in regexes)]
        if not picked:
            ends = sorted({n.rsplit(".", 1)[-1] for n in slots})
            raise ConfigError(
                f"method.biases={cfg.biases} matches no layer of this {arch.model_type} "
                "that can carry a bias; "
                f"its bias-carrying module names end in {ends}"
            )
        missing = [n for n, _, exists in picked if not exists]
        if missing and not cfg.add_missing:
            raise ConfigError(
                f"method.name=bitfit: cannot apply to model_type '{arch.model_type}' as asked "
                f"({len(missing)} selected linear layers have no bias, e.g. {missing[0]}); "
                "set method.add_missing=true to give them zero-initialised biases, or narrow method.biases"
            )
        return picked
    picked = [(n, *v) for n, v in slots.items() if v[1] or cfg.add_missing]
    if not picked:
        raise ConfigError(
            f"method.name=bitfit: cannot apply to model_type '{arch.model_type}' (its linear layers and "
            "norms have no bias terms); set method.add_missing=true to add zero-initialised biases to its "
            "linear layers"
        )
    return picked


def _innermost(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The linear inside LoRA/AdaLoRA wrappers (``.base``), which owns the bias, and its name."""
    while isinstance(getattr(module, "base", None), nn.Module):
        module, name = module.base, f"{name}.base"
    return module, name


def apply(model: nn.Module, cfg: BitFitConfig, layers: list[int] | None = None) -> dict[str, nn.Module]:
    """Make the selected biases trainable (adding zero ones with ``add_missing``).

    Returns {name of the module owning the bias: that module} (plain base modules: BitFit
    adds no module of its own). Starts at identity: existing biases keep their values and
    added ones are zero.
    """
    wrapped = {}
    for name, size, _ in _selected(cfg, arch_of(model), layers):
        module, name = _innermost(model.get_submodule(name), name)
        if getattr(module, "bias", None) is None:
            if not cfg.add_missing:
                raise ConfigError(
                    f"method.name=bitfit: {name} of model_type '{model_type(model)}' has no bias; "
                    "set method.add_missing=true to add a zero-initialised one"
                )
            w = module.weight
            # the base dtype (not float32 like other methods' modules): F.linear needs W and b alike
            module.bias = nn.Parameter(torch.zeros(size, device=w.device, dtype=w.dtype))
        module.bias.requires_grad_(True)
        wrapped[name] = module
    return wrapped


def count(cfg: BitFitConfig, arch: Arch, layers: list[int] | None = None) -> int:
    """Σ over the selected layers of their bias size: out_features of a linear, h of a LayerNorm.

    With ``layers=None`` and ``biases=None`` on BERT:
    L (3h + h + i + h + 2h) + Σ outside_biases (embedding LayerNorm, pooler).
    """
    return sum(size for _, size, _ in _selected(cfg, arch, layers))


def merge(model: nn.Module, wrapped: dict[str, nn.Module]) -> None:
    """Nothing to fold: BitFit's biases are the base model's own parameters already.

    Biases added by ``add_missing`` stay as ordinary ``bias`` parameters. A plain HF
    checkpoint only reloads them where the config says the layers have biases, so on a
    ``llama`` model whose attention (q, k, v, o) or MLP (gate, up, down) linears all have
    biases now, this sets ``config.attention_bias`` / ``config.mlp_bias``. Partial additions
    (some layers only, or mistral / qwen2, whose configs have no such switch) cannot be
    saved with ``save_pretrained`` + ``from_pretrained``; keep the state dict instead.
    """
    if model_type(model) != "llama":
        return
    arch = arch_of(model)
    for flag, roles in (("attention_bias", ("q", "k", "v", "o")), ("mlp_bias", ("ffn_in", "ffn_out"))):
        paths = [f"{arch.block(i)}.{s.rel}" for i in range(arch.num_layers) for s in arch.by_role(*roles)]
        if all(_innermost(model.get_submodule(p), p)[0].bias is not None for p in paths):
            setattr(model.config, flag, True)
