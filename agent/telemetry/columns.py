"""Counting all numeric column features of one tensor at once.

A drift profile gives a tensor of up to 64 values per row one numeric feature per column, each
with its own edges. Counting them one by one (:func:`protocol.drift.count`) makes half a dozen
numpy calls per feature; for a typical profile that is hundreds of small calls per counting
pass, each holding the GIL the serving thread needs. :class:`ColumnBins` counts every column in
a few calls over the whole table instead (one comparison per edge position across all columns,
one ``bincount``), with the same result as :func:`~protocol.drift.count` column by column.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from protocol.manifest import FeatureBins

__all__ = ["ColumnBins", "counts_together"]

_CELLS = 1_000_000  # values per chunk of rows: bounds the temporary arrays


def counts_together(bins: FeatureBins) -> bool:
    """Whether ``bins`` can be counted with the other columns of its tensor."""
    return bins.kind == "numeric" and bins.column is not None


class ColumnBins:
    """The numeric one-column features of one tensor, counted together."""

    def __init__(self, features: Sequence[FeatureBins]) -> None:
        self.features = tuple(features)
        self.names = tuple(f.name for f in features)
        self.columns = np.array([f.column for f in features], dtype=np.intp)
        widths = np.array([len(f.edges) for f in features], dtype=np.intp)
        # Padding with +inf: no finite value reaches it, and the cap below keeps +inf itself
        # in the overflow bin.
        self._edges = np.full((len(features), int(widths.max())), np.inf)
        for i, f in enumerate(features):
            self._edges[i, : len(f.edges)] = f.edges
        self._widths = widths
        self._last = np.array([f.edges[-1] for f in features], dtype=np.float64)
        sizes = widths + 1
        self._offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        self._total = int(sizes.sum())
        self._splits = np.cumsum(sizes)[:-1]
        self._chunk = max(1, _CELLS // len(features))

    def count(self, table: np.ndarray) -> list[np.ndarray]:
        """Counts of each feature over ``table`` (rows × columns), in :attr:`features` order;
        each equals ``protocol.drift.count(table[:, column], bins)``."""
        values = table[:, self.columns].astype(np.float64)
        total = np.zeros(self._total, dtype=np.int64)
        for start in range(0, len(values), self._chunk):
            part = values[start : start + self._chunk]
            # searchsorted(edges, v, side="right") is the number of edges <= v.
            index = np.zeros(part.shape, dtype=np.intp)
            for edge in self._edges.T:
                index += edge <= part
            index = np.minimum(index, self._widths)
            index = np.where(np.isnan(part), self._widths, index)  # NaN sorts last: overflow
            # The reference maximum belongs to the last reference interval, as in count().
            index = np.where(part == self._last, self._widths - 1, index)
            total += np.bincount((index + self._offsets).ravel(), minlength=self._total)
        return np.split(total, self._splits)
