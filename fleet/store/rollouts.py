"""Rollouts as stored: the rollout itself, its waves, one assignment per device, and the log of
every ``update`` message devices sent.

This is the only place that writes rollout SQL. It knows rows, not rules: which state follows
which is the rollout engine's business (``fleet/rollouts``). The policy and the gate results are
kept as the JSON documents the engine hands over, so the store does not depend on the engine.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from fleet.errors import StoreError, UnknownRolloutError
from fleet.store.db import Database, now_text, transaction, translated
from fleet.store.devices import Selector
from protocol.mqtt import ProbationReport, UpdateProgress

__all__ = ["AssignmentRow", "RolloutRow", "Rollouts", "UpdateLogEntry", "WaveRow"]

_REPORTS = TypeAdapter(tuple[ProbationReport, ...])
_ROLLOUT_FIELDS = (
    *("id", "model", "version", "selector", "policy", "state", "wave", "phase"),
    *("phase_started_at", "reason", "superseded_by", "created_at", "created_by", "updated_at"),
)
_ASSIGNMENT_FIELDS = (
    *("rollout_id", "device_id", "wave", "previous_version", "seq", "status", "reason"),
    *("detail", "probation", "updated_at"),
)
_WAVE_FIELDS = ("rollout_id", "index", "percent", "state", "started_at", "finished_at", "gates")
_LOG_FIELDS = ("device_id", "seq", "rollout_id", "stage", "reason", "detail", "at")
_ROLLOUT_COLUMNS = ", ".join(_ROLLOUT_FIELDS)
_ASSIGNMENT_COLUMNS = ", ".join(_ASSIGNMENT_FIELDS)


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True)


class RolloutRow(_Row):
    """One rollout; ``policy`` is the engine's policy document (JSON text)."""

    id: str
    model: str
    version: str
    selector: Selector
    policy: str
    state: str
    wave: int = 0
    phase: str | None = None
    phase_started_at: datetime | None = None
    reason: str | None = None
    superseded_by: str | None = None
    created_at: datetime
    created_by: str
    updated_at: datetime


class WaveRow(_Row):
    """One wave; ``gates`` is the last gate results document (JSON text), if gated yet."""

    rollout_id: str
    index: int
    percent: float
    state: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    gates: str | None = None


class AssignmentRow(_Row):
    """One device in one rollout: its wave, what it ran before, and how its update went."""

    rollout_id: str
    device_id: str
    wave: int
    previous_version: str | None = None
    seq: int | None = None
    status: str
    reason: str | None = None
    detail: str | None = None
    probation: tuple[ProbationReport, ...] = ()
    updated_at: datetime


class UpdateLogEntry(_Row):
    """One ``update`` message as it was received."""

    device_id: str
    seq: int | None
    rollout_id: str | None
    stage: str
    reason: str | None
    detail: str | None
    at: datetime


class Rollouts:
    """Reads and writes rollouts, waves, assignments and the update log."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def atomic(self) -> contextlib.AbstractContextManager[None]:
        """Several writes that must land together (or not at all)."""
        return transaction(self._db)

    # -- rollouts ----------------------------------------------------------------------------

    def insert(
        self,
        rollout: RolloutRow,
        waves: Sequence[WaveRow],
        assignments: Sequence[AssignmentRow],
        *,
        supersedes: Mapping[str, str] | None = None,
    ) -> None:
        """Store a new rollout with its waves and assignments in one transaction.

        ``supersedes`` maps ids of rollouts the new one replaces to the reason recorded on them;
        they become ``superseded`` and their still-pending assignments ``cancelled``. Rollbacks
        that aborted rollouts of the model have not yet published to these devices are
        cancelled too (``taken_over``): the new rollout drives the devices now.
        """
        when = now_text(rollout.created_at)
        with translated(f"creating rollout {rollout.id}"), transaction(self._db):
            self._db.execute(
                f"INSERT INTO rollouts ({_ROLLOUT_COLUMNS}) "  # noqa: S608
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rollout.id,
                    rollout.model,
                    rollout.version,
                    rollout.selector.model_dump_json(),
                    rollout.policy,
                    rollout.state,
                    rollout.wave,
                    rollout.phase,
                    _time(rollout.phase_started_at),
                    rollout.reason,
                    rollout.superseded_by,
                    when,
                    rollout.created_by,
                    now_text(rollout.updated_at),
                ),
            )
            self._db.conn.executemany(
                "INSERT INTO rollout_waves (rollout_id, idx, percent, state, started_at, "
                "finished_at, gates) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        w.rollout_id,
                        w.index,
                        w.percent,
                        w.state,
                        _time(w.started_at),
                        _time(w.finished_at),
                        w.gates,
                    )
                    for w in waves
                ],
            )
            self._db.conn.executemany(
                f"INSERT INTO assignments ({_ASSIGNMENT_COLUMNS}) "  # noqa: S608
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [_assignment_params(a) for a in assignments],
            )
            # Older rollouts of the model must not send these devices back any more.
            self._db.conn.executemany(
                "UPDATE assignments SET status = 'cancelled', reason = 'taken_over', detail = ?, "
                "updated_at = ? WHERE device_id = ? AND status = 'rollback_pending' "
                "AND rollout_id IN (SELECT id FROM rollouts WHERE model = ? AND id != ?)",
                [
                    (f"taken over by {rollout.id}", when, a.device_id, rollout.model, rollout.id)
                    for a in assignments
                ],
            )
            for old_id, reason in (supersedes or {}).items():
                self._db.execute(
                    "UPDATE rollouts SET state = 'superseded', phase = NULL, reason = ?, "
                    "superseded_by = ?, updated_at = ? WHERE id = ?",
                    (reason, rollout.id, when, old_id),
                )
                self._db.execute(
                    "UPDATE assignments SET status = 'cancelled', reason = 'superseded', "
                    "updated_at = ? WHERE rollout_id = ? AND status = 'pending'",
                    (when, old_id),
                )

    def get(self, rollout_id: str) -> RolloutRow:
        """One rollout; raises :class:`UnknownRolloutError` if there is none with that id."""
        rows = self._rollouts("WHERE id = ?", [rollout_id])
        if not rows:
            raise UnknownRolloutError(
                f"no rollout {rollout_id!r}; list rollouts with `edgefleet fleet rollouts`"
            )
        return rows[0]

    def find(
        self, *, states: Collection[str] | None = None, model: str | None = None
    ) -> list[RolloutRow]:
        """Rollouts in any of ``states`` (all when None) of ``model`` (any when None), oldest
        first."""
        clauses: list[str] = []
        params: list[Any] = []
        if states is not None:
            clauses.append(f"state IN ({_marks(len(states))})")
            params += list(states)
        if model is not None:
            clauses.append("model = ?")
            params.append(model)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return self._rollouts(where, params)

    def update(
        self,
        rollout_id: str,
        at: datetime,
        *,
        state: str | None = None,
        wave: int | None = None,
        phase: str | None = None,
        clear_phase: bool = False,
        reason: str | None = None,
        clear_reason: bool = False,
    ) -> None:
        """Change a rollout's state, wave, phase (its start time becomes ``at``) or reason."""
        sets = ["updated_at = :at"]
        if state is not None:
            sets.append("state = :state")
        if wave is not None:
            sets.append("wave = :wave")
        if phase is not None or clear_phase:
            sets.append("phase = :phase, phase_started_at = :phase_at")
        if reason is not None or clear_reason:
            sets.append("reason = :reason")
        when = now_text(at)
        with translated(f"updating rollout {rollout_id}"), transaction(self._db):
            self._db.execute(
                f"UPDATE rollouts SET {', '.join(sets)} WHERE id = :id",  # noqa: S608
                {
                    "id": rollout_id,
                    "at": when,
                    "state": state,
                    "wave": wave,
                    "phase": phase,
                    "phase_at": None if clear_phase else when,
                    "reason": reason,
                },
            )

    # -- waves -------------------------------------------------------------------------------

    def waves(self, rollout_id: str) -> list[WaveRow]:
        """The waves of a rollout, first wave first."""
        with translated(f"reading the waves of {rollout_id}"):
            rows = self._db.execute(
                "SELECT rollout_id, idx, percent, state, started_at, finished_at, gates "
                "FROM rollout_waves WHERE rollout_id = ? ORDER BY idx",
                [rollout_id],
            ).fetchall()
        return [WaveRow.model_validate(dict(zip(_WAVE_FIELDS, r, strict=True))) for r in rows]

    def update_wave(
        self,
        rollout_id: str,
        index: int,
        *,
        state: str | None = None,
        started_at: datetime | None = None,
        finished_at: datetime | None = None,
        gates: str | None = None,
    ) -> None:
        """Change a wave's state, its start or end time, or its gate results."""
        values = {
            "state": state,
            "started_at": _time(started_at),
            "finished_at": _time(finished_at),
            "gates": gates,
        }
        sets = [f"{column} = :{column}" for column, value in values.items() if value is not None]
        if not sets:
            return
        with translated(f"updating wave {index} of {rollout_id}"), transaction(self._db):
            self._db.execute(
                f"UPDATE rollout_waves SET {', '.join(sets)} "  # noqa: S608
                "WHERE rollout_id = :id AND idx = :idx",
                {**values, "id": rollout_id, "idx": index},
            )

    # -- assignments -------------------------------------------------------------------------

    def assignments(
        self,
        rollout_id: str,
        *,
        wave: int | None = None,
        statuses: Collection[str] | None = None,
        limit: int | None = None,
    ) -> list[AssignmentRow]:
        """A rollout's assignments (of one wave, in some statuses), ordered by wave and device."""
        where = "WHERE rollout_id = ?"
        params: list[Any] = [rollout_id]
        if wave is not None:
            where += " AND wave = ?"
            params.append(wave)
        if statuses is not None:
            where += f" AND status IN ({_marks(len(statuses))})"
            params += list(statuses)
        sql = f"SELECT {_ASSIGNMENT_COLUMNS} FROM assignments {where} ORDER BY wave, device_id"  # noqa: S608
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with translated(f"reading the assignments of {rollout_id}"):
            rows = self._db.execute(sql, params).fetchall()
        return [_assignment(row) for row in rows]

    def status_counts(self, rollout_id: str) -> dict[int, dict[str, int]]:
        """Per wave, how many devices are in each status."""
        with translated(f"counting the assignments of {rollout_id}"):
            rows = self._db.execute(
                "SELECT wave, status, count(*) FROM assignments WHERE rollout_id = ? "
                "GROUP BY wave, status",
                [rollout_id],
            ).fetchall()
        counts: dict[int, dict[str, int]] = {}
        for wave, status, n in rows:
            counts.setdefault(wave, {})[status] = n
        return counts

    def devices_in(self, states: Collection[str], model: str | None) -> dict[str, str]:
        """Devices assigned to rollouts of ``model`` (of any model when None) in one of
        ``states``: device → rollout."""
        sql = (
            "SELECT a.device_id, a.rollout_id FROM assignments a JOIN rollouts r "  # noqa: S608
            f"ON r.id = a.rollout_id WHERE (? IS NULL OR r.model = ?) "
            f"AND r.state IN ({_marks(len(states))}) ORDER BY r.created_at"
        )
        with translated(f"reading the devices of active rollouts of {model or 'any model'}"):
            rows = self._db.execute(sql, [model, model, *states]).fetchall()
        return dict(rows)

    def assignment_for(self, device_id: str, seq: int) -> AssignmentRow | None:
        """The assignment whose desired state for ``device_id`` carried ``seq``, if any."""
        with translated(f"finding the assignment of {device_id} seq {seq}"):
            row = self._db.execute(
                f"SELECT {_ASSIGNMENT_COLUMNS} FROM assignments "  # noqa: S608
                "WHERE device_id = ? AND seq = ?",
                [device_id, seq],
            ).fetchone()
        return _assignment(row) if row else None

    def published(
        self, rollout_id: str, seqs: Mapping[str, int], *, status: str, at: datetime
    ) -> None:
        """Record the sequence each device's desired state was published with."""
        when = now_text(at)
        doing = f"recording desired states published for {rollout_id}"
        with translated(doing), transaction(self._db):
            self._db.conn.executemany(
                # A first publish clears any reason; a rollback keeps why it is rolling back.
                "UPDATE assignments SET seq = ?, status = ?, updated_at = ?, "
                "reason = CASE WHEN ? = 'published' THEN NULL ELSE reason END "
                "WHERE rollout_id = ? AND device_id = ?",
                [(seq, status, when, status, rollout_id, device) for device, seq in seqs.items()],
            )

    def set_status(
        self,
        rollout_id: str,
        device_ids: Iterable[str],
        *,
        status: str,
        at: datetime,
        reason: str | None = None,
        detail: str | None = None,
        probation: Sequence[ProbationReport] | None = None,
    ) -> None:
        """Set the status, reason and detail of some devices (and their probation reports)."""
        when = now_text(at)
        reports = None if probation is None else _REPORTS.dump_json(tuple(probation)).decode()
        with translated(f"updating device statuses of {rollout_id}"), transaction(self._db):
            self._db.conn.executemany(
                "UPDATE assignments SET status = ?, reason = ?, detail = ?, "
                "probation = coalesce(?, probation), updated_at = ? "
                "WHERE rollout_id = ? AND device_id = ?",
                [
                    (status, reason, detail, reports, when, rollout_id, device)
                    for device in device_ids
                ],
            )

    # -- update log --------------------------------------------------------------------------

    def log_update(self, progress: UpdateProgress) -> None:
        """Keep one ``update`` message, whatever it names."""
        with translated(f"logging an update from {progress.device_id}"), transaction(self._db):
            self._db.execute(
                "INSERT INTO update_log (device_id, seq, rollout_id, stage, reason, detail, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    progress.device_id,
                    progress.seq,
                    progress.rollout_id,
                    progress.stage,
                    progress.reason,
                    progress.detail or None,
                    now_text(progress.at),
                ),
            )

    def update_log(self, device_id: str, *, limit: int = 100) -> list[UpdateLogEntry]:
        """The last ``limit`` update messages of a device, newest first."""
        with translated(f"reading the update log of {device_id}"):
            rows = self._db.execute(
                "SELECT device_id, seq, rollout_id, stage, reason, detail, at FROM update_log "
                "WHERE device_id = ? ORDER BY id DESC LIMIT ?",
                [device_id, limit],
            ).fetchall()
        return [UpdateLogEntry.model_validate(dict(zip(_LOG_FIELDS, r, strict=True))) for r in rows]

    # -- internals ---------------------------------------------------------------------------

    def _rollouts(self, where: str, params: list[Any]) -> list[RolloutRow]:
        sql = f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts {where} ORDER BY created_at, rowid"  # noqa: S608
        with translated("reading rollouts"):
            rows = self._db.execute(sql, params).fetchall()
        return [_rollout(row) for row in rows]


def _marks(n: int) -> str:
    if n == 0:
        return "NULL"  # IN (NULL) matches nothing, as an empty collection should
    return ",".join("?" * n)


def _time(at: datetime | None) -> str | None:
    return None if at is None else now_text(at)


def _rollout(row: tuple[Any, ...]) -> RolloutRow:
    fields = dict(zip(_ROLLOUT_FIELDS, row, strict=True))
    try:
        fields["selector"] = Selector.model_validate(json.loads(fields["selector"]))
    except (ValueError, ValidationError) as e:
        raise StoreError(f"the stored selector of rollout {row[0]!r} is damaged: {e}") from None
    return RolloutRow.model_validate(fields)


def _assignment_params(a: AssignmentRow) -> tuple[Any, ...]:
    return (
        a.rollout_id,
        a.device_id,
        a.wave,
        a.previous_version,
        a.seq,
        a.status,
        a.reason,
        a.detail,
        _REPORTS.dump_json(a.probation).decode() if a.probation else None,
        now_text(a.updated_at),
    )


def _assignment(row: tuple[Any, ...]) -> AssignmentRow:
    fields = dict(zip(_ASSIGNMENT_FIELDS, row, strict=True))
    try:
        fields["probation"] = _REPORTS.validate_json(row[8]) if row[8] else ()
    except ValidationError as e:
        raise StoreError(
            f"the stored probation reports of {row[1]!r} in rollout {row[0]!r} are damaged: {e}"
        ) from None
    return AssignmentRow.model_validate(fields)
