"""Simulated devices' telemetry, published at a fixed rate: a few MQTT connections per process,
each publishing for many device ids (an anonymous loopback broker does not check who publishes
where), so the publishers stay a small share of the machine and the fleet's ingest is what is
measured.

Every device sends, per window, one ``MetricsWindow`` (~650 bytes) and one ``DriftWindow`` (16
features and one output, 12 bins each: ~1.2 KiB), numbered with one per-device sequence as an
agent's spool numbers them. The records are real: 64 variants of each are built with the
protocol's pydantic models, and per device and window only ``device_id``, ``seq``, ``start``
and ``end`` change. QoS 1: a record counts as sent when the broker's PUBACK arrives.

Run as a process (``ingest.py`` starts a few per step)::

    python -m benchmarks.telemetry.publishers --port 1883 --first 0 --devices 5000 \
        --rate 5000 --seconds 10 --seq-start 1

It connects, prints ``{"ready": true}``, waits for a line on stdin, publishes, and prints one
JSON line: records sent and acknowledged, seconds, CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import struct
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.fleet.sim import PUBACK, MqttClient  # noqa: E402
from protocol.mqtt import Topics, encode  # noqa: E402
from protocol.telemetry import LATENCY_BUCKETS_MS, DriftWindow, MetricsWindow  # noqa: E402

__all__ = ["FEATURES", "device_id", "records_of"]

FEATURES = 16  # drift histograms per record, plus one output
BINS = 12  # 10 reference bins plus under- and overflow
START = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
_MAX_UNACKED = 30_000  # per connection, well under MQTT's 65,535 packet ids
_TICK = 0.01  # seconds between bursts
_VARIANTS = 64  # distinct record bodies


def device_id(index: int) -> str:
    return f"tel-{index:05d}"


def _records(index: int, seq: int, start: datetime) -> tuple[MetricsWindow, DriftWindow]:
    rng = random.Random(index * 7919 + seq)
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    requests = rng.randint(200, 2000)
    for _ in range(40):
        counts[min(int(rng.gauss(6, 1.5)), len(counts) - 1)] += requests // 40
    errors = rng.randint(0, 5)
    end = start + timedelta(seconds=10)
    metrics = MetricsWindow(
        device_id=device_id(index), seq=seq, start=start, end=end, model="digits",
        version="2.0.0", seconds=10.0, requests=requests, errors=errors,
        timeouts=min(errors, 1), fallbacks=errors, latency_p50_ms=rng.uniform(0.5, 2),
        latency_p95_ms=rng.uniform(2, 6), latency_p99_ms=rng.uniform(6, 20),
        latency_counts=tuple(counts), batches=requests // 3, batch_rows=requests,
        queue_ms_mean=rng.uniform(0, 0.5), queue_ms_p95=rng.uniform(0.5, 2), device="CPU",
        cpu_percent=rng.uniform(5, 40), rss_mb=rng.uniform(60, 120),
    )  # fmt: skip
    rows = requests - errors

    def histogram() -> tuple[int, ...]:
        weights = [rng.random() for _ in range(BINS)]
        total = sum(weights)
        return tuple(int(rows * w / total) for w in weights)

    drift = DriftWindow(
        device_id=device_id(index),
        seq=seq + 1,
        start=start,
        end=end,
        model="digits",
        version="2.0.0",
        rows=rows,
        features={f"f{i:02d}": histogram() for i in range(FEATURES)},
        outputs={"label": histogram()},
        psi={f"f{i:02d}": round(rng.uniform(0, 0.05), 4) for i in range(FEATURES)},
    )
    return metrics, drift


def records_of(index: int, seq: int, start: datetime) -> tuple[bytes, bytes]:
    """Device ``index``'s encoded metrics (``seq``) and drift (``seq + 1``) of one window."""
    metrics, drift = _records(index, seq, start)
    return encode(metrics), encode(drift)


def _tails(variant: int) -> tuple[bytes, bytes]:
    """What follows ``end`` in a variant's metrics and drift records."""
    tails = []
    for payload in records_of(variant, 1, START):
        tail = payload.split(b'"end":"', 1)[1].split(b'"', 1)[1]
        tails.append(tail)
    return tails[0], tails[1]


@dataclass
class _Template:
    """One device's records with ``seq``, ``start`` and ``end`` left to fill in."""

    topics: tuple[bytes, bytes]  # metrics, drift topic (encoded, length-prefixed)
    parts: tuple[tuple[bytes, bytes], ...]  # per kind: before seq, after end

    @classmethod
    def of(cls, index: int, topics: Topics, tails: tuple[bytes, bytes]) -> _Template:
        head = b'{"schema":1,"device_id":"%s","seq":' % device_id(index).encode()
        names = (topics.telemetry(device_id(index), k).encode() for k in ("metrics", "drift"))
        topic_pair = tuple(struct.pack("!H", len(t)) + t for t in names)
        return cls(
            topics=(topic_pair[0], topic_pair[1]), parts=((head, tails[0]), (head, tails[1]))
        )

    def packet(self, kind: int, seq: int, times: bytes, packet_id: int) -> bytes:
        head, tail = self.parts[kind]
        # A real record: `"seq":N,"dropped":0,"start":"…","end":"…"` and the rest unchanged.
        payload = b"%s%d,%s%s" % (head, seq, times, tail)
        body = self.topics[kind] + struct.pack("!H", packet_id) + payload
        return _fixed_header(len(body)) + body


def _fixed_header(length: int) -> bytes:
    out = bytearray((0x32,))  # PUBLISH, QoS 1
    while True:
        length, digit = divmod(length, 128)
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


class Publisher(MqttClient):
    """A connection that writes PUBLISH packets in bursts and counts the PUBACKs."""

    def __init__(self, client_id: str) -> None:
        super().__init__(client_id, keepalive=120)
        self.sent = 0
        self.acked = 0
        self._id = 0

    def next_id(self) -> int:
        self._id = self._id % 65535 + 1
        return self._id

    def burst(self, packets: list[bytes]) -> None:
        assert self._transport is not None
        self._transport.write(b"".join(packets))
        self.sent += len(packets)

    def _dispatch(self, first: int, body: bytes) -> None:
        if first & 0xF0 == PUBACK:
            self.acked += 1
        else:
            super()._dispatch(first, body)


async def _publish(args: argparse.Namespace) -> dict[str, object]:
    topics = Topics()
    indices = range(args.first, args.first + args.devices)
    tails = [_tails(v) for v in range(_VARIANTS)]
    templates = [_Template.of(i, topics, tails[i % _VARIANTS]) for i in indices]
    clients = [Publisher(f"pub-{args.first}-{n}") for n in range(args.connections)]
    for client in clients:
        await client.connect(args.host, args.port)
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    cpu_before = _cpu()
    rounds = max(1, round(args.rate * args.seconds / (2 * args.devices)))
    total = 2 * args.devices * rounds
    # (round, device) in order: every device's window k goes out before any device's k + 1.
    plan = ((r, d) for r in range(rounds) for d in range(args.devices))
    started = time.monotonic()
    due = 0
    window = timedelta(seconds=10)
    current_round, times = -1, b""
    while due < total:
        await asyncio.sleep(_TICK)
        target = min(total, int((time.monotonic() - started) * args.rate))
        bursts: list[list[bytes]] = [[] for _ in clients]
        while due < target:
            r, d = next(plan)
            if r != current_round:
                current_round = r
                start = START + window * (args.seq_start // 2 + r)
                times = b'"dropped":0,"start":"%s","end":"%s"' % (
                    start.isoformat().replace("+00:00", "Z").encode(),
                    (start + window).isoformat().replace("+00:00", "Z").encode(),
                )
            seq = args.seq_start + 2 * r
            client = clients[d % len(clients)]
            template = templates[d]
            out = bursts[d % len(clients)]
            out.append(template.packet(0, seq, times, client.next_id()))
            out.append(template.packet(1, seq + 1, times, client.next_id()))
            due += 2
        for client, packets in zip(clients, bursts, strict=True):
            if packets:
                while client.sent - client.acked > _MAX_UNACKED:
                    await asyncio.sleep(_TICK)
                client.burst(packets)
    publishing = time.monotonic() - started
    deadline = time.monotonic() + 30
    while sum(c.acked for c in clients) < total and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    acked = sum(c.acked for c in clients)
    for client in clients:
        await client.disconnect()
    return {
        "sent": total,
        "acked": acked,
        "rounds": rounds,
        "seconds": round(publishing, 3),
        "cpu_s": round(_cpu() - cpu_before, 3),
    }


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--first", type=int, default=0, help="first device number")
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="records per second")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--seq-start", type=int, default=1, help="odd: the first window's seq")
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(_publish(args))), flush=True)


if __name__ == "__main__":
    main()
