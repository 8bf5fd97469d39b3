"""Scaled parallel adapter (He et al., ICLR 2022): a bottleneck network reads a sublayer's input x
and s · (W_up f(W_down x + b_down) + b_up) is added to the sublayer's output, beside the FFN
(``position=ffn``, MAM's variant) or self-attention (``position=attn``). Hooks, not replaced
modules: a pre-hook on the sublayer's first linear stores x, a hook on its output linear adds the
branch, so LoRA may wrap either linear first. Where x is read on each family and the hooks:
docs/methods.md#parallel-adapter.

Invariants:

- It starts at the identity (W_up = 0, b_up = 0); nonlinear, so it cannot merge.
- A pre-hook on the block clears the stored x at every block call, so an interrupted forward never
  leaks x into the next one.
- ``SlicedParallelAdapter``'s ``set_active(adapter, d)`` uses the first d hidden units; d = 0 adds
  nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from adabudget.config import checker
from adabudget.methods.adapter import bottleneck_slice, slice_bottleneck
from adabudget.modules import base_linear
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}
INITS = ("lora", "bert")
# position -> (roles of the linear whose input is x, role of the sublayer's output linear)
ROLES = {"ffn": (("ffn_in",), "ffn_out"), "attn": (("q", "qkv"), "o")}


@dataclass
class ParallelAdapterConfig:
    """Parallel adapter knobs.

    Example (MiniLM, h = 384, L = 6): ``position=ffn, bottleneck=64`` adds one adapter per
    block of 2 h d + d + h = 49,600 parameters, 297,600 in all; MAM's d = 512 gives
    6 x 394,112 = 2,364,672.
    """

    name: str = "parallel_adapter"
    position: str = "ffn"  # ffn: beside the FFN (MAM) | attn: beside self-attention
    bottleneck: int = 64  # d, the bottleneck width (MAM adapter: 512)
    scale: float = 4.0  # s, the fixed output scaling (Sec. 4.4; 4 in MAM)
    activation: str = "relu"  # f: relu | gelu | tanh | silu
    # lora: W_down Kaiming-uniform (as LoRA's A, the reference's init_option="lora")
    # | bert: W_down ~ N(0, 0.02²); both: W_up = 0 and biases 0, so the adapter starts at exactly 0
    init: str = "lora"
    layers: Optional[list] = None  # restrict to these block indices (None = all)

    def validate(self) -> None:
        check = checker("method")

        check(
            self.position in ROLES,
            "position",
            f"unknown position '{self.position}'; use one of {sorted(ROLES)}",
        )
        check(self.bottleneck >= 1, "bottleneck", f"must be >= 1, got {self.bottleneck}")
        # s = 0 would silence the adapter and give W_down, W_up zero gradients forever
        check(self.scale != 0, "scale", "must be nonzero (MAM uses 4.0)")
        check(
            self.activation in ACTIVATIONS,
            "activation",
            f"unknown activation '{self.activation}'; use one of {sorted(ACTIVATIONS)}",
        )
        check(self.init in INITS, "init", f"unknown init '{self.init}'; use one of {list(INITS)}")
        check(
            self.layers is None or all(isinstance(i, int) and i >= 0 for i in self.layers),
            "layers",
            f"must be a list of block indices >= 0 or null, got {self.layers}",
        )


class ParallelAdapter(nn.Module):
    """Adds s · (W_up f(W_down x + b_down) + b_up) to a sublayer's output, x its input.

    Args:
        in_features: width of x (the sublayer input, h).
        d: the bottleneck width.
        out_features: width of the sublayer output (h).
        scale: s.
        activation: f, a key of ``ACTIVATIONS``.
        init: ``lora`` (W_down Kaiming-uniform, a = √5) or ``bert`` (W_down ~ N(0, 0.02²));
            W_up and both biases start at 0.
        device, dtype: of the new parameters.
    """

    def __init__(
        self,
        in_features: int,
        d: int,
        out_features: int,
        scale: float,
        activation: str,
        init: str = "lora",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.down = nn.Linear(in_features, d, device=device, dtype=dtype)  # W_down (d, h), b_down
        self.up = nn.Linear(d, out_features, device=device, dtype=dtype)  # W_up (h, d), b_up
        with torch.no_grad():
            if init == "lora":
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            else:
                nn.init.normal_(self.down.weight, std=0.02)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)  # zero only W_up: W_down gets gradients once W_up moves
            nn.init.zeros_(self.up.bias)
        self.scale = scale
        self.activation = activation
        self._act = ACTIVATIONS[activation]
        self._x: torch.Tensor | None = None  # the sublayer input of the block call in progress
        self._handles: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """s · (W_up f(W_down x + b_down) + b_up), in the adapter's dtype."""
        return self.scale * self.up(self._act(self.down(x.to(self.down.weight.dtype))))  # (..., h)

    def _reset(self, module: nn.Module, inputs: tuple) -> None:
        self._x = None

    def _capture(self, module: nn.Module, inputs: tuple) -> None:
        # First call per block call wins: DeBERTa-v2 with share_att_key also runs query_proj
        # on the relative position embeddings after the hidden states.
        if self._x is None:
            self._x = inputs[0]

    def _add(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x, self._x = self._x, None  # drop the reference now: nothing outlives the forward
        if x is None:
            raise RuntimeError(
                "parallel adapter: the sublayer's output linear ran without its input having been "
                "captured (was it called outside its block, or was a hooked linear replaced after apply?)"
            )
        return output + self(x).to(output.dtype)

    def attach(self, block: nn.Module, first: nn.Module, last: nn.Module) -> None:
        """Hook ``block`` (clear), ``first`` (capture x) and ``last`` (add), the modules now at their
        paths."""
        self._handles += [
            block.register_forward_pre_hook(self._reset),
            first.register_forward_pre_hook(self._capture),
            last.register_forward_hook(self._add),
        ]

    def detach(self) -> None:
        """Remove the hooks: the sublayer computes its output without the adapter again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._x = None

    def extra_repr(self) -> str:
        return (
            f"in={self.down.in_features}, d={self.down.out_features}, out={self.up.out_features}, "
            f"s={self.scale:g}, f={self.activation}"
        )


class SlicedParallelAdapter(ParallelAdapter):
    """A ``ParallelAdapter`` built D wide that computes with its first ``active`` hidden units
    (``set_active``; None: all D, 0: off, the sublayer alone)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active is None:
            return super().forward(x)
        return self.scale * bottleneck_slice(self, x, self.active)  # (..., h)

    def _add(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.active == 0:  # switched off: the sublayer alone (the captured x dropped all the same)
            self._x = None
            return output
        return super()._add(module, inputs, output)


def set_active(adapter: SlicedParallelAdapter, d: int | None) -> dict[str, tuple]:
    """Compute with the first ``d`` hidden units only (0: off, adds nothing; None: all).

    Returns the index of each parameter's part in use (empty when off), as
    ``adabudget.methods.adapter.set_active``.
    """
    return slice_bottleneck(adapter, d, SlicedParallelAdapter)


def _specs(arch, position: str):
    """(spec of the linear whose input is x, spec of the output linear); LLaMA: gate_proj of gate/up."""
    first_roles, last_role = ROLES[position]
    first = arch.by_role(*first_roles)[0]
    (last,) = arch.by_role(last_role)
    return first, last


def apply(
    model: nn.Module,
    cfg: ParallelAdapterConfig,
    layers: list[int] | None = None,
    layer_cls: type = ParallelAdapter,
) -> dict[str, ParallelAdapter]:
    """Add a parallel adapter to the blocks in ``layers``; returns {module name: adapter}.

    Each becomes the block's child ``adabudget_parallel_adapter_<position>``. ``layer_cls``:
    ``ParallelAdapter`` or a subclass (the sliced one).
    """
    from adabudget.arch import arch_of

    layers = layers if layers is not None else cfg.layers
    arch = arch_of(model)
    blocks = arch.layers(layers)
    first_spec, last_spec = _specs(arch, cfg.position)
    added = {}
    for i in blocks:
        block = model.get_submodule(arch.block(i))
        first, last = block.get_submodule(first_spec.rel), block.get_submodule(last_spec.rel)
        weight = base_linear(last).weight
        # float32 unless the base already is float32/float64 (keeps bf16 backbones' adapters precise)
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        adapter = layer_cls(
            first_spec.in_features,
            cfg.bottleneck,
            last_spec.out_features,
            cfg.scale,
            cfg.activation,
            cfg.init,
            weight.device,
            dtype,
        )
        name = f"adabudget_parallel_adapter_{cfg.position}"
        setattr(block, name, adapter)
        adapter.attach(block, first, last)
        added[f"{arch.block(i)}.{name}"] = adapter
    return added


def count(cfg: ParallelAdapterConfig, arch, layers: list[int] | None = None) -> int:
    """h d + d + d h + h = 2 h d + d + h per block (W_down, b_down, W_up, b_up)."""
    layers = layers if layers is not None else cfg.layers
    blocks = arch.layers(layers)
    first, last = _specs(arch, cfg.position)
    d = cfg.bottleneck
    return len(blocks) * (first.in_features * d + d + d * last.out_features + last.out_features)
