"""Per-version request counters: what probation compares, counted on the serving path.

Every request the primary takes is counted against its (model, version): answered with a
latency sample, failed, and whether the fallback answered instead. The serving path and the
readers all run on the event loop thread, so the counters need no lock; each request costs a
few integer operations and one list store. Windows are cut afterwards from cumulative marks,
and the p95 is computed only when a window is read, never per request. When an update ends,
the update lifecycle evicts the counters of versions that neither serve nor may serve again
(see :meth:`VersionWindows.evict`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np

from protocol.mqtt import VersionWindow

__all__ = ["Mark", "VersionCounter", "VersionWindows"]

_RING = 4096  # latency samples kept per version; a power of two so the index is a mask
_CHECKPOINT_S = 1.0  # seconds between the marks that "the last N seconds" is cut from
_HISTORY = 3600  # marks kept per version: an hour of traffic at one mark a second


@dataclass(frozen=True)
class Mark:
    """The cumulative counts of one version at one moment (``at``: perf_counter seconds)."""

    at: float
    requests: int
    errors: int
    fallbacks: int
    samples: int  # latency samples taken so far


class VersionCounter:
    """Cumulative counts of one model version; only the event loop thread touches it."""

    __slots__ = (
        "_clock",
        "_latency",
        "_marks",
        "_next_mark",
        "errors",
        "fallbacks",
        "requests",
        "samples",
        "version",
    )

    def __init__(self, version: str, clock: Callable[[], float] = time.perf_counter) -> None:
        self.version = version
        self.requests = 0
        self.errors = 0
        self.fallbacks = 0
        self.samples = 0
        self._clock = clock
        self._latency = [0.0] * _RING
        now = clock()
        self._marks: deque[Mark] = deque([Mark(now, 0, 0, 0, 0)], maxlen=_HISTORY)
        self._next_mark = now + _CHECKPOINT_S

    def answered(self, seconds: float, now: float) -> None:
        """The primary answered in ``seconds``; ``now`` is the perf_counter it finished at."""
        if now >= self._next_mark:
            self._checkpoint(now)
        self.requests += 1
        self._latency[self.samples & (_RING - 1)] = seconds
        self.samples += 1

    def failed(self, now: float) -> None:
        """The primary failed this request (error, deadline, or its circuit was open)."""
        if now >= self._next_mark:
            self._checkpoint(now)
        self.requests += 1
        self.errors += 1

    def fell_back(self) -> None:
        """The fallback answered a request this version failed."""
        self.fallbacks += 1

    def _checkpoint(self, now: float) -> None:
        # Taken before the request that triggers it is counted: the mark is the state at `now`.
        self._marks.append(Mark(now, self.requests, self.errors, self.fallbacks, self.samples))
        self._next_mark = now + _CHECKPOINT_S

    def mark(self) -> Mark:
        """The counts as of now."""
        return Mark(self._clock(), self.requests, self.errors, self.fallbacks, self.samples)

    def window(self, start: Mark, end: Mark | None = None) -> VersionWindow:
        """What this version did between two marks (``end``: now)."""
        end = end or self.mark()
        # Samples taken after `end` may have overwritten the oldest ones of the window.
        count = min(end.samples - start.samples, _RING - (self.samples - end.samples))
        p95 = None
        if count > 0:
            index = np.arange(end.samples - count, end.samples) & (_RING - 1)
            p95 = float(np.percentile(np.asarray(self._latency)[index], 95)) * 1000
        return VersionWindow(
            version=self.version,
            requests=end.requests - start.requests,
            errors=end.errors - start.errors,
            fallbacks=end.fallbacks - start.fallbacks,
            p95_ms=p95,
            seconds=max(end.at - start.at, 0.0),
        )

    def recent(self, seconds: float) -> VersionWindow:
        """The last ``seconds`` (a mark's interval more at most), or everything since start."""
        now = self._clock()
        start = self._marks[0]
        for mark in reversed(self._marks):
            if mark.at <= now - seconds:
                start = mark
                break
        end = Mark(now, self.requests, self.errors, self.fallbacks, self.samples)
        return self.window(start, end)


class VersionWindows:
    """Every version's counter, looked up once per served version rather than per request."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._counters: dict[tuple[str, str], VersionCounter] = {}

    def counter(self, model: str, version: str) -> VersionCounter:
        """The counter of ``model@version``, created at zero the first time."""
        key = (model, version)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = VersionCounter(version, self._clock)
        return counter

    def get(self, model: str, version: str) -> VersionCounter | None:
        return self._counters.get((model, version))

    def evict(self, keep: Collection[tuple[str, str]]) -> list[tuple[str, str]]:
        """Drop the counter of every ``(model, version)`` not in ``keep``; returns those dropped.

        Each counter holds its latency ring and an hour of marks (about half a megabyte): the
        counters of versions no longer served must go, or a long-lived device that takes many
        updates grows without bound. A version served again starts a new counter at zero.
        """
        gone = [key for key in self._counters if key not in keep]
        for key in gone:
            del self._counters[key]
        return gone
