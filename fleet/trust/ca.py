"""The fleet's device CA: issues each device its X.509 client certificate (CN = device id, which
the broker maps to the MQTT username), the broker's and the fleet service's own certificates,
and the revocation list that stops a revoked device at the broker.

On disk, in the CA directory: ``ca.key`` (EC P-256, mode 0600), ``ca.crt``, and ``index.json``
(every certificate issued: serial, name, kind, expiry, revocation time). EC P-256 because every
OpenSSL that Mosquitto links against verifies it in TLS 1.2 and 1.3.

Only the public key and the CN of a request are used: any extension a request asks for is
ignored, so a device cannot ask for a CA or server certificate.
"""

from __future__ import annotations

import ipaddress
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from fleet.errors import EnrollmentError, TrustError
from fleet.files import atomic_write
from fleet.trust.identities import FLEET_CLIENT_NAME, RESERVED_PREFIX
from protocol.director import check_device_id

__all__ = ["FLEET_CLIENT_NAME", "DeviceCA", "check_device_name"]

CertificateKind = Literal["device", "server", "client"]

_CLOCK_SKEW = timedelta(minutes=5)  # not_before is backdated so a device a little behind accepts
_CRL_VALIDITY = timedelta(days=30)  # OpenSSL refuses every client once the CRL expires: re-issue
_MIN_RSA_BITS = 2048
_EC_CURVES = ("secp256r1", "secp384r1")


class _Issued(BaseModel):
    model_config = ConfigDict(extra="forbid")

    serial: str  # hex; JSON numbers cannot hold 159-bit serials exactly
    name: str
    kind: CertificateKind
    not_after: AwareDatetime
    revoked_at: AwareDatetime | None = None


class _Index(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal[1] = Field(default=1, alias="schema")
    certificates: list[_Issued] = Field(default_factory=list)


class DeviceCA:
    """A certificate authority kept in one directory. Safe to share between threads."""

    def __init__(
        self, directory: Path, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate
    ) -> None:
        self._directory = directory
        self._key = key
        self._certificate = certificate
        self._lock = threading.Lock()

    @classmethod
    def create(
        cls, directory: Path, *, common_name: str = "edgefleet device CA", valid_days: int = 3650
    ) -> DeviceCA:
        """Create a new CA in ``directory``; refuses to replace an existing one."""
        key_path = directory / "ca.key"
        if key_path.exists():
            raise TrustError(
                f"a CA already exists in {directory}; open it with DeviceCA.open, or choose an "
                "empty directory (replacing a CA invalidates every device certificate)",
                reason="exists",
            )
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        pem_key = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write(key_path, pem_key, mode=0o600, exclusive=True)
        atomic_write(
            directory / "ca.crt", certificate.public_bytes(serialization.Encoding.PEM), mode=0o644
        )
        ca = cls(directory, key, certificate)
        ca._write_index(_Index())
        return ca

    @classmethod
    def open(cls, directory: Path) -> DeviceCA:
        """Open the CA kept in ``directory``."""
        try:
            key_pem = (directory / "ca.key").read_bytes()
            cert_pem = (directory / "ca.crt").read_bytes()
        except OSError as e:
            raise TrustError(
                f"no usable CA in {directory} ({e.strerror}: {e.filename}); create one with "
                "DeviceCA.create (`edgefleet fleet keys init`)",
                reason="no_ca",
            ) from e
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
            certificate = x509.load_pem_x509_certificate(cert_pem)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise TrustError(f"the CA files in {directory} are damaged: {e}", reason="no_ca") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != (
            certificate.public_key()
        ):
            raise TrustError(
                f"{directory / 'ca.key'} does not belong to {directory / 'ca.crt'}",
                reason="no_ca",
            )
        ca = cls(directory, key, certificate)
        ca._read_index()  # a damaged index is reported now, not at the first revocation
        return ca

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    def validate_csr(self, csr_pem: bytes, device_id: str) -> x509.CertificateSigningRequest:
        """Check a device's request without issuing anything: well-formed, self-signed, a
        supported key, and CN = ``device_id``. Raises :class:`EnrollmentError`."""
        check_device_name(device_id)
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise EnrollmentError(
                f"the certificate request is not a PEM CSR: {e}", reason="bad_csr"
            ) from None
        if not csr.is_signature_valid:
            raise EnrollmentError(
                "the certificate request is not signed by its own key", reason="bad_csr"
            )
        cns = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cns != [device_id]:
            raise EnrollmentError(
                f"the certificate request names CN {cns or 'nothing'}, but the token is for "
                f"device {device_id!r}; make the request with CN = {device_id}",
                reason="cn_mismatch",
            )
        _check_public_key(csr.public_key())
        return csr

    def issue(self, csr_pem: bytes, device_id: str, *, valid_days: int = 365) -> bytes:
        """Issue a device's client certificate (PEM) from its request; CN must be ``device_id``."""
        csr = self.validate_csr(csr_pem, device_id)
        certificate = self._sign(
            device_id, csr.public_key(), "device", valid_days=valid_days, hostname=None
        )
        return certificate.public_bytes(serialization.Encoding.PEM)

    def issue_server(
        self, hostname: str, key_path: Path, cert_path: Path, *, valid_days: int = 365
    ) -> None:
        """Write a new key (mode 0600) and a server certificate for ``hostname`` (the broker, the
        fleet's HTTPS endpoint). The SAN names ``hostname`` and 127.0.0.1."""
        self._issue_with_key("server", hostname, key_path, cert_path, valid_days)

    def issue_client(
        self, name: str, key_path: Path, cert_path: Path, *, valid_days: int = 365
    ) -> None:
        """Write a new key (mode 0600) and a client certificate with CN = ``name`` — one of the
        fleet's own identities at the broker (:mod:`fleet.trust.identities`)."""
        self._issue_with_key("client", name, key_path, cert_path, valid_days)

    def revoke(self, device_id: str) -> None:
        """Revoke every certificate issued to ``device_id``; the next CRL lists them."""
        now = datetime.now(timezone.utc)
        with self._lock:
            index = self._read_index()
            mine = [c for c in index.certificates if c.name == device_id]
            if not mine:
                raise TrustError(
                    f"no certificate was ever issued to {device_id!r}; nothing to revoke",
                    reason="unknown_device",
                )
            for entry in mine:
                if entry.revoked_at is None:
                    entry.revoked_at = now
            self._write_index(index)

    def revoked(self) -> frozenset[str]:
        """Names with at least one revoked certificate."""
        return frozenset(c.name for c in self._read_index().certificates if c.revoked_at)

    def crl_pem(self) -> bytes:
        """A freshly signed CRL (PEM) listing every revoked certificate, valid for 30 days.

        The broker reads it at start (``crlfile``): write it again after each revocation and
        before it expires, then have the broker reload.
        """
        index = self._read_index()
        now = datetime.now(timezone.utc)
        revoked = [(c.serial, c.revoked_at) for c in index.certificates if c.revoked_at]
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._certificate.subject)
            .last_update(now - _CLOCK_SKEW)
            .next_update(now + _CRL_VALIDITY)
            # Revocations are never undone, so their count only grows: a monotonic CRL number.
            .add_extension(x509.CRLNumber(len(revoked) + 1), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        for serial, revoked_at in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(serial, 16))
                .revocation_date(revoked_at)
                .build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.PEM)

    def chain_pem(self) -> bytes:
        """The CA chain a device and the broker trust (PEM)."""
        return self._certificate.public_bytes(serialization.Encoding.PEM)

    def _issue_with_key(
        self,
        kind: CertificateKind,
        name: str,
        key_path: Path,
        cert_path: Path,
        valid_days: int,
    ) -> None:
        try:
            check_device_id(name)  # the broker reads the CN as a username and a topic level
        except ValueError as e:
            raise TrustError(
                f"{name!r} cannot name a certificate: {e}", reason="bad_name"
            ) from None
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = self._sign(
            name,
            key.public_key(),
            kind,
            valid_days=valid_days,
            hostname=name if kind == "server" else None,
        )
        pem_key = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write(key_path, pem_key, mode=0o600)
        atomic_write(cert_path, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)

    def _sign(
        self,
        name: str,
        public_key: CertificatePublicKeyTypes,
        kind: CertificateKind,
        *,
        valid_days: int,
        hostname: str | None,
    ) -> x509.Certificate:
        if valid_days < 1:
            raise TrustError(f"valid_days must be at least 1, got {valid_days}", reason="bad_name")
        now = datetime.now(timezone.utc)
        # A certificate never outlives its CA: clients would refuse the chain after that anyway.
        not_after = min(now + timedelta(days=valid_days), self._certificate.not_valid_after_utc)
        server = kind == "server"
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        # Clients get a URI name as well: RFC 5280 verifiers (cryptography's among them) expect
        # a SAN on every end-entity certificate; the broker itself reads the CN.
        alt_names = (
            _alt_names(hostname)
            if hostname is not None
            else [x509.UniformResourceIdentifier(f"urn:edgefleet:{kind}:{name}")]
        )
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        with self._lock:
            index = self._read_index()
            index.certificates.append(
                _Issued(
                    serial=format(certificate.serial_number, "x"),
                    name=name,
                    kind=kind,
                    not_after=not_after,
                )
            )
            self._write_index(index)
        return certificate

    def _read_index(self) -> _Index:
        path = self._directory / "index.json"
        try:
            return _Index.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return _Index()
        except (OSError, ValidationError) as e:
            raise TrustError(
                f"the CA's certificate index {path} is unreadable or damaged ({e}); restore it "
                "from a backup — without it revocations cannot be listed",
                reason="index_corrupt",
            ) from e

    def _write_index(self, index: _Index) -> None:
        data = index.model_dump_json(by_alias=True, indent=2).encode()
        atomic_write(self._directory / "index.json", data, mode=0o644)


def check_device_name(device_id: str) -> None:
    """Raise :class:`EnrollmentError` unless ``device_id`` can name a device: a valid device id,
    and none of the fleet's own names at the broker (``edgefleet-...``), to which the broker's
    ACL grants other devices' topics."""
    try:
        check_device_id(device_id)
    except ValueError as e:
        raise EnrollmentError(str(e), reason="bad_device_id") from None
    if device_id == FLEET_CLIENT_NAME:
        raise EnrollmentError(
            f"{device_id!r} is the fleet service's own name at the broker and cannot name a "
            "device; choose another device id",
            reason="bad_device_id",
        )
    if device_id.startswith(RESERVED_PREFIX):
        raise EnrollmentError(
            f"device id {device_id!r} starts with {RESERVED_PREFIX!r}, which is kept for the "
            "fleet's own identities at the broker (its service, ingest workers and dashboards, "
            "which read every device's telemetry); choose a device id that does not",
            reason="bad_device_id",
        )


def _check_public_key(key: CertificatePublicKeyTypes) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EC_CURVES:
        return
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= _MIN_RSA_BITS:
        return
    raise EnrollmentError(
        f"the certificate request holds an unsupported key ({type(key).__name__}); use EC P-256 "
        f"(P-384, Ed25519 and RSA >= {_MIN_RSA_BITS} bits are also accepted)",
        reason="bad_csr",
    )


def _alt_names(hostname: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(hostname)))
    except ValueError:
        names.append(x509.DNSName(hostname))
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    if loopback not in names:
        names.append(loopback)
    return names
