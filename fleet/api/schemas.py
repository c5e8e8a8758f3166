"""What the REST API reads and returns: frozen pydantic models, one per document.

Store rows are not returned as they are: a view says what an operator needs (a device's derived
health, a version's parity report and drift profile) and nothing the API must not show (a
token's hash).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fleet.store import Device, DeviceHealth, ModelVersion, Selector, TokenInfo
from fleet.store.telemetry import Gap, TelemetryStream
from fleet.store.tokens import TOKEN_NAME_PATTERN, Role
from protocol.director import ModelTarget
from protocol.manifest import DriftProfile, Manifest, ParityReport
from protocol.mqtt import ActiveModel

__all__ = [
    "DeviceDetail",
    "DeviceTelemetry",
    "DeviceView",
    "GapView",
    "Health",
    "LabelChange",
    "LabelCount",
    "ModelDetail",
    "ModelSummary",
    "TokenCreate",
    "TokenCreated",
    "UpdateLogView",
    "VersionDetail",
    "VersionSummary",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Health(_Frozen):
    status: str = "ok"
    schema_version: int


# -- models ------------------------------------------------------------------------------------


class VersionSummary(_Frozen):
    """One published version, as lists show it."""

    name: str
    version: str
    release: int
    runtime: str
    quantization: str
    sha256: str
    length: int = Field(description="bytes")
    published_at: datetime
    published_by: str

    @classmethod
    def of(cls, v: ModelVersion) -> VersionSummary:
        return cls(
            name=v.name,
            version=v.version,
            release=v.release,
            runtime=v.runtime,
            quantization=v.manifest.quantization.method,
            sha256=v.sha256,
            length=v.length,
            published_at=v.published_at,
            published_by=v.published_by,
        )


class ModelSummary(_Frozen):
    """One model: how many versions, and the latest one."""

    name: str
    versions: int
    latest: VersionSummary


class ModelDetail(_Frozen):
    """One model with every published version, oldest release first."""

    name: str
    versions: tuple[VersionSummary, ...]


class VersionDetail(VersionSummary):
    """One version in full: the catalogue target, the manifest, its parity and drift profile."""

    target: ModelTarget
    fallback: str | None
    parity: ParityReport | None
    drift: DriftProfile | None
    manifest: Manifest

    @classmethod
    def of_version(cls, v: ModelVersion) -> VersionDetail:
        manifest = v.manifest
        return cls(
            **VersionSummary.of(v).model_dump(),
            target=v.target(),
            fallback=str(manifest.fallback) if manifest.fallback is not None else None,
            parity=manifest.quantization.parity,
            drift=manifest.drift,
            manifest=manifest,
        )


# -- devices -----------------------------------------------------------------------------------


class DeviceView(_Frozen):
    """One device: its derived health and what it last said it runs."""

    id: str
    health: DeviceHealth
    connection: str
    last_seen: datetime | None
    first_seen: datetime | None
    enrolled_at: datetime | None
    agent_version: str | None
    trust_status: str | None
    models: tuple[ActiveModel, ...]
    groups: tuple[str, ...]
    tags: tuple[str, ...]

    @classmethod
    def of(cls, device: Device, now: datetime, timeout: timedelta) -> DeviceView:
        return cls(**_device_fields(device, now, timeout))


class UpdateLogView(_Frozen):
    """One ``update`` message a device sent."""

    seq: int | None
    rollout_id: str | None
    stage: str
    reason: str | None
    detail: str | None
    at: datetime


class DeviceDetail(DeviceView):
    """One device with its hardware, the last desired sequence and its recent updates."""

    hardware: dict[str, Any]
    desired_seq: int
    updates: tuple[UpdateLogView, ...]

    @classmethod
    def of_device(
        cls,
        device: Device,
        now: datetime,
        timeout: timedelta,
        updates: tuple[UpdateLogView, ...],
    ) -> DeviceDetail:
        return cls(
            **_device_fields(device, now, timeout),
            hardware=dict(device.state.hardware) if device.state is not None else {},
            desired_seq=device.desired_seq,
            updates=updates,
        )


def _device_fields(device: Device, now: datetime, timeout: timedelta) -> dict[str, Any]:
    return {
        "id": device.id,
        "health": device.health(now, timeout),
        "connection": device.connection,
        "last_seen": device.last_seen,
        "first_seen": device.first_seen,
        "enrolled_at": device.enrolled_at,
        "agent_version": device.agent_version,
        "trust_status": device.trust_status,
        "models": device.state.models if device.state is not None else (),
        "groups": device.groups,
        "tags": device.tags,
    }


class LabelChange(_Request):
    """Groups and tags to add to and remove from one device (removals apply first)."""

    add_groups: tuple[str, ...] = ()
    remove_groups: tuple[str, ...] = ()
    add_tags: tuple[str, ...] = ()
    remove_tags: tuple[str, ...] = ()

    @field_validator("add_groups", "add_tags")
    @classmethod
    def _labels(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        # The selector checks labels exactly as the registry stores them.
        return Selector(groups=values).groups

    @property
    def empty(self) -> bool:
        return not (self.add_groups or self.remove_groups or self.add_tags or self.remove_tags)


class LabelCount(_Frozen):
    """A group or tag and how many devices carry it."""

    name: str
    devices: int


class GapView(_Frozen):
    """Sequence numbers ``first_seq..last_seq`` of a device that the fleet never received."""

    first_seq: int
    last_seq: int
    size: int = Field(description="how many sequence numbers")
    cause: Literal["missing", "dropped"] = Field(
        description="missing: not received (yet); dropped: the device's spool discarded them"
    )
    noticed_at: datetime


class DeviceTelemetry(_Frozen):
    """A device's telemetry stream as the fleet received it, and one page of its gaps."""

    device_id: str
    high_seq: int = Field(description="highest sequence number taken; 0: none yet")
    received: int = Field(description="records taken, duplicates not counted")
    duplicates: int = Field(description="records that arrived again (replays), ignored")
    dropped: int = Field(description="records the device said its spool dropped")
    missing: int = Field(description="seqs below high_seq neither received nor said dropped")
    last_at: datetime | None = Field(description="when its last record arrived; null: never")
    gap_ranges: int = Field(description="how many gaps it has, of either cause")
    gaps: tuple[GapView, ...] = Field(description="gaps above `after`, lowest first")
    next_after: int | None = Field(
        description="more gaps follow: ask again with this as `after`; null: none"
    )

    @classmethod
    def of(
        cls, device_id: str, stream: TelemetryStream | None, gaps: Sequence[Gap], more: bool
    ) -> DeviceTelemetry:
        return cls(
            device_id=device_id,
            high_seq=stream.high_seq if stream else 0,
            received=stream.received if stream else 0,
            duplicates=stream.duplicates if stream else 0,
            dropped=stream.dropped if stream else 0,
            missing=stream.missing if stream else 0,
            last_at=stream.last_at if stream else None,
            gap_ranges=stream.gap_ranges if stream else 0,
            gaps=tuple(
                GapView(
                    first_seq=g.first_seq,
                    last_seq=g.last_seq,
                    size=g.size,
                    cause=g.cause,
                    noticed_at=g.noticed_at,
                )
                for g in gaps
            ),
            next_after=gaps[-1].first_seq if more and gaps else None,
        )


# -- tokens ------------------------------------------------------------------------------------


class TokenCreate(_Request):
    name: str = Field(pattern=TOKEN_NAME_PATTERN, description="who or what uses the token")
    role: Role = "viewer"


class TokenCreated(_Frozen):
    """A new token; ``secret`` is shown this once."""

    token: TokenInfo
    secret: str
