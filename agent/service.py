"""The agent: installs bundles into the store, loads them on the best device, serves them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel

from agent.devices import resolve
from agent.errors import AgentError, ModelLoadError, ModelNotFoundError, ModelNotReadyError
from agent.metrics import AgentMetrics
from agent.runner import ModelRunner
from agent.runtimes import get_backend
from agent.selftest import make_inputs
from agent.serving import ServedModel, check_fallback_compatible
from agent.settings import AgentSettings
from agent.shadow import Shadow, ShadowTelemetry
from agent.store import InstalledModel, ModelStore
from agent.telemetry.collector import TelemetryCollector
from edgefleet import __version__
from protocol.manifest import Manifest
from protocol.mqtt import ProbationReport

__all__ = [
    "Agent",
    "AgentStatus",
    "ModelStatus",
    "ShadowStatus",
    "SkippedDeviceStatus",
    "TrustReport",
    "UpdateReport",
]

log = logging.getLogger(__name__)


class SkippedDeviceStatus(BaseModel):
    device: str
    reason: str


class ShadowStatus(BaseModel):
    """A challenger version run beside the primary, and how often it agreed with it."""

    version: str
    device: str
    waiting: int
    offered: int
    skipped: int
    answered: int
    failed: int
    compared: int
    agreed: int
    agreement: float | None  # agreed / compared rows; None before the first comparison


class ModelStatus(BaseModel):
    name: str
    version: str | None
    runtime: str | None
    requested_devices: list[str]
    device: str | None
    skipped_devices: list[SkippedDeviceStatus]
    fallback: str | None
    circuit: str
    load_error: str | None
    inflight: int
    queue_depth: int
    shadow: ShadowStatus | None = None


class UpdateReport(BaseModel):
    """How the last desired state ended: committed, refused, failed or rolled back (and why)."""

    seq: int | None
    status: str
    reason: str | None
    detail: str
    models: list[str]
    probation: list[ProbationReport] = []


class TrustReport(BaseModel):
    """Whether the device's trust metadata is fresh, and what became of its desired states."""

    status: str
    reason: str | None
    last_applied_seq: int
    last_refresh: datetime | None
    last_outcome: UpdateReport | None


class AgentStatus(BaseModel):
    agent_version: str
    ready: bool
    uptime_s: float
    state_dir: str
    models: list[ModelStatus]
    trust: TrustReport | None = None  # None when the agent takes no signed updates


class Agent:
    """Owns the store and every served model; the HTTP layer only reads from it."""

    def __init__(self, settings: AgentSettings, metrics: AgentMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or AgentMetrics()
        self.models: dict[str, ServedModel] = {}
        self.failed: dict[str, str] = {}  # model name -> why neither primary nor fallback loaded
        self.ready = False
        self.started = time.monotonic()
        self.store = ModelStore(settings.state_dir, keep_previous=settings.keep_previous)
        self._fallback: ModelRunner | None = None
        # Set by whatever applies signed updates; the agent itself knows nothing of TUF.
        self.trust_status: Callable[[], TrustReport] | None = None
        # Fed by the serving path whether or not anything reports its windows.
        self.telemetry = TelemetryCollector(settings.telemetry_config(), self.metrics)

    async def start(self) -> None:
        """Install the configured bundles, load every active model, then report ready."""
        s = self.settings
        fallback_installed = None
        if s.fallback is not None:
            fallback_installed = await asyncio.to_thread(self._install, s.fallback, pin=True)
        names = [(await asyncio.to_thread(self._install, b, pin=False)).name for b in s.bundles]
        if not s.bundles:  # a restart: serve what the store has active
            names = [n for n in self.store.names() if self.store.active(n) is not None]
        if fallback_installed is not None:
            names = [n for n in names if n != fallback_installed.name]
            self._fallback = await self._load_fallback(fallback_installed)
        for name in names:
            await self._serve(name)
        if not self.models and not self.failed:
            log.warning("no models to serve: pass --bundle or install one into the store")
        self.ready = True
        log.info("agent ready", extra={"models": sorted(self.models), "failed": self.failed})

    def _install(self, bundle: Path, *, pin: bool) -> InstalledModel:
        installed = self.store.install(bundle)
        if pin:
            self.store.pin(installed.name, installed.version)
        self.store.activate(installed.name, installed.version)
        return installed

    async def _load_fallback(self, installed: InstalledModel) -> ModelRunner | None:
        try:
            runner = await self.load(installed)
        except ModelLoadError as e:
            log.error("fallback failed to load", extra={"model": installed.name, "error": str(e)})
            self.failed[installed.name] = str(e)
            return None
        self.models[runner.name] = ServedModel(
            runner.name,
            self.settings.serving_config(),
            self.metrics,
            primary=runner,
            telemetry=self.telemetry,
        )
        return runner

    async def _serve(self, name: str) -> None:
        installed = self.store.active(name)
        assert installed is not None
        primary: ModelRunner | None = None
        error: str | None = None
        try:
            primary = await self.load(installed)
        except ModelLoadError as e:
            error = str(e)
            log.error("model failed to load", extra={"model": name, "error": error})
        fallback = self._fallback_for(installed.manifest)
        if primary is None and fallback is None:
            self.failed[name] = error or "unknown"
            return
        self.models[name] = ServedModel(
            name,
            self.settings.serving_config(),
            self.metrics,
            primary=primary,
            fallback=fallback,
            load_error=error,
            telemetry=self.telemetry,
        )

    def _fallback_for(self, manifest: Manifest) -> ModelRunner | None:
        """The pinned fallback, if it can stand in for ``manifest``'s model; else None."""
        fallback = self._fallback
        if fallback is None:
            return None
        try:
            check_fallback_compatible(manifest.inputs, manifest.outputs, fallback)
        except ModelLoadError as e:
            log.warning(
                "no fallback for this model", extra={"model": manifest.name, "error": str(e)}
            )
            return None
        return fallback

    async def load(self, installed: InstalledModel, *, shadow: bool = False) -> ModelRunner:
        """Resolve the device, self-test and warm up one installed version (off the loop).

        ``shadow``: the version will run as a shadow, never on the event loop itself.
        """
        return await asyncio.to_thread(self._load_blocking, installed, shadow)

    def _load_blocking(self, installed: InstalledModel, shadow: bool = False) -> ModelRunner:
        manifest = installed.manifest
        backend = get_backend(manifest.runtime)
        resolution = resolve(
            backend,
            installed.path / manifest.model_file,
            self.settings.device,
            manifest.golden,
            self.settings.runtime_options(),
        )
        try:
            # Warm up at the largest batch so the first real batch allocates nothing new.
            resolution.session.run(make_inputs(manifest.inputs, batch=manifest.max_batch_size))
        except AgentError as e:
            resolution.session.close()
            raise ModelLoadError(f"{manifest.name}@{manifest.version} failed warm-up: {e}") from e
        for skipped in resolution.skipped:
            log.info(
                "device skipped",
                extra={"model": manifest.name, "device": skipped.device, "reason": skipped.reason},
            )
        self.metrics.model_info.labels(
            manifest.name,
            manifest.version,
            manifest.runtime,
            ",".join(resolution.requested),
            resolution.device,
        ).set(1)
        observe = self.metrics.observer(
            manifest.name,
            manifest.version,
            self.telemetry.batches(manifest.name, manifest.version),
        )
        log.info(
            "model loaded",
            extra={
                "model": manifest.name,
                "version": manifest.version,
                "device": resolution.device,
            },
        )
        config = self.settings.runner_config()
        if shadow:
            # Inline runs compute on the event loop: a caller would wait for the shadow.
            config = dataclasses.replace(config, inline_below_us=0)
        return ModelRunner(manifest, resolution, config, observe)

    async def install(self, bundle: Path) -> InstalledModel:
        """Verify and unpack a bundle into the store (off the loop); it is not activated."""
        return await asyncio.to_thread(self.store.install, bundle)

    async def switch(self, runner: ModelRunner) -> None:
        """Serve a loaded, self-tested version from now on and make it the store's active one.

        The old version drains before it is unloaded: requests in flight finish on it.
        """
        served = self.models.get(runner.name)
        if served is None:
            self.models[runner.name] = ServedModel(
                runner.name,
                self.settings.serving_config(),
                self.metrics,
                primary=runner,
                fallback=self._fallback_for(runner.manifest),
                telemetry=self.telemetry,
            )
        else:
            await served.swap(runner)
        await asyncio.to_thread(self.store.activate, runner.name, runner.version)
        self.failed.pop(runner.name, None)

    async def update(self, bundle: Path) -> ModelRunner:
        """Install a new version and swap it in while traffic flows; the old one drains."""
        runner = await self.load(await self.install(bundle))
        await self.switch(runner)
        return runner

    async def activate(self, name: str, version: str) -> ModelRunner:
        """Serve an installed version again (a rollback): check its files, load, swap it in."""
        installed = await asyncio.to_thread(self.store.verify, name, version)
        runner = await self.load(installed)
        try:
            await self.switch(runner)
        except AgentError:
            if self.models.get(name) is None or self.models[name].primary is not runner:
                runner.close()
            raise
        return runner

    async def attach_shadow(self, runner: ModelRunner) -> None:
        """Run a loaded, self-tested version as the shadow of its model's primary; a shadow it
        had before is unloaded. Raises :class:`ModelNotReadyError` when nothing serves the
        model: a shadow is compared with the primary's answers."""
        served = self.models.get(runner.name)
        if served is None or served.primary is None:
            raise ModelNotReadyError(
                f"cannot run {runner.name}@{runner.version} as a shadow: no primary version of "
                f"{runner.name} is serving to compare it with"
            )
        old = served.shadow
        served.shadow = Shadow(
            runner,
            served.primary.manifest.outputs,
            self.settings.shadow_config(),
            self._shadow_telemetry(runner),
        )
        log.info(
            "shadow attached",
            extra={"model": runner.name, "version": runner.version, "device": runner.device},
        )
        if old is not None:
            await old.close()

    async def detach_shadow(self, name: str) -> str | None:
        """Stop and unload the shadow of ``name``; returns its version, None if it had none."""
        served = self.models.get(name)
        if served is None or served.shadow is None:
            return None
        shadow, served.shadow = served.shadow, None
        await shadow.close()
        log.info("shadow detached", extra={"model": name, "version": shadow.version})
        return shadow.version

    def shadow_version(self, name: str) -> str | None:
        """The version running as the shadow of ``name``, if any."""
        served = self.models.get(name)
        return served.shadow.version if served is not None and served.shadow else None

    def _shadow_telemetry(self, runner: ModelRunner) -> ShadowTelemetry | None:
        if not self.telemetry.enabled:
            return None
        telemetry = self.telemetry.version(runner.name, runner.version, "shadow")
        telemetry.device = runner.device
        return telemetry

    def serving_version(self, name: str) -> str | None:
        """The version the primary of ``name`` runs, or None when none is loaded."""
        served = self.models.get(name)
        return served.primary.version if served is not None and served.primary else None

    def get(self, name: str, version: str | None = None) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            if name in self.failed:
                raise ModelNotReadyError(f"model {name!r} failed to load: {self.failed[name]}")
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFoundError(f"unknown model {name!r} (this agent serves: {known})")
        if version is not None and version not in served.versions:
            raise ModelNotFoundError(
                f"model {name!r} has no version {version!r} loaded "
                f"(loaded: {', '.join(served.versions)})"
            )
        return served

    def status(self) -> AgentStatus:
        models = [self._model_status(name, served) for name, served in sorted(self.models.items())]
        models += [
            ModelStatus(
                name=name,
                version=None,
                runtime=None,
                requested_devices=list(self.settings.device),
                device=None,
                skipped_devices=[],
                fallback=None,
                circuit="closed",
                load_error=error,
                inflight=0,
                queue_depth=0,
            )
            for name, error in sorted(self.failed.items())
        ]
        return AgentStatus(
            agent_version=__version__,
            ready=self.ready,
            uptime_s=round(time.monotonic() - self.started, 3),
            state_dir=str(self.settings.state_dir),
            models=models,
            trust=self.trust_status() if self.trust_status is not None else None,
        )

    def _model_status(self, name: str, served: ServedModel) -> ModelStatus:
        runner = served.primary
        fallback = served.fallback
        return ModelStatus(
            name=name,
            version=runner.version if runner else None,
            runtime=runner.manifest.runtime if runner else None,
            requested_devices=list(self.settings.device),
            device=runner.device if runner else None,
            skipped_devices=[
                SkippedDeviceStatus(device=s.device, reason=s.reason)
                for s in (runner.resolution.skipped if runner else ())
            ],
            fallback=f"{fallback.name}@{fallback.version}" if fallback else None,
            circuit=served.circuit.state.value,
            load_error=served.load_error,
            inflight=runner.inflight if runner else 0,
            queue_depth=runner.batcher.depth if runner else 0,
            shadow=_shadow_status(served.shadow) if served.shadow else None,
        )

    async def close(self) -> None:
        """Drain and unload every model."""
        for name in list(self.models):
            await self.detach_shadow(name)
        runners = {id(s.primary): s.primary for s in self.models.values() if s.primary}
        for runner in runners.values():
            await runner.drain()
            runner.close()
        self.models.clear()
        self.ready = False
        self.telemetry.close()


def _shadow_status(shadow: Shadow) -> ShadowStatus:
    counts = shadow.counts
    return ShadowStatus(
        version=shadow.version,
        device=shadow.runner.device,
        waiting=shadow.waiting,
        offered=counts.offered,
        skipped=counts.skipped,
        answered=counts.answered,
        failed=counts.failed,
        compared=counts.compared,
        agreed=counts.agreed,
        agreement=counts.agreed / counts.compared if counts.compared else None,
    )
