"""What the API, registry and operator-CLI tests share: a fleet home with a real TUF repository,
a clock the test moves, a director stand-in that reserves real sequence numbers, devices that
report as agents do, and bundles that the shared ``bundles`` fixture does not have."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path

from fleet.rollouts.ports import DeviceTargets
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.trust import ROLES, ImageRepository, generate_key
from protocol.bundle import build_bundle
from protocol.manifest import (
    DriftProfile,
    FeatureBins,
    FileEntry,
    Manifest,
    ParityReport,
    Quantization,
    TensorSpec,
)
from protocol.mqtt import ActiveModel, AgentState
from tests.models import mlp_onnx

START = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


class Clock:
    """The service's clock; only the test moves it."""

    def __init__(self, at: datetime = START) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> datetime:
        self.at += timedelta(seconds=seconds)
        return self.at


class Director:
    """Stands in for the director: reserves real sequence numbers, publishes nothing."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.sent: list[tuple[str, str]] = []

    async def publish(
        self, targets: Mapping[str, DeviceTargets], rollout_id: str | None
    ) -> Mapping[str, int]:
        for device, named in targets.items():
            self.sent += [
                (device, t.version) for t in (named if isinstance(named, tuple) else (named,))
            ]
        return self.store.devices.next_seqs(targets)


def make_home(home: Path, *, targets_key: bool = True, **settings: object) -> FleetSettings:
    """A fleet home as `keys init` lays it out (keys and repository; no CA, not needed here).

    ``targets_key=False``: the targets key went offline, as it should in production.
    """
    fleet = FleetSettings(home=home, **settings)  # type: ignore[arg-type]
    keys = {role: [fleet.key_path(role)] for role in ROLES}
    for paths in keys.values():
        generate_key(paths[0])
    ImageRepository.create(fleet.repository_dir, keys)
    if not targets_key:
        offline = home.parent / "offline-targets.pem"
        fleet.key_path("targets").rename(offline)
    return fleet


def offline_targets_key(settings: FleetSettings) -> Path:
    """Where :func:`make_home` put the targets key with ``targets_key=False``."""
    return settings.home.parent / "offline-targets.pem"


def report_online(
    store: Store,
    device_id: str,
    at: datetime,
    *,
    models: Mapping[str, str] | None = None,
    device: str = "CPU",
) -> None:
    """The device says it is online, serving ``models`` (name -> version) on ``device``."""
    store.devices.enrolled(device_id, at - timedelta(minutes=5))
    state = AgentState(
        device_id=device_id,
        at=at,
        agent_version="0.1.0",
        models=tuple(
            ActiveModel(name=name, version=version, runtime="onnxruntime", device=device)
            for name, version in (models or {}).items()
        ),
        hardware={"cpus": 4, "arch": "aarch64"},
    )
    store.devices.observe_state(state, at)


def quantized_bundle(folder: Path, *, name: str = "mlp", version: str = "3.0.0") -> Path:
    """A bundle whose manifest carries a parity report and a drift profile."""
    model = mlp_onnx(folder / f"{name}-{version}.onnx", seed=7)
    manifest = Manifest(
        name=name,
        version=version,
        runtime="onnxruntime",
        model_file="model.onnx",
        files=(FileEntry(path="model.onnx", sha256="0" * 64, size=0),),
        inputs=(TensorSpec(name="input", datatype="FP32", shape=(-1, 64)),),
        outputs=(TensorSpec(name="logits", datatype="FP32", shape=(-1, 10)),),
        quantization=Quantization(
            method="dynamic-int8",
            parity=ParityReport(samples=500, max_abs_diff=0.0123, top1_agreement=0.996),
        ),
        drift=DriftProfile(
            features=(
                FeatureBins(
                    name="input", tensor="input", edges=(0.0, 0.5, 1.0), counts=(1, 2, 3, 4)
                ),
            ),
            psi_alert=0.3,
        ),
    )
    out = folder / f"{name}-{version}.efb"
    build_bundle(manifest, {"model.onnx": model}, out)
    return out


def tampered_copy(bundle: Path, out: Path) -> Path:
    """``bundle`` with one byte of its last member changed: the manifest still reads."""
    data = bytearray(bundle.read_bytes())
    end = len(data.rstrip(b"\0"))
    data[end - 1] ^= 0xFF
    out.write_bytes(bytes(data))
    return out
