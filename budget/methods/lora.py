"""LoRA (Hu et al., 2022): W = W0 + (alpha / r) B A, B zero-initialised.

The variants peft ships are knobs of ``method=lora`` (the maths, papers and peft's code they follow:
docs/methods.md#lora-variants-dora-rslora-pissa-olora): ``rslora`` (s = alpha / sqrt(r)), ``dora``
(``DoRALinear``: a magnitude m (out,) times the normalised direction of W0 + s B A) and ``init``
(``gaussian``; ``pissa`` / ``olora``: A, B from W0's principal triplets or its QR, the residual
W0 - s B A left in the base and A0, B0 kept, so the peft export is a plain LoRA on the untouched base;
``eva``: A from the principal components of each layer's inputs, set by ``EVAHooks.calibrate``).

``LoRALinear`` is the plain layer; its consumers subclass it: ``SlicedLoRALinear`` (here) computes
with its first r rank-one components, A[:r] and B[:, :r] (views, no copy), keeping its scaling
(``set_active(layer, r)``): DyLoRA's layers run at a sampled rank, and a weight-sharing supernet
(``search.supernet``) trains one R-wide layer for every smaller rank at once; a stand-alone layer
of rank r holding those rows and columns computes the same function. Delta-LoRA's and UniPELT's
gated layers are subclasses in their own method files.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from adabudget.config import ConfigError
from adabudget.methods.hooks import MethodHooks
from adabudget.modules import find_targets, linear_shape, resolve_targets, set_module
from torch import nn

# A's initialisation: kaiming (peft's default, init_lora_weights=True), gaussian (N(0, 1/r), peft's
# "gaussian"), those that rewrite W0: pissa (principal singular triplets; pissa_niter_<k>: the fast
# randomised SVD with k subspace iterations, as peft's) and olora (QR), and the data-driven eva (A from
# the principal components of the layer's inputs on training batches, set by ``EVAHooks.calibrate``)
INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_<k>", "olora", "eva")
DATA_DRIVEN = ("lora_ga",)  # the other data-driven initialisation, not built


def rewrites_base(init: str) -> bool:
    """Whether ``init`` moves part of W0 into the adapter (W0 - s B A stays in the base)."""
    return init in ("pissa", "olora") or _niter(init) is not None


def _niter(init: str) -> int | None:
    m = re.fullmatch(r"pissa_niter_(\d+)", init)
    return int(m.group(1)) if m else None


def check_init(init: str, allowed: tuple[str, ...], field: str = "method.init") -> None:
    """A ConfigError naming ``field`` unless ``init`` is one of ``allowed`` (``pissa_niter_<k>``
    stands for every k >= 1)."""
    ok = init in allowed or ("pissa_niter_<k>" in allowed and (_niter(init) or 0) >= 1)
    if ok:
        return
    hint = ""
    if init in DATA_DRIVEN:
        hint = " (the data-driven initialisation LoRA-GA is not built; EVA is, on method=lora)"
    raise ConfigError(f"{field}: unknown initialisation '{init}'{hint}; use one of {list(allowed)}")


@dataclass
class LoRAConfig:
    name: str = "lora"
    target_modules: Optional[list] = None  # regex name suffixes; None = architecture default
    r: int = 8
    alpha: float = 16.0
    rslora: bool = False  # alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023)
    # DoRA (Liu et al. 2024): W' = m (W0 + s B A) / ||W0 + s B A||_c, m (out,) trained, the norm detached
    dora: bool = False
    init: str = "kaiming"  # kaiming | gaussian | pissa | pissa_niter_<k> | olora | eva (INITS)
    # EVA: a layer's components count as converged when each has cosine similarity >= eva_tau (τ) with
    # the previous batch's; at most eva_batches training batches are read
    eva_tau: float = 0.99
    eva_batches: int = 64
    dropout: float = 0.0
    layers: Optional[list] = None  # restrict to these block indices (None = all)

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"method.r: must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"method.dropout: must be in [0, 1), got {self.dropout}")
        check_init(self.init, INITS)
        if not 0 < self.eva_tau <= 1:
            raise ConfigError(f"method.eva_tau: must be in (0, 1] (a cosine similarity), got {self.eva_tau}")
        if self.eva_batches < 2:
            raise ConfigError(
                f"method.eva_batches: must be >= 2 (convergence compares two batches), got {self.eva_batches}"
            )


class LoRALinear(nn.Module):
    """y = W0 x + b + s B A x with A (r, in) Kaiming-uniform and B (out, r) zero (peft's init)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base)
        dev = base.weight.device
        dt = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        self.A = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=dt))  # (r, in)
        self.B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dt))  # (out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # PiSSA / OLoRA: the factors at init, s B0 A0 = what was taken out of W0 (None: W0 untouched);
        # not saved: ``apply`` recomputes them from W0, deterministically
        self.register_buffer("A0", None, persistent=False)  # (r, in)
        self.register_buffer("B0", None, persistent=False)  # (out, r)
        # (alpha, rslora) of a layer built by method=lora: the peft export writes them as lora_alpha
        # and use_rslora instead of folding s into B (None: a consumer's layer, s is folded)
        self.peft_alpha: tuple[float, bool] | None = None
        self.eva = False  # built with init=eva: ``EVAHooks`` sets A from data before training

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        A, B = self.factors()  # (r, in), (out, r)
        h = self.down(x, A)  # (..., r)
        if out.dtype == h.dtype == B.dtype:  # (autocast leaves h in bf16 beside an fp32 B)
            # out += s h Bᵀ in one fused GEMM (as SVDLinear does), no (..., out) temporary
            return (
                out.view(-1, out.shape[-1])
                .addmm_(h.reshape(-1, h.shape[-1]), B.t(), alpha=self.scaling)
                .view(out.shape)
            )
        return out + (F.linear(h, B) * self.scaling).to(out.dtype)

    def down(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """A x after dropout, (..., r): what B maps back up (UniPELT's layer gates it)."""
        return F.linear(self.dropout(x).to(A.dtype), A)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) the layer computes with: (r, in), (out, r)."""
        return self.A, self.B

    def delta_weight(self) -> torch.Tensor:
        """ΔW in nn.Linear layout (out, in) (of the factors in use)."""
        a, b = self.factors()
        return self.scaling * b @ a

    def peft_factors(self, fold: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') with B' A' the layer's whole change of the ORIGINAL W0, the scale folded into
        B' (``fold=False``: not, s B' A' is the change): what a peft LoRA adapter holds
        (``adabudget.export.export_peft_adapter``). After PiSSA / OLoRA the change is
        s (B A - B0 A0) = s [B, -B0] [A; A0], rank 2r (peft's ``subtract_mutated_init``)."""
        a, b = self.factors()
        if self.A0 is not None:
            a, b = torch.cat([a, self.A0]), torch.cat([b, -self.B0], dim=1)  # (2r, in), (out, 2r)
        return (a, b * self.scaling) if fold else (a, b)


def dense_weight(base: nn.Module) -> torch.Tensor:
    """W0 of a linear layer in nn.Linear layout (out, in): Conv1D's transposed, a 4-bit one dequantised."""
    w = base.weight
    if hasattr(w, "get_original_weight"):  # NF4 (model.quantize=nf4)
        w = w.get_original_weight()
    _, _, fan_in_fan_out = linear_shape(base)
    return w.T if fan_in_fan_out else w


class DoRA:
    """DoRA (Liu et al. ICML 2024, eq. 5) over a layer whose weight change is low rank:
    y = m ⊙ (W0 + ΔW) x / ||W0 + ΔW||_c + b, with ``low_rank()`` = ΔW (out, in) and ``low_rank_x(x)``
    = ΔW x (..., out) from the layer it is mixed into (LoRA's s B A: ``DoRALinear``; AdaLoRA's
    s P Λ Q: ``adalora.DoRASVDLinear``).

    ``magnitude`` m (out,) starts at ||W0 + ΔW||_c (per output row: the norm over the input
    dimension of the (out, in) weight, peft's ``get_weight_norm``), so the layer starts as the base
    layer. The norm is recomputed every forward and detached from the graph (section 4.3: it gets no
    gradient), as peft's ``DoraLinearLayer`` does. With dropout active the dropped-out x feeds both
    the W0 and the ΔW parts of the rescaled term, as in peft. A layer of rank 0 (AdaLoRA pruned it
    away) still rescales W0's rows by its m.
    """

    def init_magnitude(self) -> None:
        self.magnitude = nn.Parameter(self.weight_norm())  # (out,) m

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W0 + ΔW||_c, (out,), detached."""
        delta = self.low_rank()  # (out, in)
        return torch.linalg.vector_norm(dense_weight(self.base).to(delta.dtype) + delta, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # W0 x + b, (..., out)
        bias = getattr(self.base, "bias", None)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            xd, w0x = x, (out if bias is None else out - bias)  # W0 x
        else:
            xd = self.dropout(x)
            w0x = F.linear(xd, dense_weight(self.base).to(out.dtype))  # W0 x_d
        scale = self.magnitude / self.weight_norm()  # (out,) m / ||W0 + ΔW||_c
        # out + (m/n - 1) W0 x + (m/n) ΔW x = (m/n) (W0 + ΔW) x + b
        change = (scale - 1) * w0x
        if self.rank > 0:
            change = change + scale * self.low_rank_x(xd)
        return out + change.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """W' - W0 = (m/n - 1) W0 + (m/n) ΔW, (out, in): what merging adds to W0."""
        delta = self.low_rank()
        w = dense_weight(self.base).to(delta.dtype)  # (out, in)
        merged = w + delta
        return (self.magnitude / torch.linalg.vector_norm(merged, dim=1))[:, None] * merged - w

    @torch.no_grad()
    def reset_magnitude_(self) -> None:
        """m = ||W0 + ΔW||_c: the layer computes W0 + ΔW (after an initialisation moved W0 and ΔW)."""
        self.magnitude.copy_(self.weight_norm())


class DoRALinear(DoRA, LoRALinear):
    """DoRA on LoRA: ΔW = s B A (``DoRA``)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, r, scaling, dropout)
        self.init_magnitude()

    def low_rank(self) -> torch.Tensor:
        a, b = self.factors()
        return self.scaling * (b @ a)  # (out, in)

    def low_rank_x(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return F.linear(F.linear(x.to(a.dtype), a), b) * self.scaling  # s B A x, (..., out)


@torch.no_grad()
def principal_triplets(w: torch.Tensor, r: int, niter: int | None = None):
    """(U_r (out, r), S_r (r,), Vh_r (r, in)) of w (out, in): the r largest singular triplets,
    by a full SVD, or (``niter``) torch's randomised ``svd_lowrank`` with that many subspace
    iterations, as peft's ``pissa_niter_<k>``; its random start is drawn from a fixed seed, so
    every build (a resumed run, ``load_adapter``) finds the same triplets."""
    if niter is None:
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r], sv[:r], vh[:r]
    devices = [w.device] if w.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        u, sv, v = torch.svd_lowrank(w, q=r, niter=niter)
    return u, sv, v.T


@torch.no_grad()
def initialise_(layer: LoRALinear, init: str) -> None:
    """Set A, B by ``init`` (``INITS``); PiSSA and OLoRA leave W0 - s B A in the base and keep A0, B0.

    PiSSA (Meng et al., NeurIPS 2024; peft's ``pissa_init``): W0 = U S Vᵀ, A = sqrt(S_r / s) V_rᵀ,
    B = U_r sqrt(S_r / s), so s B A = U_r S_r V_rᵀ, the principal part of W0. OLoRA (Büyükakyüz 2024;
    peft's ``olora_init``): W0 = Q R, B = Q[:, :r], A = R[:r] (peft does not divide by s there: the
    adapter starts at s Q_r R_r, which the residual removes again).
    """
    if init in ("kaiming", "eva"):  # eva: A is set from data by ``EVAHooks.calibrate``
        return
    if init == "gaussian":
        nn.init.normal_(layer.A, std=1 / layer.rank)  # peft's "gaussian"; B stays 0
        return
    r, s = layer.rank, layer.scaling
    w = dense_weight(layer.base).to(layer.A.dtype)  # (out, in)
    if init == "olora":
        q, rr = torch.linalg.qr(w)  # (out, k), (k, in), k = min(out, in)
        a, b = rr[:r], q[:, :r]
    else:
        u, sv, vh = principal_triplets(w, r, _niter(init))
        root = (sv / s).sqrt()  # (r,)
        a, b = root[:, None] * vh, u * root  # (r, in), (out, r)
    layer.A.copy_(a)
    layer.B.copy_(b)
    layer.A0, layer.B0 = layer.A.detach().clone(), layer.B.detach().clone()
    residual = w - s * (layer.B @ layer.A)  # W0 - s B0 A0, (out, in)
    layer.base.weight.copy_(residual.T if layer.fan_in_fan_out else residual)


class SlicedLoRALinear(LoRALinear):
    """A ``LoRALinear`` built at rank R that computes with its first ``active`` components
    (``set_active``; None: all R, 0: the base layer alone)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, r, scaling, dropout)
        self.active: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active == 0:
            return self.base(x)
        return super().forward(x)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[:r], B[:, :r]) of the slice in use, views: (r, in), (out, r)."""
        if self.active is None:
            return self.A, self.B
        return self.A[: self.active], self.B[:, : self.active]


def set_active(layer: SlicedLoRALinear, r: int | None) -> dict[str, tuple]:
    """Compute with the first ``r`` rank-one components only (0: the base layer alone; None: all).

    The scaling stays: a stand-alone rank-r layer with the same s (alpha = s r) and the weights
    A[:r], B[:, :r] computes exactly this. Returns the index of each parameter's part in use,
    ``{"A": (slice(0, r),), "B": (slice(None), slice(0, r))}``, empty when off: the rest gets
    zero gradient and must not be updated (a supernet's masked optimizer reads this).
    """
    if not isinstance(layer, SlicedLoRALinear):
        raise TypeError(
            f"set_active: {type(layer).__name__} computes at its full rank; build it as a SlicedLoRALinear"
        )
    if r is not None and not 0 <= r <= layer.rank:
        raise ValueError(f"LoRA slice r={r} outside 0..{layer.rank}")
    layer.active = None if r is None or r == layer.rank else r
    r = layer.rank if r is None else r
    return {} if r == 0 else {"A": (slice(0, r),), "B": (slice(None), slice(0, r))}


def apply(
    model: nn.Module, cfg: LoRAConfig, layers: list[int] | None = None, layer_cls: type = LoRALinear
) -> dict[str, LoRALinear]:
    """Wrap every target in ``layer_cls`` (``LoRALinear`` or a subclass: the sliced, DyLoRA's,
    Delta-LoRA's and UniPELT's layers are built here too)."""
    layers = layers if layers is not None else cfg.layers
    patterns = resolve_targets(model, cfg.target_modules, "method.target_modules")
    scaling = cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)
    init, dora = getattr(cfg, "init", "kaiming"), getattr(cfg, "dora", False)
    if (dora or init != "kaiming") and layer_cls is not LoRALinear:
        raise TypeError(f"method.dora / method.init: {layer_cls.__name__} takes neither (method=lora does)")
    names = find_targets(model, patterns, "method.target_modules", layers)
    if rewrites_base(init):  # refused before any layer is touched
        from adabudget.quantize import is_quantized

        quantized = [n for n in names if is_quantized(model.get_submodule(n))]
        if quantized:
            raise ConfigError(
                f"method.init={init}: leaves W0 - s B A in the base weights, which model.quantize stores "
                f"frozen in 4 bits ({quantized[0]}); use model.quantize=null or method.init=kaiming"
            )
    wrapped = {}
    for name in names:
        base = model.get_submodule(name)
        # W0 is frozen with the backbone (freeze_backbone); its bias is left alone, so that
        # BitFit or layer freezing applied before in the same group keeps training it.
        base.weight.requires_grad_(False)
        layer = (DoRALinear if dora else layer_cls)(base, cfg.r, scaling, cfg.dropout)
        initialise_(layer, init)
        if dora:
            layer.reset_magnitude_()  # m = ||W0 + s B A||_c after the init: the base function
        if layer_cls is LoRALinear:
            layer.peft_alpha = (float(cfg.alpha), bool(cfg.rslora))
        layer.eva = init == "eva"
        wrapped[name] = layer
        set_module(model, name, layer)
    return wrapped


def count(cfg: LoRAConfig, arch, layers: list[int] | None = None) -> int:
    """r (in + out) per adapted matrix, + out (DoRA's magnitude m)."""
    layers = layers if layers is not None else cfg.layers
    patterns = cfg.target_modules or arch.default_targets()
    shapes = list(arch.match_linears(patterns, layers))
    init = getattr(cfg, "init", "kaiming")
    if rewrites_base(init):
        too_small = [(n, s) for n, s in shapes if cfg.r > min(s.in_features, s.out_features)]
        if too_small:
            n, s = too_small[0]
            raise ConfigError(
                f"method.r={cfg.r}: method.init={init} takes r principal directions of W0, but {n} "
                f"({s.out_features} x {s.in_features}) has only {min(s.in_features, s.out_features)}; "
                "lower method.r"
            )
    dora = getattr(cfg, "dora", False)
    return sum(cfg.r * (s.in_features + s.out_features) + (s.out_features if dora else 0) for _, s in shapes)


class IncrementalPCA:
    """Incremental PCA (Ross et al. 2008; scikit-learn's ``IncrementalPCA``) as peft's
    ``utils/incremental_pca.py`` runs it for EVA: ``lowrank=True``, ``svd_lowrank`` with q = 2k,
    4 subspace iterations and seed 42, signs fixed by ``svd_flip`` on the rows of Vᵀ; the same
    arithmetic and dtypes, so the components equal peft's on the same inputs.
    """

    def __init__(self, n_components: int, niter: int = 4, seed: int = 42):
        self.k, self.q, self.niter, self.seed = n_components, 2 * n_components, niter, seed
        self.components: torch.Tensor | None = None  # (k, in)
        self.singular_values: torch.Tensor | None = None  # (k,)
        self.mean: torch.Tensor | None = None  # (in,), float64
        self.seen = 0

    @torch.no_grad()
    def partial_fit(self, x: torch.Tensor) -> None:
        x = x.to(torch.float32).clone()  # (N, in)
        n = x.shape[0]
        total = self.seen + n
        last_sum = self.mean * self.seen if self.mean is not None else 0.0
        mean = (last_sum + x.sum(dim=0, dtype=torch.float64)) / total  # (in,) float64
        if self.components is None:
            x -= mean
        else:  # the previous fit's components stand for the data seen so far, plus a mean correction
            batch_mean = x.mean(dim=0)
            x -= batch_mean
            correction = math.sqrt(self.seen / total * n) * (self.mean - batch_mean)  # (in,)
            x = torch.vstack((self.singular_values[:, None] * self.components, x, correction))
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            _, sv, v = torch.svd_lowrank(x, q=self.q, niter=self.niter)
        vt = v.mH  # (q, in)
        signs = torch.sign(vt[torch.arange(vt.shape[0]), vt.abs().argmax(dim=1)])  # svd_flip on Vᵀ's rows
        vt = vt * signs[:, None]
        self.components, self.singular_values = vt[: self.k], sv[: self.k]
        self.mean, self.seen = mean, total


class EVAHooks(MethodHooks):
    """EVA (Paischer et al., "One Initialization to Rule them All: Fine-tuning via Explained Variance
    Adaptation", 2024; peft's ``initialize_lora_eva_weights``): before training, A of every layer built
    with ``init=eva`` becomes the top-r principal components (right singular vectors) of that layer's
    inputs over training batches, B stays 0, so the model still starts as the base model.

    As peft with ``rho=1`` (no rank redistribution: every layer keeps r, the count stays exact):
    incremental PCA per layer on the tokens the attention mask keeps (and, on a causal-LM batch, whose
    label is not -100: peft's ``use_label_mask``), one fit per batch until each of the r components
    has cosine similarity >= τ with the previous fit's, then that layer stops. peft reads its
    dataloader until every layer converged; here at most ``eva_batches`` (a layer not converged by
    then keeps its last components, and ``final`` says which).
    """

    def __init__(self, layers: dict[str, LoRALinear], tau: float, max_batches: int):
        self.layers, self.tau, self.max_batches = layers, tau, max_batches
        self.fits = dict.fromkeys(layers, 0)  # layer -> partial fits so far
        self.converged: dict[str, int] = {}  # layer -> the fits it took to converge
        self.unconverged: list[str] = []

    @torch.no_grad()
    def calibrate(self, loss_of, batches) -> None:
        model_of = self.layers
        pcas = {name: IncrementalPCA(layer.rank) for name, layer in model_of.items()}
        previous: dict[str, torch.Tensor] = {}
        active = set(model_of)
        keep: list[torch.Tensor] = []  # the current batch's token mask, (B, T) bool

        def hook(name):
            def fit(module, args, output):
                if name not in active:
                    return
                x = args[0][keep[0]]  # (N, in): the kept tokens, row-major
                if x.shape[0] < pcas[name].k:  # peft skips a batch with fewer tokens than components
                    return
                pcas[name].partial_fit(x)
                comps = pcas[name].components
                if name in previous and bool(
                    (F.cosine_similarity(comps, previous[name], dim=1) >= self.tau).all()
                ):
                    active.discard(name)
                    self.converged[name] = self.fits[name] + 1
                previous[name] = comps.clone()
                self.fits[name] += 1

            return fit

        handles = [layer.register_forward_hook(hook(name)) for name, layer in model_of.items()]
        modes = [(m, m.training) for m in model_of.values()]
        for layer in model_of.values():
            layer.eval()  # no dropout on the inputs the components are read from
        try:
            for batch in batches(self.max_batches):
                mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
                labels = batch.get("labels")
                if labels is not None and labels.shape == mask.shape:  # a causal-LM batch
                    mask = mask & (labels != -100)
                keep[:] = [mask]
                loss_of(batch)
                if not active:
                    break
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes:
                m.train(mode)
        for name, layer in model_of.items():
            if pcas[name].components is None:
                raise ValueError(f"method.init=eva: {name} saw no batch with >= {layer.rank} tokens")
            layer.A.copy_(pcas[name].components.to(layer.A.dtype))
        self.unconverged = sorted(active)

    def state_dict(self) -> dict:
        """What the calibration found (A itself is a trainable parameter): a resumed run, which does
        not calibrate again, reports it too."""
        return {"converged": dict(self.converged), "unconverged": list(self.unconverged)}

    def load_state_dict(self, state: dict) -> None:
        self.converged, self.unconverged = dict(state["converged"]), list(state["unconverged"])

    def final(self, evaluate) -> dict:
        """``eva``: per layer the partial fits it took to converge, and the layers that did not."""
        return {"eva": {"converged_after": self.converged, "unconverged": self.unconverged}}


def hooks(model: nn.Module, modules: dict[str, nn.Module], cfg) -> EVAHooks | None:
    """EVA's calibration (``EVAHooks``) for the layers built with ``init=eva``; None otherwise."""
    layers = {n: m for n, m in modules.items() if isinstance(m, LoRALinear) and m.eva}
    if getattr(cfg, "init", None) != "eva" or not layers:
        return None
    return EVAHooks(layers, cfg.eva_tau, cfg.eva_batches)


@torch.no_grad()
def merge(model: nn.Module, modules: dict[str, LoRALinear]) -> None:
    """W0 += s B A (transposed for Conv1D), then put the base layer back."""
    for name, layer in modules.items():
        if not isinstance(layer, LoRALinear):  # ``modules`` may hold other methods' modules too
            continue
        delta = layer.delta_weight()  # (out, in)
        layer.base.weight.add_((delta.T if layer.fan_in_fan_out else delta).to(layer.base.weight.dtype))
        set_module(model, name, layer.base)
