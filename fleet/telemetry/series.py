"""Time series for the console's charts: one metric of a model (version, group) per time step.

Every record lands in the step its window starts in (an hourly rollup at its hour, so older
ranges are coarser), and each step's value is computed from the step's sums: rates from summed
counts, the fleet's p95 latency from the summed latency histograms, PSI from the summed drift
counts against the version's reference. A step without data has no value (None), so a chart
shows a gap instead of a zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from fleet.errors import InvalidQueryError
from fleet.store import Store
from fleet.store.drift import DriftRecord, MetricsRecord, TelemetryReads
from fleet.telemetry.drift import FleetDrift, compare
from protocol.telemetry import LATENCY_BUCKETS_MS, latency_percentile

__all__ = ["MAX_POINTS", "METRICS", "Metric", "Series", "SeriesPoint", "TelemetrySeries"]

Metric = Literal["requests", "error_rate", "fallback_rate", "latency_p95_ms", "psi"]
METRICS: tuple[str, ...] = get_args(Metric)
MAX_POINTS = 1000  # steps one series may have


class SeriesPoint(BaseModel):
    """One step: its start, the metric's value (None without data) and what it stands on."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    value: float | None
    samples: int = Field(description="requests, timed requests or drift rows in the step")


class Series(BaseModel):
    """One metric over time, one point per step from ``since``."""

    model_config = ConfigDict(frozen=True)

    model: str
    version: str | None
    group: str | None
    metric: Metric
    feature: str | None = Field(description="psi: the feature or output; None: the worst")
    since: datetime
    until: datetime
    step_s: float
    points: tuple[SeriesPoint, ...]


class TelemetrySeries:
    """Builds series from the fleet database."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._reads = TelemetryReads(store.db)
        self._drift = FleetDrift(store)

    def series(
        self,
        model: str,
        metric: Metric,
        *,
        since: datetime,
        until: datetime,
        step_s: float,
        version: str | None = None,
        group: str | None = None,
        feature: str | None = None,
    ) -> Series:
        """The series; :class:`InvalidQueryError` names the parameter that does not fit."""
        steps = self._check(model, metric, since, until, step_s, version, group, feature)
        step = timedelta(seconds=step_s)

        def index(at: datetime) -> int:
            return min(int((at - since) / step), steps - 1)

        if metric == "psi":
            assert version is not None  # checked
            values = self._psi(model, version, group, feature, since, until, index, steps)
        else:
            records = self._reads.metrics(model, version, since=since, until=until, group=group)
            values = _metric(metric, records, index, steps)
        return Series(
            model=model,
            version=version,
            group=group,
            metric=metric,
            feature=feature,
            since=since,
            until=until,
            step_s=step_s,
            points=tuple(
                SeriesPoint(at=since + i * step, value=value, samples=samples)
                for i, (value, samples) in enumerate(values)
            ),
        )

    def _check(
        self,
        model: str,
        metric: Metric,
        since: datetime,
        until: datetime,
        step_s: float,
        version: str | None,
        group: str | None,
        feature: str | None,
    ) -> int:
        if since >= until:
            raise InvalidQueryError(
                "since", f"{since.isoformat()} is not before until ({until.isoformat()})"
            )
        steps = math.ceil((until - since) / timedelta(seconds=step_s))
        if steps > MAX_POINTS:
            raise InvalidQueryError(
                "step",
                f"{step_s:g} s over {(until - since).total_seconds():g} s gives {steps} points, "
                f"more than {MAX_POINTS}; use a step of at least "
                f"{math.ceil((until - since).total_seconds() / MAX_POINTS)} s",
            )
        published = [v.version for v in self._store.models.find(model)]
        if not published:
            raise InvalidQueryError("model", f"no version of {model!r} is published")
        if version is not None and version not in published:
            raise InvalidQueryError(
                "version", f"{model}@{version} is not published (published: {', '.join(published)})"
            )
        if group is not None and group not in self._store.devices.labels("group"):
            raise InvalidQueryError("group", f"no device is in a group named {group!r}")
        if metric != "psi":
            if feature is not None:
                raise InvalidQueryError("feature", "only the psi metric is per feature")
            return steps
        if version is None:
            raise InvalidQueryError(
                "version", "the psi metric needs a version: each version has its own bins"
            )
        if feature is not None:
            profile = self._drift.profile(model, version)
            names = [b.name for b in (*profile.features, *profile.outputs)]
            if feature not in names:
                raise InvalidQueryError(
                    "feature",
                    f"{model}@{version}'s drift profile has no feature or output {feature!r} "
                    f"(it has: {', '.join(names[:20])}{', ...' if len(names) > 20 else ''})",
                )
        return steps

    def _psi(
        self,
        model: str,
        version: str,
        group: str | None,
        feature: str | None,
        since: datetime,
        until: datetime,
        index: Callable[[datetime], int],
        steps: int,
    ) -> list[tuple[float | None, int]]:
        profile = self._drift.profile(model, version)

        def bucket(record: DriftRecord) -> tuple[str]:
            return (str(index(record.start)),)

        sums = self._drift.sums(
            model, version, profile, since=since, until=until, group=group, scopes=bucket
        )
        values: list[tuple[float | None, int]] = []
        for i in range(steps):
            counts = sums.get(str(i))
            if counts is None:
                values.append((None, 0))
                continue
            histograms = [*compare(counts, profile, "feature"), *compare(counts, profile, "output")]
            if feature is not None:
                chosen = next(h for h in histograms if h.name == feature)
                values.append((chosen.psi, chosen.rows))
                continue
            psis = [h.psi for h in histograms if h.psi is not None]
            values.append((max(psis) if psis else None, counts.rows))
        return values


def _metric(
    metric: Metric, records: Iterable[MetricsRecord], index: Callable[[datetime], int], steps: int
) -> list[tuple[float | None, int]]:
    seen = [False] * steps
    requests = [0] * steps
    events = [0] * steps
    latency = [[0] * (len(LATENCY_BUCKETS_MS) + 1) for _ in range(steps)]
    for record in records:
        i = index(record.start)
        seen[i] = True
        requests[i] += record.requests
        if metric == "error_rate":
            events[i] += record.errors
        elif metric == "fallback_rate":
            events[i] += record.fallbacks
        elif metric == "latency_p95_ms" and len(record.latency_counts) == len(latency[i]):
            latency[i] = [a + b for a, b in zip(latency[i], record.latency_counts, strict=True)]
    if metric == "requests":
        return [(float(n) if s else None, n) for n, s in zip(requests, seen, strict=True)]
    if metric == "latency_p95_ms":
        return [(latency_percentile(counts, 0.95), sum(counts)) for counts in latency]
    return [(e / n if n else None, n) for e, n in zip(events, requests, strict=True)]
