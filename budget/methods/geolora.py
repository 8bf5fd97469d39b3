"""GeoLoRA (Schotthöfer, Zangrando, Ceruti, Tudisco, Kusch, ICLR 2025, "GeoLoRA: Geometric
integration for parameter efficient fine-tuning", arXiv 2410.18720): a LoRA held as a low-rank
factorisation h = W0 x + s U S Vᵀ x with orthonormal U (out, r), V (in, r) and a small S (r, r),
trained by a rank-adaptive integrator instead of plain gradient steps on the factors. Each round:

1. the gradients of K = U S and L = V Sᵀ (∇_K = s G V, ∇_L = s Gᵀ U, G = ∂L/∂ΔW, one backward)
   augment the bases with the new directions, Û = orth([U, ∇_K]), V̂ = orth([V, ∇_L]) (rank r -> 2r,
   at most r_max);
2. S in the augmented basis: its old block after the coefficient step, the new blocks the
   projected gradient steps −λ Û_newᵀ ∇_K and −λ ∇_Lᵀ V̂_new, the corner 0;
3. truncation: the SVD S = P diag(d) Qᵀ keeps the smallest r' with ||d[r':]|| < τ ||d|| (at least
   ``min_rank``), U <- U P[:, :r'], V <- V Q[:, :r'], S <- diag(d[:r']).

So the rank of each matrix may grow (up to r_max) and shrink; its size emerges from τ. To sit at a
protocol level, ``target_params`` makes a final global cut (as SoRA's): the largest singular values
over all matrices kept while their components' parameters r_i (in + out) sum to at most the level,
at T - ``final_steps``; the ranks stay there to the end. The final adapter is a LoRA of per-matrix
ranks (A = Vᵀ, B = s U S): the peft export (rank_pattern) and the merge are LoRA's.

What was read of the authors' code and where this departs: docs/methods.md#geolora.

Invariants:

- ``count`` is what ``apply`` builds (r_max (in + out) + r_max² per matrix); the final adapter
  parameters are ``kept()["kept_params"]`` = Σ r_i (in + out) (the record's ``adapter_params_final``),
  at most ``target_params`` after the cut.
- U and V move only by the integrator (the loop's optimizer sees zero gradients for them and its
  weight decay is undone), so their active columns stay orthonormal; S is the optimizer's.
- A truncation leaves ΔW = s U S Vᵀ as the sum of the kept singular triplets of the one before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from adabudget.config import ConfigError, checker
from adabudget.methods import lora
from adabudget.methods.hooks import MethodHooks, kept_with_cut, restore_ranks
from adabudget.methods.lora import LoRALinear
from adabudget.modules import find_targets, resolve_targets, set_module
from adabudget.schedule import steps_from
from torch import nn


@dataclass
class GeoLoRAConfig:
    """GeoLoRA knobs; the paper symbol in each comment.

    Worked example: r_max = 16 on MiniLM's 36 default matrices (24 of 384 x 384, 12 of 384 x 1536
    and 1536 x 384) builds 24 x (16 x 768 + 256) + 12 x (16 x 1920 + 256) = 672,768 parameters
    and starts at init_r = 8 (S = 0: the base model). Every round (basis_interval = 1: every step,
    the paper's Algorithm 1) a matrix of rank 8 is augmented to 16 and truncated by τ = 0.15:
    singular values d = (4, 2, 1, 0.5, 0.1) of ||d|| = 4.61 keep the first 3, since
    ||d[3:]|| = 0.51 < 0.15 x 4.61 = 0.69 and ||d[2:]|| = 1.12 is not. target_params = 200,000
    then keeps the largest singular values over all matrices while their r_i (in + out) (768 or
    1,920 each) sum to at most 200,000 at T - final_steps.
    """

    name: str = "geolora"
    target_modules: Optional[list] = None  # regex name suffixes; None = architecture default
    init_r: int = 8  # r_0: initial rank of every matrix (the authors' rank=8)
    r_max: int = 16  # r_max: the rank cap and the built size (the authors' max_rank)
    min_rank: int = 2  # a truncation keeps at least this many (the authors' rmin = 2)
    tau: float = 0.15  # τ: relative truncation tolerance, ||d[r':]|| < τ ||d|| (the authors' tau)
    # steps per round: augment at t % Δ == 0, truncate at t % Δ == Δ - 1 (S trains in the
    # augmented basis between); 1 = every step (Algorithm 1); the authors' GLUE trainer: 31
    basis_interval: int = 1
    alpha: float = 16.0  # s = alpha / init_r, fixed
    dropout: float = 0.0
    target_params: Optional[int] = None  # the level: final global cut to <= this many parameters
    final_steps: float = 0.0  # steps (or fraction of T) trained after the cut; 0: cut after the last step
    layers: Optional[list] = None  # restrict to these block indices (None = all)

    def validate(self) -> None:
        check = checker("method")
        check(self.r_max >= 1, "r_max", f"must be >= 1, got {self.r_max}")
        check(
            1 <= self.init_r <= self.r_max,
            "init_r",
            f"must be in [1, r_max={self.r_max}], got {self.init_r}; lower method.init_r or raise "
            "method.r_max",
        )
        check(
            1 <= self.min_rank <= self.init_r,
            "min_rank",
            f"must be in [1, init_r={self.init_r}], got {self.min_rank}",
        )
        check(0 <= self.tau < 1, "tau", f"τ must be in [0, 1) (0: no truncation below r_max), got {self.tau}")
        check(self.basis_interval >= 1, "basis_interval", f"must be >= 1 step, got {self.basis_interval}")
        check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.target_params is None or self.target_params > 0, "target_params", "must be > 0 (or null)")
        check(self.final_steps >= 0, "final_steps", "must be >= 0 (steps, or a fraction of T below 1)")

    def validate_steps(self, total_steps: int) -> None:
        """The cut at T - final_steps must fall within the run."""
        if self.target_params is not None and cut_step(self, total_steps) < 0:
            raise ConfigError(
                f"method.final_steps: {steps_from(self.final_steps, total_steps, 'method.final_steps')} "
                f"steps after the cut leave none before it (T={total_steps}); lower method.final_steps"
            )


def cut_step(cfg: GeoLoRAConfig, total_steps: int) -> int:
    """The 0-based optimizer step after which the ranks are cut to ``target_params``."""
    return total_steps - steps_from(cfg.final_steps, total_steps, "method.final_steps") - 1


def truncation_rank(d: torch.Tensor, tau: float) -> int:
    """The smallest r' with ||d[r':]|| < τ ||d|| (d descending); len(d) when none is (d = 0)."""
    tail = torch.linalg.vector_norm(d) * tau
    for j in range(len(d)):
        if torch.linalg.vector_norm(d[j:]) < tail:
            return j
    return len(d)


class GeoLoRALinear(LoRALinear):
    """y = W0 x + b + s U[:, :r] S[:r, :r] V[:, :r]ᵀ x, r = ``active``.

    A holds Vᵀ (r_max, in) with orthonormal rows, B holds U (out, r_max) with orthonormal columns
    (random, as the authors' QR of a Gaussian), S (r_max, r_max) starts at 0, so the layer starts
    as the base layer. While ``collect`` is set, the backward adds this layer's ∇_K (out, r) and
    ∇_L (in, r) to ``grad_K`` / ``grad_L`` (the integrator's; autograd's own gradients of U and V
    are ∇_K Sᵀ and ∇_L S, useless at S = 0).
    """

    def __init__(self, base: nn.Module, r_max: int, scaling: float, dropout: float = 0.0, *, init_r: int):
        super().__init__(base, r_max, scaling, dropout)
        with torch.no_grad():
            nn.init.orthogonal_(self.A)  # Vᵀ (r_max, in)
            nn.init.orthogonal_(self.B)  # U (out, r_max)
        self.S = nn.Parameter(torch.zeros(r_max, r_max, device=self.A.device, dtype=self.A.dtype))
        self.active = init_r
        self.collect = False
        self.grad_K: torch.Tensor | None = None  # (out, r)
        self.grad_L: torch.Tensor | None = None  # (in, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        r = self.active
        xd = self.dropout(x).to(self.A.dtype)
        a = F.linear(xd, self.A[:r])  # Vᵀ x, (..., r)
        y = F.linear(F.linear(a, self.S[:r, :r]), self.B[:, :r]) * self.scaling  # s U S Vᵀ x, (..., out)
        if self.collect and y.requires_grad:
            y.register_hook(self._capture(xd.detach(), a.detach()))
        return out + y.to(out.dtype)

    def _capture(self, xd: torch.Tensor, a: torch.Tensor):
        r = self.active

        def hook(delta: torch.Tensor) -> None:  # delta = ∂L/∂y, (..., out)
            # in fp32 whatever the autocast around the backward (the loop's backward runs inside it)
            with torch.no_grad(), torch.autocast(delta.device.type, enabled=False):
                d = delta.reshape(-1, delta.shape[-1]).to(self.B.dtype)  # (N, out)
                grad_k = self.scaling * d.T @ a.reshape(-1, r).to(d.dtype)  # s G V, (out, r)
                du = d @ self.B[:, :r]  # (N, r)
                grad_l = self.scaling * xd.reshape(-1, xd.shape[-1]).to(d.dtype).T @ du  # s Gᵀ U, (in, r)
                if self.grad_K is None:
                    self.grad_K, self.grad_L = grad_k, grad_l
                else:
                    self.grad_K += grad_k
                    self.grad_L += grad_l

        return hook

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.active
        return self.A[:r], self.B[:, :r] @ self.S[:r, :r]  # Vᵀ (r, in), U S (out, r)

    def kept_rank(self) -> int:
        return self.active

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.active}/{self.rank}"

    @torch.no_grad()
    def augment(self, lr: float, grad_k: torch.Tensor, grad_l: torch.Tensor) -> None:
        """Steps 1-2: the bases gain orth(∇_K), orth(∇_L) (rank r -> min(2r, r_max)); S's new
        blocks are the projected gradient steps of K and L at rate λ = ``lr``."""
        r = self.active
        r1 = min(2 * r, self.rank)
        if r1 == r:
            return
        u, v = self.B[:, :r], self.A[:r].T  # (out, r), (in, r)
        u_new = torch.linalg.qr(torch.cat([u, grad_k], 1)).Q[:, r:r1]  # (out, r1 - r), ⟂ U
        v_new = torch.linalg.qr(torch.cat([v, grad_l], 1)).Q[:, r:r1]  # (in, r1 - r), ⟂ V
        self.S[r:r1, :r] = -lr * (u_new.T @ grad_k)  # Û_newᵀ (K - λ ∇_K), K ⟂ Û_new
        self.S[:r, r:r1] = -lr * (grad_l.T @ v_new)  # (V̂_newᵀ (L - λ ∇_L))ᵀ
        self.S[r:r1, r:r1] = 0.0
        self.B[:, r:r1] = u_new
        self.A[r:r1] = v_new.T
        self.active = r1

    @torch.no_grad()
    def truncate(self, tau: float, min_rank: int, cap: int | None = None) -> torch.Tensor:
        """Step 3: rotate U, V onto S's singular vectors, keep the triplets τ (and ``cap``) allow;
        returns the kept singular values (S is then diag of them)."""
        r = self.active
        p, d, qh = torch.linalg.svd(self.S[:r, :r])  # S = P diag(d) Qᵀ
        keep = min(max(truncation_rank(d, tau), min(min_rank, r)), r)
        if cap is not None:
            keep = min(keep, cap)
        self.B[:, :keep] = self.B[:, :r] @ p[:, :keep]  # U P
        self.A[:keep] = qh[:keep] @ self.A[:r]  # (V Q)ᵀ
        self.S.zero_()
        self.S[:keep, :keep] = torch.diag(d[:keep])
        self.active = keep
        return d[:keep]


def component_cost(layer) -> int:
    """Parameters of one component of the final LoRA (a row of A = Vᵀ, a column of B = s U S): in + out."""
    return layer.in_features + layer.out_features


def scaling_of(cfg: GeoLoRAConfig) -> float:
    return cfg.alpha / cfg.init_r


def apply(model: nn.Module, cfg: GeoLoRAConfig, layers: list[int] | None = None) -> dict:
    layers = layers if layers is not None else cfg.layers
    patterns = resolve_targets(model, cfg.target_modules, "method.target_modules")
    wrapped = {}
    for name in find_targets(model, patterns, "method.target_modules", layers):
        base = model.get_submodule(name)
        base.weight.requires_grad_(False)
        wrapped[name] = GeoLoRALinear(base, cfg.r_max, scaling_of(cfg), cfg.dropout, init_r=cfg.init_r)
        set_module(model, name, wrapped[name])
    return wrapped


def count(cfg: GeoLoRAConfig, arch, layers: list[int] | None = None) -> int:
    """r_max (in + out) + r_max² per adapted matrix (U, V and S at full capacity)."""
    layers = layers if layers is not None else cfg.layers
    patterns = cfg.target_modules or arch.default_targets()
    shapes = [s for _, s in arch.match_linears(patterns, layers)]
    for s in shapes:
        if cfg.r_max > min(s.in_features, s.out_features):
            raise ConfigError(
                f"method.r_max={cfg.r_max}: a {s.out_features} x {s.in_features} matrix holds at most "
                f"{min(s.in_features, s.out_features)} orthonormal directions; lower method.r_max"
            )
    final_max = sum(cfg.r_max * component_cost(s) for s in shapes)
    if cfg.target_params is not None and final_max <= cfg.target_params:
        raise ConfigError(
            f"method.target_params={cfg.target_params}: GeoLoRA at r_max={cfg.r_max} ends with at most "
            f"{final_max} parameters, so the cut would keep everything; raise method.r_max or lower "
            "method.target_params"
        )
    return final_max + sum(cfg.r_max**2 for _ in shapes)


def merge(model: nn.Module, modules: dict) -> None:
    """W0 += s U S Vᵀ (lora.merge on the active factors), then put the base layer back."""
    lora.merge(model, {n: m for n, m in modules.items() if isinstance(m, GeoLoRALinear)})


@torch.no_grad()
def cut_to(layers: dict[str, GeoLoRALinear], target: int) -> int:
    """The final global cut: with every S diagonal (truncated), keep the largest singular values
    over all layers (ties by module name and index) while their components' parameters sum to at
    most ``target``; returns how many were cut."""
    entries = []  # (-d, name, index, cost) of every kept singular value
    for name, layer in sorted(layers.items()):
        d = torch.diagonal(layer.S)[: layer.active]
        entries += [(-float(v), name, i, component_cost(layer)) for i, v in enumerate(d.tolist())]
    entries.sort()
    kept, ranks = 0, dict.fromkeys(layers, 0)
    for _, name, _, cost in entries:
        if kept + cost > target:
            break
        kept += cost
        ranks[name] += 1
    for name, layer in layers.items():  # a layer's kept values are its largest: a prefix of diag(S)
        layer.S[ranks[name] :] = 0.0
        layer.S[:, ranks[name] :] = 0.0
        layer.active = ranks[name]
    return len(entries) - sum(ranks.values())


class GeoLoRAHooks(MethodHooks):
    """The loop's side of GeoLoRA: the gradients of K and L collected on augmenting steps, the
    integrator's rounds (augment, truncate), the final cut, the ranks for ranks.jsonl."""

    def __init__(self, layers: dict[str, GeoLoRALinear], cfg: GeoLoRAConfig):
        self.names = sorted(layers)
        self.layers = [layers[n] for n in self.names]
        self.cfg = cfg
        self.total_steps: int | None = None
        self.cut: int | None = None  # singular values cut at the level (None: not yet)
        self.augmented = False  # between an augmentation and its truncation (S in the 2r basis)
        self.reported: list[int] | None = None
        self.bases: list[tuple[torch.Tensor, torch.Tensor]] = []  # (Vᵀ, U) before the optimizer step
        for layer in self.layers:  # the optimizer sees zero gradients for U and V
            layer.A.register_hook(torch.zeros_like)
            layer.B.register_hook(torch.zeros_like)

    def start(self, total_steps: int) -> None:
        self.total_steps = total_steps

    def _augments_at(self, step: int) -> bool:
        last = self.total_steps is not None and step == self.total_steps - 1
        return self.cut is None and step % self.cfg.basis_interval == 0 and not last

    def _cut_at(self, step: int) -> bool:
        return (
            self.cfg.target_params is not None
            and self.cut is None
            and self.total_steps is not None
            and step == cut_step(self.cfg, self.total_steps)
        )

    def before_step(self, step: int) -> None:
        collect = self._augments_at(step)
        self.bases = [(m.A.detach().clone(), m.B.detach().clone()) for m in self.layers]
        for layer in self.layers:
            layer.collect = collect
            layer.grad_K = layer.grad_L = None

    def _lr(self, optimizer) -> float:
        """λ = η_t: the learning rate of S's parameter group now (1 without an optimizer)."""
        s = self.layers[0].S
        for group in optimizer.param_groups if optimizer is not None else ():
            if any(p is s for p in group["params"]):
                return group["lr"]
        return 1.0

    def _grad_factor(self) -> float:
        """What the loop did to the gradients before its step (fp16's loss scale undone, clipping):
        ∇_S = U_rᵀ ∇_K exactly, so the collected ∇_K, ∇_L are scaled as S.grad was."""
        dot, norm = 0.0, 0.0
        for layer in self.layers:
            if layer.grad_K is None or layer.S.grad is None:
                continue
            r = layer.active
            own = layer.B[:, :r].T @ layer.grad_K  # (r, r)
            dot += float((own * layer.S.grad[:r, :r]).sum())
            norm += float((own * own).sum())
        return dot / norm if norm > 0 else 1.0

    @torch.no_grad()
    def after_step(self, step: int, optimizer) -> None:
        if not self.layers:
            return
        for layer, (a, b) in zip(self.layers, self.bases):  # undo the optimizer's weight decay on U, V
            layer.A.copy_(a)
            layer.B.copy_(b)
            r = layer.active  # S outside the active block: Adam's stale moments may move it
            layer.S[r:] = 0.0
            layer.S[:, r:] = 0.0
        if self._augments_at(step):
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                for layer in self.layers:  # every rank augments with the same gradients
                    if layer.grad_K is not None:
                        torch.distributed.all_reduce(layer.grad_K)
                        torch.distributed.all_reduce(layer.grad_L)
            factor, lr = self._grad_factor(), self._lr(optimizer)
            for layer in self.layers:
                if layer.grad_K is not None:
                    layer.augment(lr, factor * layer.grad_K, factor * layer.grad_L)
                layer.collect, layer.grad_K, layer.grad_L = False, None, None
            self.augmented = True
        last = self.total_steps is not None and step == self.total_steps - 1
        due = step % self.cfg.basis_interval == self.cfg.basis_interval - 1 or last or self._cut_at(step)
        if self.cut is None and due:
            for layer in self.layers:
                layer.truncate(self.cfg.tau, self.cfg.min_rank)
            self.augmented = False
        if self._cut_at(step):
            self.cut = cut_to(dict(zip(self.names, self.layers)), self.cfg.target_params)

    def kept(self) -> dict:
        ranks = {n: m.active for n, m in zip(self.names, self.layers)}
        return {"ranks": ranks, "kept_params": sum(m.active * component_cost(m) for m in self.layers)}

    def allocation(self, step: int) -> dict | None:
        """A ranks.jsonl row at step 0 and after every truncation that changed a rank (the cut: ``final``)."""
        if self.augmented:
            return None
        kept = self.kept()
        now = list(kept["ranks"].values())
        if step > 0 and now == self.reported:
            return None
        self.reported = now
        return {
            "step": step,
            "budget": self.cfg.target_params,
            "kept": sum(now),
            "kept_params": kept["kept_params"],
            "final": self.cut is not None,
            "ranks": kept["ranks"],
        }

    def state_dict(self) -> dict:
        return {
            "ranks": [m.active for m in self.layers],
            "augmented": self.augmented,
            "cut": self.cut,
            "reported": self.reported,
        }

    def load_state_dict(self, state: dict) -> None:
        restore_ranks("geolora", self.layers, state["ranks"])
        self.augmented = bool(state["augmented"])
        self.cut, self.reported = state.get("cut"), state.get("reported")

    def final(self, evaluate) -> dict:
        return {"geolora": kept_with_cut(self.kept(), self.cfg.target_params, self.cut)}


def hooks(model: nn.Module, modules: dict, cfg: GeoLoRAConfig) -> GeoLoRAHooks:
    return GeoLoRAHooks({n: m for n, m in modules.items() if isinstance(m, GeoLoRALinear)}, cfg)
