"""Drift counting off the request path.

A request the primary answered hands its input and output arrays to :meth:`DriftCounting.submit`:
one tuple appended to a queue, no copy (the serving path never mutates them). One background
thread wakes when the queue fills up from empty, waits a moment for more to gather, then counts
everything queued per version in one vectorised pass onto the bundle's reference bins (the
numeric columns of a tensor together, :mod:`.columns`; other features with
:func:`protocol.drift.count`). Counting one row at a time would cost more Python per request
than the request itself; a gathered pass costs a few numpy calls per tensor.

The queue is bounded in rows: when counting falls behind serving, rows are not counted and the
version's ``unsampled`` says how many, so a window never pretends to have seen rows it skipped.
A feature whose tensor a request lacks, or whose column the tensor does not have, is skipped
and logged once; counting never fails a request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from agent.telemetry.columns import ColumnBins, counts_together
from protocol.drift import count, feature_values, psi
from protocol.errors import ProtocolError
from protocol.manifest import DriftProfile, FeatureBins
from protocol.telemetry import MAX_BINS, MAX_FEATURES

__all__ = ["DriftCounting", "DriftCounts", "DriftTally"]

log = logging.getLogger(__name__)

Tensors = Mapping[str, np.ndarray]
_Batch = tuple[Tensors, Tensors, int]  # inputs, outputs, rows
_Table = tuple["np.ndarray | None", list[np.ndarray]]  # stacked rows (if they stack), arrays
_HOLD_S = 0.0005  # seconds of counting between two hand-overs of the GIL


@dataclass(frozen=True)
class DriftCounts:
    """One version's counts over one window, with PSI of each name against the reference."""

    rows: int
    unsampled: int
    features: dict[str, tuple[int, ...]]
    outputs: dict[str, tuple[int, ...]]
    psi: dict[str, float]


class DriftTally:
    """One version's drift counts for the current window, on its profile's reference bins.

    The counting thread adds to it; :meth:`take` (the window cut) swaps the counts out under a
    lock held only for that swap. ``unsampled`` is written by the serving thread alone.
    """

    def __init__(self, model: str, version: str, role: str, profile: DriftProfile) -> None:
        self.model, self.version, self.role = model, version, role
        self.profile = profile
        self.unsampled = 0
        self._warned: set[str] = set()
        self._features = self._usable(profile.features[:MAX_FEATURES])
        self._outputs = self._usable(profile.outputs[:MAX_FEATURES])
        self._feature_plan = _plan(self._features)
        self._output_plan = _plan(self._outputs)
        self._reference = {
            b.name: np.asarray(b.counts, dtype=np.int64) for b in (*self._features, *self._outputs)
        }
        self._lock = threading.Lock()
        self._rows = 0
        self._lost = 0  # rows the counting thread failed on
        self._counts = self._zeros()

    def _usable(self, bins: Sequence[FeatureBins]) -> tuple[FeatureBins, ...]:
        usable = []
        for b in bins:
            if not 1 <= len(b.counts) <= MAX_BINS or not 1 <= len(b.name) <= 128:
                self._skip(b, f"{len(b.counts)} bins or its name do not fit a drift record")
            else:
                usable.append(b)
        return tuple(usable)

    def _zeros(self) -> dict[str, np.ndarray]:
        return {name: np.zeros_like(ref) for name, ref in self._reference.items()}

    def _skip(self, bins: FeatureBins, why: str) -> None:
        """``bins`` could not be counted this time; says so once per version."""
        if bins.name in self._warned:
            return
        self._warned.add(bins.name)
        log.warning(
            "drift feature not counted",
            extra={
                "model": self.model,
                "version": self.version,
                "feature": bins.name,
                "tensor": bins.tensor,
                "reason": why,
            },
        )

    def add(self, batches: Sequence[_Batch]) -> None:
        """Count ``batches`` (counting thread): each tensor stacked once, its numeric columns
        counted together, other features one by one."""
        found: dict[str, np.ndarray] = {}
        yield_at = time.perf_counter() + _HOLD_S
        sides = (
            (self._feature_plan, [b[0] for b in batches]),
            (self._output_plan, [b[1] for b in batches]),
        )
        for plan, mappings in sides:
            for tensor, (together, alone) in plan.items():
                table = _gather(mappings, tensor)
                if table is None:
                    for bins in (*(together.features if together else ()), *alone):
                        self._skip(bins, f"the requests or answers have no tensor {tensor!r}")
                    continue
                stacked = table[0]
                if together is None:
                    pass
                elif stacked is not None and int(together.columns.max()) < stacked.shape[1]:
                    counted = together.count(stacked)
                    found.update(zip(together.names, counted, strict=True))
                else:  # a column the tensor lacks: one by one, so only that feature is skipped
                    alone = (*together.features, *alone)
                for bins in alone:
                    counts = self._count(bins, table)
                    if counts is not None:
                        found[bins.name] = counts
                    if time.perf_counter() > yield_at:
                        # Hand the GIL to the serving thread now and then: a request that
                        # arrives while a pass counts waits a fraction of a millisecond.
                        time.sleep(0)
                        yield_at = time.perf_counter() + _HOLD_S
        rows = sum(b[2] for b in batches)
        with self._lock:
            self._rows += rows
            for name, counts in found.items():
                self._counts[name] += counts

    def lose(self, rows: int) -> None:
        """``rows`` could not be counted (counting thread); the next take adds them to
        ``unsampled``."""
        with self._lock:
            self._lost += rows

    def _count(self, bins: FeatureBins, table: _Table) -> np.ndarray | None:
        stacked, arrays = table
        try:
            if stacked is not None:
                if bins.column is not None and bins.column >= stacked.shape[1]:
                    raise IndexError(f"column {bins.column} of a {stacked.shape[1]}-column tensor")
                values = feature_values(stacked, bins)
            else:  # rows of different widths cannot stack: take the feature from each alone
                values = np.concatenate([feature_values(a, bins).reshape(-1) for a in arrays])
            return count(values, bins)
        except (IndexError, ValueError, TypeError, ProtocolError) as e:
            self._skip(bins, str(e))
            return None

    def take(self) -> DriftCounts:
        """The counts since the last take, and PSI per name of those alone; starts anew."""
        with self._lock:
            counts, self._counts = self._counts, self._zeros()
            rows, self._rows = self._rows, 0
            lost, self._lost = self._lost, 0
        unsampled, self.unsampled = self.unsampled + lost, 0
        features = {b.name: _tuple(counts[b.name]) for b in self._features if counts[b.name].any()}
        outputs = {b.name: _tuple(counts[b.name]) for b in self._outputs if counts[b.name].any()}
        values: dict[str, float] = {}
        for name, observed in (*features.items(), *outputs.items()):
            try:
                values[name] = psi(self._reference[name], observed)
            except ProtocolError:  # an empty reference: nothing to compare with
                continue
        return DriftCounts(rows, unsampled, features, outputs, values)


def _plan(
    bins: Sequence[FeatureBins],
) -> dict[str, tuple[ColumnBins | None, tuple[FeatureBins, ...]]]:
    """Per tensor: its numeric column features, counted together, and the others."""
    by_tensor: dict[str, list[FeatureBins]] = {}
    for b in bins:
        by_tensor.setdefault(b.tensor, []).append(b)
    plan = {}
    for tensor, features in by_tensor.items():
        together = [f for f in features if counts_together(f)]
        alone = tuple(f for f in features if not counts_together(f))
        plan[tensor] = (ColumnBins(together) if together else None, alone)
    return plan


def _tuple(counts: np.ndarray) -> tuple[int, ...]:
    return tuple(int(c) for c in counts)


def _as_rows(values: np.ndarray) -> np.ndarray:
    """One row per sample, as :func:`protocol.drift.feature_values` reads a tensor."""
    return values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(-1, 1)


def _gather(mappings: list[Tensors], tensor: str) -> _Table | None:
    """Every batch's ``tensor`` as one 2-D table (None when their row widths differ), and the
    arrays themselves; None when a batch lacks the tensor."""
    arrays = []
    for m in mappings:
        values = m.get(tensor)
        if values is None:
            return None
        arrays.append(values)
    if len(arrays) == 1:
        return _as_rows(np.asarray(arrays[0])), arrays
    try:  # the usual case: every batch has the signature's shape but for its rows
        return _as_rows(np.concatenate(arrays)), arrays
    except ValueError:
        pass
    tables = [_as_rows(np.asarray(a)) for a in arrays]
    width = tables[0].shape[1]
    if any(t.shape[1] != width for t in tables):
        return None, arrays
    return np.concatenate(tables), arrays


def _rows(inputs: Tensors) -> int:
    for values in inputs.values():
        return int(values.shape[0]) if values.ndim else 1
    return 0


class DriftCounting:
    """The bounded queue of answered batches and the one thread that counts them.

    ``submit`` runs on the serving thread; the thread starts with the first batch, so an agent
    whose bundles carry no drift profile never starts it, and it sleeps while nothing is queued.
    """

    def __init__(self, buffer_rows: int, gather_s: float = 0.5) -> None:
        self.buffer_rows = buffer_rows  # rows queued at most; more are left uncounted
        self.gather_s = gather_s  # seconds the thread waits for more batches after a wake-up
        self._queue: deque[tuple[DriftTally, Tensors, Tensors, int]] = deque()
        self._queued = 0  # rows ever queued (serving thread)
        self._counted = 0  # rows ever counted (counting thread)
        self._wake = threading.Event()
        self._hurry = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    def submit(self, tally: DriftTally, inputs: Tensors, outputs: Tensors) -> None:
        """Queue one answered batch for counting, or count it as unsampled if the queue is full."""
        rows = _rows(inputs)
        if self._stop or self._queued - self._counted + rows > self.buffer_rows:
            tally.unsampled += rows
            return
        self._queued += rows
        self._queue.append((tally, inputs, outputs, rows))
        if not self._wake.is_set():
            if self._thread is None:
                self._start()
            self._wake.set()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="drift-counting", daemon=True)
        self._thread.start()

    def settle(self, timeout: float = 10.0) -> bool:
        """Count everything queued now, without the gathering pause; False if ``timeout``
        (seconds) passed first. For a final cut, and for tests."""
        target = self._queued
        deadline = time.monotonic() + timeout
        while self._counted < target:
            self._hurry.set()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def close(self) -> None:
        """Stop the counting thread; batches still queued are dropped."""
        self._stop = True
        self._hurry.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _work(self) -> None:
        while True:
            self._wake.wait()
            if self._stop:
                return
            self._hurry.wait(self.gather_s)
            self._hurry.clear()
            # Cleared before draining: a batch queued from here on sets it again.
            self._wake.clear()
            self._drain()

    def _drain(self) -> None:
        by_tally: dict[int, tuple[DriftTally, list[_Batch]]] = {}
        rows = 0
        while True:
            try:
                tally, inputs, outputs, n = self._queue.popleft()
            except IndexError:
                break
            by_tally.setdefault(id(tally), (tally, []))[1].append((inputs, outputs, n))
            rows += n
        for tally, batches in by_tally.values():
            try:
                tally.add(batches)
            except Exception:  # the thread must outlive any one bad batch
                log.exception(
                    "drift counting failed; these rows are not counted",
                    extra={"model": tally.model, "version": tally.version},
                )
                tally.lose(sum(b[2] for b in batches))
        self._counted += rows
