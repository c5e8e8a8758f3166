"""What telemetry costs the serving path: the same agent with telemetry on and off, side by side.

    .venv/bin/python benchmarks/telemetry/serving.py           # 2 to 3 minutes
    .venv/bin/python benchmarks/telemetry/serving.py --quick   # smoke run, under a minute

Two agent processes from this repository serve the digits classifier (with a drift profile, so
drift counting runs as well as the per-request counters); one has ``EDGEFLEET_AGENT_TELEMETRY``
off. Both run for the whole benchmark; rounds alternate between them (which goes first
alternates too), each round driving HTTP binary and HTTP JSON requests at c=1 and c=16 with the
serving benchmark's load generator. A row is the median over rounds of each round's p50, p99
and throughput; CPU per request is the agent process's user + system time over the measuring
window (the drift counting thread included) divided by the answers counted in it. Nothing
cuts windows here: that is the reporter's work, once per window, not per request.

Prints a Markdown table and writes ``benchmarks/telemetry/serving.json``. Target: telemetry
adds less than 5% to the median latency.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SERVING = REPO / "benchmarks/serving"
sys.path[:0] = [str(REPO), str(SERVING)]

from loadgen import LoadResult, Target, build_request, probe, run_workers  # noqa: E402
from run import QUIET, wait_for_quiet_host  # noqa: E402
from servers import Server, cpu_seconds, start_agent  # noqa: E402

WORK = SERVING / ".work/telemetry"  # git-ignored with the serving benchmark's own work
CONCURRENCY = (1, 16)
SYSTEMS = ("off", "on")
TARGET = 1.05  # telemetry on / off, median latency


@dataclass(frozen=True)
class Plan:
    rounds: int
    warmup: float  # seconds, first round; later rounds a quarter of it
    duration: float  # seconds measured per cell and round


# Many short rounds: on a shared host, noise then falls on both systems alike.
FULL = Plan(rounds=10, warmup=1.0, duration=0.8)
QUICK = Plan(rounds=2, warmup=0.5, duration=0.75)


def main() -> None:
    args = _parse()
    plan = QUICK if args.quick else FULL
    started = time.time()
    if WORK.exists():
        shutil.rmtree(WORK)  # a fresh store: a rebuilt bundle is a different 1.0.0
    WORK.mkdir(parents=True)
    _say("building the digits bundle with a drift profile")
    bundle, sample = _digits_bundle(WORK / "models")
    requests = _requests(sample, WORK / "requests")
    agents = {
        system: _start(bundle, WORK / f"agent-{system}", telemetry=system == "on")
        for system in SYSTEMS
    }
    cells: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    try:
        for system, agent in agents.items():
            for form, request in requests.items():
                _check(agent, request, form, system)
        for round_ in range(plan.rounds):
            wait_for_quiet_host(limit=10)
            order = SYSTEMS if round_ % 2 == 0 else SYSTEMS[::-1]
            _say(f"round {round_ + 1}/{plan.rounds}: {' then '.join(order)}")
            for form, request in requests.items():
                for c in CONCURRENCY:
                    for system in order:
                        agent = agents[system]
                        warmup = plan.warmup if round_ == 0 else plan.warmup / 4
                        cpu = _CpuWindow(agent.proc.pid, warmup, plan.duration)
                        load = run_workers(
                            Target(port=agent.port),
                            request,
                            c,
                            processes=args.client_procs if c > 1 else 1,
                            warmup=warmup,
                            duration=plan.duration,
                        )
                        if load.errors:
                            raise SystemExit(f"{system}: {load.errors} errors: {load.first_error}")
                        cells.setdefault((form, system, c), []).append(_round(load, cpu.seconds()))
    finally:
        for agent in agents.values():
            agent.stop()
    rows = _rows(cells)
    results = {
        "rows": rows,
        "target": f"median latency with telemetry on < {TARGET:.2f} x off",
        "met": all(r["p50_ratio"] < TARGET for r in rows),
        "settings": {
            "command": " ".join(["python", "benchmarks/telemetry/serving.py", *sys.argv[1:]]),
            "plan": plan.__dict__,
            "client_processes_at_c16": args.client_procs,
            "agent": "--threads 1 --workers 1 --max-delay-us 0, bundle max batch 16",
            "host_busy_before_rounds": QUIET,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.time() - started, 1),
        },
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
    }
    print(_markdown(results))
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=2) + "\n")
    _say(f"wrote {out} in {time.time() - started:.0f} s")


def _digits_bundle(folder: Path) -> tuple[Path, np.ndarray]:
    """The serving benchmark's digits classifier, bundled with a drift profile from half the
    data; returns the bundle and one held-out row to send."""
    import onnxruntime as ort

    from exporters.package import create_bundle
    from protocol.drift import drift_profile
    from protocol.manifest import TensorSpec
    from tests.models import digits_classifier_onnx, digits_data

    folder.mkdir(parents=True, exist_ok=True)
    model = digits_classifier_onnx(folder / "digits.onnx")
    x, _ = digits_data()
    reference = x[:1000]
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(None, {"input": reference})
    profile = drift_profile(
        (TensorSpec(name="input", datatype="FP32", shape=(-1, 64)),),
        (
            TensorSpec(name="label", datatype="INT64", shape=(-1,)),
            TensorSpec(name="probabilities", datatype="FP32", shape=(-1, 10)),
        ),
        {"input": reference},
        {"label": label, "probabilities": probabilities},
    )
    bundle = folder / "digits-1.0.0.efb"
    create_bundle(model, name="digits", version="1.0.0", out=bundle, max_batch=16, drift=profile)
    return bundle, x[1500:1501].copy()


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """``name=value`` for a child process started inside the block."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def _start(bundle: Path, state_dir: Path, *, telemetry: bool) -> Server:
    with _environment("EDGEFLEET_AGENT_TELEMETRY", "true" if telemetry else "false"):
        return start_agent(bundle, state_dir, threads=1, max_delay_us=0, log_level="warning")


def _requests(sample: np.ndarray, folder: Path) -> dict[str, Path]:
    """One binary-tensor and one JSON request, written once and sent unchanged."""
    folder.mkdir(parents=True, exist_ok=True)
    path = "/v2/models/digits/infer"
    tensor = {"name": "input", "shape": list(sample.shape), "datatype": "FP32"}
    raw = sample.astype("<f4").tobytes()
    header = orjson.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
            "parameters": {"binary_data_output": True},
        }
    )
    forms = {
        "HTTP binary": build_request(
            path,
            header + raw,
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(header)),
            },
        ),
        "HTTP JSON": build_request(
            path,
            orjson.dumps({"inputs": [{**tensor, "data": sample.ravel().tolist()}]}),
            {"Content-Type": "application/json"},
        ),
    }
    files = {}
    for form, data in forms.items():
        files[form] = folder / f"digits-{form.split()[-1].lower()}.http"
        files[form].write_bytes(data)
    return files


def _check(agent: Server, request: Path, form: str, system: str) -> None:
    status, body = probe(Target(port=agent.port), request.read_bytes())
    if status != 200:
        raise SystemExit(f"telemetry {system}: {form} answered {status}: {body[:300]!r}")


class _CpuWindow:
    """The agent process's CPU seconds over the load generator's measuring window.

    ``run_workers`` measures from 0.3 s + warm-up after it is called; this samples the
    process's CPU time at those moments on timer threads started just before it.
    """

    def __init__(self, pid: int, warmup: float, duration: float) -> None:
        self._samples: list[float] = []
        start = 0.3 + warmup
        self._timers = [
            threading.Timer(at, lambda: self._samples.append(cpu_seconds(pid)))
            for at in (start, start + duration)
        ]
        for timer in self._timers:
            timer.start()

    def seconds(self) -> float:
        for timer in self._timers:
            timer.join()
        first, last = self._samples
        return last - first


def _round(load: LoadResult, cpu_s: float) -> dict[str, float]:
    lat = np.asarray(load.latencies) * 1000
    return {
        "requests": float(lat.size),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "throughput_rps": lat.size / load.window,
        "cpu_us_per_request": cpu_s * 1e6 / max(lat.size, 1),
    }


def _rows(cells: dict[tuple[str, str, int], list[dict[str, float]]]) -> list[dict[str, Any]]:
    rows = []
    for form in ("HTTP binary", "HTTP JSON"):
        for c in CONCURRENCY:
            row: dict[str, Any] = {"transport": form, "concurrency": c}
            for system in SYSTEMS:
                rounds = cells[(form, system, c)]
                for key in ("p50_ms", "p99_ms", "throughput_rps", "cpu_us_per_request"):
                    row[f"{system}_{key}"] = round(float(np.median([r[key] for r in rounds])), 4)
                row[f"{system}_rounds"] = [{k: round(v, 4) for k, v in r.items()} for r in rounds]
            row["p50_ratio"] = round(row["on_p50_ms"] / row["off_p50_ms"], 3)
            row["throughput_ratio"] = round(row["on_throughput_rps"] / row["off_throughput_rps"], 3)
            rows.append(row)
    return rows


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        "| transport | c | p50 ms off | p50 ms on | on/off | p99 ms off | p99 ms on "
        "| req/s off | req/s on | on/off | CPU µs/req off | CPU µs/req on |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['transport']} | {r['concurrency']} | {r['off_p50_ms']:.3f} | "
        f"{r['on_p50_ms']:.3f} | {r['p50_ratio']:.3f} | {r['off_p99_ms']:.3f} | "
        f"{r['on_p99_ms']:.3f} | {r['off_throughput_rps']:.0f} | "
        f"{r['on_throughput_rps']:.0f} | {r['throughput_ratio']:.3f} | "
        f"{r['off_cpu_us_per_request']:.0f} | {r['on_cpu_us_per_request']:.0f} |"
        for r in results["rows"]
    ]
    verdict = "met" if results["met"] else "NOT met"
    lines += ["", f"Target ({results['target']}): {verdict}."]
    return "\n".join(lines)


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short windows: a smoke run")
    p.add_argument("--client-procs", type=int, default=2, help="load generator processes at c>1")
    p.add_argument("--out", default=str(HERE / "serving.json"), help="results file")
    return p.parse_args()


if __name__ == "__main__":
    main()
