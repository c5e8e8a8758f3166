"""The device's identity: its private key, its certificate signing request, and the files that
enrollment hands back (certificate, CA chain, trusted TUF root, director key, broker address).

The key is EC P-256: every OpenSSL build that Mosquitto links against accepts it for TLS client
authentication (1.2 and 1.3), which is not yet true of Ed25519 certificates. The private key is
created with mode 0600 from the first byte and never leaves the device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from agent.files import atomic_write
from agent.trust.errors import TrustError
from protocol.director import check_device_id

__all__ = [
    "IdentityFiles",
    "create_device_key",
    "load_device_key",
    "make_csr",
    "save_enrollment",
]


@dataclass(frozen=True)
class IdentityFiles:
    """Where the identity lives inside its directory (``<state_dir>/trust/identity`` by default)."""

    directory: Path

    @property
    def key(self) -> Path:
        return self.directory / "device.key"

    @property
    def certificate(self) -> Path:
        return self.directory / "device.crt"

    @property
    def ca_chain(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def trusted_root(self) -> Path:
        return self.directory / "root.json"

    @property
    def director_key(self) -> Path:
        return self.directory / "director.pem"

    @property
    def enrollment(self) -> Path:
        """``{"device_id": ..., "broker_url": ...}``"""
        return self.directory / "enrollment.json"


def create_device_key(directory: Path) -> Path:
    """Create the device's EC P-256 private key (PEM, mode 0600) and return its path.

    An existing key is kept and returned, so a retried enrollment keeps the same identity.
    """
    files = IdentityFiles(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if files.key.exists():
        load_device_key(files.key)  # refuse a damaged or foreign key now, not at TLS time
        return files.key
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(files.key, pem, mode=0o600)
    return files.key


def load_device_key(key_path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the device key, refusing a key readable by others or of the wrong kind."""
    try:
        mode = key_path.stat().st_mode & 0o777
        data = key_path.read_bytes()
    except OSError as e:
        raise TrustError(
            f"cannot read the device key {key_path}: {e.strerror}; enroll the device first",
            reason="no_identity",
        ) from e
    if mode & 0o077:
        raise TrustError(
            f"device key {key_path} has mode {mode:o}; it must be readable by its owner only "
            f"(chmod 600 {key_path})",
            reason="key_permissions",
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise TrustError(
            f"device key {key_path} is not an unencrypted PEM private key ({e}); remove it and "
            "enroll again",
            reason="bad_key",
        ) from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise TrustError(
            f"device key {key_path} is not an EC P-256 key; remove it and enroll again",
            reason="bad_key",
        )
    return key


def make_csr(key_path: Path, device_id: str) -> bytes:
    """A PEM certificate signing request with CN = ``device_id``, signed by the device key."""
    _valid_device_id(device_id)
    key = load_device_key(key_path)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def save_enrollment(
    directory: Path,
    *,
    device_id: str,
    certificate_pem: bytes,
    ca_chain_pem: bytes,
    trusted_root: bytes,
    director_public_key_pem: bytes,
    broker_url: str,
) -> IdentityFiles:
    """Check what the fleet returned against the device's own key, then write it atomically.

    Everything is checked before anything is written, so a bad answer leaves the previous
    enrollment (if any) intact.
    """
    _valid_device_id(device_id)
    files = IdentityFiles(directory)
    key = load_device_key(files.key)
    cert = _load_certificate(certificate_pem, "certificate")
    chain = _load_chain(ca_chain_pem)
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [device_id]:
        raise TrustError(
            f"the fleet issued a certificate for {cns}, not for device {device_id!r}",
            reason="bad_enrollment",
        )
    if cert.public_key() != key.public_key():
        raise TrustError(
            "the issued certificate does not hold this device's public key: the fleet answered "
            "another device's request; enroll again with a new token",
            reason="bad_enrollment",
        )
    issuer = next((c for c in chain if c.subject == cert.issuer), None)
    try:
        if issuer is None:
            raise ValueError("no certificate in the CA chain is its issuer")
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise TrustError(
            f"the issued certificate does not chain to the CA chain that came with it: {e}",
            reason="bad_enrollment",
        ) from e
    try:
        root = json.loads(trusted_root)
        if not isinstance(root, dict) or root.get("signed", {}).get("_type") != "root":
            raise ValueError("not TUF root metadata (signed._type must be 'root')")
    except (ValueError, AttributeError) as e:
        raise TrustError(
            f"the trusted root from the fleet is not TUF root metadata: {e}",
            reason="bad_enrollment",
        ) from e
    try:
        director = serialization.load_pem_public_key(director_public_key_pem)
    except (ValueError, TypeError) as e:
        raise TrustError(
            f"the director public key from the fleet is not a PEM public key: {e}",
            reason="bad_enrollment",
        ) from e
    if not isinstance(director, Ed25519PublicKey):
        raise TrustError(
            "the director public key from the fleet is not an Ed25519 key", reason="bad_enrollment"
        )
    info = json.dumps({"device_id": device_id, "broker_url": broker_url}, indent=2).encode()
    # The certificate is written last: its presence is what marks the device as enrolled.
    atomic_write(files.ca_chain, ca_chain_pem, mode=0o644)
    atomic_write(files.trusted_root, trusted_root, mode=0o644)
    atomic_write(files.director_key, director_public_key_pem, mode=0o644)
    atomic_write(files.enrollment, info, mode=0o644)
    atomic_write(files.certificate, certificate_pem, mode=0o644)
    return files


def _valid_device_id(device_id: str) -> None:
    try:
        check_device_id(device_id)
    except ValueError as e:
        raise TrustError(str(e), reason="bad_device_id") from None


def _load_certificate(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise TrustError(
            f"the {what} from the fleet is not a PEM certificate: {e}", reason="bad_enrollment"
        ) from e


def _load_chain(pem: bytes) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise TrustError(
            f"the CA chain from the fleet is not PEM certificates: {e}", reason="bad_enrollment"
        ) from e
    return chain
