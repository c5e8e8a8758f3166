"""The telemetry reporter against a real Mosquitto: windows arrive in order with consecutive
sequence numbers, a broker outage loses none of them, a spool past its bound says what it
dropped, and a clean stop sends the last window."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt import FleetLink, LinkConfig
from agent.service import Agent
from agent.settings import AgentSettings
from agent.telemetry.reporter import TelemetryReporter
from agent.telemetry.spool import TelemetrySpool
from protocol.mqtt import DeviceEvent, Topics, decode
from protocol.telemetry import RECORDS, MetricsWindow, TelemetryRecord
from tests.mqtt_support import PlainBroker

DEVICE = "cam-1"
TOPICS = Topics()
WAIT = 10.0  # seconds for anything to arrive; reconnects back off from 1 s


@dataclass(frozen=True)
class Window:
    kind: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Notice:
    model: str
    version: str
    feature: str
    psi: float
    threshold: float
    rows: int
    detail: str


@dataclass
class FakeCollector:
    """Stands in for the collector: each cut ends one metrics window whose ``requests`` is the
    cut's number, plus whatever is queued in ``extra`` and ``notices``."""

    cuts: int = 0
    extra: list[Window] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)

    def cut(self) -> tuple[list[Window], list[Notice]]:
        self.cuts += 1
        start = datetime.now(timezone.utc)
        window = Window(
            "metrics",
            {"start": start, "end": start + timedelta(seconds=1), "model": "mlp",
             "version": "1.0.0", "seconds": 1.0, "requests": self.cuts, "errors": 0,
             "timeouts": 0, "fallbacks": 0},
        )  # fmt: skip
        windows, self.extra = [window, *self.extra], []
        notices, self.notices = self.notices, []
        return windows, notices


class Fleet:
    """The fleet's side: a persistent session on every device's telemetry and events that
    subscribes again on each connect, so it hears everything across broker restarts."""

    def __init__(self, broker: PlainBroker) -> None:
        self.records: list[TelemetryRecord] = []
        self.events: list[DeviceEvent] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        topics = [(TOPICS.every_device("telemetry"), 1), (TOPICS.every_device("events"), 1)]
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="fleet-telemetry", clean_session=False
        )
        self._client.reconnect_delay_set(1, 1)
        self._client.on_connect = lambda c, *_: c.subscribe(topics)
        self._client.on_subscribe = lambda *_: subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", broker.port)
        self._client.loop_start()
        assert subscribed.wait(WAIT), "no SUBACK"

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        topic = TOPICS.parse(msg.topic)
        with self._lock:
            if topic.kind == "telemetry":
                self.records.append(
                    decode(RECORDS[topic.sub], bytes(msg.payload), device_id=DEVICE)
                )
            else:
                self.events.append(decode(DeviceEvent, bytes(msg.payload), device_id=DEVICE))

    def seqs(self) -> list[int]:
        with self._lock:
            return [r.seq for r in self.records]

    def by_seq(self) -> dict[int, TelemetryRecord]:
        with self._lock:
            return {r.seq: r for r in self.records}

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


async def until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class Telemetry:
    reporter: TelemetryReporter
    link: FleetLink
    spool: TelemetrySpool
    collector: FakeCollector


@pytest.fixture
def fleet(plain_broker: PlainBroker) -> Iterator[Fleet]:
    f = Fleet(plain_broker)
    yield f
    f.close()


@pytest.fixture
async def start_telemetry(
    tmp_path: Path, plain_broker: PlainBroker
) -> AsyncIterator[Callable[..., Telemetry]]:
    agent = Agent(AgentSettings(state_dir=tmp_path / "state"))
    started: list[Telemetry] = []

    async def no_desired(raw: bytes) -> None:
        raise AssertionError("no desired state is published in these tests")

    def start(
        *, window_s: float = 3600.0, max_records: int = 10_000, broker_url: str | None = None
    ) -> Telemetry:
        link = FleetLink(
            agent,
            LinkConfig(
                broker_url=broker_url or plain_broker.url, device_id=DEVICE, state_interval_s=60.0
            ),
            no_desired,
        )
        spool = TelemetrySpool(tmp_path / "state" / "telemetry.db", max_records=max_records)
        collector = FakeCollector()
        reporter = TelemetryReporter(collector, spool, link, window_s, flush_timeout_s=WAIT)
        link.start()
        reporter.start()
        started.append(Telemetry(reporter, link, spool, collector))
        return started[-1]

    yield start
    for t in started:
        if not t.reporter.closed:  # not closed by the test itself
            await t.reporter.close()
            await t.link.close()
        t.spool.close()


class Proxy:
    """A TCP relay between the agent and the broker that can swallow what the agent sends
    (so nothing it publishes is acknowledged) and then cut the connection."""

    def __init__(self, broker: PlainBroker) -> None:
        self.broker = broker
        self.swallow = False
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"mqtt://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.broker.port)
        self._writers += [writer, up_writer]

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, upstream: bool
        ) -> None:
            while data := await source.read(65536):
                if not (upstream and self.swallow):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(
            pipe(reader, up_writer, True), pipe(up_reader, writer, False), return_exceptions=True
        )

    def cut(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def outage(broker: PlainBroker, link: FleetLink) -> None:
    broker.stop()
    await until(lambda: not link.client.connected.is_set(), "the link to notice the outage")


async def test_windows_arrive_in_order_with_consecutive_sequence_numbers(
    start_telemetry: Callable[..., Telemetry], fleet: Fleet
) -> None:
    t = start_telemetry(window_s=0.05)
    t.collector.notices.append(
        Notice("mlp", "1.0.0", "x", 0.4, 0.25, 500, "PSI of x is 0.40, over the 0.25 alert")
    )
    await until(lambda: len(fleet.seqs()) >= 12, "twelve windows")
    seqs = fleet.seqs()
    assert seqs == list(range(1, len(seqs) + 1))
    # Each window is the collector's, in the order it was cut.
    metrics = [r for r in fleet.records[:12] if isinstance(r, MetricsWindow)]
    assert [r.requests for r in metrics] == list(range(1, 13))
    # Acknowledged records leave the spool; nothing piles up.
    await until(lambda: t.spool.count() <= 2, "the spool to empty as PUBACKs come")
    assert t.reporter.acknowledged >= 12
    await until(lambda: bool(fleet.events), "the drift event")
    event = fleet.events[0]
    assert (event.kind, event.model, event.detail) == (
        "drift", "mlp", "PSI of x is 0.40, over the 0.25 alert",
    )  # fmt: skip


async def test_an_invalid_window_is_skipped_and_the_others_are_sent(
    start_telemetry: Callable[..., Telemetry], fleet: Fleet
) -> None:
    t = start_telemetry()
    await t.link.wait_connected(WAIT)
    now = datetime.now(timezone.utc)
    bad = {"start": now, "end": now - timedelta(seconds=1), "model": "mlp", "version": "1",
           "rows": 0}  # fmt: skip
    good = {"start": now, "end": now, "model": "mlp", "version": "1", "rows": 3}
    t.collector.extra = [Window("drift", bad), Window("drift", good)]
    assert await t.reporter.cut() == [1, 2]
    await until(lambda: sorted(fleet.seqs()) == [1, 2], "both good records")
    assert {type(r).__name__ for r in fleet.records} == {"MetricsWindow", "DriftWindow"}


async def test_a_broker_outage_loses_no_window(
    start_telemetry: Callable[..., Telemetry], fleet: Fleet, plain_broker: PlainBroker
) -> None:
    t = start_telemetry()
    await t.link.wait_connected(WAIT)
    for _ in range(3):
        await t.reporter.cut()
    await until(lambda: sorted(set(fleet.seqs())) == [1, 2, 3], "the first three windows")

    await outage(plain_broker, t.link)
    published = t.reporter.published
    for _ in range(5):
        await t.reporter.cut()
    assert t.spool.count() == 5
    assert t.reporter.published == published  # the spool holds them, not paho's queue

    plain_broker.start()
    await until(lambda: set(fleet.seqs()) == set(range(1, 9)), "every window after the outage")
    await until(lambda: t.spool.count() == 0, "the spool to empty")
    # One more after the reconnect carries on the sequence.
    await t.reporter.cut()
    await until(lambda: 9 in fleet.seqs(), "the window after the outage")
    assert all(r.dropped == 0 for r in fleet.records)


async def test_what_was_in_flight_when_the_connection_died_is_sent_again(
    start_telemetry: Callable[..., Telemetry], fleet: Fleet, plain_broker: PlainBroker
) -> None:
    proxy = Proxy(plain_broker)
    t = start_telemetry(broker_url=await proxy.start())
    try:
        await t.link.wait_connected(WAIT)
        await t.reporter.cut()
        await until(lambda: fleet.seqs() == [1], "the first window")

        proxy.swallow = True  # published, never acknowledged
        for _ in range(3):
            await t.reporter.cut()
        await until(lambda: t.reporter.published == 4, "three publishes")
        assert (t.spool.count(), fleet.seqs()) == (3, [1])

        proxy.swallow = False
        proxy.cut()
        await until(lambda: set(fleet.seqs()) == {1, 2, 3, 4}, "the replay after the reconnect")
        await until(lambda: t.spool.count() == 0, "the spool to empty")
        assert t.reporter.published >= 7  # 2-4 went twice: duplicates are fine, gaps are not
    finally:
        await t.reporter.close()
        await t.link.close()
        await proxy.close()


async def test_past_its_bound_the_spool_drops_the_oldest_and_the_next_record_says_so(
    start_telemetry: Callable[..., Telemetry], fleet: Fleet, plain_broker: PlainBroker
) -> None:
    t = start_telemetry(max_records=5)
    await t.link.wait_connected(WAIT)
    for _ in range(2):
        await t.reporter.cut()
    await until(lambda: sorted(set(fleet.seqs())) == [1, 2], "the first two windows")

    await outage(plain_broker, t.link)
    for _ in range(8):  # seqs 3-10 into a spool of 5: 3, 4 and 5 go
        await t.reporter.cut()
    assert t.spool.count() == 5
    assert t.spool.dropped_total == 3
    pending = t.spool.pending_dropped(DEVICE)

    plain_broker.start()
    await until(lambda: set(fleet.seqs()) >= set(range(6, 11)), "what the spool kept")
    await t.reporter.cut()  # the first record cut after the reconnect
    await until(lambda: 11 in fleet.seqs(), "the first window after the reconnect")

    received = fleet.by_seq()
    assert set(received) == {1, 2, *range(6, 12)}
    assert pending > 0 and received[11].dropped == pending
    # Every number the fleet will never see is accounted for by a `dropped` it did see.
    assert sum(r.dropped for r in received.values()) == 3


async def test_records_a_previous_run_left_are_sent_first(
    start_telemetry: Callable[..., Telemetry], fleet: Fleet, tmp_path: Path
) -> None:
    spool = TelemetrySpool(tmp_path / "state" / "telemetry.db")
    for _ in range(3):
        windows, _ = FakeCollector().cut()
        spool.append(DEVICE, windows[0].kind, windows[0].fields)
    spool.close()
    t = start_telemetry()
    await until(lambda: fleet.seqs() == [1, 2, 3], "the spooled records")
    assert await t.reporter.cut() == [4]
    await until(lambda: fleet.seqs() == [1, 2, 3, 4], "the next window")


async def test_a_clean_stop_sends_the_last_window_before_the_link_closes(
    start_telemetry: Callable[..., Telemetry], fleet: Fleet
) -> None:
    t = start_telemetry()
    await t.link.wait_connected(WAIT)
    await t.reporter.close()
    assert t.spool.count() == 0  # acknowledged before close returned
    await t.link.close()
    await until(lambda: fleet.seqs() == [1], "the last window")
    assert t.collector.cuts == 1
