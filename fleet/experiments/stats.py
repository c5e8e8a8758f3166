"""The significance tests an experiment's verdict rests on, on counts the fleet already sums.

- :func:`two_proportions`: the two-proportion z-test (pooled variance) for rates such as the
  error rate, the fallback rate and the outcome success rate.
- :func:`mann_whitney_binned`: the Mann–Whitney U test on two latency histograms over the same
  buckets (:data:`protocol.telemetry.LATENCY_BUCKETS_MS`). A bucket is an ordinal value; the
  requests sharing one are ties, and the variance carries the tie correction. No continuity
  correction: the samples are thousands of requests, where it changes nothing that matters.
- :func:`wilson_interval`: the Wilson score interval for one proportion (the rate at which a
  shadow agrees with the primary), which stays inside [0, 1] and behaves near 0 and 1.

Every p-value is two-sided, from the normal approximation (``math.erfc``). The tests need no
raw samples, only counts, so their cost does not grow with traffic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

__all__ = [
    "ProportionTest",
    "RankTest",
    "mann_whitney_binned",
    "two_proportions",
    "two_sided_p",
    "wilson_interval",
]


@dataclass(frozen=True)
class ProportionTest:
    """``rate_a`` and ``rate_b`` compared: ``z`` is positive when ``rate_a`` is higher."""

    rate_a: float
    rate_b: float
    z: float
    p_value: float

    @property
    def difference(self) -> float:
        return self.rate_a - self.rate_b


@dataclass(frozen=True)
class RankTest:
    """Two histograms compared by rank.

    ``superiority`` is P(a > b) + P(a = b) / 2 for one value drawn from each (``u`` over
    ``n_a * n_b``): above 0.5 when ``a`` tends to the higher buckets. ``z`` has its sign.
    """

    u: float
    n_a: int
    n_b: int
    z: float
    p_value: float

    @property
    def superiority(self) -> float:
        return self.u / (self.n_a * self.n_b) if self.n_a and self.n_b else 0.5


def two_sided_p(z: float) -> float:
    """The two-sided p-value of a standard normal statistic: P(|Z| >= |z|)."""
    return math.erfc(abs(z) / math.sqrt(2.0))


def two_proportions(successes_a: int, n_a: int, successes_b: int, n_b: int) -> ProportionTest:
    """Two-proportion z-test of ``successes_a / n_a`` against ``successes_b / n_b``.

    When both rates are 0 or both are 1 the pooled variance is 0 and nothing tells them
    apart: ``z`` is 0 and the p-value 1.
    """
    _check_counts("a", successes_a, n_a)
    _check_counts("b", successes_b, n_b)
    if n_a == 0 or n_b == 0:
        raise ValueError(f"both samples need at least one trial, got n_a={n_a}, n_b={n_b}")
    rate_a, rate_b = successes_a / n_a, successes_b / n_b
    pooled = (successes_a + successes_b) / (n_a + n_b)
    variance = pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b)
    if variance <= 0.0:
        return ProportionTest(rate_a, rate_b, 0.0, 1.0)
    z = (rate_a - rate_b) / math.sqrt(variance)
    return ProportionTest(rate_a, rate_b, z, two_sided_p(z))


def mann_whitney_binned(counts_a: Sequence[int], counts_b: Sequence[int]) -> RankTest:
    """Mann–Whitney U test of two histograms on the same ordered buckets.

    ``u`` counts, over every pair of one value from ``a`` and one from ``b``, the pairs where
    ``a``'s bucket is higher, plus half the pairs in the same bucket. Its variance under the null
    hypothesis is ``n_a n_b / 12 * ((n + 1) - sum(t^3 - t) / (n (n - 1)))`` with ``t`` the
    values in each bucket (both samples): the tie correction.
    """
    if len(counts_a) != len(counts_b):
        raise ValueError(
            f"the histograms have {len(counts_a)} and {len(counts_b)} buckets; they must share "
            "the same buckets"
        )
    a = np.asarray(counts_a, dtype=np.float64)
    b = np.asarray(counts_b, dtype=np.float64)
    if (a < 0).any() or (b < 0).any():
        raise ValueError("a histogram holds a negative count")
    n_a, n_b = int(a.sum()), int(b.sum())
    if n_a == 0 or n_b == 0:
        raise ValueError(f"both histograms need at least one value, got {n_a} and {n_b}")
    below_b = np.cumsum(b) - b  # values of b in lower buckets than each bucket
    u = float(np.dot(a, below_b + b / 2.0))
    n = n_a + n_b
    ties = a + b
    tie_term = float(np.sum(ties**3 - ties)) / (n * (n - 1.0)) if n > 1 else 0.0
    variance = n_a * n_b / 12.0 * ((n + 1.0) - tie_term)
    if variance <= 0.0:  # every value in one bucket: no ranks to compare
        return RankTest(u, n_a, n_b, 0.0, 1.0)
    z = (u - n_a * n_b / 2.0) / math.sqrt(variance)
    return RankTest(u, n_a, n_b, z, two_sided_p(z))


def wilson_interval(successes: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of ``successes / n`` at ``confidence`` (0-1, two-sided)."""
    _check_counts("", successes, n)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if n == 0:
        return (0.0, 1.0)  # no trials: every rate is possible
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = successes / n
    z2n = z * z / n
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n))
    # At 0 or n successes the bound is exactly 0 or 1; rounding would leave it a hair off.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def _check_counts(which: str, successes: int, n: int) -> None:
    name = f"sample {which} " if which else ""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(
            f"{name}has {successes} successes in {n} trials; need 0 <= successes <= trials"
        )
