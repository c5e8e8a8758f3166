"""Director-signed desired-state documents: which model versions one device should run.

The fleet signs each document with its online director key (Ed25519); the agent accepts one only
when the signature, the device id, the sequence number (greater than the last applied) and the
expiry all check out. A forged or replayed message therefore costs at most a refused no-op.

The signature covers the canonical JSON of ``signed``: keys sorted, no whitespace, field aliases
(``schema``), so that the same document always signs to the same bytes whatever produced it.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from protocol.errors import ProtocolError

__all__ = [
    "DEVICE_ID_PATTERN",
    "DesiredState",
    "DirectorError",
    "DirectorRefusal",
    "ModelTarget",
    "SignedDesiredState",
    "canonical_json",
    "check_device_id",
    "director_keyid",
    "sign_desired",
    "verify_desired",
]

DirectorRefusal = Literal[
    "malformed", "unsigned", "bad_signature", "wrong_key", "wrong_device", "replayed", "expired"
]

# A device id is an MQTT topic level, a certificate CN and the broker username at once: no '/',
# '+', '#', spaces or anything a shell or a path would read specially; 64 characters at most,
# the X.509 bound on a common name.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
_SHA256 = r"^[0-9a-f]{64}$"
# An Ed25519 signature is 64 bytes, 128 hex characters.
_SIGNATURE = r"^[0-9a-f]{128}$"
_MAX_DOCUMENT = 256 * 1024  # bytes; a desired state names a handful of models, never megabytes


class DirectorError(ProtocolError):
    """A desired-state document was refused; ``reason`` says which check failed."""

    def __init__(self, message: str, *, reason: DirectorRefusal) -> None:
        super().__init__(message)
        self.reason: DirectorRefusal = reason


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if it can name a device (topic level, certificate CN); else raise."""
    if not _DEVICE_ID.fullmatch(device_id):
        raise ValueError(
            f"{device_id!r} is not a valid device id: use 1-64 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
    return device_id


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class ModelTarget(_Frozen):
    """One model version the device should run, named as a target of the TUF image repository."""

    name: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=128)
    target_path: str = Field(min_length=1, max_length=512)
    sha256: str = Field(pattern=_SHA256)
    length: int = Field(gt=0, description="bytes")
    role: Literal["primary", "shadow"] = Field(
        default="primary",
        description="shadow: loaded beside the primary and fed the same inputs; its answers "
        "are compared, never returned",
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # "primary" is left out: a document signed before targets had roles keeps its bytes,
        # so its signature still verifies.
        data: dict[str, Any] = handler(self)
        if data.get("role") == "primary":
            del data["role"]
        return data

    @model_validator(mode="after")
    def _relative_path(self) -> ModelTarget:
        # The agent joins this path onto its download URL and staging dir: keep it inside both.
        parts = self.target_path.split("/")
        if self.target_path.startswith("/") or "\\" in self.target_path or ".." in parts:
            raise ValueError(
                f"target_path {self.target_path!r} must be a relative path without '..' or '\\'"
            )
        return self


class DesiredState(_Frozen):
    """What one device should run, as of sequence number ``seq``."""

    schema_: Literal[1] = Field(default=1, alias="schema")
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    seq: int = Field(
        ge=1, description="monotonic per device; the agent refuses seq <= last applied"
    )
    issued: AwareDatetime
    expires: AwareDatetime
    rollout_id: str | None = None
    models: tuple[ModelTarget, ...]

    @model_validator(mode="after")
    def _consistent(self) -> DesiredState:
        if self.expires <= self.issued:
            raise ValueError(
                f"expires ({self.expires.isoformat()}) must be later than issued "
                f"({self.issued.isoformat()})"
            )
        seen: set[tuple[str, str]] = set()
        roles: set[tuple[str, str]] = set()
        for model in self.models:
            key = (model.name, model.version)
            if key in seen:
                raise ValueError(f"models lists {model.name}@{model.version} twice")
            seen.add(key)
            if (model.name, model.role) in roles:
                raise ValueError(
                    f"models lists two {model.role} versions of {model.name}; a device runs "
                    "one primary and at most one shadow per model"
                )
            roles.add((model.name, model.role))
        return self


class SignedDesiredState(_Frozen):
    """A desired state with the director's Ed25519 signature (hex) and the signing key's id."""

    signed: DesiredState
    signature: str = Field(pattern=_SIGNATURE)
    keyid: str = Field(pattern=_SHA256)

    def to_json(self) -> bytes:
        """The document as published on ``devices/<id>/desired``."""
        return self.model_dump_json(by_alias=True).encode()


def canonical_json(state: DesiredState) -> bytes:
    """The bytes a director signature covers."""
    document = state.model_dump(mode="json", by_alias=True)
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def director_keyid(public_key: Ed25519PublicKey) -> str:
    """Hex sha256 of the raw 32-byte public key: names the key without carrying it."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign_desired(state: DesiredState, key: Ed25519PrivateKey) -> SignedDesiredState:
    """Sign ``state`` with the director key."""
    signature = key.sign(canonical_json(state))
    return SignedDesiredState(
        signed=state, signature=signature.hex(), keyid=director_keyid(key.public_key())
    )


def verify_desired(
    raw: bytes, key: Ed25519PublicKey, *, device_id: str, last_seq: int, now: datetime
) -> DesiredState:
    """Accept a published desired-state document, or raise :class:`DirectorError` saying why.

    Checks, in order: well-formed, signed, by ``key``, signature valid, for ``device_id``,
    ``seq`` greater than ``last_seq``, not expired at ``now`` (timezone-aware).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware, e.g. datetime.now(timezone.utc)")
    document = _parse(raw)
    expected = director_keyid(key)
    if document.keyid != expected:
        raise DirectorError(
            f"desired state is signed by key {document.keyid[:16]}…, not by this device's "
            f"director key {expected[:16]}…; re-enroll the device if the director key was rotated",
            reason="wrong_key",
        )
    try:
        key.verify(bytes.fromhex(document.signature), canonical_json(document.signed))
    except InvalidSignature:
        raise DirectorError(
            "desired state signature does not match its content: the document was altered "
            "after signing or forged",
            reason="bad_signature",
        ) from None
    state = document.signed
    if state.device_id != device_id:
        raise DirectorError(
            f"desired state is for device {state.device_id!r}, not for this device {device_id!r}",
            reason="wrong_device",
        )
    if state.seq <= last_seq:
        raise DirectorError(
            f"desired state seq {state.seq} is not newer than the last applied seq {last_seq}: "
            "a replayed or out-of-order document",
            reason="replayed",
        )
    if state.expires <= now:
        raise DirectorError(
            f"desired state seq {state.seq} expired at {state.expires.isoformat()} "
            f"(now {now.isoformat()}); the fleet must publish a fresh one, or check the clock",
            reason="expired",
        )
    return state


def _parse(raw: bytes) -> SignedDesiredState:
    if len(raw) > _MAX_DOCUMENT:
        raise DirectorError(
            f"desired state is {len(raw)} bytes, over the {_MAX_DOCUMENT}-byte limit",
            reason="malformed",
        )
    try:
        data: Any = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested arrays
        raise DirectorError(f"desired state is not valid JSON: {e}", reason="malformed") from None
    if not isinstance(data, dict):
        raise DirectorError(
            f"desired state must be a JSON object, got {type(data).__name__}", reason="malformed"
        )
    if not data.get("signature") or not data.get("keyid") or "signed" not in data:
        raise DirectorError(
            "desired state carries no director signature (expected 'signed', 'signature' and "
            "'keyid'); unsigned documents are never applied",
            reason="unsigned",
        )
    try:
        return SignedDesiredState.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc']) or 'document'}: {item['msg']}"
            for item in e.errors()
        )
        raise DirectorError(f"desired state is invalid: {problems}", reason="malformed") from None
