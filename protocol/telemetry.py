"""Telemetry records: what an agent reports per model and window on ``telemetry/<kind>``.

Two kinds, each one JSON object per (model, version, role) and window::

    <root>/devices/<id>/telemetry/metrics   MetricsWindow: flat numbers (requests, p95, cpu ...)
    <root>/devices/<id>/telemetry/drift     DriftWindow: counts on the bundle's reference bins

The numbers are flat top-level fields so that Grafana's MQTT source, Telegraf's JSON parser or
Node-RED read them without a transformation; ``model``, ``version`` and ``role`` are the tags.

Every record carries ``seq``, one per-device sequence shared by both kinds and never reused
(the agent's spool persists it), so the fleet ingests idempotently on ``(device_id, seq)`` and
can name every gap. ``dropped`` counts the records the agent's spool discarded at its bound
since the previous record it sent: loss is reported, never silent.

Counts merge by addition: the latency histogram's buckets (:data:`LATENCY_BUCKETS_MS`) and the
drift histograms (the bundle's reference bins) are the same on every device, so the fleet sums
them across devices and windows and recomputes percentiles and PSI from the sums.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, ConfigDict, Field, model_validator

from protocol.mqtt import MAX_SEQ, _Message

__all__ = [
    "LATENCY_BUCKETS_MS",
    "MAX_BINS",
    "MAX_COUNT",
    "MAX_FEATURES",
    "RECORDS",
    "DriftWindow",
    "MetricsWindow",
    "TelemetryKind",
    "TelemetryRecord",
    "latency_percentile",
]

TelemetryKind = Literal["metrics", "drift"]

# Upper bounds (ms) of the latency histogram's buckets; one more count holds everything slower.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
    5000.0, 10000.0,
)  # fmt: skip
MAX_FEATURES = 1024  # histograms per drift record (features plus outputs)
MAX_BINS = 256  # counts per histogram; a profile has bins + 2 (under- and overflow) per feature
# Any one count in one window. A device serving a million requests a second fills 2^40 in 12 days
# of one window; sums of a million such counts still fit the fleet's 64-bit integers.
MAX_COUNT = 2**40
# Windows must fall in these years: a device whose clock is unset (1970) or wildly off says so.
FIRST_YEAR, LAST_YEAR = 2000, 2199

_Name = Field(min_length=1, max_length=128)


class TelemetryRecord(_Message):
    """What both kinds share: who, which window, which sequence number."""

    # NaN and infinity are not numbers a dashboard or a sum can use: refused at the door.
    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False
    )

    seq: int = Field(ge=1, le=MAX_SEQ, description="per device, both kinds, never reused")
    dropped: int = Field(
        default=0, ge=0, le=MAX_COUNT, description="records the spool dropped since the last one"
    )
    start: AwareDatetime
    end: AwareDatetime
    model: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=128)
    role: Literal["primary", "shadow"] = Field(
        default="primary", description="shadow: a challenger run beside the primary, unseen"
    )

    @model_validator(mode="after")
    def _ordered(self) -> TelemetryRecord:
        for name, at in (("start", self.start), ("end", self.end)):
            if not FIRST_YEAR <= at.year <= LAST_YEAR:
                raise ValueError(
                    f"{name} ({at.isoformat()}) is not between {FIRST_YEAR} and {LAST_YEAR}: "
                    "is the device's clock set?"
                )
        if self.end < self.start:
            raise ValueError(
                f"end ({self.end.isoformat()}) is before start ({self.start.isoformat()})"
            )
        return self


class MetricsWindow(TelemetryRecord):
    """How one model version served during one window, as flat numbers."""

    seconds: float = Field(ge=0, le=10**7, description="length of the window")
    requests: int = Field(
        ge=0, le=MAX_COUNT, description="requests the version took (answered or failed)"
    )
    errors: int = Field(
        ge=0, le=MAX_COUNT, description="requests it failed: error, deadline or open circuit"
    )
    timeouts: int = Field(ge=0, le=MAX_COUNT, description="of the errors, deadline misses")
    fallbacks: int = Field(
        ge=0, le=MAX_COUNT, description="of the failed requests, those the fallback answered"
    )
    latency_p50_ms: float | None = Field(default=None, ge=0)
    latency_p95_ms: float | None = Field(default=None, ge=0)
    latency_p99_ms: float | None = Field(default=None, ge=0)
    latency_counts: tuple[int, ...] = Field(
        default=(0,) * (len(LATENCY_BUCKETS_MS) + 1),
        description="answered requests per LATENCY_BUCKETS_MS bucket, then slower ones",
    )
    batches: int = Field(default=0, ge=0, le=MAX_COUNT, description="model calls")
    batch_rows: int = Field(default=0, ge=0, le=MAX_COUNT, description="rows over those calls")
    queue_ms_mean: float | None = Field(default=None, ge=0, description="time waiting to batch")
    queue_ms_p95: float | None = Field(default=None, ge=0)
    device: str | None = Field(default=None, max_length=64, description="where it really ran")
    cpu_percent: float | None = Field(default=None, ge=0, description="the agent process")
    rss_mb: float | None = Field(default=None, ge=0, description="the agent process")
    outcomes: int = Field(default=0, ge=0, le=MAX_COUNT, description="outcomes callers posted back")
    outcome_successes: int = Field(default=0, ge=0, le=MAX_COUNT)
    compared: int = Field(
        default=0, ge=0, le=MAX_COUNT, description="shadow: rows compared with the primary"
    )
    agreements: int = Field(
        default=0, ge=0, le=MAX_COUNT, description="shadow: rows where both agreed"
    )
    champion: str | None = Field(
        default=None, max_length=128, description="shadow: the primary version compared with"
    )

    @model_validator(mode="after")
    def _consistent(self) -> MetricsWindow:
        if len(self.latency_counts) != len(LATENCY_BUCKETS_MS) + 1:
            raise ValueError(
                f"latency_counts has {len(self.latency_counts)} buckets, not "
                f"{len(LATENCY_BUCKETS_MS) + 1}"
            )
        if min(self.latency_counts) < 0:  # min(), not a generator: the fleet decodes thousands/s
            raise ValueError("latency_counts holds a negative count")
        if max(self.latency_counts) > MAX_COUNT:
            raise ValueError(f"latency_counts holds a count over {MAX_COUNT}")
        for part, whole in (
            ("errors", "requests"),
            ("timeouts", "errors"),
            ("fallbacks", "errors"),
            ("outcome_successes", "outcomes"),
            ("agreements", "compared"),
        ):
            if getattr(self, part) > getattr(self, whole):
                raise ValueError(f"{part} ({getattr(self, part)}) exceeds {whole}")
        if sum(self.latency_counts) > self.requests:
            raise ValueError(
                f"latency_counts sum to {sum(self.latency_counts)}, more than the "
                f"{self.requests} requests"
            )
        return self

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


class DriftWindow(TelemetryRecord):
    """Counts of one window's inputs and outputs on the bundle's reference bins.

    ``features`` and ``outputs`` map a drift profile's feature names to counts (one per bin,
    under- and overflow included); ``psi`` is this window alone against the reference, for
    dashboards — the fleet recomputes PSI from summed counts.
    """

    rows: int = Field(ge=0, le=MAX_COUNT, description="rows counted")
    unsampled: int = Field(
        default=0,
        ge=0,
        le=MAX_COUNT,
        description="rows not counted because counting fell behind serving",
    )
    features: dict[str, tuple[int, ...]] = Field(default_factory=dict, max_length=MAX_FEATURES)
    outputs: dict[str, tuple[int, ...]] = Field(default_factory=dict, max_length=MAX_FEATURES)
    psi: dict[str, float] = Field(default_factory=dict, max_length=2 * MAX_FEATURES)

    @model_validator(mode="after")
    def _counts(self) -> DriftWindow:
        for where, histograms in (("features", self.features), ("outputs", self.outputs)):
            for name, counts in histograms.items():
                if not 1 <= len(name) <= 128:
                    raise ValueError(f"{where}: a name must have 1-128 characters")
                if not 1 <= len(counts) <= MAX_BINS:
                    raise ValueError(f"{where}.{name}: {len(counts)} bins, not 1-{MAX_BINS}")
                if min(counts) < 0:  # not empty: checked above
                    raise ValueError(f"{where}.{name}: a count is negative")
                if max(counts) > MAX_COUNT:
                    raise ValueError(f"{where}.{name}: a count is over {MAX_COUNT}")
        for name, value in self.psi.items():
            if not 0 <= value <= 1e6:
                raise ValueError(f"psi.{name}: {value} is not between 0 and 1e6")
        return self


RECORDS: dict[str, type[TelemetryRecord]] = {"metrics": MetricsWindow, "drift": DriftWindow}


def latency_percentile(counts: tuple[int, ...] | list[int], q: float) -> float | None:
    """The ``q`` quantile (0-1) of a latency histogram, in ms, interpolated within its bucket.

    Summed histograms from many devices give fleet-wide percentiles this way; the slowest bucket
    has no upper bound, so a quantile that falls there reports its lower bound.
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    lower = 0.0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(LATENCY_BUCKETS_MS):
                return LATENCY_BUCKETS_MS[-1]
            upper = LATENCY_BUCKETS_MS[i]
            return lower + (upper - lower) * max(rank - seen, 0.0) / n
        seen += n
        lower = LATENCY_BUCKETS_MS[i] if i < len(LATENCY_BUCKETS_MS) else lower
    return LATENCY_BUCKETS_MS[-1]
