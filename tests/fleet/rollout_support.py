"""What the rollout tests share: a real fleet database with devices and published versions, a
clock the test moves, a publisher that records what it was asked to publish (reserving real
sequence numbers in the store), and devices that answer as agents do."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from fleet.errors import LinkError
from fleet.rollouts import RolloutEngine, RolloutSpec
from fleet.rollouts.ports import DeviceTargets
from fleet.rollouts.spec import GatePolicy, RolloutPolicy
from fleet.store import ModelVersion, Selector, Store, open_store
from protocol.director import ModelTarget
from protocol.manifest import FileEntry, Manifest, TensorSpec
from protocol.mqtt import (
    ActiveModel,
    AgentState,
    ProbationReport,
    UpdateProgress,
    UpdateStage,
    VersionWindow,
)

MODEL = "digits"
START = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


class Clock:
    """The engine's clock; only the test moves it."""

    def __init__(self, at: datetime = START) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> datetime:
        self.at += timedelta(seconds=seconds)
        return self.at


@dataclass(frozen=True)
class Published:
    device_id: str
    version: str
    seq: int
    rollout_id: str | None


@dataclass
class RecordingPublisher:
    """Stands in for the director: reserves real seqs in the store, records every document."""

    store: Store
    sent: list[Published] = field(default_factory=list)
    failing: bool = False
    calls: int = 0

    async def publish(
        self, targets: Mapping[str, DeviceTargets], rollout_id: str | None
    ) -> Mapping[str, int]:
        self.calls += 1
        if self.failing:
            raise LinkError("broker unreachable (test)")
        seqs = self.store.devices.next_seqs(targets)
        for device_id, named in targets.items():
            # A shadow experiment names the primary and the challenger: record the challenger.
            moved = named if isinstance(named, ModelTarget) else named[-1]
            for target in () if isinstance(named, ModelTarget) else named:
                if target.role == "shadow":
                    moved = target
            self.sent.append(Published(device_id, moved.version, seqs[device_id], rollout_id))
        return seqs

    def last(self, device_id: str) -> Published:
        return [p for p in self.sent if p.device_id == device_id][-1]

    def to(self, device_id: str) -> list[Published]:
        return [p for p in self.sent if p.device_id == device_id]


def manifest(name: str, version: str) -> Manifest:
    tensor = TensorSpec(name="x", datatype="FP32", shape=(1, 4))
    return Manifest(
        name=name,
        version=version,
        runtime="onnxruntime",
        model_file="model.onnx",
        files=(FileEntry(path="model.onnx", sha256="0" * 64, size=1),),
        inputs=(tensor,),
        outputs=(tensor.model_copy(update={"name": "y"}),),
    )


def publish_version(store: Store, version: str, name: str = MODEL, release: int = 1) -> None:
    store.models.add(
        ModelVersion(
            name=name,
            version=version,
            target_path=f"{name}-{version}.efb",
            sha256=hashlib.sha256(f"{name}@{version}".encode()).hexdigest(),
            length=100,
            runtime="onnxruntime",
            release=release,
            manifest=manifest(name, version),
            published_at=START,
            published_by="test",
        )
    )


def add_device(
    store: Store,
    device_id: str,
    *,
    groups: Iterable[str] = ("cameras",),
    tags: Iterable[str] = (),
    running: str | None = "1.0.0",
) -> None:
    store.devices.enrolled(device_id, START)
    models = (ActiveModel(name=MODEL, version=running),) if running else ()
    store.devices.observe_state(AgentState(device_id=device_id, models=models), START)
    store.devices.label(device_id, add_groups=groups, add_tags=tags)


def window(
    version: str, requests: int, errors: int = 0, fallbacks: int = 0, p95: float = 10.0
) -> VersionWindow:
    return VersionWindow(
        version=version,
        requests=requests,
        errors=errors,
        fallbacks=fallbacks,
        p95_ms=p95,
        seconds=30.0,
    )


def report(
    candidate: VersionWindow, baseline: VersionWindow | None = None, *, passed: bool = True
) -> ProbationReport:
    return ProbationReport(
        model=MODEL,
        candidate=candidate,
        baseline=baseline,
        verdict="passed" if passed else "failed",
    )


def healthy(version: str = "2.0.0", previous: str = "1.0.0") -> ProbationReport:
    """A probation report that every default gate passes."""
    return report(window(version, 200, p95=10.0), window(previous, 200, p95=10.0))


def fast_policy(**changes: object) -> RolloutPolicy:
    """Default waves and gates, no soak, a one-minute deadline."""
    base: dict[str, object] = {"soak_s": 0, "wave_deadline_s": 60}
    base.update(changes)
    return RolloutPolicy.model_validate(base)


def spec(
    version: str = "2.0.0",
    *,
    groups: tuple[str, ...] = ("cameras",),
    policy: RolloutPolicy | None = None,
    supersede: bool = False,
) -> RolloutSpec:
    return RolloutSpec(
        model=MODEL,
        version=version,
        selector=Selector(groups=groups),
        policy=policy or fast_policy(),
        supersede=supersede,
    )


GATES_OFF = GatePolicy(
    max_error_rate_increase=None, max_latency_ratio=None, max_fallback_rate_increase=None
)


@dataclass
class Fleet:
    """A fleet database, an engine over it, and the devices' side of the conversation."""

    path: Path
    store: Store
    clock: Clock
    publisher: RecordingPublisher
    engine: RolloutEngine

    def answer(
        self,
        device_id: str,
        stage: UpdateStage = "committed",
        *,
        probation: tuple[ProbationReport, ...] = (),
        reason: str | None = None,
        seq: int | None = None,
    ) -> None:
        """The device reports on the last desired state it was sent."""
        sent = self.publisher.last(device_id)
        self.engine.on_update(
            UpdateProgress(
                device_id=device_id,
                seq=sent.seq if seq is None else seq,
                rollout_id=sent.rollout_id,
                stage=stage,
                at=self.clock(),
                reason=reason,
                probation=probation,
            )
        )

    def answer_many(
        self,
        device_ids: Iterable[str],
        stage: UpdateStage = "committed",
        *,
        probation: tuple[ProbationReport, ...] = (),
    ) -> None:
        for device_id in device_ids:
            self.answer(device_id, stage, probation=probation)

    def wave_devices(self, rollout_id: str, wave: int) -> list[str]:
        return [d.device for d in self.engine.get(rollout_id).devices if d.wave == wave]

    def reopen(self) -> Fleet:
        """A fresh engine on the same database file, as after a restart of the service."""
        self.store.close()
        store = open_store(self.path)
        publisher = RecordingPublisher(store)
        engine = RolloutEngine(store, publisher, clock=self.clock)
        return Fleet(self.path, store, self.clock, publisher, engine)


def make_fleet(tmp_path: Path, devices: int = 10, *, versions: Iterable[str] = ()) -> Fleet:
    path = tmp_path / "fleet.sqlite"
    store = open_store(path)
    for release, version in enumerate(("1.0.0", "2.0.0", *versions), start=1):
        publish_version(store, version, release=release)
    for i in range(devices):
        add_device(store, f"cam-{i:03d}")
    clock = Clock()
    publisher = RecordingPublisher(store)
    engine = RolloutEngine(store, publisher, clock=clock)
    return Fleet(path, store, clock, publisher, engine)
