"""The global rank allocator of AdaLoRA (Algorithm 1): importance EMAs, triplet scores,
one global top-k per allocation, masks and physical shrinking.

All importance state lives in two flat preallocated buffers (Ī and Ū for every element of
every P, λ, Q), viewed per factor and updated in place with multi-tensor (``_foreach``)
ops. The allocator never logs or writes: ``update_and_allocate`` returns what it did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from adabudget.methods.adalora import AdaLoRAConfig, SVDLinear, check_budget, kept_params, orth_penalty
from adabudget.schedule import budget_at, phase_steps
from torch import nn

SCORE_CHUNK = 32768  # elements; at::internal::GRAIN_SIZE, below which CPU kernels stay single-threaded


@dataclass
class Allocation:
    """What one allocation did."""

    step: int
    budget: int  # scheduled b(t), in budget units (ranks, or parameters)
    kept: int  # kept triplets (sum of ranks)
    kept_params: int  # adapter parameters those triplets hold
    ranks: dict[str, int]  # rank of every adapted module
    final: bool  # the pattern is fixed from now on
    shrink: bool  # the caller should now call ``shrink_(optimizer)``
    # Every triplet's score S_i (eq. 7) and whether it was kept, per module in its current
    # column order: why the ranks moved (None where the allocator does not expose them).
    scores: dict[str, list[float]] | None = None
    kept_mask: dict[str, list[int]] | None = None

    def to_record(self) -> dict:
        out = {
            "step": self.step,
            "budget": self.budget,
            "kept": self.kept,
            "kept_params": self.kept_params,
            "final": self.final,
            "ranks": self.ranks,
        }
        if self.scores is not None:
            out["scores"] = self.scores
            out["kept_mask"] = self.kept_mask
        return out


class RankAllocator:
    """Scores every triplet (P_:i, λ_i, Q_i:) of every adapted matrix and keeps the best b(t).

    Args:
        layers: {module name: SVDLinear}, all adapted matrices sharing one budget.
        cfg: the AdaLoRA config (budget, schedule, EMA and score knobs).
        total_steps: T, in optimizer steps.
    """

    def __init__(self, layers: dict[str, SVDLinear], cfg: AdaLoRAConfig, total_steps: int):
        self.names = list(layers)
        self.layers = [layers[n] for n in self.names]
        self.cfg = cfg
        self.total_steps = total_steps
        self.warmup_steps, self.final_steps = phase_steps(
            cfg.warmup_steps, cfg.final_steps, total_steps
        )  # t_i, t_f
        self.final_step = total_steps - self.final_steps  # T - t_f: first step of the fixed pattern
        # A triplet costs one rank, or its out + in + 1 parameters when the budget is in parameters.
        self.param_budget = cfg.target_params is not None
        # b(0) counts the initial ranks even on layers already shrunk: a Trainer resumed from a checkpoint
        # saved after a shrink loads the shrunk shapes before the callback builds its allocator.
        budget = check_budget(cfg, [(lay, lay.r_initial) for lay in self.layers])
        self.costs, self.initial_budget, self.target_budget = (
            budget.costs,
            budget.initial,
            budget.target,
        )  # b(0), b(T)
        self.fixed = False
        self._rebuild()

    # ---------------------------------------------------------------- set-up
    def _factors(self) -> list[nn.Parameter]:
        return [p for lay in self.layers for p in (lay.P, lay.lam, lay.Q)]

    def _rebuild(
        self, ibar: list[torch.Tensor] | None = None, ubar: list[torch.Tensor] | None = None
    ) -> None:
        """(Re)allocate the flat buffers and per-factor views; run once, and after a shrink."""
        params = self._factors()
        self.params = params
        device, dtype = params[0].device, params[0].dtype
        total = sum(p.numel() for p in params)
        self._ibar_flat = torch.zeros(total, device=device, dtype=dtype)
        self._ubar_flat = torch.zeros(total, device=device, dtype=dtype)
        self.ibar, self.ubar, offset = [], [], 0
        for p in params:
            self.ibar.append(self._ibar_flat[offset : offset + p.numel()].view_as(p))
            self.ubar.append(self._ubar_flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        if ibar is not None:
            torch._foreach_copy_(self.ibar, ibar)
            torch._foreach_copy_(self.ubar, ubar)
        # Scratch for I = |θ ∇θ| laid out like Ī, and all three cut into pieces of at most
        # SCORE_CHUNK elements: the EMA updates then dispatch a few dozen chunk ops instead
        # of one per factor, and each piece stays below the size at which CPU kernels go
        # multi-threaded (a thread barrier per op is what stalls on a busy machine).
        if self.cfg.score == "magnitude":  # scores |λ|: no EMAs to update
            self._sens_flat, self._sens, self._sens_chunks = None, [], []
        else:
            self._sens_flat = torch.empty(total, device=device, dtype=dtype)
            split = self._sens_flat.split([p.numel() for p in params])
            self._sens = [v.view_as(p) for v, p in zip(split, params)]
            self._sens_chunks = list(self._sens_flat.split(SCORE_CHUNK))
        self._ibar_chunks = list(self._ibar_flat.split(SCORE_CHUNK))
        self._ubar_chunks = list(self._ubar_flat.split(SCORE_CHUNK))
        ranks = [lay.rank for lay in self.layers]
        self.rmax = max(ranks) if ranks else 0
        # Where each triplet sits in the padded (modules, rmax) score matrix.
        self._rows = torch.cat([torch.full((r,), i, dtype=torch.long) for i, r in enumerate(ranks)]).to(
            device
        )
        self._cols = torch.cat([torch.arange(r) for r in ranks]).to(device)
        self._valid = torch.zeros(len(ranks), self.rmax, dtype=torch.bool, device=device)
        self._valid[self._rows, self._cols] = True
        self._cost2d = torch.tensor(self.costs, device=device, dtype=torch.long)[:, None].expand(
            -1, self.rmax
        )
        self._ranks = ranks
        self._mask = torch.ones(sum(ranks), device=device, dtype=dtype)  # fixed pattern when shrink=never
        self._mask_views = list(torch.split(self._mask, ranks))

    def _follow_factors(self) -> None:
        """The model moved (``.to(device)`` / ``.double()``) after this allocator was built:
        rebuild the buffers where the factors now are, keeping the EMAs and the mask."""
        device, dtype = self.params[0].device, self.params[0].dtype
        ibar = [t.to(device, dtype) for t in self.ibar]
        ubar = [t.to(device, dtype) for t in self.ubar]
        mask = self._mask.to(device, dtype)
        self._rebuild(ibar, ubar)
        self._mask.copy_(mask)

    # ---------------------------------------------------------------- per step
    def orth_penalty(self) -> torch.Tensor:
        """R(P, Q) over the adapted matrices (eq. 4); the loop adds γ R to the task loss."""
        return orth_penalty(self.layers, self.cfg.orth_squared)

    def budget_at(self, step: int) -> int:
        return budget_at(
            step,
            self.initial_budget,
            self.target_budget,
            self.warmup_steps,
            self.final_steps,
            self.total_steps,
        )

    @torch.no_grad()
    def update_scores(self) -> None:
        """Fold this step's sensitivity I = |θ ∇θ| into Ī and Ū (eq. 5, 8, 9). No host sync.

        Ū uses the updated Ī(t), as eq. 9 prints and as peft and the original code do:
        the EMAs and scores equal theirs (pinned in tests/test_allocator.py).
        """
        if self.cfg.score == "magnitude":
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        torch._foreach_copy_(self._sens, self.params)
        torch._foreach_mul_(self._sens, grads)
        sens, ibar, ubar = self._sens_chunks, self._ibar_chunks, self._ubar_chunks
        torch._foreach_abs_(sens)  # I = |θ ∇θ|
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        torch._foreach_lerp_(ibar, sens, 1 - b1)  # Ī ← β1 Ī + (1-β1) I
        if self.cfg.score == "adalora":
            torch._foreach_sub_(sens, ibar)
            torch._foreach_abs_(sens)
            torch._foreach_lerp_(ubar, sens, 1 - b2)  # Ū ← β2 Ū + (1-β2) |I - Ī|

    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij) (eq. 7), flat over all modules."""
        if self.cfg.score == "magnitude":
            return torch.cat([lay.lam.abs() for lay in self.layers])
        if self.cfg.score == "sensitivity":
            s = self.ibar
        else:  # s = Ī Ū, built in the sensitivity scratch (free between two update_scores)
            torch._foreach_copy_(self._sens_chunks, self._ibar_chunks)
            torch._foreach_mul_(self._sens_chunks, self._ubar_chunks)
            s = self._sens
        parts = []
        for i in range(len(self.layers)):
            sp, sl, sq = s[3 * i], s[3 * i + 1], s[3 * i + 2]  # (out, r), (r,), (r, in)
            parts.append(sl + sp.mean(0) + sq.mean(1))
        return torch.cat(parts)

    def update_and_allocate(self, step: int) -> Allocation | None:
        """Call after every optimizer step (``step`` = optimizer steps done), before zero_grad."""
        if self._ibar_flat.device != self.params[0].device or self._ibar_flat.dtype != self.params[0].dtype:
            self._follow_factors()
        if self.fixed:
            if self.cfg.shrink == "never":
                with torch.no_grad():
                    torch._foreach_mul_([lay.lam for lay in self.layers], self._mask_views)
            return None
        if step <= self.final_step:
            self.update_scores()
        if step >= self.final_step:
            self.fixed = True
            return self.allocate(step, self.target_budget, final=True)
        if step > self.warmup_steps and step % self.cfg.mask_interval == 0:
            return self.allocate(step, self.budget_at(step), final=False)
        return None

    @torch.no_grad()
    def allocate(self, step: int, budget: int, final: bool) -> Allocation:
        """Keep the best triplets within ``budget`` (one global top-k) and zero the others' λ."""
        scores = self.triplet_scores()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Gradients are already averaged by DDP; averaging the scores too makes the masks
            # bit-identical on every rank whatever the reduction order.
            torch.distributed.all_reduce(scores, op=torch.distributed.ReduceOp.AVG)
        n, cfg = len(self.layers), self.cfg
        neg_inf = torch.tensor(float("-inf"), device=scores.device, dtype=scores.dtype)
        padded = torch.full((n, self.rmax), float("-inf"), device=scores.device, dtype=scores.dtype)
        padded[self._rows, self._cols] = scores
        if cfg.min_rank > 0 or cfg.max_rank is not None:
            order = padded.argsort(dim=1, descending=True)
            position = torch.empty_like(order)
            position.scatter_(1, order, torch.arange(self.rmax, device=order.device).expand(n, -1))
            if cfg.max_rank is not None:
                padded = torch.where(position >= cfg.max_rank, neg_inf, padded)
            padded = torch.where((position < cfg.min_rank) & self._valid, -neg_inf, padded)
        padded = torch.where(self._valid, padded, neg_inf)
        flat = padded.flatten()
        keep = torch.zeros_like(flat, dtype=torch.bool)
        if self.param_budget:
            order = flat.argsort(descending=True)
            spent = self._cost2d.flatten()[order].cumsum(0)
            chosen = order[(spent <= budget) & (flat[order] > float("-inf"))]
            keep[chosen] = True
        else:
            k = min(budget, int((flat > float("-inf")).sum()))  # max_rank may hold fewer than b(t)
            keep[flat.topk(k).indices] = True
        keep = keep.view(n, self.rmax) & self._valid
        mask = keep[self._rows, self._cols].to(scores.dtype)
        masks = torch.split(mask, self._ranks)
        torch._foreach_mul_([lay.lam for lay in self.layers], list(masks))
        self._mask.copy_(mask)
        ranks = keep.sum(1).tolist()  # the host syncs of an allocation: ranks, scores, mask
        shrink = cfg.shrink == "every" or (final and cfg.shrink == "final")
        flat_scores = [float(f"{x:.4g}") for x in scores.float().tolist()]  # 4 significant digits
        flat_mask = mask.to(torch.int8).tolist()
        bounds = [sum(self._ranks[:i]) for i in range(len(self._ranks) + 1)]
        return Allocation(
            step=step,
            budget=budget,
            kept=sum(ranks),
            kept_params=kept_params(dict(zip(self.names, ranks)), dict(zip(self.names, self.layers))),
            ranks=dict(zip(self.names, ranks)),
            final=final,
            shrink=shrink,
            scores={n: flat_scores[a:b] for n, a, b in zip(self.names, bounds, bounds[1:])},
            kept_mask={n: flat_mask[a:b] for n, a, b in zip(self.names, bounds, bounds[1:])},
        )

    @torch.no_grad()
    def reset_pruned_momentum_(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero AdamW's first moment of the λ entries the last allocation masked."""
        for lay, mask in zip(self.layers, self._mask_views):
            state = optimizer.state.get(lay.lam)
            if state and "exp_avg" in state:
                state["exp_avg"].mul_(mask)

    # ---------------------------------------------------------------- shrinking
    @torch.no_grad()
    def shrink_(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Physically remove the masked triplets from the layers, the optimizer state
        (AdamW moments sliced alike) and the importance buffers. Outputs are unchanged:
        masked triplets have λ = 0."""
        keep_idx = [m.nonzero().squeeze(1) for m in self._mask_views]
        ibar, ubar = [], []
        for i, (lay, idx) in enumerate(zip(self.layers, keep_idx)):
            for j, (old, new, dim, index) in enumerate(lay.shrink_(idx)):
                ibar.append(self.ibar[3 * i + j].index_select(dim, index))
                ubar.append(self.ubar[3 * i + j].index_select(dim, index))
                if optimizer is not None:
                    replace_param(optimizer, old, new, dim, index)
        self._rebuild(ibar, ubar)

    def shrink_to(self, ranks: dict[str, int]) -> None:
        """Give each layer the shape of a saved allocation (before loading a checkpoint)."""
        for name, lay in zip(self.names, self.layers):
            if lay.rank != ranks[name]:
                lay.shrink_(torch.arange(ranks[name], device=lay.lam.device))
        self._rebuild()

    # ---------------------------------------------------------------- state
    def ranks(self) -> dict[str, int]:
        """Kept triplets per module: the physical ranks after a shrink, the masked pattern's
        counts before one (and with ``shrink=never``, whose layers keep init_r columns)."""
        kept = self._mask.view(-1).split(self._ranks)
        return {n: int(m.sum()) for n, m in zip(self.names, kept)}

    def physical_ranks(self) -> dict[str, int]:
        return dict(zip(self.names, self._ranks))

    def state_dict(self) -> dict:
        return {
            "ibar": self._ibar_flat.clone(),
            "ubar": self._ubar_flat.clone(),
            "mask": self._mask.clone(),
            "fixed": self.fixed,
            "ranks": self.physical_ranks(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["ranks"] != self.physical_ranks():
            self.shrink_to(state["ranks"])
        self._ibar_flat.copy_(state["ibar"])
        self._ubar_flat.copy_(state["ubar"])
        self._mask.copy_(state["mask"])
        self.fixed = state["fixed"]


def replace_param(
    optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, dim: int, index
) -> None:
    """Swap ``old`` for ``new`` in the optimizer, slicing every per-element state tensor.

    A factor emptied by the shrink (``requires_grad`` off) leaves the optimizer instead, as it
    is left out of a resumed run's optimizer: the two must hold the same parameters.
    """
    for group in optimizer.param_groups:
        group["params"] = [
            new if p is old else p for p in group["params"] if p is not old or new.requires_grad
        ]
    state = optimizer.state.pop(old, None)
    if state and new.requires_grad:
        optimizer.state[new] = {
            key: v.index_select(dim, index) if torch.is_tensor(v) and v.shape == old.shape else v
            for key, v in state.items()
        }
