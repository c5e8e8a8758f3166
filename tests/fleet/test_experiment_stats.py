"""The significance tests behind an experiment's verdict, against values worked out by hand and
against SciPy's implementation of the same tests on the samples the histograms stand for."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from fleet.experiments.stats import mann_whitney_binned, two_proportions, wilson_interval


def test_two_proportions_matches_the_hand_computation() -> None:
    # 40/100 vs 60/100: pooled 0.5, se = sqrt(0.25 * 0.02) = sqrt(0.005), z = -0.2 / se = -2√2,
    # so p = erfc(2√2 / √2) = erfc(2).
    test = two_proportions(40, 100, 60, 100)
    assert test.rate_a == pytest.approx(0.4)
    assert test.rate_b == pytest.approx(0.6)
    assert test.z == pytest.approx(-2 * math.sqrt(2))
    assert test.p_value == pytest.approx(math.erfc(2.0))  # 0.004677...
    assert test.p_value == pytest.approx(0.0046777349810472645)
    # Swapping the samples flips the sign, not the p-value.
    swapped = two_proportions(60, 100, 40, 100)
    assert swapped.z == pytest.approx(-test.z)
    assert swapped.p_value == pytest.approx(test.p_value)


def test_two_proportions_of_two_and_twelve_percent_over_two_thousand_is_overwhelming() -> None:
    # pooled 0.07; se = sqrt(0.07 * 0.93 * 2 / 2000); z = -0.10 / se ≈ -12.39
    test = two_proportions(40, 2000, 240, 2000)
    assert test.z == pytest.approx(-0.10 / math.sqrt(0.07 * 0.93 * 0.001))
    assert test.z == pytest.approx(-12.394, abs=1e-3)
    assert test.p_value < 1e-30


def test_two_proportions_that_cannot_differ_have_p_one() -> None:
    assert two_proportions(0, 500, 0, 800).p_value == 1.0
    assert two_proportions(500, 500, 800, 800).z == 0.0
    # Equal rates: z is exactly 0.
    equal = two_proportions(50, 1000, 100, 2000)
    assert equal.z == pytest.approx(0.0)
    assert equal.p_value == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("args", "problem"),
    [((5, 4, 1, 10), "5 successes in 4 trials"), ((1, 10, 0, 0), "at least one trial")],
)
def test_two_proportions_refuses_impossible_counts(
    args: tuple[int, int, int, int], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        two_proportions(*args)


def test_mann_whitney_on_two_separated_buckets_by_hand() -> None:
    # a = {0, 0}, b = {2, 2}: every pair has b higher, so U_a = 0; mean n_a n_b / 2 = 2.
    # Ties: two buckets of 2 each, sum(t^3 - t) = 12, n (n - 1) = 12, so the variance is
    # 4/12 * (5 - 1) = 4/3 and z = -2 / sqrt(4/3) = -√3.
    test = mann_whitney_binned([2, 0, 0], [0, 0, 2])
    assert test.u == 0.0
    assert test.superiority == 0.0
    assert test.z == pytest.approx(-math.sqrt(3))
    assert test.p_value == pytest.approx(math.erfc(math.sqrt(3) / math.sqrt(2)))


def test_mann_whitney_with_ties_matches_scipy_on_the_expanded_samples() -> None:
    rng = np.random.default_rng(7)
    counts_a = rng.integers(0, 60, size=18)
    counts_b = rng.integers(0, 60, size=18)
    counts_b[9:] += 25  # b is slower
    a = np.repeat(np.arange(18), counts_a)
    b = np.repeat(np.arange(18), counts_b)
    expected = scipy_stats.mannwhitneyu(a, b, method="asymptotic", use_continuity=False)
    test = mann_whitney_binned(counts_a.tolist(), counts_b.tolist())
    assert test.u == pytest.approx(expected.statistic)
    assert test.p_value == pytest.approx(expected.pvalue, rel=1e-9)
    assert test.z < 0  # a sits in the lower (faster) buckets
    assert test.superiority < 0.5


def test_mann_whitney_of_identical_histograms_finds_nothing() -> None:
    counts = [0, 5, 40, 300, 120, 8, 0, 1]
    test = mann_whitney_binned(counts, counts)
    assert test.z == pytest.approx(0.0)
    assert test.p_value == pytest.approx(1.0)
    assert test.superiority == pytest.approx(0.5)
    # Everything in one bucket: every value tied, no ranks to compare.
    single = mann_whitney_binned([0, 1000, 0], [0, 3000, 0])
    assert (single.z, single.p_value) == (0.0, 1.0)


def test_mann_whitney_refuses_mismatched_or_empty_histograms() -> None:
    with pytest.raises(ValueError, match="same buckets"):
        mann_whitney_binned([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least one value"):
        mann_whitney_binned([0, 0], [1, 2])
    with pytest.raises(ValueError, match="negative"):
        mann_whitney_binned([1, -1], [1, 2])


def test_wilson_interval_textbook_values() -> None:
    # 5 of 10 at 95%: the centre stays at 0.5, the interval is 0.2366 - 0.7634.
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4)
    assert high == pytest.approx(0.7634, abs=1e-4)
    # 0 of 10: the interval starts at 0 (a Wald interval would collapse to a point).
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx(0.2775, abs=1e-4)
    # 10 of 10 mirrors it.
    low, high = wilson_interval(10, 10)
    assert low == pytest.approx(0.7225, abs=1e-4)
    assert high == 1.0


def test_wilson_interval_narrows_with_samples_and_widens_with_confidence() -> None:
    narrow = wilson_interval(9_000, 10_000)
    wide = wilson_interval(90, 100)
    assert narrow[0] > wide[0] and narrow[1] < wide[1]
    assert narrow[0] < 0.9 < narrow[1]
    strict = wilson_interval(90, 100, confidence=0.99)
    assert strict[0] < wide[0] and strict[1] > wide[1]
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 2, confidence=1.0)
