"""Gates: what a wave must show before the rollout goes on.

A gate reads the wave's evidence — each device's outcome and the probation windows it reported
(the new version beside the previous one, from its ``update`` messages) — and returns a
:class:`GateResult`: passed, failed, or insufficient (``passed`` is None) when it has fewer
samples than its minimum. Insufficient is neither: it holds the rollout for an operator.

The rate gates compare the new version with the previous one on the same devices. A previous
version with too little traffic to say anything (or none: a first install) counts as perfect, so
the new version is held to the margin alone — the rule the agent's own probation follows.

Gates sit behind the small :class:`Gate` protocol, so one reading other evidence is one more
object in the list: :class:`DriftGate` reads the drift telemetry in the store.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from fleet.rollouts.spec import GatePolicy
from fleet.rollouts.states import DEVICE_FAILED, DEVICE_FINAL
from fleet.telemetry.drift import FleetDrift, HistogramDrift
from protocol.mqtt import ProbationReport, VersionWindow

__all__ = [
    "DeviceOutcome",
    "DriftGate",
    "ErrorRateGate",
    "FailedInstallGate",
    "FallbackRateGate",
    "Gate",
    "GateResult",
    "LatencyGate",
    "WaveEvidence",
    "standard_gates",
]

_MIN_BASELINE_MS = 0.001  # a p95 of 0 ms would make any ratio infinite
_REPORTED = DEVICE_FINAL | DEVICE_FAILED  # an outcome is known, silence at the deadline included


class GateResult(BaseModel):
    """One gate's judgement of one wave; ``passed`` is None when samples were insufficient."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    value: float | None
    threshold: float
    passed: bool | None
    samples: int
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "passed", False: "failed", None: "insufficient"}[self.passed]


@dataclass(frozen=True)
class DeviceOutcome:
    """One device of the wave: its status and the probation reports it sent for the model."""

    device_id: str
    status: str
    previous_version: str | None
    probation: tuple[ProbationReport, ...] = ()


@dataclass(frozen=True)
class WaveEvidence:
    """Everything known about one wave when its gates run."""

    rollout_id: str
    model: str
    version: str
    wave: int
    devices: tuple[DeviceOutcome, ...]
    started_at: datetime
    now: datetime

    def windows(self) -> tuple[list[VersionWindow], list[VersionWindow]]:
        """The candidate windows of the new version and the baseline windows beside them."""
        candidates: list[VersionWindow] = []
        baselines: list[VersionWindow] = []
        for device in self.devices:
            for report in device.probation:
                if report.model != self.model or report.candidate.version != self.version:
                    continue  # a report about another update on the same device
                candidates.append(report.candidate)
                if report.baseline is not None:
                    baselines.append(report.baseline)
        return candidates, baselines


class Gate(Protocol):
    """Judges one wave."""

    @property
    def name(self) -> str: ...

    def evaluate(self, evidence: WaveEvidence) -> GateResult: ...


@dataclass(frozen=True)
class FailedInstallGate:
    """The share of the wave's devices that failed, refused, rolled back or stayed silent."""

    max_share: float
    name: str = "failed_installs"

    def evaluate(self, evidence: WaveEvidence) -> GateResult:
        total = len(evidence.devices)
        failed = sum(d.status in DEVICE_FAILED for d in evidence.devices)
        reported = sum(d.status in _REPORTED for d in evidence.devices)
        if total == 0 or reported == 0:
            return GateResult(
                name=self.name,
                value=None,
                threshold=self.max_share,
                passed=None,
                samples=reported,
                detail=f"none of the wave's {total} devices has finished its update",
            )
        share = failed / total
        return GateResult(
            name=self.name,
            value=share,
            threshold=self.max_share,
            passed=share <= self.max_share,
            samples=reported,
            detail=(
                f"{failed} of {total} devices failed, refused, rolled back or stayed silent "
                f"({share:.1%}, allowed {self.max_share:.1%})"
            ),
        )


@dataclass(frozen=True)
class _RateGate:
    """A per-request rate of the new version against the previous version's, plus a margin."""

    max_increase: float
    min_requests: int
    name: ClassVar[str]
    what: ClassVar[str]

    @staticmethod
    def _count(window: VersionWindow) -> int:
        raise NotImplementedError

    def evaluate(self, evidence: WaveEvidence) -> GateResult:
        candidates, baselines = evidence.windows()
        requests = sum(w.requests for w in candidates)
        events = sum(self._count(w) for w in candidates)
        base_requests = sum(w.requests for w in baselines)
        new = f"{evidence.model}@{evidence.version}"

        def result(passed: bool | None, threshold: float, detail: str) -> GateResult:
            return GateResult(
                name=self.name,
                value=events / requests if requests else None,
                threshold=threshold,
                passed=passed,
                samples=requests,
                detail=detail,
            )

        if requests == 0 and self.min_requests == 0:
            return result(True, self.max_increase, f"no requests on {new} to judge (allowed)")
        if requests < self.min_requests:
            return result(
                None,
                self.max_increase,
                f"{requests} requests on {new}, fewer than the {self.min_requests} needed",
            )
        if base_requests < self.min_requests:
            # Too little traffic on the previous version (or a first install) says nothing
            # about it: hold the new version to a perfect baseline, as probation does.
            base_rate = 0.0
            against = (
                f"0% (the previous version has {base_requests} requests, fewer than "
                f"{self.min_requests} to compare with)"
            )
        else:
            base_rate = sum(self._count(w) for w in baselines) / base_requests
            against = f"{base_rate:.2%} on the previous version over {base_requests} requests"
        rate = events / requests
        threshold = base_rate + self.max_increase
        return result(
            rate <= threshold,
            threshold,
            f"{self.what} {rate:.2%} on {new} over {requests} requests vs {against}; "
            f"allowed up to {threshold:.2%}",
        )


@dataclass(frozen=True)
class ErrorRateGate(_RateGate):
    """Errors per request of the new version ≤ the previous version's + ``max_increase``."""

    name: ClassVar[str] = "error_rate"
    what: ClassVar[str] = "error rate"

    @staticmethod
    def _count(window: VersionWindow) -> int:
        return window.errors


@dataclass(frozen=True)
class FallbackRateGate(_RateGate):
    """Fallback answers per request of the new version ≤ the previous version's + margin."""

    name: ClassVar[str] = "fallback_rate"
    what: ClassVar[str] = "fallback rate"

    @staticmethod
    def _count(window: VersionWindow) -> int:
        return window.fallbacks


@dataclass(frozen=True)
class LatencyGate:
    """Median over devices of the new version's p95 / the same of the previous version."""

    max_ratio: float
    min_requests: int
    name: str = "p95_latency"

    def evaluate(self, evidence: WaveEvidence) -> GateResult:
        candidates, baselines = evidence.windows()
        timed = [w for w in candidates if w.p95_ms is not None and w.requests]
        base = [w for w in baselines if w.p95_ms is not None and w.requests]
        requests = sum(w.requests for w in timed)
        base_requests = sum(w.requests for w in base)
        new = f"{evidence.model}@{evidence.version}"

        def result(passed: bool | None, value: float | None, detail: str) -> GateResult:
            return GateResult(
                name=self.name,
                value=value,
                threshold=self.max_ratio,
                passed=passed,
                samples=requests,
                detail=detail,
            )

        if requests == 0 and self.min_requests == 0:
            return result(True, None, f"no timed requests on {new} to judge (allowed)")
        if requests < self.min_requests:
            return result(
                None,
                None,
                f"{requests} timed requests on {new}, fewer than the {self.min_requests} needed",
            )
        p95 = statistics.median(w.p95_ms for w in timed if w.p95_ms is not None)
        if base_requests < self.min_requests or not base:
            return result(
                True,
                None,
                f"median p95 {p95:.2f} ms on {new}; the previous version has {base_requests} "
                f"timed requests, fewer than {self.min_requests} to compare with",
            )
        base_p95 = statistics.median(w.p95_ms for w in base if w.p95_ms is not None)
        ratio = p95 / max(base_p95, _MIN_BASELINE_MS)
        return result(
            ratio <= self.max_ratio,
            ratio,
            f"median p95 {p95:.2f} ms on {new} vs {base_p95:.2f} ms on the previous version "
            f"(×{ratio:.2f}, allowed ×{self.max_ratio:g})",
        )


@dataclass(frozen=True)
class _DriftCheck:
    label: str
    psi: float
    threshold: float


@dataclass(frozen=True)
class DriftGate:
    """Drift of the new version on the wave's devices since the wave started: each feature's and
    output's PSI against the version's reference profile, and each output's PSI against the
    previous version's live outputs (fleet.telemetry.drift reads and compares the counts).

    The engine asks every tick while a wave waits on its gates; ``drift`` reads the wave's
    windows at most once per its ``wave_reuse_s`` and answers with its last reading between."""

    drift: FleetDrift
    max_prediction_psi: float | None
    max_feature_psi: float | None
    min_rows: int
    name: str = "drift"

    def evaluate(self, evidence: WaveEvidence) -> GateResult:
        previous = Counter(
            d.previous_version
            for d in evidence.devices
            if d.previous_version not in (None, evidence.version)
        ).most_common(1)
        measured = self.drift.wave(
            evidence.model,
            evidence.version,
            devices=[d.device_id for d in evidence.devices],
            previous=previous[0][0] if previous else None,
            since=evidence.started_at,
            until=evidence.now,
            min_rows=self.min_rows,
        )
        new = f"{evidence.model}@{evidence.version}"
        limits = [t for t in (self.max_prediction_psi, self.max_feature_psi) if t is not None]
        report = measured.report
        rows = report.rows if report is not None else 0

        def result(passed: bool | None, check: _DriftCheck | None, detail: str) -> GateResult:
            return GateResult(
                name=self.name,
                value=check.psi if check is not None else None,
                threshold=check.threshold if check is not None else min(limits, default=0.0),
                passed=passed,
                samples=rows,
                detail=detail,
            )

        if report is None:
            return result(True, None, f"{new} has no drift profile, so its drift is not judged")
        if rows == 0 and self.min_rows == 0:
            return result(True, None, f"no drift rows counted on {new} to judge (allowed)")
        if rows < self.min_rows:
            return result(
                None, None, f"{rows} drift rows on {new}, fewer than the {self.min_rows} needed"
            )
        checks = self._checks(report.features, report.outputs)
        against = measured.against_previous
        if against is not None:
            checks += self._checks(
                (), against.outputs, f"{measured.previous} on {measured.previous_scope}"
            )
        where = f"{rows} rows from {report.devices} device{'' if report.devices == 1 else 's'}"
        if against is not None:
            where += f", outputs also against {measured.previous} on {measured.previous_scope}"
        elif measured.previous is not None:
            where += (
                f"; {measured.previous} has {measured.previous_rows} drift rows (or no drift "
                "profile), too few to compare its outputs with"
            )
        if not checks:
            return result(True, None, f"no feature or output of {new} could be compared ({where})")
        worst = max(checks, key=lambda c: c.psi / c.threshold if c.threshold else c.psi * 1e9)
        failed = sum(c.psi > c.threshold for c in checks)
        return result(
            failed == 0,
            worst,
            f"{worst.label} PSI {worst.psi:.3f} (allowed {worst.threshold:g}) is the worst of "
            f"{len(checks)} compared, {failed} over their limit; {where}",
        )

    def _checks(
        self,
        features: tuple[HistogramDrift, ...],
        outputs: tuple[HistogramDrift, ...],
        against: str = "the reference",
    ) -> list[_DriftCheck]:
        found = []
        for limit, histograms in (
            (self.max_feature_psi, features),
            (self.max_prediction_psi, outputs),
        ):
            if limit is None:
                continue
            found += [
                _DriftCheck(f"{h.kind} {h.name} vs {against}", h.psi, limit)
                for h in histograms
                if h.psi is not None
            ]
        return found


def standard_gates(policy: GatePolicy, *, drift: FleetDrift | None = None) -> list[Gate]:
    """The gates a policy asks for: failed installs always, the rate gates unless turned off,
    and the drift gate when ``drift`` reads the fleet's drift counts and it is not turned off."""
    gates: list[Gate] = [FailedInstallGate(policy.max_failed_share)]
    if policy.max_error_rate_increase is not None:
        gates.append(ErrorRateGate(policy.max_error_rate_increase, policy.min_requests))
    if policy.max_latency_ratio is not None:
        gates.append(LatencyGate(policy.max_latency_ratio, policy.min_requests))
    if policy.max_fallback_rate_increase is not None:
        gates.append(FallbackRateGate(policy.max_fallback_rate_increase, policy.min_requests))
    if drift is not None and (
        policy.max_prediction_psi is not None or policy.max_feature_psi is not None
    ):
        gates.append(
            DriftGate(drift, policy.max_prediction_psi, policy.max_feature_psi, policy.min_requests)
        )
    return gates
