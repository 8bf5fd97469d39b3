"""Layer grouping and parameter allocation of the S4 design space (Chen et al., ICLR 2023).

Pure functions. The L blocks are split into G consecutive groups; each group gets its own
PEFT strategy, and a total trainable-parameter budget is shared across the groups.

Grouping patterns (S4 Sec. 4.1), as weights over the groups, apportioned to L layers:
``uniform`` (1, 1, ..., 1); ``increasing`` (1, 2, ..., G); ``decreasing`` (G, ..., 1);
``spindle`` (1, 2, ..., 2, 1): fewer layers in the end groups, more in the middle. S4's
found pattern is spindle; for MiniLM (L = 6, G = 4) it gives (1, 2, 2, 1), for
DeBERTa-base (L = 12) (2, 4, 4, 2).

Allocation patterns (S4 Sec. 4.2), the share of the budget per group: ``uniform``,
``increasing``, ``decreasing`` (same weights as above), or explicit shares.
"""

from __future__ import annotations

from adabudget.config import ConfigError

PATTERNS = ("uniform", "spindle", "increasing", "decreasing")
ALLOCATIONS = ("uniform", "increasing", "decreasing")


def _weights(pattern: str, num_groups: int) -> list[float]:
    g = num_groups
    if pattern == "uniform":
        return [1.0] * g
    if pattern == "increasing":
        return [float(i + 1) for i in range(g)]
    if pattern == "decreasing":
        return [float(g - i) for i in range(g)]
    if pattern == "spindle":
        return [1.0] * g if g <= 2 else [1.0] + [2.0] * (g - 2) + [1.0]
    raise ValueError(pattern)


def apportion(total: int, weights: list[float], minimum: int = 0) -> list[int]:
    """Integers >= ``minimum`` summing to ``total``, proportional to ``weights`` (largest remainder)."""
    n = len(weights)
    rest = total - minimum * n
    exact = [rest * w / sum(weights) for w in weights]
    out = [int(x) for x in exact]
    # ties go to the later (for increasing) / middle groups deterministically: sort by remainder, then index
    order = sorted(range(n), key=lambda i: (-(exact[i] - out[i]), -weights[i], i))
    for i in order[: rest - sum(out)]:
        out[i] += 1
    return [minimum + x for x in out]


def group_sizes(num_layers: int, num_groups: int, grouping, field: str = "method.grouping") -> list[int]:
    """Layers per group, for a pattern name or an explicit list of sizes."""
    if isinstance(grouping, str):
        if grouping not in PATTERNS:
            raise ConfigError(
                f"{field}={grouping}: unknown pattern; use one of {PATTERNS} or a list of sizes"
            )
        if not 1 <= num_groups <= num_layers:
            raise ConfigError(
                f"method.num_groups={num_groups}: must be between 1 and the model's {num_layers} layers"
            )
        return apportion(num_layers, _weights(grouping, num_groups), minimum=1)
    sizes = [int(s) for s in grouping]
    if any(s < 1 for s in sizes) or sum(sizes) != num_layers:
        raise ConfigError(
            f"{field}={sizes}: explicit group sizes must be >= 1 and sum to the model's {num_layers} layers"
        )
    return sizes


def split_layers(num_layers: int, num_groups: int, grouping) -> list[list[int]]:
    """Consecutive block indices per group, e.g. spindle, L=6, G=4 -> [[0], [1, 2], [3, 4], [5]]."""
    sizes = group_sizes(num_layers, num_groups, grouping)
    out, start = [], 0
    for s in sizes:
        out.append(list(range(start, start + s)))
        start += s
    return out


def allocation_shares(num_groups: int, allocation, field: str = "method.allocation") -> list[float]:
    """Budget share per group (sums to 1), for a pattern name or explicit shares."""
    if isinstance(allocation, str):
        if allocation not in ALLOCATIONS:
            raise ConfigError(
                f"{field}={allocation}: unknown allocation; use one of {ALLOCATIONS} or a list of shares"
            )
        w = _weights(allocation, num_groups)
    else:
        w = [float(x) for x in allocation]
        if len(w) != num_groups or any(x < 0 for x in w) or sum(w) <= 0:
            raise ConfigError(
                f"{field}={w}: give {num_groups} non-negative shares (one per group), not all zero"
            )
    return [x / sum(w) for x in w]
