"""What the agent remembers about trust across restarts: who it is, the director key it obeys,
the last desired-state sequence it applied, and whether its trust metadata is fresh.

Persisted in ``<state_dir>/trust/state.json``, replaced atomically on every change so a crash
never leaves a half-written file — losing ``last_applied_seq`` would reopen the door to replays.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from agent.files import atomic_write
from agent.trust.errors import TrustError
from protocol.director import DesiredState, DirectorError, check_device_id, verify_desired

__all__ = ["TrustState", "TrustStatus"]

TrustStatus = Literal["ok", "trust_stale"]
STATE_FILE = Path("trust") / "state.json"


class _Record(BaseModel):
    """The on-disk document (``schema: 1``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal[1] = Field(default=1, alias="schema")
    device_id: str | None = None
    director_public_key_pem: str | None = None
    last_applied_seq: int = Field(default=0, ge=0)
    status: TrustStatus = "ok"
    last_refresh: AwareDatetime | None = None
    reason: str | None = None


class TrustState:
    """The persisted trust state of one agent. Every mutating method saves before it returns."""

    def __init__(self, path: Path, record: _Record) -> None:
        self._path = path
        self._record = record
        self._director_key: Ed25519PublicKey | None = None
        if record.director_public_key_pem is not None:
            self._director_key = _load_director_key(record.director_public_key_pem.encode())

    @classmethod
    def load(cls, state_dir: Path) -> TrustState:
        """Open the trust state under ``state_dir``; a device never enrolled starts empty."""
        path = state_dir / STATE_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls(path, _Record())
        except OSError as e:
            raise TrustError(f"cannot read {path}: {e.strerror}", reason="state_unreadable") from e
        try:
            record = _Record.model_validate_json(raw)
        except ValidationError as e:
            # Guessing a default here could reset last_applied_seq and admit a replay.
            raise TrustError(
                f"{path} is damaged ({e.error_count()} problem(s), first: {e.errors()[0]['msg']}); "
                "the agent will not guess its trust state — restore the file or enroll again",
                reason="state_corrupt",
            ) from None
        return cls(path, record)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def device_id(self) -> str | None:
        return self._record.device_id

    @property
    def director_public_key_pem(self) -> bytes | None:
        pem = self._record.director_public_key_pem
        return None if pem is None else pem.encode()

    @property
    def last_applied_seq(self) -> int:
        return self._record.last_applied_seq

    @property
    def status(self) -> TrustStatus:
        return self._record.status

    @property
    def last_refresh(self) -> datetime | None:
        return self._record.last_refresh

    @property
    def reason(self) -> str | None:
        return self._record.reason

    def enroll(self, device_id: str, director_public_key_pem: bytes) -> None:
        """Remember who this device is and which director key it obeys.

        ``last_applied_seq`` is kept: the fleet's sequence numbers outlive a director key
        rotation, and resetting them would let an old document be replayed.
        """
        try:
            check_device_id(device_id)
        except ValueError as e:
            raise TrustError(str(e), reason="bad_device_id") from None
        key = _load_director_key(director_public_key_pem)
        self._save(
            device_id=device_id, director_public_key_pem=director_public_key_pem.decode("ascii")
        )
        self._director_key = key

    def accept(self, raw_desired: bytes, now: datetime) -> DesiredState:
        """Verify a desired-state document against the persisted key, device id and sequence.

        Does not record anything: call :meth:`applied` once the desired state has been applied.
        Raises :class:`TrustError` whose ``reason`` is the director's refusal reason.
        """
        if self._director_key is None or self._record.device_id is None:
            raise TrustError(
                "this device is not enrolled, so it has no director key to check desired states "
                "against; run `edgefleet agent enroll` first",
                reason="not_enrolled",
            )
        try:
            return verify_desired(
                raw_desired,
                self._director_key,
                device_id=self._record.device_id,
                last_seq=self._record.last_applied_seq,
                now=now,
            )
        except DirectorError as e:
            raise TrustError(f"desired state refused: {e}", reason=e.reason) from e

    def applied(self, seq: int) -> None:
        """Record that desired state ``seq`` was applied; older and equal ones are refused after."""
        if seq <= self._record.last_applied_seq:
            raise TrustError(
                f"cannot record seq {seq} as applied: seq {self._record.last_applied_seq} "
                "already was, and sequence numbers only move forward",
                reason="replayed",
            )
        self._save(last_applied_seq=seq)

    def refreshed(self, now: datetime) -> None:
        """Trust metadata was refreshed at ``now``: the status is ``ok`` again."""
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware, e.g. datetime.now(timezone.utc)")
        self._save(status="ok", last_refresh=now, reason=None)

    def stale(self, reason: str) -> None:
        """Trust metadata could not be refreshed: keep serving, report ``trust_stale`` and why."""
        self._save(status="trust_stale", reason=reason)

    def _save(self, **changes: object) -> None:
        # Validate the whole record again so a bad value (a naive datetime, ...) never lands.
        record = _Record.model_validate({**self._record.model_dump(), **changes})
        self._path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self._path, record.model_dump_json(by_alias=True, indent=2).encode())
        self._record = record


def _load_director_key(pem: bytes) -> Ed25519PublicKey:
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise TrustError(
            f"the director key is not a PEM public key ({e}); enroll the device again",
            reason="bad_director_key",
        ) from e
    if not isinstance(key, Ed25519PublicKey):
        raise TrustError(
            "the director key is not an Ed25519 public key; enroll the device again",
            reason="bad_director_key",
        )
    return key
