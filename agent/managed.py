"""A device managed by a fleet: the agent, its update lifecycle and its MQTT link, wired up.

For an enrolled state directory :func:`start_managed` opens the trust state and the signed
model catalogue, builds the :class:`~agent.update.UpdateApplier` and the
:class:`~agent.mqtt.FleetLink`, and connects them: a desired state from the broker goes to the
applier, every stage the applier reports goes back to the fleet (and a final one re-publishes
the device's state). The link connects in the background and keeps retrying, so a device whose
network comes up late still serves its local models meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from agent.errors import LinkError
from agent.mqtt import FleetLink, LinkConfig, TlsFiles, broker_address
from agent.service import Agent
from agent.settings import AgentSettings
from agent.telemetry.reporter import TelemetryReporter
from agent.telemetry.spool import TelemetrySpool
from agent.trust.enrollment import identity_dir, open_catalogue
from agent.trust.identity import IdentityFiles, load_device_key
from agent.trust.state import TrustState
from agent.updates import UpdateApplier, UpdateOutcome
from protocol.director import check_device_id
from protocol.mqtt import Topics

__all__ = [
    "FleetEnrollment",
    "ManagedDevice",
    "is_enrolled",
    "link_config",
    "start_managed",
]

log = logging.getLogger(__name__)

_ENROLL_HINT = (
    "run `edgefleet agent enroll --fleet URL --token TOKEN --device-id ID` with the same "
    "--state-dir first"
)


def is_enrolled(state_dir: Path) -> bool:
    """Whether ``state_dir`` holds a finished enrollment (its certificate is written last)."""
    return IdentityFiles(identity_dir(state_dir)).certificate.is_file()


@dataclass(frozen=True)
class FleetEnrollment:
    """Who this device is to the fleet and where its broker is, as saved at enrollment."""

    device_id: str
    broker_url: str
    identity: IdentityFiles

    @classmethod
    def load(cls, state_dir: Path) -> FleetEnrollment:
        """Read the enrollment under ``state_dir``; :class:`LinkError` if there is none."""
        files = IdentityFiles(identity_dir(state_dir))
        if not is_enrolled(state_dir):
            raise LinkError(
                f"this device is not enrolled with a fleet ({state_dir}); {_ENROLL_HINT}"
            )
        try:
            info = json.loads(files.enrollment.read_bytes())
            device_id = check_device_id(str(info["device_id"]))
            broker_url = str(info["broker_url"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LinkError(
                f"{files.enrollment} is missing or damaged ({e!r}); enroll the device again"
            ) from None
        return cls(device_id, broker_url, files)

    def tls(self) -> TlsFiles:
        """The device key (checked to be private), certificate and CA chain for ``mqtts://``."""
        load_device_key(self.identity.key)  # refuses a key others can read, before TLS uses it
        return TlsFiles(self.identity.ca_chain, self.identity.certificate, self.identity.key)


def link_config(settings: AgentSettings, enrollment: FleetEnrollment) -> LinkConfig:
    """The link's configuration: the enrollment's broker unless the settings name another."""
    broker_url = settings.broker_url or enrollment.broker_url
    address = broker_address(broker_url)
    try:
        topics = Topics(settings.topic_root)
    except ValueError as e:
        raise LinkError(str(e)) from None
    return LinkConfig(
        broker_url=broker_url,
        device_id=enrollment.device_id,
        topics=topics,
        tls=enrollment.tls() if address.tls else None,
        keepalive_s=settings.mqtt_keepalive_s,
        state_interval_s=settings.state_interval_s,
    )


class ManagedDevice:
    """The applier, the telemetry reporter and the link of one running agent; :meth:`close`
    before the agent drains."""

    def __init__(self, agent: Agent, settings: AgentSettings) -> None:
        state_dir = settings.state_dir
        enrollment = FleetEnrollment.load(state_dir)
        trust = TrustState.load(state_dir)
        if trust.device_id != enrollment.device_id:
            raise LinkError(
                f"the trust state in {trust.path} is for {trust.device_id!r} but the identity is "
                f"for {enrollment.device_id!r}; enroll the device again"
            )
        self.device_id = enrollment.device_id
        self.link = FleetLink(agent, link_config(settings, enrollment), self._desired)
        # Telemetry waits in <state_dir>/telemetry.db until the broker acknowledges it.
        self.telemetry: TelemetryReporter | None = None
        if settings.telemetry:
            spool = TelemetrySpool(
                state_dir / "telemetry.db", max_records=settings.telemetry_spool_records
            )
            self.telemetry = TelemetryReporter(
                agent.telemetry,
                spool,
                self.link,
                settings.telemetry_window_s,
                flush_timeout_s=self.link.config.close_timeout_s,
            )
        self.catalogue = open_catalogue(state_dir)
        self.applier = UpdateApplier(
            agent,
            trust,
            self.catalogue,
            state_dir / "downloads",
            progress=self.link.publish_update,
            events=self.link.publish_event,
        )
        self._recovery: asyncio.Task[UpdateOutcome | None] | None = None

    def start(self) -> None:
        """Settle an update a crash interrupted, and connect; call from the agent's loop.

        Both run at once, so the link may deliver the retained desired state while recovery
        still works: the applier holds it until recovery has settled.
        """
        self._recovery = asyncio.get_running_loop().create_task(self.applier.recover())
        self.link.start()
        if self.telemetry is not None:
            self.telemetry.start()

    async def _desired(self, raw: bytes) -> None:
        # Returns at once (after crash recovery, the first time): a newer desired state must be
        # able to supersede a running one.
        await self.applier.submit(raw)

    async def close(self) -> None:
        """Send the last telemetry window, say ``offline`` to the fleet and disconnect; the
        agent keeps serving until it drains."""
        recovery = self._recovery
        if recovery is not None:
            recovery.cancel()  # a no-op once it has finished
            try:
                await recovery
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("settling an interrupted update failed")
        if self.telemetry is not None:
            await self.telemetry.close()
        await self.link.close()
        if self.telemetry is not None:
            self.telemetry.spool.close()
        self.catalogue.close()


def start_managed(agent: Agent, settings: AgentSettings) -> ManagedDevice:
    """Wire an enrolled agent to its fleet and start connecting (from the agent's event loop).

    Raises :class:`LinkError` (or a trust error) naming what is missing when the state
    directory is not enrolled or its identity is unusable.
    """
    device = ManagedDevice(agent, settings)
    device.start()
    address = device.link.client.address
    log.info("managed by the fleet", extra={"device": device.device_id, "broker": str(address)})
    if not address.tls:
        log.warning(
            "the fleet link uses plain MQTT without TLS: for development only",
            extra={"broker": str(address)},
        )
    return device
