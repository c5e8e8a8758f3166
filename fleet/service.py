"""The fleet service, composed: store, director, MQTT link, rollout loop, REST API, trust service.

One ASGI app serves the TUF repository and ``POST /enroll`` at the root, the REST API under
``/api/v1`` and the web console under ``/console/``; its lifespan starts the broker link (and
the embedded broker when asked), runs the rollout engine every ``tick_s`` and stops them in
reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta, timezone

from starlette.applications import Starlette
from starlette.routing import Mount

from fleet.api import bootstrap_admin_token, create_api
from fleet.broker import EmbeddedBroker
from fleet.console import console_routes
from fleet.director import Director
from fleet.errors import FleetError
from fleet.ingest import DeviceMessages
from fleet.link import FleetLink, Incoming, TlsFiles
from fleet.rollouts.engine import RolloutEngine
from fleet.settings import FleetSettings
from fleet.store import Store, open_store
from fleet.telemetry.alerts import DriftMonitor
from fleet.telemetry.ingest import TelemetryIngest
from fleet.telemetry.retention import TelemetryRetention
from fleet.trust.enroll_http import fleet_trust_app, load_director_key
from protocol.director import SignedDesiredState
from protocol.mqtt import Topics

__all__ = ["FleetService"]

log = logging.getLogger(__name__)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class FleetService:
    """Owns every long-lived part of the fleet service; :meth:`app` is what uvicorn serves."""

    def __init__(
        self, settings: FleetSettings, *, clock: Callable[[], datetime] = _utc_now
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.topics = Topics(settings.topic_root)
        self.store: Store = open_store(settings.database_path)
        self.broker = (
            EmbeddedBroker(settings.embedded_broker_port) if settings.embedded_broker else None
        )
        self.link = FleetLink(
            settings.service_broker_url,
            self.topics,
            self._on_messages,
            tls=self._tls(),
            # With ingest workers on a shared subscription, telemetry is theirs alone.
            subscriptions=[self.topics.every_device(k) for k in ("state", "update", "events")]
            if settings.ingest_workers
            else None,
        )
        self.director = Director(
            self.store,
            load_director_key(settings.director_key),
            self.link,
            self.topics,
            validity=timedelta(hours=settings.desired_validity_h),
            clock=clock,
        )
        self.engine = RolloutEngine(
            self.store, self.director, clock=clock, drift_check_s=settings.drift_check_s
        )
        # Kept with ingest workers too: telemetry its session queued before they took over.
        self.telemetry = TelemetryIngest(self.store, self.topics, clock=clock)
        self.retention = TelemetryRetention.from_settings(self.store, settings)
        self.drift_monitor = DriftMonitor.from_settings(self.store, settings, clock)
        self.messages = DeviceMessages(
            self.store, self.engine, self.topics, clock=clock, telemetry=self.telemetry
        )
        self._ticker: asyncio.Task[None] | None = None

    def _tls(self) -> TlsFiles | None:
        if not self.settings.service_broker_url.startswith("mqtts://"):
            return None
        client = self.settings.client_dir
        return TlsFiles(
            ca=self.settings.broker_dir / "ca.pem",
            certificate=client / "fleet.pem",
            key=client / "fleet.key",
        )

    async def _on_messages(self, batch: Sequence[Incoming]) -> None:
        await self.messages(batch)

    def on_enrolled(self, device_id: str) -> None:
        """Called by the trust service when a device trades its token for a certificate.

        A device enrolled again starts a new telemetry stream: its new spool may number from 1.
        """
        self.store.devices.enrolled(device_id, self.clock())
        self.store.audit.record("enrollment", "device.enrolled", device_id, None)
        reset = self.store.telemetry.reset_stream(device_id)
        if reset is None:
            return
        old = reset.stream
        detail = {
            "high_seq": old.high_seq if old else 0,
            "received": old.received if old else 0,
            "missing": old.missing if old else 0,
            "dropped": old.dropped if old else 0,
            "windows_rolled_up": reset.windows,
        }
        self.store.audit.record("enrollment", "telemetry.stream_reset", device_id, detail)
        log.info("telemetry stream started again", extra={"device_id": device_id, **detail})

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        written = bootstrap_admin_token(self.store, self.settings.home)
        if written is not None:
            log.warning("first admin API token written", extra={"path": str(written)})
        if self.broker is not None:
            await self.broker.start()
        await self.link.start()
        self._republish()
        self._ticker = asyncio.create_task(self._tick())
        log.info(
            "fleet service running",
            extra={
                "database": str(self.settings.database_path),
                "broker": self.settings.service_broker_url,
            },
        )

    def _republish(self) -> None:
        """Send again the desired states no device has acknowledged (same document, same seq:
        a device that has it already ignores it)."""
        again = 0
        for device_id, seq in self.engine.unacknowledged():
            document = self.store.devices.desired(device_id)
            if document is None:
                continue
            if SignedDesiredState.model_validate_json(document).signed.seq == seq:
                self.link.publish(self.topics.desired(device_id), document, retain=True)
                again += 1
        if again:
            log.info("unacknowledged desired states published again", extra={"devices": again})

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await self.link.close()
        if self.broker is not None:
            await self.broker.stop()
        self.store.close()

    async def _tick(self) -> None:
        while True:
            try:
                await self.engine.step()
            except FleetError as e:
                log.error("rollout step failed; retrying", extra={"detail": str(e)})
            except Exception:
                # A bug in one step must not stop every rollout until a restart.
                log.exception("rollout step failed unexpectedly; retrying")
            await self.retention.tick(self.clock())  # logs its own failures
            await self.drift_monitor.tick()  # so does this
            await asyncio.sleep(self.settings.tick_s)

    # -- HTTP --------------------------------------------------------------------------------

    def app(self) -> Starlette:
        """The trust service's routes, ``/api/v1``, and a lifespan that runs this service."""
        trust = fleet_trust_app(self.settings, on_enrolled=self.on_enrolled)
        api = create_api(self.store, engine=self.engine, settings=self.settings, clock=self.clock)

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            async with trust.router.lifespan_context(app):
                await self.start()
                try:
                    yield
                finally:
                    await self.close()

        routes = [Mount("/api/v1", app=api), *console_routes(), *trust.routes]
        return Starlette(routes=routes, lifespan=lifespan)
