"""The serving benchmark: the agent against raw ONNX Runtime, a hand-written FastAPI server and
MLServer — same models, same load generator, same thread settings, in one run.

    .venv/bin/python benchmarks/serving/run.py            # full run, about 6 minutes
    .venv/bin/python benchmarks/serving/run.py --quick    # smoke run, about 1.5 minutes

Prints a Markdown report and writes ``benchmarks/serving/results.json``. See README.md here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loadgen import LoadResult, Target, build_request, probe, run_workers  # noqa: E402
from models import BenchModel, build_models, bundle_with_max_batch, raw_session  # noqa: E402
from report import evaluate, markdown  # noqa: E402
from servers import (  # noqa: E402
    Server,
    cpu_seconds,
    rss_mib,
    start_agent,
    start_baseline,
    start_mlserver,
)

WORK = HERE / ".work"
CONCURRENCY = (1, 16)


@dataclass(frozen=True)
class Plan:
    """How long each measurement runs, in seconds."""

    warmup: float
    duration: float  # in total, split over the rounds
    rounds: int  # interleaved rounds per server; a row holds the median of its rounds
    heavy_warmup: float  # ResNet-50: ~0.1 s per image on one core, one round
    heavy_duration: float
    heavy_duration_c16: float  # long enough that whole batches of 16 barely quantise the count
    idle_window: float
    cold_starts: int
    batched_seconds: float  # per batch size, raw ONNX Runtime


FULL = Plan(1.0, 4.5, 3, 3.0, 8.0, 24.0, 30.0, 3, 6.0)
QUICK = Plan(0.3, 1.0, 1, 1.0, 3.0, 4.0, 5.0, 1, 1.5)


def main() -> None:
    args = _parse()
    plan = QUICK if args.quick else FULL
    run_dir = WORK / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    started = time.time()
    load_before = os.getloadavg()
    _say("building models and bundles")
    models = build_models(run_dir / "models", max_batch=args.max_batch)
    fastapi_python = _ensure_venv("fastapi", ["fastapi", "uvicorn[standard]"], args)
    # MLServer 1.7's inference workers call asyncio.get_event_loop() in a fresh process, which
    # uvloop 0.22 and later turn into an error: every worker dies and no model loads.
    mlserver = ["mlserver", "uvloop<0.22"]
    mlserver_venv = None if args.no_mlserver else _ensure_venv("mlserver", mlserver, args)

    results: dict[str, Any] = {"scenarios": [], "skipped": {}}
    if fastapi_python is None:
        results["skipped"]["fastapi"] = _SKIPPED.get("fastapi", "not installed")
    if mlserver_venv is None:
        reason = "--no-mlserver" if args.no_mlserver else _SKIPPED.get("mlserver", "not installed")
        results["skipped"]["mlserver"] = reason
    results["agent"] = _agent_resources(models[0], run_dir, plan, args)

    chosen = [m for m in models if m.name in args.models.split(",")]
    for model in chosen:
        heavy = model.sample.size > 10_000
        requests = _requests(model, run_dir / "requests")
        expected = raw_session(model.onnx_path, args.threads).run(
            None, {model.input_name: model.sample}
        )
        window = _Window(plan, heavy, args.client_procs)
        add = results["scenarios"].append

        _say(f"{model.name}: raw onnxruntime in-process")
        for c in CONCURRENCY:
            load = _raw(model, args.threads, c, window)
            add(_row(model, "onnxruntime (in-process)", "-", c, [load]))
        results.setdefault("raw_batched", {})[model.name] = _raw_batched(
            model, args.threads, plan.batched_seconds if heavy else plan.batched_seconds / 4
        )

        _say(f"{model.name}: agent")
        forms = (
            ("HTTP JSON", "json", False),
            ("HTTP binary", "binary", False),
            ("Unix socket binary", "binary", True),
        )
        _measure_agent(model, model.bundle, "edgefleet agent", forms, args, run_dir, window, add)
        if heavy and args.max_batch > 1:
            # Batching does not pay for ResNet-50 on one CPU thread (see raw_batched): the
            # same agent with batching off shows what the serving path itself costs.
            _say(f"{model.name}: agent, max batch 1")
            single = bundle_with_max_batch(model, 1)
            label = "edgefleet agent (max batch 1)"
            _measure_agent(model, single, label, forms[1:2], args, run_dir, window, add)
            # One worker uses one core; two workers run two batches at once on this 2-core host.
            _say(f"{model.name}: agent, 2 workers")
            label = "edgefleet agent (2 workers)"
            _measure_agent(
                model, model.bundle, label, forms[1:2], args, run_dir, window, add, workers=2
            )

        if fastapi_python is not None:
            _say(f"{model.name}: FastAPI baseline")
            baseline = start_baseline(
                fastapi_python,
                model.onnx_path,
                run_dir / f"fastapi-{model.name}.log",
                threads=args.threads,
            )
            _measure_json(baseline, "FastAPI + onnxruntime", model, requests, expected, window, add)
        if mlserver_venv is not None:
            _say(f"{model.name}: MLServer")
            try:
                server = start_mlserver(
                    mlserver_venv,
                    model.onnx_path,
                    model.name,
                    run_dir / f"mlserver-{model.name}",
                    threads=args.threads,
                )
            except RuntimeError as e:
                results["skipped"]["mlserver"] = f"did not start: {e}"
                mlserver_venv = None
            else:
                _measure_json(server, "MLServer", model, requests, expected, window, add)

    results["machine"] = _machine(load_before)
    results["settings"] = {
        "command": " ".join(["python", "benchmarks/serving/run.py", *sys.argv[1:]]),
        "quick": args.quick,
        "threads": args.threads,
        "max_batch": args.max_batch,
        "max_delay_us": args.max_delay_us,
        "agent_deadline_ms": args.deadline_ms,
        "client_processes_at_c16": args.client_procs,
        "plan": plan.__dict__,
        "load_generator": "closed loop, keep-alive HTTP/1.1 on raw sockets (loadgen.py)",
        "host_busy_before_measurements": QUIET,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - started, 1),
    }
    results["targets"] = evaluate(results)
    report = markdown(results)
    print(report)
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=2) + "\n")
    _say(f"wrote {out} in {time.time() - started:.0f} s")


class _Window:
    """Warm-up and measuring windows per scenario, the same for every server.

    The host is shared, so a burst of someone else's work can spoil one window: the light
    model's scenarios run in interleaved rounds and each row keeps the median of its rounds.
    """

    def __init__(self, plan: Plan, heavy: bool, procs: int) -> None:
        self.heavy, self.procs = heavy, procs
        self.rounds = 1 if heavy else plan.rounds
        self.warmup = plan.heavy_warmup if heavy else plan.warmup
        self.duration = plan.heavy_duration if heavy else plan.duration
        self.duration_c16 = plan.heavy_duration_c16 if heavy else plan.duration

    def run(self, target: Target, request: Path, concurrency: int, round_: int) -> LoadResult:
        total = self.duration_c16 if concurrency > 1 else self.duration
        return run_workers(
            target,
            request,
            concurrency,
            processes=self.procs if concurrency > 1 else 1,
            warmup=self.warmup if round_ == 0 else self.warmup / 4,
            duration=total / self.rounds,
        )

    def measure(
        self, model: BenchModel, cells: list[tuple[str, str, Target, Path]], add: Any
    ) -> None:
        """Run every (system, transport, target, request) at c=1 and c=16, in rounds."""
        loads: dict[tuple[int, int], list[LoadResult]] = {}
        for round_ in range(self.rounds):
            wait_for_quiet_host()
            for i, (_, _, target, request) in enumerate(cells):
                for c in CONCURRENCY:
                    loads.setdefault((i, c), []).append(self.run(target, request, c, round_))
        for i, (system, transport, _, _) in enumerate(cells):
            for c in CONCURRENCY:
                add(_row(model, system, transport, c, loads[(i, c)]))


def _measure_agent(
    model: BenchModel,
    bundle: Path,
    label: str,
    forms: tuple[tuple[str, str, bool], ...],
    args: argparse.Namespace,
    run_dir: Path,
    window: _Window,
    add: Any,
    workers: int = 1,
) -> None:
    requests = _requests(model, run_dir / "requests")
    expected = raw_session(model.onnx_path, args.threads).run(
        None, {model.input_name: model.sample}
    )
    agent = start_agent(
        bundle,
        run_dir / f"agent-{bundle.stem}-w{workers}",
        threads=args.threads,
        workers=workers,
        max_delay_us=args.max_delay_us,
        deadline_ms=args.deadline_ms,
        log_level=args.agent_log_level,
    )
    try:
        cells = []
        for transport, form, over_unix in forms:
            target = Target(unix_path=agent.unix_path) if over_unix else Target(port=agent.port)
            _check(agent, target, requests[form], form, expected)
            cells.append((label, transport, target, requests[form]))
        window.measure(model, cells, add)
    finally:
        agent.stop()


def _measure_json(
    server: Server,
    label: str,
    model: BenchModel,
    requests: dict[str, Path],
    expected: list[np.ndarray],
    window: _Window,
    add: Any,
) -> None:
    try:
        target = Target(port=server.port)
        _check(server, target, requests["json"], "json", expected)
        window.measure(model, [(label, "HTTP JSON", target, requests["json"])], add)
    finally:
        server.stop()


def _requests(model: BenchModel, folder: Path) -> dict[str, Path]:
    """The JSON and the binary-tensor form of one request, written once, sent many times."""
    folder.mkdir(parents=True, exist_ok=True)
    path = f"/v2/models/{model.name}/infer"
    x = model.sample
    tensor = {"name": model.input_name, "shape": list(x.shape), "datatype": "FP32"}
    json_body = orjson.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]})
    raw = x.astype("<f4").tobytes()
    header = orjson.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
            "parameters": {"binary_data_output": True},
        }
    )
    forms = {
        "json": build_request(path, json_body, {"Content-Type": "application/json"}),
        "binary": build_request(
            path,
            header + raw,
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(header)),
            },
        ),
    }
    files = {}
    for form, data in forms.items():
        files[form] = folder / f"{model.name}-{form}.http"
        files[form].write_bytes(data)
    return files


def _check(
    server: Server, target: Target, request: Path, form: str, expected: list[np.ndarray]
) -> None:
    """One request before measuring: it must succeed and, in JSON, match raw ONNX Runtime."""
    status, body = probe(target, request.read_bytes())
    if status != 200:
        server.stop()
        raise SystemExit(f"{server.name} answered {status}: {body[:500]!r}; see {server.log}")
    if form != "json":
        return
    outputs = orjson.loads(body)["outputs"]
    got = {o["name"]: np.asarray(o["data"]) for o in outputs}
    for value in expected:
        if not any(
            v.size == value.size and np.allclose(v, value.ravel(), atol=1e-4) for v in got.values()
        ):
            raise SystemExit(f"{server.name} answered differently from raw onnxruntime")


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, all


QUIET: list[float] = []  # host CPU busy fraction seen before each measurement


def wait_for_quiet_host(limit: float = 30.0, busy_max: float = 0.25) -> None:
    """Wait (up to ``limit`` s) until other processes leave the host's CPUs mostly idle.

    Nothing of the benchmark runs at this point, so what is busy is someone else; measuring
    through it would charge their work to whichever server happens to be measured.
    """
    deadline = time.monotonic() + limit
    while True:
        idle0, total0 = _cpu_times()
        time.sleep(0.5)
        idle1, total1 = _cpu_times()
        busy = 1 - (idle1 - idle0) / max(1, total1 - total0)
        if busy <= busy_max or time.monotonic() > deadline:
            QUIET.append(round(busy, 3))
            return


def _raw(model: BenchModel, threads: int, concurrency: int, window: _Window) -> LoadResult:
    """``session.run`` in this process; at c > 1 one Python thread per concurrent caller."""
    session = raw_session(model.onnx_path, threads)
    feeds = {model.input_name: model.sample}
    session.run(None, feeds)
    wait_for_quiet_host()
    duration = window.duration_c16 if concurrency > 1 else window.duration
    start = time.monotonic() + window.warmup
    end = start + duration
    per_thread: list[list[float]] = [[] for _ in range(concurrency)]

    def loop(out: list[float]) -> None:
        run, now = session.run, time.monotonic
        while True:
            t0 = now()
            if t0 >= end:
                return
            run(None, feeds)
            t1 = now()
            if start <= t1 <= end:
                out.append(t1 - t0)

    threads_ = [threading.Thread(target=loop, args=(out,)) for out in per_thread]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    return LoadResult(latencies=[x for out in per_thread for x in out], window=duration)


def _raw_batched(model: BenchModel, threads: int, seconds: float) -> dict[str, float]:
    """Rows per second of one caller running batches of 1, 8 and 16 back to back."""
    session = raw_session(model.onnx_path, threads)
    rates = {}
    for batch in (1, 8, 16):
        feeds = {model.input_name: np.repeat(model.sample, batch, axis=0)}
        session.run(None, feeds)
        runs, t0 = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - t0 < seconds:
            session.run(None, feeds)
            runs += 1
        rates[str(batch)] = round(runs * batch / (time.perf_counter() - t0), 2)
    return rates


def _agent_resources(
    model: BenchModel, run_dir: Path, plan: Plan, args: argparse.Namespace
) -> dict[str, Any]:
    """Cold start (fresh store, then restart on the same store), idle RSS and idle CPU."""
    _say(f"agent: cold start ×{plan.cold_starts}, idle RSS and CPU over {plan.idle_window:.0f} s")
    fresh: list[float] = []
    restart: list[float] = []
    wait_for_quiet_host()
    for i in range(plan.cold_starts):
        state = run_dir / f"cold-{i}"
        for times in (fresh, restart):
            agent = start_agent(
                model.bundle, state, threads=args.threads, max_delay_us=args.max_delay_us
            )
            times.append(agent.ready_s)
            if times is restart and i == plan.cold_starts - 1:
                break  # keep the last one running for the idle measurements
            agent.stop()
    try:
        time.sleep(1.0)  # let start-up work (logging, GC) settle
        rss = rss_mib(agent.proc.pid)
        cpu0, t0 = cpu_seconds(agent.proc.pid), time.monotonic()
        time.sleep(plan.idle_window)
        cpu = (cpu_seconds(agent.proc.pid) - cpu0) / (time.monotonic() - t0)
        rss_after = rss_mib(agent.proc.pid)
    finally:
        agent.stop()
    return {
        "model": model.name,
        "cold_start_fresh_store_s": [round(x, 3) for x in fresh],
        "cold_start_restart_s": [round(x, 3) for x in restart],
        "cold_start_median_s": round(float(np.median(fresh)), 3),
        "restart_median_s": round(float(np.median(restart)), 3),
        "rss_idle_mib": round(rss, 1),
        "rss_idle_after_window_mib": round(rss_after, 1),
        "idle_cpu_percent": round(cpu * 100, 3),
        "idle_window_s": plan.idle_window,
    }


def _row(
    model: BenchModel, system: str, transport: str, c: int, loads: list[LoadResult]
) -> dict[str, Any]:
    """One table row: the median over rounds of each round's p50, p99 and throughput."""
    rounds = []
    for load in loads:
        lat = np.asarray(load.latencies) * 1000
        rounds.append(
            {
                "requests": int(lat.size),
                "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
                "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
                "mean_ms": float(lat.mean()) if lat.size else float("nan"),
                "throughput_rps": lat.size / load.window,
            }
        )

    def median(key: str) -> float | None:
        value = float(np.median([r[key] for r in rounds]))
        return None if np.isnan(value) else round(value, 4)

    mean_ms = median("mean_ms")
    return {
        "model": model.name,
        "system": system,
        "transport": transport,
        "concurrency": c,
        "requests": sum(r["requests"] for r in rounds),
        "errors": sum(load.errors for load in loads),
        "first_error": next((load.first_error for load in loads if load.first_error), None),
        "p50_ms": median("p50_ms"),
        "p99_ms": median("p99_ms"),
        "mean_ms": mean_ms,
        "throughput_rps": round(float(np.median([r["throughput_rps"] for r in rounds])), 2),
        # Little's law for a closed loop: a cross-check on the counted throughput.
        "littles_law_rps": round(c * 1000 / mean_ms, 2) if mean_ms else None,
        "rounds": [{k: round(v, 4) for k, v in r.items()} for r in rounds],
    }


_SKIPPED: dict[str, str] = {}


def _ensure_venv(name: str, packages: list[str], args: argparse.Namespace) -> Path | None:
    """A virtual environment of its own under .work/ (created on first use).

    Returns its python (FastAPI) or its folder (MLServer); None, with the reason in _SKIPPED,
    when it cannot be installed.
    """
    venv = WORK / f"{name}-venv"
    marker = venv / ".installed"
    if not marker.exists():
        _say(f"installing {' '.join(packages)} into {venv}")
        ort = f"onnxruntime=={_version('onnxruntime')}"  # the agent's, for a fair comparison
        try:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            subprocess.run(
                [str(venv / "bin/pip"), "install", "-q", *packages, ort, "numpy"],
                check=True,
                capture_output=True,
                text=True,
            )
        except subprocess.CalledProcessError as e:
            tail = (e.stderr or "").strip().splitlines()[-5:]
            _SKIPPED[name] = f"pip install {' '.join(packages)} failed: {' | '.join(tail)}"
            _say(_SKIPPED[name])
            return None
        marker.touch()
    return venv / "bin/python" if name == "fastapi" else venv


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    versions = {p: _version(p) for p in ("onnxruntime", "numpy", "uvicorn", "httptools", "uvloop")}
    for name in ("fastapi", "mlserver"):
        pip = WORK / f"{name}-venv/bin/pip"
        if pip.exists():
            shown = subprocess.run([str(pip), "show", name], capture_output=True, text=True)
            for line in shown.stdout.splitlines():
                if line.startswith("Version:"):
                    versions[name] = line.split(":", 1)[1].strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "versions": versions,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short windows: a smoke run")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (all)")
    p.add_argument("--max-batch", type=int, default=16, help="bundles' max batch size")
    p.add_argument("--max-delay-us", type=int, default=0, help="agent batch wait, µs")
    p.add_argument("--client-procs", type=int, default=2, help="load generator processes at c>1")
    p.add_argument("--models", default="digits,resnet50", help="comma-separated subset")
    p.add_argument("--no-mlserver", action="store_true", help="leave MLServer out")
    p.add_argument(
        "--deadline-ms",
        type=float,
        default=60_000,
        help="agent per-request deadline; its 1 s default is shorter than a ResNet-50 batch of "
        "16 on one thread",
    )
    p.add_argument("--agent-log-level", default="warning", help="the agent's --log-level")
    p.add_argument("--out", default=str(HERE / "results.json"), help="results file")
    return p.parse_args()


if __name__ == "__main__":
    main()
