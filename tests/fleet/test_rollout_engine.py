"""The rollout engine on a real fleet database: waves to completion, gates that fail and roll
back, deadlines, approvals, operator commands, supersession, restarts and pacing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleet.errors import InvalidRolloutError, RolloutConflictError, UnknownRolloutError
from fleet.rollouts import Gate, GateResult, RolloutEngine, WaveEvidence, standard_gates
from fleet.rollouts.progress import status_change
from fleet.rollouts.spec import GatePolicy, RolloutPolicy, RolloutSpec
from fleet.store import Selector
from fleet.store.rollouts import AssignmentRow
from protocol.director import ModelTarget
from protocol.mqtt import UpdateProgress, VersionWindow
from tests.fleet.rollout_support import (
    MODEL,
    START,
    Clock,
    Fleet,
    RecordingPublisher,
    add_device,
    fast_policy,
    healthy,
    make_fleet,
    publish_version,
    report,
    spec,
    window,
)

HEALTHY = (healthy(),)


async def finish_wave(fleet: Fleet, rollout_id: str, wave: int) -> None:
    """Every device of the wave commits with healthy probation; the engine moves on."""
    fleet.answer_many(fleet.wave_devices(rollout_id, wave), probation=HEALTHY)
    fleet.clock.advance(1)
    await fleet.engine.step()


async def test_happy_path_moves_every_device_through_four_waves(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 20)
    view = fleet.engine.create(spec(), "alice")
    assert view.state == "created"
    assert view.id.startswith("r-") and len(view.id) == 10
    assert [w.devices for w in view.waves] == [1, 1, 8, 10]
    assert {d.previous_version for d in view.devices} == {"1.0.0"}

    await fleet.engine.step()
    view = fleet.engine.get(view.id)
    assert (view.state, view.wave, view.phase) == ("running", 0, "waiting")
    assert len(fleet.publisher.sent) == 1
    canary = fleet.publisher.sent[0]
    assert (canary.version, canary.rollout_id) == ("2.0.0", view.id)

    for wave in range(3):
        await finish_wave(fleet, view.id, wave)
        assert fleet.engine.get(view.id).wave == wave + 1
    await finish_wave(fleet, view.id, 3)

    view = fleet.engine.get(view.id)
    assert view.state == "completed"
    assert [w.state for w in view.waves] == ["passed"] * 4
    assert all(w.started_at and w.finished_at for w in view.waves)
    assert {d.status for d in view.devices} == {"committed"}
    # Exactly one desired state per device, each naming the new version.
    assert sorted(p.device_id for p in fleet.publisher.sent) == sorted(
        d.device for d in view.devices
    )
    assert {p.version for p in fleet.publisher.sent} == {"2.0.0"}
    gates = view.waves[2].gates
    assert [g.name for g in gates] == [
        "failed_installs",
        "error_rate",
        "p95_latency",
        "fallback_rate",
        "drift",
    ]
    assert all(g.passed for g in gates)
    assert gates[1].samples == 8 * 200
    assert gates[4].detail == "digits@2.0.0 has no drift profile, so its drift is not judged"
    actions = [e.action for e in fleet.store.audit.find(subject=view.id, limit=100)]
    assert actions[-1] == "rollout.created" and actions[0] == "rollout.completed"
    assert actions.count("rollout.wave_passed") == 4
    assert fleet.store.audit.find(subject=view.id, limit=100)[-1].actor == "alice"
    assert view.model_dump(mode="json")["waves"][0]["gates"][0]["name"] == "failed_installs"


async def test_a_bad_version_fails_its_gate_and_every_touched_device_goes_back(
    tmp_path: Path,
) -> None:
    fleet = make_fleet(tmp_path, 20)
    rollout = fleet.engine.create(spec(), "alice")
    waves = [fleet.wave_devices(rollout.id, w) for w in range(4)]
    await fleet.engine.step()
    await finish_wave(fleet, rollout.id, 0)
    await finish_wave(fleet, rollout.id, 1)
    assert fleet.engine.get(rollout.id).wave == 2

    # Wave 2: three devices roll back on their own, probation showing the new version broken.
    bad = report(window("2.0.0", 200, errors=60), window("1.0.0", 200, errors=1), passed=False)
    broken, fine = waves[2][:3], waves[2][3:]
    fleet.answer_many(broken, "rolled_back", probation=(bad,))
    assert fleet.engine.get(rollout.id).state == "running"
    await fleet.engine.step()

    view = fleet.engine.get(rollout.id)
    assert view.state == "aborted"
    assert view.reason is not None
    assert "failed_installs" in view.reason and f"3 of {len(waves[2])} devices" in view.reason
    assert view.waves[2].state == "failed"
    failed_gate = view.waves[2].gates[0]
    assert (failed_gate.name, failed_gate.passed) == ("failed_installs", False)
    assert failed_gate.value == pytest.approx(3 / len(waves[2]))

    touched = [*waves[0], *waves[1], *waves[2]]
    rollbacks = {p.device_id: p for p in fleet.publisher.sent if p.version != "2.0.0"}
    assert sorted(rollbacks) == sorted(touched)
    assert {(p.version, p.rollout_id) for p in rollbacks.values()} == {("1.0.0", rollout.id)}
    statuses = {d.device: d for d in view.devices}
    for device_id in waves[3]:
        assert statuses[device_id].status == "cancelled"
        assert device_id not in {p.device_id for p in fleet.publisher.sent}
    for device_id in touched:
        assert statuses[device_id].status == "rolling_back"
        assert statuses[device_id].seq == rollbacks[device_id].seq
    assert statuses[broken[0]].detail == "was rolled_back"
    # The wave failed as soon as no later report could save it, before the others answered.
    assert statuses[fine[0]].detail == "was published"

    # Devices confirm the rollback; a late forward report changes nothing.
    fleet.answer_many(touched)
    fleet.answer(fine[0], "committed", seq=fleet.publisher.to(fine[0])[0].seq)
    view = fleet.engine.get(rollout.id)
    statuses = {d.device: d for d in view.devices}
    assert {statuses[d].status for d in touched} == {"rolled_back"}
    assert statuses[broken[0]].reason == "aborted"
    assert statuses[broken[0]].detail == f"back on 1.0.0 (seq {rollbacks[broken[0]].seq})"
    assert view.phase == "done"
    sent = len(fleet.publisher.sent)
    await fleet.engine.step()
    assert len(fleet.publisher.sent) == sent


async def test_each_device_goes_back_to_its_own_previous_version(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 2, versions=("1.5.0",))
    add_device(fleet.store, "cam-old", running="1.5.0")
    add_device(fleet.store, "cam-fresh", running=None)  # nothing to go back to
    add_device(fleet.store, "cam-odd", running="0.9.0")  # never published: cannot be named
    rollout = fleet.engine.create(spec(policy=fast_policy(waves=[100])), "alice")
    await fleet.engine.step()
    assert len(fleet.publisher.sent) == 5
    fleet.engine.abort(rollout.id, "bob")
    await fleet.engine.step()
    back = {p.device_id: p.version for p in fleet.publisher.sent[5:]}
    assert back == {"cam-000": "1.0.0", "cam-001": "1.0.0", "cam-old": "1.5.0"}
    statuses = {d.device: (d.status, d.reason) for d in fleet.engine.get(rollout.id).devices}
    assert statuses["cam-fresh"] == ("not_rolled_back", "no_previous_version")
    assert statuses["cam-odd"] == ("not_rolled_back", "previous_version_unpublished")
    assert statuses["cam-old"] == ("rolling_back", "aborted")


async def test_a_rollback_the_device_refuses_is_shown(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 1)
    rollout = fleet.engine.create(spec(), "alice")
    await fleet.engine.step()
    fleet.engine.abort(rollout.id, "bob", "wrong model")
    await fleet.engine.step()
    fleet.answer("cam-000", "failed", reason="hash_mismatch")
    device = fleet.engine.get(rollout.id).devices[0]
    assert (device.status, device.reason) == ("rollback_failed", "hash_mismatch")
    fleet.answer("cam-000", "committed")
    assert fleet.engine.get(rollout.id).devices[0].status == "rolled_back"


@pytest.mark.parametrize(
    ("candidate", "gate", "numbers"),
    [
        (window("2.0.0", 400, p95=30.0), "p95_latency", "×3.00"),
        (window("2.0.0", 400, errors=40), "error_rate", "10.00%"),
        (window("2.0.0", 400, fallbacks=20), "fallback_rate", "5.00%"),
    ],
)
async def test_rate_and_latency_gates_pause_with_their_numbers(
    tmp_path: Path, candidate: VersionWindow, gate: str, numbers: str
) -> None:
    fleet = make_fleet(tmp_path, 20)
    policy = fast_policy(on_failure="pause")
    rollout = fleet.engine.create(spec(policy=policy), "alice")
    await fleet.engine.step()
    baseline = window("1.0.0", 400, p95=10.0)
    canary = fleet.wave_devices(rollout.id, 0)[0]
    fleet.answer(canary, probation=(report(candidate, baseline),))
    await fleet.engine.step()
    view = fleet.engine.get(rollout.id)
    assert view.state == "paused"
    assert view.reason is not None and gate in view.reason and numbers in view.reason
    result = next(g for g in view.waves[0].gates if g.name == gate)
    assert result.passed is False
    assert result.value is not None and result.value > result.threshold
    # Paused: the devices keep the new version, nothing is rolled back or published.
    assert next(d for d in view.devices if d.device == canary).status == "committed"
    sent = len(fleet.publisher.sent)
    await fleet.engine.step()
    assert len(fleet.publisher.sent) == sent

    # Resuming accepts the wave and goes on.
    view = fleet.engine.resume(rollout.id, "bob", "known slow warm-up")
    assert view.waves[0].state == "passed"
    await fleet.engine.step()
    assert fleet.engine.get(rollout.id).wave == 1
    assert len(fleet.publisher.sent) == sent + 1


async def test_gates_without_enough_samples_wait_for_the_deadline_then_an_operator(
    tmp_path: Path,
) -> None:
    fleet = make_fleet(tmp_path, 20)
    rollout = fleet.engine.create(spec(), "alice")
    await fleet.engine.step()
    quiet = report(window("2.0.0", 12), window("1.0.0", 15))
    fleet.answer_many(fleet.wave_devices(rollout.id, 0), probation=(quiet,))
    await fleet.engine.step()
    view = fleet.engine.get(rollout.id)
    assert (view.state, view.phase) == ("running", "gating")
    error_rate = next(g for g in view.waves[0].gates if g.name == "error_rate")
    assert (error_rate.passed, error_rate.samples) == (None, 12)

    fleet.clock.advance(61)
    await fleet.engine.step()
    view = fleet.engine.get(rollout.id)
    assert view.state == "awaiting_approval"
    assert view.reason is not None and "lacked samples" in view.reason
    assert "error_rate" in view.reason
    await fleet.engine.step()
    assert len(fleet.publisher.sent) == 1

    view = fleet.engine.approve(rollout.id, "bob")
    assert (view.state, view.wave, view.waves[0].state) == ("running", 1, "passed")
    await fleet.engine.step()
    assert len(fleet.publisher.sent) == 2


async def test_a_silent_device_fails_at_the_deadline(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 20)
    rollout = fleet.engine.create(spec(), "alice")
    await fleet.engine.step()
    canary = fleet.wave_devices(rollout.id, 0)[0]
    fleet.answer(canary, "downloading")
    fleet.clock.advance(59)
    await fleet.engine.step()
    assert fleet.engine.get(rollout.id).phase == "waiting"

    fleet.clock.advance(2)
    await fleet.engine.step()
    view = fleet.engine.get(rollout.id)
    assert view.state == "aborted"
    device = next(d for d in view.devices if d.device == canary)
    assert device.status in ("rollback_pending", "rolling_back")
    assert device.detail == "was deadline (deadline)"
    assert view.reason is not None and "stayed silent" in view.reason


async def test_silent_devices_count_as_failed_within_the_allowed_share(tmp_path: Path) -> None:
    policy = fast_policy(waves=[50, 100], gates=GatePolicy(max_failed_share=0.25))
    fleet = make_fleet(tmp_path, 8)
    rollout = fleet.engine.create(spec(policy=policy), "alice")
    await fleet.engine.step()
    first = fleet.wave_devices(rollout.id, 0)
    fleet.answer_many(first[1:], probation=HEALTHY)
    fleet.clock.advance(61)
    await fleet.engine.step()
    view = fleet.engine.get(rollout.id)
    assert view.wave == 1
    assert next(d for d in view.devices if d.device == first[0]).status == "deadline"
    assert view.waves[0].gates[0].value == pytest.approx(0.25)
    # A late commit is still recorded for the device.
    fleet.answer(first[0])
    assert next(d for d in fleet.engine.get(rollout.id).devices if d.device == first[0]).status == (
        "committed"
    )


async def test_manual_approval_between_waves(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 20)
    rollout = fleet.engine.create(spec(policy=fast_policy(approval="manual")), "alice")
    await fleet.engine.step()
    with pytest.raises(RolloutConflictError, match="cannot be approved"):
        fleet.engine.approve(rollout.id, "bob")
    await finish_wave(fleet, rollout.id, 0)
    view = fleet.engine.get(rollout.id)
    assert (view.state, view.waves[0].state) == ("awaiting_approval", "passed")
    assert view.reason == "wave 1 passed; approve to start wave 2"
    await fleet.engine.step()
    assert len(fleet.publisher.sent) == 1
    fleet.engine.approve(rollout.id, "bob", "canary looks good")
    await fleet.engine.step()
    assert len(fleet.publisher.sent) == 2
    approvals = [
        e for e in fleet.store.audit.find(subject=rollout.id) if e.action.endswith("approved")
    ]
    assert approvals[0].actor == "bob"
    assert approvals[0].detail == {"wave": 0, "reason": "canary looks good"}


async def test_pause_resume_and_abort(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 20)
    rollout = fleet.engine.create(spec(policy=fast_policy(waves=[100], publish_rate=5)), "a")
    await fleet.engine.step()
    assert len(fleet.publisher.sent) == 5
    view = fleet.engine.pause(rollout.id, "bob")
    assert (view.state, view.reason) == ("paused", "paused by bob")
    fleet.clock.advance(10)
    await fleet.engine.step()
    assert len(fleet.publisher.sent) == 5
    with pytest.raises(RolloutConflictError, match="is paused and cannot be paused"):
        fleet.engine.pause(rollout.id, "bob")

    view = fleet.engine.resume(rollout.id, "bob")
    assert (view.state, view.phase, view.reason) == ("running", "publishing", None)
    await fleet.engine.step()
    assert len(fleet.publisher.sent) == 10

    view = fleet.engine.abort(rollout.id, "carol", "wrong group")
    assert view.state == "aborted"
    assert view.reason == "aborted by carol: wrong group"
    counts = view.waves[0].counts
    assert counts == {"rollback_pending": 10, "cancelled": 10}
    fleet.clock.advance(1)
    await fleet.engine.step()
    assert {p.version for p in fleet.publisher.sent[10:]} == {"1.0.0"}
    for command in (fleet.engine.abort, fleet.engine.resume, fleet.engine.approve):
        with pytest.raises(RolloutConflictError):
            command(rollout.id, "bob")
    with pytest.raises(UnknownRolloutError, match="r-nothing"):
        fleet.engine.pause("r-nothing", "bob")


def test_a_device_takes_one_rollout_at_a_time_whatever_the_model(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 5)
    publish_version(fleet.store, "1.0.0", name="faces", release=1)
    digits = fleet.engine.create(spec(), "alice")
    other = RolloutSpec(
        model="faces",
        version="1.0.0",
        selector=Selector(groups=("cameras",)),
        policy=fast_policy(),
        supersede=True,  # supersedes rollouts of its own model only
    )
    with pytest.raises(RolloutConflictError, match=f"{digits.id} of another model"):
        fleet.engine.create(other, "bob")
    fleet.engine.abort(digits.id, "alice")
    assert fleet.engine.create(other, "bob").model == "faces"


async def test_overlapping_rollout_is_refused_unless_it_supersedes(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 20, versions=("3.0.0",))
    old = fleet.engine.create(spec(), "alice")
    await fleet.engine.step()
    await finish_wave(fleet, old.id, 0)
    moved = {p.device_id for p in fleet.publisher.sent}

    with pytest.raises(RolloutConflictError, match=old.id) as caught:
        fleet.engine.create(spec("3.0.0"), "bob")
    assert "supersede" in str(caught.value)

    new = fleet.engine.create(spec("3.0.0", supersede=True), "bob")
    before = fleet.engine.get(old.id)
    assert (before.state, before.superseded_by) == ("superseded", new.id)
    assert before.reason == f"superseded by {new.id}"
    assert {d.status for d in before.devices if d.device not in moved} == {"cancelled"}

    fleet.publisher.sent.clear()
    for _ in range(3):
        fleet.clock.advance(1)
        await fleet.engine.step()
    assert {p.rollout_id for p in fleet.publisher.sent} == {new.id}
    assert {p.version for p in fleet.publisher.sent} == {"3.0.0"}


@pytest.mark.parametrize(
    ("rollout", "message"),
    [
        (RolloutSpec(model=MODEL, version="2.0.0", selector=Selector()), "names no group"),
        (
            spec("9.9.9"),
            "digits@9.9.9 is not published (published versions of digits: 1.0.0, 2.0.0)",
        ),
        (spec(groups=("nowhere",)), "matches no device"),
        (
            RolloutSpec(model="faces", version="1.0.0", selector=Selector(groups=("cameras",))),
            "no version of 'faces' is published",
        ),
    ],
)
def test_invalid_requests_are_refused(tmp_path: Path, rollout: RolloutSpec, message: str) -> None:
    fleet = make_fleet(tmp_path, 3)
    with pytest.raises(InvalidRolloutError) as caught:
        fleet.engine.create(rollout, "alice")
    assert message in str(caught.value)
    assert fleet.engine.list() == []
    with pytest.raises(InvalidRolloutError, match="unknown rollout state"):
        fleet.engine.list("sleeping")


async def test_a_restart_mid_wave_continues_without_publishing_twice(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 20)
    rollout = fleet.engine.create(spec(policy=fast_policy(publish_rate=4)), "alice")
    await fleet.engine.step()
    await finish_wave(fleet, rollout.id, 0)
    await finish_wave(fleet, rollout.id, 1)
    # Wave 2 (8 devices) is half published when the service stops.
    assert len(fleet.publisher.sent) == 2 + 4
    published = {p.device_id for p in fleet.publisher.sent}
    fleet.answer_many(sorted(set(fleet.wave_devices(rollout.id, 2)) & published), probation=HEALTHY)

    fleet = fleet.reopen()
    view = fleet.engine.get(rollout.id)
    assert (view.state, view.wave, view.phase) == ("running", 2, "publishing")
    await fleet.engine.step()
    again = {p.device_id for p in fleet.publisher.sent}
    assert len(again) == 4 and not again & published
    assert {p.version for p in fleet.publisher.sent} == {"2.0.0"}
    # The new engine hears the rest of the wave and publishes the last wave.
    fleet.answer_many(sorted(again), probation=HEALTHY)
    for _ in range(3):
        fleet.clock.advance(1)
        await fleet.engine.step()
    view = fleet.engine.get(rollout.id)
    assert (view.wave, view.phase) == (3, "waiting")
    last = [d for d in view.devices if d.wave == 3]
    assert {d.status for d in last} == {"published"}

    fleet = fleet.reopen()
    fleet.clock.advance(5)
    await fleet.engine.step()  # a restart while waiting publishes nothing
    assert fleet.publisher.sent == []
    for device in last:
        fleet.engine.on_update(
            UpdateProgress(
                device_id=device.device,
                seq=device.seq,
                rollout_id=rollout.id,
                stage="committed",
                at=fleet.clock(),
                probation=HEALTHY,
            )
        )
    await fleet.engine.step()
    assert fleet.engine.get(rollout.id).state == "completed"
    assert fleet.publisher.sent == []


async def test_a_restart_while_rolling_back_finishes_the_rollback(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 20)
    rollout = fleet.engine.create(spec(), "alice")
    await fleet.engine.step()
    await finish_wave(fleet, rollout.id, 0)
    fleet.publisher.failing = True
    fleet.engine.abort(rollout.id, "bob")
    await fleet.engine.step()
    assert fleet.engine.get(rollout.id).phase == "rolling_back"

    fleet = fleet.reopen()
    await fleet.engine.step()
    assert {(p.version, p.rollout_id) for p in fleet.publisher.sent} == {("1.0.0", rollout.id)}
    assert len(fleet.publisher.sent) == 2
    assert fleet.engine.get(rollout.id).phase == "done"


async def test_publish_rate_is_paced_across_steps(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 8)
    rollout = fleet.engine.create(spec(policy=fast_policy(waves=[100], publish_rate=2)), "a")
    await fleet.engine.step()
    assert len(fleet.publisher.sent) == 2
    await fleet.engine.step()
    assert len(fleet.publisher.sent) == 2
    fleet.clock.advance(0.5)
    await fleet.engine.step()
    assert len(fleet.publisher.sent) == 3
    fleet.clock.advance(30)  # a long quiet spell allows one second's worth, not thirty
    await fleet.engine.step()
    assert len(fleet.publisher.sent) == 5
    # A step 1.5 s late with devices waiting makes up all 1.5 s (3), not one second's worth.
    fleet.clock.advance(1.5)
    await fleet.engine.step()
    assert len(fleet.publisher.sent) == 8
    fleet.clock.advance(1)
    await fleet.engine.step()
    assert len(fleet.publisher.sent) == 8
    assert fleet.engine.get(rollout.id).phase == "waiting"


async def test_a_failing_publisher_leaves_devices_pending_for_the_next_step(
    tmp_path: Path,
) -> None:
    fleet = make_fleet(tmp_path, 20)
    rollout = fleet.engine.create(spec(), "alice")
    fleet.publisher.failing = True
    await fleet.engine.step()
    view = fleet.engine.get(rollout.id)
    assert (view.phase, view.waves[0].counts) == ("publishing", {"pending": 1})
    fleet.publisher.failing = False
    await fleet.engine.step()
    assert fleet.engine.get(rollout.id).phase == "waiting"
    assert len(fleet.publisher.sent) == 1


@dataclass
class EagerDevices(RecordingPublisher):
    """Devices that answer before the publisher has even returned their seqs."""

    engine: RolloutEngine | None = None
    clock: Clock = field(default_factory=Clock)

    async def publish(
        self, targets: Mapping[str, ModelTarget], rollout_id: str | None
    ) -> Mapping[str, int]:
        seqs = await super().publish(targets, rollout_id)
        assert self.engine is not None
        for device_id, seq in seqs.items():
            self.engine.on_update(
                UpdateProgress(
                    device_id=device_id,
                    seq=seq,
                    rollout_id=rollout_id,
                    stage="committed",
                    at=self.clock(),
                    probation=HEALTHY,
                )
            )
        return seqs


async def test_a_report_that_outruns_its_publish_is_not_lost(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 20)
    publisher = EagerDevices(fleet.store, clock=fleet.clock)
    engine = RolloutEngine(fleet.store, publisher, clock=fleet.clock)
    publisher.engine = engine
    rollout = engine.create(spec(policy=fast_policy(waves=[100])), "alice")
    await engine.step()
    await engine.step()
    assert engine.get(rollout.id).state == "completed"
    assert {d.status for d in engine.get(rollout.id).devices} == {"committed"}


async def test_out_of_order_reports_do_not_undo_an_outcome(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 20)
    rollout = fleet.engine.create(spec(), "alice")
    await fleet.engine.step()
    canary = fleet.wave_devices(rollout.id, 0)[0]
    fleet.answer(canary, "failed", reason="hash_mismatch")
    fleet.answer(canary, "downloading")
    device = fleet.engine.get(rollout.id).devices
    status = next(d for d in device if d.device == canary)
    assert (status.status, status.reason) == ("failed", "hash_mismatch")
    log = fleet.store.rollouts.update_log(canary)
    assert [e.stage for e in log] == ["downloading", "failed"]


@dataclass(frozen=True)
class DriftGate:
    """A gate reading other evidence plugs in beside the standard ones."""

    name: str = "drift"

    def evaluate(self, evidence: WaveEvidence) -> GateResult:
        return GateResult(
            name=self.name,
            value=0.4,
            threshold=0.25,
            passed=False,
            samples=len(evidence.devices),
            detail="PSI 0.40 on feature x",
        )


async def test_another_gate_plugs_in(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 20)

    def gates(policy: RolloutPolicy) -> list[Gate]:
        return [*standard_gates(policy.gates), DriftGate()]

    engine = RolloutEngine(fleet.store, fleet.publisher, clock=fleet.clock, gates=gates)
    rollout = engine.create(spec(), "alice")
    await engine.step()
    fleet.engine = engine
    await finish_wave(fleet, rollout.id, 0)
    view = engine.get(rollout.id)
    assert view.state == "aborted"
    assert view.reason == "wave 1 failed its gates: drift: PSI 0.40 on feature x"


async def test_waves_soak_before_their_gates(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 20)
    rollout = fleet.engine.create(spec(policy=fast_policy(soak_s=30)), "alice")
    await fleet.engine.step()
    await finish_wave(fleet, rollout.id, 0)
    view = fleet.engine.get(rollout.id)
    assert (view.phase, view.waves[0].state, view.waves[0].gates) == ("soaking", "soaking", ())
    fleet.clock.advance(28)
    await fleet.engine.step()
    assert fleet.engine.get(rollout.id).phase == "soaking"
    fleet.clock.advance(2)
    await fleet.engine.step()
    view = fleet.engine.get(rollout.id)
    assert (view.wave, view.waves[0].state) == (1, "passed")


async def test_waves_left_empty_by_rounding_are_skipped(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 3)
    rollout = fleet.engine.create(spec(), "alice")
    assert [w.devices for w in rollout.waves] == [1, 0, 1, 1]
    await fleet.engine.step()
    await finish_wave(fleet, rollout.id, 0)
    view = fleet.engine.get(rollout.id)
    assert [w.state for w in view.waves[:3]] == ["passed", "skipped", "waiting"]
    await finish_wave(fleet, rollout.id, 2)
    await finish_wave(fleet, rollout.id, 3)
    assert fleet.engine.get(rollout.id).state == "completed"


async def test_a_rollout_paused_before_it_started_or_while_awaiting_approval_resumes_there(
    tmp_path: Path,
) -> None:
    fleet = make_fleet(tmp_path, 20)
    rollout = fleet.engine.create(spec(policy=fast_policy(approval="manual")), "alice")
    fleet.engine.pause(rollout.id, "bob")
    await fleet.engine.step()
    assert fleet.publisher.sent == []
    assert fleet.engine.resume(rollout.id, "bob").state == "created"
    await fleet.engine.step()
    await finish_wave(fleet, rollout.id, 0)
    fleet.engine.pause(rollout.id, "bob", "change freeze")
    assert fleet.engine.get(rollout.id).reason == "change freeze"
    view = fleet.engine.resume(rollout.id, "bob")
    assert (view.state, view.phase) == ("awaiting_approval", "approval")


async def test_list_gives_summaries_by_state(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 20, versions=("3.0.0",))
    first = fleet.engine.create(spec(), "alice")
    fleet.engine.abort(first.id, "alice")
    second = fleet.engine.create(spec("3.0.0"), "alice")
    assert [v.id for v in fleet.engine.list()] == [first.id, second.id]
    created = fleet.engine.list("created")
    assert [v.id for v in created] == [second.id]
    assert created[0].devices == ()
    assert created[0].waves[3].devices == 10
    assert [v.id for v in fleet.engine.list("aborted")] == [first.id]


async def test_a_new_rollout_takes_devices_from_a_rollback_not_yet_published(
    tmp_path: Path,
) -> None:
    fleet = make_fleet(tmp_path, 20, versions=("3.0.0",))
    old = fleet.engine.create(spec(policy=fast_policy(waves=[100])), "alice")
    await fleet.engine.step()
    fleet.publisher.failing = True
    fleet.engine.abort(old.id, "alice")
    await fleet.engine.step()
    assert fleet.engine.get(old.id).waves[0].counts == {"rollback_pending": 20}

    new = fleet.engine.create(spec("3.0.0", policy=fast_policy(waves=[100])), "bob")
    view = fleet.engine.get(old.id)
    assert view.waves[0].counts == {"cancelled": 20}
    assert view.devices[0].detail == f"taken over by {new.id}"
    fleet.publisher.failing = False
    fleet.publisher.sent.clear()
    fleet.clock.advance(1)
    await fleet.engine.step()
    # Only the new version goes out: 1.0.0 from the old rollback would undo it.
    assert {(p.version, p.rollout_id) for p in fleet.publisher.sent} == {("3.0.0", new.id)}
    assert fleet.engine.get(old.id).phase == "done"


@dataclass(frozen=True)
class PassingGate:
    name: str = "always"

    def evaluate(self, evidence: WaveEvidence) -> GateResult:
        return GateResult(
            name=self.name, value=None, threshold=0, passed=True, samples=1, detail="ok"
        )


async def test_a_wave_only_passes_once_every_device_has_settled(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 4)
    engine = RolloutEngine(
        fleet.store, fleet.publisher, clock=fleet.clock, gates=lambda _: [PassingGate()]
    )
    fleet.engine = engine
    rollout = engine.create(spec(policy=fast_policy(waves=[50, 100])), "alice")
    await engine.step()
    first, second = fleet.wave_devices(rollout.id, 0)
    fleet.answer(first, "failed", reason="hash_mismatch")
    await engine.step()  # the failure sends the wave to its gates early; they do not fail it
    assert (engine.get(rollout.id).phase, len(fleet.publisher.sent)) == ("waiting", 2)
    fleet.answer(second)
    await engine.step()
    assert engine.get(rollout.id).wave == 1


async def test_the_deadline_gives_every_device_its_full_time_however_slow_the_pacing(
    tmp_path: Path,
) -> None:
    fleet = make_fleet(tmp_path, 20)
    # One desired state a second: the last of 20 devices is published 19 s after the first.
    policy = fast_policy(waves=(100,), publish_rate=1, wave_deadline_s=30)
    rollout = fleet.engine.create(spec(policy=policy), "alice")
    devices = fleet.wave_devices(rollout.id, 0)
    for _ in range(20):
        await fleet.engine.step()
        fleet.clock.advance(1)
    assert len(fleet.publisher.sent) == 20
    fleet.clock.advance(25)  # 45 s after the wave's start, 26 s after the last publish
    await fleet.engine.step()
    assert fleet.engine.get(rollout.id).phase == "waiting"
    fleet.answer_many(devices, probation=HEALTHY)
    await fleet.engine.step()
    view = fleet.engine.get(rollout.id)
    assert view.state == "completed", view.reason
    assert {d.status for d in view.devices} == {"committed"}


def test_a_report_after_the_deadline_changes_nothing_unless_it_is_final() -> None:
    silent = AssignmentRow(
        rollout_id="r-1", device_id="cam-1", wave=0, seq=3, status="deadline", updated_at=START
    )
    late = UpdateProgress(device_id="cam-1", seq=3, stage="downloading", at=START)
    assert status_change(silent, late, model=MODEL, aborted=False) is None
    done = UpdateProgress(device_id="cam-1", seq=3, stage="committed", at=START)
    change = status_change(silent, done, model=MODEL, aborted=False)
    assert change is not None and change.status == "committed"


async def test_desired_states_no_device_acknowledged_are_listed_for_publishing_again(
    tmp_path: Path,
) -> None:
    fleet = make_fleet(tmp_path, 20)
    rollout = fleet.engine.create(spec(), "alice")
    await fleet.engine.step()
    canary = fleet.wave_devices(rollout.id, 0)[0]
    seq = fleet.publisher.last(canary).seq
    assert fleet.engine.unacknowledged() == [(canary, seq)]
    fleet.answer(canary, "received")
    assert fleet.engine.unacknowledged() == []
