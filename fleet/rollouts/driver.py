"""Moving running rollouts along, one step at a time, from what the store says.

Every decision reads the persisted phase and statuses, never memory, so a fleet service that
restarts mid-wave continues exactly where it stood: it publishes the assignments still
``pending`` (and only the current wave's), and waits for the rest. Only the publish pacing lives
in memory; after a restart it starts with a full bucket.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta

from fleet.errors import FleetError
from fleet.rollouts.gates import DeviceOutcome, Gate, GateResult, WaveEvidence
from fleet.rollouts.pacing import Pacer
from fleet.rollouts.ports import DesiredPublisher, DeviceTargets
from fleet.rollouts.spec import RolloutPolicy
from fleet.rollouts.states import DEVICE_FAILED, DEVICE_FINAL
from fleet.rollouts.transitions import SYSTEM_ACTOR, Transitions
from fleet.rollouts.view import dump_gates, load_gates, load_policy
from fleet.store import Store
from fleet.store.rollouts import AssignmentRow, RolloutRow
from protocol.director import ModelTarget

__all__ = ["Driver", "GateFactory"]

log = logging.getLogger(__name__)

GateFactory = Callable[[RolloutPolicy], Sequence[Gate]]
# Statuses after which a device will say nothing more about this desired state that matters
# for the wave: an outcome, silence past the deadline, or no desired state at all.
_SETTLED = DEVICE_FINAL | {"deadline", "cancelled"}
_MAX_MOVES = 16  # transitions one rollout may make in one step (each wave has four phases)


class Driver:
    """Advances one rollout through its phases; the engine calls it for each live rollout."""

    def __init__(
        self,
        store: Store,
        publisher: DesiredPublisher,
        transitions: Transitions,
        gates: GateFactory,
        on_published: Callable[[Mapping[str, int]], None],
    ) -> None:
        self._store = store
        self._rollouts = store.rollouts
        self._publisher = publisher
        self._transitions = transitions
        self._gates = gates
        self._on_published = on_published
        self._pacers: dict[str, Pacer] = {}

    async def advance(self, rollout_id: str, now: datetime) -> None:
        """Make every move the rollout can make now."""
        for _ in range(_MAX_MOVES):
            row = self._rollouts.get(rollout_id)
            if not await self._move(row, now):
                break
        else:
            log.warning("rollout still moving after a step", extra={"rollout": rollout_id})

    def forget(self, rollout_id: str) -> None:
        """Drop the pacing of a rollout that will publish no more."""
        self._pacers.pop(rollout_id, None)

    async def _move(self, row: RolloutRow, now: datetime) -> bool:
        if row.state == "created":
            self._transitions.start_wave(row, 0, now, SYSTEM_ACTOR)
            return True
        if row.state == "aborted" and row.phase == "rolling_back":
            return await self._roll_back(row, now)
        if row.state != "running":
            return False
        policy = load_policy(row)
        if row.phase == "publishing":
            return await self._publish(row, policy, now)
        if row.phase == "waiting":
            return self._wait(row, policy, now)
        if row.phase == "soaking":
            started = row.phase_started_at or now
            if now - started < timedelta(seconds=policy.soak_s):
                return False
            self._transitions.phase(row, "gating", now)
            return True
        if row.phase == "gating":
            return self._gate(row, policy, now)
        return False

    # -- phases ------------------------------------------------------------------------------

    async def _publish(self, row: RolloutRow, policy: RolloutPolicy, now: datetime) -> bool:
        pending = self._rollouts.assignments(row.id, wave=row.wave, statuses=("pending",))
        if pending:
            sent = await self._paced(row, policy, now, pending, self._targets(row, policy, pending))
            if sent < len(pending):
                return False
        self._transitions.phase(row, "waiting", now)
        return True

    def _targets(
        self, row: RolloutRow, policy: RolloutPolicy, pending: Sequence[AssignmentRow]
    ) -> Callable[[AssignmentRow], DeviceTargets]:
        """What each device's desired state names: the new version; in a shadow experiment,
        the version the device serves and the new one beside it as its shadow."""
        target = self._store.models.get(row.model, row.version).target()
        experiment = policy.experiment
        if experiment is None or experiment.mode != "shadow":
            return lambda _: target
        shadow = target.model_copy(update={"role": "shadow"})
        primaries = {
            version: self._store.models.get(row.model, version).target()
            for version in {a.previous_version for a in pending if a.previous_version}
        }
        return lambda a: (
            (primaries[a.previous_version], shadow) if a.previous_version else (shadow,)
        )

    def _wait(self, row: RolloutRow, policy: RolloutPolicy, now: datetime) -> bool:
        wave = self._rollouts.assignments(row.id, wave=row.wave)
        unsettled = [a for a in wave if a.status not in _SETTLED]
        if not unsettled:
            self._transitions.phase(row, "soaking", now)
            return True
        failed = sum(a.status in DEVICE_FAILED for a in wave)
        if failed / len(wave) > policy.gates.max_failed_share:
            # Enough devices failed already that no later report can save the wave: gate now.
            self._transitions.phase(row, "gating", now)
            return True
        if now < self._deadline(row, policy):
            return False
        for status in sorted({a.status for a in unsettled}):
            self._rollouts.set_status(
                row.id,
                [a.device_id for a in unsettled if a.status == status],
                status="deadline",
                reason="deadline",
                detail=(
                    f"no final report within {policy.wave_deadline_s:g} s of its desired state "
                    f"(last: {status})"
                ),
                at=now,
            )
        self._transitions.phase(row, "soaking", now)
        return True

    def _gate(self, row: RolloutRow, policy: RolloutPolicy, now: datetime) -> bool:
        wave = self._rollouts.waves(row.id)[row.wave]
        evidence = WaveEvidence(
            rollout_id=row.id,
            model=row.model,
            version=row.version,
            wave=row.wave,
            devices=tuple(_outcome(a) for a in self._rollouts.assignments(row.id, wave=row.wave)),
            started_at=wave.started_at or now,
            now=now,
        )
        results = tuple(gate.evaluate(evidence) for gate in self._gates(policy))
        if results != load_gates(wave):
            self._rollouts.update_wave(row.id, row.wave, gates=dump_gates(results))
        failed = [r for r in results if r.passed is False]
        if failed:
            reason = f"wave {row.wave + 1} failed its gates: {_explain(failed)}"
            self._transitions.fail(row, policy, reason, now)
            self.forget(row.id)
            return True
        if any(d.status not in _SETTLED for d in evidence.devices):
            # Came here early on failures that these gates did not confirm: wait for the rest.
            self._transitions.phase(row, "waiting", now)
            return False
        if all(r.passed for r in results):
            self._transitions.wave_passed(row, policy, now, SYSTEM_ACTOR, ask=True)
            return True
        if now < self._deadline(row, policy):
            return False  # late reports may still bring the samples
        lacking = [r for r in results if r.passed is None]
        self._transitions.hold(
            row,
            f"wave {row.wave + 1} gates lacked samples by the deadline: {_explain(lacking)}; "
            "approve to go on or abort to roll back",
            now,
        )
        return True

    async def _roll_back(self, row: RolloutRow, now: datetime) -> bool:
        pending = self._rollouts.assignments(row.id, statuses=("rollback_pending",))
        if pending:
            policy = load_policy(row)
            targets: dict[str, ModelTarget] = {}
            for version in {a.previous_version for a in pending if a.previous_version}:
                targets[version] = self._store.models.get(row.model, version).target()
            sent = await self._paced(
                row, policy, now, pending, lambda a: targets[a.previous_version or ""]
            )
            if sent < len(pending):
                return False
        self._rollouts.update(row.id, now, phase="done")
        self._transitions.record(SYSTEM_ACTOR, "rollbacks_published", row.id)
        self.forget(row.id)
        return True

    # -- helpers -----------------------------------------------------------------------------

    async def _paced(
        self,
        row: RolloutRow,
        policy: RolloutPolicy,
        now: datetime,
        pending: Sequence[AssignmentRow],
        target: Callable[[AssignmentRow], DeviceTargets],
    ) -> int:
        """Publish what the rate allows of ``pending``; return how many went out."""
        pacer = self._pacers.setdefault(row.id, Pacer(policy.publish_rate))
        batch = pending[: pacer.allowance(now)]
        if not batch:
            return 0
        try:
            seqs = await self._publisher.publish({a.device_id: target(a) for a in batch}, row.id)
        except FleetError as e:
            log.warning(
                "publishing desired states failed; will retry",
                extra={"rollout": row.id, "devices": len(batch), "detail": str(e)},
            )
            return 0
        pacer.spend(len(seqs), waiting=len(pending) - len(seqs))
        rolling_back = row.phase == "rolling_back"
        self._rollouts.published(
            row.id, seqs, status="rolling_back" if rolling_back else "published", at=now
        )
        if not rolling_back and self._rollouts.get(row.id).state == "aborted":
            # Aborted while these documents were on their way: send those devices back too.
            sent = set(seqs)
            self._transitions.send_back(
                row, [a for a in self._rollouts.assignments(row.id) if a.device_id in sent], now
            )
        self._on_published(seqs)
        return len(seqs)

    def _deadline(self, row: RolloutRow, policy: RolloutPolicy) -> datetime:
        """The wave's start + the time its publish rate needs for its devices + the deadline:
        a device is given the whole deadline however late the pacing let it be published."""
        wave = self._rollouts.waves(row.id)[row.wave]
        started = wave.started_at or row.phase_started_at or row.updated_at
        devices = len(self._rollouts.assignments(row.id, wave=row.wave))
        pacing = devices / policy.publish_rate
        return started + timedelta(seconds=policy.wave_deadline_s + pacing)


def _outcome(a: AssignmentRow) -> DeviceOutcome:
    return DeviceOutcome(
        device_id=a.device_id,
        status=a.status,
        previous_version=a.previous_version,
        probation=a.probation,
    )


def _explain(results: Sequence[GateResult]) -> str:
    return "; ".join(f"{r.name}: {r.detail}" for r in results)
