"""Simulated devices, many per process: each one is an MQTT connection (``sim.MqttClient``) that
does what an agent does on the wire and nothing else.

A device connects with its id as client id and a retained ``lost`` will, subscribes to its
desired topic, and publishes a retained ``AgentState`` saying it serves ``digits@1.0.0``. On a
desired state it checks the director's signature (``protocol.director.verify_desired``, the
agent's real work), notes when the message arrived, and answers ``received``, then its new
``state`` (carrying the last progress, as an agent's does), then ``committed`` with a healthy
probation report — with no simulated apply time, so the fleet's control plane is all that is
measured.

Run as a process (``run.py`` starts a few)::

    python -m benchmarks.fleet.devices --port 1883 --first 0 --count 2500 \
        --director-key director.pub.pem --out devices-0.json

It prints one JSON line when every device is connected, then serves until SIGTERM, when it
writes what each device saw to ``--out`` and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks.fleet` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.fleet.sim import Message, MqttClient, MqttError, Will, keep_alive  # noqa: E402
from protocol.director import DirectorError, verify_desired  # noqa: E402
from protocol.mqtt import (  # noqa: E402
    ActiveModel,
    AgentState,
    ProbationReport,
    Topics,
    TrustSummary,
    UpdateProgress,
    VersionWindow,
    encode,
)

__all__ = ["DeviceRecord", "SimConfig", "SimulatedDevice", "device_id", "run"]

AGENT_VERSION = "0.1.0-sim"
CONNECT_ATTEMPTS = 5


def device_id(index: int) -> str:
    """The id of simulated device number ``index``."""
    return f"sim-{index:05d}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class SimConfig:
    """One simulator process: which devices, which broker, which director key."""

    host: str
    port: int
    first: int
    count: int
    director_key: Ed25519PublicKey
    topics: Topics
    model: str = "digits"
    version: str = "1.0.0"
    keepalive: int = 120  # seconds
    connect_concurrency: int = 64  # connections opened at once by this process


@dataclass
class Delivery:
    """One desired state a device accepted. Times are ``time.time()``: wall clock, comparable
    across processes and with the fleet's own timestamps on the same machine."""

    seq: int
    rollout_id: str | None
    version: str
    received: float  # its PUBLISH reached this process
    accepted: float  # its signature and sequence checked out
    committed: float | None = None  # the broker acknowledged our `committed`


@dataclass
class DeviceRecord:
    """What one device saw."""

    connected: float | None = None
    deliveries: list[Delivery] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # DirectorError reasons


@dataclass
class Counters:
    verify_s: float = 0.0  # CPU seconds inside verify_desired
    verified: int = 0
    lost: int = 0
    errors: list[str] = field(default_factory=list)


class SimulatedDevice:
    """One device's MQTT conversation with the fleet."""

    def __init__(self, device_id: str, config: SimConfig, counters: Counters) -> None:
        self.id = device_id
        self.config = config
        self.counters = counters
        self.record = DeviceRecord()
        self.version = config.version
        self.last_seq = 0
        self.last_update: UpdateProgress | None = None  # carried in `state`, as an agent does
        self._tasks: set[asyncio.Task[None]] = set()
        topics = config.topics
        self._state_topic = topics.state(device_id)
        self._update_topic = topics.update(device_id)
        self._desired_topic = topics.desired(device_id)
        lost = AgentState(device_id=device_id, state="lost")
        self.client = MqttClient(
            device_id,
            on_message=self._on_message,
            keepalive=config.keepalive,
            will=Will(self._state_topic, encode(lost)),
        )

    async def start(self) -> None:
        """Connect, subscribe to the desired topic and announce the running model."""
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                await self.client.connect(self.config.host, self.config.port)
                break
            except MqttError:
                if attempt == CONNECT_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.2 * 2**attempt)
        await self.client.subscribe([(self._desired_topic, 1)])
        await self.client.publish(self._state_topic, encode(self._state()), qos=1, retain=True)
        self.record.connected = time.time()
        if self.client.closed is not None:
            self.client.closed.add_done_callback(self._closed)

    def _closed(self, _: asyncio.Future[None]) -> None:
        self.counters.lost += 1

    def _state(self) -> AgentState:
        model = ActiveModel(
            name=self.config.model, version=self.version, runtime="onnxruntime", device="CPU"
        )
        return AgentState(
            device_id=self.id,
            at=_now(),
            agent_version=AGENT_VERSION,
            models=(model,),
            hardware={"cpu_cores": 2, "simulated": True},
            trust=TrustSummary(status="ok", last_applied_seq=self.last_seq),
            update=self.last_update,
        )

    def _on_message(self, message: Message) -> None:
        received = time.time()
        if message.topic != self._desired_topic or not message.payload:
            return  # an empty retained payload clears the topic: nothing to do
        task = asyncio.get_running_loop().create_task(self._handle(message.payload, received))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, payload: bytes, received: float) -> None:
        try:
            await self._apply(payload, received)
        except MqttError as e:
            self.counters.errors.append(str(e))

    async def _apply(self, payload: bytes, received: float) -> None:
        started = time.process_time()
        try:
            state = verify_desired(
                payload,
                self.config.director_key,
                device_id=self.id,
                last_seq=self.last_seq,
                now=_now(),
            )
        except DirectorError as e:
            self.record.refused.append(e.reason)
            refusal = UpdateProgress(
                device_id=self.id, seq=None, stage="refused", at=_now(), reason=e.reason
            )
            await self._publish_update(refusal)
            return
        finally:
            self.counters.verify_s += time.process_time() - started
            self.counters.verified += 1
        target = state.models[0]
        delivery = Delivery(state.seq, state.rollout_id, target.version, received, time.time())
        self.record.deliveries.append(delivery)
        self.last_seq = state.seq
        names = (f"{target.name}@{target.version}",)

        def progress(stage: str, **extra: object) -> UpdateProgress:
            return UpdateProgress.model_validate(
                {
                    "device_id": self.id,
                    "seq": state.seq,
                    "rollout_id": state.rollout_id,
                    "stage": stage,
                    "at": _now(),
                    "models": names,
                    **extra,
                }
            )

        await self._publish_update(progress("received"))
        previous, self.version = self.version, target.version
        await self.client.publish(self._state_topic, encode(self._state()), qos=1, retain=True)
        report = ProbationReport(
            model=target.name,
            candidate=_healthy_window(target.version),
            baseline=_healthy_window(previous),
            verdict="passed",
        )
        await self._publish_update(progress("committed", probation=(report,)))
        delivery.committed = time.time()

    async def _publish_update(self, progress: UpdateProgress) -> None:
        self.last_update = progress
        await self.client.publish(self._update_topic, encode(progress), qos=1)


def _healthy_window(version: str) -> VersionWindow:
    """A probation window in which nothing went wrong: every gate should pass on it."""
    return VersionWindow(
        version=version, requests=600, errors=0, fallbacks=0, p95_ms=2.0, seconds=60.0
    )


async def run(config: SimConfig, out: Path) -> None:
    """Start every device, say so on stdout, serve until SIGTERM, then write ``out``."""
    counters = Counters()
    devices = [
        SimulatedDevice(device_id(i), config, counters)
        for i in range(config.first, config.first + config.count)
    ]
    gate = asyncio.Semaphore(config.connect_concurrency)

    async def start(device: SimulatedDevice) -> None:
        async with gate:
            await device.start()

    began = time.monotonic()
    outcomes = await asyncio.gather(*(start(d) for d in devices), return_exceptions=True)
    failed = [str(o) for o in outcomes if isinstance(o, BaseException)]
    counters.errors.extend(failed[:20])
    print(
        json.dumps(
            {
                "ready": len(devices) - len(failed),
                "failed": len(failed),
                "connect_s": round(time.monotonic() - began, 3),
                "first_error": failed[0] if failed else None,
            }
        ),
        flush=True,
    )
    pinger = asyncio.get_running_loop().create_task(keep_alive(lambda: (d.client for d in devices)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    pinger.cancel()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # ru_maxrss would count the parent's memory at fork; VmHWM starts afresh at exec.
    status = Path("/proc/self/status").read_text()
    peak_kib = next(
        int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")
    )
    result = {
        "pid": os.getpid(),
        "devices": {d.id: asdict(d.record) for d in devices},
        "verify_s": round(counters.verify_s, 4),
        "verified": counters.verified,
        "lost": counters.lost,
        "errors": counters.errors[:20],
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "max_rss_mib": round(peak_kib / 1024, 1),
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out)
    with contextlib.suppress(MqttError):
        await asyncio.gather(*(d.client.disconnect() for d in devices), return_exceptions=True)


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise SystemExit(f"{path} is not an Ed25519 public key")
    return key


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="the broker's port (plain MQTT)")
    p.add_argument("--first", type=int, default=0, help="number of the first device")
    p.add_argument("--count", type=int, required=True, help="devices in this process")
    p.add_argument("--director-key", type=Path, required=True, help="director public key, PEM")
    p.add_argument("--topic-root", default=Topics().root)
    p.add_argument("--connect-concurrency", type=int, default=64)
    p.add_argument("--out", type=Path, required=True, help="where to write what devices saw")
    args = p.parse_args()
    config = SimConfig(
        host=args.host,
        port=args.port,
        first=args.first,
        count=args.count,
        director_key=load_public_key(args.director_key),
        topics=Topics(args.topic_root),
        connect_concurrency=args.connect_concurrency,
    )
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(config, args.out))
    else:
        uvloop.run(run(config, args.out))


if __name__ == "__main__":
    main()
