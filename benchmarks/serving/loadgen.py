"""Closed-loop HTTP/1.1 load generator: persistent keep-alive connections over raw sockets.

Standard library only, so a worker process starts in a few milliseconds and costs the server's
two cores as little as possible. Run as a script, it reads one JSON spec on stdin and writes one
JSON result on stdout; :func:`run_workers` starts several such processes and merges their answers.

Each connection keeps exactly one request in flight (closed loop). A request counts when its
answer arrives between ``start`` and ``end`` (both ``time.monotonic()`` values, which all
processes on one Linux host share), so throughput is answers per second of the window even when
one answer takes longer than the window; answers before ``start`` are the warm-up.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LoadResult", "Target", "build_request", "probe", "run_workers"]

_HEADER_END = b"\r\n\r\n"
_RECV = 1 << 16  # bytes per recv call; CPython allocates the full size on every call


@dataclass(frozen=True)
class Target:
    """Where requests go: TCP ``host:port`` or a Unix socket path."""

    host: str = "127.0.0.1"
    port: int = 0
    unix_path: str | None = None

    def connect(self) -> socket.socket:
        if self.unix_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.unix_path)
        else:
            sock = socket.create_connection((self.host, self.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


@dataclass
class LoadResult:
    """Latencies (seconds) of the requests that counted, and what went wrong."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    window: float = 0.0  # seconds between start and end


def build_request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """One complete ``POST`` request, built once and sent unchanged every time."""
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: localhost",
        "Connection: keep-alive",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Conn:
    """One connection's state: the request being sent, then the answer being read."""

    __slots__ = ("buf", "need", "sent", "sock", "status", "t0")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = 0
        self.buf = bytearray()
        self.need = -1  # total bytes of the answer, known once its headers are in
        self.status = 0
        self.t0 = 0.0

    def feed(self, data: bytes) -> bool:
        """Add received bytes; True once the whole answer is in."""
        self.buf += data
        if self.need < 0:
            end = self.buf.find(_HEADER_END)
            if end < 0:
                return False
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            self.status = int(head[0].split(" ", 2)[1])
            length = None
            for line in head[1:]:
                key, _, value = line.partition(":")
                if key.strip().lower() == "content-length":
                    length = int(value)
            if length is None:
                raise RuntimeError(f"answer without Content-Length: {head[0]}")
            self.need = end + 4 + length
        return len(self.buf) >= self.need

    def body(self) -> bytes:
        return bytes(self.buf[self.buf.find(_HEADER_END) + 4 : self.need])

    def reset(self) -> None:
        self.sent = 0
        self.buf.clear()
        self.need = -1


def probe(target: Target, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` once; return the answer's status and body."""
    conn = _Conn(target.connect())
    try:
        conn.sock.settimeout(30)
        conn.sock.sendall(request)
        while not conn.feed(_recv(conn.sock)):
            pass
        return conn.status, conn.body()
    finally:
        conn.sock.close()


def _run_blocking(target: Target, request: bytes, start: float, end: float) -> LoadResult:
    """One connection, plain blocking calls: the lowest-latency client loop there is."""
    result = LoadResult(window=end - start)
    conn = _Conn(target.connect())
    now = time.monotonic
    while True:
        t0 = now()
        if t0 >= end:
            break
        conn.sock.sendall(request)
        while not conn.feed(_recv(conn.sock)):
            pass
        t1 = now()
        if conn.status != 200:
            _error(result, conn)
        elif start <= t1 <= end:
            result.latencies.append(t1 - t0)
        conn.reset()
    conn.sock.close()
    return result


def _run_selector(
    target: Target, request: bytes, connections: int, start: float, end: float
) -> LoadResult:
    """Several connections multiplexed with epoll, each with one request in flight."""
    result = LoadResult(window=end - start)
    sel = selectors.DefaultSelector()
    view = memoryview(request)
    now = time.monotonic
    conns = [_Conn(target.connect()) for _ in range(connections)]
    for conn in conns:
        conn.sock.setblocking(False)
        conn.t0 = now()
        _send(conn, view)
        sel.register(conn.sock, _events(conn, view), conn)
    live = len(conns)
    while live:
        for key, mask in sel.select(timeout=1.0):
            conn = key.data
            if mask & selectors.EVENT_WRITE and conn.sent < len(view):
                _send(conn, view)
                if conn.sent == len(view):
                    sel.modify(conn.sock, selectors.EVENT_READ, conn)
                continue
            if not conn.feed(_recv(conn.sock)):
                continue
            t1 = now()
            if conn.status != 200:
                _error(result, conn)
            elif start <= t1 <= end:
                result.latencies.append(t1 - conn.t0)
            conn.reset()
            if t1 >= end:
                sel.unregister(conn.sock)
                conn.sock.close()
                live -= 1
                continue
            conn.t0 = t1
            _send(conn, view)
            sel.modify(conn.sock, _events(conn, view), conn)
    sel.close()
    return result


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(_RECV)
    if not data:
        raise RuntimeError("the server closed a keep-alive connection")
    return data


def _send(conn: _Conn, view: memoryview) -> None:
    with contextlib.suppress(BlockingIOError):  # the socket buffer is full: wait for EPOLLOUT
        conn.sent += conn.sock.send(view[conn.sent :])


def _events(conn: _Conn, view: memoryview) -> int:
    return selectors.EVENT_READ if conn.sent == len(view) else selectors.EVENT_WRITE


def _error(result: LoadResult, conn: _Conn) -> None:
    result.errors += 1
    if result.first_error is None:
        result.first_error = f"HTTP {conn.status}: {conn.body()[:300]!r}"


def _worker(spec: dict[str, object]) -> LoadResult:
    target = Target(**spec["target"])  # type: ignore[arg-type]
    request = Path(str(spec["request_file"])).read_bytes()
    connections = int(spec["connections"])  # type: ignore[call-overload]
    start, end = float(spec["start"]), float(spec["end"])  # type: ignore[arg-type]
    if connections == 1:
        return _run_blocking(target, request, start, end)
    return _run_selector(target, request, connections, start, end)


def run_workers(
    target: Target,
    request_file: Path,
    concurrency: int,
    *,
    processes: int,
    warmup: float,
    duration: float,
    python: str = sys.executable,
) -> LoadResult:
    """Run ``concurrency`` connections spread over ``processes`` worker processes."""
    processes = max(1, min(processes, concurrency))
    # Workers start in ~30 ms; the margin keeps their start-up out of the warm-up window.
    start = time.monotonic() + 0.3 + warmup
    end = start + duration
    procs: list[tuple[subprocess.Popen[str], str]] = []
    for i in range(processes):
        share = concurrency // processes + (1 if i < concurrency % processes else 0)
        spec = {
            "target": target.__dict__,
            "request_file": str(request_file),
            "connections": share,
            "start": start,
            "end": end,
        }
        proc = subprocess.Popen(
            [python, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append((proc, json.dumps(spec)))
    merged = LoadResult(window=duration)
    for proc, spec_json in procs:
        proc.stdin.write(spec_json)  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
    for proc, _ in procs:
        out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
        if proc.wait() != 0:
            raise RuntimeError(f"load generator failed: {err.strip()[-2000:]}")
        part = json.loads(out)
        merged.latencies.extend(part["latencies"])
        merged.errors += part["errors"]
        merged.first_error = merged.first_error or part["first_error"]
    return merged


if __name__ == "__main__":
    outcome = _worker(json.loads(sys.stdin.read()))
    json.dump(outcome.__dict__, sys.stdout)
