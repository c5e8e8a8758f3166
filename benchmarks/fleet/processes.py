"""The processes of one fleet benchmark run: ``edgefleet fleet serve`` (its CPU and RSS sampled)
and the simulated-device processes (``benchmarks.fleet.devices``)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs in the environment

__all__ = ["FleetProcess", "ResourceSampler", "SimProcesses", "wait_for_quiet_host"]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class ResourceSampler:
    """Samples a process's CPU seconds and RSS on a thread every ``every`` seconds; ``mark``
    names a moment so CPU can be split into phases (connect, rollout, ...)."""

    pid: int
    every: float = 0.1  # seconds
    peak_rss: int = 0  # bytes
    marks: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _peaks: dict[str, int] = field(default_factory=dict)  # peak RSS since each mark

    def start(self) -> ResourceSampler:
        self._process = psutil.Process(self.pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> tuple[float, int]:
        with self._process.oneshot():
            times = self._process.cpu_times()
            rss = int(self._process.memory_info().rss)
        self.peak_rss = max(self.peak_rss, rss)
        for name in self._peaks:
            self._peaks[name] = max(self._peaks[name], rss)
        return times.user + times.system, rss

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self._sample()
            except psutil.Error:
                return

    def mark(self, name: str) -> None:
        cpu, rss = self._sample()
        self.marks[name] = (time.time(), cpu, rss)
        self._peaks[name] = rss

    def cpu_between(self, first: str, last: str) -> float:
        return self.marks[last][1] - self.marks[first][1]

    def peak_since(self, name: str) -> int:
        return self._peaks.get(name, 0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, all


def wait_for_quiet_host(limit: float = 60.0, busy_max: float = 0.25) -> float:  # seconds
    """Wait (up to ``limit`` s) until the host's CPUs are mostly idle; returns the busy share
    last seen. Other people's work on a shared host would otherwise be charged to the fleet."""
    deadline = time.monotonic() + limit
    while True:
        idle0, total0 = _cpu_times()
        time.sleep(1.0)
        idle1, total1 = _cpu_times()
        busy = 1 - (idle1 - idle0) / max(1, total1 - total0)
        if busy <= busy_max or time.monotonic() > deadline:
            return round(busy, 3)


class FleetProcess:
    """``edgefleet fleet serve`` on a plain MQTT broker, with its API on ``port``."""

    def __init__(self, home: Path, port: int, broker_url: str, log: Path) -> None:
        self.home, self.port, self.log_path = home, port, log
        self.devices = 0  # the fleet size this service runs with, for file names
        self.url = f"http://127.0.0.1:{port}"
        command = [
            str(BIN / "edgefleet"),
            "fleet",
            "--home",
            str(home),
            "serve",
            "--port",
            str(port),
            "--broker-url",
            broker_url,
            "--log-level",
            "warning",
        ]
        self._log = log.open("ab")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=self._log, cwd=ROOT)
        self.sampler = ResourceSampler(self.process.pid).start()

    @property
    def token(self) -> str:
        return (self.home / "admin.token").read_text().strip()

    def admin_token(self, wait: float = 5.0) -> str:  # seconds
        """Where ``<home>/admin.token`` came from: ``service`` when the service wrote it, or
        ``harness`` when it did not appear in ``wait`` seconds and the harness made one with the
        project's own ``bootstrap_admin_token`` on the service's database."""
        path = self.home / "admin.token"
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if path.exists():
                return "service"
            time.sleep(0.1)
        from fleet.api import bootstrap_admin_token
        from fleet.store import open_store

        store = open_store(self.home / "fleet.sqlite")
        try:
            bootstrap_admin_token(store, self.home)
        finally:
            store.close()
        return "harness"

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        self.sampler.stop()
        if self.running():
            self.process.send_signal(signal.SIGTERM)  # uvicorn shuts down gracefully
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class SimProcesses:
    """``processes`` simulator processes sharing ``devices`` devices between them."""

    def __init__(
        self,
        devices: int,
        processes: int,
        broker_port: int,
        director_key: Path,
        work: Path,
        connect_concurrency: int = 64,
    ) -> None:
        self.outputs: list[Path] = []
        self.processes: list[subprocess.Popen[str]] = []
        self.samplers: list[ResourceSampler] = []
        share, extra = divmod(devices, processes)
        first = 0
        for i in range(processes):
            count = share + (1 if i < extra else 0)
            out = work / f"devices-{i}.json"
            log = (work / f"devices-{i}.log").open("a")
            command = [
                sys.executable,
                "-m",
                "benchmarks.fleet.devices",
                "--port",
                str(broker_port),
                "--first",
                str(first),
                "--count",
                str(count),
                "--director-key",
                str(director_key),
                "--connect-concurrency",
                str(connect_concurrency),
                "--out",
                str(out),
            ]
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT
            )
            self.processes.append(process)
            self.samplers.append(ResourceSampler(process.pid, every=0.5).start())
            self.outputs.append(out)
            first += count

    def wait_ready(self, timeout: float) -> list[dict[str, Any]]:  # seconds
        """Each process's start-up line: devices ready and failed, seconds to connect them."""
        deadline = time.monotonic() + timeout
        ready = []
        for process in self.processes:
            assert process.stdout is not None
            line = _readline(process, deadline)
            if not line:
                raise SystemExit(f"a simulator process (pid {process.pid}) exited or hung")
            ready.append(json.loads(line))
        return ready

    def cpu_seconds(self, first: str, last: str) -> float:
        return sum(s.cpu_between(first, last) for s in self.samplers)

    def mark(self, name: str) -> None:
        for sampler in self.samplers:
            sampler.mark(name)

    def stop(self) -> list[dict[str, Any]]:
        """SIGTERM every process and read what its devices saw."""
        for sampler in self.samplers:
            sampler.stop()
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            process.wait(timeout=60)
        return [json.loads(out.read_text()) for out in self.outputs if out.exists()]


def _readline(process: subprocess.Popen[str], deadline: float) -> str:
    """One line of a child's stdout, or "" if it exits or the deadline passes first."""
    stdout = process.stdout
    assert stdout is not None
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(max(0.0, deadline - time.monotonic()))
    return result[0] if result else ""
