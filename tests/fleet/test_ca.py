"""The device CA, enrollment tokens and enrollment, checked with `cryptography`'s own verifier."""

from __future__ import annotations

import ipaddress
import json
import sqlite3
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tuf.api.metadata import Metadata, Root

from agent.trust.errors import TrustError as AgentTrustError
from agent.trust.identity import IdentityFiles, create_device_key, make_csr, save_enrollment
from fleet.errors import EnrollmentError, TrustError
from fleet.trust.ca import FLEET_CLIENT_NAME, DeviceCA
from fleet.trust.enroll import EnrollmentTokens, enroll


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> DeviceCA:
    return DeviceCA.create(tmp_path_factory.mktemp("ca") / "ca")


def _csr(common_name: str, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM)


def _client_verifier(ca: DeviceCA) -> verification.ClientVerifier:
    store = verification.Store(x509.load_pem_x509_certificates(ca.chain_pem()))
    return verification.PolicyBuilder().store(store).build_client_verifier()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_ca_issues_a_client_certificate_that_verifies(ca: DeviceCA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = x509.load_pem_x509_certificate(ca.issue(_csr("dev-1", key), "dev-1"))
    verified = _client_verifier(ca).verify(cert, [])
    assert verified.chain[-1] == ca.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    assert cert.public_key() == key.public_key()
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = cert.not_valid_after_utc - datetime.now(timezone.utc)
    assert timedelta(days=364) < lifetime <= timedelta(days=365)


def test_a_certificate_from_another_ca_does_not_verify(ca: DeviceCA, tmp_path: Path) -> None:
    other = DeviceCA.create(tmp_path / "other")
    cert = x509.load_pem_x509_certificate(other.issue(_csr("dev-1"), "dev-1"))
    with pytest.raises(verification.VerificationError):
        _client_verifier(ca).verify(cert, [])


def test_a_request_whose_cn_is_not_the_device_id_is_refused(ca: DeviceCA) -> None:
    with pytest.raises(EnrollmentError, match="CN") as caught:
        ca.issue(_csr("dev-2"), "dev-1")
    assert caught.value.reason == "cn_mismatch"


def test_bad_requests_are_refused_with_a_reason(ca: DeviceCA) -> None:
    with pytest.raises(EnrollmentError, match="not a PEM CSR") as caught:
        ca.issue(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "dev-1")
    assert caught.value.reason == "bad_csr"
    p521 = ec.generate_private_key(ec.SECP521R1())
    with pytest.raises(EnrollmentError, match="unsupported key") as caught:
        ca.issue(_csr("dev-1", p521), "dev-1")
    assert caught.value.reason == "bad_csr"
    with pytest.raises(EnrollmentError, match="not a valid device id"):
        ca.issue(_csr("dev-1"), "dev/1")


def test_no_device_can_take_the_fleet_services_name(ca: DeviceCA, tmp_path: Path) -> None:
    # The broker's ACL gives this name every topic: a device holding it would control the fleet.
    with pytest.raises(EnrollmentError, match="fleet service's own name") as caught:
        ca.issue(_csr(FLEET_CLIENT_NAME), FLEET_CLIENT_NAME)
    assert caught.value.reason == "bad_device_id"
    with pytest.raises(EnrollmentError, match="fleet service's own name"):
        EnrollmentTokens(tmp_path / "tokens.db").create(FLEET_CLIENT_NAME)
    assert ca.revoked() == frozenset()  # nothing was issued to it
    with pytest.raises(TrustError, match="no certificate was ever issued"):
        ca.revoke(FLEET_CLIENT_NAME)


def test_a_revoked_device_appears_in_the_crl(ca: DeviceCA) -> None:
    revoked = x509.load_pem_x509_certificate(ca.issue(_csr("dev-gone"), "dev-gone"))
    kept = x509.load_pem_x509_certificate(ca.issue(_csr("dev-kept"), "dev-kept"))
    before = x509.load_pem_x509_crl(ca.crl_pem())
    assert before.get_revoked_certificate_by_serial_number(revoked.serial_number) is None
    ca.revoke("dev-gone")
    crl = x509.load_pem_x509_crl(ca.crl_pem())
    assert crl.is_signature_valid(ca.certificate.public_key())
    assert crl.issuer == ca.certificate.subject
    assert crl.get_revoked_certificate_by_serial_number(revoked.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(kept.serial_number) is None
    assert crl.next_update_utc is not None
    assert crl.next_update_utc > datetime.now(timezone.utc) + timedelta(days=7)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number > before.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert "dev-gone" in ca.revoked() and "dev-kept" not in ca.revoked()
    with pytest.raises(TrustError, match="no certificate was ever issued") as caught:
        ca.revoke("dev-never")
    assert caught.value.reason == "unknown_device"


def test_the_ca_reopens_with_its_key_and_revocations(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    first = DeviceCA.create(directory, common_name="test CA", valid_days=30)
    assert _mode(directory / "ca.key") == 0o600
    serial = x509.load_pem_x509_certificate(first.issue(_csr("dev-1"), "dev-1")).serial_number
    first.revoke("dev-1")
    reopened = DeviceCA.open(directory)
    assert reopened.chain_pem() == first.chain_pem()
    crl = x509.load_pem_x509_crl(reopened.crl_pem())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    # A device certificate never outlives the CA that issued it.
    cert = x509.load_pem_x509_certificate(reopened.issue(_csr("dev-2"), "dev-2"))
    assert cert.not_valid_after_utc <= reopened.certificate.not_valid_after_utc
    with pytest.raises(TrustError, match="already exists") as caught:
        DeviceCA.create(directory)
    assert caught.value.reason == "exists"
    with pytest.raises(TrustError, match="create one") as caught:
        DeviceCA.open(tmp_path / "nowhere")
    assert caught.value.reason == "no_ca"
    (directory / "index.json").write_text("{broken")
    with pytest.raises(TrustError, match="index") as caught:
        DeviceCA.open(directory)
    assert caught.value.reason == "index_corrupt"


def test_server_and_client_certificates(ca: DeviceCA, tmp_path: Path) -> None:
    ca.issue_server("broker.example", tmp_path / "broker.key", tmp_path / "broker.crt")
    assert _mode(tmp_path / "broker.key") == 0o600
    server = x509.load_pem_x509_certificate((tmp_path / "broker.crt").read_bytes())
    store = verification.Store([ca.certificate])
    for name in (
        verification.DNSName("broker.example"),
        verification.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ):
        verification.PolicyBuilder().store(store).build_server_verifier(name).verify(server, [])
    with pytest.raises(verification.VerificationError):
        verification.PolicyBuilder().store(store).build_server_verifier(
            verification.DNSName("other.example")
        ).verify(server, [])
    key = serialization.load_pem_private_key((tmp_path / "broker.key").read_bytes(), None)
    assert key.public_key() == server.public_key()

    ca.issue_client("edgefleet-fleet", tmp_path / "fleet.key", tmp_path / "fleet.crt")
    client = x509.load_pem_x509_certificate((tmp_path / "fleet.crt").read_bytes())
    _client_verifier(ca).verify(client, [])
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "edgefleet-fleet"
    )
    with pytest.raises(TrustError, match="cannot name a certificate"):
        ca.issue_client("fleet/#", tmp_path / "x.key", tmp_path / "x.crt")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 5, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now


def test_tokens_work_once(tmp_path: Path) -> None:
    tokens = EnrollmentTokens(tmp_path / "tokens.db")
    token = tokens.create("dev-1")
    assert tokens.check(token) == "dev-1"
    assert tokens.redeem(token) == "dev-1"
    with pytest.raises(EnrollmentError, match="already used") as caught:
        tokens.redeem(token)
    assert caught.value.reason == "used"
    with pytest.raises(EnrollmentError, match="unknown") as caught:
        tokens.redeem(token + "x")
    assert caught.value.reason == "unknown"


def test_tokens_expire(tmp_path: Path) -> None:
    clock = Clock()
    tokens = EnrollmentTokens(tmp_path / "tokens.db", clock=clock)
    token = tokens.create("dev-1", ttl=timedelta(hours=1))
    clock.now += timedelta(minutes=59)
    assert tokens.check(token) == "dev-1"
    clock.now += timedelta(minutes=1)
    with pytest.raises(EnrollmentError, match="expired") as caught:
        tokens.redeem(token)
    assert caught.value.reason == "expired"
    with pytest.raises(EnrollmentError, match="ttl"):
        tokens.create("dev-1", ttl=timedelta(0))


def test_a_new_token_replaces_the_unused_one(tmp_path: Path) -> None:
    tokens = EnrollmentTokens(tmp_path / "tokens.db")
    old = tokens.create("dev-1")
    new = tokens.create("dev-1")
    other = tokens.create("dev-2")
    with pytest.raises(EnrollmentError) as caught:
        tokens.check(old)
    assert caught.value.reason == "unknown"
    assert tokens.redeem(new) == "dev-1"
    assert tokens.redeem(other) == "dev-2"


def test_tokens_are_hashed_at_rest(tmp_path: Path) -> None:
    db = tmp_path / "tokens.db"
    tokens = EnrollmentTokens(db)
    token = tokens.create("dev-1")
    assert len(token) > 40
    raw = db.read_bytes()
    assert token.encode() not in raw
    assert token.removeprefix("eft_").encode() not in raw
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT * FROM enrollment_tokens").fetchall()
    conn.close()
    assert len(rows) == 1
    assert all(token not in str(value) for value in rows[0])
    assert rows[0][1] == "dev-1"
    # Tokens persist across a reopen of the database.
    assert EnrollmentTokens(db).redeem(token) == "dev-1"


def test_enrollment_end_to_end(ca: DeviceCA, tmp_path: Path) -> None:
    tokens = EnrollmentTokens(tmp_path / "tokens.db")
    token = tokens.create("dev-e2e")
    identity = tmp_path / "device"
    key_path = create_device_key(identity)
    assert _mode(key_path) == 0o600
    director = Ed25519PrivateKey.generate().public_key()
    director_pem = director.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    root = Metadata(Root()).to_bytes()
    common = {
        "trusted_root": root,
        "director_public_pem": director_pem,
        "broker_url": "mqtts://broker.example:8883",
    }
    # A bad request does not use the token up: the device can fix it and retry.
    with pytest.raises(EnrollmentError, match="CN"):
        enroll(tokens, ca, token, make_csr(key_path, "dev-other"), **common)  # type: ignore[arg-type]
    bundle = enroll(tokens, ca, token, make_csr(key_path, "dev-e2e"), **common)  # type: ignore[arg-type]
    with pytest.raises(EnrollmentError, match="already used"):
        enroll(tokens, ca, token, make_csr(key_path, "dev-e2e"), **common)  # type: ignore[arg-type]
    assert bundle.device_id == "dev-e2e"
    assert bundle.ca_chain_pem == ca.chain_pem()
    _client_verifier(ca).verify(x509.load_pem_x509_certificate(bundle.certificate_pem), [])

    files = save_enrollment(
        identity,
        device_id=bundle.device_id,
        certificate_pem=bundle.certificate_pem,
        ca_chain_pem=bundle.ca_chain_pem,
        trusted_root=bundle.trusted_root,
        director_public_key_pem=bundle.director_public_key_pem,
        broker_url=bundle.broker_url,
    )
    assert files == IdentityFiles(identity)
    assert files.certificate.read_bytes() == bundle.certificate_pem
    assert files.trusted_root.read_bytes() == root
    assert files.director_key.read_bytes() == director_pem
    assert json.loads(files.enrollment.read_text())["broker_url"] == "mqtts://broker.example:8883"
    # A certificate for another device's key is refused before anything is written.
    stranger = ca.issue(_csr("dev-e2e"), "dev-e2e")
    with pytest.raises(AgentTrustError, match="public key") as caught:
        save_enrollment(
            identity,
            device_id="dev-e2e",
            certificate_pem=stranger,
            ca_chain_pem=bundle.ca_chain_pem,
            trusted_root=root,
            director_public_key_pem=director_pem,
            broker_url="mqtts://evil:8883",
        )
    assert caught.value.reason == "bad_enrollment"
    assert files.certificate.read_bytes() == bundle.certificate_pem
    assert "evil" not in files.enrollment.read_text()
