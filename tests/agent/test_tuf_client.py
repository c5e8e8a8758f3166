"""The agent's model catalogue against a real image repository served by a real uvicorn.

Each attack is played by a small ASGI layer in front of the repository's app that serves what
an attacker controlling the network (or the server) would: old, expired, mixed, forged,
tampered or endless bytes. Every one must end in :class:`TrustError` with a reason, with no
bad bytes left where they could be installed.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.responses import Response, StreamingResponse
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from agent.trust import ModelCatalogue, TrustError
from agent.trust.download import download
from fleet.trust import ImageRepository, generate_key, load_signer, trust_app
from tests.fleet.test_repository import Scope, make_keys, serve
from tests.trust_support import Attacker

MLP = "mlp-1.0.0.efb"


class World:
    """A repository with its keys, served over HTTP behind an attacker, and devices to ask it."""

    def __init__(self, tmp: Path, stack: ExitStack, **create: Any) -> None:
        self.tmp = tmp
        self.keys = make_keys(tmp / "keys", **create.pop("key_counts", {}))
        self.repo = ImageRepository.create(tmp / "repo", self.keys, **create)
        self.attacker = Attacker(trust_app(self.repo.directory))
        self.url = stack.enter_context(serve(self.attacker)).url
        self._stack = stack

    def device(self, name: str = "device", root: bytes | None = None) -> ModelCatalogue:
        catalogue = ModelCatalogue(
            self.tmp / name / "metadata",
            f"{self.url}/metadata",
            f"{self.url}/targets",
            self.repo.root_bytes(1) if root is None else root,
            timeout=5,
        )
        self._stack.callback(catalogue.close)
        return catalogue

    def publish(self, key: str, bundles: dict[str, Path]) -> Any:
        return self.repo.add_bundle(bundles[key], self.keys["targets"])

    def metadata(self, name: str) -> bytes:
        return (self.repo.metadata_dir / name).read_bytes()

    def serve_instead(self, path: str, body: bytes, status: int = 200) -> None:
        self.attacker.responses[path] = lambda _: Response(body, status_code=status)

    def bundle_url_path(self, path: str) -> str:
        info = self.repo.targets()[path]
        return f"/targets/{info.sha256}.{path}"


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator[Callable[..., World]]:
    with ExitStack() as stack:
        count = iter(range(100))
        yield lambda **create: World(tmp_path / f"w{next(count)}", stack, **create)


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    return make_world()


def refused(reason: str, call: Callable[[], object]) -> TrustError:
    with pytest.raises(TrustError) as e:
        call()
    assert e.value.reason == reason, str(e.value)
    return e.value


# -- the normal path ---------------------------------------------------------------------------


def test_publish_refresh_fetch(world: World, bundles: dict[str, Path], tmp_path: Path) -> None:
    published = world.publish("mlp-1", bundles)
    device = world.device()
    device.refresh()
    target = device.target(MLP)
    assert (target.path, target.length, target.sha256) == (
        published.path,
        published.length,
        published.sha256,
    )
    assert target.custom == {"name": "mlp", "version": "1.0.0", "runtime": "onnxruntime",
                             "release": 1}  # fmt: skip
    seen: list[tuple[int, int]] = []
    staging = tmp_path / "staging"
    path = device.fetch(MLP, staging, progress=lambda done, total: seen.append((done, total)))
    assert path == staging / MLP
    assert path.read_bytes() == bundles["mlp-1"].read_bytes()
    assert seen[-1] == (target.length, target.length)
    assert [p.name for p in staging.iterdir()] == [MLP]
    # A verified file already in place is not downloaded again.
    requests = len(world.attacker.target_requests)
    assert device.fetch(MLP, staging) == path
    assert len(world.attacker.target_requests) == requests
    # The catalogue follows new publications on the next refresh.
    world.publish("mlp-2", bundles)
    refused("unknown_target", lambda: device.target("mlp-2.0.0.efb"))  # not refreshed yet
    device.refresh()
    assert device.target("mlp-2.0.0.efb").custom["release"] == 2


def test_fetch_resumes_an_interrupted_download(
    world: World, bundles: dict[str, Path], tmp_path: Path
) -> None:
    world.publish("mlp-1", bundles)
    data = bundles["mlp-1"].read_bytes()
    half = len(data) // 2
    url_path = world.bundle_url_path(MLP)
    world.serve_instead(url_path, data[:half])  # the connection "drops" halfway
    device = world.device()
    refused("download_failed", lambda: device.fetch(MLP, tmp_path / "staging"))
    assert not (tmp_path / "staging" / MLP).exists()  # unverified bytes never take the name

    del world.attacker.responses[url_path]
    seen: list[int] = []
    path = device.fetch(MLP, tmp_path / "staging", progress=lambda done, _: seen.append(done))
    assert path.read_bytes() == data
    assert world.attacker.target_requests[-1] == f"bytes={half}-"
    assert min(seen) > half  # only the missing half travelled
    assert [p.name for p in (tmp_path / "staging").iterdir()] == [MLP]


def test_download_resumes_from_a_half_written_part(
    world: World, bundles: dict[str, Path], tmp_path: Path
) -> None:
    info = world.publish("mlp-1", bundles)
    data = bundles["mlp-1"].read_bytes()
    url = world.url + world.bundle_url_path(MLP)
    dest = tmp_path / "dl" / "b.efb"
    dest.parent.mkdir()
    (dest.parent / "b.efb.part").write_bytes(data[:1000])
    assert download(url, dest, expected_length=info.length).read_bytes() == data
    assert world.attacker.target_requests == ["bytes=1000-"]
    assert not (dest.parent / "b.efb.part").exists()

    # A .part longer than the file cannot be a prefix of it: it is dropped, not trusted.
    (dest.parent / "c.efb.part").write_bytes(b"x" * (len(data) + 5))
    assert download(url, dest.parent / "c.efb", expected_length=len(data)).read_bytes() == data
    assert world.attacker.target_requests[-1] is None
    # A server that ignores Range (200 with the whole file) still gives the right bytes.
    world.serve_instead(world.bundle_url_path(MLP), data)
    (dest.parent / "d.efb.part").write_bytes(data[:10])
    assert download(url, dest.parent / "d.efb", expected_length=len(data)).read_bytes() == data


def test_download_restarts_when_the_server_refuses_the_resume(
    world: World, bundles: dict[str, Path], tmp_path: Path
) -> None:
    data = bundles["mlp-1"].read_bytes()
    url_path = "/targets/x.efb"

    def refuse_ranges(scope: Scope) -> Response:
        if any(name == b"range" for name, _ in scope["headers"]):
            return Response(b"", status_code=416, headers={"Content-Range": f"bytes */{len(data)}"})
        return Response(data)

    world.attacker.responses[url_path] = refuse_ranges
    dest = tmp_path / "x.efb"
    (tmp_path / "x.efb.part").write_bytes(b"stale bytes")
    assert download(world.url + url_path, dest, expected_length=len(data)).read_bytes() == data
    assert world.attacker.target_requests == ["bytes=11-", None]

    # A 206 that does not start where the resume asked is refused, not spliced in.
    world.attacker.responses[url_path] = lambda _: Response(
        data[:5], status_code=206, headers={"Content-Range": f"bytes 0-4/{len(data)}"}
    )
    (tmp_path / "y.efb.part").write_bytes(data[:100])
    error = refused(
        "download_failed",
        lambda: download(world.url + url_path, tmp_path / "y.efb", expected_length=len(data)),
    )
    assert "resume from byte 100" in str(error)


# -- the TUF attack suite ----------------------------------------------------------------------


def test_rollback_of_metadata_versions_is_refused(world: World, bundles: dict[str, Path]) -> None:
    world.publish("mlp-1", bundles)
    device = world.device()
    device.refresh()
    old_timestamp = world.metadata("timestamp.json")
    world.publish("mlp-2", bundles)
    device.refresh()
    world.serve_instead("/metadata/timestamp.json", old_timestamp)
    error = refused("rollback", device.refresh)
    assert "older metadata" in str(error)
    # The refusal does not depend on this process: a restarted agent refuses too.
    restarted = ModelCatalogue(
        device.metadata_dir, device.metadata_url, device.targets_url, world.repo.root_bytes(1)
    )
    try:
        refused("rollback", restarted.refresh)
    finally:
        restarted.close()


def test_an_old_timestamp_is_valid_for_a_device_that_never_saw_newer(
    world: World, bundles: dict[str, Path]
) -> None:
    """Control for the rollback test: the refusal comes from what the device remembers."""
    world.publish("mlp-1", bundles)
    old_timestamp = world.metadata("timestamp.json")
    world.publish("mlp-2", bundles)
    world.serve_instead("/metadata/timestamp.json", old_timestamp)
    device = world.device()
    device.refresh()
    refused("unknown_target", lambda: device.target("mlp-2.0.0.efb"))


def test_expired_metadata_is_refused(
    make_world: Callable[..., World], bundles: dict[str, Path]
) -> None:
    # A repository whose timestamp expired an hour ago and was never renewed (a freeze).
    frozen = make_world(expiry={"timestamp": timedelta(hours=-1)})
    frozen.publish("mlp-1", bundles)
    error = refused("expired", frozen.device().refresh)
    assert "timestamp.json is expired" in str(error)
    assert frozen.repo.refresh_timestamp() is True  # the repository knows it is due


def test_mix_and_match_of_metadata_is_refused(world: World, bundles: dict[str, Path]) -> None:
    world.publish("mlp-1", bundles)  # targets and snapshot version 2
    world.publish("mlp-2", bundles)  # version 3
    # Targets from one state under the name of another: the snapshot's hash does not match.
    world.serve_instead("/metadata/3.targets.json", world.metadata("2.targets.json"))
    refused("inconsistent", world.device("a").refresh)
    del world.attacker.responses["/metadata/3.targets.json"]
    # A snapshot from the earlier state with the current timestamp.
    world.serve_instead("/metadata/3.snapshot.json", world.metadata("2.snapshot.json"))
    refused("inconsistent", world.device("b").refresh)
    del world.attacker.responses["/metadata/3.snapshot.json"]
    world.device("c").refresh()  # control: the untouched repository verifies


def test_tampered_bundle_bytes_are_deleted(
    world: World, bundles: dict[str, Path], tmp_path: Path
) -> None:
    world.publish("mlp-1", bundles)
    data = bytearray(bundles["mlp-1"].read_bytes())
    data[len(data) // 3] ^= 0x01
    world.serve_instead(world.bundle_url_path(MLP), bytes(data))
    staging = tmp_path / "staging"
    error = refused("hash_mismatch", lambda: world.device().fetch(MLP, staging))
    assert MLP in str(error)
    assert list(staging.iterdir()) == []


def test_a_bundle_larger_than_declared_is_cut_off(
    world: World, bundles: dict[str, Path], tmp_path: Path
) -> None:
    info = world.publish("mlp-1", bundles)
    genuine = bundles["mlp-1"].read_bytes()

    async def endless() -> AsyncIterator[bytes]:
        # The genuine bytes, then more and more: 256 MiB is "endless" next to a few kB, and
        # bounded so that the server's thread always ends.
        yield genuine
        for _ in range(4096):
            yield b"\0" * 65536

    world.attacker.responses[world.bundle_url_path(MLP)] = lambda _: StreamingResponse(endless())
    staging = tmp_path / "staging"
    error = refused("too_large", lambda: world.device().fetch(MLP, staging))
    assert f"more than the {info.length} bytes" in str(error)
    assert list(staging.iterdir()) == []  # neither a .part nor a file under the bundle's name


def test_a_target_not_in_the_catalogue_is_refused(
    world: World, bundles: dict[str, Path], tmp_path: Path
) -> None:
    world.publish("mlp-1", bundles)
    device = world.device()
    refused("unknown_target", lambda: device.target("ghost-1.0.0.efb"))
    refused("unknown_target", lambda: device.fetch("ghost-1.0.0.efb", tmp_path / "s"))
    refused("unknown_target", lambda: device.fetch("../" + MLP, tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_root_rotation_is_followed_and_a_revoked_key_is_refused(
    world: World, bundles: dict[str, Path], tmp_path: Path
) -> None:
    world.publish("mlp-1", bundles)
    device = world.device()  # trusts only 1.root.json, from enrollment
    device.refresh()
    new_root = tmp_path / "root-new.pem"
    generate_key(new_root)
    assert world.repo.rotate_root([new_root], world.keys["root"]) == 2
    world.publish("mlp-2", bundles)
    device.refresh()
    assert (device.metadata_dir / "root.json").read_bytes() == world.repo.root_bytes(2)
    assert (
        device.fetch("mlp-2.0.0.efb", tmp_path / "s").read_bytes() == bundles["mlp-2"].read_bytes()
    )

    # Whoever still holds the revoked root key signs a root version 3 that trusts their key.
    v2 = Metadata[Root].from_bytes(world.repo.root_bytes(2))
    forged = Metadata(Root.from_dict(copy.deepcopy(v2.signed.to_dict())))
    forged.signed.version = 3
    attacker_key = tmp_path / "attacker.pem"
    forged.signed.add_key(generate_key(attacker_key), "targets")
    forged.sign(load_signer(world.keys["root"][0]))
    world.serve_instead("/metadata/3.root.json", forged.to_bytes())
    error = refused("bad_signature", device.refresh)
    assert "root" in str(error)
    refused("bad_signature", world.device("fresh").refresh)  # from 1.root.json as well
    assert not (device.metadata_dir / "root_history" / "3.root.json").exists()


def _republish_targets(world: World, signers: list[Path], extra: TargetFile) -> None:
    """What a holder of the given targets keys (and the online keys) could publish."""
    meta = world.repo.metadata_dir
    targets: Metadata[Targets] = Metadata.from_bytes(world.metadata("targets.json"))
    targets.signed.targets[extra.path] = extra
    targets.signed.version += 1
    targets.signatures.clear()
    for key in signers:
        targets.sign(load_signer(key), append=True)
    data = targets.to_bytes()
    (meta / "targets.json").write_bytes(data)
    (meta / f"{targets.signed.version}.targets.json").write_bytes(data)
    snapshot: Metadata[Snapshot] = Metadata.from_bytes(world.metadata("snapshot.json"))
    snapshot.signed.version += 1
    snapshot.signed.meta["targets.json"] = MetaFile.from_data(
        targets.signed.version, data, ["sha256"]
    )
    snapshot.sign(load_signer(world.keys["snapshot"][0]))
    data = snapshot.to_bytes()
    (meta / "snapshot.json").write_bytes(data)
    (meta / f"{snapshot.signed.version}.snapshot.json").write_bytes(data)
    timestamp: Metadata[Timestamp] = Metadata.from_bytes(world.metadata("timestamp.json"))
    timestamp.signed.version += 1
    timestamp.signed.snapshot_meta = MetaFile.from_data(snapshot.signed.version, data, ["sha256"])
    timestamp.sign(load_signer(world.keys["timestamp"][0]))
    (meta / "timestamp.json").write_bytes(timestamp.to_bytes())


def test_targets_threshold_two_refuses_one_signature(
    make_world: Callable[..., World], bundles: dict[str, Path], tmp_path: Path
) -> None:
    world = make_world(key_counts={"targets": 2}, thresholds={"targets": 2})
    world.publish("mlp-1", bundles)
    device = world.device()
    assert device.fetch(MLP, tmp_path / "s").read_bytes() == bundles["mlp-1"].read_bytes()
    # Control: both targets keys make a catalogue the device accepts.
    _republish_targets(world, world.keys["targets"], TargetFile.from_data("a-1.0.0.efb", b"a"))
    device.refresh()
    assert device.target("a-1.0.0.efb").length == 1
    # One targets key alone is below the threshold.
    _republish_targets(world, world.keys["targets"][:1], TargetFile.from_data("b-1.0.0.efb", b"b"))
    error = refused("bad_signature", device.refresh)
    assert "targets" in str(error)


def test_an_unreachable_repository_is_reported(tmp_path: Path, world: World) -> None:
    device = ModelCatalogue(
        tmp_path / "m", "http://127.0.0.1:9/metadata", "http://127.0.0.1:9/targets",
        world.repo.root_bytes(), timeout=2,
    )  # fmt: skip
    try:
        refused("unreachable", device.refresh)
    finally:
        device.close()
    garbage = ModelCatalogue(tmp_path / "g", world.url, world.url, b"{not json")
    try:
        refused("invalid_root", garbage.refresh)
    finally:
        garbage.close()


def test_client_side_http_errors_name_the_problem(world: World, tmp_path: Path) -> None:
    with httpx.Client() as client:
        error = refused(
            "download_failed",
            lambda: download(f"{world.url}/targets/nothing.efb", tmp_path / "x", expected_length=3,
                             client=client),
        )  # fmt: skip
    assert "HTTP 404" in str(error)
