"""Enrollment: a one-time token lets a new device trade its certificate request for a client
certificate and everything it must trust (CA chain, TUF root, director key, broker address).

Tokens are 256-bit random strings. Only their sha256 is stored — with that much entropy a plain
hash cannot be reversed by guessing, so a slow password hash would add nothing — and a leaked
database therefore enrolls nobody. Each token works once and expires.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from fleet.errors import EnrollmentError
from fleet.trust.ca import DeviceCA, check_device_name

__all__ = ["EnrollmentBundle", "EnrollmentTokens", "enroll"]

# Lets secret scanners recognise a leaked token; a prefix, not a secret.
TOKEN_PREFIX = "eft_"  # noqa: S105
_SCHEMA = """
CREATE TABLE IF NOT EXISTS enrollment_tokens (
    token_sha256 TEXT PRIMARY KEY,
    device_id    TEXT NOT NULL,
    created      TEXT NOT NULL,
    expires      TEXT NOT NULL,
    redeemed     TEXT
)
"""


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class EnrollmentTokens:
    """One-time, expiring enrollment tokens in a SQLite file (one table, hashes only)."""

    def __init__(self, db_path: Path, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self._db_path = db_path
        self._clock = clock
        db_path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(_SCHEMA)

    def create(self, device_id: str, ttl: timedelta = timedelta(hours=24)) -> str:
        """A new token for ``device_id``, valid for ``ttl``. Earlier unused tokens for the same
        device stop working: only the newest one handed out can enroll it."""
        check_device_name(device_id)
        if ttl <= timedelta(0):
            raise EnrollmentError(f"ttl must be positive, got {ttl}", reason="bad_ttl")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self._clock()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "DELETE FROM enrollment_tokens WHERE device_id = ? AND redeemed IS NULL",
                (device_id,),
            )
            db.execute(
                "INSERT INTO enrollment_tokens (token_sha256, device_id, created, expires) "
                "VALUES (?, ?, ?, ?)",
                (_digest(token), device_id, now.isoformat(), (now + ttl).isoformat()),
            )
        return token

    def check(self, token: str) -> str:
        """The device id a usable token is for, without using it up."""
        with self._connect() as db:
            return self._usable(db, token)

    def redeem(self, token: str) -> str:
        """Use a token up and return its device id; a used, expired or unknown token raises
        :class:`EnrollmentError` with ``reason`` ``"used"``, ``"expired"`` or ``"unknown"``."""
        with self._connect() as db:
            # BEGIN IMMEDIATE takes the write lock first, so two concurrent redeems of one
            # token cannot both see it unused.
            db.execute("BEGIN IMMEDIATE")
            device_id = self._usable(db, token)
            db.execute(
                "UPDATE enrollment_tokens SET redeemed = ? WHERE token_sha256 = ?",
                (self._clock().isoformat(), _digest(token)),
            )
            return device_id

    def _usable(self, db: sqlite3.Connection, token: str) -> str:
        row = db.execute(
            "SELECT device_id, expires, redeemed FROM enrollment_tokens WHERE token_sha256 = ?",
            (_digest(token),),
        ).fetchone()
        if row is None:
            raise EnrollmentError(
                "unknown enrollment token (mistyped, or replaced by a newer token for the same "
                "device); ask the operator for a new one: `edgefleet fleet enroll-token`",
                reason="unknown",
            )
        device_id, expires, redeemed = row
        if redeemed is not None:
            raise EnrollmentError(
                f"this enrollment token for {device_id!r} was already used at {redeemed}; "
                "tokens work once — ask the operator for a new one",
                reason="used",
            )
        if datetime.fromisoformat(expires) <= self._clock():
            raise EnrollmentError(
                f"this enrollment token for {device_id!r} expired at {expires}; ask the "
                "operator for a new one",
                reason="expired",
            )
        return str(device_id)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # Autocommit mode, with explicit transactions where they matter; a connection per call
        # keeps the object usable from any thread.
        try:
            db = sqlite3.connect(self._db_path, isolation_level=None, timeout=10)
        except sqlite3.Error as e:
            raise EnrollmentError(
                f"cannot open the enrollment database {self._db_path}: {e}", reason="database"
            ) from e
        try:
            yield db
            if db.in_transaction:
                db.execute("COMMIT")
        except sqlite3.Error as e:
            raise EnrollmentError(
                f"the enrollment database {self._db_path} failed: {e}", reason="database"
            ) from e
        finally:
            if db.in_transaction:
                db.rollback()
            db.close()


@dataclass(frozen=True)
class EnrollmentBundle:
    """What an enrolled device receives."""

    device_id: str
    certificate_pem: bytes
    ca_chain_pem: bytes
    trusted_root: bytes  # the TUF root.json the device bootstraps its catalogue from
    director_public_key_pem: bytes
    broker_url: str


def enroll(
    tokens: EnrollmentTokens,
    ca: DeviceCA,
    token: str,
    csr_pem: bytes,
    *,
    trusted_root: bytes,
    director_public_pem: bytes,
    broker_url: str,
) -> EnrollmentBundle:
    """Trade a token and a certificate request for an :class:`EnrollmentBundle`.

    The token is used up only once the certificate exists, so a device whose request was bad,
    or met a fleet-side failure, can retry with the same token. Redeeming is atomic: of two
    racing uses one fails and its certificate is never handed out.
    """
    device_id = tokens.check(token)
    certificate = ca.issue(csr_pem, device_id)  # checks the request before signing anything
    tokens.redeem(token)
    return EnrollmentBundle(
        device_id=device_id,
        certificate_pem=certificate,
        ca_chain_pem=ca.chain_pem(),
        trusted_root=trusted_root,
        director_public_key_pem=director_public_pem,
        broker_url=broker_url,
    )
