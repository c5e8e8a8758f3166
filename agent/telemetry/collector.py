"""Per-window telemetry of every model version the agent serves, fed by the serving path.

Each (model, version, role) has a :class:`VersionTelemetry` that the serving path looks up once
per version and then counts into: requests answered (with their latency), failed, timed out,
answered by the fallback; outcomes callers post back; shadow comparisons. A request costs a few
integer operations: a bucket found by bisection on :data:`~protocol.telemetry.LATENCY_BUCKETS_MS`
and one list append for the exact percentiles. Batches (model calls, rows, queue time) come from
the batcher's observer, on its worker threads, under a lock taken once per batch.

:meth:`TelemetryCollector.cut` ends the window: it returns one metrics record's fields per
version that saw traffic, one drift record's fields per version that counted rows, and a
:class:`DriftNotice` for each feature or output whose PSI crossed the bundle's alert threshold,
then starts the next window. Whatever reports the windows (or nothing) calls it; the counting
does not depend on a link to the fleet.

The serving path, outcomes and :meth:`~TelemetryCollector.cut` run on the agent's event loop
thread, so the per-request counters need no lock: a count lands in exactly one window.
"""

from __future__ import annotations

import logging
import threading
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
import psutil

from agent.metrics import AgentMetrics
from agent.telemetry.drift import DriftCounting, DriftTally
from protocol.manifest import DriftProfile
from protocol.telemetry import LATENCY_BUCKETS_MS, TelemetryKind, latency_percentile

__all__ = [
    "DriftNotice",
    "Role",
    "TelemetryCollector",
    "TelemetryConfig",
    "VersionTelemetry",
    "Window",
]

log = logging.getLogger(__name__)

Role = Literal["primary", "shadow"]
Key = tuple[str, str, str]  # model, version, role

_BOUNDS_S = tuple(b / 1000 for b in LATENCY_BUCKETS_MS)  # bisected per request, so in seconds
_QUEUE_RING = 4096  # batch queue times kept per window for its p95; a power of two


@dataclass(frozen=True)
class TelemetryConfig:
    enabled: bool = True  # False: nothing is counted and cut() returns nothing
    drift_min_rows: int = 200  # rows a window needs before its PSI may raise a drift notice
    drift_buffer_rows: int = 65536  # rows waiting to be counted at most; more are unsampled
    drift_gather_s: float = 0.5  # seconds the counting thread lets batches gather
    latency_samples: int = 16384  # answers per window with exact percentiles; then histogram


@dataclass(frozen=True)
class Window:
    """One telemetry record's fields, without schema, device_id, seq and dropped.

    ``fields`` validates as ``RECORDS[kind](device_id=..., seq=..., **fields)``.
    """

    kind: TelemetryKind
    fields: dict[str, Any]


@dataclass(frozen=True)
class DriftNotice:
    """A window whose PSI on one feature or output crossed the bundle's ``psi_alert``."""

    model: str
    version: str
    feature: str
    psi: float
    threshold: float
    rows: int
    detail: str  # "psi 0.41 on pixels[3] over 500 rows (alert at 0.25)"


class VersionTelemetry:
    """What one model version did in the current window; counted on the event loop thread."""

    __slots__ = (
        "_counting",
        "_latency",
        "_samples",
        "_samples_cap",
        "_tally",
        "agreements",
        "champion",
        "compared_rows",
        "device",
        "errors",
        "fallbacks",
        "model",
        "outcome_successes",
        "outcomes",
        "requests",
        "role",
        "timeouts",
        "version",
    )

    def __init__(
        self,
        model: str,
        version: str,
        role: Role,
        counting: DriftCounting | None,
        samples: int,
    ) -> None:
        self.model, self.version, self.role = model, version, role
        self.device: str | None = None
        self.champion: str | None = None
        self._counting = counting
        self._samples_cap = samples
        self._tally: DriftTally | None = None
        self._reset()

    def _reset(self) -> None:
        self.requests = self.errors = self.timeouts = self.fallbacks = 0
        self.outcomes = self.outcome_successes = 0
        self.compared_rows = self.agreements = 0
        self._latency = [0] * (len(_BOUNDS_S) + 1)
        self._samples = array("d")  # seconds; 8 bytes each

    def answered(self, seconds: float) -> None:
        """The version answered one request in ``seconds``."""
        self.requests += 1
        self._latency[bisect_left(_BOUNDS_S, seconds)] += 1
        if len(self._samples) < self._samples_cap:
            self._samples.append(seconds)

    def failed(self, *, timeout: bool) -> None:
        """The version failed one request: an error, its open circuit, or (``timeout``) its
        deadline."""
        self.requests += 1
        self.errors += 1
        if timeout:
            self.timeouts += 1

    def fell_back(self) -> None:
        """The fallback answered a request this version failed."""
        self.fallbacks += 1

    def compared(self, rows: int, agreed: int, champion: str) -> None:
        """Shadow: ``rows`` compared with the primary ``champion``, ``agreed`` of them alike."""
        self.compared_rows += rows
        self.agreements += agreed
        self.champion = champion

    def outcome(self, success: bool) -> None:
        """A caller reported how one of this version's answers turned out."""
        self.outcomes += 1
        if success:
            self.outcome_successes += 1

    def observe(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        profile: DriftProfile | None,
    ) -> None:
        """Queue one answered batch for drift counting on ``profile``'s bins (O(1))."""
        if profile is None or self._counting is None:
            return
        tally = self._tally
        if tally is None or tally.profile is not profile:
            tally = self._adopt(profile)
        self._counting.submit(tally, inputs, outputs)

    def _adopt(self, profile: DriftProfile) -> DriftTally:
        """The tally for ``profile``: the current one if it counts on the same bins (the version
        was loaded again), else a new one."""
        tally = self._tally
        if tally is not None and tally.profile == profile:
            tally.profile = profile  # the same bins: later requests match by identity again
            return tally
        self._tally = DriftTally(self.model, self.version, self.role, profile)
        return self._tally

    def _take(self) -> dict[str, Any]:
        """This window's counts as metrics fields; starts the next window."""
        latency, samples = self._latency, self._samples
        answered = sum(latency)
        fields: dict[str, Any] = {
            "model": self.model,
            "version": self.version,
            "role": self.role,
            "requests": self.requests,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "fallbacks": self.fallbacks,
            "latency_counts": tuple(latency),
            "outcomes": self.outcomes,
            "outcome_successes": self.outcome_successes,
            "compared": self.compared_rows,
            "agreements": self.agreements,
            "champion": self.champion,
            "device": self.device,
        }
        self._reset()
        quantiles = (0.5, 0.95, 0.99)
        p50: float | None
        p95: float | None
        p99: float | None
        if answered and len(samples) == answered:  # every answer's latency is at hand
            exact = np.quantile(np.frombuffer(samples, dtype=np.float64), quantiles) * 1000
            p50, p95, p99 = (float(v) for v in exact)
        elif answered:
            p50, p95, p99 = (latency_percentile(latency, q) for q in quantiles)
        else:
            p50 = p95 = p99 = None
        fields.update(latency_p50_ms=p50, latency_p95_ms=p95, latency_p99_ms=p99)
        return fields


class _Batches:
    """Model calls of one (model, version) in the current window, from the batcher's threads."""

    __slots__ = ("_lock", "batches", "queue", "queue_ns", "rows")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.batches = self.rows = self.queue_ns = 0
        self.queue = [0] * _QUEUE_RING  # the latest batches' mean queue times, ns

    def __call__(self, rows: int, queue_ns: int) -> None:
        with self._lock:
            self.queue[self.batches & (_QUEUE_RING - 1)] = queue_ns
            self.batches += 1
            self.rows += rows
            self.queue_ns += queue_ns * rows

    def take(self) -> dict[str, Any]:
        with self._lock:
            batches, rows, total = self.batches, self.rows, self.queue_ns
            kept = self.queue[: min(batches, _QUEUE_RING)]
            self.batches = self.rows = self.queue_ns = 0
        return {
            "batches": batches,
            "batch_rows": rows,
            "queue_ms_mean": total / rows / 1e6 if rows else None,
            "queue_ms_p95": float(np.percentile(kept, 95)) / 1e6 if kept else None,
        }


class TelemetryCollector:
    """Every version's telemetry for the current window; :meth:`cut` ends the window."""

    def __init__(
        self,
        config: TelemetryConfig | None = None,
        metrics: AgentMetrics | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.config = config or TelemetryConfig()
        self._metrics = metrics
        self._clock = clock
        self._versions: dict[Key, VersionTelemetry] = {}
        self._batches: dict[tuple[str, str], _Batches] = {}
        self.drift = DriftCounting(self.config.drift_buffer_rows, self.config.drift_gather_s)
        self._start = clock()
        self._started = time.perf_counter()
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first reading starts the interval
        self._gauged: set[tuple[str, ...]] = set()
        self._psi_gauged: set[tuple[str, ...]] = set()

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def version(self, model: str, version: str, role: Role = "primary") -> VersionTelemetry:
        """The telemetry of ``model@version`` in ``role``; look it up once per version.

        With telemetry off it is a detached one whose counts no window reports.
        """
        key = (model, version, role)
        found = self._versions.get(key)
        if found is None:
            if not self.enabled:
                return VersionTelemetry(model, version, role, None, 0)
            found = self._versions[key] = VersionTelemetry(
                model, version, role, self.drift, self.config.latency_samples
            )
        return found

    def find(self, model: str, version: str, role: Role = "primary") -> VersionTelemetry | None:
        """The telemetry of ``model@version`` if that version has been served since start."""
        return self._versions.get((model, version, role))

    def observe(
        self,
        model: str,
        version: str,
        role: Role,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        profile: DriftProfile | None,
    ) -> None:
        """Hand one answered batch to drift counting; O(1) on the request path."""
        if profile is None or not self.enabled:
            return
        self.version(model, version, role).observe(inputs, outputs, profile)

    def batches(self, model: str, version: str) -> Callable[[int, int], None] | None:
        """The batcher-observer hook of one loaded version: ``(rows, mean queue ns)`` per call.

        Model calls count towards the version's primary window, or its shadow window if it only
        runs as a shadow. None with telemetry off.
        """
        if not self.enabled:
            return None
        return self._batches.setdefault((model, version), _Batches())

    def cut(self) -> tuple[list[Window], list[DriftNotice]]:
        """End the current window (start..now) and start the next.

        Returns one metrics window per (model, version, role) that saw traffic, one drift
        window per version with a drift profile that counted (or had to skip) rows, and a
        notice per feature or output whose PSI reached the profile's ``psi_alert`` over at
        least ``drift_min_rows`` rows.
        """
        start = self._start
        end = max(self._clock(), start)  # a wall clock stepped back must not invert a window
        now = time.perf_counter()
        seconds, self._start, self._started = now - self._started, end, now
        if not self.enabled:
            return [], []
        common = {"start": start, "end": end}
        process = self._process_fields()
        calls = {key: batches.take() for key, batches in self._batches.items()}
        for model, version in calls:  # batches of a version nothing else has counted yet
            if not any((model, version, role) in self._versions for role in ("primary", "shadow")):
                self.version(model, version)
        windows: list[Window] = []
        notices: list[DriftNotice] = []
        for (model, version, role), telemetry in list(self._versions.items()):
            fields = telemetry._take()
            owner = role == "primary" or (model, version, "primary") not in self._versions
            batch = calls.get((model, version)) if owner else None
            fields.update(batch or _NO_BATCHES)
            if fields["requests"] or fields["outcomes"] or fields["compared"] or fields["batches"]:
                fields.update(common, seconds=seconds, **process)
                windows.append(Window("metrics", fields))
            tally = telemetry._tally
            if tally is not None:
                drift = tally.take()
                if drift.rows or drift.unsampled:
                    windows.append(
                        Window(
                            "drift",
                            {
                                **common,
                                "model": model,
                                "version": version,
                                "role": role,
                                "rows": drift.rows,
                                "unsampled": drift.unsampled,
                                "features": drift.features,
                                "outputs": drift.outputs,
                                "psi": drift.psi,
                            },
                        )
                    )
                    notices += self._notices(tally, drift.rows, drift.psi)
        self._export(windows)
        return windows, notices

    def _notices(self, tally: DriftTally, rows: int, values: dict[str, float]) -> list[DriftNotice]:
        threshold = tally.profile.psi_alert
        if rows < self.config.drift_min_rows:
            return []
        return [
            DriftNotice(
                tally.model,
                tally.version,
                name,
                value,
                threshold,
                rows,
                f"psi {value:.2f} on {name} over {rows} rows (alert at {threshold:g})",
            )
            for name, value in values.items()
            if value >= threshold
        ]

    def _process_fields(self) -> dict[str, float | None]:
        try:
            return {
                "cpu_percent": round(self._process.cpu_percent(None), 2),
                "rss_mb": round(self._process.memory_info().rss / 2**20, 2),
            }
        except psutil.Error as e:  # a sandbox without /proc: the windows go without them
            log.debug("process statistics unavailable", extra={"error": str(e)})
            return {"cpu_percent": None, "rss_mb": None}

    def _export(self, windows: list[Window]) -> None:
        """The last window's p95 latency and PSI as gauges; versions that went quiet drop out."""
        metrics = self._metrics
        if metrics is None:
            return
        gauged: set[tuple[str, ...]] = set()
        psi_gauged: set[tuple[str, ...]] = set()
        for window in windows:
            f = window.fields
            if window.kind == "metrics" and f["latency_p95_ms"] is not None:
                version = (f["model"], f["version"])
                metrics.window_latency_p95.labels(*version).set(f["latency_p95_ms"] / 1000)
                gauged.add(version)
            elif window.kind == "drift":
                for name, value in f["psi"].items():
                    feature = (f["model"], f["version"], name)
                    metrics.drift_psi.labels(*feature).set(value)
                    psi_gauged.add(feature)
        for labels in self._gauged - gauged:
            metrics.window_latency_p95.remove(*labels)
        for labels in self._psi_gauged - psi_gauged:
            metrics.drift_psi.remove(*labels)
        self._gauged, self._psi_gauged = gauged, psi_gauged

    def settle(self, timeout: float = 1.0) -> bool:
        """Count the rows still queued for drift counting (seconds: at most ``timeout``), so
        that the next :meth:`cut` holds them; for the last cut before the agent stops. Blocks
        the calling thread; False if the time ran out."""
        return self.drift.settle(timeout)

    def close(self) -> None:
        """Stop the drift counting thread."""
        self.drift.close()


_NO_BATCHES: dict[str, Any] = {
    "batches": 0,
    "batch_rows": 0,
    "queue_ms_mean": None,
    "queue_ms_p95": None,
}
