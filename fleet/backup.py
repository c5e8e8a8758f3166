"""Backing up a fleet home while the service runs, and restoring it on a new host.

Everything a fleet needs to go on after losing its host lives in its home and its database: the
online keys and the device CA, the signed catalogue with its bundles, the enrollment tokens, the
registry of devices, models, rollouts and API tokens. A backup is a new folder, mode 0700, with
every file mode 0600 — it is as secret as the keys it holds::

    backup.json            what it holds: every file's path, original mode, size and sha256
    db/fleet.sqlite        the fleet database, copied with SQLite's online backup API
    db/enrollment.sqlite   the enrollment tokens (hashes only), the same way
    home/...               every other file of the home: keys/, ca/, repository/, broker/,
                           mqtt/, admin.token, ingest-share

The catalogue is copied under the repository lock, so its metadata is one consistent version.
A backup is written under a temporary name and renamed when complete: a folder with the final
name is a whole backup. Neither step ever overwrites anything.

A restore checks every file against ``backup.json`` and every database page by page before it
writes, builds the home under a temporary name, opens its CA and catalogue with the restored
keys, and only then moves it into place. It also moves every device's director sequence past
anything issued after the backup (see :data:`DESIRED_SEQ_MARGIN`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from edgefleet import __version__
from fleet.errors import FleetError, StoreError, TrustError
from fleet.settings import FleetSettings
from fleet.store.backup import advance_desired_seqs, check_copy, copy_database
from fleet.trust.ca import DeviceCA
from fleet.trust.enroll_http import open_repository, repository_lock
from fleet.trust.keys import ONLINE_ROLES, ROLES
from fleet.trust.settings import FleetTrustSettings

__all__ = [
    "DESIRED_SEQ_MARGIN",
    "MANIFEST",
    "BackupError",
    "BackupManifest",
    "Restored",
    "backup_home",
    "read_backup",
    "restore_home",
]

log = logging.getLogger(__name__)

MANIFEST = "backup.json"
# Director sequence numbers a restore skips for every device. A device refuses a desired state
# whose number is not above the last one it applied; between the backup and the restore the
# old fleet may have issued some. No fleet issues a million desired states to one device
# between two backups, and numbers go up to 2**63.
DESIRED_SEQ_MARGIN = 1_000_000
_CHUNK = 1 << 20  # bytes read at a time: bundles can be gigabytes
_FLEET_DB = "db/fleet.sqlite"
_TOKENS_DB = "db/enrollment.sqlite"
_OFFLINE_KEYS = tuple(f"keys/{role}.pem" for role in ROLES if role not in ONLINE_ROLES)


class BackupError(FleetError):
    """A backup or restore was refused: the target exists, or the backup is incomplete or
    damaged. The message names the file and what to do."""


class BackupFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str  # relative, '/'-separated, inside the backup folder
    mode: int = Field(ge=0, le=0o777)  # the file's mode in the fleet home
    size: int = Field(ge=0)  # bytes
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class BackupDirectory(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    mode: int = Field(ge=0, le=0o777)


class BackupManifest(BaseModel):
    """``backup.json``: what a backup holds, and how to check it."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal[1] = Field(default=1, alias="schema")
    created: AwareDatetime
    edgefleet_version: str
    home: str  # where it was taken, for the record
    home_mode: int = Field(ge=0, le=0o777)
    database_schema: int | None  # migrations applied to the fleet database; None: no database
    databases: tuple[BackupFile, ...]
    directories: tuple[BackupDirectory, ...]  # paths relative to the home
    files: tuple[BackupFile, ...]
    offline_keys: tuple[str, ...]  # offline keys that were still in the home (they should not)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in (*self.databases, *self.files))

    @property
    def has_fleet_database(self) -> bool:
        return any(d.path == _FLEET_DB for d in self.databases)


@dataclass(frozen=True)
class Restored:
    """What a restore wrote."""

    manifest: BackupManifest
    home: Path
    database: Path
    devices: int  # devices whose director sequence moved on by DESIRED_SEQ_MARGIN


# -- backup ------------------------------------------------------------------------------------


def backup_home(settings: FleetSettings, dest: Path) -> BackupManifest:
    """Back the fleet home and database up into the new folder ``dest``; safe while the fleet
    service runs."""
    if not (settings.repository_dir / "metadata" / "root.json").is_file():
        raise BackupError(
            f"{settings.home} is not a fleet home (no repository/metadata/root.json); pass the "
            "fleet's --home or set EDGEFLEET_FLEET_HOME"
        )
    if dest.exists() or dest.is_symlink():
        raise BackupError(f"{dest} exists; a backup never overwrites: name a new folder")
    if not dest.parent.is_dir():
        raise BackupError(f"{dest.parent} does not exist; create it first")
    staging = dest.parent / f".{dest.name}.partial-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o700)
    try:
        manifest = _write_backup(settings, staging)
        _write_private(staging / MANIFEST, manifest.model_dump_json(by_alias=True, indent=2))
        _fsync_dir(staging)
        staging.rename(dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(
        "fleet home backed up",
        extra={"home": str(settings.home), "backup": str(dest), "bytes": manifest.total_bytes},
    )
    return manifest


def _write_backup(settings: FleetSettings, staging: Path) -> BackupManifest:
    databases: list[BackupFile] = []
    schema = None
    (staging / "db").mkdir(mode=0o700)
    # The databases first, then the files: the CA index is then at least as new as the
    # registry, so every certificate a backed-up device holds can still be revoked.
    for rel, source in ((_FLEET_DB, settings.database_path), (_TOKENS_DB, settings.tokens_db)):
        if not source.is_file():
            continue
        copy = staging / rel
        copy_database(source, copy)
        version = check_copy(copy)
        if rel == _FLEET_DB:
            schema = version
        databases.append(_entry(copy, rel, source.stat().st_mode))
    skipped = {
        p.resolve()
        for p in (
            settings.lock_path,
            *_with_sidecars(settings.database_path),
            *_with_sidecars(settings.tokens_db),
        )
    }
    directories: list[BackupDirectory] = []
    files: list[BackupFile] = []
    with repository_lock(settings):
        for path, rel in _walk(settings.home):
            if path.is_dir():
                directories.append(BackupDirectory(path=rel, mode=path.stat().st_mode & 0o777))
                continue
            if path.resolve() in skipped or not path.is_file() or _is_temporary(path.name):
                continue
            target = staging / "home" / rel
            _private_folders(staging, target.parent)
            digest, size = _copy(path, target, 0o600)
            files.append(
                BackupFile(
                    path=f"home/{rel}", mode=path.stat().st_mode & 0o777, size=size, sha256=digest
                )
            )
    present = {f.path.removeprefix("home/") for f in files}
    return BackupManifest(
        created=datetime.now(timezone.utc),
        edgefleet_version=__version__,
        home=str(settings.home),
        home_mode=settings.home.stat().st_mode & 0o777,
        database_schema=schema,
        databases=tuple(databases),
        directories=tuple(directories),
        files=tuple(files),
        offline_keys=tuple(k for k in _OFFLINE_KEYS if k in present),
    )


def _walk(home: Path) -> Iterator[tuple[Path, str]]:
    """Every directory and file under ``home``, sorted, with its '/'-separated relative path."""
    for root, dirs, names in os.walk(home):
        dirs.sort()
        base = Path(root)
        for name in sorted(dirs):
            yield base / name, (base / name).relative_to(home).as_posix()
        for name in sorted(names):
            yield base / name, (base / name).relative_to(home).as_posix()


def _with_sidecars(database: Path) -> tuple[Path, ...]:
    return tuple(database.with_name(database.name + s) for s in ("", "-wal", "-shm", "-journal"))


def _is_temporary(name: str) -> bool:
    """A write that has not reached its rename (fleet.files or agent.files naming)."""
    return (name.startswith(".") and name.endswith(".tmp")) or ".tmp-" in name


def _entry(path: Path, rel: str, source_mode: int) -> BackupFile:
    digest, size = _digest(path)
    return BackupFile(path=rel, mode=source_mode & 0o777, size=size, sha256=digest)


# -- restore -----------------------------------------------------------------------------------


def read_backup(source: Path) -> BackupManifest:
    """Read ``backup.json`` and check every file it lists (size and sha256) and every database
    (page by page, schema version); raise :class:`BackupError` naming the first problem."""
    path = source / MANIFEST
    try:
        manifest = BackupManifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise BackupError(
            f"{path} does not exist: {source} is not an edgefleet fleet backup, or it is "
            "incomplete (a backup is written under a temporary name until it is whole)"
        ) from None
    except (OSError, ValidationError) as e:
        raise BackupError(f"{path} is unreadable or not a backup manifest: {e}") from e
    for entry in (*manifest.databases, *manifest.files):
        _check_entry(source, entry)
    for database in manifest.databases:
        try:
            check_copy(source / database.path)
        except StoreError as e:
            raise BackupError(str(e)) from e
    return manifest


def _check_entry(source: Path, entry: BackupFile) -> None:
    rel = _safe_relative(entry.path)
    path = source / rel
    if path.is_symlink() or not path.is_file():
        raise BackupError(f"{path} is missing from the backup (or is not a plain file)")
    digest, size = _digest(path)
    if size != entry.size or digest != entry.sha256:
        raise BackupError(
            f"{path} does not match {MANIFEST} ({size} bytes, sha256 {digest[:12]}…; expected "
            f"{entry.size} bytes, {entry.sha256[:12]}…): the backup is damaged, use another one"
        )


def _safe_relative(text: str) -> PurePosixPath:
    """A manifest path as a relative path that stays inside the backup or the home."""
    rel = PurePosixPath(text)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\\" in text:
        raise BackupError(f"{MANIFEST} names {text!r}, a path outside the backup: refused")
    return rel


def restore_home(source: Path, settings: FleetSettings) -> Restored:
    """Restore the backup in ``source`` as the fleet home and database of ``settings``.

    Refuses a home that exists and is not empty, and a database file that exists: a restore
    never overwrites. The fleet service must not be running on that home.
    """
    manifest = read_backup(source)
    home, database = settings.home, settings.database_path
    if home.exists() and (not home.is_dir() or any(home.iterdir())):
        raise BackupError(
            f"{home} exists and is not empty; a restore never overwrites: restore into a new "
            "--home, or move the old one aside first"
        )
    if any(p.exists() for p in _with_sidecars(database)):
        raise BackupError(
            f"{database} exists; a restore never overwrites: move it aside, or pass --database"
        )
    home.parent.mkdir(parents=True, exist_ok=True)
    staging = home.parent / f".{home.name}.restoring-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o700)
    inside = _is_within(database, home)
    staged_db = (
        staging / database.resolve().relative_to(home.resolve()) if inside else _sibling(database)
    )
    try:
        devices = _stage(source, manifest, settings, staging, staged_db)
        if home.exists():
            home.rmdir()  # empty, checked above
        staging.rename(home)
        _fsync_dir(home.parent)
        if not inside and manifest.has_fleet_database:
            staged_db.rename(database)
            _fsync_dir(database.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not inside:
            staged_db.unlink(missing_ok=True)
        raise
    log.info(
        "fleet home restored",
        extra={"backup": str(source), "home": str(home), "taken": manifest.created.isoformat()},
    )
    return Restored(manifest, home, database, devices)


def _stage(
    source: Path,
    manifest: BackupManifest,
    settings: FleetSettings,
    staging: Path,
    staged_db: Path,
) -> int:
    """Write the home into ``staging`` (and the database to ``staged_db``), then open it."""
    for directory in manifest.directories:
        (staging / _safe_relative(directory.path)).mkdir(parents=True, exist_ok=True)
    for entry in manifest.files:
        rel = _safe_relative(entry.path)
        if rel.parts[0] != "home" or len(rel.parts) < 2:
            raise BackupError(f"{MANIFEST} names {entry.path!r}, outside home/: refused")
        target = staging.joinpath(*rel.parts[1:])
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy(source / rel, target, entry.mode)
    staged = FleetTrustSettings(home=staging)
    for entry in manifest.databases:
        target = staged_db if entry.path == _FLEET_DB else staged.tokens_db
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy(source / _safe_relative(entry.path), target, entry.mode)
    for directory in manifest.directories:  # last: a 0500 folder would refuse the files above
        os.chmod(staging / _safe_relative(directory.path), directory.mode)
    os.chmod(staging, manifest.home_mode)
    devices = 0
    if manifest.database_schema:  # a database with the devices table
        devices = advance_desired_seqs(staged_db, DESIRED_SEQ_MARGIN)
    _open_restored(staged, settings.home)
    return devices


def _open_restored(staged: FleetTrustSettings, home: Path) -> None:
    """Open the restored CA and catalogue with the restored keys: a backup that cannot sign is
    no backup."""
    try:
        DeviceCA.open(staged.ca_dir)
        open_repository(staged)
    except TrustError as e:
        raise BackupError(
            f"the restored home does not work: {e}. Nothing was written to {home}"
        ) from e


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.restoring-{secrets.token_hex(4)}")


# -- files -------------------------------------------------------------------------------------


def _copy(source: Path, target: Path, mode: int) -> tuple[str, int]:
    """Copy ``source`` to the new file ``target`` with ``mode`` from its first byte, fsynced;
    return the sha256 and size of the bytes copied."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with source.open("rb") as src, os.fdopen(fd, "wb") as dst:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            dst.write(chunk)
        dst.flush()
        os.fchmod(dst.fileno(), mode)
        os.fsync(dst.fileno())
    return digest.hexdigest(), size


def _digest(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _private_folders(base: Path, folder: Path) -> None:
    """Create ``folder`` and every missing folder between it and ``base``, mode 0700."""
    for level in (*reversed(folder.relative_to(base).parents), folder.relative_to(base)):
        path = base / level
        if not path.is_dir():
            path.mkdir()
            os.chmod(path, 0o700)  # whatever the umask


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
