"""Settings of the fleet service (``edgefleet fleet serve``): the trust settings plus the store,
the broker link, the rollout loop and the API. Each field has an ``EDGEFLEET_FLEET_`` variable.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from fleet.trust.identities import check_ingest_workers
from fleet.trust.settings import FleetTrustSettings
from protocol.mqtt import DEFAULT_ROOT

__all__ = ["FleetSettings"]


class FleetSettings(FleetTrustSettings):
    """Everything ``fleet serve`` reads; the trust fields (home, host, port, URLs) included."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_FLEET_", frozen=True, extra="forbid")

    database: Path | None = Field(
        default=None, description="the fleet database (default: <home>/fleet.sqlite)"
    )
    embedded_broker: bool = Field(
        default=False,
        description="run an MQTT broker inside the service (one machine, loopback, no TLS)",
    )
    embedded_broker_port: int = Field(
        default=1883, ge=0, le=65535, description="port of the embedded broker"
    )
    service_broker_url: str = Field(
        default="",
        description="the broker the service itself connects to (default: broker_url)",
    )
    topic_root: str = Field(default=DEFAULT_ROOT, description="MQTT topic root")
    tick_s: float = Field(default=0.5, gt=0, description="seconds between rollout steps")
    device_timeout_s: float = Field(
        default=90.0, gt=0, description="seconds of silence after which a device is 'unknown'"
    )
    desired_validity_h: float = Field(
        default=720.0, gt=0, description="hours a signed desired state stays valid"
    )
    api_max_upload_mb: float = Field(
        default=2112.0, gt=0, description="largest bundle upload POST /models accepts, in MiB"
    )
    ingest_workers: int = Field(
        default=0,
        ge=0,
        description="0: the service takes telemetry itself; N (at most 8, the worker "
        "identities the broker's ACL names): `fleet ingest --workers N` does",
    )
    telemetry_raw_hours: float = Field(
        default=48.0, gt=0, description="hours raw telemetry windows are kept before rollup"
    )
    telemetry_retention_days: float = Field(
        default=30.0, gt=0, description="days hourly telemetry rollups are kept"
    )
    telemetry_compact_s: float = Field(
        default=600.0, gt=0, description="seconds between telemetry rollup and expiry passes"
    )
    drift_check_s: float = Field(
        default=30.0,
        gt=0,
        description="seconds between drift alert checks, and between the drift gate's readings "
        "of a wave's drift counts",
    )
    drift_window_s: float = Field(
        default=600.0, gt=0, description="seconds of drift counts each alert check sums"
    )
    drift_min_rows: int = Field(
        default=500, ge=1, description="rows a feature needs in the window before it alerts"
    )

    @field_validator("ingest_workers")
    @classmethod
    def _named_in_the_acl(cls, value: int) -> int:
        check_ingest_workers(value)
        return value

    @model_validator(mode="after")
    def _embedded_defaults(self) -> FleetSettings:
        # Frozen model: derived defaults are set once here, through object.__setattr__.
        if self.embedded_broker and "broker_url" not in self.model_fields_set:
            object.__setattr__(self, "broker_url", f"mqtt://127.0.0.1:{self.embedded_broker_port}")
        if not self.service_broker_url:
            object.__setattr__(self, "service_broker_url", self.broker_url)
        if self.embedded_broker and self.ingest_workers:
            raise ValueError(
                "ingest_workers needs a broker with shared subscriptions ($share), which the "
                "embedded broker (amqtt) does not have: run Mosquitto, or set ingest_workers 0"
            )
        return self

    @property
    def database_path(self) -> Path:
        return self.database if self.database is not None else self.home / "fleet.sqlite"
