"""Telemetry to the fleet: windows cut on a timer, spooled on disk, sent until acknowledged.

Every ``window_s`` the reporter cuts the collector's window, appends its records to the spool
in one transaction and publishes drift notices as ``drift`` events. A sender then keeps up to
``max_in_flight`` records published (QoS 1, ``telemetry/<kind>``, oldest first) and deletes each
from the spool once the broker acknowledges it.

It sends only while connected. A disconnect forgets what was in flight; after the reconnect
every record still in the spool goes again from the oldest, so one whose PUBACK was lost with
the connection arrives twice, which the fleet's ingest absorbs (it is idempotent on
``(device_id, seq)``). paho's own queue never holds telemetry through an outage: the spool
does, bounded, and says what it had to drop (:mod:`agent.telemetry.spool`).

The spool's SQLite work runs on one thread of its own, never on the event loop: a commit waits
for an fsync, which takes well under a millisecond on a server disk but can take tens of
milliseconds on an SD card.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import paho.mqtt.client as mqtt

from agent.errors import LinkError
from agent.telemetry.spool import SpoolError, TelemetrySpool
from protocol.mqtt import DeviceEvent

if TYPE_CHECKING:  # agent.mqtt imports the agent's service, which holds the collector
    from agent.mqtt import FleetLink

__all__ = ["TelemetryReporter", "TelemetrySource"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_RETRY_S = 1.0  # seconds before the sender tries again after an unexpected failure


class _Window(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def fields(self) -> Mapping[str, Any]: ...


class _DriftNotice(Protocol):
    @property
    def model(self) -> str: ...
    @property
    def detail(self) -> str: ...


class TelemetrySource(Protocol):
    """What the reporter reads: the collector, which ends a window and starts the next."""

    def cut(self) -> tuple[Sequence[_Window], Sequence[_DriftNotice]]: ...


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class TelemetryReporter:
    """Cuts, spools and sends one device's telemetry; :meth:`start` on the agent's loop."""

    def __init__(
        self,
        collector: TelemetrySource,
        spool: TelemetrySpool,
        link: FleetLink,
        window_s: float,  # seconds per window
        *,
        max_in_flight: int = 100,  # records published and not yet acknowledged
        flush_timeout_s: float = 5.0,  # seconds a clean stop waits for the last records' PUBACKs
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if window_s <= 0 or max_in_flight < 1:
            raise ValueError(
                f"window_s ({window_s}) must be positive and max_in_flight ({max_in_flight}) at "
                "least 1"
            )
        self.window_s = window_s
        self.device_id = link.device_id
        self._collector = collector
        self.spool = spool
        self._link = link
        self._client = link.client
        self._max_in_flight = max_in_flight
        self._flush_timeout_s = flush_timeout_s
        self._clock = clock
        topics = link.config.topics
        self._topics = {
            kind: topics.telemetry(self.device_id, kind) for kind in ("metrics", "drift")
        }
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="telemetry-spool")
        self._wake = asyncio.Event()
        self._connected = False
        self._connection = 0  # counts connection changes: a read that spans one is stale
        self._in_flight: dict[int, int] = {}  # message id -> seq, on the current connection
        self._sent_up_to = 0  # the newest seq published on the current connection
        self._acked: list[int] = []  # acknowledged, not yet deleted from the spool
        self._windows: asyncio.Task[None] | None = None
        self._sending: asyncio.Task[None] | None = None
        self.closed = False
        self.published = 0  # records published, replays included
        self.acknowledged = 0  # PUBACKs for them
        self.lost_windows = 0  # windows the spool could not store (logged as errors)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start cutting windows and sending; call from the agent's event loop."""
        loop = asyncio.get_running_loop()
        self._client.watch(published=self._on_published, connection=self._on_connection)
        self._connected = self._client.connected.is_set()
        self._windows = loop.create_task(self._cut_every_window(), name="telemetry-windows")
        self._sending = loop.create_task(self._sender(), name="telemetry-sender")
        self._wake.set()  # records a previous run left in the spool

    async def close(self) -> None:
        """Cut the last window and, while connected, wait (bounded) until the spool is sent.

        Call before the link closes. What is not acknowledged stays in the spool for the next
        start. A second call does nothing.
        """
        if self.closed:
            return
        self.closed = True
        await _cancel(self._windows)
        self._windows = None
        try:
            await self.cut()
        except Exception:
            log.exception("cutting the last telemetry window failed")
        deadline = time.monotonic() + self._flush_timeout_s
        while self._connected and time.monotonic() < deadline:
            if not self._in_flight and await self._spooled() == 0:
                break
            await asyncio.sleep(0.02)
        await _cancel(self._sending)
        self._sending = None
        await self._flush_acks()
        unsent = await self._call(self.spool.count)
        self._executor.shutdown(wait=False)
        log.info("telemetry stopped", extra={"device": self.device_id, "unsent": unsent})

    # -- windows -----------------------------------------------------------------------------

    async def cut(self) -> list[int]:
        """End the collector's window now: spool its records, publish its drift notices.

        Returns the sequence numbers given to the records.
        """
        windows, notices = self._collector.cut()
        seqs: list[int] = []
        if windows:
            items = [(w.kind, w.fields) for w in windows]
            try:
                seqs = await self._call(self.spool.append_many, self.device_id, items)
            except SpoolError as e:
                self.lost_windows += len(items)
                log.error(
                    "telemetry window not spooled; it will not reach the fleet",
                    extra={"records": len(items), "error": str(e), "lost": self.lost_windows},
                )
            self._wake.set()
        at = self._clock()
        for notice in notices:
            self._link.publish_event(
                DeviceEvent(
                    device_id=self.device_id,
                    kind="drift",
                    at=at,
                    model=notice.model[:64],
                    detail=notice.detail[:4000],
                )
            )
        return seqs

    async def _cut_every_window(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.window_s
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            due = max(due + self.window_s, loop.time())  # a late cut does not bunch the next
            try:
                await self.cut()
            except Exception:
                log.exception("cutting a telemetry window failed; the next one tries again")

    # -- sending -----------------------------------------------------------------------------

    def _on_connection(self, up: bool) -> None:
        # Either way, what was in flight is forgotten: after a reconnect it is sent again.
        self._connected = up
        self._connection += 1
        self._in_flight.clear()
        self._sent_up_to = 0
        if up:
            self._wake.set()

    def _on_published(self, mid: int) -> None:
        seq = self._in_flight.pop(mid, None)
        if seq is not None:
            self.acknowledged += 1
            self._acked.append(seq)
        self._wake.set()  # also room for more, or paho's queue has space again

    async def _sender(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush_acks()
                await self._send_more()
            except Exception:
                log.exception("sending telemetry failed; retrying")
                await asyncio.sleep(_RETRY_S)
                self._wake.set()

    async def _flush_acks(self) -> None:
        if not self._acked:
            return
        acked, self._acked = self._acked, []
        try:
            await self._call(self.spool.ack_many, acked)
        except SpoolError as e:  # they stay spooled and go again: a duplicate, not a loss
            log.warning(
                "acknowledged telemetry not removed from the spool", extra={"error": str(e)}
            )

    async def _send_more(self) -> None:
        while self._connected and len(self._in_flight) < self._max_in_flight:
            room = self._max_in_flight - len(self._in_flight)
            connection = self._connection
            batch = await self._call(self.spool.pending, room, after=self._sent_up_to)
            if not batch or connection != self._connection:
                return  # nothing waits, or the connection changed while the spool was read
            for record in batch:
                try:
                    info = self._client.publish(self._topics[record.kind], record.payload)
                except LinkError as e:  # paho's queue is full; a PUBACK wakes the sender
                    log.warning("telemetry held back", extra={"error": str(e)})
                    return
                self.published += 1
                if info.rc == mqtt.MQTT_ERR_NO_CONN:
                    return  # the connection just went; the reconnect sends it again
                self._in_flight[info.mid] = record.seq
                self._sent_up_to = record.seq

    # -- the spool's thread ------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def _spooled(self) -> int:
        await self._flush_acks()
        return await self._call(self.spool.count)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
