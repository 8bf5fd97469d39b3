"""Sparse fine-tuning: train a fixed subset of the entries of the adapted weight matrices,
W = W0 + S, S = scatter(values, idx), |idx| = k, chosen once before training by |θ ∇θ L|
(``grad``), the diagonal Fisher (``fisher``) or |θ| (``magnitude``); single entries per matrix or
globally, whole rows, or whole attention heads. ``SparseLinear`` stores the k values and their
int64 indices only and builds W0 + S densely for one GEMM per forward (a custom autograd function).
Scores, selections, the memory trade-off and the exact sizes: docs/methods.md#sparse-fine-tuning.

Invariants:

- Gradients and AdamW state exist for the k kept entries only.
- ``count`` is exact: with ``budget`` the total is the budget (unstructured) or the budget rounded
  down to whole rows / heads per matrix; with ``density`` floor(density · numel) per matrix.
- Before ``calibrate`` the entries are chosen by magnitude and S = 0, so the model equals the
  base; the mask is fixed after calibration.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from adabudget.config import ConfigError
from adabudget.methods.hooks import MethodHooks
from adabudget.modules import find_targets, linear_shape, resolve_targets, set_module
from torch import nn

SCORES = ("grad", "fisher", "magnitude")
SELECTIONS = ("unstructured", "structured", "heads")
HEAD_ROLES = {"q": "rows", "k": "rows", "v": "rows", "qkv": "rows", "o": "cols"}  # where a head sits
SCOPES = ("matrix", "global")


@dataclass
class SparseConfig:
    """Which entries train, and how many.

    Example: tiny BERT (2 blocks, h 32, FFN 64) adapts 8 matrices of 32 x 32 and 4 of 64 x 32
    or 32 x 64, 16 384 entries. ``density: 0.01`` keeps floor(10.24) = 10 of each attention
    matrix and floor(20.48) = 20 of each FFN matrix, 160 in all. ``budget: 100`` gives shares
    6.25 and 12.5: 6 and 12 each (96), and the 4 left go to the largest remainders, the FFN
    matrices (13 each): 8 x 6 + 4 x 13 = 100. ``structured`` at density 0.1 keeps 3 rows of
    each attention matrix (3 x 32), 6 of the FFN input (6 x 32) and 3 of its output (3 x 64).
    """

    name: str = "sparse"
    target_modules: Optional[list] = None  # regex name suffixes; None = architecture default
    density: float = 0.01  # fraction of each matrix kept (when budget is None)
    budget: Optional[int] = None  # trainable entries in all; wins over density
    score: str = "grad"  # grad: Σ|θ ∇θ| | fisher: Σ (∇θ)² | magnitude: |θ|
    selection: str = "unstructured"  # unstructured: entries | structured: whole rows of W (out, in) | heads
    scope: str = "matrix"  # matrix: top-k per matrix | global: top-k over all (unstructured only)
    calibration_steps: int = 8  # batches the grad / fisher score is summed over
    layers: Optional[list] = None  # restrict to these block indices (None = all)

    def validate(self) -> None:
        if not 0 < self.density <= 1:
            raise ConfigError(f"method.density: must be in (0, 1], got {self.density}")
        if self.budget is not None and (self.budget < 1 or self.budget != int(self.budget)):
            raise ConfigError(
                f"method.budget: must be a whole number >= 1 of trainable entries (or null for density), "
                f"got {self.budget}"
            )
        for field, value, allowed in (
            ("score", self.score, SCORES),
            ("selection", self.selection, SELECTIONS),
            ("scope", self.scope, SCOPES),
        ):
            if value not in allowed:
                raise ConfigError(f"method.{field}={value}: use one of {list(allowed)}")
        if self.selection != "unstructured" and self.scope == "global":
            # rows of different widths make a global top-k count depend on which rows win
            raise ConfigError(
                "method.scope=global: only with selection=unstructured; "
                f"use scope=matrix for {self.selection}"
            )
        if self.calibration_steps < 1:
            raise ConfigError(f"method.calibration_steps: must be >= 1, got {self.calibration_steps}")


# ---------------------------------------------------------------- sizes (exact, from shapes alone)
def allot(
    cfg: SparseConfig, shapes: dict[str, tuple[int, int]], heads: dict[str, tuple[str, int]] | None = None
) -> dict[str, int] | int:
    """Entries each matrix keeps, {name: k_i} from {name: (out, in)}; ``scope: global``: the total.
    ``heads`` ({name: (axis, head_dim)}, ``head_layout``) is needed for ``selection: heads``.

    ``count`` and ``apply`` both call this, so the analytic count is the built one.
    """
    numel = {n: o * i for n, (o, i) in shapes.items()}
    total = sum(numel.values())
    budget = None if cfg.budget is None else int(cfg.budget)
    if budget is not None and budget > total:
        raise ConfigError(
            f"method.budget={budget}: more than the {total} entries of the adapted matrices; "
            f"use at most {total} (or set method.density)"
        )
    if cfg.scope == "global":
        kept = budget if budget is not None else math.floor(cfg.density * total)
    elif budget is None:
        kept = {n: math.floor(cfg.density * m) for n, m in numel.items()}
    else:
        # largest remainder: floor(b n_i / N) each, the rest to the largest (b n_i mod N)
        kept = {n: budget * m // total for n, m in numel.items()}
        order = sorted(numel, key=lambda n: (-(budget * numel[n] % total), n))
        for n in order[: budget - sum(kept.values())]:
            kept[n] += 1
    if cfg.selection == "structured":
        if budget is None:
            kept = {n: math.floor(cfg.density * o) * i for n, (o, i) in shapes.items()}
        else:
            kept = {n: (k // shapes[n][1]) * shapes[n][1] for n, k in kept.items()}
    if cfg.selection == "heads":
        units = {n: head_unit(shapes[n], *heads[n]) for n in shapes}  # (entries per head, heads)
        if budget is None:
            kept = {n: math.floor(cfg.density * h) * u for n, (u, h) in units.items()}
        else:
            kept = {n: (k // units[n][0]) * units[n][0] for n, k in kept.items()}
    if (kept if isinstance(kept, int) else sum(kept.values())) == 0:
        what = f"budget={budget}" if budget is not None else f"density={cfg.density}"
        unit = {"structured": "a whole row", "heads": "a whole head"}.get(cfg.selection, "an entry")
        raise ConfigError(f"method.{what}: keeps no entry (less than {unit} per matrix); raise it")
    return kept


def head_unit(shape: tuple[int, int], axis: str, head_dim: int) -> tuple[int, int]:
    """(entries per head, heads) of an (out, in) matrix whose heads lie along ``axis``."""
    out_f, in_f = shape
    return (head_dim * in_f, out_f // head_dim) if axis == "rows" else (out_f * head_dim, in_f // head_dim)


def default_patterns(cfg: SparseConfig, arch) -> list[str]:
    """The target patterns: the user's, or the architecture's (attention matrices only for heads)."""
    if cfg.target_modules:
        return list(cfg.target_modules)
    if cfg.selection == "heads":
        return [re.escape(s.rel) for s in arch.by_role(*HEAD_ROLES)]
    return arch.default_targets()


def head_layout(
    cfg: SparseConfig, named: list[tuple[str, object]], arch
) -> dict[str, tuple[str, int]] | None:
    """{name: (axis, head_dim)} for ``selection: heads`` from (name, LinearSpec) pairs; None otherwise.

    Raises:
        ConfigError: naming method.selection for a target that is not an attention projection.
    """
    if cfg.selection != "heads":
        return None
    other = [f"{n} ({spec.role})" for n, spec in named if spec.role not in HEAD_ROLES]
    if other:
        raise ConfigError(
            f"method.selection=heads: {', '.join(other[:3])}{' ...' if len(other) > 3 else ''} "
            "has no attention "
            "heads; target only query / key / value / attention-output matrices (or leave "
            "method.target_modules=null for exactly those)"
        )
    return {n: (HEAD_ROLES[spec.role], arch.head_dim) for n, spec in named}


def count(cfg: SparseConfig, arch, layers: list[int] | None = None) -> int:
    """The kept entries (``allot``): the budget, Σ floor(density · numel), or whole rows / heads of it."""
    layers = layers if layers is not None else cfg.layers
    named = arch.match_linears(default_patterns(cfg, arch), layers)
    shapes = {n: (s.out_features, s.in_features) for n, s in named}
    kept = allot(cfg, shapes, head_layout(cfg, named, arch))
    return kept if isinstance(kept, int) else sum(kept.values())


# ---------------------------------------------------------------- the layer
class _SparseDeltaLinear(torch.autograd.Function):
    """y = x (W0 + S)ᵀ + b for x (N, in), S = scatter(values, idx) in W0's storage layout;
    keeps no dense W between forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, idx, values, fan_in_fan_out: bool):
        w = weight.flatten().index_add(0, idx, values.to(weight.dtype)).view_as(weight)
        ctx.save_for_backward(x, weight, idx, values)
        ctx.fan_in_fan_out = fan_in_fan_out
        return F.linear(x, w.t() if fan_in_fan_out else w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, idx, values = ctx.saved_tensors
        fan = ctx.fan_in_fan_out
        need_x, need_w, need_b, _, need_v, _ = ctx.needs_input_grad
        grad_x = grad_w = grad_b = grad_v = None
        if need_x:
            w = weight.flatten().index_add(0, idx, values.to(weight.dtype)).view_as(weight)
            grad_x = grad_out @ (w.t() if fan else w)  # (N, in)
        if need_w or need_v:
            # dL/dW in W0's storage layout: (in, out) for Conv1D, (out, in) for nn.Linear
            dw = x.t() @ grad_out if fan else grad_out.t() @ x
            if need_w:
                grad_w = dw
            if need_v:
                grad_v = dw.flatten().index_select(0, idx).to(values.dtype)
        if need_b:
            grad_b = grad_out.sum(0)
        return grad_x, grad_w, grad_b, None, grad_v, None


class SparseLinear(nn.Module):
    """y = x (W0 + S)ᵀ + b with k trainable entries ``values`` at flat ``idx`` of W0's storage."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base)
        w = base.weight
        self.value_dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.heads: tuple[str, int] | None = None  # (axis, head_dim) under selection: heads
        self.register_buffer("idx", torch.zeros(0, dtype=torch.int64, device=w.device))  # (k,)
        self.values = nn.Parameter(torch.zeros(0, dtype=self.value_dtype, device=w.device))  # (k,)

    @property
    def k(self) -> int:
        return self.idx.numel()

    @torch.no_grad()
    def select_(self, idx: torch.Tensor) -> None:
        """Train the entries ``idx`` (flat, W0's storage) from S = 0; a new parameter if k changes."""
        self.idx = idx.to(device=self.base.weight.device, dtype=torch.int64).sort().values
        if self.values.numel() == self.k:
            self.values.zero_()
        else:
            self.values = nn.Parameter(torch.zeros(self.k, dtype=self.value_dtype, device=self.idx.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        # 2-D inside the Function: its output must not be a view (LoRA adds into it in place)
        y = _SparseDeltaLinear.apply(
            x.reshape(-1, self.in_features),
            base.weight,
            base.bias,
            self.idx,
            self.values,
            self.fan_in_fan_out,
        )  # (N, out)
        return y.view(*x.shape[:-1], self.out_features)

    def delta_weight(self) -> torch.Tensor:
        """S in nn.Linear layout (out, in), dense."""
        s = torch.zeros(self.base.weight.numel(), dtype=self.values.dtype, device=self.values.device)
        s = s.index_add(0, self.idx, self.values).view(self.base.weight.shape)
        return s.t() if self.fan_in_fan_out else s

    @torch.no_grad()
    def fold_into_base_(self) -> nn.Module:
        """W0 += S in place; returns the base layer."""
        w = self.base.weight
        w.view(-1).index_add_(0, self.idx, self.values.to(w.dtype))
        return self.base


# ---------------------------------------------------------------- selection
@torch.no_grad()
def select(
    layers: dict[str, SparseLinear], scores: dict[str, torch.Tensor], cfg: SparseConfig
) -> dict[str, torch.Tensor]:
    """The flat indices (W0's storage) each layer keeps, the best ``scores`` (W0's shape) within
    the sizes ``allot`` gives."""
    shapes = {n: (m.out_features, m.in_features) for n, m in layers.items()}
    kept = allot(cfg, shapes, {n: m.heads for n, m in layers.items()} if cfg.selection == "heads" else None)
    if cfg.scope == "global":
        # each matrix's own top-min(k, numel) holds all its global winners: no concatenated copy
        names = list(layers)
        tops = [scores[n].flatten().float().topk(min(kept, scores[n].numel())) for n in names]
        owner = torch.cat([torch.full_like(t.indices, j) for j, t in enumerate(tops)])
        won = torch.cat([t.values.to(tops[0].values.device) for t in tops]).topk(kept).indices
        flat = torch.cat([t.indices.to(won.device) for t in tops])
        owner = owner.to(won.device)
        return {n: flat[won[owner[won] == j]] for j, n in enumerate(names)}
    out = {}
    for name, layer in layers.items():
        s = scores[name].float()
        if cfg.selection == "unstructured":
            out[name] = s.flatten().topk(kept[name]).indices
            continue
        logical = s.t() if layer.fan_in_fan_out else s  # (out, in)
        every_row = torch.arange(layer.out_features, device=s.device)
        every_col = torch.arange(layer.in_features, device=s.device)
        if cfg.selection == "structured":
            rows, cols = logical.sum(1).topk(kept[name] // layer.in_features).indices, every_col
        else:  # heads: head_dim consecutive rows (q, k, v) or columns (the output projection)
            axis, hd = layer.heads
            unit, _ = head_unit((layer.out_features, layer.in_features), axis, hd)
            per_head = (
                logical.view(-1, hd, layer.in_features).sum((1, 2))
                if axis == "rows"
                else logical.view(layer.out_features, -1, hd).sum((0, 2))
            )
            chosen = per_head.topk(kept[name] // unit).indices
            span = (chosen[:, None] * hd + torch.arange(hd, device=s.device)[None, :]).flatten()
            rows, cols = (span, every_col) if axis == "rows" else (every_row, span)
        out[name] = block_indices(layer, rows, cols)
    return out


def block_indices(layer: SparseLinear, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Flat indices into W0's storage of every entry (o, i), o in ``rows``, i in ``cols``."""
    if layer.fan_in_fan_out:  # storage (in, out): entry (o, i) sits at i * out + o
        return (cols[None, :] * layer.out_features + rows[:, None]).flatten()
    return (rows[:, None] * layer.in_features + cols[None, :]).flatten()


def importance(
    layers: dict[str, SparseLinear],
    loss_of: Callable,
    batches: Iterable,
    score: str,
) -> dict[str, torch.Tensor]:
    """Per layer, Σ_b |W0 ⊙ ∇W0 L_b| (``grad``) or Σ_b (∇W0 L_b)² (``fisher``) over ``batches``,
    in W0's storage shape; |W0| for ``magnitude``. Touches no ``.grad``."""
    weights = {n: m.base.weight for n, m in layers.items()}
    if score == "magnitude":
        return {n: w.detach().abs() for n, w in weights.items()}
    acc = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in weights.items()}
    was = {n: w.requires_grad for n, w in weights.items()}
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            grads = torch.autograd.grad(loss_of(batch), list(weights.values()))
            with torch.no_grad():
                for (n, w), g in zip(weights.items(), grads):
                    if score == "grad":
                        acc[n] += (w.float() * g.float()).abs()
                    else:
                        acc[n] += g.float().square()
    finally:
        for n, w in weights.items():
            w.requires_grad_(was[n])
    return acc


class SparseHooks(MethodHooks):
    """The training loop's side of sparse fine-tuning (``MethodHooks``): re-choose the entries from
    gradient scores in ``calibrate``; save and restore them for a resumed run."""

    def __init__(self, layers: dict[str, SparseLinear], cfg: SparseConfig):
        self.layers = layers
        self.cfg = cfg

    def calibrate(self, loss_of: Callable, batches: Callable) -> None:
        if self.cfg.score == "magnitude":  # ``apply`` chose them already
            return
        scores = importance(self.layers, loss_of, batches(self.cfg.calibration_steps), self.cfg.score)
        for name, idx in select(self.layers, scores, self.cfg).items():
            self.layers[name].select_(idx)

    def state_dict(self) -> dict:
        return {"indices": {n: m.idx.cpu() for n, m in self.layers.items()}}

    def load_state_dict(self, state: dict) -> None:
        for name, idx in state["indices"].items():
            self.layers[name].select_(idx)


# ---------------------------------------------------------------- the method
def wrap(model: nn.Module, cfg: SparseConfig, layers: list[int] | None = None) -> dict[str, SparseLinear]:
    """Put a ``SparseLinear`` on every target, its entries chosen by magnitude (S = 0)."""
    layers = layers if layers is not None else cfg.layers
    heads = None
    if cfg.selection == "heads":  # attention roles and head_dim come from the architecture
        from adabudget.arch import arch_of

        arch = arch_of(model)
        patterns = default_patterns(cfg, arch)
        names = find_targets(model, patterns, "method.target_modules", layers)
        specs = dict(arch.match_linears(patterns, layers))
        heads = head_layout(cfg, [(n, specs[n]) for n in names], arch)
    else:
        patterns = resolve_targets(model, cfg.target_modules, "method.target_modules")
        names = find_targets(model, patterns, "method.target_modules", layers)
    shapes = {}
    for name in names:
        in_f, out_f, _ = linear_shape(model.get_submodule(name))
        shapes[name] = (out_f, in_f)
    allot(cfg, shapes, heads)  # a budget that does not fit fails before the model is touched
    wrapped = {}
    for name in names:
        base = model.get_submodule(name)
        # W0 is frozen with the backbone; its bias is left alone (another method may train it)
        base.weight.requires_grad_(False)
        wrapped[name] = SparseLinear(base)
        if heads is not None:
            wrapped[name].heads = heads[name]
    for name, idx in select(wrapped, importance(wrapped, None, (), "magnitude"), cfg).items():
        wrapped[name].select_(idx)
    for name, layer in wrapped.items():
        set_module(model, name, layer)
    return wrapped


def apply(model: nn.Module, cfg: SparseConfig, layers: list[int] | None = None) -> dict[str, SparseLinear]:
    return wrap(model, cfg, layers)


def layers_of(modules: dict) -> dict[str, SparseLinear]:
    return {n: m for n, m in modules.items() if isinstance(m, SparseLinear)}


def hooks(model: nn.Module, modules: dict, cfg: SparseConfig) -> SparseHooks:
    return SparseHooks(layers_of(modules), cfg)


@torch.no_grad()
def merge(model: nn.Module, modules: dict) -> None:
    """W0 += S, then put the base layer back."""
    for name, layer in layers_of(modules).items():
        set_module(model, name, layer.fold_into_base_())
