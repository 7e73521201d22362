"""Statistics for held-out accuracies: intervals for one model, paired tests between two.

Pure functions on counts and 0/1 vectors; the final table of a run (``reporting.print_summary``) and the learning
benchmarks (``benchmarks/paired.py``) use them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion: ``successes`` out of ``n`` (95% for ``z = 1.96``).

    Unlike the normal approximation it stays inside [0, 1] and does not collapse to a point at 0 or n successes
    (0 of 16 gives [0, 0.194]), which matters for held-out splits of a few dozen prompts.

    Args:
        successes: correct answers (a count; a float such as ``accuracy * n`` is rounded to the nearest count).
        n: trials; 0 gives the uninformative (0, 1).
        z: the normal quantile of the two-sided level (1.96: 95%).

    Returns:
        ``(low, high)``.
    """
    if n < 0 or z < 0:
        raise ValueError(f"n and z must be >= 0, got {n} and {z}")
    if n == 0:
        return 0.0, 1.0
    k = round(successes)
    if not 0 <= k <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def discordant_pairs(first: Sequence[int | bool], second: Sequence[int | bool]) -> tuple[int, int]:
    """The discordant pairs of two paired 0/1 outcome vectors (two models scored on the same prompts, in order).

    Returns:
        ``(b, c)``: ``b`` prompts that ``first`` got right and ``second`` wrong, ``c`` the other way round. The
        difference of their accuracies is ``(b - c) / len(first)``.

    Raises:
        ValueError: vectors of different lengths (they cannot be paired).
    """
    if len(first) != len(second):
        raise ValueError(f"paired vectors must have the same length, got {len(first)} and {len(second)}")
    b = sum(1 for x, y in zip(first, second) if x and not y)
    c = sum(1 for x, y in zip(first, second) if y and not x)
    return b, c


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value of ``b`` against ``c`` discordant pairs (``discordant_pairs``).

    Under the null hypothesis (both models equally accurate on these prompts) each of the ``n = b + c`` discordant
    pairs falls either way with probability 1/2, so the p-value is the two-sided binomial test of ``min(b, c)`` out
    of ``n`` at 0.5: ``min(1, 2 * P(X <= min(b, c)))`` for ``X ~ Binomial(n, 1/2)`` (as
    ``scipy.stats.binomtest(b, b + c).pvalue``; e.g. b=10, c=2 gives 0.0386). No discordant pair gives 1.0. The
    concordant pairs carry no information about the difference and do not enter.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b} and {c}")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))  # exact integers: no underflow for thousands of pairs
    return min(1.0, 2 * tail / 2**n)
