"""Probation: a newly activated version is watched under real traffic and judged against the
version it replaced, before its desired state is committed.

The baseline is the previous version's window over the last ``seconds`` before activation (or
since it started serving). The candidate is watched for ``seconds`` or until it has seen
``requests`` requests, whichever comes first. It fails when its error rate or fallback rate
rises more than an absolute margin over the baseline's, or its p95 latency passes the
baseline's times a ratio (judged only when both have enough latency samples, and never for an
increase smaller than ``min_latency_ms``: microsecond jitter is not a regression). Too little
traffic to judge passes: the fleet's gates judge across devices.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from agent.windows import Mark, VersionCounter
from protocol.mqtt import ProbationReport, VersionWindow

__all__ = ["LATENCY_MIN_SAMPLES", "ProbationPolicy", "Watch", "judge", "watch"]

LATENCY_MIN_SAMPLES = 20  # latency samples each side needs before p95s are compared
_POLL_S = 0.05  # seconds between looks at the request counts while watching


@dataclass(frozen=True)
class ProbationPolicy:
    """How long to watch and what counts as worse; every limit carries its unit."""

    seconds: float = 30.0  # seconds to watch; 0 skips probation
    requests: int = 200  # requests that end the watch early
    min_requests: int = 20  # requests needed to judge at all (each side, for rates)
    max_error_increase: float = 0.02  # absolute rise of the error rate (0.02 = 2 points)
    max_fallback_increase: float = 0.02  # absolute rise of the fallback rate
    max_latency_ratio: float = 1.5  # candidate p95 / baseline p95
    min_latency_ms: float = 1.0  # ms; smaller p95 increases never fail probation


@dataclass(frozen=True)
class Watch:
    """One model under probation: its new version's counter from activation on, its baseline."""

    model: str
    counter: VersionCounter
    start: Mark
    baseline: VersionWindow | None


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def judge(
    model: str, candidate: VersionWindow, baseline: VersionWindow | None, policy: ProbationPolicy
) -> tuple[ProbationReport, str | None]:
    """The verdict on one model, and the one-word reason when it failed.

    ``reason`` is ``error_rate``, ``fallback_rate`` or ``latency``; the report's own reason
    carries the numbers.
    """

    def report(reason: str | None, text: str) -> tuple[ProbationReport, str | None]:
        verdict: Literal["passed", "failed"] = "failed" if reason is not None else "passed"
        return (
            ProbationReport(
                model=model, candidate=candidate, baseline=baseline, verdict=verdict, reason=text
            ),
            reason,
        )

    if candidate.requests < policy.min_requests:
        return report(
            None,
            f"too few requests to judge ({candidate.requests} in {candidate.seconds:.1f} s, "
            f"{policy.min_requests} needed); committed, the fleet's gates judge across devices",
        )
    # A baseline with too little traffic says nothing: the candidate is held to zero.
    known = baseline if baseline is not None and baseline.requests >= policy.min_requests else None
    rates = (
        ("error_rate", candidate.error_rate, known.error_rate if known else 0.0,
         policy.max_error_increase),
        ("fallback_rate", candidate.fallback_rate, known.fallback_rate if known else 0.0,
         policy.max_fallback_increase),
    )  # fmt: skip
    for reason, mine, theirs, margin in rates:
        theirs = theirs or 0.0
        assert mine is not None  # it has requests here
        if mine > theirs + margin:
            return report(
                reason,
                f"{reason}: {_rate(mine)} of {candidate.requests} requests against "
                f"{_rate(theirs)} before, more than the {margin:.1%} allowed",
            )
    latency = _latency(candidate, known, policy)
    if latency is not None:
        return report("latency", latency)
    return report(
        None,
        f"{candidate.requests} requests: errors {_rate(candidate.error_rate)}, fallbacks "
        f"{_rate(candidate.fallback_rate)}, p95 {_ms(candidate.p95_ms)} "
        f"(before: {_summary(baseline)})",
    )


def _latency(
    candidate: VersionWindow, baseline: VersionWindow | None, policy: ProbationPolicy
) -> str | None:
    """Why the candidate is too slow, or None (also when there are too few samples to say)."""
    if baseline is None or candidate.p95_ms is None or baseline.p95_ms is None:
        return None
    if min(_samples(candidate), _samples(baseline)) < LATENCY_MIN_SAMPLES:
        return None
    limit = max(baseline.p95_ms * policy.max_latency_ratio, baseline.p95_ms + policy.min_latency_ms)
    if candidate.p95_ms <= limit:
        return None
    return (
        f"latency: p95 {_ms(candidate.p95_ms)} against {_ms(baseline.p95_ms)} before, over "
        f"the {policy.max_latency_ratio:g}x allowed ({_samples(candidate)} and "
        f"{_samples(baseline)} samples)"
    )


def _samples(window: VersionWindow) -> int:
    # Only answers the primary gave carry a latency sample.
    return window.requests - window.errors


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ms"


def _summary(window: VersionWindow | None) -> str:
    if window is None:
        return "no previous version"
    return (
        f"{window.requests} requests, errors {_rate(window.error_rate)}, fallbacks "
        f"{_rate(window.fallback_rate)}, p95 {_ms(window.p95_ms)}"
    )


async def watch(
    watches: Sequence[Watch],
    policy: ProbationPolicy,
    interrupted: asyncio.Event,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Wait out probation: ``seconds``, or until every candidate saw ``requests`` requests.

    Returns False as soon as ``interrupted`` is set (a newer desired state arrived).
    """
    ends = clock() + policy.seconds
    while True:
        if all(w.counter.requests - w.start.requests >= policy.requests for w in watches):
            return True
        left = ends - clock()
        if left <= 0:
            return True
        try:
            await asyncio.wait_for(interrupted.wait(), min(left, _POLL_S))
        except asyncio.TimeoutError:
            continue
        return False
