"""``edgefleet fleet`` and ``edgefleet agent enroll`` as an operator and a device use them:
keys in temporary homes, a real trust service process, real enrollment processes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from cryptography.x509.oid import NameOID
from tuf.api.metadata import Metadata

from agent.trust import ModelCatalogue, TrustError
from agent.trust.enrollment import enroll_device, identity_dir, open_catalogue
from agent.trust.identity import create_device_key, make_csr
from agent.trust.state import TrustState
from edgefleet.cli import cli
from fleet.trust import ROLES, generate_key, public_key, trust_app
from fleet.trust.ca import DeviceCA
from fleet.trust.enroll import EnrollmentTokens
from fleet.trust.enroll_http import director_public_pem, fleet_trust_app, open_repository
from fleet.trust.settings import FleetTrustSettings
from protocol.director import director_keyid
from tests.fleet.test_repository import serve

EDGEFLEET = [sys.executable, "-c", "from edgefleet.cli import main; main()"]


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["fleet", "--home", str(home), *args])


@pytest.fixture
def home(tmp_path: Path) -> Path:
    result = run(tmp_path / "home", "keys", "init")
    assert result.exit_code == 0, result.output
    return tmp_path / "home"


@pytest.fixture
def settings(home: Path) -> FleetTrustSettings:
    return FleetTrustSettings(home=home)


def _metadata(settings: FleetTrustSettings, name: str) -> Metadata[Any]:
    return Metadata.from_bytes((settings.repository_dir / "metadata" / name).read_bytes())


# -- settings ----------------------------------------------------------------------------------


def test_settings_derive_paths_and_the_url_devices_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFLEET_FLEET_PORT", "9000")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    settings = FleetTrustSettings()
    assert settings.home == tmp_path / "xdg" / "edgefleet" / "fleet"
    assert settings.public_url == "http://127.0.0.1:9000"
    assert settings.metadata_url == "http://127.0.0.1:9000/metadata/"
    assert settings.key_path("root") == settings.home / "keys" / "root.pem"
    explicit = FleetTrustSettings(public_url="https://fleet.example.com/")
    assert explicit.targets_url == "https://fleet.example.com/targets/"
    with pytest.raises(ValueError, match="broker_url"):
        FleetTrustSettings(broker_url="http://broker")


# -- keys init / show --------------------------------------------------------------------------


def test_keys_init_creates_every_key_and_says_which_go_offline(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = run(home, "keys", "init", "--broker-host", "mqtt.example.com")
    assert result.exit_code == 0, result.output
    settings = FleetTrustSettings(home=home)
    for path in [*(settings.key_path(r) for r in ROLES), settings.director_key]:
        assert path.stat().st_mode & 0o777 == 0o600, path
    root = _metadata(settings, "root.json").signed
    for role in ROLES:
        assert root.roles[role].keyids == [public_key(settings.key_path(role)).keyid]
    ca = DeviceCA.open(settings.ca_dir)
    assert (settings.broker_dir / "ca.pem").read_bytes() == ca.chain_pem()
    broker = x509.load_pem_x509_certificate((settings.broker_dir / "broker.pem").read_bytes())
    broker.verify_directly_issued_by(ca.certificate)
    names = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "mqtt.example.com" in names.get_values_for_type(x509.DNSName)
    assert x509.load_pem_x509_crl(settings.crl_path.read_bytes()).is_signature_valid(
        ca.certificate.public_key()  # type: ignore[arg-type]
    )
    offline, online = result.output.split("ONLINE keys")
    offline = offline.split("OFFLINE keys")[1]
    assert str(settings.key_path("root")) in offline
    assert str(settings.key_path("targets")) in offline
    for path in (settings.key_path("snapshot"), settings.key_path("timestamp")):
        assert str(path) in online and str(path) not in offline
    assert str(settings.director_key) in online

    before = settings.key_path("root").read_bytes()
    again = run(home, "keys", "init")
    assert again.exit_code == 1
    assert "already initialised" in again.output and "keys rotate" in again.output
    assert settings.key_path("root").read_bytes() == before


def test_keys_show_lists_roles_and_flags_offline_keys_left_on_the_host(
    settings: FleetTrustSettings, tmp_path: Path
) -> None:
    result = run(settings.home, "keys", "show", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["role"]: row for row in json.loads(result.output)}
    assert set(rows) == {*ROLES, "director", "device CA"}
    for role in ROLES:
        key = rows[role]["keys"][0]
        assert key["keyid"] == public_key(settings.key_path(role)).keyid
        assert key["file"] == str(settings.key_path(role))
        assert rows[role]["threshold"] == "1 of 1"
        assert rows[role]["online"] is (role in ("snapshot", "timestamp"))
        expires = _metadata(settings, f"{role}.json").signed.expires
        assert rows[role]["expires"] == expires.isoformat()
    assert rows["root"]["keys"][0]["exposed"] and rows["targets"]["keys"][0]["exposed"]
    assert not rows["snapshot"]["keys"][0]["exposed"]
    director = load_pem_public_key(director_public_pem(settings.director_key))
    assert rows["director"]["keys"][0]["keyid"] == director_keyid(director)  # type: ignore[arg-type]

    # The operator moves the targets key to offline media: not on this host any more.
    offline = tmp_path / "usb"
    offline.mkdir()
    shutil.move(settings.key_path("targets"), offline / "targets.pem")
    text = run(settings.home, "keys", "show")
    assert text.exit_code == 0, text.output
    targets_line = next(
        line for line in text.output.splitlines() if rows["targets"]["keys"][0]["keyid"] in line
    )
    assert "not on this host" in targets_line
    root_line = next(
        line for line in text.output.splitlines() if rows["root"]["keys"][0]["keyid"] in line
    )
    assert "move it off" in root_line
    mounted = run(settings.home, "keys", "show", "--key-dir", str(offline), "--json")
    targets = next(r for r in json.loads(mounted.output) if r["role"] == "targets")
    assert targets["keys"][0] == {
        "keyid": rows["targets"]["keys"][0]["keyid"],
        "file": str(offline / "targets.pem"),
        "exposed": False,
    }


def test_keys_show_without_a_repository_says_what_to_run(tmp_path: Path) -> None:
    result = run(tmp_path / "empty", "keys", "show")
    assert result.exit_code == 1
    assert "edgefleet fleet keys init" in result.output


# -- publish, enroll-token, revoke -------------------------------------------------------------


def test_publish_needs_the_targets_key(
    settings: FleetTrustSettings, bundles: dict[str, Path]
) -> None:
    bundle = bundles["mlp-1"]
    wrong = run(
        settings.home, "publish", str(bundle), "--targets-key", str(settings.key_path("snapshot"))
    )
    assert wrong.exit_code == 1
    assert "not one of the targets keys" in wrong.output
    assert "--targets-key" in run(settings.home, "publish", str(bundle)).output

    result = run(
        settings.home, "publish", str(bundle), "--targets-key", str(settings.key_path("targets"))
    )
    assert result.exit_code == 0, result.output
    sha256 = hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert f"published mlp-1.0.0.efb  release 1  {bundle.stat().st_size} bytes" in result.output
    assert sha256 in result.output
    targets = _metadata(settings, "targets.json").signed.targets
    assert targets["mlp-1.0.0.efb"].hashes["sha256"] == sha256
    assert (settings.repository_dir / "targets" / f"{sha256}.mlp-1.0.0.efb").is_file()


def test_enroll_token_is_one_time_and_stored_hashed(settings: FleetTrustSettings) -> None:
    result = CliRunner().invoke(
        cli, ["fleet", "--home", str(settings.home), "enroll-token", "cam-1", "--ttl", "30m"]
    )
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert re.fullmatch(r"eft_\S+", token)
    assert "edgefleet agent enroll --fleet http://127.0.0.1:8480" in result.stderr
    assert EnrollmentTokens(settings.tokens_db).check(token) == "cam-1"
    assert token.encode() not in settings.tokens_db.read_bytes()

    bad_ttl = run(settings.home, "enroll-token", "cam-1", "--ttl", "soon")
    assert bad_ttl.exit_code == 2 and "90s, 30m, 24h, 7d" in bad_ttl.output
    bad_id = run(settings.home, "enroll-token", "cam/1")
    assert bad_id.exit_code == 1 and "not a valid device id" in bad_id.output


def test_revoke_writes_a_crl_listing_the_device(
    settings: FleetTrustSettings, tmp_path: Path
) -> None:
    ca = DeviceCA.open(settings.ca_dir)
    key = create_device_key(tmp_path / "device")
    certificate = x509.load_pem_x509_certificate(ca.issue(make_csr(key, "cam-7"), "cam-7"))

    result = run(settings.home, "revoke", "cam-7")
    assert result.exit_code == 0, result.output
    assert str(settings.crl_path) in result.output
    assert "reload" in result.output and "broker" in result.output
    crl = x509.load_pem_x509_crl(settings.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(certificate.serial_number) is not None
    assert crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]

    # A later CRL, written without a new revocation, still lists it.
    fresh = run(settings.home, "crl", "--out", str(tmp_path / "crl.pem"))
    assert fresh.exit_code == 0, fresh.output
    renewed = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes())
    assert renewed.get_revoked_certificate_by_serial_number(certificate.serial_number)
    assert renewed.next_update_utc is not None and crl.next_update_utc is not None
    assert renewed.next_update_utc >= crl.next_update_utc

    unknown = run(settings.home, "revoke", "cam-8")
    assert unknown.exit_code == 1 and "no certificate was ever issued" in unknown.output


# -- root rotation -----------------------------------------------------------------------------


def test_rotate_root_and_a_device_with_the_old_root_follows(
    settings: FleetTrustSettings, bundles: dict[str, Path], tmp_path: Path
) -> None:
    targets_key = str(settings.key_path("targets"))
    first = run(settings.home, "publish", str(bundles["mlp-1"]), "--targets-key", targets_key)
    assert first.exit_code == 0, first.output
    old_root = (settings.repository_dir / "metadata" / "1.root.json").read_bytes()
    new_key = tmp_path / "usb" / "root-2.pem"
    with serve(trust_app(settings.repository_dir)) as server:
        device = ModelCatalogue(
            tmp_path / "device", f"{server.url}/metadata", f"{server.url}/targets", old_root
        )
        try:
            device.refresh()
            assert device.target("mlp-1.0.0.efb").custom["release"] == 1

            result = run(
                settings.home, "keys", "rotate", "--role", "root", "--new-key", str(new_key)
            )
            assert result.exit_code == 0, result.output
            assert "root version 2" in result.output
            retired = f"once every device has refreshed:\n  {settings.key_path('root')}"
            assert retired in result.output
            assert new_key.stat().st_mode & 0o777 == 0o600
            published = run(
                settings.home, "publish", str(bundles["mlp-2"]), "--targets-key", targets_key
            )
            assert published.exit_code == 0, published.output

            device.refresh()
            trusted = Metadata.from_bytes((tmp_path / "device" / "root.json").read_bytes())
            assert trusted.signed.version == 2
            assert trusted.signed.roles["root"].keyids == [public_key(new_key).keyid]
            assert device.target("mlp-2.0.0.efb").custom["version"] == "2.0.0"
        finally:
            device.close()

    # The old root key was revoked: it cannot sign another rotation.
    again = run(
        settings.home,
        "keys",
        "rotate",
        "--new-key",
        str(tmp_path / "usb" / "root-3.pem"),
        "--root-key",
        str(settings.key_path("root")),
    )
    assert again.exit_code == 1
    assert "root" in again.output and "error:" in again.output
    shown = json.loads(run(settings.home, "keys", "show", "--json").output)
    assert shown[0]["keys"][0]["keyid"] == public_key(new_key).keyid
    # Rotating to the same key renews the root's expiry without changing keys.
    renewed = run(
        settings.home, "keys", "rotate", "--new-key", str(new_key), "--root-key", str(new_key)
    )
    assert renewed.exit_code == 0, renewed.output
    assert "renewed the root's expiry" in renewed.output
    root = _metadata(settings, "root.json").signed
    assert root.version == 3 and root.roles["root"].keyids == [public_key(new_key).keyid]
    help_text = run(settings.home, "keys", "rotate", "--help").output
    assert "--role targets" in help_text and "restart the trust service" in help_text


def test_rotate_targets_and_timestamp_and_a_device_follows(
    settings: FleetTrustSettings, bundles: dict[str, Path], tmp_path: Path
) -> None:
    old_targets = str(settings.key_path("targets"))
    first = run(settings.home, "publish", str(bundles["mlp-1"]), "--targets-key", old_targets)
    assert first.exit_code == 0, first.output
    old_root = (settings.repository_dir / "metadata" / "1.root.json").read_bytes()
    new_targets = tmp_path / "usb" / "targets-2.pem"
    old_timestamp = public_key(settings.key_path("timestamp")).keyid
    for args, expected in [
        (("--role", "timestamp", "--new-key", str(new_targets)), "leave out --new-key"),
        (("--role", "snapshot", "--threshold", "2"), "leave out --threshold"),
        (("--role", "targets",), "needs --new-key PATH"),
    ]:  # fmt: skip
        refused = run(settings.home, "keys", "rotate", *args)
        assert refused.exit_code == 2 and expected in refused.output, refused.output
    with serve(trust_app(settings.repository_dir)) as server:
        device = ModelCatalogue(
            tmp_path / "device", f"{server.url}/metadata", f"{server.url}/targets", old_root
        )
        try:
            device.refresh()
            rotated = run(
                settings.home, "keys", "rotate", "--role", "targets", "--new-key", str(new_targets)
            )
            assert rotated.exit_code == 0, rotated.output
            assert "root version 2" in rotated.output
            assert f"--targets-key {new_targets}" in rotated.output
            assert public_key(settings.key_path("targets")).keyid in rotated.output  # revoked
            assert new_targets.stat().st_mode & 0o777 == 0o600
            stale = run(
                settings.home, "publish", str(bundles["mlp-2"]), "--targets-key", old_targets
            )
            assert stale.exit_code == 1 and "not one of the targets keys" in stale.output

            rotated = run(settings.home, "keys", "rotate", "--role", "timestamp")
            assert rotated.exit_code == 0, rotated.output
            assert (
                "root version 3" in rotated.output and "Restart the trust service" in rotated.output
            )
            timestamp = public_key(settings.key_path("timestamp")).keyid
            root = _metadata(settings, "root.json").signed
            assert root.roles["timestamp"].keyids == [timestamp] != [old_timestamp]
            assert root.roles["targets"].keyids == [public_key(new_targets).keyid]
            assert not (settings.keys_dir / "timestamp.next.pem").exists()
            # The trust service opens the repository with keys/timestamp.pem: the new key.
            assert open_repository(settings).refresh_timestamp(if_expiring_within=timedelta(days=2))
            published = run(
                settings.home, "publish", str(bundles["mlp-2"]), "--targets-key", str(new_targets)
            )
            assert published.exit_code == 0, published.output
            device.refresh()
            trusted = Metadata.from_bytes((tmp_path / "device" / "root.json").read_bytes())
            assert trusted.signed.version == 3
            assert device.target("mlp-2.0.0.efb").custom["release"] == 2
        finally:
            device.close()


def test_rotate_snapshot_resumes_a_run_cut_short(settings: FleetTrustSettings) -> None:
    # The new root already names keys/snapshot.next.pem, but the file was never moved.
    staged = settings.keys_dir / "snapshot.next.pem"
    generate_key(staged)
    repository = open_repository(settings)
    staged_keyid = public_key(staged).keyid
    assert repository.rotate_role("snapshot", [staged], [settings.key_path("root")]) == 2
    resumed = run(settings.home, "keys", "rotate", "--role", "snapshot")
    assert resumed.exit_code == 0, resumed.output
    assert "root version 2" in resumed.output  # no second rotation
    assert _metadata(settings, "root.json").signed.roles["snapshot"].keyids == [staged_keyid]
    assert public_key(settings.key_path("snapshot")).keyid == staged_keyid
    assert not staged.exists()
    assert open_repository(settings).refresh_timestamp(if_expiring_within=timedelta(days=8))


def test_resign_targets_and_keys_show_warns_before_expiry(settings: FleetTrustSettings) -> None:
    targets_key = str(settings.key_path("targets"))
    soon = run(
        settings.home, "keys", "resign-targets", "--targets-key", targets_key, "--expires-in", "3d"
    )
    assert soon.exit_code == 0, soon.output
    assert "version 2" in soon.output
    targets = _metadata(settings, "targets.json").signed
    assert targets.version == 2 and targets.expires.isoformat() in soon.output
    assert timedelta(days=2, hours=23) < targets.expires - datetime.now(timezone.utc)
    assert _metadata(settings, "snapshot.json").signed.meta["targets.json"].version == 2

    shown = run(settings.home, "keys", "show")
    assert shown.exit_code == 0, shown.output
    warnings = [line for line in shown.output.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, shown.output
    assert "targets metadata expires in 2 days" in warnings[0]
    assert "edgefleet fleet keys resign-targets --targets-key" in warnings[0]
    rows = {r["role"]: r for r in json.loads(run(settings.home, "keys", "show", "--json").output)}
    assert rows["targets"]["warning"] == warnings[0].split("WARNING: ")[1]
    assert rows["root"]["warning"] is rows["snapshot"]["warning"] is None

    renewed = run(settings.home, "keys", "resign-targets", "--targets-key", targets_key)
    assert renewed.exit_code == 0, renewed.output
    assert "WARNING" not in run(settings.home, "keys", "show").output
    assert _metadata(settings, "targets.json").signed.version == 3
    bad = run(settings.home, "keys", "resign-targets", "--targets-key", targets_key,
              "--expires-in", "soon")  # fmt: skip
    assert bad.exit_code == 2 and "--expires-in" in bad.output
    zero = run(settings.home, "keys", "resign-targets", "--targets-key", targets_key,
               "--expires-in", "0d")  # fmt: skip
    assert zero.exit_code == 1 and "positive duration" in zero.output
    wrong = run(settings.home, "keys", "resign-targets", "--targets-key",
                str(settings.key_path("snapshot")))  # fmt: skip
    assert wrong.exit_code == 1 and "not one of the targets keys" in wrong.output
    assert _metadata(settings, "targets.json").signed.version == 3


# -- the trust service and enrollment across processes -----------------------------------------


class FleetProcess:
    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc, self.url = proc, url


@pytest.fixture
def fleet_service(settings: FleetTrustSettings) -> Iterator[FleetProcess]:
    env = {
        **os.environ,
        "EDGEFLEET_FLEET_HOME": str(settings.home),
        "EDGEFLEET_FLEET_BROKER_URL": "mqtts://broker.test:8883",
    }
    proc = subprocess.Popen(
        [*EDGEFLEET, "fleet", "trust", "serve", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    log: list[str] = []
    url = None
    deadline = time.monotonic() + 30
    while url is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        log.append(line)
        if match := re.search(r"URL:\s+(http://\S+)", line):
            url = match.group(1)
    while url is not None and time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/metadata/root.json", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    if url is None:
        proc.kill()
        raise AssertionError("the trust service did not start:\n" + "".join(log))
    yield FleetProcess(proc, url)
    proc.terminate()
    proc.wait(10)
    proc.stderr.close()


def agent_enroll(
    fleet: str, token: str, device_id: str, state: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EDGEFLEET, "agent", "enroll", "--fleet", fleet, "--token", token,
         "--device-id", device_id, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


def token_for(settings: FleetTrustSettings, device_id: str) -> str:
    return EnrollmentTokens(settings.tokens_db).create(device_id)


def test_enrollment_across_processes(
    settings: FleetTrustSettings, fleet_service: FleetProcess, tmp_path: Path
) -> None:
    state = tmp_path / "device"
    token = token_for(settings, "cam-1")
    enrolled = agent_enroll(fleet_service.url, token, "cam-1", state)
    assert enrolled.returncode == 0, enrolled.stderr
    files = identity_dir(state)
    assert (files / "device.key").stat().st_mode & 0o777 == 0o600
    certificate = x509.load_pem_x509_certificate((files / "device.crt").read_bytes())
    cn = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cn] == ["cam-1"]
    certificate.verify_directly_issued_by(DeviceCA.open(settings.ca_dir).certificate)
    trust = TrustState.load(state)
    assert trust.device_id == "cam-1"
    assert trust.director_public_key_pem == director_public_pem(settings.director_key)
    assert json.loads((files / "enrollment.json").read_text())["broker_url"] == (
        "mqtts://broker.test:8883"
    )
    # What the device received bootstraps its catalogue against the same service.
    assert (files / "root.json").read_bytes() == (
        settings.repository_dir / "metadata" / "root.json"
    ).read_bytes()
    catalogue = open_catalogue(state)
    try:
        catalogue.refresh()
    finally:
        catalogue.close()
    assert catalogue.metadata_url == f"{fleet_service.url}/metadata/"

    again = agent_enroll(fleet_service.url, token, "cam-1", tmp_path / "again")
    assert again.returncode == 1
    assert "already used" in again.stderr and "HTTP 409" in again.stderr
    unknown = agent_enroll(fleet_service.url, "eft_not-a-token", "cam-2", tmp_path / "unknown")
    assert unknown.returncode == 1
    assert "unknown enrollment token" in unknown.stderr and "HTTP 401" in unknown.stderr

    # A request whose CN is not the token's device is refused, and the token survives it.
    token_b = token_for(settings, "cam-b")
    mismatch = agent_enroll(fleet_service.url, token_b, "cam-c", tmp_path / "c")
    assert mismatch.returncode == 1
    assert "names CN ['cam-c']" in mismatch.stderr and "HTTP 400" in mismatch.stderr
    enroll_device(fleet_service.url, token_b, "cam-b", tmp_path / "b")
    assert TrustState.load(tmp_path / "b").device_id == "cam-b"


class InProcess:
    """``fleet_trust_app`` on a real uvicorn server on its own thread, lifespan included."""

    def __init__(self, settings: FleetTrustSettings) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        app = fleet_trust_app(settings.model_copy(update={"public_url": self.url}))
        config = uvicorn.Config(app, lifespan="on", access_log=False, log_config=None)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> InProcess:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()


@pytest.fixture
def in_process(settings: FleetTrustSettings) -> Iterator[InProcess]:
    fast = settings.model_copy(update={"timestamp_check_s": 0.05, "timestamp_renew_within_h": 48.0})
    with InProcess(fast) as server:
        yield server


def test_enroll_endpoint_refuses_bad_requests_with_json(
    settings: FleetTrustSettings, in_process: InProcess
) -> None:
    url = f"{in_process.url}/enroll"
    not_json = httpx.post(url, content=b"{token")
    assert not_json.status_code == 400 and "Invalid JSON" in not_json.json()["error"]
    missing = httpx.post(url, json={"token": "x"})
    assert missing.status_code == 400 and "csr_pem" in missing.json()["error"]
    huge = httpx.post(url, json={"token": "x", "csr_pem": "A" * 100_000})
    assert huge.status_code == 413 and huge.json()["reason"] == "too_large"
    streamed = httpx.post(url, content=iter([b"x" * 40_000, b"x" * 40_000]))  # no length
    assert streamed.status_code == 413
    token = token_for(settings, "cam-x")
    not_csr = httpx.post(url, json={"token": token, "csr_pem": "hello"})
    assert not_csr.status_code == 400 and "not a PEM CSR" in not_csr.json()["error"]
    assert not_csr.json()["reason"] == "bad_csr"


def test_enroll_device_in_process(
    settings: FleetTrustSettings, in_process: InProcess, tmp_path: Path
) -> None:
    token = token_for(settings, "cam-5")
    with pytest.raises(TrustError) as not_enrolled:
        open_catalogue(tmp_path / "d")
    assert not_enrolled.value.reason == "not_enrolled"
    files = enroll_device(in_process.url, token, "cam-5", tmp_path / "d")
    assert files.key.stat().st_mode & 0o777 == 0o600
    catalogue = open_catalogue(tmp_path / "d")
    try:
        catalogue.refresh()
    finally:
        catalogue.close()
    with pytest.raises(TrustError) as used:
        enroll_device(in_process.url, token, "cam-5", tmp_path / "again")
    assert used.value.reason == "enrollment_refused" and "HTTP 409" in str(used.value)
    # Not the trust service: the message shows what answered.
    with pytest.raises(TrustError) as wrong_url:
        enroll_device(f"{in_process.url}/nowhere", token, "cam-5", tmp_path / "again")
    assert "HTTP 404): Not Found" in str(wrong_url.value)
    assert "is --fleet the URL of the fleet's trust service" in str(wrong_url.value)

    # The service renews the timestamp by itself.
    deadline = time.monotonic() + 10
    while _metadata(settings, "timestamp.json").signed.version < 3:
        assert time.monotonic() < deadline, "the timestamp was not renewed"
        time.sleep(0.05)


def test_a_broken_ca_is_a_503_not_a_crash(
    settings: FleetTrustSettings, in_process: InProcess, tmp_path: Path
) -> None:
    (settings.ca_dir / "index.json").write_text("{not json")
    key = create_device_key(tmp_path / "d")
    body = {"token": token_for(settings, "cam-9"), "csr_pem": make_csr(key, "cam-9").decode()}
    answer = httpx.post(f"{in_process.url}/enroll", json=body)
    assert answer.status_code == 503
    assert answer.json()["reason"] == "unavailable"
    assert "index" in answer.json()["error"]


def test_trust_serve_reports_what_stops_it_from_starting(
    settings: FleetTrustSettings, tmp_path: Path
) -> None:
    bad_url = run(settings.home, "trust", "serve", "--broker-url", "http://broker")
    assert bad_url.exit_code == 2 and "broker_url" in bad_url.output
    uninitialised = run(tmp_path / "empty", "trust", "serve", "--port", "0")
    assert uninitialised.exit_code == 1
    assert "edgefleet fleet keys init" in uninitialised.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = run(settings.home, "trust", "serve", "--port", port)
    assert busy.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in busy.output


def test_enroll_device_reports_an_unreachable_fleet(tmp_path: Path) -> None:
    with pytest.raises(TrustError) as e:
        enroll_device("http://127.0.0.1:9", "eft_x", "cam-1", tmp_path / "d")
    assert e.value.reason == "unreachable" and "--fleet" in str(e.value)
    assert not (tmp_path / "d" / "trust" / "state.json").exists()
