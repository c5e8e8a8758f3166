"""The device registry: who is enrolled, what each device last said it runs, its groups and tags,
and the director sequence numbers issued to it.

A device's *health* is derived, never stored: a device that said ``online`` but has been silent
for longer than the timeout is ``unknown``, never ``healthy``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleet.errors import StoreError, UnknownDeviceError
from fleet.store.db import Database, now_text, transaction, translated
from protocol.director import DEVICE_ID_PATTERN, check_device_id
from protocol.mqtt import AgentState

__all__ = ["Device", "DeviceHealth", "Devices", "Selector"]

DeviceHealth = Literal["healthy", "degraded", "unknown", "lost", "offline", "never_seen"]
_LABEL = r"^[A-Za-z0-9][A-Za-z0-9._:=-]{0,63}$"


class Selector(BaseModel):
    """Which devices: members of any of ``groups`` that carry every one of ``tags``.

    An empty selector matches nothing; ``all_devices`` must be said explicitly.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    groups: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    all_devices: bool = False

    @field_validator("groups", "tags")
    @classmethod
    def _labels(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            _check_label(value)
        return tuple(sorted(set(values)))

    @property
    def empty(self) -> bool:
        return not (self.groups or self.tags or self.all_devices)


class Device(BaseModel):
    """One device as the registry knows it."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(pattern=DEVICE_ID_PATTERN)
    enrolled_at: datetime | None = None
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    connection: Literal["never", "online", "offline", "lost"] = "never"
    agent_version: str | None = None
    state: AgentState | None = None
    trust_status: str | None = None
    desired_seq: int = 0
    groups: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    def running(self, model: str) -> str | None:
        """The version of ``model`` this device last said it serves."""
        if self.state is None:
            return None
        for active in self.state.models:
            if active.name == model:
                return active.version
        return None

    def health(self, now: datetime, timeout: timedelta) -> DeviceHealth:
        """``healthy`` only when online, heard from within ``timeout`` and every model loaded."""
        if self.connection == "never" or self.last_seen is None:
            return "never_seen"
        if self.connection in ("lost", "offline"):
            return self.connection
        if now - self.last_seen > timeout:
            return "unknown"
        state = self.state
        if state is None:
            return "unknown"
        broken = any(m.error or m.version is None for m in state.models)
        stale = state.trust is not None and state.trust.status == "stale"
        return "degraded" if broken or stale else "healthy"


class Devices:
    """Reads and writes devices and their labels; every method is one short transaction."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- lifecycle ---------------------------------------------------------------------------

    def enrolled(self, device_id: str, at: datetime) -> None:
        """Record an enrollment (idempotent; a re-enrollment keeps labels and history)."""
        check_device_id(device_id)
        with translated(f"recording the enrollment of {device_id}"), transaction(self._db):
            self._db.execute(
                "INSERT INTO devices (id, enrolled_at) VALUES (?, ?) "
                "ON CONFLICT(id) DO UPDATE SET enrolled_at = excluded.enrolled_at",
                (device_id, now_text(at)),
            )

    def observe_state(self, state: AgentState, at: datetime) -> None:
        """Record a ``state`` message (online, offline or the LWT's ``lost``)."""
        when = now_text(at)
        document = state.model_dump_json(by_alias=True, exclude_none=True)
        trust = state.trust.status if state.trust is not None else None
        with translated(f"recording the state of {state.device_id}"), transaction(self._db):
            if state.state == "online":
                self._db.execute(
                    "INSERT INTO devices (id, first_seen, last_seen, connection, agent_version, "
                    "state, trust_status) VALUES (:id, :at, :at, 'online', :agent, :state, :trust) "
                    "ON CONFLICT(id) DO UPDATE SET first_seen = coalesce(first_seen, :at), "
                    "last_seen = :at, connection = 'online', agent_version = :agent, "
                    "state = :state, trust_status = :trust",
                    {
                        "id": state.device_id,
                        "at": when,
                        "agent": state.agent_version,
                        "state": document,
                        "trust": trust,
                    },
                )
            else:
                # The LWT carries no models: keep what the device last said it ran.
                self._db.execute(
                    "INSERT INTO devices (id, first_seen, last_seen, connection) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET connection = ?",
                    (state.device_id, when, when, state.state, state.state),
                )

    def seen(self, device_ids: Iterable[str], at: datetime) -> None:
        """Mark devices as heard from at ``at`` (any message counts)."""
        when = now_text(at)
        rows = [(when, device_id) for device_id in device_ids]
        with translated("recording when devices were last seen"), transaction(self._db):
            self._db.conn.executemany(
                "UPDATE devices SET last_seen = ? WHERE id = ? AND connection = 'online'", rows
            )

    # -- reads -------------------------------------------------------------------------------

    def get(self, device_id: str) -> Device:
        """One device; raises :class:`UnknownDeviceError` if the registry has never heard of it."""
        found = self._load("WHERE d.id = ?", [device_id])
        if not found:
            raise UnknownDeviceError(
                f"no device {device_id!r}: enroll it with `edgefleet fleet enroll-token` and "
                "`edgefleet agent enroll`, or check the id with `edgefleet fleet devices`"
            )
        return found[0]

    def find(self, selector: Selector | None = None) -> list[Device]:
        """Every device matching ``selector`` (all when None), ordered by id."""
        if selector is None or selector.all_devices:
            return self._load("", [])
        if selector.empty:
            return []
        sql, params = _matching_sql(selector)
        return self._load(f"WHERE d.id IN ({sql})", params)

    def select(self, selector: Selector) -> list[str]:
        """Ids of the devices ``selector`` matches, ordered by id."""
        if selector.empty:
            return []
        if selector.all_devices:
            sql, params = "SELECT id FROM devices", list[str]()
        else:
            sql, params = _matching_sql(selector)
        with translated("selecting devices"):
            return sorted(row[0] for row in self._db.execute(sql, params).fetchall())

    def labels(self, kind: Literal["group", "tag"]) -> dict[str, int]:
        """Every group (or tag) with the number of devices carrying it."""
        with translated(f"listing {kind}s"):
            rows = self._db.execute(
                "SELECT value, count(*) FROM device_labels WHERE kind = ? GROUP BY value "
                "ORDER BY value",
                [kind],
            ).fetchall()
        return dict(rows)

    # -- labels ------------------------------------------------------------------------------

    def label(
        self,
        device_id: str,
        *,
        add_groups: Iterable[str] = (),
        remove_groups: Iterable[str] = (),
        add_tags: Iterable[str] = (),
        remove_tags: Iterable[str] = (),
    ) -> Device:
        """Add and remove groups and tags of one device."""
        self.get(device_id)
        adds = [("group", _check_label(g)) for g in add_groups]
        adds += [("tag", _check_label(t)) for t in add_tags]
        removes = [("group", g) for g in remove_groups] + [("tag", t) for t in remove_tags]
        with translated(f"labelling {device_id}"), transaction(self._db):
            self._db.conn.executemany(
                "DELETE FROM device_labels WHERE device_id = ? AND kind = ? AND value = ?",
                [(device_id, kind, value) for kind, value in removes],
            )
            self._db.conn.executemany(
                "INSERT OR IGNORE INTO device_labels (device_id, kind, value) VALUES (?, ?, ?)",
                [(device_id, kind, value) for kind, value in adds],
            )
        return self.get(device_id)

    # -- director sequence -------------------------------------------------------------------

    def next_seqs(self, device_ids: Iterable[str]) -> dict[str, int]:
        """Reserve the next director sequence number of each device (persisted before use)."""
        seqs: dict[str, int] = {}
        missing: list[str] = []
        with translated("reserving desired-state sequence numbers"), transaction(self._db):
            for device_id in device_ids:
                row = self._db.execute(
                    "UPDATE devices SET desired_seq = desired_seq + 1 WHERE id = ? "
                    "RETURNING desired_seq",
                    [device_id],
                ).fetchone()
                if row is None:
                    missing.append(device_id)
                else:
                    seqs[device_id] = int(row[0])
            if missing:
                # Raised inside the transaction: a refused reservation reserves nothing.
                raise UnknownDeviceError(
                    f"no device {', '.join(map(repr, sorted(missing)))} in the registry; "
                    "list devices with `edgefleet fleet devices`"
                )
        return seqs

    def record_desired(self, documents: dict[str, bytes]) -> None:
        """Keep the last signed desired state of each device (for re-publishing after a restart)."""
        with translated("recording desired states"), transaction(self._db):
            self._db.conn.executemany(
                "UPDATE devices SET desired = ? WHERE id = ?",
                [(document.decode(), device_id) for device_id, document in documents.items()],
            )

    def desired(self, device_id: str) -> bytes | None:
        """The last signed desired state published for ``device_id``."""
        with translated(f"reading the desired state of {device_id}"):
            row = self._db.execute(
                "SELECT desired FROM devices WHERE id = ?", [device_id]
            ).fetchone()
        return row[0].encode() if row and row[0] else None

    # -- internals ---------------------------------------------------------------------------

    def _load(self, where: str, params: list[Any]) -> list[Device]:
        sql = f"{_SELECT} {where} ORDER BY d.id"
        with translated("reading devices"):
            rows = self._db.execute(sql, params).fetchall()
        return [_device(row) for row in rows]


_SELECT = (
    "SELECT d.id, d.enrolled_at, d.first_seen, d.last_seen, d.connection, d.agent_version, "
    "d.state, d.trust_status, d.desired_seq, "
    "(SELECT json_group_array(value) FROM device_labels "
    "WHERE device_id = d.id AND kind = 'group'), "
    "(SELECT json_group_array(value) FROM device_labels WHERE device_id = d.id AND kind = 'tag') "
    "FROM devices d"
)


def _matching_sql(selector: Selector) -> tuple[str, list[str]]:
    clauses: list[str] = []
    params: list[str] = []
    if selector.groups:
        marks = ",".join("?" * len(selector.groups))
        clauses.append(
            f"SELECT device_id FROM device_labels WHERE kind = 'group' AND value IN ({marks})"  # noqa: S608
        )
        params += selector.groups
    for tag in selector.tags:
        clauses.append("SELECT device_id FROM device_labels WHERE kind = 'tag' AND value = ?")
        params.append(tag)
    return " INTERSECT ".join(clauses), params


def _device(row: tuple[Any, ...]) -> Device:
    device_id = row[0]
    try:
        state = AgentState.model_validate_json(row[6]) if row[6] else None
    except ValidationError as e:
        raise StoreError(f"the stored state of device {device_id!r} is damaged: {e}") from None
    return Device(
        id=device_id,
        enrolled_at=row[1],
        first_seen=row[2],
        last_seen=row[3],
        connection=row[4],
        agent_version=row[5],
        state=state,
        trust_status=row[7],
        desired_seq=row[8],
        groups=tuple(sorted(json.loads(row[9]))),
        tags=tuple(sorted(json.loads(row[10]))),
    )


def _check_label(value: str) -> str:
    if not re.fullmatch(_LABEL, value):
        raise ValueError(
            f"{value!r} is not a valid group or tag: use 1-64 letters, digits, '.', '_', ':', "
            "'=' or '-', starting with a letter or digit"
        )
    return value
