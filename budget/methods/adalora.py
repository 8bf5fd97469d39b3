"""AdaLoRA: SVD-parameterised low-rank updates with an adaptive global rank budget.

Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023.
Each adapted weight becomes W = W0 + s * P diag(λ) Q (eq. 3), P (out x r), λ (r), Q (r x in).
The triplets (P_:i, λ_i, Q_i:) are scored and pruned by ``adabudget.allocator.RankAllocator``.
``init=pissa`` starts P Λ Q at W0's principal triplets, W0 - s P Λ Q left in the base;
``dora=true`` puts DoRA's magnitude on top of P Λ Q (``DoRASVDLinear``: m (W0 + s P Λ Q) / ||·||_c,
the magnitude never pruned) (docs/methods.md#lora-variants-dora-rslora-pissa-olora).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from adabudget.config import ConfigError, checker
from adabudget.methods.lora import DoRA, check_init, dense_weight, principal_triplets, rewrites_base
from adabudget.modules import find_targets, linear_shape, resolve_targets, set_module
from torch import nn

SCORES = ("adalora", "sensitivity", "magnitude")
SHRINK = ("final", "every", "never")
# P, Λ, Q at init: orthogonal P and Q with λ = 0 (``SVDLinear``), or PiSSA's principal triplets of W0
# (pissa_niter_<k>: the randomised SVD); LoRA's other inits have no P Λ Q form
INITS = ("orthogonal", "pissa", "pissa_niter_<k>")


@dataclass
class AdaLoRAConfig:
    """AdaLoRA knobs; the paper symbol is in each comment.

    Worked example of the schedule (defaults on the packaged ``mr`` task, T = 266 steps,
    36 adapted matrices): b(0) = 12 * 36 = 432 triplets, b(T) = 8 * 36 = 288;
    t_i = round(0.1 T) = 27, t_f = round(0.3 T) = 80; every ΔT = 10 steps between them the
    budget follows the cubic decay (b(60) = 359); from step 186 = T - t_f the pattern is
    fixed at 288 and the pruned triplets are physically removed.
    """

    name: str = "adalora"
    target_modules: Optional[list] = None  # regex name suffixes; None = architecture default
    init_r: int = 12  # initial rank of every matrix; b(0) = init_r x #matrices
    target_r: float = 8.0  # average final rank per matrix: b(T) = target_r x #matrices
    target_total_rank: Optional[int] = None  # b(T) as a total rank instead of target_r
    # b(T) as final adapter parameters: each triplet costs out + in + 1 (with dora, the magnitudes' out
    # per matrix are taken off first)
    target_params: Optional[int] = None
    min_rank: int = 0  # per-matrix floor kept by every allocation (0 lets a matrix vanish)
    max_rank: Optional[int] = None  # per-matrix cap, None = init_r
    warmup_steps: float = 0.1  # t_i: steps (>= 1) or fraction of T (< 1) before any pruning
    final_steps: float = 0.3  # t_f: steps or fraction of T trained at the fixed final pattern
    mask_interval: int = 10  # ΔT: steps between two allocations
    beta1: float = 0.85  # β1: EMA of sensitivity (eq. 8)
    beta2: float = 0.85  # β2: EMA of uncertainty (eq. 9)
    score: str = "adalora"  # adalora (Ī·Ū, eq. 7) | sensitivity (Ī) | magnitude (|λ|): Tables 4-5
    orth_reg_weight: float = 0.5  # γ (eq. 4 weight)
    orth_squared: bool = True  # ||·||_F^2 as eq. 4 prints; False = peft's unsquared norm
    alpha: Optional[float] = None  # scale numerator; None = 2 * init_r (scaling 2, see ``SVDLinear``)
    rslora: bool = False  # scale by alpha / sqrt(init_r) instead of alpha / init_r
    # λ's learning rate is train.lr x this. λ starts at 0 and P, Q only get gradients
    # through λ, so with one shared Adam lr the update starts r scalars per matrix slow
    # while LoRA's B trains out x r entries from step 0 (as LoRA+ gives B a larger lr).
    lambda_lr_ratio: float = 64.0
    # Zero the Adam first moment (momentum) of pruned λ at each allocation, so a masked
    # triplet regrows from fresh gradients only; the second moment is kept (zeroing it would
    # make the next Adam step ~3x larger than usual, not smaller).
    reset_pruned_momentum: bool = False
    dropout: float = 0.0
    shrink: str = "final"  # remove pruned triplets: at the final allocation | at every one | never
    layers: Optional[list] = None  # restrict to these block indices (None = all)
    # orthogonal | pissa | pissa_niter_<k> (INITS): pissa starts P Λ Q at W0's top init_r singular
    # triplets (λ = S / s), the residual in the base; a pruned triplet then removes that part of W0
    init: str = "orthogonal"
    # DoRA (Liu et al. 2024) on P Λ Q: W' = m (W0 + s P Λ Q) / ||W0 + s P Λ Q||_c, m (out,) trained and
    # never pruned: its out parameters per matrix are outside the triplet budget, and target_params
    # (the final adapter parameters) pays for them first
    dora: bool = False

    def validate(self) -> None:
        check = checker("method")
        if self.init in ("olora", "gaussian", "kaiming"):
            raise ConfigError(
                f"method.init: '{self.init}' initialises LoRA's A and B, which have no P Λ Q (SVD) form; "
                f"AdaLoRA takes one of {list(INITS)} (use method=lora for {self.init})"
            )
        check_init(self.init, INITS)

        check(self.init_r >= 1, "init_r", f"must be >= 1, got {self.init_r}")
        n_targets = sum(v is not None for v in (self.target_total_rank, self.target_params))
        check(n_targets <= 1, "target_total_rank", "set at most one of target_total_rank and target_params")
        if n_targets == 0:
            check(
                0 < self.target_r < self.init_r,
                "target_r",
                f"the final average rank must be in (0, init_r={self.init_r}), got {self.target_r}; "
                "raise method.init_r or lower method.target_r",
            )
        check(
            self.target_total_rank is None or self.target_total_rank > 0, "target_total_rank", "must be > 0"
        )
        check(self.target_params is None or self.target_params > 0, "target_params", "must be > 0")
        check(0 <= self.min_rank <= self.init_r, "min_rank", f"must be in [0, init_r={self.init_r}]")
        check(
            self.max_rank is None or self.min_rank <= self.max_rank,
            "max_rank",
            f"must be >= min_rank={self.min_rank} (or null for init_r)",
        )
        check(self.mask_interval >= 1, "mask_interval", f"ΔT must be >= 1, got {self.mask_interval}")
        check(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
        check(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")
        check(self.score in SCORES, "score", f"unknown score '{self.score}'; use one of {SCORES}")
        check(self.shrink in SHRINK, "shrink", f"unknown '{self.shrink}'; use one of {SHRINK}")
        check(self.lambda_lr_ratio > 0, "lambda_lr_ratio", "must be > 0 (1 = same lr as P and Q)")
        check(self.orth_reg_weight >= 0, "orth_reg_weight", "must be >= 0")
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0 (steps, or a fraction of T below 1)")
        check(self.final_steps >= 0, "final_steps", "must be >= 0 (steps, or a fraction of T below 1)")


class SVDLinear(nn.Module):
    """y = W0 x + b + s * P diag(λ) Q x  (AdaLoRA eq. 3), wrapping a frozen linear layer.

    Init: λ = 0, so the wrapped layer computes exactly the pretrained function at step 0;
    P has orthonormal columns and Q orthonormal rows, i.e. the factors start on the
    manifold that the orthogonal penalty (eq. 4) pulls them to, and λ are then true
    singular values of ΔW / s. peft draws P, Q ~ N(0, 0.02) instead, which makes each
    λ_i act on ΔW through |P_:i||Q_i:| ~ 0.1-0.3 and so needs a 4x larger learning rate
    than LoRA (docs/reference.md); unit-norm factors train at LoRA's learning rates.

    Scaling s = alpha / r_initial, fixed for the whole run (rslora: alpha / sqrt(r_initial)).
    It is not tied to the current rank: pruning zeroes λ_i, and rescaling the surviving
    triplets by r_init / r_now would jump the function at every allocation (the author
    reports it hurt, QingruZhang/AdaLoRA#12).
    """

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base)
        weight = base.weight
        dev, dt = (
            weight.device,
            torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype,
        )
        self.P = nn.Parameter(torch.empty(self.out_features, r, device=dev, dtype=dt))  # (out, r)
        self.lam = nn.Parameter(torch.zeros(r, device=dev, dtype=dt))  # (r,) Λ
        self.Q = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=dt))  # (r, in)
        nn.init.orthogonal_(self.P)
        nn.init.orthogonal_(self.Q)
        self.scaling = scaling
        self.r_initial = r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # PiSSA (``init_from_base_``): the triplets at init, s P0 Λ0 Q0 = what was taken out of W0
        # (None: W0 untouched); never shrunk, not saved (recomputed from W0 by ``apply``)
        self.register_buffer("P0", None, persistent=False)  # (out, init_r)
        self.register_buffer("lam0", None, persistent=False)  # (init_r,)
        self.register_buffer("Q0", None, persistent=False)  # (init_r, in)

    @property
    def rank(self) -> int:
        return self.lam.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        out = self.base(x2)  # (N, out), a fresh tensor that autograd does not save
        if self.rank == 0:
            return out.view(*x.shape[:-1], self.out_features)
        h = F.linear(self.dropout(x2).to(self.Q.dtype), self.Q)  # (N, r)
        # Λ is folded into P (out x r) rather than applied to the (N, r) activations, so only
        # h is saved for backward; the sum and s are fused into one in-place GEMM on out.
        p_lam = self.P * self.lam  # (out, r)
        if out.dtype == p_lam.dtype:
            out.addmm_(h, p_lam.t(), alpha=self.scaling)
        else:
            out = out + (self.scaling * (h @ p_lam.t())).to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)  # (..., out)

    def low_rank(self) -> torch.Tensor:
        """s P diag(λ) Q, (out, in) (nn.Linear layout)."""
        return self.scaling * (self.P * self.lam) @ self.Q

    def delta_weight(self) -> torch.Tensor:
        """ΔW in nn.Linear layout (out, in): what merging adds to W0."""
        return self.low_rank()

    @torch.no_grad()
    def shrink_(self, keep: torch.Tensor) -> list[tuple[nn.Parameter, nn.Parameter, int, torch.Tensor]]:
        """Keep only the triplets ``keep`` (indices); returns (old, new, dim, index) per factor."""
        moves = []
        for name, dim in (("P", 1), ("lam", 0), ("Q", 0)):
            old = getattr(self, name)
            # A factor emptied by the shrink takes no gradient: it leaves DDP's reducer and AdamW alone.
            new = nn.Parameter(
                old.index_select(dim, keep).clone(), requires_grad=old.requires_grad and keep.numel() > 0
            )
            setattr(self, name, new)
            moves.append((old, new, dim, keep))
        return moves

    @torch.no_grad()
    def init_from_base_(self, init: str) -> None:
        """PiSSA on P Λ Q (Meng et al. 2024, in AdaLoRA's SVD form): W0 = U S Vᵀ, P = U_r, λ = S_r / s,
        Q = V_rᵀ, so s P Λ Q is W0's principal part, W0 - s P Λ Q stays in the base, P and Q start
        orthonormal (where eq. 4 pulls them) and λ are W0's own singular values / s."""
        niter = int(init.rsplit("_", 1)[1]) if init.startswith("pissa_niter_") else None
        w = dense_weight(self.base).to(self.P.dtype)  # (out, in)
        u, sv, vh = principal_triplets(w, self.rank, niter)
        self.P.copy_(u)
        self.lam.copy_(sv / self.scaling)
        self.Q.copy_(vh)
        self.P0, self.lam0, self.Q0 = (t.detach().clone() for t in (self.P, self.lam, self.Q))
        residual = w - self.low_rank()  # W0 - s P0 Λ0 Q0, (out, in)
        self.base.weight.copy_(residual.T if self.fan_in_fan_out else residual)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.rank}/{self.r_initial}, "
            f"s={self.scaling:g}"
        )


class DoRASVDLinear(DoRA, SVDLinear):
    """DoRA on AdaLoRA: ``lora.DoRA`` with ΔW = s P Λ Q, the direction's low-rank change.

    m starts at ||W0 + s P Λ Q||_c (λ = 0: ||W0||_c; after PiSSA the residual's plus the principal
    part's, again ||W0||_c), so the layer starts as the base layer. Pruning zeroes or removes
    triplets, never m: a matrix shrunk to rank 0 still rescales W0's rows (ΔW = (m/||W0||_c - 1) W0).
    """

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, r, scaling, dropout)
        self.init_magnitude()

    def low_rank_x(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x.to(self.Q.dtype), self.Q)  # (..., r)
        return self.scaling * F.linear(h, self.P * self.lam)  # s P Λ Q x, (..., out)


def magnitude_params(shape, dora: bool) -> int:
    """DoRA's magnitude of one matrix: out parameters (0 without DoRA); never pruned."""
    return shape.out_features if dora else 0


def scaling_of(cfg: AdaLoRAConfig) -> float:
    alpha = cfg.alpha if cfg.alpha is not None else 2.0 * cfg.init_r
    return alpha / (math.sqrt(cfg.init_r) if cfg.rslora else cfg.init_r)


def apply(model: nn.Module, cfg: AdaLoRAConfig, layers: list[int] | None = None) -> dict[str, SVDLinear]:
    """Wrap the target linear layers in ``SVDLinear``; returns {module name: wrapper}."""
    layers = layers if layers is not None else cfg.layers
    patterns = resolve_targets(model, cfg.target_modules, "method.target_modules")
    names = find_targets(model, patterns, "method.target_modules", layers)
    init = getattr(cfg, "init", "orthogonal")
    if rewrites_base(init):  # refused before any layer is touched
        from adabudget.quantize import is_quantized

        quantized = [n for n in names if is_quantized(model.get_submodule(n))]
        if quantized:
            raise ConfigError(
                f"method.init={init}: leaves W0 - s P Λ Q in the base weights, which model.quantize stores "
                f"frozen in 4 bits ({quantized[0]}); use model.quantize=null or method.init=orthogonal"
            )
    wrapped = {}
    for name in names:
        base = model.get_submodule(name)
        # W0 is frozen with the backbone (freeze_backbone); its bias is left alone, so that
        # BitFit or layer freezing applied before in the same group keeps training it.
        base.weight.requires_grad_(False)
        dora = getattr(cfg, "dora", False)
        wrapped[name] = (DoRASVDLinear if dora else SVDLinear)(base, cfg.init_r, scaling_of(cfg), cfg.dropout)
        if rewrites_base(init):
            wrapped[name].init_from_base_(init)
            if dora:
                wrapped[name].reset_magnitude_()  # m = ||W0 - s P0 Λ0 Q0 + s P0 Λ0 Q0||_c = ||W0||_c
        set_module(model, name, wrapped[name])
    return wrapped


def triplet_cost(shape) -> int:
    """Parameters of one triplet (a column of P, one λ, a row of Q) of a matrix: in + out + 1.
    ``shape``: anything with ``in_features`` and ``out_features`` (a linear, an ``SVDLinear``,
    an ``arch`` shape)."""
    return shape.in_features + shape.out_features + 1


def count(cfg: AdaLoRAConfig, arch, layers: list[int] | None = None) -> int:
    """init_r (in + out + 1) per adapted matrix (P, Λ, Q) at the start of training, + out (DoRA's m)."""
    layers = layers if layers is not None else cfg.layers
    patterns = cfg.target_modules or arch.default_targets()
    shapes = list(arch.match_linears(patterns, layers))
    init = getattr(cfg, "init", "orthogonal")
    small = [
        (n, s) for n, s in shapes if rewrites_base(init) and cfg.init_r > min(s.in_features, s.out_features)
    ]
    if small:
        n, s = small[0]
        raise ConfigError(
            f"method.init_r={cfg.init_r}: method.init={init} takes init_r principal triplets of W0, but {n} "
            f"({s.out_features} x {s.in_features}) has only {min(s.in_features, s.out_features)}; "
            "lower method.init_r"
        )
    dora = getattr(cfg, "dora", False)
    return sum(cfg.init_r * triplet_cost(s) + magnitude_params(s, dora) for _, s in shapes)


def kept_params(ranks: dict[str, int], shapes: dict) -> int:
    """Adapter parameters the kept triplets hold: r (in + out + 1) per matrix, + out for a DoRA layer's
    magnitude (``shapes``: name -> layer)."""
    return sum(
        r * triplet_cost(shapes[n]) + magnitude_params(shapes[n], isinstance(shapes[n], DoRASVDLinear))
        for n, r in ranks.items()
    )


@dataclass(frozen=True)
class Budget:
    """One run's rank budget: ``costs[i]`` is what a triplet of matrix i costs (1, or its parameters
    when the budget is in parameters), ``initial`` = b(0), ``target`` = b(T)."""

    costs: list[int]
    initial: int
    target: int
    field: str  # the knob b(T) came from, named in errors


def check_budget(cfg: AdaLoRAConfig, matrices: list[tuple[object, int]]) -> Budget:
    """The one budget rule, before any training: b(T) must lie in (0, b(0)) and within what
    ``min_rank`` / ``max_rank`` allow. ``matrices``: (shape, initial rank) per adapted matrix.
    Pure: the allocator calls it on its layers, the search on a configuration's shapes."""
    n = len(matrices)
    if not n:
        raise ConfigError("method.target_modules: AdaLoRA matches no linear layer here")
    by_params = cfg.target_params is not None
    costs = [triplet_cost(s) if by_params else 1 for s, _ in matrices]
    initial = sum(c * r for c, (_, r) in zip(costs, matrices))  # b(0)
    if by_params:  # the final adapter parameters, less DoRA's magnitudes (never pruned)
        target, field = int(cfg.target_params), "method.target_params"
        fixed = sum(magnitude_params(s, getattr(cfg, "dora", False)) for s, _ in matrices)
        if fixed and target <= fixed:
            raise ConfigError(
                f"method.target_params={target}: DoRA's magnitudes alone hold {fixed} parameters "
                f"({n} matrices x out); raise method.target_params or set method.dora=false"
            )
        target -= fixed
    elif cfg.target_total_rank is not None:
        target, field = int(cfg.target_total_rank), "method.target_total_rank"
    else:  # b(T) from target_r x #matrices
        target, field = int(round(cfg.target_r * n)), "method.target_r"
    if not 0 < target < initial:
        raise ConfigError(
            f"{field}: the final budget b(T)={target} must be > 0 and below the initial budget "
            f"b(0)={initial} ({n} matrices x init_r={cfg.init_r}); lower the target or raise method.init_r"
        )
    floor = sum(c * min(cfg.min_rank, r) for c, (_, r) in zip(costs, matrices))
    if target < floor:
        raise ConfigError(
            f"method.min_rank: {n} matrices x min_rank={cfg.min_rank} need {floor} > b(T)={target}; "
            "lower method.min_rank or raise the target"
        )
    cap = cfg.max_rank if cfg.max_rank is not None else cfg.init_r
    ceiling = sum(c * min(cap, r) for c, (_, r) in zip(costs, matrices))
    if target > ceiling:
        raise ConfigError(
            f"method.max_rank: {n} matrices x max_rank={cap} hold only {ceiling} < b(T)={target}; "
            "raise method.max_rank or lower the target"
        )
    return Budget(costs, initial, target, field)


def param_groups(model: nn.Module, cfg, lr: float) -> list[dict]:
    """AdamW groups of ``model``'s trainable parameters: ``[rest, λ]``, the λ of every ``SVDLinear``
    at ``lr x cfg.lambda_lr_ratio`` and everything else at ``lr``; one group when ``cfg`` has no
    ratio (no AdaLoRA in the run: ``cfg`` None). The one rule for ``adabudget.training``, the Trainer
    callback's ``adalora_optimizer`` and the bench."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if getattr(cfg, "lambda_lr_ratio", None) is None:
        return [{"params": trainable}]
    lam_ids = {id(m.lam) for m in model.modules() if isinstance(m, SVDLinear)}
    rest = [p for p in trainable if id(p) not in lam_ids]
    lam = [p for p in trainable if id(p) in lam_ids]
    return [{"params": rest}, {"params": lam, "lr": lr * cfg.lambda_lr_ratio}]


@torch.no_grad()
def merge(model: nn.Module, modules: dict[str, SVDLinear]) -> None:
    """W0 += s P diag(λ) Q (transposed for Conv1D), then put the base layer back."""
    for name, layer in modules.items():
        if not isinstance(layer, SVDLinear):  # ``modules`` may hold other methods' modules too
            continue
        delta = layer.delta_weight()  # (out, in); 0 at rank 0, but DoRA's m still rescales W0 there
        layer.base.weight.add_((delta.T if layer.fan_in_fan_out else delta).to(layer.base.weight.dtype))
        set_module(model, name, layer.base)


def orth_penalty(layers: list[SVDLinear], squared: bool = True) -> torch.Tensor:
    """R(P, Q) = ||PᵀP - I||²_F + ||QQᵀ - I||²_F, averaged over the adapted matrices (eq. 4).

    ``squared=False`` gives peft's and the original code's unsquared Frobenius norms.
    Factors sharing their non-rank dimension are stacked (zero-padded to the largest rank
    after a shrink), so the whole penalty is a few batched matmuls whatever the ranks.
    """
    groups: dict[tuple[str, int], list[torch.Tensor]] = {}
    for layer in layers:
        if layer.rank == 0:
            continue
        groups.setdefault(("P", layer.out_features), []).append(layer.P)
        groups.setdefault(("Q", layer.in_features), []).append(layer.Q)
    if not groups:
        return torch.zeros(())
    total = sum(_OrthGroup.apply(kind == "P", squared, *mats) for (kind, _), mats in groups.items())
    return total / max(1, len(layers) if squared else 2 * len(layers))  # peft: mean over every P and Q


class _OrthGroup(torch.autograd.Function):
    """Σ_i ||G_i - I||_F (squared or not) over one group of factors, G_i = PᵢᵀPᵢ or QᵢQᵢᵀ.

    Autograd through the stacked gram would run two batched matmuls and their sum in
    backward; the closed form needs one: ∂||D||²/∂P = 4 P D and ∂||D||/∂P = 2 P D / ||D||
    with D = PᵀP - I symmetric (for Q: 4 D Q and 2 D Q / ||D||), and 0 where ||D|| = 0,
    as ``matrix_norm`` defines it.
    """

    @staticmethod
    def forward(ctx, is_p: bool, squared: bool, *mats: torch.Tensor) -> torch.Tensor:
        ranks = [m.shape[1] if is_p else m.shape[0] for m in mats]
        rmax = max(ranks)
        if min(ranks) == rmax:
            stacked = torch.stack(mats)  # (n, out, r) or (n, r, in)
            eye = torch.eye(rmax, device=stacked.device, dtype=stacked.dtype)
        else:  # zero-pad to rmax: padded columns give zero rows/cols of G, matched by a zero eye entry
            shape = (len(mats), mats[0].shape[0], rmax) if is_p else (len(mats), rmax, mats[0].shape[1])
            stacked = mats[0].new_zeros(shape)
            for i, (m, r) in enumerate(zip(mats, ranks)):
                (stacked[i, :, :r] if is_p else stacked[i, :r]).copy_(m)
            valid = (
                torch.arange(rmax, device=stacked.device)
                < torch.tensor(ranks, device=stacked.device)[:, None]
            )
            eye = torch.diag_embed(valid.to(stacked.dtype))  # (n, rmax, rmax)
        # In the factors' own dtype even under autocast: backward multiplies D with the stacked
        # factors outside any autocast region, and R's small deviations need fp32 anyway.
        with torch.autocast(stacked.device.type, enabled=False):
            gram = stacked.mT @ stacked if is_p else stacked @ stacked.mT  # (n, r, r)
        diff = gram.sub_(eye)  # D
        if squared:
            value = diff.pow(2).sum()
            scale = None
        else:
            norms = torch.linalg.matrix_norm(diff)  # (n,)
            value = norms.sum()
            scale = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))[:, None, None]
        ctx.save_for_backward(stacked, diff, scale)
        ctx.is_p, ctx.squared, ctx.ranks = is_p, squared, ranks
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        stacked, diff, scale = ctx.saved_tensors
        factor = diff * (grad_out * 4.0) if ctx.squared else diff * (scale * (grad_out * 2.0))  # (n, r, r)
        grad = stacked @ factor if ctx.is_p else factor @ stacked  # (n, out, r) or (n, r, in)
        grads = grad.unbind(0)
        if min(ctx.ranks) < grad.shape[2 if ctx.is_p else 1]:  # padded: drop the padding
            grads = [g[:, :r] if ctx.is_p else g[:r] for g, r in zip(grads, ctx.ranks)]
        return (None, None, *grads)
