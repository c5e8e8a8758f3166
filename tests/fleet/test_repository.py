"""The image repository on disk, its keys, and serving it over real HTTP (uvicorn)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import socket
import tarfile
import threading
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import uvicorn
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    Root,
    Snapshot,
    Targets,
    Timestamp,
)

from fleet.errors import KeyFileError, RepositoryError
from fleet.trust import ROLES, ImageRepository, KeyRef, generate_key, load_signer, trust_app

Scope = MutableMapping[str, Any]
ASGI = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Any]


# -- helpers shared with the agent's catalogue tests -------------------------------------------


def make_keys(folder: Path, **counts: int) -> dict[str, list[Path]]:
    """Key files per role: one each unless ``counts`` says more (e.g. ``targets=2``)."""
    keys: dict[str, list[Path]] = {}
    for role in ROLES:
        keys[role] = [folder / f"{role}-{i}.pem" for i in range(counts.get(role, 1))]
        for path in keys[role]:
            generate_key(path)
    return keys


def online(keys: dict[str, list[Path]]) -> dict[str, list[Path]]:
    return {"snapshot": keys["snapshot"], "timestamp": keys["timestamp"]}


def load(repo: ImageRepository, name: str) -> Metadata[Any]:
    return Metadata.from_bytes((repo.metadata_dir / name).read_bytes())


def model_offset(bundle: Path) -> int:
    """Where the first byte of the bundle's model file lies (past the manifest)."""
    with tarfile.open(bundle) as tar:
        member = next(m for m in tar.getmembers() if m.isfile() and m.name != "manifest.json")
        return int(member.offset_data)


class Served:
    """A real uvicorn server for an ASGI app on a free loopback port, on its own thread."""

    def __init__(self, app: ASGI, *, lifespan: Literal["on", "off"] = "off") -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(
            app, lifespan=lifespan, access_log=False, log_config=None, ws="none", http="h11"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> Served:
        self._thread.start()
        for _ in range(500):
            if self._server.started:
                return self
            self._thread.join(0.01)
        raise AssertionError("uvicorn did not start")

    def __exit__(self, *_: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()


@contextlib.contextmanager
def serve(app: ASGI) -> Iterator[Served]:
    with Served(app) as served:
        yield served


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, list[Path]]:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def repo(tmp_path: Path, keys: dict[str, list[Path]]) -> ImageRepository:
    return ImageRepository.create(tmp_path / "repo", keys)


# -- keys --------------------------------------------------------------------------------------


def test_generated_key_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "k" / "targets.pem"
    public = generate_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_signer(path).public_key.keyid == public.keyid
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="already exists") as e:
        generate_key(path)
    assert e.value.reason == "exists"
    assert path.read_bytes() == before


def test_key_files_that_are_not_ed25519_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read key file") as e:
        load_signer(tmp_path / "absent.pem")
    assert e.value.reason == "missing"
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        load_signer(junk)
    with pytest.raises(KeyFileError, match="unknown role 'mirror'"):
        KeyRef("mirror", junk)


# -- creating and publishing -------------------------------------------------------------------


def test_create_writes_version_one_of_every_role(
    repo: ImageRepository, keys: dict[str, list[Path]]
) -> None:
    root = load(repo, "1.root.json")
    assert isinstance(root.signed, Root)
    assert root.signed.consistent_snapshot is True
    for role in ROLES:
        keyids = root.signed.roles[role].keyids
        assert keyids == [load_signer(keys[role][0]).public_key.keyid]
    root.signed.verify_delegate("root", root.signed_bytes, root.signatures)
    assert (
        repo.root_bytes() == repo.root_bytes(1) == (repo.metadata_dir / "1.root.json").read_bytes()
    )
    timestamp = load(repo, "timestamp.json").signed
    snapshot = load(repo, "1.snapshot.json")
    assert isinstance(timestamp, Timestamp)
    assert timestamp.snapshot_meta.version == 1
    timestamp.snapshot_meta.verify_length_and_hashes(
        (repo.metadata_dir / "1.snapshot.json").read_bytes()
    )
    assert isinstance(snapshot.signed, Snapshot)
    assert snapshot.signed.meta["targets.json"].version == 1
    # Default expiry: timestamp about a day, root about a year.
    now = datetime.now(timezone.utc)
    assert timedelta(hours=23) < timestamp.expires - now <= timedelta(days=1)
    assert timedelta(days=364) < root.signed.expires - now <= timedelta(days=365)
    with pytest.raises(RepositoryError, match="already holds a repository"):
        ImageRepository.create(repo.directory, keys)


def test_add_bundle_publishes_a_target_with_custom_and_release_counter(
    repo: ImageRepository, keys: dict[str, list[Path]], bundles: dict[str, Path]
) -> None:
    first = repo.add_bundle(bundles["mlp-1"], keys["targets"])
    digest = hashlib.sha256(bundles["mlp-1"].read_bytes()).hexdigest()
    assert first.path == repo.target_path("mlp", "1.0.0") == "mlp-1.0.0.efb"
    assert first.sha256 == digest
    assert first.length == bundles["mlp-1"].stat().st_size
    assert first.custom == {
        "name": "mlp",
        "version": "1.0.0",
        "runtime": "onnxruntime",
        "release": 1,
    }
    stored = repo.targets_dir / f"{digest}.mlp-1.0.0.efb"
    assert stored.read_bytes() == bundles["mlp-1"].read_bytes()

    second = repo.add_bundle(bundles["mlp-2"], keys["targets"])
    other = repo.add_bundle(bundles["small"], keys["targets"])
    assert second.custom["release"] == 2
    assert other.custom["release"] == 1  # the counter is per model
    targets = load(repo, "targets.json")
    assert isinstance(targets.signed, Targets)
    assert targets.signed.version == 4
    assert set(targets.signed.targets) == {"mlp-1.0.0.efb", "mlp-2.0.0.efb", "mlp-small-1.0.0.efb"}
    # Snapshot and timestamp follow every publish, and point at the exact bytes.
    snapshot = load(repo, "snapshot.json").signed
    assert isinstance(snapshot, Snapshot)
    snapshot.meta["targets.json"].verify_length_and_hashes(
        (repo.metadata_dir / "4.targets.json").read_bytes()
    )
    timestamp = load(repo, "timestamp.json").signed
    assert isinstance(timestamp, Timestamp)
    assert timestamp.snapshot_meta.version == snapshot.version == 4

    # The same bytes again change nothing; a reopened repository sees the same catalogue.
    assert repo.add_bundle(bundles["mlp-1"], keys["targets"]) == first
    reopened = ImageRepository.open(repo.directory, online(keys))
    assert reopened.targets()["mlp-1.0.0.efb"] == first
    assert load(repo, "targets.json").signed.version == 4


def test_a_published_version_cannot_be_replaced(
    repo: ImageRepository, keys: dict[str, list[Path]], bundles: dict[str, Path], tmp_path: Path
) -> None:
    from exporters.package import create_bundle
    from tests.models import mlp_onnx

    repo.add_bundle(bundles["mlp-1"], keys["targets"])
    impostor = tmp_path / "mlp-1.0.0.efb"
    create_bundle(mlp_onnx(tmp_path / "x.onnx", seed=9), name="mlp", version="1.0.0", out=impostor)
    with pytest.raises(RepositoryError, match="already published with other bytes") as e:
        repo.add_bundle(impostor, keys["targets"])
    assert e.value.reason == "exists"


def test_a_bundle_that_fails_verification_is_not_published(
    repo: ImageRepository, keys: dict[str, list[Path]], bundles: dict[str, Path], tmp_path: Path
) -> None:
    data = bytearray(bundles["mlp-1"].read_bytes())
    data[model_offset(bundles["mlp-1"])] ^= 0xFF
    broken = tmp_path / "mlp-1.0.0.efb"
    broken.write_bytes(bytes(data))
    with pytest.raises(RepositoryError, match=r"refusing to publish mlp-1\.0\.0\.efb") as e:
        repo.add_bundle(broken, keys["targets"])
    assert e.value.reason == "invalid_bundle"
    assert repo.targets() == {}
    assert list(repo.targets_dir.iterdir()) == []
    assert load(repo, "timestamp.json").signed.version == 1


def test_targets_threshold_two_refuses_one_signature(
    tmp_path: Path, bundles: dict[str, Path]
) -> None:
    keys = make_keys(tmp_path / "keys", targets=2)
    repo = ImageRepository.create(tmp_path / "repo", keys, thresholds={"targets": 2})
    with pytest.raises(RepositoryError, match="targets needs 2 signature") as e:
        repo.add_bundle(bundles["mlp-1"], keys["targets"][:1])
    assert e.value.reason == "threshold"
    assert repo.targets() == {}
    assert list(repo.targets_dir.iterdir()) == []
    info = repo.add_bundle(bundles["mlp-1"], keys["targets"])
    targets = load(repo, "targets.json")
    assert len(targets.signatures) == 2
    assert isinstance(targets.signed, Targets)
    assert info.path in targets.signed.targets
    root = load(repo, "root.json").signed
    assert isinstance(root, Root)
    root.verify_delegate("targets", targets.signed_bytes, targets.signatures)
    with pytest.raises(RepositoryError, match="threshold 3 for targets"):
        ImageRepository.create(tmp_path / "r3", keys, thresholds={"targets": 3})


def test_keys_that_are_not_the_roles_keys_are_refused(
    repo: ImageRepository, keys: dict[str, list[Path]], bundles: dict[str, Path]
) -> None:
    with pytest.raises(RepositoryError, match="not one of the targets keys") as e:
        repo.add_bundle(bundles["mlp-1"], keys["timestamp"])
    assert e.value.reason == "wrong_key"
    with pytest.raises(RepositoryError, match="not one of the timestamp keys"):
        ImageRepository.open(
            repo.directory, {"snapshot": keys["snapshot"], "timestamp": keys["root"]}
        )
    with pytest.raises(RepositoryError, match="not an image repository"):
        ImageRepository.open(repo.directory / "elsewhere", online(keys))


def test_refresh_timestamp_renews_only_when_close_to_expiry(repo: ImageRepository) -> None:
    before = load(repo, "timestamp.json").signed
    assert repo.refresh_timestamp() is False  # a fresh timestamp has a day left
    assert load(repo, "timestamp.json").signed.version == before.version
    assert repo.refresh_timestamp(if_expiring_within=timedelta(days=2)) is True
    after = load(repo, "timestamp.json").signed
    assert isinstance(after, Timestamp)
    assert after.version == before.version + 1
    assert after.snapshot_meta == before.snapshot_meta  # same snapshot, newer signature
    # Within the snapshot's window the snapshot is renewed too, and the timestamp follows it.
    assert repo.refresh_timestamp(if_expiring_within=timedelta(days=8)) is True
    latest = load(repo, "timestamp.json").signed
    assert isinstance(latest, Timestamp)
    assert latest.snapshot_meta.version == 2


def test_expiry_policy_persists_across_open(tmp_path: Path, keys: dict[str, list[Path]]) -> None:
    repo = ImageRepository.create(tmp_path / "r", keys, expiry={"timestamp": timedelta(hours=2)})
    reopened = ImageRepository.open(repo.directory, online(keys))
    assert reopened.refresh_timestamp(if_expiring_within=timedelta(hours=3)) is True
    expires = load(reopened, "timestamp.json").signed.expires
    assert expires - datetime.now(timezone.utc) <= timedelta(hours=2)
    with pytest.raises(RepositoryError, match="unknown role 'mirror'"):
        ImageRepository.create(tmp_path / "r2", keys, expiry={"mirror": timedelta(hours=1)})


def test_rotate_root_is_signed_by_old_and_new_keys(
    repo: ImageRepository, keys: dict[str, list[Path]], tmp_path: Path
) -> None:
    new = [tmp_path / "root-new.pem"]
    generate_key(new[0])
    with pytest.raises(RepositoryError, match="needs 1 signature") as e:
        repo.rotate_root(new, new)  # without the current root key
    assert e.value.reason == "threshold"
    assert not (repo.metadata_dir / "2.root.json").exists()

    assert repo.rotate_root(new, keys["root"]) == 2
    v1, v2 = load(repo, "1.root.json"), load(repo, "2.root.json")
    assert isinstance(v1.signed, Root) and isinstance(v2.signed, Root)
    v1.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)  # old keys signed it
    v2.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)  # and the new ones
    assert v2.signed.roles["root"].keyids == [load_signer(new[0]).public_key.keyid]
    assert repo.root_bytes() == repo.root_bytes(2)
    # The old root key is revoked: what it signs alone no longer verifies against version 2.
    forged = Metadata(Root.from_dict(copy.deepcopy(v2.signed.to_dict())))
    forged.signed.version = 3
    forged.sign(load_signer(keys["root"][0]))
    with pytest.raises(UnsignedMetadataError):
        v2.signed.verify_delegate("root", forged.signed_bytes, forged.signatures)
    with pytest.raises(RepositoryError, match="root version 7 does not exist"):
        repo.root_bytes(7)


# -- HTTP --------------------------------------------------------------------------------------


def test_http_serves_metadata_and_bundles_with_ranges(
    repo: ImageRepository, keys: dict[str, list[Path]], bundles: dict[str, Path]
) -> None:
    info = repo.add_bundle(bundles["mlp-1"], keys["targets"])
    data = bundles["mlp-1"].read_bytes()
    (repo.directory / "secret.txt").write_text("not for clients")
    with serve(trust_app(repo.directory)) as server, httpx.Client(base_url=server.url) as http:
        ts = http.get("/metadata/timestamp.json")
        assert ts.status_code == 200
        assert ts.content == (repo.metadata_dir / "timestamp.json").read_bytes()
        assert json.loads(ts.content)["signed"]["_type"] == "timestamp"
        url = f"/targets/{info.sha256}.{info.path}"
        whole = http.get(url)
        assert whole.status_code == 200 and whole.content == data
        part = http.get(url, headers={"Range": "bytes=100-"})
        assert part.status_code == 206
        assert part.headers["content-range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
        assert part.content == data[100:]
        middle = http.get(url, headers={"Range": "bytes=10-19"})
        assert middle.status_code == 206 and middle.content == data[10:20]
        past = http.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert past.status_code == 416
        assert past.headers["content-range"] == f"bytes */{len(data)}"
        head = http.head(url)
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == len(data)
        assert head.headers["accept-ranges"] == "bytes"
        for bad in (
            "/metadata/..%2Fsecret.txt",
            "/metadata/%2E%2E",
            "/targets/..",
            "/metadata/../secret.txt",
            "/targets/%2e%2e%2fsecret.txt",
            "/metadata/nope.json",
            "/metadata/.hidden.json",
        ):
            assert http.get(bad).status_code == 404, bad
        # A symbolic link inside the served folder is not followed.
        (repo.targets_dir / "link.efb").symlink_to(repo.directory / "secret.txt")
        assert http.get("/targets/link.efb").status_code == 404
        assert http.post("/metadata/timestamp.json").status_code == 405
