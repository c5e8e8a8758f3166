"""Drift profiles: reference bins from data, vectorised counting, PSI and Jensen–Shannon.

The exporters compute a bundle's reference bins once; the agent counts live inputs and outputs
into the same bins per window; the fleet adds counts across devices (they merge by addition)
and compares the sums with the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from protocol.errors import ProtocolError
from protocol.manifest import DriftProfile, FeatureBins, TensorSpec

__all__ = [
    "DEFAULT_BINS",
    "MAX_CATEGORIES",
    "MAX_COLUMNS",
    "count",
    "drift_profile",
    "feature_values",
    "jensen_shannon",
    "psi",
    "reference_bins",
]

DEFAULT_BINS = 10  # quantile bins per numeric feature
MAX_COLUMNS = 64  # wider tensors are summarised by each row's mean
MAX_CATEGORIES = 32  # integer/string values with at most this many distinct values are categories
_EPSILON = 1e-4  # share given to an empty bin, so PSI stays finite


def _rows(values: np.ndarray) -> np.ndarray:
    return values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(-1, 1)


def _column(values: np.ndarray, column: int | None) -> np.ndarray:
    rows = _rows(values)
    if column is None:
        mean: np.ndarray = rows.astype(np.float64).mean(axis=1)
        return mean
    column_values: np.ndarray = rows[:, column]
    return column_values


def reference_bins(
    values: np.ndarray, *, name: str, tensor: str, column: int | None, bins: int = DEFAULT_BINS
) -> FeatureBins:
    """Bins and reference counts for one feature's reference values (1-D)."""
    flat = np.asarray(values).reshape(-1)
    if flat.size == 0:
        raise ProtocolError(f"feature {name!r}: no reference values to bin")
    is_text = flat.dtype.kind in "OUS"
    if is_text or flat.dtype.kind in "biu":
        categories = np.unique(flat.astype(str))
        if is_text or categories.size <= MAX_CATEGORIES:
            cats = tuple(str(c) for c in categories)
            spec = FeatureBins(
                name=name, tensor=tensor, column=column, kind="categorical",
                categories=cats, counts=(0,) * (len(cats) + 1),
            )  # fmt: skip
            return spec.model_copy(update={"counts": tuple(int(c) for c in count(flat, spec))})
    numbers = flat.astype(np.float64)
    finite = numbers[np.isfinite(numbers)]
    if finite.size == 0:
        raise ProtocolError(f"feature {name!r}: reference values are all NaN or infinite")
    edges = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, bins + 1)))
    if edges.size == 1:  # a constant feature still needs one interval between under and overflow
        edges = np.append(edges, np.nextafter(edges[0], np.inf))
    spec = FeatureBins(
        name=name, tensor=tensor, column=column, edges=tuple(float(e) for e in edges),
        counts=(0,) * (len(edges) + 1),
    )  # fmt: skip
    return spec.model_copy(update={"counts": tuple(int(c) for c in count(numbers, spec))})


def count(values: np.ndarray, bins: FeatureBins) -> np.ndarray:
    """Counts of ``values`` (1-D) in ``bins``, as int64; no per-element Python."""
    flat = np.asarray(values).reshape(-1)
    if bins.kind == "categorical":
        categories = np.asarray(bins.categories)
        text = flat.astype(str)
        index = np.searchsorted(categories, text)
        index = np.minimum(index, max(len(categories) - 1, 0))
        known = categories[index] == text if len(categories) else np.zeros(0, bool)
        index = np.where(known, index, len(categories))
        found: np.ndarray = np.bincount(index, minlength=len(categories) + 1).astype(np.int64)
        return found
    edges = np.asarray(bins.edges, dtype=np.float64)
    numbers = flat.astype(np.float64)
    index = np.searchsorted(edges, numbers, side="right")
    # The reference maximum belongs to the last reference interval, not to the overflow bin.
    index = np.where(numbers == edges[-1], len(edges) - 1, index)
    counts: np.ndarray = np.bincount(index, minlength=len(edges) + 1).astype(np.int64)
    return counts


def _shares(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(counts, dtype=np.float64)
    total = array.sum()
    if total <= 0:
        raise ProtocolError("cannot compare an empty histogram")
    shares: np.ndarray = np.maximum(array / total, _EPSILON)
    return shares


def psi(reference: Sequence[int] | np.ndarray, observed: Sequence[int] | np.ndarray) -> float:
    """Population stability index of ``observed`` counts against ``reference`` counts."""
    p, q = _shares(reference), _shares(observed)
    if p.shape != q.shape:
        raise ProtocolError(f"histograms differ in length: {p.size} and {q.size} bins")
    return float(np.sum((q - p) * np.log(q / p)))


def jensen_shannon(
    reference: Sequence[int] | np.ndarray, observed: Sequence[int] | np.ndarray
) -> float:
    """Jensen–Shannon divergence (base 2, so between 0 and 1) of two histograms."""
    p, q = _shares(reference), _shares(observed)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    return float(0.5 * np.sum(p * np.log2(p / m)) + 0.5 * np.sum(q * np.log2(q / m)))


def _features(
    specs: Sequence[TensorSpec], data: Mapping[str, np.ndarray], bins: int
) -> tuple[FeatureBins, ...]:
    features = []
    for spec in specs:
        values = data.get(spec.name)
        if values is None:
            raise ProtocolError(f"no reference data for tensor {spec.name!r}")
        width = _rows(np.asarray(values)).shape[1]
        columns: list[int | None] = list(range(width)) if width <= MAX_COLUMNS else [None]
        for column in columns:
            if column is None:
                name = f"{spec.name}:row_mean"
            else:
                name = spec.name if width == 1 else f"{spec.name}[{column}]"
            features.append(
                reference_bins(
                    _column(np.asarray(values), column),
                    name=name,
                    tensor=spec.name,
                    column=column,
                    bins=bins,
                )
            )
    return tuple(features)


def drift_profile(
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    reference_inputs: Mapping[str, np.ndarray],
    reference_outputs: Mapping[str, np.ndarray],
    *,
    bins: int = DEFAULT_BINS,
    psi_warn: float = 0.1,
    psi_alert: float = 0.25,
) -> DriftProfile:
    """The reference histograms of every input feature and output of a model.

    Tensors with at most :data:`MAX_COLUMNS` values per row get one feature per column; wider
    ones (images) are summarised by each row's mean.
    """
    return DriftProfile(
        features=_features(inputs, reference_inputs, bins),
        outputs=_features(outputs, reference_outputs, bins),
        psi_warn=psi_warn,
        psi_alert=psi_alert,
    )


def feature_values(values: np.ndarray, bins: FeatureBins) -> np.ndarray:
    """The 1-D values of feature ``bins`` in a batch of its tensor (for live counting)."""
    return _column(np.asarray(values), bins.column)
