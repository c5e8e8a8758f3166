"""Signed updates end to end: a real agent, a real image repository over HTTP, a director key.

The good path installs and hot-swaps a new version while requests keep flowing. Every attack —
on the director's command, on the TUF metadata or on the bundle bytes — is refused with its
reason recorded, and the agent keeps answering with the version it already served.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from starlette.responses import Response, StreamingResponse
from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp

from agent.trust.state import TrustState
from agent.trust.tuf_client import ModelCatalogue
from agent.updates import LifecycleConfig, UpdateApplier, UpdateOutcome
from fleet.trust import ImageRepository, generate_key, load_signer, trust_app
from protocol.bundle import build_bundle, read_manifest
from protocol.director import DesiredState, ModelTarget, sign_desired
from protocol.manifest import GoldenCase, GoldenTest, TensorData
from tests.conftest import RunningAgent
from tests.fleet.test_repository import make_keys, serve
from tests.models import mlp_onnx
from tests.trust_support import Attacker

StartAgent = Callable[..., RunningAgent]
DEVICE = "camera-7"
ROW = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}


def target_of(bundle: Path) -> ModelTarget:
    """What the director names for a bundle: computed from its bytes, not from the catalogue."""
    manifest = read_manifest(bundle)
    data = bundle.read_bytes()
    return ModelTarget(
        name=manifest.name,
        version=manifest.version,
        target_path=f"{manifest.name}-{manifest.version}.efb",
        sha256=hashlib.sha256(data).hexdigest(),
        length=len(data),
    )


class Fleet:
    """The fleet's side: an image repository served behind an attacker, and the director key."""

    def __init__(self, tmp: Path, stack: ExitStack) -> None:
        self.keys = make_keys(tmp / "keys")
        self.repo = ImageRepository.create(tmp / "repo", self.keys)
        self.attacker = Attacker(trust_app(self.repo.directory))
        self.url = stack.enter_context(serve(self.attacker)).url
        self.director = Ed25519PrivateKey.generate()

    def publish(self, bundle: Path) -> None:
        self.repo.add_bundle(bundle, self.keys["targets"])

    def desired(
        self,
        seq: int,
        *models: ModelTarget,
        device_id: str = DEVICE,
        key: Ed25519PrivateKey | None = None,
        expires_in: timedelta = timedelta(hours=1),
    ) -> bytes:
        now = datetime.now(timezone.utc)
        state = DesiredState(
            device_id=device_id,
            seq=seq,
            issued=now + min(expires_in, timedelta(0)) - timedelta(minutes=1),
            expires=now + expires_in,
            rollout_id="r-1",
            models=models,
        )
        return sign_desired(state, key or self.director).to_json()

    def director_pem(self) -> bytes:
        return self.director.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
        )

    def serve_instead(self, path: str, body: bytes, status: int = 200) -> None:
        self.attacker.responses[path] = lambda _: Response(body, status_code=status)

    def bundle_url_path(self, path: str) -> str:
        return f"/targets/{self.repo.targets()[path].sha256}.{path}"


@dataclass
class Device:
    """A running agent with its trust state, its catalogue client and the update applier."""

    running: RunningAgent
    trust: TrustState
    catalogue: ModelCatalogue
    applier: UpdateApplier
    downloads: Path

    def apply(self, raw: bytes) -> UpdateOutcome:
        return self.running.call(self.applier.apply(raw))

    def version(self) -> str:
        with self.running.client() as http:
            response = http.post("/v2/models/mlp/infer", json=ROW)
        assert response.status_code == 200, response.text
        version: str = response.json()["model_version"]
        return version

    def status(self) -> dict[str, Any]:
        with self.running.client() as http:
            trust: dict[str, Any] = http.get("/status").json()["trust"]
        return trust


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with ExitStack() as stack:
        yield Fleet(tmp_path / "fleet", stack)


@pytest.fixture
def attach(fleet: Fleet) -> Iterator[Callable[[RunningAgent], Device]]:
    """Give a running agent its enrollment (director key, trusted root) and an applier."""
    catalogues: list[ModelCatalogue] = []

    def make(running: RunningAgent) -> Device:
        state_dir = running.settings.state_dir
        trust = TrustState.load(state_dir)
        if trust.device_id is None:
            trust.enroll(DEVICE, fleet.director_pem())
        catalogue = ModelCatalogue(
            state_dir / "trust" / "metadata",
            f"{fleet.url}/metadata",
            f"{fleet.url}/targets",
            fleet.repo.root_bytes(1),
            timeout=5,
        )
        catalogues.append(catalogue)
        downloads = state_dir / "downloads"
        # Probation is tested in tests/agent/test_update_lifecycle.py; a short one keeps this fast.
        config = LifecycleConfig(probation_s=0.2, refresh_deadline_s=5)
        applier = UpdateApplier(running.agent, trust, catalogue, downloads, config=config)
        return Device(running, trust, catalogue, applier, downloads)

    yield make
    for catalogue in catalogues:
        catalogue.close()


@pytest.fixture
def device(
    start_agent: StartAgent, attach: Callable[[RunningAgent], Device], bundles: dict[str, Path]
) -> Device:
    return attach(start_agent(bundles=[bundles["mlp-1"]]))


def assert_refused(outcome: UpdateOutcome, reason: str, device: Device, serving: str) -> None:
    assert (outcome.status, outcome.reason) == ("refused", reason), outcome.detail
    assert device.version() == serving
    assert device.status()["last_outcome"]["reason"] == reason


# -- the good path -----------------------------------------------------------------------------


def test_a_signed_update_is_applied_while_requests_keep_flowing(
    fleet: Fleet, device: Device, bundles: dict[str, Path]
) -> None:
    fleet.publish(bundles["mlp-1"])
    fleet.publish(bundles["mlp-2"])
    versions: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        with device.running.client() as http:
            while not stop.is_set():
                response = http.post("/v2/models/mlp/infer", json=ROW)
                if response.status_code == 200:
                    versions.append(response.json()["model_version"])
                else:
                    failures.append(f"{response.status_code}: {response.text}")

    client = threading.Thread(target=hammer, daemon=True)
    client.start()
    try:
        _wait_until(lambda: len(versions) >= 20)
        outcome = device.apply(fleet.desired(1, target_of(bundles["mlp-2"])))
        count = len(versions)
        _wait_until(lambda: len(versions) >= count + 20)
    finally:
        stop.set()
        client.join(10)
    assert (outcome.seq, outcome.status, outcome.reason) == (1, "committed", None), outcome.detail
    assert outcome.models == ("mlp@2.0.0",)
    assert failures == []
    assert versions[0] == "1.0.0" and versions[-1] == "2.0.0"
    assert device.version() == "2.0.0"
    status = device.status()
    assert status["status"] == "ok" and status["last_applied_seq"] == 1
    assert status["last_refresh"] is not None
    assert status["last_outcome"]["status"] == "committed"
    assert list(device.downloads.iterdir()) == []  # the store holds its own copy
    assert TrustState.load(device.running.settings.state_dir).last_applied_seq == 1

    # A newer document naming what already runs commits without downloading anything.
    requests = len(fleet.attacker.target_requests)
    again = device.apply(fleet.desired(2, target_of(bundles["mlp-2"])))
    assert again.status == "committed" and "already running" in again.detail
    assert len(fleet.attacker.target_requests) == requests
    assert device.trust.last_applied_seq == 2


def test_a_version_that_fails_its_self_test_is_not_installed(
    fleet: Fleet, device: Device, bundles: dict[str, Path], tmp_path: Path
) -> None:
    broken = _wrong_golden(bundles["mlp-2"], tmp_path / "broken", "3.0.0")
    fleet.publish(broken)
    outcome = device.apply(fleet.desired(1, target_of(broken)))
    assert (outcome.status, outcome.reason) == ("failed", "install_failed"), outcome.detail
    assert "mlp@3.0.0" in outcome.detail and "keeps serving" in outcome.detail
    assert device.version() == "1.0.0"
    status = device.status()
    assert status["last_applied_seq"] == 0 and status["last_outcome"]["status"] == "failed"


def test_a_download_folder_that_cannot_be_written_fails_cleanly(
    fleet: Fleet, device: Device, bundles: dict[str, Path], tmp_path: Path
) -> None:
    fleet.publish(bundles["mlp-2"])
    blocked = tmp_path / "not-a-folder"
    blocked.write_bytes(b"")
    applier = UpdateApplier(device.running.agent, device.trust, device.catalogue, blocked)
    outcome = device.running.call(applier.apply(fleet.desired(1, target_of(bundles["mlp-2"]))))
    assert (outcome.status, outcome.reason) == ("failed", "storage"), outcome.detail
    assert str(blocked) in outcome.detail
    assert device.version() == "1.0.0" and device.trust.last_applied_seq == 0


# -- the director's command --------------------------------------------------------------------


def _unsigned(fleet: Fleet, target: ModelTarget) -> bytes:
    signed = fleet.desired(1, target)
    return signed.replace(b'"signature"', b'"ignored"', 1)


DIRECTOR_ATTACKS: dict[str, tuple[str, Callable[[Fleet, ModelTarget], bytes]]] = {
    "unsigned": ("unsigned", _unsigned),
    "wrong director key": (
        "wrong_key",
        lambda fleet, t: fleet.desired(1, t, key=Ed25519PrivateKey.generate()),
    ),
    "another device's document": (
        "wrong_device",
        lambda fleet, t: fleet.desired(1, t, device_id="camera-8"),
    ),
    "expired document": (
        "expired",
        lambda fleet, t: fleet.desired(1, t, expires_in=timedelta(minutes=-5)),
    ),
    "altered after signing": (
        "bad_signature",
        lambda fleet, t: fleet.desired(1, t).replace(b'"seq":1', b'"seq":9', 1),
    ),
}


@pytest.mark.parametrize("attack", sorted(DIRECTOR_ATTACKS))
def test_a_bad_director_command_is_refused_before_any_download(
    attack: str, fleet: Fleet, device: Device, bundles: dict[str, Path]
) -> None:
    fleet.publish(bundles["mlp-2"])
    reason, make = DIRECTOR_ATTACKS[attack]
    outcome = device.apply(make(fleet, target_of(bundles["mlp-2"])))
    assert_refused(outcome, reason, device, serving="1.0.0")
    assert outcome.seq is None  # nothing of an unverified document is trusted
    assert fleet.attacker.target_requests == []
    assert device.trust.last_applied_seq == 0
    # The refusal leaves the device able to take the genuine document.
    good = device.apply(fleet.desired(1, target_of(bundles["mlp-2"])))
    assert good.status == "committed", good.detail
    assert device.version() == "2.0.0"


def test_a_replayed_older_document_cannot_downgrade(
    fleet: Fleet, device: Device, bundles: dict[str, Path]
) -> None:
    fleet.publish(bundles["mlp-1"])
    fleet.publish(bundles["mlp-2"])
    old = fleet.desired(1, target_of(bundles["mlp-1"]))
    assert device.apply(fleet.desired(2, target_of(bundles["mlp-2"]))).status == "committed"
    outcome = device.apply(old)
    assert_refused(outcome, "replayed", device, serving="2.0.0")
    assert device.trust.last_applied_seq == 2


def test_the_last_applied_seq_survives_a_restart(
    fleet: Fleet,
    start_agent: StartAgent,
    attach: Callable[[RunningAgent], Device],
    bundles: dict[str, Path],
    tmp_path: Path,
) -> None:
    fleet.publish(bundles["mlp-2"])
    first = attach(start_agent(bundles=[bundles["mlp-1"]]))
    document = fleet.desired(1, target_of(bundles["mlp-2"]))
    assert first.apply(document).status == "committed"
    first.running.stop()

    # A new process: the store serves what was committed, the trust state comes from disk.
    second = attach(start_agent(socket=tmp_path / "b.sock"))
    assert second.version() == "2.0.0"
    assert second.status()["last_applied_seq"] == 1
    assert_refused(second.apply(document), "replayed", second, serving="2.0.0")


# -- the catalogue and the bundle bytes --------------------------------------------------------


def test_tampered_bundle_bytes_are_refused(
    fleet: Fleet, device: Device, bundles: dict[str, Path]
) -> None:
    fleet.publish(bundles["mlp-2"])
    target = target_of(bundles["mlp-2"])
    data = bytearray(bundles["mlp-2"].read_bytes())
    data[len(data) // 2] ^= 0x01
    fleet.serve_instead(fleet.bundle_url_path(target.target_path), bytes(data))
    outcome = device.apply(fleet.desired(1, target))
    assert_refused(outcome, "hash_mismatch", device, serving="1.0.0")
    assert list(device.downloads.iterdir()) == []  # bad bytes are deleted, never installed
    assert device.running.agent.store.versions("mlp") == ["1.0.0"]


def test_a_bundle_larger_than_declared_is_cut_off(
    fleet: Fleet, device: Device, bundles: dict[str, Path]
) -> None:
    fleet.publish(bundles["mlp-2"])
    target = target_of(bundles["mlp-2"])
    genuine = bundles["mlp-2"].read_bytes()

    async def endless() -> AsyncIterator[bytes]:
        # The genuine bytes, then more: bounded so that the server's thread always ends.
        yield genuine
        for _ in range(4096):
            yield b"\0" * 65536

    fleet.attacker.responses[fleet.bundle_url_path(target.target_path)] = lambda _: (
        StreamingResponse(endless())
    )
    outcome = device.apply(fleet.desired(1, target))
    assert_refused(outcome, "too_large", device, serving="1.0.0")
    assert f"more than the {target.length} bytes" in outcome.detail
    assert list(device.downloads.iterdir()) == []


def test_a_target_not_in_the_catalogue_is_refused(
    fleet: Fleet, device: Device, bundles: dict[str, Path]
) -> None:
    fleet.publish(bundles["mlp-1"])  # 2.0.0 was never published
    outcome = device.apply(fleet.desired(1, target_of(bundles["mlp-2"])))
    assert_refused(outcome, "unknown_target", device, serving="1.0.0")
    assert fleet.attacker.target_requests == []


def test_a_document_whose_hash_differs_from_the_catalogue_is_refused(
    fleet: Fleet, device: Device, bundles: dict[str, Path]
) -> None:
    fleet.publish(bundles["mlp-2"])
    genuine = target_of(bundles["mlp-2"])
    other = target_of(bundles["small"])
    forged = genuine.model_copy(update={"sha256": other.sha256, "length": other.length})
    outcome = device.apply(fleet.desired(1, forged))
    assert_refused(outcome, "target_mismatch", device, serving="1.0.0")
    assert other.sha256 in outcome.detail and genuine.sha256 in outcome.detail
    assert fleet.attacker.target_requests == []
    # The same path under another model's name is refused too.
    renamed = genuine.model_copy(update={"name": "mlp-small"})
    outcome = device.apply(fleet.desired(1, renamed))
    assert_refused(outcome, "target_mismatch", device, serving="1.0.0")


def test_a_rollback_of_the_metadata_is_refused_and_reported_stale(
    fleet: Fleet, device: Device, bundles: dict[str, Path]
) -> None:
    fleet.publish(bundles["mlp-1"])
    old_timestamp = (fleet.repo.metadata_dir / "timestamp.json").read_bytes()
    fleet.publish(bundles["mlp-2"])
    device.catalogue.refresh()  # the device has seen the newer metadata
    fleet.serve_instead("/metadata/timestamp.json", old_timestamp)
    outcome = device.apply(fleet.desired(1, target_of(bundles["mlp-2"])))
    assert_refused(outcome, "trust_stale", device, serving="1.0.0")
    assert "(rollback)" in outcome.detail
    status = device.status()
    assert (status["status"], status["reason"]) == ("trust_stale", "rollback")
    assert fleet.attacker.target_requests == []


def test_targets_signed_by_a_revoked_key_are_refused(
    fleet: Fleet, device: Device, bundles: dict[str, Path], tmp_path: Path
) -> None:
    fleet.publish(bundles["mlp-1"])
    device.catalogue.refresh()
    revoked = fleet.keys["targets"][0]
    successor = tmp_path / "targets-2.pem"
    generate_key(successor)
    _rotate_targets_key(fleet, successor)

    # Whoever kept the revoked key (and reached the online keys) lists 2.0.0 under it.
    listed = TargetFile.from_file("mlp-2.0.0.efb", str(bundles["mlp-2"]), ["sha256"])
    forged = _forge_targets(fleet, revoked, listed)
    for path, body in forged.items():
        fleet.serve_instead(path, body)
    outcome = device.apply(fleet.desired(1, target_of(bundles["mlp-2"])))
    assert_refused(outcome, "trust_stale", device, serving="1.0.0")
    assert "(bad_signature)" in outcome.detail and "targets" in outcome.detail
    assert device.status()["reason"] == "bad_signature"
    assert fleet.attacker.target_requests == []

    # The genuine repository publishes with the successor key, past the versions the device
    # accepted from the forger's validly signed timestamp and snapshot; the same request works.
    fleet.attacker.responses.clear()
    fleet.repo.add_bundle(bundles["mlp-2"], [successor])
    assert fleet.repo.refresh_timestamp(if_expiring_within=timedelta(days=30))
    outcome = device.apply(fleet.desired(1, target_of(bundles["mlp-2"])))
    assert outcome.status == "committed", outcome.detail
    assert device.version() == "2.0.0"
    assert device.status()["status"] == "ok"


def test_an_unreachable_repository_leaves_the_device_serving_and_stale(
    fleet: Fleet, device: Device, bundles: dict[str, Path]
) -> None:
    fleet.publish(bundles["mlp-2"])
    document = fleet.desired(1, target_of(bundles["mlp-2"]))
    # The repository is down behind its load balancer.
    fleet.serve_instead("/metadata/timestamp.json", b"unavailable", status=503)
    outcome = device.apply(document)
    assert_refused(outcome, "trust_stale", device, serving="1.0.0")
    assert "(unreachable)" in outcome.detail
    status = device.status()
    assert (status["status"], status["reason"]) == ("trust_stale", "unreachable")
    assert status["last_outcome"]["seq"] == 1 and status["last_applied_seq"] == 0
    assert TrustState.load(device.running.settings.state_dir).status == "trust_stale"

    # Back online: the same document (never applied) goes through and clears the status.
    del fleet.attacker.responses["/metadata/timestamp.json"]
    outcome = device.apply(document)
    assert outcome.status == "committed", outcome.detail


def test_a_download_cut_off_by_a_restarting_server_is_resumed(
    fleet: Fleet, device: Device, bundles: dict[str, Path]
) -> None:
    fleet.publish(bundles["mlp-2"])
    target = target_of(bundles["mlp-2"])
    path = fleet.bundle_url_path(target.target_path)
    fleet.serve_instead(path, b"restarting", status=503)
    back = threading.Timer(0.5, fleet.attacker.responses.pop, (path,))
    back.start()
    try:
        outcome = device.apply(fleet.desired(1, target))
    finally:
        back.join()
    assert outcome.status == "committed", outcome.detail
    assert device.version() == "2.0.0"


def test_a_repository_that_comes_back_within_the_refresh_deadline_is_retried(
    fleet: Fleet, device: Device, bundles: dict[str, Path]
) -> None:
    fleet.publish(bundles["mlp-2"])
    document = fleet.desired(1, target_of(bundles["mlp-2"]))
    fleet.serve_instead("/metadata/timestamp.json", b"restarting", status=503)
    # The fleet's metadata server is back half a second later (a restart, a network blip).
    back = threading.Timer(0.5, fleet.attacker.responses.pop, ("/metadata/timestamp.json",))
    back.start()
    try:
        outcome = device.apply(document)
    finally:
        back.join()
    assert outcome.status == "committed", outcome.detail
    assert device.version() == "2.0.0"
    assert device.status()["status"] == "ok"
    assert device.version() == "2.0.0"
    status = device.status()
    assert (status["status"], status["reason"]) == ("ok", None)


# -- helpers -----------------------------------------------------------------------------------


def _wait_until(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _wrong_golden(bundle: Path, folder: Path, version: str) -> Path:
    """The bundle as a new version whose golden outputs no device can reproduce."""
    folder.mkdir()
    manifest = read_manifest(bundle)
    cases = tuple(
        GoldenCase(
            inputs=case.inputs,
            outputs={n: TensorData.from_array(t.to_array() + 7) for n, t in case.outputs.items()},
        )
        for case in manifest.golden.cases
    )
    manifest = manifest.model_copy(update={"version": version, "golden": GoldenTest(cases=cases)})
    model = mlp_onnx(folder / manifest.model_file, seed=2)
    out = folder / f"mlp-{version}.efb"
    build_bundle(manifest, {manifest.model_file: model}, out)
    return out


def _rotate_targets_key(fleet: Fleet, successor: Path) -> None:
    """A new root version (signed by the root key) that trusts ``successor`` for targets only;
    the genuine targets metadata is re-signed with it."""
    fleet.repo.rotate_role(Targets.type, [successor], fleet.keys["root"])


def _forge_targets(fleet: Fleet, targets_key: Path, extra: TargetFile) -> dict[str, bytes]:
    """Targets signed by ``targets_key`` with a snapshot and timestamp signed by the online keys,
    as URL path -> body (the repository on disk is left as it was)."""
    meta = fleet.repo.metadata_dir
    targets = Metadata[Targets].from_bytes((meta / "targets.json").read_bytes())
    targets.signed.targets[extra.path] = extra
    targets.signed.version += 1
    targets.sign(load_signer(targets_key))
    targets_data = targets.to_bytes()
    snapshot = Metadata[Snapshot].from_bytes((meta / "snapshot.json").read_bytes())
    snapshot.signed.version += 1
    snapshot.signed.meta["targets.json"] = MetaFile.from_data(
        targets.signed.version, targets_data, ["sha256"]
    )
    snapshot.sign(load_signer(fleet.keys["snapshot"][0]))
    snapshot_data = snapshot.to_bytes()
    timestamp = Metadata[Timestamp].from_bytes((meta / "timestamp.json").read_bytes())
    timestamp.signed.version += 1
    timestamp.signed.snapshot_meta = MetaFile.from_data(
        snapshot.signed.version, snapshot_data, ["sha256"]
    )
    timestamp.sign(load_signer(fleet.keys["timestamp"][0]))
    return {
        f"/metadata/{targets.signed.version}.targets.json": targets_data,
        f"/metadata/{snapshot.signed.version}.snapshot.json": snapshot_data,
        "/metadata/timestamp.json": timestamp.to_bytes(),
    }
