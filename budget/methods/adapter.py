"""Serial bottleneck adapters (Houlsby et al., ICML 2019; Pfeiffer et al., EACL 2021):
y' = y + W_up f(W_down y + b_down) + b_up after the attention output and FFN output projections
(``houlsby``) or after the FFN's only (``pfeiffer``), through a forward hook on the module at the
projection's path, so under LoRA the adapter sees the LoRA-updated output. ``BottleneckAdapter``
is the plain adapter; ``SlicedBottleneckAdapter`` (the supernet's) and UniPELT's gated adapter
subclass it. Placements and what is not reproduced: docs/methods.md#adapter.

Invariants:

- It starts at the identity (W_up = 0, b_up = 0): right after ``apply`` the output equals the
  pretrained model's.
- Nonlinear, so it cannot merge into the base weights.
- ``set_active(adapter, d)`` uses the first d hidden units (views); d = 0 is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from adabudget.config import ConfigError, checker
from adabudget.modules import base_linear
from torch import nn

PLACEMENTS = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",)}
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}
ROLE = {"attn": "o", "ffn": "ffn_out"}  # the projection each adapter position hooks


@dataclass
class AdapterConfig:
    """Serial adapter knobs.

    Example (MiniLM, h = 384, L = 6): ``placement=houlsby, bottleneck=64`` adds
    2 x 6 adapters of 2 h d + d + h = 49,600 parameters each, 595,200 in all;
    ``placement=pfeiffer, reduction_factor=16`` gives d = 384 // 16 = 24 and
    6 x (2 x 384 x 24 + 24 + 384) = 113,040.
    """

    name: str = "adapter"
    placement: str = "houlsby"  # houlsby: after attention output and FFN output | pfeiffer: after FFN only
    bottleneck: Optional[int] = 64  # d (Houlsby's "m"), the bottleneck width
    # d = h // reduction_factor (the adapter-hub notation); when set it overrides bottleneck, so
    # `method.reduction_factor=16` alone works on top of the default bottleneck
    reduction_factor: Optional[float] = None
    activation: str = "relu"  # f: relu | gelu | tanh | silu
    # W_down ~ N(0, init_std²) truncated at ±2σ as in google-research/adapter-bert (1e-3);
    # W_up = 0 and both biases 0, so the adapter starts as the exact identity.
    init_std: float = 1e-3
    layers: Optional[list] = None  # restrict to these block indices (None = all)

    def validate(self) -> None:
        check = checker("method")

        check(
            self.placement in PLACEMENTS,
            "placement",
            f"unknown placement '{self.placement}'; use one of {sorted(PLACEMENTS)}",
        )
        check(
            self.bottleneck is not None or self.reduction_factor is not None,
            "bottleneck",
            "both bottleneck and reduction_factor are null; set bottleneck (d) or reduction_factor "
            "(d = h // factor)",
        )
        check(
            self.bottleneck is None or self.bottleneck >= 1,
            "bottleneck",
            f"must be >= 1, got {self.bottleneck}",
        )
        check(
            self.reduction_factor is None or self.reduction_factor > 0,
            "reduction_factor",
            f"must be > 0, got {self.reduction_factor}",
        )
        check(
            self.activation in ACTIVATIONS,
            "activation",
            f"unknown activation '{self.activation}'; use one of {sorted(ACTIVATIONS)}",
        )
        # init_std = 0 together with W_up = 0 leaves both weights with zero gradient (only biases move)
        check(self.init_std > 0, "init_std", f"must be > 0 (W_up starts at zero), got {self.init_std}")
        check(
            self.layers is None or all(isinstance(i, int) and i >= 0 for i in self.layers),
            "layers",
            f"must be a list of block indices >= 0 or null, got {self.layers}",
        )


class BottleneckAdapter(nn.Module):
    """y -> y + W_up f(W_down y + b_down) + b_up, applied to a projection's output by a hook.

    Args:
        hidden: h, the width of the hooked projection's output.
        d: the bottleneck width.
        activation: f, a key of ``ACTIVATIONS``.
        init_std: standard deviation of W_down (truncated at ±2σ); W_up and the biases start at 0.
        device, dtype: of the new parameters.
    """

    def __init__(
        self,
        hidden: int,
        d: int,
        activation: str,
        init_std: float = 1e-3,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.down = nn.Linear(hidden, d, device=device, dtype=dtype)  # W_down (d, h), b_down
        self.up = nn.Linear(d, hidden, device=device, dtype=dtype)  # W_up (h, d), b_up
        with torch.no_grad():
            nn.init.trunc_normal_(self.down.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)  # zero only W_up: W_down still gets gradients once W_up moves
            nn.init.zeros_(self.up.bias)
        self.activation = activation
        self._act = ACTIVATIONS[activation]
        self._handles: list = []  # hook handles, so ``detach`` can remove the adapter's effect

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.delta(y).to(y.dtype)

    def delta(self, y: torch.Tensor) -> torch.Tensor:
        """W_up f(W_down y + b_down) + b_up, (..., h) in the adapter's dtype: what is added to y
        (UniPELT's layer gates it)."""
        return self.up(self._act(self.down(y.to(self.down.weight.dtype))))

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return self(output)

    def attach(self, target: nn.Module) -> None:
        """Apply the adapter to every output of ``target`` (the module now at the projection's path)."""
        self._handles.append(target.register_forward_hook(self._hook))

    def detach(self) -> None:
        """Remove the hooks: the projection computes its output without the adapter again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def extra_repr(self) -> str:
        return f"h={self.up.out_features}, d={self.down.out_features}, f={self.activation}"


class SlicedBottleneckAdapter(BottleneckAdapter):
    """A ``BottleneckAdapter`` built D wide that computes with its first ``active`` hidden units
    (``set_active``; None: all D, 0: off, the identity)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active: int | None = None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.active == 0:
            return y
        return super().forward(y)

    def delta(self, y: torch.Tensor) -> torch.Tensor:
        if self.active is None:
            return super().delta(y)
        return bottleneck_slice(self, y, self.active)


def bottleneck_slice(adapter: nn.Module, x: torch.Tensor, d: int) -> torch.Tensor:
    """W_up[:, :d] f(W_down[:d] x + b_down[:d]) + b_up of a down / up bottleneck (this adapter, the
    parallel one), with views of its weights: the stand-alone d-wide adapter holding them."""
    down, up = adapter.down, adapter.up
    hidden = F.linear(x.to(down.weight.dtype), down.weight[:d], down.bias[:d])  # (..., d)
    return F.linear(adapter._act(hidden), up.weight[:, :d], up.bias)  # (..., h)


def set_active(adapter: SlicedBottleneckAdapter, d: int | None) -> dict[str, tuple]:
    """Compute with the first ``d`` hidden units only (0: off, the identity; None: all).

    Returns the index of each parameter's part in use (empty when off), for a supernet's
    masked optimizer: W_down and b_down their first d rows, W_up its first d columns, b_up whole.
    """
    return slice_bottleneck(adapter, d, SlicedBottleneckAdapter)


def slice_bottleneck(adapter: nn.Module, d: int | None, sliced: type) -> dict[str, tuple]:
    """``set_active`` of any down / up bottleneck built as ``sliced`` (this adapter, the parallel one)."""
    if not isinstance(adapter, sliced):
        raise TypeError(
            f"set_active: {type(adapter).__name__} computes at its full bottleneck; "
            f"build it as a {sliced.__name__}"
        )
    width = adapter.down.out_features
    if d is not None and not 0 <= d <= width:
        raise ValueError(f"{sliced.__name__} slice d={d} outside 0..{width}")
    adapter.active = None if d is None or d == width else d
    d = width if d is None else d
    if d == 0:
        return {}
    rows = (slice(0, d),)
    return {
        "down.weight": rows,
        "down.bias": rows,
        "up.weight": (slice(None), slice(0, d)),
        "up.bias": (slice(None),),
    }


def bottleneck_of(cfg: AdapterConfig, hidden: int) -> int:
    """d: h // ``reduction_factor`` when it is set, else ``bottleneck``."""
    if cfg.reduction_factor is None:
        return cfg.bottleneck
    d = int(hidden // cfg.reduction_factor)
    if d < 1:
        raise ConfigError(
            f"method.reduction_factor={cfg.reduction_factor}: gives bottleneck h // factor = 0 for "
            f"hidden size h={hidden}; use a factor <= {hidden}"
        )
    return d


def apply(
    model: nn.Module,
    cfg: AdapterConfig,
    layers: list[int] | None = None,
    layer_cls: type = BottleneckAdapter,
) -> dict[str, BottleneckAdapter]:
    """Add serial adapters to the blocks in ``layers``; returns {module name: adapter}.

    Each adapter becomes the block's child ``adabudget_adapter_attn`` / ``adabudget_adapter_ffn``
    and hooks the module currently at the attention-output / FFN-output projection's path.
    ``layer_cls``: ``BottleneckAdapter`` or a subclass (the sliced one, UniPELT's gated one).
    """
    from adabudget.arch import arch_of

    layers = layers if layers is not None else cfg.layers
    arch = arch_of(model)
    d = bottleneck_of(cfg, arch.hidden)
    blocks = arch.layers(layers)
    added = {}
    for i in blocks:
        block = model.get_submodule(arch.block(i))
        for where in PLACEMENTS[cfg.placement]:
            (spec,) = arch.by_role(ROLE[where])
            target = block.get_submodule(spec.rel)
            weight = base_linear(target).weight
            # float32 unless the base already is float32/float64 (keeps bf16 backbones' adapters precise)
            dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
            adapter = layer_cls(spec.out_features, d, cfg.activation, cfg.init_std, weight.device, dtype)
            setattr(block, f"adabudget_adapter_{where}", adapter)
            adapter.attach(target)
            added[f"{arch.block(i)}.adabudget_adapter_{where}"] = adapter
    return added


def count(cfg: AdapterConfig, arch, layers: list[int] | None = None) -> int:
    """2 h d + d + h per adapter (W_down, b_down, W_up, b_up); 2 adapters per block (houlsby) or 1
    (pfeiffer)."""
    layers = layers if layers is not None else cfg.layers
    d = bottleneck_of(cfg, arch.hidden)
    total = 0
    for where in PLACEMENTS[cfg.placement]:
        (spec,) = arch.by_role(ROLE[where])
        h = spec.out_features
        total += 2 * h * d + d + h
    return total * len(arch.layers(layers))
