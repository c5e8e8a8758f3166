"""The gates, on evidence built as the engine builds it: numbers against thresholds, the
minimum-sample guard, and the previous version as the baseline."""

from __future__ import annotations

import pytest

from fleet.rollouts.gates import (
    DeviceOutcome,
    ErrorRateGate,
    FailedInstallGate,
    FallbackRateGate,
    LatencyGate,
    WaveEvidence,
    standard_gates,
)
from fleet.rollouts.spec import GatePolicy
from protocol.mqtt import ProbationReport
from tests.fleet.rollout_support import MODEL, START, report, window


def evidence(*devices: DeviceOutcome) -> WaveEvidence:
    return WaveEvidence(
        rollout_id="r-test",
        model=MODEL,
        version="2.0.0",
        wave=0,
        devices=devices,
        started_at=START,
        now=START,
    )


def device(
    i: int, status: str = "committed", *reports: ProbationReport, previous: str | None = "1.0.0"
) -> DeviceOutcome:
    return DeviceOutcome(f"cam-{i}", status, previous, tuple(reports))


def test_failed_install_share_counts_failures_refusals_rollbacks_and_silence() -> None:
    gate = FailedInstallGate(max_share=0.2)
    wave = [device(i) for i in range(10)]
    assert gate.evaluate(evidence(*wave)).passed is True
    wave[0] = device(0, "rolled_back")
    wave[1] = device(1, "deadline")
    result = gate.evaluate(evidence(*wave))
    assert (result.passed, result.value, result.threshold, result.samples) == (True, 0.2, 0.2, 10)
    wave[2] = device(2, "refused")
    result = gate.evaluate(evidence(*wave))
    assert result.passed is False
    assert result.value == pytest.approx(0.3)
    assert "3 of 10 devices" in result.detail
    wave[3] = device(3, "failed")
    assert gate.evaluate(evidence(*wave)).value == pytest.approx(0.4)


def test_failed_install_gate_without_any_outcome_is_insufficient() -> None:
    result = FailedInstallGate(0.1).evaluate(evidence(device(0, "downloading")))
    assert result.passed is None
    assert result.verdict == "insufficient"


def test_error_rate_is_judged_against_the_previous_version_plus_a_margin() -> None:
    gate = ErrorRateGate(max_increase=0.01, min_requests=100)
    base = window("1.0.0", 1000, errors=10)  # 1%
    ok = evidence(device(0, "committed", report(window("2.0.0", 1000, errors=15), base)))
    result = gate.evaluate(ok)
    assert result.passed is True
    assert result.value == pytest.approx(0.015)
    assert result.threshold == pytest.approx(0.02)
    bad = evidence(
        device(0, "committed", report(window("2.0.0", 500, errors=20), base)),
        device(1, "committed", report(window("2.0.0", 500, errors=30), base)),
    )
    result = gate.evaluate(bad)
    assert result.passed is False
    assert result.value == pytest.approx(0.05)
    assert result.samples == 1000
    assert "5.00%" in result.detail and "1.00% on the previous version" in result.detail


def test_too_few_requests_on_the_new_version_is_insufficient_not_a_verdict() -> None:
    gate = ErrorRateGate(max_increase=0.01, min_requests=100)
    # Every request failed, but 40 requests are not enough to say so across the wave.
    few = evidence(device(0, "committed", report(window("2.0.0", 40, errors=40))))
    result = gate.evaluate(few)
    assert result.passed is None
    assert result.samples == 40
    assert "fewer than the 100 needed" in result.detail


def test_an_idle_wave_passes_the_traffic_gates_only_when_min_requests_is_zero() -> None:
    idle = evidence(device(0, "committed", report(window("2.0.0", 0), window("1.0.0", 0))))
    for gate in standard_gates(GatePolicy(min_requests=0))[1:]:
        result = gate.evaluate(idle)
        assert result.passed is True, (gate.name, result.detail)
        assert "to judge (allowed)" in result.detail
    for gate in standard_gates(GatePolicy(min_requests=1))[1:]:
        assert gate.evaluate(idle).passed is None, gate.name


def test_a_previous_version_with_little_traffic_is_held_as_perfect() -> None:
    gate = ErrorRateGate(max_increase=0.01, min_requests=100)
    thin = window("1.0.0", 10, errors=5)
    result = gate.evaluate(
        evidence(device(0, "committed", report(window("2.0.0", 200, errors=1), thin)))
    )
    assert result.passed is True
    assert result.threshold == pytest.approx(0.01)
    first = evidence(device(0, "committed", report(window("2.0.0", 200, errors=3)), previous=None))
    result = gate.evaluate(first)
    assert result.passed is False
    assert result.threshold == pytest.approx(0.01)


def test_fallback_rate_gate() -> None:
    gate = FallbackRateGate(max_increase=0.02, min_requests=100)
    base = window("1.0.0", 1000, fallbacks=0)
    result = gate.evaluate(
        evidence(device(0, "committed", report(window("2.0.0", 1000, fallbacks=100), base)))
    )
    assert result.name == "fallback_rate"
    assert result.passed is False
    assert result.value == pytest.approx(0.1)


def test_latency_compares_medians_of_device_p95s() -> None:
    gate = LatencyGate(max_ratio=1.5, min_requests=100)

    def wave(*p95s: float) -> WaveEvidence:
        return evidence(
            *(
                device(
                    i,
                    "committed",
                    report(window("2.0.0", 100, p95=p95), window("1.0.0", 100, p95=10.0)),
                )
                for i, p95 in enumerate(p95s)
            )
        )

    # One slow device does not fail the wave; a slow median does.
    result = gate.evaluate(wave(10.0, 12.0, 400.0))
    assert result.passed is True
    assert result.value == pytest.approx(1.2)
    result = gate.evaluate(wave(20.0, 22.0, 12.0))
    assert (result.passed, result.threshold) == (False, 1.5)
    assert result.value == pytest.approx(2.0)
    assert "×2.00" in result.detail
    assert gate.evaluate(evidence(device(0, "committed"))).passed is None


def test_reports_about_another_version_are_not_evidence() -> None:
    stale = report(window("1.9.0", 10_000, errors=10_000), window("1.0.0", 1000))
    result = ErrorRateGate(0.01, 100).evaluate(evidence(device(0, "committed", stale)))
    assert result.passed is None
    assert result.samples == 0


def test_standard_gates_follow_the_policy() -> None:
    names = [g.name for g in standard_gates(GatePolicy())]
    assert names == ["failed_installs", "error_rate", "p95_latency", "fallback_rate"]
    only = standard_gates(GatePolicy(max_error_rate_increase=None, max_latency_ratio=None))
    assert [g.name for g in only] == ["failed_installs", "fallback_rate"]
