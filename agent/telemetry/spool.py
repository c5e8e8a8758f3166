"""The telemetry spool: records wait here, on disk, until the broker has acknowledged them.

One SQLite file (``<state_dir>/telemetry.db``, WAL) holds the encoded records and, per device,
the last sequence number given out. A record gets its ``seq`` in the same transaction that
stores it, so a number is never handed out twice, across restarts and after every record was
sent and deleted. Commits are synchronous (``synchronous=FULL``): a record may reach the
fleet right after it is spooled, and a power cut must not roll its number back.

The spool is bounded. Past ``max_records`` the oldest records go first; how many went is kept
in a persisted counter that the next appended record reports as ``dropped`` (a dropped record
that itself reported drops gives its count back to the counter), so the ``dropped`` fields the
fleet receives always add up to the numbers it will never see. A stored record is never
rewritten: a replay sends the same bytes.

A damaged file is moved aside (``telemetry.db.damaged-<time>``) with a warning and a fresh one
started; the agent never stops for it. Sequence numbers survive even that: they are reserved
in blocks in ``telemetry.seq`` beside the database (one fsynced write per block), and a fresh
database continues after the last reservation. The fleet then sees a gap, which is the truth.

Every method is safe from any thread; one lock makes the spool its own single writer.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from pydantic import ValidationError

from agent.errors import AgentError
from agent.files import atomic_write
from protocol.mqtt import MAX_MESSAGE, encode
from protocol.telemetry import RECORDS

__all__ = ["DEFAULT_MAX_RECORDS", "SpoolError", "SpooledRecord", "TelemetrySpool"]

log = logging.getLogger(__name__)

DEFAULT_MAX_RECORDS = 10_000
_SEQ_BLOCK = 1024  # sequence numbers reserved per write of the sidecar file
_RESERVED = frozenset({"schema", "device_id", "seq", "dropped"})  # the spool's to fill in
_DAMAGED = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_FORMAT = 1  # PRAGMA user_version of the file this module writes

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    device_id        TEXT PRIMARY KEY,
    last_seq         INTEGER NOT NULL,            -- the last sequence number given out
    pending_dropped  INTEGER NOT NULL DEFAULT 0,  -- dropped at the bound, not yet reported
    dropped_total    INTEGER NOT NULL DEFAULT 0   -- dropped at the bound, ever
);
CREATE TABLE IF NOT EXISTS records (
    seq       INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    kind      TEXT NOT NULL,
    dropped   INTEGER NOT NULL,   -- what the record reports; given back if it is dropped too
    payload   BLOB NOT NULL
);
"""


class SpoolError(AgentError):
    """A telemetry record could not be built or the spool could not store it."""


class SpooledRecord(NamedTuple):
    seq: int
    kind: str
    payload: bytes  # the JSON published on telemetry/<kind>


class _DamagedFileError(Exception):
    """The file is not a usable spool; it is moved aside."""


class TelemetrySpool:
    """A bounded, crash-safe queue of telemetry records with per-device sequence numbers."""

    def __init__(self, path: Path, *, max_records: int = DEFAULT_MAX_RECORDS) -> None:
        if max_records < 1:
            raise SpoolError(f"the telemetry spool must hold at least 1 record, not {max_records}")
        self.path = path
        self.max_records = max_records
        self._seq_file = path.with_suffix(".seq")
        self._lock = threading.Lock()
        self._overflowing = False  # a drop at the bound was logged at warning level
        self._reserved = self._read_reserved()
        self._db = self._open()
        self._count = self._scalar("SELECT COUNT(*) FROM records")

    # -- writing -------------------------------------------------------------------------------

    def append(self, device_id: str, kind: str, fields: Mapping[str, Any]) -> int:
        """Spool one record and return its sequence number.

        Raises :class:`SpoolError` naming the field when the record is invalid (no number is
        used up), or when the file cannot be written.
        """
        with self._lock:
            return self._with_recovery(lambda: self._append(device_id, [(kind, fields)], True))[0]

    def append_many(
        self, device_id: str, windows: Iterable[tuple[str, Mapping[str, Any]]]
    ) -> list[int]:
        """Spool a window's records in one transaction; returns their sequence numbers.

        An invalid record is logged and skipped (it uses up no number), so one bad window does
        not cost the others. Raises :class:`SpoolError` when the file cannot be written.
        """
        items = list(windows)
        if not items:
            return []
        with self._lock:
            return self._with_recovery(lambda: self._append(device_id, items, False))

    def ack(self, seq: int) -> None:
        """Forget a record the broker acknowledged."""
        self.ack_many((seq,))

    def ack_many(self, seqs: Iterable[int]) -> None:
        """Forget records the broker acknowledged (unknown numbers are ignored)."""
        rows = [(s,) for s in seqs]
        if not rows:
            return
        with self._lock:
            self._with_recovery(lambda: self._ack(rows))

    # -- reading -------------------------------------------------------------------------------

    def pending(self, limit: int, *, after: int = 0) -> list[SpooledRecord]:
        """Up to ``limit`` records not yet acknowledged, oldest first, with ``seq > after``."""
        with self._lock:
            rows = self._with_recovery(
                lambda: self._db.execute(
                    "SELECT seq, kind, payload FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, limit),
                ).fetchall()
            )
        return [SpooledRecord(int(s), str(k), bytes(p)) for s, k, p in rows]

    def count(self) -> int:
        """Records waiting for an acknowledgement."""
        with self._lock:
            return self._count

    @property
    def dropped_total(self) -> int:
        """Records dropped at the bound since this file was started."""
        with self._lock:
            return self._with_recovery(
                lambda: self._scalar("SELECT COALESCE(SUM(dropped_total), 0) FROM streams")
            )

    def pending_dropped(self, device_id: str) -> int:
        """Drops the next record of ``device_id`` will report."""
        with self._lock:
            return self._with_recovery(
                lambda: self._scalar(
                    "SELECT COALESCE(MAX(pending_dropped), 0) FROM streams WHERE device_id = ?",
                    (device_id,),
                )
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- inside the lock -----------------------------------------------------------------------

    def _append(
        self, device_id: str, items: list[tuple[str, Mapping[str, Any]]], strict: bool
    ) -> list[int]:
        db = self._db
        count = self._count
        db.execute("BEGIN IMMEDIATE")
        try:
            last_seq, pending = self._stream(device_id)
            rows: list[tuple[int, str, str, int, bytes]] = []
            for kind, fields in items:
                seq = last_seq + 1
                try:
                    payload = _record(device_id, kind, fields, seq, pending)
                except SpoolError as e:
                    if strict:
                        raise
                    log.error(
                        "telemetry record refused; the window is not reported",
                        extra={"kind": kind, "error": str(e)},
                    )
                    continue
                rows.append((seq, device_id, kind, pending, payload))
                last_seq, pending = seq, 0
            if rows:
                self._reserve(device_id, last_seq)
                db.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?)", rows)
                db.execute(
                    "UPDATE streams SET last_seq = ?, pending_dropped = ? WHERE device_id = ?",
                    (last_seq, pending, device_id),
                )
                self._count += len(rows)
                self._bound()
            db.execute("COMMIT")
        except BaseException:
            self._rollback(count)
            raise
        return [row[0] for row in rows]

    def _stream(self, device_id: str) -> tuple[int, int]:
        """The device's last sequence number and pending drops; starts a stream if needed."""
        row = self._db.execute(
            "SELECT last_seq, pending_dropped FROM streams WHERE device_id = ?", (device_id,)
        ).fetchone()
        if row is not None:
            return int(row[0]), int(row[1])
        others = self._scalar("SELECT COUNT(*) FROM records WHERE device_id != ?", (device_id,))
        if others:
            # Another identity's records can only be sent as that device, which this is not.
            log.warning(
                "telemetry of an earlier device identity discarded",
                extra={"device": device_id, "records": others},
            )
            self._db.execute("DELETE FROM records WHERE device_id != ?", (device_id,))
            self._count -= others
        floor = self._reserved.get(device_id, 0)
        self._db.execute(
            "INSERT INTO streams (device_id, last_seq) VALUES (?, ?)", (device_id, floor)
        )
        return floor, 0

    def _reserve(self, device_id: str, seq: int) -> None:
        # Written before the transaction that uses the numbers commits: a fresh database after
        # damage starts above every number the old one can have handed out.
        if seq <= self._reserved.get(device_id, 0):
            return
        reserved = {**self._reserved, device_id: seq + _SEQ_BLOCK}
        try:
            atomic_write(self._seq_file, json.dumps(reserved, sort_keys=True).encode())
        except OSError as e:
            raise SpoolError(f"cannot write {self._seq_file}: {e}") from e
        self._reserved = reserved

    def _bound(self) -> None:
        excess = self._count - self.max_records
        if excess <= 0:
            self._overflowing = False
            return
        oldest = self._db.execute(
            "SELECT device_id, COUNT(*), TOTAL(dropped), MAX(seq) FROM "
            "(SELECT device_id, seq, dropped FROM records ORDER BY seq LIMIT ?) GROUP BY device_id",
            (excess,),
        ).fetchall()
        for device_id, n, reported, newest in oldest:
            self._db.execute(
                "DELETE FROM records WHERE device_id = ? AND seq <= ?", (device_id, newest)
            )
            self._db.execute(
                "UPDATE streams SET pending_dropped = pending_dropped + ?, "
                "dropped_total = dropped_total + ? WHERE device_id = ?",
                (n + int(reported), n, device_id),
            )
            self._count -= n
            log.log(
                logging.DEBUG if self._overflowing else logging.WARNING,
                "telemetry spool full; dropped the oldest records (the next record reports it)",
                extra={"device": device_id, "dropped": n, "max_records": self.max_records},
            )
        self._overflowing = True

    def _ack(self, rows: list[tuple[int]]) -> None:
        db = self._db
        count = self._count
        db.execute("BEGIN IMMEDIATE")
        try:
            before = db.total_changes
            db.executemany("DELETE FROM records WHERE seq = ?", rows)
            self._count -= db.total_changes - before
            db.execute("COMMIT")
        except BaseException:
            self._rollback(count)
            raise

    def _rollback(self, count: int) -> None:
        self._count = count  # what the file holds again
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                log.debug("rollback failed", exc_info=True)

    def _scalar(self, sql: str, args: tuple[object, ...] = ()) -> int:
        return int(self._db.execute(sql, args).fetchone()[0])

    def _with_recovery(self, operation: Callable[[], T]) -> T:
        """Run ``operation``; on a damaged file move it aside, start fresh and run it again."""
        try:
            return operation()
        except sqlite3.DatabaseError as e:
            if not _damaged(e):
                raise SpoolError(f"the telemetry spool {self.path} failed: {e}") from e
            self._db.close()
            self._move_aside(str(e))
            self._db = self._open()
            self._count = 0
        try:
            return operation()
        except sqlite3.Error as e:
            raise SpoolError(f"the telemetry spool {self.path} failed: {e}") from e

    # -- the file ------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except _DamagedFileError as e:
            self._move_aside(str(e))
        try:
            return self._connect()
        except (_DamagedFileError, sqlite3.Error) as e:
            raise SpoolError(f"cannot start a fresh telemetry spool at {self.path}: {e}") from e

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise SpoolError(f"cannot open the telemetry spool {self.path}: {e}") from e
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > _FORMAT:
                raise _DamagedFileError(f"format {version} is newer than this agent's ({_FORMAT})")
            check = [str(r[0]) for r in db.execute("PRAGMA quick_check").fetchall()]
            if check != ["ok"]:
                raise _DamagedFileError("; ".join(check[:3]))
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version = {_FORMAT}")
        except sqlite3.DatabaseError as e:
            db.close()
            if _damaged(e):
                raise _DamagedFileError(str(e)) from e
            raise SpoolError(f"cannot open the telemetry spool {self.path}: {e}") from e
        except _DamagedFileError:
            db.close()
            raise
        return db

    def _move_aside(self, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            source = self.path.with_name(self.path.name + suffix)
            try:
                if suffix == "-shm":
                    source.unlink(missing_ok=True)  # rebuilt from the WAL; worthless alone
                elif source.exists():
                    source.replace(aside.with_name(aside.name + suffix))
            except OSError as e:
                raise SpoolError(
                    f"the telemetry spool {self.path} is damaged ({why}) and cannot be moved "
                    f"aside: {e}; remove it by hand"
                ) from e
        log.warning(
            "telemetry spool damaged; moved aside and started a fresh one (records in it are "
            "lost and the fleet will see a gap)",
            extra={"path": str(self.path), "moved_to": str(aside), "error": why},
        )

    def _read_reserved(self) -> dict[str, int]:
        try:
            data = json.loads(self._seq_file.read_bytes())
            return {str(k): int(v) for k, v in data.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError) as e:
            log.warning(
                "telemetry sequence reservations unreadable; a damaged spool may reuse numbers",
                extra={"path": str(self._seq_file), "error": str(e)},
            )
            return {}


def _damaged(error: sqlite3.DatabaseError) -> bool:
    # The primary result code: SQLite may report an extended one (SQLITE_CORRUPT_INDEX, ...).
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _DAMAGED


def _record(device_id: str, kind: str, fields: Mapping[str, Any], seq: int, dropped: int) -> bytes:
    """The encoded, validated record; :class:`SpoolError` names what is wrong."""
    model = RECORDS.get(kind)
    if model is None:
        raise SpoolError(f"unknown telemetry kind {kind!r}; expected one of {sorted(RECORDS)}")
    clash = sorted(_RESERVED & set(fields))
    if clash:
        raise SpoolError(f"{kind} window sets {', '.join(clash)}, which the spool fills in")
    try:
        record = model(device_id=device_id, seq=seq, dropped=dropped, **fields)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "record"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise SpoolError(f"{kind} window is invalid: {where}: {first['msg']}{more}") from None
    payload = encode(record)
    if len(payload) > MAX_MESSAGE:
        raise SpoolError(
            f"{kind} window for {record.model}@{record.version} is {len(payload)} bytes, over the "
            f"{MAX_MESSAGE}-byte message limit; profile fewer features or bins"
        )
    return payload
