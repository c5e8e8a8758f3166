"""The rollout engine: creates rollouts, takes operators' commands and devices' reports, and
moves every live rollout along when the service calls :meth:`RolloutEngine.step`.

All state is in the store; the engine holds only publish pacing and the reports that arrive while
their desired state is still being published. A new engine on the same database continues every
rollout where it stood.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import get_args

from fleet.errors import (
    FleetError,
    InvalidRolloutError,
    RolloutConflictError,
    UnknownModelError,
    UnknownRolloutError,
)
from fleet.rollouts.driver import Driver, GateFactory
from fleet.rollouts.gates import FailedInstallGate, Gate, standard_gates
from fleet.rollouts.plan import plan_waves, split_arms
from fleet.rollouts.ports import DesiredPublisher
from fleet.rollouts.progress import status_change
from fleet.rollouts.spec import RolloutPolicy, RolloutSpec
from fleet.rollouts.states import ACTIVE, RolloutState
from fleet.rollouts.transitions import Transitions
from fleet.rollouts.view import RolloutView, load_policy, read_view
from fleet.store import Store
from fleet.store.rollouts import AssignmentRow, RolloutRow, WaveRow
from fleet.telemetry.drift import FleetDrift
from protocol.mqtt import UpdateProgress

__all__ = ["DesiredPublisher", "RolloutEngine", "utc_now"]

log = logging.getLogger(__name__)

_STATES: frozenset[str] = frozenset(get_args(RolloutState))
_HELD_REPORTS = 10_000  # reports kept while their desired states are being published
_HELD_PER_DOCUMENT = 8  # of them per (device, seq)
_UNACKNOWLEDGED = ("published", "rolling_back")  # sent; no report from the device yet
_LIVE = ("created", "running", "aborted")  # states in which step() has something to do


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _standard(policy: RolloutPolicy, drift: FleetDrift | None = None) -> Sequence[Gate]:
    experiment = policy.experiment
    if experiment is not None and experiment.mode == "shadow":
        # A shadow answers no caller: only its installs are the wave's to judge; how it serves
        # is the experiment's verdict.
        return [FailedInstallGate(policy.gates.max_failed_share)]
    return standard_gates(policy.gates, drift=drift)


class RolloutEngine:
    """Every rollout of the fleet, driven through its waves."""

    def __init__(
        self,
        store: Store,
        publisher: DesiredPublisher,
        *,
        clock: Callable[[], datetime] = utc_now,
        gates: GateFactory | None = None,
        drift_check_s: float = 0.0,  # the drift gate reads a wave's counts at most this often
    ) -> None:
        self._store = store
        self._rollouts = store.rollouts
        self._clock = clock
        self._transitions = Transitions(store)
        if gates is None:
            # The drift gate reads the wave's drift counts.
            drift = FleetDrift(store, wave_reuse_s=drift_check_s)
            gates = lambda policy: _standard(policy, drift)  # noqa: E731
        self._driver = Driver(store, publisher, self._transitions, gates, self._published)
        self._step_lock = asyncio.Lock()
        # A device can answer before publish() returns its seq: hold such reports until then.
        self._held: OrderedDict[tuple[str, int], builtins.list[UpdateProgress]] = OrderedDict()

    # -- reads -------------------------------------------------------------------------------

    def get(self, rollout_id: str) -> RolloutView:
        """One rollout with its waves and every device; :class:`UnknownRolloutError` if none."""
        return read_view(self._rollouts, self._rollouts.get(rollout_id), devices=True)

    def list(self, state: str | None = None) -> builtins.list[RolloutView]:
        """Rollouts (in ``state`` when given), oldest first, without the per-device list."""
        if state is not None and state not in _STATES:
            raise InvalidRolloutError(
                f"unknown rollout state {state!r}; use one of {', '.join(sorted(_STATES))}"
            )
        rows = self._rollouts.find(states=None if state is None else (state,))
        return [read_view(self._rollouts, row, devices=False) for row in rows]

    # -- commands ----------------------------------------------------------------------------

    def create(self, spec: RolloutSpec, actor: str) -> RolloutView:
        """Plan and store a rollout; the next :meth:`step` starts its first wave.

        Raises :class:`InvalidRolloutError` (empty selector, unpublished version, no device
        matched) or :class:`RolloutConflictError` (devices already in another active rollout of
        the model, unless ``spec.supersede``).
        """
        if spec.selector.empty:
            raise InvalidRolloutError(
                "the selector names no group, no tag and not all_devices: say which devices "
                'the rollout is for, e.g. {"groups": ["cameras"]}'
            )
        try:
            self._store.models.get(spec.model, spec.version)
        except UnknownModelError as e:
            raise InvalidRolloutError(f"cannot roll out {spec.model}@{spec.version}: {e}") from e
        devices = self._store.devices.find(spec.selector)
        if not devices:
            raise InvalidRolloutError(
                f"the selector {_describe(spec)} matches no device; check groups and tags with "
                "`edgefleet fleet devices`"
            )
        owners = self._rollouts.devices_in(ACTIVE, spec.model)
        busy = self._rollouts.devices_in(ACTIVE, None)
        elsewhere = sorted(d.id for d in devices if d.id in busy and d.id not in owners)
        if elsewhere:
            # A desired state names the models its rollout moves; two rollouts of different
            # models on one device would replace each other's document.
            others = sorted({busy[d] for d in elsewhere})
            raise RolloutConflictError(
                f"{len(elsewhere)} of the selected devices ({', '.join(elsewhere[:3])}"
                f"{', ...' if len(elsewhere) > 3 else ''}) are in active rollout "
                f"{', '.join(others)} of another model; a device takes one rollout at a time: "
                "wait for it to finish or abort it"
            )
        taken = {d.id: owners[d.id] for d in devices if d.id in owners}
        clashing = sorted(set(taken.values()))
        if clashing and not spec.supersede:
            sample = ", ".join(sorted(taken)[:3]) + (", ..." if len(taken) > 3 else "")
            raise RolloutConflictError(
                f"{len(taken)} of the selected devices ({sample}) are in active rollout "
                f"{', '.join(clashing)} of {spec.model}; wait for it to finish, abort it, or "
                "create this rollout with supersede=true"
            )
        now = self._clock()
        rollout_id = self._new_id()
        running = self._members(spec, {d.id: d.running(spec.model) for d in devices})
        waves = plan_waves(spec.model, running, spec.policy.waves)
        self._rollouts.insert(
            RolloutRow(
                id=rollout_id,
                model=spec.model,
                version=spec.version,
                selector=spec.selector,
                policy=spec.policy.model_dump_json(),
                state="created",
                created_at=now,
                created_by=actor,
                updated_at=now,
            ),
            [
                WaveRow(rollout_id=rollout_id, index=i, percent=p, state="pending")
                for i, p in enumerate(spec.policy.waves)
            ],
            [
                AssignmentRow(
                    rollout_id=rollout_id,
                    device_id=device,
                    wave=index,
                    previous_version=running[device],
                    status="pending",
                    updated_at=now,
                )
                for index, members in enumerate(waves)
                for device in members
            ],
            supersedes=dict.fromkeys(clashing, f"superseded by {rollout_id}"),
        )
        self._transitions.record(
            actor,
            "created",
            rollout_id,
            model=spec.model,
            version=spec.version,
            selector=spec.selector,
            devices=len(devices),
            waves=[len(w) for w in waves],
        )
        for old in clashing:
            self._transitions.record(actor, "superseded", old, by=rollout_id)
            self._driver.forget(old)
        return self.get(rollout_id)

    def _members(self, spec: RolloutSpec, running: dict[str, str | None]) -> dict[str, str | None]:
        """The devices the rollout moves (each with the version it runs): every selected one,
        only the treatment arm of an A/B experiment; a shadow needs a primary to run beside."""
        experiment = spec.policy.experiment
        if experiment is None:
            return running
        if experiment.mode == "ab":
            if len(running) < 2:
                raise InvalidRolloutError(
                    f"an A/B experiment needs at least two devices, one per arm; the selector "
                    f"{_describe(spec)} matches {len(running)}"
                )
            treatment, _ = split_arms(spec.model, running, experiment.split)
            return {d: running[d] for d in treatment}
        unfit = sorted(
            d
            for d, version in running.items()
            if version is None or version == spec.version or not self._known(spec.model, version)
        )
        if unfit:
            raise InvalidRolloutError(
                f"a shadow runs beside the version a device serves, but {len(unfit)} of the "
                f"selected devices ({', '.join(unfit[:3])}{', ...' if len(unfit) > 3 else ''}) "
                f"serve no published version of {spec.model} other than {spec.version}; narrow "
                "the selector or roll a version out to them first"
            )
        return running

    def _known(self, model: str, version: str) -> bool:
        try:
            self._store.models.get(model, version)
        except UnknownModelError:
            return False
        return True

    def approve(self, rollout_id: str, actor: str, reason: str | None = None) -> RolloutView:
        """Let a rollout awaiting approval go on to its next wave (or complete)."""
        row = self._expect(rollout_id, ("awaiting_approval",), "approved")
        now = self._clock()
        self._transitions.record(actor, "approved", rollout_id, wave=row.wave, reason=reason)
        self._transitions.wave_passed(row, load_policy(row), now, actor, ask=False)
        return self.get(rollout_id)

    def pause(self, rollout_id: str, actor: str, reason: str | None = None) -> RolloutView:
        """Stop publishing and judging until :meth:`resume`; devices keep what they have."""
        row = self._expect(rollout_id, ("created", "running", "awaiting_approval"), "paused")
        self._transitions.pause(row, actor, reason or f"paused by {actor}", self._clock())
        return self.get(rollout_id)

    def resume(self, rollout_id: str, actor: str, reason: str | None = None) -> RolloutView:
        """Continue a paused rollout where it stood.

        A rollout paused because its wave failed the gates goes on to the next wave: resuming
        is the operator's decision to accept that wave.
        """
        row = self._expect(rollout_id, ("paused",), "resumed")
        now = self._clock()
        self._transitions.record(actor, "resumed", rollout_id, wave=row.wave, reason=reason)
        wave = self._rollouts.waves(rollout_id)[row.wave]
        if wave.state == "failed":
            self._transitions.wave_passed(row, load_policy(row), now, actor, ask=False)
        elif row.phase is None:
            self._rollouts.update(rollout_id, now, state="created", clear_reason=True)
        elif row.phase == "approval":
            self._rollouts.update(rollout_id, now, state="awaiting_approval")
        else:
            self._rollouts.update(rollout_id, now, state="running", clear_reason=True)
        return self.get(rollout_id)

    def abort(self, rollout_id: str, actor: str, reason: str | None = None) -> RolloutView:
        """Stop and roll back every device the rollout touched to its previous version."""
        row = self._expect(rollout_id, tuple(ACTIVE), "aborted")
        why = f"aborted by {actor}" + (f": {reason}" if reason else "")
        self._transitions.abort(row, actor, why, self._clock())
        return self.get(rollout_id)

    # -- device reports ----------------------------------------------------------------------

    def on_update(self, progress: UpdateProgress) -> None:
        """Take one ``update`` message from any device: log it, and follow its assignment."""
        self._rollouts.log_update(progress)
        if progress.seq is None:
            return  # a document the device could not trust names nothing it can be tied to
        if not self._follow(progress.device_id, progress.seq, progress) and progress.rollout_id:
            key = (progress.device_id, progress.seq)
            held = self._held.setdefault(key, [])
            held.append(progress)
            del held[:-_HELD_PER_DOCUMENT]  # a device repeating itself keeps only its latest
            while len(self._held) > _HELD_REPORTS:
                self._held.popitem(last=False)

    def _follow(self, device_id: str, seq: int, progress: UpdateProgress) -> bool:
        assignment = self._rollouts.assignment_for(device_id, seq)
        if assignment is None:
            return False
        row = self._rollouts.get(assignment.rollout_id)
        change = status_change(
            assignment, progress, model=row.model, aborted=row.state == "aborted"
        )
        if change is not None:
            self._rollouts.set_status(
                row.id,
                [device_id],
                status=change.status,
                reason=change.reason,
                detail=change.detail,
                probation=change.probation,
                at=self._clock(),  # the fleet's time: a device's clock may be off
            )
        return True

    def _published(self, seqs: Mapping[str, int]) -> None:
        if not self._held:
            return
        for device_id, seq in seqs.items():
            for progress in self._held.pop((device_id, seq), []):
                self._follow(device_id, seq, progress)

    # -- driving -----------------------------------------------------------------------------

    async def step(self) -> None:
        """Move every live rollout as far as it can go now (the service calls this often)."""
        if self._step_lock.locked():
            return  # a slow publish is still going on; the next tick continues
        async with self._step_lock:
            now = self._clock()
            for row in self._rollouts.find(states=_LIVE):
                if row.state == "aborted" and row.phase != "rolling_back":
                    continue
                try:
                    await self._driver.advance(row.id, now)
                except FleetError as e:
                    # One rollout's trouble (a store error) must not stop the others.
                    log.error(
                        "rollout step failed; retrying", extra={"rollout": row.id, "detail": str(e)}
                    )
                except Exception:
                    # Nor may a bug in one rollout's step: log it and keep driving the rest.
                    log.exception("rollout step failed unexpectedly", extra={"rollout": row.id})

    def unacknowledged(self) -> Sequence[tuple[str, int]]:
        """(device, seq) of every desired state published but not yet heard of by its device.

        After a crash of the service, such a document may have died in the MQTT client's
        memory before the broker took it; the service publishes these again at start.
        """
        return [
            (a.device_id, a.seq)
            for row in self._rollouts.find(states=(*ACTIVE, "aborted"))
            for a in self._rollouts.assignments(row.id, statuses=_UNACKNOWLEDGED)
            if a.seq is not None
        ]

    # -- helpers -----------------------------------------------------------------------------

    def _expect(self, rollout_id: str, states: Sequence[str], doing: str) -> RolloutRow:
        row = self._rollouts.get(rollout_id)
        if row.state not in states:
            raise RolloutConflictError(
                f"rollout {rollout_id} is {row.state} and cannot be {doing}; only a rollout "
                f"that is {' or '.join(sorted(states))} can"
            )
        return row

    def _new_id(self) -> str:
        while True:
            rollout_id = f"r-{secrets.token_hex(4)}"
            try:
                self._rollouts.get(rollout_id)
            except UnknownRolloutError:
                return rollout_id


def _describe(spec: RolloutSpec) -> str:
    return spec.selector.model_dump_json(exclude_defaults=True)
