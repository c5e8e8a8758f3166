"""The moves between rollout states, each persisted with its time and written to the audit log.

Both the operator's commands and the engine's own steps go through these, so a wave is started,
passed, failed or rolled back the same way whoever asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fleet.errors import UnknownModelError
from fleet.rollouts.spec import RolloutPolicy
from fleet.rollouts.states import DEVICE_FINAL
from fleet.store import Store
from fleet.store.rollouts import AssignmentRow, RolloutRow

__all__ = ["SYSTEM_ACTOR", "Transitions"]

SYSTEM_ACTOR = "rollouts"  # the audit log's actor for moves the engine makes by itself


class Transitions:
    """Persisted state changes of rollouts."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._rollouts = store.rollouts

    def record(self, actor: str, action: str, rollout_id: str, **detail: Any) -> None:
        """One audit entry about a rollout."""
        self._store.audit.record(actor, f"rollout.{action}", rollout_id, detail or None)

    def start_wave(self, row: RolloutRow, index: int, now: datetime, actor: str) -> None:
        """Start wave ``index`` (skipping waves without devices), or complete the rollout."""
        if row.state == "created":
            self.record(actor, "started", row.id)
        waves = self._rollouts.waves(row.id)
        counts = self._rollouts.status_counts(row.id)
        while index < len(waves) and not counts.get(index):
            # Few devices: several percents round to the same count and leave waves empty.
            self._rollouts.update_wave(
                row.id, index, state="skipped", started_at=now, finished_at=now
            )
            index += 1
        if index >= len(waves):
            self.complete(row, now)
            return
        self._rollouts.update(
            row.id, now, state="running", wave=index, phase="publishing", clear_reason=True
        )
        self._rollouts.update_wave(row.id, index, state="publishing", started_at=now)
        self.record(actor, "wave_started", row.id, wave=index, devices=sum(counts[index].values()))

    def phase(self, row: RolloutRow, phase: str, now: datetime) -> None:
        """Move the current wave to its next phase."""
        self._rollouts.update(row.id, now, phase=phase)
        self._rollouts.update_wave(row.id, row.wave, state=phase)

    def wave_passed(
        self, row: RolloutRow, policy: RolloutPolicy, now: datetime, actor: str, *, ask: bool
    ) -> None:
        """The current wave is done: start the next one, wait for approval, or complete.

        ``ask``: whether a manual-approval policy should stop here (not when an operator has
        just approved).
        """
        wave = self._rollouts.waves(row.id)[row.wave]
        if wave.state != "passed":
            self._rollouts.update_wave(row.id, row.wave, state="passed", finished_at=now)
            self.record(actor, "wave_passed", row.id, wave=row.wave)
        last = row.wave + 1 >= len(policy.waves)
        if last and ask and policy.experiment is not None:
            # An experiment is not over when its devices are in place: it runs until an
            # operator has seen its verdict and ends it one way or the other.
            self.hold(
                row,
                f"every wave passed and the {policy.experiment.mode} experiment runs; see its "
                f"verdict with `edgefleet fleet rollout experiment {row.id}`, then approve to keep "
                "the devices as they are or abort to send them back",
                now,
            )
        elif last:
            self.complete(row, now)
        elif ask and policy.approval == "manual":
            self.hold(row, f"wave {row.wave + 1} passed; approve to start wave {row.wave + 2}", now)
        else:
            self.start_wave(row, row.wave + 1, now, actor)

    def hold(self, row: RolloutRow, reason: str, now: datetime) -> None:
        """Wait for an operator's approval."""
        self._rollouts.update(
            row.id, now, state="awaiting_approval", phase="approval", reason=reason
        )
        self.record(SYSTEM_ACTOR, "awaiting_approval", row.id, wave=row.wave, reason=reason)

    def complete(self, row: RolloutRow, now: datetime) -> None:
        self._rollouts.update(row.id, now, state="completed", clear_phase=True, clear_reason=True)
        self.record(SYSTEM_ACTOR, "completed", row.id)

    def fail(self, row: RolloutRow, policy: RolloutPolicy, reason: str, now: datetime) -> None:
        """The current wave failed: pause or abort, as the policy says."""
        self._rollouts.update_wave(row.id, row.wave, state="failed", finished_at=now)
        self.record(SYSTEM_ACTOR, "wave_failed", row.id, wave=row.wave, reason=reason)
        if policy.on_failure == "pause":
            self.pause(row, SYSTEM_ACTOR, reason, now)
        else:
            self.abort(row, SYSTEM_ACTOR, reason, now)

    def pause(self, row: RolloutRow, actor: str, reason: str, now: datetime) -> None:
        self._rollouts.update(row.id, now, state="paused", reason=reason)
        self.record(actor, "paused", row.id, reason=reason)

    def abort(self, row: RolloutRow, actor: str, reason: str, now: datetime) -> None:
        """Stop, and send every device the rollout touched back to its previous version.

        Devices not published to yet are cancelled. A device whose previous version is unknown
        or not published cannot be named back: it is ``not_rolled_back``, with the reason.
        """
        # One transaction: a crash must not leave the rollout aborted with nobody sent back.
        with self._rollouts.atomic():
            self._rollouts.update(row.id, now, state="aborted", phase="rolling_back", reason=reason)
            self.send_back(row, self._rollouts.assignments(row.id), now)
            self.record(actor, "aborted", row.id, reason=reason, wave=row.wave)

    def send_back(
        self, row: RolloutRow, assignments: Sequence[AssignmentRow], now: datetime
    ) -> None:
        """Mark devices of an aborted rollout for a rollback desired state, or say why not."""
        groups: dict[tuple[str, str, str | None], list[str]] = {}
        published: dict[str, bool] = {}
        for a in assignments:
            key: tuple[str, str, str | None]
            if a.status in ("pending", "cancelled"):
                key = ("cancelled", "aborted", None)
            elif a.previous_version is None:
                key = ("not_rolled_back", "no_previous_version", _was(a.status, a.reason))
            else:
                if a.previous_version not in published:
                    published[a.previous_version] = self._published(row.model, a.previous_version)
                if published[a.previous_version]:
                    key = ("rollback_pending", "aborted", _was(a.status, a.reason))
                else:
                    key = ("not_rolled_back", "previous_version_unpublished", None)
            groups.setdefault(key, []).append(a.device_id)
        for (status, why, detail), devices in groups.items():
            self._rollouts.set_status(
                row.id, devices, status=status, reason=why, detail=detail, at=now
            )

    def _published(self, model: str, version: str) -> bool:
        try:
            self._store.models.get(model, version)
        except UnknownModelError:
            return False
        return True


def _was(status: str, reason: str | None) -> str:
    if status in DEVICE_FINAL or status == "deadline":
        return f"was {status}" + (f" ({reason})" if reason else "")
    return f"was {status}"
