"""What the experiment tests share: metrics windows written through the fleet's telemetry store
exactly as the ingest writes them, with the counts a test chooses."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Literal

from fleet.store import Store
from protocol.telemetry import LATENCY_BUCKETS_MS, MetricsWindow


def latency(requests: int, bucket: int, spread: int = 1) -> tuple[int, ...]:
    """A latency histogram of ``requests`` over ``spread`` buckets from index ``bucket`` on."""
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for i in range(spread):
        counts[bucket + i] += requests // spread + (1 if i < requests % spread else 0)
    return tuple(counts)


def write_windows(
    store: Store,
    devices: Sequence[str],
    version: str,
    *,
    start: datetime,
    requests: int,
    errors: int = 0,
    fallbacks: int = 0,
    outcomes: int = 0,
    successes: int = 0,
    bucket: int = 5,
    spread: int = 1,
    role: Literal["primary", "shadow"] = "primary",
    compared: int = 0,
    agreements: int = 0,
    champion: str | None = None,
    model: str = "digits",
) -> None:
    """One 10 s window per device; every count is split evenly over the devices."""
    records = []
    n = len(devices)
    for i, device_id in enumerate(devices):

        def share(total: int, i: int = i) -> int:
            return total // n + (1 if i < total % n else 0)

        answered = share(requests) - share(errors)
        stream = store.telemetry.stream(device_id)
        seq = 1 if stream is None else stream.high_seq + 1
        records.append(
            MetricsWindow(
                device_id=device_id,
                seq=seq,
                start=start,
                end=start + timedelta(seconds=10),
                model=model,
                version=version,
                role=role,
                seconds=10.0,
                requests=share(requests),
                errors=share(errors),
                timeouts=0,
                fallbacks=share(fallbacks),
                latency_counts=latency(answered, bucket, spread),
                outcomes=share(outcomes),
                outcome_successes=share(successes),
                compared=share(compared),
                agreements=share(agreements),
                champion=champion,
            )
        )
    store.telemetry.take(records, start)
