"""Copying a live SQLite database file for a backup, checking a copy, and the one change a
restore makes to the fleet database.

The copy goes through SQLite's online backup API: it reads one consistent snapshot while the
fleet service keeps writing (WAL), which a file copy of ``fleet.sqlite`` and its ``-wal`` could
not promise. This is the SQLite adapter's way to back up; another store would bring its own.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from fleet.errors import StoreError
from fleet.store.schema import MIGRATIONS

__all__ = ["advance_desired_seqs", "check_copy", "copy_database"]


def copy_database(source: Path, dest: Path) -> None:
    """Write a consistent copy of the SQLite database ``source`` to the new file ``dest``
    (mode 0600), while other connections may be writing to ``source``."""
    try:
        # mode=rw: never create a missing file; a read-only connection could not open a WAL
        # database whose -shm it may not create.
        src = sqlite3.connect(f"file:{source}?mode=rw", uri=True)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open {source} to back it up: {e}") from e
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        dst = sqlite3.connect(dest)
        try:
            src.backup(dst)  # every page in one step: one read transaction, one snapshot
            # The copy stands alone: one file, no -wal beside it to carry around.
            dst.execute("PRAGMA journal_mode = DELETE")
        finally:
            dst.close()
    except sqlite3.Error as e:
        raise StoreError(f"backing up {source} failed: {e}") from e
    finally:
        src.close()


def check_copy(path: Path) -> int | None:
    """Check a database copy page by page; return its fleet schema version (the number of
    migrations applied), or None for a database without one (the enrollment tokens).

    Raises :class:`StoreError` for a damaged file, or one written by a newer edgefleet.
    """
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open the database copy {path}: {e}") from e
    try:
        verdict = db.execute("PRAGMA integrity_check").fetchall()
        if verdict != [("ok",)]:
            problems = "; ".join(str(row[0]) for row in verdict[:3])
            raise StoreError(f"the database copy {path} is damaged: {problems}")
        has_schema = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        ).fetchone()
        if has_schema is None:
            return None
        version = int(db.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] or 0)
    except sqlite3.Error as e:
        raise StoreError(f"the database copy {path} is not a readable SQLite database: {e}") from e
    finally:
        db.close()
    if version > len(MIGRATIONS):
        raise StoreError(
            f"{path} has schema version {version}, newer than this edgefleet knows "
            f"({len(MIGRATIONS)}): restore it with the edgefleet version that made the backup"
        )
    return version


def advance_desired_seqs(path: Path, margin: int) -> int:
    """Raise every device's last issued director sequence number by ``margin``; return how many
    devices there are.

    A restored database is older than what devices have applied since the backup: a desired
    state numbered from the old counter would be refused as a replay. Devices accept any
    greater number, so jumping far ahead is safe.
    """
    try:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            count = db.execute(
                "UPDATE devices SET desired_seq = desired_seq + ?", (margin,)
            ).rowcount
            db.execute("COMMIT")
        finally:
            db.close()
    except sqlite3.Error as e:
        raise StoreError(f"cannot advance the sequence numbers in {path}: {e}") from e
    return int(count)
