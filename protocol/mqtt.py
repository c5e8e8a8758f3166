"""The MQTT contract between agents and the fleet: topic names and the messages on them.

Every topic lives under one root (``edgefleet/v1`` by default) and names one device::

    <root>/devices/<id>/state       agent → fleet, QoS 1, retained; the LWT says "lost"
    <root>/devices/<id>/desired     fleet → agent, QoS 1, retained; a director-signed document
    <root>/devices/<id>/update      agent → fleet, QoS 1; progress of one desired state
    <root>/devices/<id>/telemetry/… agent → fleet, QoS 1; windows of metrics and drift counts
    <root>/devices/<id>/events      agent → fleet, QoS 1; notable events

Payloads are JSON with ``schema`` and ``device_id``. :func:`decode` is the one way in: it bounds
the size, parses, validates and checks that the payload's device is the topic's device, and
raises :class:`MessageError` naming the problem, so a reader can log it and carry on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from protocol.director import DEVICE_ID_PATTERN, check_device_id
from protocol.errors import ProtocolError

__all__ = [
    "DEFAULT_ROOT",
    "MAX_MESSAGE",
    "ActiveModel",
    "AgentState",
    "BrokerAddress",
    "DeviceEvent",
    "MessageError",
    "ProbationReport",
    "TlsFiles",
    "Topic",
    "TopicKind",
    "Topics",
    "TrustSummary",
    "UpdateProgress",
    "UpdateStage",
    "VersionWindow",
    "decode",
    "encode",
]

DEFAULT_ROOT = "edgefleet/v1"
MAX_MESSAGE = 256 * 1024  # bytes; state, progress and events are a few KiB at most
MAX_SEQ = 2**63 - 1  # sequence numbers are stored as SQLite integers

TopicKind = Literal["state", "desired", "update", "events", "telemetry"]
_KINDS: frozenset[str] = frozenset({"state", "desired", "update", "events"})

# The stages of one desired state on a device, in the order they happen. The last four end it.
UpdateStage = Literal[
    "received",
    "downloading",
    "verifying",
    "loading",
    "probation",
    "committed",
    "refused",
    "failed",
    "rolled_back",
]
FINAL_STAGES: frozenset[str] = frozenset({"committed", "refused", "failed", "rolled_back"})


class MessageError(ProtocolError):
    """An MQTT message that cannot be used; ``reason`` is one word for logs and counters."""

    def __init__(
        self,
        message: str,
        *,
        reason: Literal["topic", "too_large", "not_json", "schema", "wrong_device"],
    ) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is: ``mqtts://host:8883`` (mutual TLS) or ``mqtt://host:1883``."""

    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Parse a broker URL; raises ValueError saying what a valid one looks like."""
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or port == -1:
            raise ValueError(
                f"broker URL {url!r} must look like mqtts://host:8883 or mqtt://host:1883"
            )
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, port or (8883 if tls else 1883), tls)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class TlsFiles:
    """A client's key and certificate, and the CA chain that signed the broker's certificate."""

    ca: Path
    certificate: Path
    key: Path


@dataclass(frozen=True)
class Topic:
    """A parsed topic: which device, which kind, and for telemetry the rest (``metrics``)."""

    device_id: str
    kind: TopicKind
    sub: str = ""


@dataclass(frozen=True)
class Topics:
    """Topic names under one root; ``parse`` is their inverse."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        if not self.root or any(c in self.root for c in "+#") or self.root.endswith("/"):
            raise ValueError(
                f"topic root {self.root!r} must be non-empty, without '+', '#' or a trailing '/'"
            )

    def device(self, device_id: str, kind: TopicKind, sub: str = "") -> str:
        check_device_id(device_id)
        topic = f"{self.root}/devices/{device_id}/{kind}"
        return f"{topic}/{sub}" if sub else topic

    def state(self, device_id: str) -> str:
        return self.device(device_id, "state")

    def desired(self, device_id: str) -> str:
        return self.device(device_id, "desired")

    def update(self, device_id: str) -> str:
        return self.device(device_id, "update")

    def events(self, device_id: str) -> str:
        return self.device(device_id, "events")

    def telemetry(self, device_id: str, kind: str) -> str:
        return self.device(device_id, "telemetry", kind)

    def every_device(self, kind: TopicKind) -> str:
        """The subscription filter for ``kind`` from every device."""
        return f"{self.root}/devices/+/{kind}" + ("/#" if kind == "telemetry" else "")

    def parse(self, topic: str) -> Topic:
        """Split a topic into device and kind; raise :class:`MessageError` if it is not ours."""
        prefix = f"{self.root}/devices/"
        if not topic.startswith(prefix):
            raise MessageError(f"topic {topic!r} is not under {prefix!r}", reason="topic")
        parts = topic[len(prefix) :].split("/")
        if len(parts) < 2:
            raise MessageError(f"topic {topic!r} names no message kind", reason="topic")
        device_id, kind, rest = parts[0], parts[1], parts[2:]
        try:
            check_device_id(device_id)
        except ValueError as e:
            raise MessageError(f"topic {topic!r}: {e}", reason="topic") from None
        if kind == "telemetry" and rest and all(rest):
            return Topic(device_id, "telemetry", "/".join(rest))
        if kind in _KINDS and not rest:
            return Topic(device_id, kind, "")  # type: ignore[arg-type]  # checked just above
        raise MessageError(f"topic {topic!r} is not an edgefleet message topic", reason="topic")


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal[1] = Field(default=1, alias="schema")
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)


class ActiveModel(BaseModel):
    """One model as a device serves it right now."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(max_length=64)
    version: str | None = Field(default=None, max_length=128)
    sha256: str | None = Field(default=None, max_length=64)
    runtime: str | None = Field(default=None, max_length=32)
    device: str | None = Field(default=None, max_length=64, description="where it really runs")
    fallback: str | None = Field(default=None, max_length=200, description="name@version")
    error: str | None = Field(default=None, max_length=2000, description="why it is not loaded")
    shadow: str | None = Field(
        default=None, max_length=128, description="the version running beside it as a shadow"
    )


class TrustSummary(BaseModel):
    """The device's trust status: ``ok``, ``stale`` (with a reason) or ``not_enrolled``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    status: str = Field(max_length=32)
    reason: str | None = Field(default=None, max_length=200)
    last_applied_seq: int = Field(default=0, ge=0, le=MAX_SEQ)


class AgentState(_Message):
    """Retained on ``state``: what the device runs. The LWT is the same with ``state='lost'``."""

    state: Literal["online", "lost", "offline"] = "online"
    at: AwareDatetime | None = None
    agent_version: str | None = Field(default=None, max_length=64)
    models: tuple[ActiveModel, ...] = Field(default=(), max_length=64)
    hardware: dict[str, str | int | float | bool] = Field(default_factory=dict, max_length=64)
    trust: TrustSummary | None = None
    update: UpdateProgress | None = Field(
        default=None, description="the last desired state's progress, so a restarted fleet sees it"
    )

    @model_validator(mode="after")
    def _own_update(self) -> AgentState:
        # A device speaks for itself only: its state cannot carry another device's progress.
        if self.update is not None and self.update.device_id != self.device_id:
            raise ValueError(
                f"update names device {self.update.device_id!r}, not {self.device_id!r}"
            )
        return self


class VersionWindow(BaseModel):
    """How one version served during a window: the numbers probation and gates compare."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str = Field(max_length=128)
    requests: int = Field(ge=0)
    errors: int = Field(ge=0, description="requests the primary failed (fallback or error)")
    fallbacks: int = Field(ge=0, description="requests the fallback answered")
    p95_ms: float | None = Field(default=None, ge=0)
    seconds: float = Field(ge=0, description="length of the window")

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def fallback_rate(self) -> float | None:
        return self.fallbacks / self.requests if self.requests else None


class ProbationReport(BaseModel):
    """The new version's probation window beside the previous version's baseline window."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(max_length=64)
    candidate: VersionWindow
    baseline: VersionWindow | None = None
    verdict: Literal["passed", "failed"]
    reason: str | None = Field(default=None, max_length=2000)


class UpdateProgress(_Message):
    """On ``update``: one step of one desired state (``seq``) on one device."""

    seq: int | None = Field(
        default=None,
        ge=1,
        le=MAX_SEQ,
        description="None when the document could not be trusted",
    )
    rollout_id: str | None = Field(default=None, max_length=64)
    stage: UpdateStage
    at: AwareDatetime
    reason: str | None = Field(default=None, max_length=64, description="one word: hash_mismatch")
    detail: str = Field(default="", max_length=4000)
    models: tuple[str, ...] = Field(default=(), max_length=64, description="name@version")
    done_bytes: int | None = Field(default=None, ge=0)
    total_bytes: int | None = Field(default=None, ge=0)
    probation: tuple[ProbationReport, ...] = Field(default=(), max_length=64)

    @property
    def final(self) -> bool:
        return self.stage in FINAL_STAGES


class DeviceEvent(_Message):
    """On ``events``: something an operator should see (fallback engaged, rollback, ...)."""

    kind: str = Field(max_length=64)
    at: AwareDatetime
    model: str | None = Field(default=None, max_length=64)
    detail: str = Field(default="", max_length=4000)


AgentState.model_rebuild()

M = TypeVar("M", bound=_Message)


def encode(message: _Message) -> bytes:
    """The JSON bytes published for ``message``."""
    return message.model_dump_json(by_alias=True, exclude_none=True).encode()


def decode(kind: type[M], payload: bytes, *, device_id: str | None = None) -> M:
    """Parse and validate a payload; when ``device_id`` is given the payload must name it."""
    if len(payload) > MAX_MESSAGE:
        raise MessageError(
            f"{kind.__name__} message is {len(payload)} bytes, over the {MAX_MESSAGE}-byte limit",
            reason="too_large",
        )
    try:
        message = kind.model_validate_json(payload)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        reason: Literal["not_json", "schema"] = (
            "not_json" if first["type"] == "json_invalid" else "schema"
        )
        raise MessageError(
            f"{kind.__name__} message is invalid: {where}: {first['msg']}"
            + (f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""),
            reason=reason,
        ) from None
    if device_id is not None and message.device_id != device_id:
        raise MessageError(
            f"{kind.__name__} message on device {device_id!r}'s topic names device "
            f"{message.device_id!r}",
            reason="wrong_device",
        )
    return message
