"""Replacing the keys of targets, snapshot and timestamp, and renewing targets without a
publish, seen by devices that refresh against the served repository."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp

from fleet.errors import RepositoryError
from fleet.trust import ImageRepository, generate_key, load_signer, public_key
from tests.agent.test_tuf_client import (
    MLP,
    World,
    _republish_targets,
    refused,
)

MLP2 = "mlp-2.0.0.efb"


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator[Callable[..., World]]:
    with ExitStack() as stack:
        yield lambda name="w", **create: World(tmp_path / name, stack, **create)


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    return make_world()


def new_keys(folder: Path, name: str, count: int = 1) -> list[Path]:
    paths = [folder / f"{name}-{i}.pem" for i in range(count)]
    for path in paths:
        generate_key(path)
    return paths


def root_of(world: World, name: str = "root.json") -> Root:
    md = Metadata[Root].from_bytes(world.metadata(name))
    return md.signed


def version(world: World, name: str) -> int:
    return int(Metadata.from_bytes(world.metadata(name)).signed.version)


def test_rotate_targets_device_follows_and_the_old_key_is_refused(
    world: World, bundles: dict[str, Path], tmp_path: Path
) -> None:
    world.publish("mlp-1", bundles)
    device = world.device()  # trusts only 1.root.json, from enrollment
    device.refresh()
    old_keyid = public_key(world.keys["targets"][0]).keyid
    targets_before = version(world, "targets.json")
    new = new_keys(tmp_path, "targets-new")

    assert world.repo.rotate_role("targets", new, world.keys["root"]) == 2
    root = root_of(world)
    assert root.roles["targets"].keyids == [public_key(new[0]).keyid]
    assert old_keyid not in root.keys
    # The catalogue was re-signed by the new key right away, so devices see a coherent state.
    targets: Metadata[Targets] = Metadata.from_bytes(world.metadata("targets.json"))
    assert targets.signed.version == targets_before + 1
    root.verify_delegate("targets", targets.signed_bytes, targets.signatures)
    with pytest.raises(RepositoryError, match="not one of the targets keys") as e:
        world.repo.add_bundle(bundles["mlp-2"], world.keys["targets"])
    assert e.value.reason == "wrong_key"

    world.repo.add_bundle(bundles["mlp-2"], new)
    device.refresh()
    trusted = Metadata[Root].from_bytes((device.metadata_dir / "root.json").read_bytes())
    assert trusted.signed.version == 2
    fetched = device.fetch(MLP2, tmp_path / "staging")
    assert fetched.read_bytes() == bundles["mlp-2"].read_bytes()

    # Whoever still holds the old targets key (and the online keys) publishes a catalogue.
    _republish_targets(world, world.keys["targets"], TargetFile.from_data("evil-1.0.0.efb", b"x"))
    error = refused("bad_signature", device.refresh)
    assert "targets" in str(error)
    refused("bad_signature", world.device("fresh").refresh)  # walking the chain from v1 too
    trusted_targets = (device.metadata_dir / "targets.json").read_bytes()
    assert b"evil-1.0.0.efb" not in trusted_targets and MLP2.encode() in trusted_targets


def test_rotate_timestamp_open_with_the_new_key_and_devices_refresh(
    world: World, bundles: dict[str, Path], tmp_path: Path
) -> None:
    world.publish("mlp-1", bundles)
    device = world.device()
    device.refresh()
    new = new_keys(tmp_path, "timestamp-new")
    targets_before = version(world, "targets.json")

    assert (
        world.repo.rotate_role(
            "timestamp", new, world.keys["root"], targets_keys=world.keys["targets"]
        )
        == 2
    )
    assert version(world, "targets.json") == targets_before + 1  # renewed in the same step
    assert root_of(world).roles["timestamp"].keyids == [public_key(new[0]).keyid]
    online = {"snapshot": world.keys["snapshot"], "timestamp": new}
    with pytest.raises(RepositoryError, match="not one of the timestamp keys") as e:
        ImageRepository.open(world.repo.directory, {**online, "timestamp": world.keys["timestamp"]})
    assert e.value.reason == "wrong_key"
    reopened = ImageRepository.open(world.repo.directory, online)
    reopened.add_bundle(bundles["mlp-2"], world.keys["targets"])
    device.refresh()
    assert device.target(MLP2).custom["release"] == 2
    # The repository that rotated signs with the new key too: its renewal verifies.
    assert world.repo.refresh_timestamp(if_expiring_within=timedelta(days=2)) is True
    device.refresh()

    # A newer timestamp signed by the revoked key is refused.
    forged: Metadata[Timestamp] = Metadata.from_bytes(world.metadata("timestamp.json"))
    forged.signed.version += 1
    forged.sign(load_signer(world.keys["timestamp"][0]))
    world.serve_instead("/metadata/timestamp.json", forged.to_bytes())
    error = refused("bad_signature", device.refresh)
    assert "timestamp" in str(error)


def test_rotate_snapshot_to_two_keys(
    world: World, bundles: dict[str, Path], tmp_path: Path
) -> None:
    world.publish("mlp-1", bundles)
    device = world.device()
    device.refresh()
    new = new_keys(tmp_path, "snapshot-new", 2)
    snapshot_before = version(world, "snapshot.json")

    assert world.repo.rotate_role("snapshot", new, world.keys["root"], threshold=2) == 2
    role = root_of(world).roles["snapshot"]
    assert (role.threshold, sorted(role.keyids)) == (2, sorted(public_key(p).keyid for p in new))
    snapshot: Metadata[Snapshot] = Metadata.from_bytes(world.metadata("snapshot.json"))
    assert snapshot.signed.version == snapshot_before + 1
    assert len(snapshot.signatures) == 2
    device.refresh()
    assert version(world, "snapshot.json") == snapshot.signed.version

    online = {"timestamp": world.keys["timestamp"]}
    with pytest.raises(RepositoryError, match="pass 2 distinct snapshot key files"):
        ImageRepository.open(world.repo.directory, {**online, "snapshot": new[:1]})
    reopened = ImageRepository.open(world.repo.directory, {**online, "snapshot": new})
    reopened.add_bundle(bundles["mlp-2"], world.keys["targets"])
    device.refresh()
    assert device.target(MLP2).length == bundles["mlp-2"].stat().st_size


def test_refused_rotations_change_nothing(world: World, tmp_path: Path) -> None:
    new = new_keys(tmp_path, "new")
    before = {p.name: p.read_bytes() for p in world.repo.metadata_dir.iterdir()}

    def refusal(reason: str, match: str, role: str, *args: list[Path], **kw: object) -> None:
        with pytest.raises(RepositoryError, match=match) as e:
            world.repo.rotate_role(role, *args, **kw)  # type: ignore[arg-type]
        assert e.value.reason == reason
        after = {p.name: p.read_bytes() for p in world.repo.metadata_dir.iterdir()}
        assert after == before

    refusal("unknown_role", "rotate_root", "root", new, world.keys["root"])
    refusal("unknown_role", "cannot rotate role 'mirror'", "mirror", new, world.keys["root"])
    refusal("wrong_key", "not one of the root keys", "timestamp", new, new)  # not a root key
    refusal("threshold", "between 1 and 1 new", "targets", new, world.keys["root"], threshold=2)
    refusal("missing_key", "no new snapshot key", "snapshot", [], world.keys["root"])
    refusal("wrong_key", "already a root key", "timestamp", world.keys["root"], world.keys["root"])
    refusal(
        "wrong_key", "pass no current", "targets", new, world.keys["root"],
        targets_keys=world.keys["targets"],
    )  # fmt: skip
    # Refused after the new online key was taken up: the repository keeps its old key.
    refusal(
        "wrong_key", "not one of the targets keys", "timestamp", new, world.keys["root"],
        targets_keys=world.keys["snapshot"],
    )  # fmt: skip
    assert world.repo.refresh_timestamp(if_expiring_within=timedelta(days=2)) is True
    world.device().refresh()


def test_resign_targets_renews_expiry_and_devices_refresh(
    make_world: Callable[..., World], bundles: dict[str, Path]
) -> None:
    # A repository whose targets expired an hour ago: devices refuse its catalogue.
    stale = make_world(expiry={"targets": timedelta(hours=-1)})
    stale.publish("mlp-1", bundles)
    device = stale.device()
    error = refused("expired", device.refresh)
    assert "targets" in str(error)
    before = version(stale, "targets.json")

    assert stale.repo.resign_targets(stale.keys["targets"], expires_in=timedelta(days=30)) == (
        before + 1
    )
    targets: Metadata[Targets] = Metadata.from_bytes(stale.metadata("targets.json"))
    left = targets.signed.expires - datetime.now(timezone.utc)
    assert timedelta(days=29, hours=23) < left <= timedelta(days=30)
    assert MLP in targets.signed.targets  # same catalogue, new version
    snapshot: Metadata[Snapshot] = Metadata.from_bytes(stale.metadata("snapshot.json"))
    assert snapshot.signed.meta["targets.json"].version == before + 1
    device.refresh()
    assert device.target(MLP).custom["release"] == 1

    # Without expires_in, the repository's policy applies (here: already expired).
    assert stale.repo.resign_targets(stale.keys["targets"]) == before + 2
    refused("expired", stale.device("other").refresh)
    with pytest.raises(RepositoryError, match="positive duration") as e:
        stale.repo.resign_targets(stale.keys["targets"], expires_in=timedelta(0))
    assert e.value.reason == "expiry"
    with pytest.raises(RepositoryError, match="not one of the targets keys"):
        stale.repo.resign_targets(stale.keys["snapshot"], expires_in=timedelta(days=1))
    with pytest.raises(RepositoryError, match="no targets key given"):
        stale.repo.resign_targets([])
    assert version(stale, "targets.json") == before + 2
