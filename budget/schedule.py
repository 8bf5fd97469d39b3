"""Pure schedules: the global rank budget b(t) and the learning rate."""

from __future__ import annotations

import math


def budget_at(
    step: int, initial: int, target: int, warmup_steps: int, final_steps: int, total_steps: int
) -> int:
    """Global budget b(t) after ``step`` optimizer steps (AdaLoRA, Appendix A).

    Phases:
      1. warm-up, t <= t_i: b(0), every triplet trains;
      2. budgeting, t_i < t < T - t_f: cubic decay
         b(t) = b(T) + (b(0) - b(T)) * (1 - (t - t_i) / (T - t_i - t_f))^3,
         truncated to an integer as both reference codes do;
      3. final, t >= T - t_f: b(T), the pattern is fixed.
    The paper prints (t - t_i - t_f) in the numerator: a typo; both the original code and
    peft use (t - t_i), which makes b continuous at both ends.

    Example: b(0)=432, b(T)=288, t_i=30, t_f=80, T=265: b(30)=432; at t=60,
    1 - 30/155 = 0.806, cubed 0.524, so b(60) = int(288 + 144 * 0.524) = 363; b(185)=288.
    """
    if step <= warmup_steps:
        return initial
    end = total_steps - final_steps
    if step >= end:
        return target
    remaining = 1.0 - (step - warmup_steps) / (end - warmup_steps)
    return int((initial - target) * remaining**3 + target)


def steps_from(value: float, total_steps: int, field_name: str) -> int:
    """A phase length given as a step count (>= 1) or a fraction of T (< 1)."""
    from adabudget.config import ConfigError

    if value < 0:
        raise ConfigError(f"{field_name}: must be >= 0, got {value}")
    if value < 1:
        return int(round(value * total_steps))
    if value != int(value):
        raise ConfigError(
            f"{field_name}: {value} is neither a fraction of the steps (< 1) nor a whole step count"
        )
    return int(value)


def phase_steps(warmup: float, final: float, total_steps: int) -> tuple[int, int]:
    """(t_i, t_f) in steps; refuses a schedule that leaves no budgeting phase (peft#2337)."""
    from adabudget.config import ConfigError

    t_i = steps_from(warmup, total_steps, "method.warmup_steps")
    t_f = steps_from(final, total_steps, "method.final_steps")
    if t_i + t_f >= total_steps:
        raise ConfigError(
            f"method.warmup_steps: t_i={t_i} + t_f={t_f} >= T={total_steps} optimizer steps leaves no "
            "budgeting phase; lower method.warmup_steps / method.final_steps (fractions of T below 1 "
            "scale with the run) or train longer (train.epochs / train.max_steps)"
        )
    return t_i, t_f


def lr_factor(step: int, warmup_steps: int, total_steps: int, shape: str = "linear") -> float:
    """Linear warm-up to 1, then decay to 0 at ``total_steps``: linear (HF's linear schedule) or
    ``cosine`` (HF's cosine schedule, half a period: 0.5 (1 + cos(pi progress)))."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
