"""Telemetry ingest benchmark: how many records per second the fleet takes in with zero loss.

Simulated devices (``publishers.py``: a few processes, a few MQTT connections each, many device
ids per connection) publish real ``MetricsWindow``/``DriftWindow`` records at a fixed rate into a
real Mosquitto on loopback; the fleet takes them in, either

- ``service``: ``edgefleet fleet serve`` ingesting telemetry itself (``ingest_workers`` 0), or
- ``workers``: ``fleet serve`` with ``ingest_workers`` 2 and ``edgefleet fleet ingest`` running
  two worker processes on the shared subscription.

The rate steps up until a step fails; a step passes when every record landed exactly once
(rows, per-device seqs, no gap, no duplicate, counted in the database) and the last one landed
within ``--keep-pace`` (5%) of the step's length after the publishers' end: the ingest kept
pace with the rate. Fleet CPU and RSS (every fleet process), the broker's and the publishers'
CPU are recorded per step.

    .venv/bin/python benchmarks/telemetry/ingest.py                   # both modes, ~3 minutes
    .venv/bin/python benchmarks/telemetry/ingest.py --modes service --rates 8000,10000
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs in the environment

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.fleet.processes import wait_for_quiet_host  # noqa: E402
from benchmarks.fleet.setup import BROKER_LIMITS, Mosquitto, edgefleet, free_port  # noqa: E402
from benchmarks.telemetry.profile import Profiler  # noqa: E402
from benchmarks.telemetry.publishers import device_id  # noqa: E402

BIN = Path(sys.executable).parent
RESULTS = Path(__file__).with_name("results-ingest.json")


@dataclass
class TreeSampler:
    """CPU seconds and peak RSS of a process and all its children, sampled on a thread."""

    pid: int
    peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> TreeSampler:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _tree(self) -> list[Any]:
        root = psutil.Process(self.pid)
        return [root, *root.children(recursive=True)]

    def cpu(self) -> float:
        total = 0.0
        for process in self._tree():
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                rss = sum(p.memory_info().rss for p in self._tree())
            except psutil.Error:
                continue
            self.peak_rss = max(self.peak_rss, rss)

    def stop(self) -> None:
        self._stop.set()


class Fleet:
    """The fleet processes of one mode, on their own database."""

    def __init__(self, mode: str, home: Path, database: Path, broker_url: str, work: Path):
        self.mode = mode
        env = {**os.environ, "EDGEFLEET_FLEET_INGEST_WORKERS": "2" if mode == "workers" else "0"}
        self.logs = [(work / f"{mode}-serve.log").open("ab")]
        self.port = free_port()
        common = ["--broker-url", broker_url, "--database", str(database)]
        serve = [str(BIN / "edgefleet"), "fleet", "--home", str(home), "serve"]
        serve += ["--port", str(self.port), *common, "--log-level", "warning"]
        self.processes = [
            subprocess.Popen(serve, stdout=self.logs[0], stderr=self.logs[0], env=env, cwd=ROOT)
        ]
        _wait_port(self.port, self.processes[0])
        if mode == "workers":
            self.logs.append((work / f"{mode}-ingest.log").open("ab"))
            ingest = [str(BIN / "edgefleet"), "fleet", "--home", str(home), "ingest", *common]
            ingest += ["--log-level", "warning"]
            process = subprocess.Popen(
                ingest, stdout=self.logs[1], stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True
            )
            self.processes.append(process)
            assert process.stderr is not None
            line = process.stderr.readline()  # "2 ingest worker(s) taking telemetry ..."
            if "taking telemetry" not in line:
                raise SystemExit(f"edgefleet fleet ingest did not start: {line}")
        self.samplers = [TreeSampler(p.pid).start() for p in self.processes]

    def cpu(self) -> float:
        return sum(s.cpu() for s in self.samplers)

    def python_pids(self) -> list[int]:
        """The processes that take telemetry: the service, and each worker process."""
        pids = [self.processes[0].pid]
        for process in self.processes[1:]:
            pids += [c.pid for c in psutil.Process(process.pid).children()]
        return pids

    @property
    def peak_rss_mib(self) -> float:
        return round(sum(s.peak_rss for s in self.samplers) / 2**20, 1)

    def stop(self) -> None:
        for sampler in self.samplers:
            sampler.stop()
        for process in reversed(self.processes):
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self.logs:
            log.close()


def _wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"edgefleet fleet serve exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"edgefleet fleet serve did not listen on {port}")


class Database:
    """Read-only looks at the fleet database while it is written (WAL lets both happen)."""

    def __init__(self, path: Path) -> None:
        import sqlite3

        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)

    def stored(self) -> int:
        row = self.conn.execute("SELECT coalesce(sum(received), 0) FROM telemetry_streams")
        return int(row.fetchone()[0])

    def check(self, devices: int, high_seq: int) -> dict[str, int]:
        """Every device's seqs 1..``high_seq`` stored once: the numbers that prove it."""
        one = lambda sql: int(self.conn.execute(sql).fetchone()[0] or 0)  # noqa: E731
        return {
            "metrics_rows": one("SELECT count(*) FROM metrics_windows"),
            "drift_rows": one("SELECT count(*) FROM drift_windows"),
            "streams": one("SELECT count(*) FROM telemetry_streams"),
            "streams_at_high_seq": one(
                f"SELECT count(*) FROM telemetry_streams WHERE high_seq = {high_seq} "  # noqa: S608
                f"AND received = {high_seq}"
            ),
            "gaps": one("SELECT count(*) FROM telemetry_gaps"),
            "duplicates": one("SELECT coalesce(sum(duplicates), 0) FROM telemetry_streams"),
        }

    def close(self) -> None:
        self.conn.close()


def _enroll(database: Path, devices: int) -> None:
    from fleet.store import open_store
    from fleet.store.db import transaction

    store = open_store(database)
    now = datetime.datetime.now(datetime.timezone.utc)
    with transaction(store.db):
        for i in range(devices):
            store.devices.enrolled(device_id(i), now)
    store.close()


def _publishers(
    args: argparse.Namespace, port: int, rate: float, seq_start: int
) -> list[subprocess.Popen[str]]:
    """Start the publisher processes; they connect, say they are ready and wait for ``go``."""
    share = args.devices // args.publishers
    processes = []
    for i in range(args.publishers):
        command = [sys.executable, "-m", "benchmarks.telemetry.publishers", "--port", str(port)]
        command += ["--first", str(i * share), "--devices", str(share)]
        command += ["--rate", str(rate / args.publishers), "--seconds", str(args.seconds)]
        command += ["--seq-start", str(seq_start)]
        processes.append(
            subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
            )
        )
    for process in processes:
        assert process.stdout is not None
        if not json.loads(process.stdout.readline() or "{}").get("ready"):
            raise SystemExit("a publisher process did not start")
    return processes


def _step(
    args: argparse.Namespace,
    fleet: Fleet,
    db: Database,
    broker: TreeSampler,
    port: int,
    rate: float,
    seq_start: int,
) -> dict[str, Any]:
    publishers = _publishers(args, port, rate, seq_start)
    profiler = None
    if args.profile:
        profiler = Profiler(
            fleet.python_pids(), Path(args.profile).absolute() / f"{fleet.mode}-{rate:.0f}"
        )
        time.sleep(1.0)  # py-spy attaches before the step starts
    before = db.stored()
    fleet_cpu, broker_cpu = fleet.cpu(), broker.cpu()
    started = time.monotonic()
    for process in publishers:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    timeline = []
    while any(p.poll() is None for p in publishers):
        time.sleep(0.5)
        timeline.append((round(time.monotonic() - started, 2), db.stored() - before))
    reports = [json.loads(p.communicate()[0]) for p in publishers]
    published = time.monotonic()
    sent = sum(r["sent"] for r in reports)
    acked = sum(r["acked"] for r in reports)
    landed_at = None
    deadline = published + 30
    while time.monotonic() < deadline:
        stored = db.stored() - before
        if stored >= sent:
            landed_at = time.monotonic()
            break
        time.sleep(0.05)
    stored = db.stored() - before
    fleet_cpu, broker_cpu = fleet.cpu() - fleet_cpu, broker.cpu() - broker_cpu
    profile = profiler.stop() if profiler is not None else None
    publish_s = max(r["seconds"] for r in reports)
    lag = None if landed_at is None else round(landed_at - published, 2)
    rounds = reports[0]["rounds"]
    high_seq = seq_start - 1 + 2 * rounds
    checks = db.check(args.devices, high_seq)
    exact = (
        acked == sent
        and stored == sent
        and checks["streams_at_high_seq"] == args.devices
        and checks["metrics_rows"] + checks["drift_rows"] == args.devices * high_seq
        and checks["gaps"] == 0
        and checks["duplicates"] == 0
    )
    wall = (landed_at or time.monotonic()) - started
    return {
        "rate_offered": rate,
        "records": sent,
        "acked_by_broker": acked,
        "stored": stored,
        "publish_s": publish_s,
        "published_rate": round(sent / publish_s),
        "lag_s": lag,
        "ingest_rate": round(stored / wall),  # from the first record sent to the last stored
        "zero_loss": exact,
        # Kept pace: the last record landed within `keep_pace` of the step's length.
        "passed": exact and lag is not None and lag <= args.keep_pace * publish_s,
        "checks": checks,
        "fleet_cpu_s": round(fleet_cpu, 2),
        "fleet_cores": round(fleet_cpu / wall, 2),
        "fleet_cpu_us_per_record": round(fleet_cpu / max(stored, 1) * 1e6, 1),
        "fleet_peak_rss_mib": fleet.peak_rss_mib,
        "broker_cpu_s": round(broker_cpu, 2),
        "publishers_cpu_s": round(sum(r["cpu_s"] for r in reports), 2),
        "timeline": timeline,
        "profile": profile,
        "next_seq": high_seq + 1,
    }


def _mode(args: argparse.Namespace, mode: str, home: Path, work: Path) -> dict[str, Any]:
    broker = Mosquitto(work / f"{mode}-broker").start()
    assert broker.process is not None
    broker_sampler = TreeSampler(broker.process.pid).start()
    database = work / f"{mode}.sqlite"
    _enroll(database, args.devices)
    fleet = Fleet(mode, home, database, f"mqtt://127.0.0.1:{broker.port}", work)
    db = Database(database)
    steps = []
    seq = 1
    try:
        for rate in args.rates:
            busy = wait_for_quiet_host(limit=args.quiet_wait)
            _say(f"{mode}: {rate:,.0f} records/s for {args.seconds:g} s (host {busy:.0%} busy)")
            step = _step(args, fleet, db, broker_sampler, broker.port, rate, seq)
            step["host_busy_before"] = busy
            seq = step["next_seq"]
            steps.append(step)
            _say(
                f"  stored {step['stored']:,}/{step['records']:,}, lag {step['lag_s']} s, "
                f"{step['fleet_cores']} cores, {'passed' if step['passed'] else 'FAILED'}"
            )
            if not step["passed"]:
                break
    finally:
        db.close()
        fleet.stop()
        broker_sampler.stop()
        broker.stop()
    passed = [s["rate_offered"] for s in steps if s["passed"]]
    size = database.stat().st_size + sum(p.stat().st_size for p in work.glob(f"{mode}.sqlite-*"))
    return {
        "mode": mode,
        "ceiling": max(passed) if passed else None,
        "steps": steps,
        "database_mib": round(size / 2**20, 1),
    }


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "mosquitto": Mosquitto(Path(tempfile.gettempdir())).version,
        "broker_limits": BROKER_LIMITS,
        "versions": {p: version(p) for p in ("paho-mqtt", "pydantic", "pydantic-core")},
        "sqlite": __import__("sqlite3").sqlite_version,
    }


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| mode | offered /s | published /s | stored | lag s | ingest /s | zero loss | kept pace | "
        "fleet cores | fleet µs/record | fleet peak RSS MiB | broker CPU s | publishers CPU s |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {run['mode']} | {s['rate_offered']:,.0f} | {s['published_rate']:,} | "
        f"{s['stored']:,}/{s['records']:,} | {s['lag_s']} | {s['ingest_rate']:,} | "
        f"{'yes' if s['zero_loss'] else 'NO'} | {'yes' if s['passed'] else 'no'} | "
        f"{s['fleet_cores']} | "
        f"{s['fleet_cpu_us_per_record']} | {s['fleet_peak_rss_mib']} | "
        f"{s['broker_cpu_s']} | {s['publishers_cpu_s']} |"
        for run in results["runs"]
        for s in run["steps"]
    ]
    lines.append("")
    lines += [f"- {run['mode']}: ceiling {run['ceiling']} records/s" for run in results["runs"]]
    return "\n".join(lines)


def main() -> None:
    args = _parse()
    started = time.time()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="telemetry-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    _say(f"working in {work}")
    home = work / "home"
    edgefleet(home, "keys", "init", "--broker-host", "127.0.0.1")
    try:
        runs = [_mode(args, mode, home, work) for mode in args.modes]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - started, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "devices": args.devices,
        "publishers": args.publishers,
        "seconds_per_step": args.seconds,
        "machine": _machine(),
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    _say(f"wrote {args.out}")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    rates = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--modes", type=lambda s: s.split(","), default=["service", "workers"])
    p.add_argument("--rates", type=rates, default=[6000, 8000, 10000, 12000, 14000])
    p.add_argument("--seconds", type=float, default=15.0, help="publishing time per step")
    p.add_argument("--devices", type=int, default=10000)
    p.add_argument("--publishers", type=int, default=2, help="publisher processes")
    p.add_argument(
        "--keep-pace",
        type=float,
        default=0.05,
        help="a step passes when its last record lands within this share of its length",
    )
    p.add_argument(
        "--profile", metavar="DIR", help="py-spy the fleet during each step (slows it down)"
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds to wait before a step for the host to be 75%% idle",
    )
    p.add_argument("--work-dir")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args()


if __name__ == "__main__":
    main()
