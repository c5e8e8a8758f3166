"""Signing keys of the image repository: Ed25519 private keys in PEM files, loaded as signers.

Root and targets keys belong offline (a file on removable media today, a KMS or HSM signer URI
later); snapshot and timestamp keys are online because the repository re-signs those roles on
its own. Key files are written once with mode 0600 and never overwritten: replacing a key is a
rotation, done through a new root version, not a file write.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

# securesystemslib and tuf re-export these without `__all__` entries mypy can read.
from securesystemslib.signer import (
    CryptoSigner,
    Signer,
    SSlibKey,
)

from fleet.errors import KeyFileError

__all__ = ["ONLINE_ROLES", "ROLES", "KeyRef", "generate_key", "load_signer", "public_key"]

ROLES = ("root", "targets", "snapshot", "timestamp")
# The roles the repository signs by itself (after every publish, and when the timestamp ages).
ONLINE_ROLES = ("snapshot", "timestamp")

_MAX_KEY_FILE = 64 * 1024  # bytes; an Ed25519 PEM is about 120


@dataclass(frozen=True)
class KeyRef:
    """Where the private key of one role lives: a PEM file today, a signer URI later."""

    role: str
    path: Path

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise KeyFileError(
                f"unknown role {self.role!r} for key {self.path}; roles are {', '.join(ROLES)}",
                reason="unknown_role",
            )


def generate_key(path: Path) -> SSlibKey:
    """Write a new Ed25519 private key to ``path`` (PEM, mode 0600) and return its public key.

    Refuses to overwrite an existing file: a lost or replaced key file cannot be undone.
    """
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as e:
        raise KeyFileError(
            f"key file {path} already exists; choose a new path (keys are never overwritten)",
            reason="exists",
        ) from e
    except OSError as e:
        raise KeyFileError(f"cannot create key file {path}: {e.strerror or e}", reason="io") from e
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    return SSlibKey.from_crypto(private.public_key())


def load_signer(path: Path) -> Signer:
    """A signer for the Ed25519 private key in the PEM file ``path``."""
    try:
        if path.stat().st_size > _MAX_KEY_FILE:
            raise KeyFileError(f"{path} is too large to be a key file", reason="invalid")
        pem = path.read_bytes()
    except OSError as e:
        raise KeyFileError(
            f"cannot read key file {path}: {e.strerror or e}; check the path and its permissions",
            reason="missing",
        ) from e
    try:
        private = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(
            f"{path} is not an unencrypted PEM private key ({e}); "
            "create one with `edgefleet fleet keys init`",
            reason="invalid",
        ) from e
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyFileError(
            f"{path} holds a {type(private).__name__}; repository keys must be Ed25519",
            reason="invalid",
        )
    return CryptoSigner(private)


def public_key(path: Path) -> SSlibKey:
    """The public key of the private key file ``path``."""
    key = load_signer(path).public_key
    if not isinstance(key, SSlibKey):  # pragma: no cover - CryptoSigner always has an SSlibKey
        raise KeyFileError(f"{path}: unexpected public key type", reason="invalid")
    return key
