"""The agent's configuration: read once from flags and ``EDGEFLEET_AGENT_*`` variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from agent.devices import parse_devices
from agent.errors import ModelLoadError
from agent.runner import RunnerConfig
from agent.runtimes.base import RuntimeOptions
from agent.serving import ServingConfig
from agent.shadow import ShadowConfig
from agent.telemetry.collector import TelemetryConfig
from protocol.mqtt import DEFAULT_ROOT

__all__ = ["AgentSettings", "default_state_dir"]


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/edgefleet/agent``, or ``~/.local/state/edgefleet/agent``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edgefleet" / "agent"


def _split(value: object) -> object:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class AgentSettings(BaseSettings):
    """Every setting of ``edgefleet agent serve``; each has an ``EDGEFLEET_AGENT_`` variable."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_AGENT_", frozen=True, extra="forbid")

    bundles: Annotated[tuple[Path, ...], NoDecode] = Field(
        default=(), description="bundles to install and serve (comma-separated in the variable)"
    )
    fallback: Path | None = Field(default=None, description="the pinned fallback bundle")
    device: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("CPU",), description="device preference, first that works wins: NPU,GPU,CPU"
    )
    host: str = Field(default="127.0.0.1", description="TCP address to listen on")
    port: int = Field(default=8470, ge=0, le=65535, description="TCP port; 0 picks a free one")
    socket: Path | None = Field(
        default=None, description="Unix socket path (default: <state-dir>/agent.sock)"
    )
    state_dir: Path = Field(default_factory=default_state_dir, description="model store and state")
    token: SecretStr | None = Field(default=None, description="bearer token callers must send")
    threads: int = Field(default=1, ge=1, le=64, description="runtime threads per inference")
    arena_mb: int = Field(
        default=1024, ge=0, description="MiB cap on ONNX Runtime's CPU arena; 0 = no arena"
    )
    max_delay_us: int = Field(default=0, ge=0, description="µs a batch may wait to fill")
    workers: int = Field(default=1, ge=1, le=64, description="batches of one model run at once")
    inline_below_us: int = Field(
        default=200, ge=0, description="µs; models this fast run on the event loop when idle"
    )
    max_queue: int = Field(default=256, ge=1, description="requests waiting per model")
    deadline_ms: float = Field(default=1000.0, gt=0, description="ms the primary has per request")
    circuit_failures: int = Field(default=5, ge=1, description="failures that open the circuit")
    circuit_reset_s: float = Field(default=10.0, gt=0, description="s before a trial request")
    result_cache: int = Field(default=0, ge=0, description="cached answers; 0 = off")
    max_body_mb: float = Field(default=64.0, gt=0, description="largest request body, MiB")
    keep_previous: int = Field(default=2, ge=0, description="old versions kept on disk")
    drain_s: float = Field(default=10.0, ge=0, description="s to finish in-flight work")
    # The update lifecycle: a deadline per stage, then probation of the new version.
    refresh_deadline_s: float = Field(
        default=60.0, gt=0, description="s to refresh trust metadata for a desired state"
    )
    download_deadline_s: float = Field(
        default=1800.0, gt=0, description="s to download every bundle of a desired state"
    )
    verify_deadline_s: float = Field(
        default=300.0, gt=0, description="s to verify and unpack the downloaded bundles"
    )
    load_deadline_s: float = Field(
        default=300.0, gt=0, description="s to load, self-test and warm up the new versions"
    )
    probation_s: float = Field(
        default=30.0, ge=0, description="s a new version is watched before commit; 0 = none"
    )
    probation_requests: int = Field(
        default=200, ge=1, description="requests after which probation ends early"
    )
    probation_min_requests: int = Field(
        default=20, ge=1, description="requests probation needs to judge; with fewer it commits"
    )
    probation_max_error_increase: float = Field(
        default=0.02, ge=0, le=1, description="error-rate rise over the previous version (0.02 = "
        "2 points) that rolls back"
    )  # fmt: skip
    probation_max_fallback_increase: float = Field(
        default=0.02, ge=0, le=1, description="fallback-rate rise over the previous version "
        "that rolls back"
    )  # fmt: skip
    probation_max_latency_ratio: float = Field(
        default=1.5, ge=1, description="p95 latency over the previous version's that rolls back"
    )
    probation_min_latency_ms: float = Field(
        default=1.0, ge=0, description="ms; smaller p95 latency increases never roll back"
    )
    # A shadow version: fed the primary's answered requests off the request path, compared.
    shadow_queue: int = Field(
        default=64, ge=1, description="requests waiting for the shadow; more are not compared"
    )
    shadow_compare: Literal["auto", "argmax", "allclose"] = Field(
        default="auto",
        description="how answers agree: auto = equal labels if the model has any, else allclose; "
        "argmax = the same top score per row (classifiers that output only scores)",
    )
    shadow_rtol: float = Field(default=1e-3, ge=0, description="allclose relative tolerance")
    shadow_atol: float = Field(default=1e-4, ge=0, description="allclose absolute tolerance")
    update_progress_interval_s: float = Field(
        default=1.0, gt=0, description="s; at most one download progress message per interval"
    )
    # The link to the fleet's MQTT broker (when this device is enrolled).
    fleet_link: bool = Field(
        default=True, description="connect to the fleet's broker when the device is enrolled"
    )
    broker_url: str | None = Field(
        default=None,
        pattern=r"^mqtts?://",
        description="the fleet's broker, mqtts://host:8883 or mqtt://host:1883 (default: the "
        "one given at enrollment)",
    )
    topic_root: str = Field(default=DEFAULT_ROOT, description="MQTT topic root")
    mqtt_keepalive_s: int = Field(
        default=30, ge=1, le=65535, description="s between MQTT keepalive pings"
    )
    state_interval_s: float = Field(
        default=30.0, gt=0, description="s between state heartbeats to the fleet"
    )
    # Telemetry: per-window metrics and drift counts of every served version.
    telemetry: bool = Field(
        default=True, description="count per-window metrics and drift; off: nothing is counted"
    )
    telemetry_window_s: float = Field(default=10.0, gt=0, description="s per telemetry window")
    telemetry_drift_min_rows: int = Field(
        default=200, ge=1, description="rows a window needs before its PSI raises a drift alert"
    )
    telemetry_drift_buffer_rows: int = Field(
        default=65536, ge=1, description="rows waiting for drift counting; more are unsampled"
    )
    telemetry_spool_records: int = Field(
        default=10_000,
        ge=1,
        description="telemetry records kept on disk while the fleet is unreachable; past it the "
        "oldest go and the next record says how many",
    )
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    _bundles = field_validator("bundles", mode="before")(classmethod(lambda cls, v: _split(v)))

    @field_validator("device", mode="before")
    @classmethod
    def _devices(cls, value: object) -> object:
        if isinstance(value, str | list | tuple):
            try:
                return parse_devices(value)
            except ModelLoadError as e:
                raise ValueError(str(e)) from None
        return value

    @property
    def socket_path(self) -> Path:
        return self.socket if self.socket is not None else self.state_dir / "agent.sock"

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def runtime_options(self) -> RuntimeOptions:
        return RuntimeOptions(
            intra_op_threads=self.threads,
            arena_limit_mb=self.arena_mb,
            openvino_cache_dir=self.state_dir / "cache" / "openvino",
        )

    def runner_config(self) -> RunnerConfig:
        return RunnerConfig(
            max_delay_us=self.max_delay_us,
            max_queue=self.max_queue,
            drain_timeout=self.drain_s,
            workers=self.workers,
            inline_below_us=self.inline_below_us,
        )

    def shadow_config(self) -> ShadowConfig:
        return ShadowConfig(
            queue=self.shadow_queue,
            deadline=self.deadline_ms / 1000,  # the deadline it would have as the primary
            compare=self.shadow_compare,
            rtol=self.shadow_rtol,
            atol=self.shadow_atol,
        )

    def telemetry_config(self) -> TelemetryConfig:
        return TelemetryConfig(
            enabled=self.telemetry,
            drift_min_rows=self.telemetry_drift_min_rows,
            drift_buffer_rows=self.telemetry_drift_buffer_rows,
        )

    def serving_config(self) -> ServingConfig:
        return ServingConfig(
            deadline=self.deadline_ms / 1000,
            circuit_failures=self.circuit_failures,
            circuit_reset=self.circuit_reset_s,
            result_cache_entries=self.result_cache,
        )
