"""Experiment verdicts computed from metrics windows stored as the ingest stores them: clear
differences, equal versions, too few requests, shadows with their agreement, and the rules for
which records count (since the rollout started, in the right arm, rolled up into hours, the hour
the rollout started in included), over a fleet of thousands too; and the read-only connection a
verdict is computed over off the event loop."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from fleet.errors import NoExperimentError, StoreError, UnknownRolloutError
from fleet.experiments import ExperimentVerdict, MetricComparison, experiment_verdict
from fleet.rollouts.plan import split_arms
from fleet.rollouts.spec import ExperimentPolicy
from fleet.store import Store, open_store
from fleet.store.db import database_file, read_only, transaction
from tests.fleet.experiment_support import write_windows
from tests.fleet.rollout_support import (
    MODEL,
    START,
    Fleet,
    add_device,
    fast_policy,
    make_fleet,
    spec,
)

DEVICES = [f"cam-{i:03d}" for i in range(10)]
LATER = START + timedelta(minutes=1)


async def ab_fleet(tmp_path: Path, **experiment: object) -> tuple[Fleet, str, list[str], list[str]]:
    """Ten devices on 1.0.0; an A/B rollout of 2.0.0 to half of them, started."""
    fleet = make_fleet(tmp_path, len(DEVICES))
    policy = fast_policy(
        waves=(100,), experiment=ExperimentPolicy.model_validate({"mode": "ab", **experiment})
    )
    view = fleet.engine.create(spec(policy=policy), "alice")
    await fleet.engine.step()
    treatment, control = split_arms(MODEL, DEVICES, 0.5)
    return fleet, view.id, treatment, control


def verdict(fleet: Fleet, rollout_id: str) -> ExperimentVerdict:
    return experiment_verdict(fleet.store, rollout_id, fleet.clock())


def metric(result: ExperimentVerdict, name: str) -> MetricComparison:
    return next(m for m in result.metrics if m.name == name)


async def test_a_clearly_higher_error_rate_is_significantly_worse(tmp_path: Path) -> None:
    fleet, rollout_id, treatment, control = await ab_fleet(tmp_path)
    write_windows(fleet.store, treatment, "2.0.0", start=LATER, requests=2000, errors=240)
    write_windows(fleet.store, control, "1.0.0", start=LATER, requests=2000, errors=40)

    result = verdict(fleet, rollout_id)
    assert result.verdict == "treatment_worse"
    errors = metric(result, "error_rate")
    assert errors.treatment == pytest.approx(0.12)
    assert errors.control == pytest.approx(0.02)
    assert (errors.treatment_samples, errors.control_samples) == (2000, 2000)
    assert errors.statistic == pytest.approx(12.394, abs=1e-3)
    assert errors.p_value is not None and errors.p_value < 1e-30
    assert errors.significant and errors.better == "control" and errors.guard
    assert "error_rate" in result.reason
    assert (result.treatment.devices, result.control.devices) == (5, 5)
    assert result.treatment.versions == ("2.0.0",) and result.control.versions == ("1.0.0",)
    assert result.needed == {}


async def test_equal_versions_show_no_difference(tmp_path: Path) -> None:
    fleet, rollout_id, treatment, control = await ab_fleet(tmp_path)
    for devices, version in ((treatment, "2.0.0"), (control, "1.0.0")):
        write_windows(
            fleet.store,
            devices,
            version,
            start=LATER,
            requests=3000,
            errors=90,
            fallbacks=30,
            outcomes=1000,
            successes=800,
            bucket=4,
            spread=4,
        )
    result = verdict(fleet, rollout_id)
    assert result.verdict == "no_difference"
    assert [m.name for m in result.metrics] == [
        "error_rate",
        "fallback_rate",
        "outcome_success_rate",
        "latency",
    ]
    for m in result.metrics:
        assert m.p_value == pytest.approx(1.0)
        assert not m.significant and m.better is None
    assert result.agreement is None


async def test_too_few_requests_say_how_many_more_each_arm_needs(tmp_path: Path) -> None:
    fleet, rollout_id, treatment, control = await ab_fleet(tmp_path, min_samples=1000)
    write_windows(fleet.store, treatment, "2.0.0", start=LATER, requests=400, errors=200)
    write_windows(fleet.store, control, "1.0.0", start=LATER, requests=1500)
    result = verdict(fleet, rollout_id)
    # However stark the difference looks, 400 requests are not the 1000 asked for.
    assert result.verdict == "insufficient"
    assert result.needed == {"treatment": 600}
    assert "the treatment arm needs 600 more requests" in result.reason
    # The tests are still shown for what they are worth.
    assert metric(result, "error_rate").significant


async def test_a_better_and_faster_version_is_better(tmp_path: Path) -> None:
    fleet, rollout_id, treatment, control = await ab_fleet(tmp_path, alpha=0.01)
    write_windows(
        fleet.store,
        treatment,
        "2.0.0",
        start=LATER,
        requests=5000,
        errors=25,
        outcomes=2000,
        successes=1700,
        bucket=3,
        spread=3,
    )
    write_windows(
        fleet.store,
        control,
        "1.0.0",
        start=LATER,
        requests=5000,
        errors=100,
        outcomes=2000,
        successes=1500,
        bucket=5,
        spread=3,
    )
    result = verdict(fleet, rollout_id)
    assert result.verdict == "treatment_better"
    assert {m.name for m in result.metrics if m.better == "treatment"} == {
        "error_rate",
        "outcome_success_rate",
        "latency",
    }
    faster = metric(result, "latency")
    assert faster.statistic is not None and faster.statistic < 0
    assert faster.treatment is not None and faster.control is not None
    assert faster.treatment < faster.control
    assert result.treatment.latency_p95_ms is not None
    assert result.alpha == 0.01


async def test_slower_alone_is_worse(tmp_path: Path) -> None:
    fleet, rollout_id, treatment, control = await ab_fleet(tmp_path)
    write_windows(fleet.store, treatment, "2.0.0", start=LATER, requests=2000, bucket=7, spread=2)
    write_windows(fleet.store, control, "1.0.0", start=LATER, requests=2000, bucket=6, spread=2)
    result = verdict(fleet, rollout_id)
    assert result.verdict == "treatment_worse"
    slower = metric(result, "latency")
    assert slower.better == "control" and slower.statistic is not None and slower.statistic > 0
    assert not metric(result, "error_rate").significant
    # No outcomes were posted: that metric is shown untested, not as a tie.
    outcomes = metric(result, "outcome_success_rate")
    assert outcomes.p_value is None and outcomes.detail.startswith("not tested")


async def test_only_records_since_the_start_in_each_arm_count(tmp_path: Path) -> None:
    fleet, rollout_id, treatment, control = await ab_fleet(tmp_path)
    add_device(fleet.store, "other-1", groups=("doors",))  # not selected: never the control
    before = START - timedelta(minutes=5)
    write_windows(fleet.store, control, "1.0.0", start=before, requests=9000, errors=9000)
    write_windows(fleet.store, ["other-1"], "1.0.0", start=LATER, requests=9000, errors=9000)
    # A treatment device still on the old version before it switched: not the treatment arm.
    write_windows(fleet.store, treatment[:1], "1.0.0", start=LATER, requests=500, errors=500)
    write_windows(fleet.store, treatment, "2.0.0", start=LATER, requests=1000, errors=10)
    write_windows(fleet.store, control, "1.0.0", start=LATER, requests=1000, errors=10)
    result = verdict(fleet, rollout_id)
    assert result.verdict == "no_difference"
    assert (result.treatment.requests, result.control.requests) == (1000, 1000)
    assert (result.treatment.errors, result.control.errors) == (10, 10)
    assert result.since == START


async def test_windows_rolled_up_into_hours_still_count(tmp_path: Path) -> None:
    fleet, rollout_id, treatment, control = await ab_fleet(tmp_path)
    hour_later = START + timedelta(hours=1)  # rollups start at their hour: this one counts
    write_windows(fleet.store, treatment, "2.0.0", start=hour_later, requests=2000, errors=240)
    write_windows(fleet.store, control, "1.0.0", start=hour_later, requests=2000, errors=40)
    write_windows(
        fleet.store, treatment, "2.0.0", start=hour_later + timedelta(hours=2), requests=10
    )
    before = verdict(fleet, rollout_id)
    rolled = fleet.store.telemetry.roll_up("metrics", hour_later + timedelta(hours=1), 1000)
    assert rolled == 10
    after = verdict(fleet, rollout_id)
    assert after.treatment == before.treatment and after.control == before.control
    assert after.treatment.requests == 2010
    assert after.verdict == "treatment_worse"


async def test_the_hour_the_rollout_started_in_still_counts_once_rolled_up(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, len(DEVICES))
    fleet.clock.advance(30 * 60)  # the rollout starts at 12:30, mid-hour
    policy = fast_policy(waves=(100,), experiment=ExperimentPolicy(mode="ab"))
    view = fleet.engine.create(spec(policy=policy), "alice")
    await fleet.engine.step()
    since = fleet.clock()
    treatment, control = split_arms(MODEL, DEVICES, 0.5)
    at = since + timedelta(minutes=10)  # 12:40, in the hour the rollout started in
    write_windows(fleet.store, treatment, "2.0.0", start=at, requests=2000, errors=240)
    write_windows(fleet.store, control, "1.0.0", start=at, requests=2000, errors=40)
    # 12:10, before the start but in the same hour; and 11:50, the hour before.
    write_windows(fleet.store, control, "1.0.0", start=since - timedelta(minutes=20), requests=50)
    write_windows(fleet.store, control, "1.0.0", start=since - timedelta(minutes=40), requests=70)

    raw = verdict(fleet, rollout_id := view.id)
    assert raw.since == since
    assert (raw.treatment.requests, raw.control.requests) == (2000, 2000)
    assert fleet.store.telemetry.roll_up("metrics", START + timedelta(hours=1), 1000) == 20
    rolled = verdict(fleet, rollout_id)
    # 12:00-13:00 is one row now, and it counts whole: the experiment's traffic stays in, with
    # the 50 requests from 12:10 (at most an hour before the start); 11:00's row never counts.
    assert rolled.treatment == raw.treatment
    assert (rolled.treatment.requests, rolled.control.requests) == (2000, 2050)
    assert rolled.verdict == raw.verdict == "treatment_worse"


async def test_a_fleet_of_thousands_gets_its_verdict(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 0)
    devices = [f"cam-{i:05d}" for i in range(4000)]
    with transaction(fleet.store.db):
        for device_id in devices:
            add_device(fleet.store, device_id)
    add_device(fleet.store, "door-1", groups=("doors",))  # not selected: never the control
    policy = fast_policy(waves=(100,), experiment=ExperimentPolicy(mode="ab", split=0.25))
    view = fleet.engine.create(spec(policy=policy), "alice")
    await fleet.engine.step()
    treatment, control = split_arms(MODEL, devices, 0.25)
    assert len(treatment) + len(control) == len(devices)
    for arm, version in ((treatment, "2.0.0"), (control, "1.0.0")):
        write_windows(
            fleet.store, arm, version, start=LATER, requests=10 * len(arm), errors=len(arm)
        )
    write_windows(fleet.store, ["door-1"], "1.0.0", start=LATER, requests=500, errors=500)

    result = verdict(fleet, view.id)
    assert (result.treatment.devices, result.control.devices) == (len(treatment), len(control))
    assert result.treatment.requests == 10 * len(treatment)
    assert (result.control.requests, result.control.errors) == (10 * len(control), len(control))
    assert result.verdict == "no_difference"


def test_a_verdict_reads_a_read_only_snapshot_of_the_file(tmp_path: Path) -> None:
    store = open_store(tmp_path / "fleet.sqlite")
    try:
        path = database_file(store.db)
        assert path == str(tmp_path / "fleet.sqlite")
        with read_only(path) as db:
            assert Store(db).devices.find() == []
            add_device(store, "cam-1")  # written meanwhile: not in the snapshot being read
            assert Store(db).devices.find() == []
            with pytest.raises(StoreError, match="readonly"):
                add_device(Store(db), "cam-2")
        with read_only(path) as db:
            assert [d.id for d in Store(db).devices.find()] == ["cam-1"]
    finally:
        store.close()
    memory = open_store(":memory:")
    assert database_file(memory.db) is None
    memory.close()
    with pytest.raises(StoreError, match="opening"), read_only(str(tmp_path / "missing.sqlite")):
        pass


async def test_a_shadow_is_judged_against_the_primary_beside_it(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 4)
    policy = fast_policy(waves=(100,), experiment=ExperimentPolicy(mode="shadow", min_samples=500))
    view = fleet.engine.create(spec(policy=policy), "alice")
    await fleet.engine.step()
    devices = [f"cam-{i:03d}" for i in range(4)]
    write_windows(fleet.store, devices, "1.0.0", start=LATER, requests=4000, errors=40, bucket=5)
    write_windows(
        fleet.store,
        devices,
        "2.0.0",
        start=LATER,
        role="shadow",
        requests=3800,  # the queue skipped some: fewer than the primary took
        errors=38,
        bucket=5,
        compared=3762,
        agreements=3575,
        champion="1.0.0",
    )
    result = verdict(fleet, view.id)
    assert result.mode == "shadow"
    assert result.verdict == "no_difference"
    assert (result.treatment.role, result.control.role) == ("shadow", "primary")
    assert [m.name for m in result.metrics] == ["error_rate", "latency"]
    agreement = result.agreement
    assert agreement is not None
    assert (agreement.compared, agreement.agreed) == (3762, 3575)
    assert agreement.rate == pytest.approx(3575 / 3762)
    assert agreement.rate is not None and agreement.low < agreement.rate < agreement.high
    assert agreement.high - agreement.low < 0.02
    assert agreement.confidence == pytest.approx(0.95)


async def test_a_failing_shadow_is_worse(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 4)
    policy = fast_policy(waves=(100,), experiment=ExperimentPolicy(mode="shadow", min_samples=500))
    view = fleet.engine.create(spec(policy=policy), "alice")
    await fleet.engine.step()
    devices = [f"cam-{i:03d}" for i in range(4)]
    write_windows(fleet.store, devices, "1.0.0", start=LATER, requests=2000, errors=10)
    write_windows(
        fleet.store, devices, "2.0.0", start=LATER, role="shadow", requests=2000, errors=300
    )
    result = verdict(fleet, view.id)
    assert result.verdict == "treatment_worse"
    assert metric(result, "error_rate").better == "control"
    assert result.agreement is not None and result.agreement.rate is None


async def test_a_rollout_without_an_experiment_has_no_verdict(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 2)
    view = fleet.engine.create(spec(), "alice")
    with pytest.raises(NoExperimentError, match="runs no experiment"):
        verdict(fleet, view.id)
    with pytest.raises(UnknownRolloutError):
        verdict(fleet, "r-nothere")
