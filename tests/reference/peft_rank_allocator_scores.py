"""Pin peft's AdaLoRA triplet scores on a small deterministic case.

Run from the repository root (needs peft; written with peft 0.21.2, torch 2.13 CPU):

    python tests/reference/peft_rank_allocator_scores.py

It writes ``tests/reference/peft_rank_allocator_scores.json`` next to this file.

The case: a toy model of three ``nn.Linear`` layers (8->6, 6->5, 5->7) wrapped by peft's
AdaLoRA (``init_r=3``, β1=0.85, β2=0.85). For each of three steps, the factors
``lora_B`` (P), ``lora_E`` (λ) and ``lora_A`` (Q) are set to seeded values and given
seeded gradients, and peft's ``RankAllocator.update_ipt`` folds them into its EMAs.
The per-triplet scores are then combined exactly as ``RankAllocator.mask_to_budget``
does (``_element_score`` per element, mean over each singular vector,
``_combine_ipt``), and ``mask_to_budget`` is run at a budget of 6 of the 9 triplets.

The JSON holds the inputs (so the test needs neither peft nor a stable RNG), peft's
per-element EMAs, the per-triplet scores and the kept pattern. ``tests/test_allocator.py``
checks ``adabudget.allocator.RankAllocator`` against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

SHAPES = {"a": (8, 6), "b": (6, 5), "c": (5, 7)}  # module name: (in, out)
INIT_R = 3
BETA1 = BETA2 = 0.85
N_STEPS = 3
BUDGET = 6
SEED = 1234
OUT = Path(__file__).with_suffix(".json")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        for name, (d_in, d_out) in SHAPES.items():
            setattr(self, name, nn.Linear(d_in, d_out))

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def make_case() -> list[dict]:
    """Seeded factor values and gradients, per step, per module: {name: {P, lam, Q}}."""
    gen = torch.Generator().manual_seed(SEED)
    steps = []
    for _ in range(N_STEPS):
        params, grads = {}, {}
        for name, (d_in, d_out) in SHAPES.items():
            shapes = {"P": (d_out, INIT_R), "lam": (INIT_R,), "Q": (INIT_R, d_in)}
            params[name] = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
            grads[name] = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        steps.append({"params": params, "grads": grads})
    return steps


def peft_scores(steps: list[dict]) -> dict:
    """Run peft's RankAllocator on the case; return its EMAs, triplet scores and mask."""
    from peft import AdaLoraConfig, get_peft_model

    cfg = AdaLoraConfig(
        init_r=INIT_R,
        target_r=2,
        tinit=1,
        tfinal=1,
        total_step=10,
        beta1=BETA1,
        beta2=BETA2,
        target_modules=list(SHAPES),
    )
    peft_model = get_peft_model(Toy(), cfg)
    inner = peft_model.base_model.model  # the names update_ipt sees: "a.lora_A.default", ...
    allocator = peft_model.base_model.rankallocator
    for step in steps:
        for name in SHAPES:
            layer = inner.get_submodule(name)
            for ours, theirs in (("P", layer.lora_B), ("lam", layer.lora_E), ("Q", layer.lora_A)):
                p = theirs["default"]
                p.data.copy_(step["params"][name][ours].view_as(p))  # λ is (r, 1) in peft
                p.grad = step["grads"][name][ours].view_as(p).clone()
        allocator.update_ipt(inner)

    out = {"ibar": {}, "ubar": {}, "scores": {}}
    for name in SHAPES:
        key = f"{name}.%s.default"
        for ours, theirs in (("P", "lora_B"), ("lam", "lora_E"), ("Q", "lora_A")):
            shape = steps[0]["params"][name][ours].shape
            out["ibar"].setdefault(name, {})[ours] = allocator.exp_avg_ipt[key % theirs].view(shape).tolist()
            out["ubar"].setdefault(name, {})[ours] = allocator.exp_avg_unc[key % theirs].view(shape).tolist()
        # As mask_to_budget: mean over each singular vector's entries, then _combine_ipt.
        ipt_q = allocator._element_score(key % "lora_A").mean(dim=1, keepdim=True)  # (r, 1)
        ipt_p = allocator._element_score(key % "lora_B").mean(dim=0).view(-1, 1)  # (r, 1)
        ipt_lam = allocator._element_score(key % "lora_E")  # (r, 1)
        out["scores"][name] = allocator._combine_ipt(ipt_lam, torch.cat([ipt_q, ipt_p], dim=1)).tolist()
    pattern = allocator.mask_to_budget(inner, BUDGET)
    out["keep"] = {name: pattern[f"{name}.lora_E.default"] for name in SHAPES}
    return out


def main() -> None:
    import peft

    steps = make_case()
    record = {
        "generated_by": "tests/reference/peft_rank_allocator_scores.py",
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "shapes": {name: list(s) for name, s in SHAPES.items()},
        "init_r": INIT_R,
        "beta1": BETA1,
        "beta2": BETA2,
        "budget": BUDGET,
        "steps": [
            {kind: {n: {k: v.tolist() for k, v in f.items()} for n, f in step[kind].items()} for kind in step}
            for step in steps
        ],
        **peft_scores(steps),
    }
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
