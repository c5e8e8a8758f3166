"""Device resolution: the first device in the preference on which a model loads and passes its
golden self-test serves it; every device passed over is recorded with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ModelLoadError, SelfTestError
from agent.runtimes.base import Backend, RuntimeOptions, Session
from agent.selftest import run_golden
from protocol.manifest import GoldenTest

__all__ = ["DEVICES", "Resolution", "SkippedDevice", "parse_devices", "resolve"]

DEVICES = ("CPU", "GPU", "NPU")


@dataclass(frozen=True)
class SkippedDevice:
    """A device in the preference that does not serve the model, and why."""

    device: str
    reason: str


@dataclass(frozen=True)
class Resolution:
    """The outcome of resolution: a loaded, self-tested session and the devices passed over."""

    session: Session
    requested: tuple[str, ...]
    device: str  # the device the session really runs on, as the runtime reported it
    skipped: tuple[SkippedDevice, ...]


def parse_devices(preference: str | Sequence[str]) -> tuple[str, ...]:
    """Normalise a device preference: ``"npu,gpu,cpu"`` or ``["NPU", "cpu"]`` → upper-case
    names in order, duplicates dropped. Raises :class:`ModelLoadError` naming the valid devices
    when a name is unknown or the preference is empty.
    """
    items = [preference] if isinstance(preference, str) else list(preference)
    devices: list[str] = []
    for item in items:
        for part in item.split(","):
            name = part.strip().upper()
            if not name:
                continue
            if name not in DEVICES:
                raise ModelLoadError(
                    f"unknown device {part.strip()!r} in the device preference; use "
                    f"{', '.join(DEVICES)} in order of preference, e.g. NPU,GPU,CPU"
                )
            if name not in devices:
                devices.append(name)
    if not devices:
        raise ModelLoadError(f"the device preference is empty; name at least one of {DEVICES}")
    return tuple(devices)


def resolve(
    backend: Backend,
    model_path: Path,
    preference: Sequence[str],
    golden: GoldenTest,
    options: RuntimeOptions,
) -> Resolution:
    """Load ``model_path`` on the first device of ``preference`` that works.

    A device works when ``backend`` sees it, loads the model on it and the session passes the
    golden self-test. Raises :class:`ModelLoadError` listing every device and its reason when
    none does.
    """
    requested = parse_devices(preference)
    available = backend.devices()
    skipped: list[SkippedDevice] = []
    for device in requested:
        if device not in available:
            has = ", ".join(available) or "no device"
            skipped.append(SkippedDevice(device, f"{backend.name} sees no {device} here ({has})"))
            continue
        try:
            session = backend.load(model_path, device, options)
        except ModelLoadError as e:
            skipped.append(SkippedDevice(device, str(e)))
            continue
        try:
            run_golden(session, golden)
        except SelfTestError as e:
            session.close()
            skipped.append(SkippedDevice(device, f"self-test failed: {e}"))
            continue
        return Resolution(session, requested, session.device, tuple(skipped))
    reasons = "; ".join(f"{s.device}: {s.reason}" for s in skipped)
    raise ModelLoadError(
        f"{model_path.name} cannot run with {backend.name} on any device in "
        f"{','.join(requested)} — {reasons}"
    )
