"""The fleet benchmark: 1,000 and 10,000 simulated devices on real MQTT connections against one
Mosquitto and ``edgefleet fleet serve`` on this machine, through a staged rollout.

    .venv/bin/python benchmarks/fleet/run.py                       # 1,000 then 10,000 devices
    .venv/bin/python benchmarks/fleet/run.py --devices 1000        # smoke run, under a minute

For each fleet size: a fresh Mosquitto, a fresh fleet home (``fleet keys init``, ``fleet
publish`` of digits 1.0.0 and 2.0.0), ``fleet serve``, the simulated devices (a few processes,
see devices.py), every device labelled through the API, then a rollout to 2.0.0 in waves of
1, 10, 50 and 100 percent with no soak and automatic approval, and a second one back to 1.0.0 in
a single wave to every device. Prints a Markdown report and writes ``results.json`` here. See
README.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks.fleet` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.fleet.api import FleetApi  # noqa: E402
from benchmarks.fleet.devices import device_id  # noqa: E402
from benchmarks.fleet.processes import (  # noqa: E402
    FleetProcess,
    ResourceSampler,
    SimProcesses,
    wait_for_quiet_host,
)
from benchmarks.fleet.report import markdown, rollout_metrics  # noqa: E402
from benchmarks.fleet.setup import (  # noqa: E402
    BROKER_LIMITS,
    Mosquitto,
    build_bundles,
    free_port,
    init_fleet_home,
)

HERE = Path(__file__).resolve().parent
GROUP = "bench"
MIB = 1024 * 1024


def main() -> None:
    args = _parse()
    started = time.time()
    load_before = os.getloadavg()
    source = _source()  # before the run: what was measured, even if the tree changes meanwhile
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    _say(f"working in {work}")
    bundles = build_bundles(work / "bundles")
    try:
        runs = [_run(count, args, bundles, work / f"n{count}") for count in args.devices]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - started, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": _machine(load_before),
        "source": source,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    _say(f"wrote {args.out}")


def _run(
    count: int, args: argparse.Namespace, bundles: dict[str, Path], work: Path
) -> dict[str, Any]:
    """One fleet size, from an empty broker and fleet home to two finished rollouts."""
    _say(f"{count} devices: broker, fleet home, fleet service")
    broker = Mosquitto(work / "broker").start()
    broker_sampler = ResourceSampler(broker.process.pid if broker.process else 0).start()
    broker_url = f"mqtt://127.0.0.1:{broker.port}"
    home = work / "home"
    director_key = init_fleet_home(home, bundles, broker_url)
    fleet = FleetProcess(home, free_port(), broker_url, work / "fleet.log")
    fleet.devices = count
    api = FleetApi(fleet.url, lambda: fleet.token)
    sims: SimProcesses | None = None
    try:
        api.wait_healthy(60, fleet.running)
        token_from = fleet.admin_token()
        uploaded = api.ensure_published(bundles)
        fleet.sampler.mark("started")
        began = time.monotonic()
        sims = SimProcesses(
            count, args.processes, broker.port, director_key, work, args.connect_concurrency
        )
        ready = sims.wait_ready(args.timeout)
        if sum(r["failed"] for r in ready):
            raise SystemExit(f"devices failed to connect: {ready}")
        connected_s = time.monotonic() - began
        registered_s = api.wait_devices(count, args.timeout)
        fleet.sampler.mark("registered")
        _say(f"{count} devices connected in {connected_s:.1f} s; labelling them")
        began = time.monotonic()
        api.label([device_id(i) for i in range(count)], GROUP, args.label_concurrency)
        label_s = time.monotonic() - began
        fleet.sampler.mark("labelled")
        rollouts = []
        plans = [("staged", "2.0.0", [1, 10, 50, 100])]
        if not args.no_single_wave:
            plans.append(("one wave", "1.0.0", [100]))
        for round_ in range(args.rounds):
            for label, target, waves in plans:
                rollout = _rollout(api, fleet, sims, broker_sampler, label, target, waves, args)
                rollouts.append({**rollout, "round": round_})
        cpu = fleet.sampler.cpu_between
        setup = {
            "admin_token_from": token_from,
            "uploaded_through_api": uploaded,
            "connect_s": round(connected_s, 2),
            "registered_s": round(registered_s, 2),
            "label_s": round(label_s, 2),
            "label_per_s": round(count / label_s, 1),
            "fleet_cpu_registration_s": round(cpu("started", "registered"), 2),
            "fleet_cpu_labelling_s": round(cpu("registered", "labelled"), 2),
            "simulators": ready,
        }
    finally:
        outputs = sims.stop() if sims is not None else []
        fleet.stop()
        broker_sampler.stop()
        broker.stop()
        api.close()
    records = {k: v for out in outputs for k, v in out["devices"].items()}
    verify = sum(o["verify_s"] for o in outputs)
    verified = sum(o["verified"] for o in outputs)
    for rollout in rollouts:
        rollout.update(rollout_metrics(rollout.pop("view"), records))
        # Signature checks are counted per process, not per rollout: share them out by document.
        share = verify / verified * rollout["devices"] if verified else 0.0
        rollout["resources"]["sims_verify_s"] = round(share, 2)
    return {
        "devices": count,
        "processes": args.processes,
        "setup": setup,
        "rollouts": rollouts,
        "fleet_peak_rss_mib": round(fleet.sampler.peak_rss / MIB, 1),
        "broker_peak_rss_mib": round(broker_sampler.peak_rss / MIB, 1),
        "simulators": {
            "cpu_s": [o["cpu_s"] for o in outputs],
            "max_rss_mib": [o["max_rss_mib"] for o in outputs],
            "verify_s": round(verify, 3),
            "verify_us_each": round(verify / verified * 1e6, 1) if verified else None,
            "connections_lost": sum(o["lost"] for o in outputs),
            "errors": [e for o in outputs for e in o["errors"]][:10],
        },
    }


def _rollout(
    api: FleetApi,
    fleet: FleetProcess,
    sims: SimProcesses,
    broker: ResourceSampler,
    label: str,
    target: str,
    waves: list[int],
    args: argparse.Namespace,
) -> dict[str, Any]:
    policy: dict[str, Any] = {"waves": waves, "soak_s": 0, "approval": "auto"}
    if args.publish_rate:
        policy["publish_rate"] = args.publish_rate
    spec = {"model": "digits", "version": target, "selector": {"groups": [GROUP]}}
    _say(f"rollout ({label}) to digits {target}, waves {waves}")
    busy_before = wait_for_quiet_host()
    mark = f"{label}:{len(fleet.sampler.marks)}"
    for sampler in (fleet.sampler, broker):
        sampler.mark(f"{mark}:start")
    sims.mark(f"{mark}:start")
    profiler = _profile(fleet, args, mark)
    began = time.monotonic()
    created = api.create_rollout({**spec, "policy": policy})
    create_s = time.monotonic() - began
    finished = api.wait_rollout(created["id"], args.timeout)
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        profiler.wait(timeout=60)
    for sampler in (fleet.sampler, broker):
        sampler.mark(f"{mark}:end")
    sims.mark(f"{mark}:end")
    _say(f"rollout {created['id']} {finished['state']}")
    time.sleep(1.0)  # let the last `state` messages land before the next rollout reads them
    return {
        "label": label,
        "create_request_s": round(create_s, 3),
        "host_busy_before": busy_before,
        "view": api.rollout(created["id"]),
        "resources": {
            "fleet_cpu_s": round(fleet.sampler.cpu_between(f"{mark}:start", f"{mark}:end"), 2),
            "fleet_peak_rss_mib": round(fleet.sampler.peak_since(f"{mark}:start") / MIB, 1),
            "broker_cpu_s": round(broker.cpu_between(f"{mark}:start", f"{mark}:end"), 2),
            "sims_cpu_s": round(sims.cpu_seconds(f"{mark}:start", f"{mark}:end"), 2),
            "sims_verify_s": None,  # the simulators report it once, at the end: see _run
        },
    }


def _profile(
    fleet: FleetProcess, args: argparse.Namespace, label: str
) -> subprocess.Popen[bytes] | None:
    """py-spy (if asked for) sampling the fleet service during one rollout, as collapsed stacks
    in ``<profile>-<devices>-<label>.txt``: for finding what limits it, not for the numbers."""
    if not args.profile:
        return None
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    name = f"{args.profile}-{fleet.devices}-{label.replace(' ', '-').replace(':', '-')}.txt"
    command = [spy, "record", "--nonblocking", "--threads", "--format", "raw"]
    command += ["--rate", "200", "--pid", str(fleet.process.pid), "--output", name]
    profiler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches before the rollout starts
    return profiler


def _machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    packages = ("paho-mqtt", "fastapi", "uvicorn", "pydantic", "cryptography", "uvloop")
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "mosquitto": Mosquitto(Path(tempfile.gettempdir())).version,
        "broker_limits": BROKER_LIMITS,
        "versions": {p: version(p) for p in packages},
        "open_files_limit": _nofile(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def _source() -> dict[str, Any]:
    """The commit and a digest of the fleet and protocol sources the run measured (the tree may
    hold changes not yet committed)."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "fleet", "protocol"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("fleet/**/*.py"), *ROOT.glob("protocol/*.py")]):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return {
        "commit": head.stdout.strip() or None,
        "fleet_protocol_changed_since_commit": bool(dirty.stdout.strip()),
        "fleet_protocol_sha256": digest.hexdigest()[:16],
    }


def _nofile() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--devices",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1000, 10000],
        help="fleet sizes, comma-separated (default 1000,10000)",
    )
    p.add_argument("--processes", type=int, default=4, help="simulator processes")
    p.add_argument(
        "--publish-rate",
        type=float,
        default=None,
        help="the rollout policy's desired states per second (default: the policy's own)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rollout pairs per fleet size; tables show the median round (default 3)",
    )
    p.add_argument("--no-single-wave", action="store_true", help="skip the one-wave rollout")
    p.add_argument("--connect-concurrency", type=int, default=64, help="per simulator process")
    p.add_argument("--label-concurrency", type=int, default=8, help="label requests at once")
    p.add_argument("--timeout", type=float, default=600, help="seconds for each phase")
    p.add_argument("--work-dir", help="where the fleet homes live (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, databases)")
    p.add_argument(
        "--profile",
        metavar="PREFIX",
        help="record the fleet service with py-spy during each rollout into PREFIX-*.txt",
    )
    p.add_argument("--out", default=str(HERE / "results.json"), help="results file")
    return p.parse_args()


if __name__ == "__main__":
    main()
