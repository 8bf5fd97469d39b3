"""The pure schedules of ``adabudget.schedule``: the cubic rank budget b(t) (AdaLoRA Appendix A),
phase lengths given as counts or fractions of T, and the learning-rate factor.

Expected budgets are worked out by hand in the comments, from
b(t) = int(b(T) + (b(0) - b(T)) * (1 - (t - t_i) / (T - t_i - t_f))^3) for t_i < t < T - t_f.
"""

from __future__ import annotations

import math

import pytest
import torch
from adabudget.config import ConfigError
from adabudget.schedule import budget_at, lr_factor, steps_from

# The packaged-task example: b(0)=432 (36 matrices x r=12), b(T)=288, t_i=30, t_f=80, T=265,
# so the cubic runs over T - t_i - t_f = 155 steps and ends at T - t_f = 185.
PAPER = dict(initial=432, target=288, warmup_steps=30, final_steps=80, total_steps=265)
PAPER_TABLE = [
    (0, 432),  # warm-up: b(0)
    (30, 432),  # t = t_i is still warm-up
    (31, 429),  # 1 - 1/155 = 0.99355, cubed 0.98077; 288 + 144 * 0.98077 = 429.2
    (60, 363),  # 1 - 30/155 = 0.80645, cubed 0.52451; 288 + 75.53 = 363.5
    (108, 305),  # 1 - 78/155 = 0.49677, cubed 0.12260; 288 + 17.65 = 305.7
    (184, 288),  # 1 - 154/155 = 0.00645, cubed 2.7e-7; 288 + 0.00004
    (185, 288),  # t = T - t_f: the final budget
    (265, 288),  # t = T
    (300, 288),  # past T (a resumed run with a longer loader) stays at b(T)
]

# A tiny run: b(0)=48 (12 matrices x r=4), b(T)=24, t_i=2, t_f=3, T=12; cubic over 7 steps.
TINY = dict(initial=48, target=24, warmup_steps=2, final_steps=3, total_steps=12)
TINY_TABLE = [
    (0, 48),
    (2, 48),  # t_i
    (3, 39),  # 1 - 1/7 = 0.85714, cubed 0.62974; 24 + 24 * 0.62974 = 39.1
    (4, 32),  # 1 - 2/7 = 0.71429, cubed 0.36443; 24 + 8.75 = 32.7
    (5, 28),  # 1 - 3/7 = 0.57143, cubed 0.18659; 24 + 4.48
    (6, 25),  # 1 - 4/7 = 0.42857, cubed 0.07872; 24 + 1.89
    (7, 24),  # 1 - 5/7 = 0.28571, cubed 0.02332; 24 + 0.56
    (8, 24),
    (9, 24),  # T - t_f
    (12, 24),  # T
]

SETTINGS = [PAPER, TINY, dict(initial=1000, target=1, warmup_steps=0, final_steps=0, total_steps=50)]


@pytest.mark.parametrize(("step", "expected"), PAPER_TABLE)
def test_budget_paper_example(step, expected):
    assert budget_at(step, **PAPER) == expected


@pytest.mark.parametrize(("step", "expected"), TINY_TABLE)
def test_budget_tiny_run(step, expected):
    assert budget_at(step, **TINY) == expected


@pytest.mark.parametrize("s", SETTINGS)
def test_budget_monotone_and_within_bounds(s):
    budgets = [budget_at(t, **s) for t in range(s["total_steps"] + 5)]
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert budgets[0] == s["initial"]
    assert budgets[-1] == s["target"]
    assert all(s["target"] <= b <= s["initial"] for b in budgets)


@pytest.mark.parametrize("s", SETTINGS)
def test_budget_continuous_at_both_ends(s):
    """No jump at t_i or at T - t_f: the cubic starts at b(0) and lands on b(T).

    The cubic's steepest slope is 3 (b(0) - b(T)) / span at t = t_i, so no step may drop
    by more than that (plus one for the integer truncation). With the paper's misprinted
    numerator (t - t_i - t_f), b would jump at t_i.
    """
    t_i, t_f, total = s["warmup_steps"], s["final_steps"], s["total_steps"]
    span = total - t_i - t_f
    max_drop = math.ceil(3 * (s["initial"] - s["target"]) / span) + 1
    budgets = [budget_at(t, **s) for t in range(total + 1)]
    drops = [a - b for a, b in zip(budgets, budgets[1:])]
    assert max(drops) <= max_drop
    assert s["initial"] - budgets[t_i + 1] <= max_drop  # leaving warm-up
    assert budgets[total - t_f - 1] - s["target"] <= max_drop  # entering the final phase


@pytest.mark.parametrize(
    ("value", "total", "expected"),
    [
        (0, 265, 0),
        (0.0, 265, 0),
        (0.1, 265, 26),  # 26.5 rounds half to even
        (0.3, 265, 80),  # 79.5 rounds half to even
        (0.5, 10, 5),
        (0.99, 100, 99),
        (1, 265, 1),  # 1 is a count, not "all of T"
        (1.0, 265, 1),
        (30, 265, 30),
        (30.0, 265, 30),
        (500, 265, 500),  # a count is taken as is; the allocator checks it against T
    ],
)
def test_steps_from(value, total, expected):
    out = steps_from(value, total, "method.warmup_steps")
    assert out == expected
    assert isinstance(out, int)


@pytest.mark.parametrize("value", [2.5, 1.5, 100.25])
def test_steps_from_rejects_fractional_counts(value):
    with pytest.raises(ConfigError, match=r"method\.final_steps"):
        steps_from(value, 265, "method.final_steps")


@pytest.mark.parametrize("value", [-1, -0.1])
def test_steps_from_rejects_negative(value):
    with pytest.raises(ConfigError, match=r"method\.warmup_steps.*>= 0"):
        steps_from(value, 265, "method.warmup_steps")


# lr_factor(step, warmup_steps, total_steps): linear warm-up, then linear decay to 0.
@pytest.mark.parametrize(
    ("step", "warmup", "total", "expected"),
    [
        (0, 10, 100, 0.0),
        (5, 10, 100, 0.5),  # halfway through warm-up
        (10, 10, 100, 1.0),  # peak
        (55, 10, 100, 0.5),  # (100 - 55) / 90
        (91, 10, 100, 0.1),  # 9 / 90
        (100, 10, 100, 0.0),
        (120, 10, 100, 0.0),  # never negative
        (0, 0, 100, 1.0),  # no warm-up: full rate at once
        (25, 0, 100, 0.75),
        (0, 1, 1, 0.0),
        (1, 1, 1, 0.0),  # degenerate T = warm-up: no division by zero
    ],
)
def test_lr_factor(step, warmup, total, expected):
    assert lr_factor(step, warmup, total) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("step", "warmup", "total", "expected"),
    [
        (5, 10, 100, 0.5),  # the same linear warm-up
        (10, 10, 100, 1.0),
        (55, 10, 100, 0.5),  # halfway through the decay: cos(pi / 2) = 0
        (40, 10, 100, 0.75),  # a third: 0.5 (1 + cos(pi / 3))
        (100, 10, 100, 0.0),
        (120, 10, 100, 0.0),  # past T: stays 0 (HF's climbs again)
    ],
)
def test_cosine_lr_factor_is_hfs_half_period(step, warmup, total, expected):
    from transformers import get_cosine_schedule_with_warmup

    assert lr_factor(step, warmup, total, "cosine") == pytest.approx(expected, abs=1e-12)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_cosine_schedule_with_warmup(optimizer, warmup, total).lr_lambdas[0]
    if step <= total:
        assert lr_factor(step, warmup, total, "cosine") == pytest.approx(hf(step), abs=1e-12)
