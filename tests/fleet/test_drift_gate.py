"""The drift gate on a real fleet database: the new version's feature and prediction PSI on the
wave's devices since the wave started, its predictions against the previous version's, the
minimum-rows guard, and a wave halted by the engine with "drift" as the reason."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from fleet.rollouts import RolloutEngine, standard_gates
from fleet.rollouts.gates import DeviceOutcome, DriftGate, GateResult, WaveEvidence
from fleet.rollouts.spec import GatePolicy
from fleet.store import Store, open_store
from fleet.telemetry.drift import FleetDrift
from tests.fleet.rollout_support import (
    MODEL,
    START,
    Clock,
    Fleet,
    RecordingPublisher,
    add_device,
    fast_policy,
    healthy,
    spec,
)
from tests.fleet.test_drift import SHIFTED, STEADY, TILTED, Reporter, publish, store

__all__ = ["store"]  # the fixture, shared with the drift tests

WAVE = ("cam-a", "cam-b")
NOW = START + timedelta(minutes=5)


def judge(
    store: Store,
    *,
    devices: Sequence[str] = WAVE,
    previous: str | None = "1.0.0",
    min_rows: int = 100,
    prediction: float | None = 0.25,
    feature: float | None = 0.25,
    version: str = "2.0.0",
    drift: FleetDrift | None = None,
    now: datetime = NOW,
) -> GateResult:
    gate = DriftGate(drift or FleetDrift(store), prediction, feature, min_rows)
    evidence = WaveEvidence(
        rollout_id="r-test",
        model=MODEL,
        version=version,
        wave=0,
        devices=tuple(DeviceOutcome(d, "committed", previous) for d in devices),
        started_at=START,
        now=now,
    )
    return gate.evaluate(evidence)


def serve(
    reporter: Reporter, version: str, at: datetime, x0: Sequence[int], **kw: Sequence[int]
) -> None:
    """Each wave device reports one window of ``version``."""
    for device in WAVE:
        reporter.counts(device, version, at, x0, **kw)


def test_a_steady_wave_passes_against_the_reference_and_the_previous_version(
    store: Store,
) -> None:
    reporter = Reporter(store)
    serve(reporter, "1.0.0", START - timedelta(minutes=10), STEADY)  # before the wave
    serve(reporter, "2.0.0", START + timedelta(minutes=1), STEADY)
    result = judge(store)
    assert (result.name, result.passed, result.samples) == ("drift", True, 600)
    assert result.value == pytest.approx(0.0, abs=1e-6)
    # x[0], x[1] and label against the reference, label against 1.0.0
    assert "is the worst of 4 compared, 0 over their limit" in result.detail
    assert result.detail.endswith(
        "600 rows from 2 devices, outputs also against 1.0.0 on the same devices"
    )


def test_drifting_features_fail_naming_the_worst_and_its_psi(store: Store) -> None:
    reporter = Reporter(store)
    serve(reporter, "1.0.0", START - timedelta(minutes=10), STEADY)
    serve(reporter, "2.0.0", START + timedelta(minutes=1), SHIFTED)
    result = judge(store)
    assert result.passed is False
    assert result.value is not None and result.value > 0.25
    assert result.threshold == 0.25
    assert result.detail.startswith(f"feature x[0] vs the reference PSI {result.value:.3f} ")
    assert "1 over their limit" in result.detail
    # Feature drift turned off: the same wave passes on its predictions.
    assert judge(store, feature=None).passed is True


def test_predictions_unlike_the_previous_versions_fail_even_near_the_reference(
    store: Store,
) -> None:
    reporter = Reporter(store)
    serve(reporter, "1.0.0", START - timedelta(minutes=10), STEADY, label=(250, 50, 0))
    serve(reporter, "2.0.0", START + timedelta(minutes=1), STEADY, label=(100, 200, 0))
    result = judge(store)
    assert result.passed is False
    assert result.detail.startswith("output label vs 1.0.0 on the same devices PSI ")
    assert judge(store, prediction=None).passed is True  # prediction drift turned off


def test_without_the_previous_version_on_the_wave_the_fleets_counts_stand_in(
    store: Store,
) -> None:
    reporter = Reporter(store)
    reporter.counts("cam-d", "1.0.0", START - timedelta(minutes=10), STEADY, label=(250, 50, 0))
    serve(reporter, "2.0.0", START + timedelta(minutes=1), STEADY, label=(100, 200, 0))
    result = judge(store)
    assert result.passed is False
    assert result.detail.startswith("output label vs 1.0.0 on the fleet PSI ")

    # With too little of it anywhere, the comparison is skipped and the detail says so.
    quiet = judge(store, previous="1.0.0", min_rows=400)
    assert quiet.passed is True
    assert "1.0.0 has 300 drift rows (or no drift profile), too few" in quiet.detail


def test_too_few_rows_are_insufficient_and_none_pass_when_none_are_needed(store: Store) -> None:
    reporter = Reporter(store)
    serve(reporter, "2.0.0", START + timedelta(minutes=1), TILTED)  # 2 x 300 rows
    short = judge(store, min_rows=1000)
    assert (short.passed, short.value, short.samples) == (None, None, 600)
    assert short.detail == "600 drift rows on digits@2.0.0, fewer than the 1000 needed"

    nothing = judge(store, devices=("cam-c",), min_rows=0)
    assert (nothing.passed, nothing.samples) == (True, 0)
    assert nothing.detail == "no drift rows counted on digits@2.0.0 to judge (allowed)"
    assert judge(store, devices=("cam-c",), min_rows=1).passed is None


def test_a_version_without_a_drift_profile_passes_saying_so(store: Store) -> None:
    publish(store, "3.0.0", profile=None)
    result = judge(store, version="3.0.0")
    assert (result.passed, result.value) == (True, None)
    assert result.detail == "digits@3.0.0 has no drift profile, so its drift is not judged"


def test_a_waves_drift_is_read_at_most_once_per_reuse_interval(store: Store) -> None:
    reporter = Reporter(store)
    serve(reporter, "2.0.0", START + timedelta(minutes=1), STEADY)
    drift = FleetDrift(store, wave_reuse_s=30)
    first = judge(store, previous=None, drift=drift)
    assert (first.passed, first.samples) == (True, 600)

    serve(reporter, "2.0.0", START + timedelta(minutes=2), SHIFTED)
    serve(reporter, "2.0.0", START + timedelta(minutes=3), SHIFTED)
    # Asked again within 30 s: the last reading, the new windows not read yet.
    assert judge(store, previous=None, drift=drift, now=NOW + timedelta(seconds=29)) == first
    # Another wave (other devices) is read on its own.
    other = judge(store, devices=("cam-a",), previous=None, drift=drift)
    assert (other.passed, other.samples) == (False, 900)
    # 30 s on, the wave's windows are read again.
    later = judge(store, previous=None, drift=drift, now=NOW + timedelta(seconds=30))
    assert (later.passed, later.samples) == (False, 1800)
    # Without reuse every ask reads them.
    assert judge(store, previous=None).samples == 1800


def test_standard_gates_add_the_drift_gate_unless_turned_off(store: Store) -> None:
    drift = FleetDrift(store)
    assert [g.name for g in standard_gates(GatePolicy())][-1] == "fallback_rate"
    assert [g.name for g in standard_gates(GatePolicy(), drift=drift)][-1] == "drift"
    off = GatePolicy(max_prediction_psi=None, max_feature_psi=None)
    assert "drift" not in [g.name for g in standard_gates(off, drift=drift)]


async def test_a_drifting_canary_wave_halts_the_rollout_with_drift_as_the_reason(
    tmp_path: Path,
) -> None:
    opened = open_store(tmp_path / "fleet.sqlite")
    publish(opened, "1.0.0")
    publish(opened, "2.0.0")
    for i in range(4):
        add_device(opened, f"cam-{i}")
    clock = Clock()
    publisher = RecordingPublisher(opened)
    fleet = Fleet(
        tmp_path / "fleet.sqlite",
        opened,
        clock,
        publisher,
        RolloutEngine(opened, publisher, clock=clock),  # the engine's own gates
    )
    rollout = fleet.engine.create(
        spec(policy=fast_policy(waves=[50, 100], gates=GatePolicy(min_requests=100))), "alice"
    )
    await fleet.engine.step()
    canary = fleet.wave_devices(rollout.id, 0)
    reporter = Reporter(opened)
    for device in canary:
        reporter.counts(device, "2.0.0", START + timedelta(seconds=5), SHIFTED)
    clock.advance(30)
    fleet.answer_many(canary, probation=(healthy(),))
    await fleet.engine.step()

    view = fleet.engine.get(rollout.id)
    assert view.state == "aborted"
    assert view.reason is not None
    assert view.reason.startswith("wave 1 failed its gates: drift: feature x[0] vs the reference")
    gates = {g.name: g for g in view.waves[0].gates}
    assert gates["error_rate"].passed is True and gates["drift"].passed is False
    assert gates["drift"].samples == 300 * len(canary)
    assert {publisher.last(device).version for device in canary} == {"1.0.0"}  # sent back
    opened.close()
