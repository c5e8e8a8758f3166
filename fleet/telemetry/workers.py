"""Ingest workers: several processes taking telemetry off one shared subscription.

Each worker is an MQTT client (``edgefleet-ingest-<n>``, a persistent session) subscribed to
``$share/ingest/<root>/devices/+/telemetry/#``: the broker hands each message to one of them,
and each writes into the fleet's SQLite database (WAL; writers wait for each other up to the
busy timeout). The service, told ``ingest_workers`` > 0, then does not subscribe to telemetry.

A worker's session outlives it, and Mosquitto keeps handing a share of the messages to a
session whose client is gone. So when the pool shrinks, :func:`retire` reconnects as each
worker that is no longer wanted, takes in what its session held, unsubscribes it, and ends the
session.

Over TLS (``mqtts://``) worker n connects with its own certificate, CN ``edgefleet-ingest-<n>``
(``<client_dir>/ingest-<n>.pem``), issued from the device CA the first time it is needed: the
packaged broker takes the client id from the certificate, so workers sharing the service's
certificate would take over its session and each other's.

The embedded broker (amqtt) has no shared subscriptions: workers need Mosquitto (or another
broker with ``$share``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import re
import secrets
import signal
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet.errors import LinkError, TrustError
from fleet.files import atomic_write
from fleet.link import FleetLink, Incoming, TlsFiles, telemetry_share
from fleet.settings import FleetSettings
from fleet.store import open_store
from fleet.telemetry.ingest import TelemetryIngest, tune_gc
from fleet.trust.ca import DeviceCA
from fleet.trust.identities import (
    ClientFiles,
    check_ingest_workers,
    client_files,
    ingest_client_name,
)
from protocol.mqtt import BrokerAddress, Topics

__all__ = [
    "IngestWorkers",
    "retire",
    "run_worker",
    "share_group",
    "worker_client_id",
    "worker_tls",
]

log = logging.getLogger(__name__)

_GROUP = re.compile(r"[A-Za-z0-9_-]{1,64}")
_START_TIMEOUT = 30.0  # seconds for a worker process to connect
_STATS_EVERY = 60.0  # seconds between a worker's progress lines
_STOP_TIMEOUT = 10.0  # seconds a worker has to finish its batch before it is killed
_MAX_RESTART_DELAY = 30.0  # seconds


def worker_client_id(number: int) -> str:
    return ingest_client_name(number)


def _uses_tls(settings: FleetSettings) -> bool:
    return settings.service_broker_url.startswith("mqtts://")


def worker_tls(settings: FleetSettings, number: int) -> TlsFiles | None:
    """Worker ``number``'s own certificate for an ``mqtts://`` broker (None for ``mqtt://``),
    issued from the device CA the first time it is needed.

    Raises :class:`LinkError` when it is missing and there is no device CA here to issue it.
    """
    if not _uses_tls(settings):
        return None
    name = worker_client_id(number)
    files = client_files(settings.client_dir, name)
    ca_chain = settings.broker_dir / "ca.pem"
    if not files.exist():
        _issue(settings, name, files)
    if not ca_chain.is_file():
        raise LinkError(
            f"{ca_chain} is missing: the workers check the broker's certificate against the "
            "device CA chain; copy it from the fleet host's <home>/broker/ca.pem"
        )
    return TlsFiles(ca=ca_chain, certificate=files.certificate, key=files.key)


def _issue(settings: FleetSettings, name: str, files: ClientFiles) -> None:
    try:
        ca = DeviceCA.open(settings.ca_dir)
    except TrustError:
        raise LinkError(
            f"{name} connects with its own client certificate, {files.certificate} and "
            f"{files.key}, which are not there, and there is no device CA in {settings.ca_dir} "
            f"to issue it. On the fleet host run `edgefleet fleet keys client {name}` and copy "
            f"the {files.certificate.name} and {files.key.name} it writes into "
            f"{settings.client_dir} here"
        ) from None
    try:
        ca.issue_client(name, files.key, files.certificate)
    except (OSError, TrustError) as e:
        raise LinkError(f"cannot issue {name}'s client certificate: {e}") from e
    log.info(
        "ingest worker certificate issued",
        extra={"client": name, "certificate": str(files.certificate)},
    )


def share_group(settings: FleetSettings) -> str:
    """The workers' shared-subscription group: ``ingest-<random>``, made once per fleet home.

    Mosquitto 2.0 grants every SUBSCRIBE and checks the ACL only when it delivers. A device
    that joined the workers' group would get its turn at each message, be refused it by the
    ACL, and the message would be lost to the workers. A group name devices cannot guess keeps
    them out; it lives in ``<home>/ingest-share`` (0600), which every worker host shares with
    the fleet's keys.
    """
    path = settings.home / "ingest-share"
    try:
        group = path.read_text().strip()
    except FileNotFoundError:
        group = f"ingest-{secrets.token_hex(12)}"
        try:
            atomic_write(path, group.encode(), mode=0o600, exclusive=True)
        except FileExistsError:  # another worker made it first
            group = path.read_text().strip()
    if not _GROUP.fullmatch(group):
        raise LinkError(
            f"{path} holds {group!r}, not a shared-subscription group name (letters, digits, "
            "'-' and '_'); delete it and a new one is made"
        )
    return group


def _check_broker(settings: FleetSettings) -> None:
    if settings.embedded_broker:
        raise LinkError(
            "ingest workers need a broker with shared subscriptions ($share), which the "
            "embedded broker (amqtt) does not have: run Mosquitto, or let the service take "
            "telemetry itself (ingest_workers 0)"
        )


async def run_worker(
    settings: FleetSettings,
    number: int,
    stop: asyncio.Event,
    *,
    ready: Callable[[], None] | None = None,
) -> TelemetryIngest:
    """Take telemetry off the shared subscription as worker ``number`` until ``stop`` is set."""
    _check_broker(settings)
    topics = Topics(settings.topic_root)
    group = share_group(settings)
    store = open_store(settings.database_path)
    ingest = TelemetryIngest(store, topics)
    link = FleetLink(
        settings.service_broker_url,
        topics,
        ingest,
        tls=worker_tls(settings, number),
        client_id=worker_client_id(number),
        subscriptions=[telemetry_share(topics, group)],
        share_group=group,
    )
    try:
        await link.start()
        log.info("ingest worker running", extra={"worker": number, "client": link.address})
        if ready is not None:
            ready()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _STATS_EVERY)
            log.info(
                "ingest worker progress",
                extra={
                    "worker": number,
                    "taken": ingest.taken,
                    "duplicates": ingest.duplicates,
                    "rejected": sum(ingest.rejected.values()),
                    "failed": ingest.failed,
                    "dropped_in_buffer": link.dropped,
                },
            )
    finally:
        await link.close()
        store.close()
    return ingest


async def retire(settings: FleetSettings, numbers: Sequence[int], *, quiet_s: float = 0.5) -> int:
    """End the share of workers ``numbers``: take in what their sessions held, unsubscribe them
    and end the sessions. Returns for how many of them the broker still kept a session.

    Over TLS only workers whose certificate is on this host are looked at: a worker connects
    with its own, so one never issued here never ran from here.
    """
    _check_broker(settings)
    if _uses_tls(settings):
        numbers = [
            n for n in numbers if client_files(settings.client_dir, worker_client_id(n)).exist()
        ]
    topics = Topics(settings.topic_root)
    store = open_store(settings.database_path)
    ingest = TelemetryIngest(store, topics)
    heard = 0
    last = time.monotonic()

    async def take(batch: Sequence[Incoming]) -> None:
        nonlocal heard, last
        heard += len(batch)
        last = time.monotonic()
        await ingest(batch)

    async def one(number: int) -> bool:
        link = FleetLink(
            settings.service_broker_url,
            topics,
            take,
            tls=worker_tls(settings, number),
            client_id=worker_client_id(number),
            subscriptions=(),  # unsubscribes the share on connect
            share_group=share_group(settings),
        )
        await link.start()
        try:
            if link.resumed:  # its session was there: let what it held arrive
                while time.monotonic() - last < quiet_s:
                    await asyncio.sleep(quiet_s / 5)
        finally:
            await link.close()
        await asyncio.to_thread(_forget, settings, number)
        return link.resumed

    link_log = logging.getLogger("fleet.link")
    level = link_log.level
    link_log.setLevel(max(level, logging.WARNING))  # not a "connected" line per number tried
    try:
        last = time.monotonic()
        resumed = sum(await asyncio.gather(*(one(n) for n in numbers)))
    finally:
        link_log.setLevel(level)
        store.close()
    if resumed:
        log.warning(
            "retired ingest worker sessions",
            extra={"sessions": resumed, "messages": heard, "taken": ingest.taken},
        )
    return resumed


def _forget(settings: FleetSettings, number: int, timeout: float = 10.0) -> None:
    """Connect as worker ``number`` with a clean session: the broker drops the one it kept."""
    address = BrokerAddress.parse(settings.service_broker_url)
    client_id = worker_client_id(number)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True
    )
    tls = worker_tls(settings, number)
    if tls is not None:
        context = ssl.create_default_context(cafile=str(tls.ca))
        context.load_cert_chain(str(tls.certificate), str(tls.key))
        client.tls_set_context(context)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    try:
        client.connect(address.host, address.port, keepalive=10)
        deadline = time.monotonic() + timeout
        while not connected.is_set() and time.monotonic() < deadline:
            client.loop(0.05)
        if not connected.is_set():
            raise LinkError(f"the broker at {address} did not answer {client_id}'s connection")
        client.disconnect()
    except (OSError, ssl.SSLError) as e:
        raise LinkError(f"cannot reach the MQTT broker at {address}: {e}") from e
    finally:
        client._reset_sockets()  # paho closes its sockets only at garbage collection


def _worker_process(
    settings: FleetSettings,
    number: int,
    ready: ProcessEvent,
    setup: Callable[[], None] | None,
) -> None:
    if setup is not None:
        setup()
    tune_gc()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(settings, number, stop, ready=ready.set)

    try:
        asyncio.run(main())
    except LinkError as e:
        log.error("ingest worker stopped", extra={"worker": number, "detail": str(e)})
        raise SystemExit(1) from None


class IngestWorkers:
    """Runs ``count`` worker processes and restarts one that dies, until :meth:`stop`."""

    def __init__(
        self,
        settings: FleetSettings,
        count: int,
        *,
        setup: Callable[[], None] | None = None,  # picklable: run first in each process
        restart_delay: float = 1.0,  # seconds
    ) -> None:
        if count < 1:
            raise ValueError(f"an ingest pool needs at least one worker, not {count}")
        check_ingest_workers(count)
        _check_broker(settings)
        self.settings = settings
        self.count = count
        self._setup = setup
        self._restart_delay = restart_delay
        self._context = multiprocessing.get_context("spawn")
        self._processes: dict[int, Any] = {}
        # Kept referenced: a child rebuilds its event from the parent's semaphore when it starts.
        self._ready: dict[int, ProcessEvent] = {}
        self._started: dict[int, float] = {}
        self._stop = threading.Event()
        self.restarts = 0

    def stop(self) -> None:
        self._stop.set()

    def run(self, *, on_ready: Callable[[], None] | None = None) -> None:
        """Start every worker, wait until each has connected, then watch them until stopped.

        Raises :class:`LinkError` when a worker cannot start (its own log line says why).
        """
        # Certificates are issued here, one at a time: the CA's index is not shared safely
        # between processes issuing at once.
        for number in range(1, self.count + 1):
            worker_tls(self.settings, number)
        share_group(self.settings)  # made once, before the workers read it
        try:
            waiting = {n: self._start(n) for n in range(1, self.count + 1)}
            deadline = time.monotonic() + _START_TIMEOUT
            while waiting and not self._stop.is_set():
                for number, ready in list(waiting.items()):
                    if ready.wait(0.05):
                        del waiting[number]
                    elif not self._processes[number].is_alive():
                        raise LinkError(
                            f"ingest worker {number} could not start (exit code "
                            f"{self._processes[number].exitcode}); its log says why"
                        )
                if waiting and time.monotonic() > deadline:
                    raise LinkError(
                        f"ingest workers {sorted(waiting)} did not connect within "
                        f"{_START_TIMEOUT:g} s; check the broker URL and the broker's log"
                    )
            if on_ready is not None and not self._stop.is_set():
                on_ready()
            delay = self._restart_delay
            while not self._stop.wait(0.5):
                for number, process in list(self._processes.items()):
                    if process.is_alive():
                        continue
                    # A worker that keeps dying at once (the broker gone) is retried less often.
                    lived = time.monotonic() - self._started[number]
                    delay = (
                        min(delay * 2, _MAX_RESTART_DELAY) if lived < 10 else self._restart_delay
                    )
                    log.error(
                        "ingest worker exited; starting it again",
                        extra={"worker": number, "exit_code": process.exitcode, "in_s": delay},
                    )
                    if self._stop.wait(delay):
                        break
                    self.restarts += 1
                    self._start(number)
        finally:
            self._terminate()

    def _start(self, number: int) -> ProcessEvent:
        ready = self._context.Event()
        process = self._context.Process(
            target=_worker_process,
            args=(self.settings, number, ready, self._setup),
            name=worker_client_id(number),
            daemon=True,
        )
        process.start()
        self._processes[number] = process
        self._ready[number] = ready
        self._started[number] = time.monotonic()
        return ready

    def _terminate(self) -> None:
        for process in self._processes.values():
            if process.is_alive():
                process.terminate()  # SIGTERM: the worker finishes its batch and disconnects
        deadline = time.monotonic() + _STOP_TIMEOUT
        for process in self._processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
