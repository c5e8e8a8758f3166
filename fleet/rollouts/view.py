"""A rollout as the API and the console show it: JSON-friendly, read from the store."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from fleet.errors import StoreError
from fleet.rollouts.gates import GateResult
from fleet.rollouts.spec import RolloutPolicy
from fleet.store.devices import Selector
from fleet.store.rollouts import AssignmentRow, RolloutRow, Rollouts, WaveRow

__all__ = [
    "AssignmentView",
    "RolloutView",
    "WaveView",
    "dump_gates",
    "load_gates",
    "load_policy",
    "read_view",
]

_GATES = TypeAdapter(tuple[GateResult, ...])


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class WaveView(_Frozen):
    """One wave: its share of devices, where it stands, its devices by status, its gates."""

    index: int
    percent: float
    state: str
    started_at: datetime | None
    finished_at: datetime | None
    devices: int
    counts: dict[str, int]
    gates: tuple[GateResult, ...]


class AssignmentView(_Frozen):
    """One device of the rollout."""

    device: str
    wave: int
    previous_version: str | None
    seq: int | None
    status: str
    reason: str | None
    detail: str | None


class RolloutView(_Frozen):
    """A rollout with its waves, and (from ``get``) every device."""

    id: str
    model: str
    version: str
    selector: Selector
    policy: RolloutPolicy
    state: str
    wave: int
    phase: str | None
    phase_started_at: datetime | None
    reason: str | None
    superseded_by: str | None
    created_at: datetime
    created_by: str
    updated_at: datetime
    waves: tuple[WaveView, ...]
    devices: tuple[AssignmentView, ...] = ()


def load_policy(row: RolloutRow) -> RolloutPolicy:
    """The policy stored with a rollout."""
    try:
        return RolloutPolicy.model_validate_json(row.policy)
    except ValidationError as e:
        raise StoreError(f"the stored policy of rollout {row.id!r} is damaged: {e}") from None


def load_gates(wave: WaveRow) -> tuple[GateResult, ...]:
    """The gate results stored on a wave (none before its first gating)."""
    if not wave.gates:
        return ()
    try:
        return _GATES.validate_json(wave.gates)
    except ValidationError as e:
        raise StoreError(
            f"the stored gate results of wave {wave.index} of {wave.rollout_id!r} are damaged: {e}"
        ) from None


def dump_gates(results: tuple[GateResult, ...]) -> str:
    """Gate results as stored on a wave."""
    return _GATES.dump_json(results).decode()


def read_view(rollouts: Rollouts, row: RolloutRow, *, devices: bool) -> RolloutView:
    """Build the view of one rollout; ``devices``: include the per-device list."""
    counts = rollouts.status_counts(row.id)
    waves = tuple(
        WaveView(
            index=w.index,
            percent=w.percent,
            state=w.state,
            started_at=w.started_at,
            finished_at=w.finished_at,
            devices=sum(counts.get(w.index, {}).values()),
            counts=counts.get(w.index, {}),
            gates=load_gates(w),
        )
        for w in rollouts.waves(row.id)
    )
    listed = tuple(_assignment(a) for a in rollouts.assignments(row.id)) if devices else ()
    return RolloutView(
        id=row.id,
        model=row.model,
        version=row.version,
        selector=row.selector,
        policy=load_policy(row),
        state=row.state,
        wave=row.wave,
        phase=row.phase,
        phase_started_at=row.phase_started_at,
        reason=row.reason,
        superseded_by=row.superseded_by,
        created_at=row.created_at,
        created_by=row.created_by,
        updated_at=row.updated_at,
        waves=waves,
        devices=listed,
    )


def _assignment(a: AssignmentRow) -> AssignmentView:
    return AssignmentView(
        device=a.device_id,
        wave=a.wave,
        previous_version=a.previous_version,
        seq=a.seq,
        status=a.status,
        reason=a.reason,
        detail=a.detail,
    )
