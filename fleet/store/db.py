"""Opening the fleet database: one SQLite file in WAL mode, migrated to the current schema.

sqlite-utils wraps the connection for the repositories; ``sqlite3`` errors are translated to
:class:`StoreError` where they enter, so callers see one error type that says what to do.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils

from fleet.errors import StoreError
from fleet.store.schema import MIGRATIONS

__all__ = [
    "Database",
    "connect",
    "database_file",
    "now_text",
    "read_only",
    "schema_version",
    "transaction",
    "translated",
]

Database = sqlite_utils.Database

_BUSY_TIMEOUT_MS = 10_000  # another process (the CLI) may hold the write lock briefly


def now_text(at: datetime | None = None) -> str:
    """A UTC time as stored: ISO 8601 with microseconds and ``+00:00``."""
    at = at or datetime.now(timezone.utc)
    if at.tzinfo is None:
        raise ValueError("stored times must be timezone-aware")
    return at.astimezone(timezone.utc).isoformat()


@contextlib.contextmanager
def translated(doing: str) -> Iterator[None]:
    """Turn ``sqlite3`` errors raised while ``doing`` into :class:`StoreError`."""
    try:
        yield
    except sqlite3.Error as e:
        raise StoreError(f"fleet database error while {doing}: {e}") from e


@contextlib.contextmanager
def transaction(db: Database) -> Iterator[None]:
    """One atomic write: ``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` on any exception.

    The connection runs in autocommit mode (every statement commits alone), so every write of
    more than one statement goes through here. Nested use joins the outer transaction: the
    outermost one commits or rolls back everything.
    """
    conn = db.conn
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def connect(path: Path | str) -> Database:
    """Open (creating if needed) the database at ``path`` and apply pending migrations.

    ``":memory:"`` is accepted for throwaway databases. A file written by a newer edgefleet
    (a schema version this code does not know) is refused rather than misread.
    """
    memory = str(path) == ":memory:"
    if not memory:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with translated(f"opening {path}"):
        conn = sqlite3.connect(
            str(path),
            isolation_level=None,
            check_same_thread=False,
            timeout=_BUSY_TIMEOUT_MS / 1000,
        )
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        if not memory:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable at checkpoints
        _migrate(conn, str(path))
    return sqlite_utils.Database(conn)


def schema_version(db: Database) -> int:
    """The number of migrations applied to ``db``."""
    row = db.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def _migrate(conn: sqlite3.Connection, where: str) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, applied_at TEXT)"
    )
    current = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] or 0
    if current > len(MIGRATIONS):
        raise StoreError(
            f"{where} has schema version {current}, newer than this edgefleet knows "
            f"({len(MIGRATIONS)}); upgrade edgefleet or restore a backup made by this version"
        )
    for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
        # executescript commits first, so run the statements one by one in our transaction.
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (version, now_text()),
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def _statements(script: str) -> Iterator[str]:
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement in a migration: {pending.strip()[:80]}")


def database_file(db: Database) -> str | None:
    """The file ``db`` reads, or None for an in-memory database (no file to open again)."""
    with translated("finding the database file"):
        for _, name, file, *_ in db.execute("PRAGMA database_list").fetchall():
            if name == "main":
                return str(file) or None
    return None


@contextlib.contextmanager
def read_only(path: str) -> Iterator[Database]:
    """A read-only connection to the database file at ``path``, in one read transaction.

    Every read through it sees the same snapshot, and in WAL mode it never blocks a writer. The
    API computes reports that read many rows (experiment verdicts, drift, series) in a worker
    thread through one, so the event loop never waits for them. Open and use it in one thread:
    SQLite connections are not shared across threads here.
    """
    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    with translated(f"opening {path} to read"):
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000)
    try:
        with translated(f"reading {path}"):
            conn.execute("BEGIN")  # deferred: the snapshot is taken at the first read
        yield sqlite_utils.Database(conn)
    finally:
        conn.close()  # closing ends the read transaction; nothing was written
