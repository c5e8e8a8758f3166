"""Drift profiles: bins cover the reference, counts merge, PSI and JS see real shifts."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.drift import count, drift_profile, feature_values, jensen_shannon, psi, reference_bins
from protocol.errors import ProtocolError
from protocol.manifest import FeatureBins, TensorSpec

RNG = np.random.default_rng(0)


def test_quantile_bins_cover_the_reference_and_counts_sum_to_rows() -> None:
    values = RNG.standard_normal(1000)
    bins = reference_bins(values, name="x", tensor="x", column=0)
    assert bins.kind == "numeric"
    assert sum(bins.counts) == 1000
    assert bins.counts[0] == 0 and bins.counts[-1] == 0  # nothing below min or above max
    interior = np.asarray(bins.counts[1:-1])
    assert interior.min() >= 90 and interior.max() <= 110  # quantile bins: ~100 each


def test_out_of_range_and_nan_land_in_under_and_overflow() -> None:
    bins = reference_bins(np.arange(100.0), name="x", tensor="x", column=0)
    counts = count(np.array([-5.0, 0.0, 99.0, 150.0, np.nan]), bins)
    assert counts[0] == 1 and counts[-1] == 2
    assert counts.sum() == 5


def test_a_constant_feature_keeps_its_reference_apart_from_under_and_overflow() -> None:
    bins = reference_bins(np.full(50, 3.0), name="x", tensor="x", column=0)
    assert bins.counts == (0, 50, 0)
    np.testing.assert_array_equal(count(np.array([2.0, 3.0, 4.0]), bins), [1, 1, 1])


def test_integer_outputs_with_few_values_are_categories_with_an_other_bin() -> None:
    labels = RNG.integers(0, 10, size=500)
    bins = reference_bins(labels, name="label", tensor="label", column=None)
    assert bins.kind == "categorical"
    assert bins.categories == tuple(str(i) for i in range(10))
    assert sum(bins.counts) == 500 and bins.counts[-1] == 0
    live = count(np.array([3, 3, 11, 12]), bins)
    assert live[3] == 2 and live[-1] == 2  # unseen classes go to "other"


def test_psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    ref = reference_bins(RNG.standard_normal(5000), name="x", tensor="x", column=0)
    same = count(RNG.standard_normal(5000), ref)
    shifted = count(RNG.standard_normal(5000) + 1.0, ref)
    assert psi(ref.counts, same) < 0.02
    assert psi(ref.counts, shifted) > 0.25
    assert 0 <= jensen_shannon(ref.counts, same) < jensen_shannon(ref.counts, shifted) <= 1


def test_counts_from_several_devices_merge_by_addition() -> None:
    ref = reference_bins(RNG.standard_normal(2000), name="x", tensor="x", column=0)
    a, b = RNG.standard_normal(300), RNG.standard_normal(700)
    np.testing.assert_array_equal(count(a, ref) + count(b, ref), count(np.concatenate([a, b]), ref))


def test_profile_has_a_feature_per_column_and_summarises_wide_tensors() -> None:
    x = RNG.standard_normal((200, 4)).astype(np.float32)
    image = RNG.random((200, 1, 16, 16)).astype(np.float32)
    label = RNG.integers(0, 3, size=200)
    profile = drift_profile(
        (
            TensorSpec(name="x", datatype="FP32", shape=(-1, 4)),
            TensorSpec(name="image", datatype="FP32", shape=(-1, 1, 16, 16)),
        ),
        (TensorSpec(name="label", datatype="INT64", shape=(-1,)),),
        {"x": x, "image": image},
        {"label": label},
    )
    names = [f.name for f in profile.features]
    assert names == ["x[0]", "x[1]", "x[2]", "x[3]", "image:row_mean"]
    assert profile.outputs[0].name == "label" and profile.outputs[0].kind == "categorical"
    assert all(sum(f.counts) == 200 for f in (*profile.features, *profile.outputs))
    wide = profile.features[-1]
    expected = image.reshape(200, -1).astype(np.float64).mean(axis=1)
    np.testing.assert_allclose(feature_values(image, wide), expected)
    np.testing.assert_array_equal(feature_values(x, profile.features[2]), x[:, 2])
    assert (profile.psi_warn, profile.psi_alert) == (0.1, 0.25)


def test_bad_reference_data_is_named() -> None:
    with pytest.raises(ProtocolError, match="feature 'x': no reference values"):
        reference_bins(np.array([]), name="x", tensor="x", column=0)
    with pytest.raises(ProtocolError, match="all NaN"):
        reference_bins(np.array([np.nan, np.inf]), name="x", tensor="x", column=0)
    with pytest.raises(ProtocolError, match="no reference data for tensor 'y'"):
        drift_profile((TensorSpec(name="y", datatype="FP32", shape=(-1,)),), (), {}, {})
    with pytest.raises(ProtocolError, match="differ in length"):
        psi([1, 2, 3], [1, 2])
    with pytest.raises(ProtocolError, match="empty histogram"):
        psi([0, 0], [1, 1])
    with pytest.raises(ValueError, match="3 counts for 4 bins"):
        FeatureBins(name="x", tensor="x", edges=(1.0, 2.0, 3.0), counts=(1, 2, 3))
    with pytest.raises(ValueError, match="at least two edges"):
        FeatureBins(name="x", tensor="x", edges=(1.0,), counts=(1, 2))
    with pytest.raises(ValueError, match="need a category"):
        FeatureBins(name="x", tensor="x", kind="categorical", counts=(1,))
