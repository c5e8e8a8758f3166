"""``edgefleet fleet backup`` and ``fleet restore`` on real fleet homes: a backup taken while
the database is being written restores into a home whose CA, catalogue and enrollment tokens
work; nothing is ever overwritten; a damaged backup is refused before anything is written; and
the catalogue steps of the runbook after restoring an older backup are the ones that work."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agent.trust import TrustError
from agent.trust.enrollment import enroll_device, open_catalogue
from agent.trust.tuf_client import ModelCatalogue
from edgefleet.cli import cli
from exporters.package import create_bundle
from fleet.backup import DESIRED_SEQ_MARGIN
from fleet.store import open_store
from fleet.trust.settings import FleetTrustSettings
from tests.fleet.test_trust_cli import InProcess
from tests.models import mlp_onnx


def fleet(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["fleet", "--home", str(home), *args])


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bundles")
    out = {}
    for seed, version in ((1, "1.0.0"), (2, "2.0.0")):
        out[version] = d / f"mlp-{version}.efb"
        create_bundle(mlp_onnx(d / f"{seed}.onnx", seed=seed), name="mlp", version=version,
                      out=out[version])  # fmt: skip
    return out


@pytest.fixture
def home(tmp_path: Path, bundles: dict[str, Path]) -> Path:
    """A fleet home as a lab runs it: keys, one published bundle, two devices in the registry."""
    home = tmp_path / "home"
    ok(fleet(home, "keys", "init"))
    ok(fleet(home, "publish", str(bundles["1.0.0"]), "--targets-key", targets_key(home)))
    store = open_store(home / "fleet.sqlite")
    try:
        for device in ("cam-1", "cam-2"):
            store.devices.enrolled(device, datetime.now(timezone.utc))
        for _ in range(3):
            store.devices.next_seqs(["cam-1"])
    finally:
        store.close()
    return home


def targets_key(home: Path) -> str:
    return str(home / "keys" / "targets.pem")


def tree(folder: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under ``folder`` with its mode and (files) bytes."""
    found: dict[str, tuple[int, bytes | None]] = {".": (folder.stat().st_mode & 0o777, None)}
    for path in sorted(folder.rglob("*")):
        data = path.read_bytes() if path.is_file() else None
        found[path.relative_to(folder).as_posix()] = (path.stat().st_mode & 0o777, data)
    return found


@pytest.fixture
def writer(home: Path) -> Iterator[threading.Event]:
    """Writes to the fleet database all the time, as the running service does."""
    stop, writing = threading.Event(), threading.Event()

    def run() -> None:
        store = open_store(home / "fleet.sqlite")
        try:
            while not stop.is_set():
                store.audit.record("tests", "device.labelled", "cam-2", {"n": 1})
                store.devices.next_seqs(["cam-2"])
                writing.set()
        finally:
            store.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert writing.wait(10), "the writer did not start"
    yield stop
    stop.set()
    thread.join(10)


def test_a_backup_taken_under_writes_restores_a_working_fleet(
    home: Path, tmp_path: Path, writer: threading.Event
) -> None:
    token = ok(fleet(home, "enroll-token", "cam-3")).split()[0]
    output = ok(fleet(home, "backup", str(tmp_path / "backup")))
    writer.set()
    assert "schema version" in output
    assert "OFFLINE key" in output and "keys/root.pem" in output  # keys init left them there
    backup = tmp_path / "backup"
    # As secret as the keys: nothing in it is readable by others.
    assert backup.stat().st_mode & 0o777 == 0o700
    for path in backup.rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o700 if path.is_dir() else 0o600), path
    assert not list(tmp_path.glob(".backup.partial-*"))

    checked = ok(fleet(home, "restore", str(backup), "--check"))
    assert "every file and database page checks out" in checked
    restored = tmp_path / "restored"
    output = ok(fleet(restored, "restore", str(backup)))
    assert "moved the director sequence of 2 device(s)" in output

    # Every file but the databases and the lock comes back byte for byte, with its mode.
    skip = {"fleet.sqlite", "fleet.sqlite-wal", "fleet.sqlite-shm", "enrollment.sqlite",
            "repository.lock"}  # fmt: skip
    before = {k: v for k, v in tree(home).items() if k not in skip}
    after = {k: v for k, v in tree(restored).items() if k not in skip}
    assert after == before
    assert (restored / "fleet.sqlite").stat().st_mode == (home / "fleet.sqlite").stat().st_mode

    # The registry: what was there, with director numbers far past anything issued since.
    store = open_store(restored / "fleet.sqlite")
    try:
        assert [v.version for v in store.models.find("mlp")] == ["1.0.0"]
        assert store.devices.get("cam-1").desired_seq == 3 + DESIRED_SEQ_MARGIN
        assert store.devices.get("cam-2").desired_seq > DESIRED_SEQ_MARGIN
    finally:
        store.close()
    original = open_store(home / "fleet.sqlite")
    try:
        assert original.devices.get("cam-2").desired_seq < DESIRED_SEQ_MARGIN
    finally:
        original.close()

    # The restored CA, catalogue and token database work: the token made before the backup
    # enrolls a device against the restored home, which then refreshes its catalogue.
    with InProcess(FleetTrustSettings(home=restored)) as service:
        files = enroll_device(service.url, token, "cam-3", tmp_path / "device")
        catalogue = open_catalogue(tmp_path / "device")
        try:
            catalogue.refresh()
            assert catalogue.target("mlp-1.0.0.efb").sha256
        finally:
            catalogue.close()
    assert files.certificate.is_file()


def test_backup_and_restore_never_overwrite(home: Path, tmp_path: Path) -> None:
    existing = tmp_path / "taken"
    existing.mkdir()
    refused = fleet(home, "backup", str(existing))
    assert refused.exit_code == 1 and "a backup never overwrites" in refused.output
    nowhere = fleet(home, "backup", str(tmp_path / "no" / "such" / "folder"))
    assert nowhere.exit_code == 1 and "create it first" in nowhere.output
    not_a_home = fleet(tmp_path / "empty", "backup", str(tmp_path / "b0"))
    assert not_a_home.exit_code == 1 and "is not a fleet home" in not_a_home.output
    # A database file that is not one is refused, and no half backup is left behind.
    broken = tmp_path / "broken.sqlite"
    broken.write_bytes(b"not a database, " * 512)
    bad = fleet(home, "backup", str(tmp_path / "b2"), "--database", str(broken))
    assert bad.exit_code == 1 and f"backing up {broken} failed" in bad.output
    assert not (tmp_path / "b2").exists() and not list(tmp_path.glob(".b2.partial-*"))

    ok(fleet(home, "backup", str(tmp_path / "b1")))
    into_home = fleet(home, "restore", str(tmp_path / "b1"))
    assert into_home.exit_code == 1 and "exists and is not empty" in into_home.output
    database = tmp_path / "elsewhere.sqlite"
    database.write_bytes(b"")
    into_db = fleet(tmp_path / "new", "restore", str(tmp_path / "b1"), "--database", str(database))
    assert into_db.exit_code == 1 and f"{database} exists" in into_db.output
    assert not (tmp_path / "new").exists() and database.read_bytes() == b""

    # A database kept outside the home is backed up and restored to where --database says.
    ok(fleet(tmp_path / "new", "restore", str(tmp_path / "b1"), "--database",
             str(tmp_path / "db" / "fleet.sqlite")))  # fmt: skip
    assert not (tmp_path / "new" / "fleet.sqlite").exists()
    store = open_store(tmp_path / "db" / "fleet.sqlite")
    try:
        assert store.devices.get("cam-1").desired_seq == 3 + DESIRED_SEQ_MARGIN
    finally:
        store.close()


def _rewrite_manifest(backup: Path, change: dict[str, object]) -> None:
    path = backup / "backup.json"
    os.chmod(path, 0o600)
    manifest = json.loads(path.read_text())
    manifest.update(change)
    path.write_text(json.dumps(manifest))


def test_a_damaged_backup_is_refused_before_anything_is_written(home: Path, tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    ok(fleet(home, "backup", str(backup)))
    target = tmp_path / "target"

    key = backup / "home" / "keys" / "director.pem"
    data = bytearray(key.read_bytes())
    data[40] ^= 1
    key.write_bytes(bytes(data))
    for args in (("restore", str(backup), "--check"), ("restore", str(backup))):
        damaged = fleet(target, *args)
        assert damaged.exit_code == 1
        assert "keys/director.pem does not match backup.json" in damaged.output
        assert "use another one" in damaged.output
    assert not target.exists()
    data[40] ^= 1
    key.write_bytes(bytes(data))

    # A database that is not the one the manifest lists, or is newer than this edgefleet.
    db = backup / "db" / "fleet.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (999, 'later')")
    conn.commit()
    conn.close()
    changed = fleet(target, "restore", str(backup))
    assert changed.exit_code == 1 and "db/fleet.sqlite does not match" in changed.output
    manifest = json.loads((backup / "backup.json").read_text())
    entry = next(d for d in manifest["databases"] if d["path"] == "db/fleet.sqlite")
    entry["sha256"] = hashlib.sha256(db.read_bytes()).hexdigest()
    entry["size"] = db.stat().st_size
    _rewrite_manifest(backup, {"databases": manifest["databases"]})
    newer = fleet(target, "restore", str(backup))
    assert newer.exit_code == 1 and "schema version 999, newer than this edgefleet" in newer.output

    # Bytes that are no SQLite database at all.
    db.write_bytes(b"not a database, " * 512)
    entry["sha256"] = hashlib.sha256(db.read_bytes()).hexdigest()
    entry["size"] = db.stat().st_size
    _rewrite_manifest(backup, {"databases": manifest["databases"]})
    garbage = fleet(target, "restore", str(backup), "--check")
    assert garbage.exit_code == 1 and "not a readable SQLite database" in garbage.output

    # Paths that leave the backup are refused; a folder without a manifest is no backup.
    files = manifest["files"]
    _rewrite_manifest(backup, {"files": [*files, {**files[0], "path": "../../etc/passwd"}]})
    escaping = fleet(target, "restore", str(backup))
    assert escaping.exit_code == 1 and "a path outside the backup: refused" in escaping.output
    (backup / "backup.json").unlink()
    no_manifest = fleet(target, "restore", str(backup))
    assert no_manifest.exit_code == 1 and "is not an edgefleet fleet backup" in no_manifest.output
    assert not target.exists()


def test_a_restore_that_cannot_sign_is_not_put_in_place(home: Path, tmp_path: Path) -> None:
    """The restored catalogue is opened with the restored online keys before it goes live."""
    (home / "keys" / "timestamp.pem").unlink()
    ok(fleet(home, "backup", str(tmp_path / "backup")))
    refused = fleet(tmp_path / "target", "restore", str(tmp_path / "backup"))
    assert refused.exit_code == 1
    assert "the restored home does not work" in refused.output
    assert "timestamp" in refused.output
    assert not (tmp_path / "target").exists()
    assert not list(tmp_path.glob(".target.restoring-*"))


def test_after_restoring_an_older_catalogue_resigning_targets_brings_devices_back(
    home: Path, tmp_path: Path, bundles: dict[str, Path]
) -> None:
    """docs/operations.md: a device that refreshed after a publish the backup does not hold
    refuses the restored catalogue as a rollback; re-signing the targets metadata once per
    change since the backup, plus once, brings it back."""
    root = (home / "repository" / "metadata" / "1.root.json").read_bytes()

    def device(url: str) -> ModelCatalogue:
        return ModelCatalogue(tmp_path / "device", f"{url}/metadata/", f"{url}/targets/", root)

    ok(fleet(home, "backup", str(tmp_path / "backup")))
    ok(fleet(home, "publish", str(bundles["2.0.0"]), "--targets-key", targets_key(home)))
    with InProcess(FleetTrustSettings(home=home)) as old:
        catalogue = device(old.url)
        catalogue.refresh()
        catalogue.close()

    restored = tmp_path / "restored"
    ok(fleet(restored, "restore", str(tmp_path / "backup")))
    with InProcess(FleetTrustSettings(home=restored)) as new:
        catalogue = device(new.url)
        with pytest.raises(TrustError) as refused:
            catalogue.refresh()
        catalogue.close()
        assert refused.value.reason == "rollback"
        for _ in range(2):  # one publish since the backup, plus one
            ok(fleet(restored, "keys", "resign-targets", "--targets-key", targets_key(restored)))
        catalogue = device(new.url)
        try:
            catalogue.refresh()
            assert catalogue.target("mlp-1.0.0.efb").sha256
            with pytest.raises(TrustError, match="not in the signed model catalogue"):
                catalogue.target("mlp-2.0.0.efb")  # published after the backup: publish again
        finally:
            catalogue.close()
