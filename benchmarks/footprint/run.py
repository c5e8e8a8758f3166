"""The agent's footprint on a device: install size per runtime, and memory (RSS) of
`edgefleet agent serve` idle and under load.

    .venv/bin/python benchmarks/footprint/run.py              # full run, about 6 minutes
    .venv/bin/python benchmarks/footprint/run.py --runs 1 --load-s 3 --runtimes onnxruntime

For each runtime it builds the wheel, installs it into a fresh virtual environment the way the
agent images do (packaging/agent/requirements.py: the base packages, that runtime, nothing
else), and then, from that environment in a clean environment and working directory, serves a
bundle of the same small model in that runtime's format. Prints a Markdown report and writes
``benchmarks/footprint/results.json``. Method: README.md here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORK = ROOT / "build" / "footprint"  # git-ignored
RUNTIMES = ("onnxruntime", "openvino", "litert")
# The package directories each runtime adds to site-packages.
RUNTIME_PACKAGES = {
    "onnxruntime": ("onnxruntime",),
    "openvino": ("openvino", "openvino_telemetry"),
    "litert": ("ai_edge_litert",),
}
MIB = 1024 * 1024


@dataclass
class Install:
    runtime: str
    venv_mib: float  # the whole virtual environment
    site_packages_mib: float
    runtime_mib: float  # the runtime's own package directories
    packages: int  # distributions installed
    versions: dict[str, str]
    seconds: float


@dataclass
class Serve:
    runtime: str
    cold_start_s: list[float] = field(default_factory=list)
    idle_rss_mib: list[float] = field(default_factory=list)
    load_rss_mib: list[float] = field(default_factory=list)  # median RSS under load, per run
    load_peak_rss_mib: list[float] = field(default_factory=list)
    load_requests_per_s: list[float] = field(default_factory=list)
    errors: int = 0


def du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            file = Path(root) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def run(argv: list[str], **kwargs: Any) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def build_wheel() -> Path:
    out = WORK / "wheel"
    shutil.rmtree(out, ignore_errors=True)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)], cwd=WORK)  # fmt: skip
    (wheel,) = out.glob("edgefleet-*.whl")
    return wheel


def install(runtime: str, wheel: Path) -> tuple[Install, Path]:
    """A fresh virtual environment with the agent and one runtime, as the images install it."""
    venv = WORK / f"venv-{runtime}"
    shutil.rmtree(venv, ignore_errors=True)
    started = time.monotonic()
    run([sys.executable, "-m", "venv", str(venv)])
    requirements = WORK / f"requirements-{runtime}.txt"
    script = ROOT / "packaging" / "agent" / "requirements.py"
    requirements.write_text(run([sys.executable, str(script), runtime]))
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    run([*pip, "-c", str(ROOT / "constraints.txt"), "-r", str(requirements)])
    run([*pip, "--no-deps", str(wheel)])
    seconds = time.monotonic() - started
    # pip itself comes with every virtual environment; it is not part of the agent.
    run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "pip"])
    (site,) = (venv / "lib").glob("python3*/site-packages")
    freeze = run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                  "list", "--format=json"])  # fmt: skip
    listed = {p["name"].lower(): p["version"] for p in json.loads(freeze)}
    wanted = ("edgefleet", "numpy", "onnxruntime", "openvino", "ai-edge-litert")
    return (
        Install(
            runtime=runtime,
            venv_mib=du(venv) / MIB,
            site_packages_mib=du(site) / MIB,
            runtime_mib=sum(du(site / p) for p in RUNTIME_PACKAGES[runtime]) / MIB,
            packages=len(listed),
            versions={k: v for k, v in listed.items() if k in wanted},
            seconds=seconds,
        ),
        venv,
    )


def make_bundles() -> dict[str, Path]:
    """The same 64→16→10 classifier (tests/models.py) as an ONNX, OpenVINO IR and LiteRT bundle."""
    sys.path.insert(0, str(ROOT))
    from exporters.package import create_bundle
    from tests.models import mlp_onnx, mlp_tflite, openvino_ir

    folder = WORK / "bundles"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    onnx = mlp_onnx(folder / "mlp.onnx", seed=1)
    models = {
        "onnxruntime": onnx,
        "openvino": openvino_ir(onnx, folder / "ir"),
        "litert": mlp_tflite(folder / "mlp.tflite", seed=1),
    }
    bundles = {}
    for runtime, model in models.items():
        out = folder / f"mlp-{runtime}-1.0.0.efb"
        create_bundle(model, name="mlp", version="1.0.0", out=out, runtime=runtime, max_batch=8)
        bundles[runtime] = out
    return bundles


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_once(venv: Path, bundle: Path, result: Serve, idle_s: float, load_s: float) -> None:
    state = Path(tempfile.mkdtemp(prefix="edgefleet-footprint-"))
    port = free_port()
    # No PYTHONPATH, no source tree: what a device that installed the wheel runs.
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(state), "LANG": "C.UTF-8"}
    argv = [str(venv / "bin" / "edgefleet"), "agent", "serve", "--bundle", str(bundle),
            "--port", str(port), "--state-dir", str(state / "agent")]  # fmt: skip
    log = (state / "agent.log").open("wb")
    started = time.monotonic()
    process = subprocess.Popen(argv, env=env, cwd=state, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=5) as client:
            while True:
                if process.poll() is not None:
                    raise SystemExit(f"agent exited:\n{(state / 'agent.log').read_text()}")
                try:
                    if client.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
            result.cold_start_s.append(time.monotonic() - started)
            body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                "data": [0.25] * 64}]}  # fmt: skip
            answer = client.post("/v2/models/mlp/infer", json=body)
            assert answer.status_code == 200, answer.text
        proc = psutil.Process(process.pid)
        time.sleep(idle_s)
        result.idle_rss_mib.append(proc.memory_info().rss / MIB)
        samples, done, errors = load(url, body, load_s, proc)
        result.load_rss_mib.append(statistics.median(samples))
        result.load_peak_rss_mib.append(max(samples))
        result.load_requests_per_s.append(done / load_s)
        result.errors += errors
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()
        shutil.rmtree(state, ignore_errors=True)


def load(
    url: str, body: dict[str, Any], seconds: float, proc: psutil.Process
) -> tuple[list[float], int, int]:
    """Two closed-loop callers for ``seconds``; RSS sampled every 0.1 s meanwhile."""
    stop = threading.Event()
    counts = {"done": 0, "errors": 0}
    lock = threading.Lock()

    def caller() -> None:
        with httpx.Client(base_url=url, timeout=5) as client:
            while not stop.is_set():
                ok = client.post("/v2/models/mlp/infer", json=body).status_code == 200
                with lock:
                    counts["done" if ok else "errors"] += 1

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(proc.memory_info().rss / MIB)
        time.sleep(0.1)
    stop.set()
    for thread in threads:
        thread.join(10)
    return samples, counts["done"], counts["errors"]


def machine() -> dict[str, Any]:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "system": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def report(installs: list[Install], serves: list[Serve], runs: int) -> str:
    med = statistics.median
    lines = [
        "| runtime | venv MiB | site-packages MiB | runtime's own MiB | packages | install s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {i.runtime} | {i.venv_mib:.0f} | {i.site_packages_mib:.0f} | {i.runtime_mib:.0f} | "
        f"{i.packages} | {i.seconds:.0f} |"
        for i in installs
    ]
    lines += [
        "",
        f"Serving one small bundle, median of {runs} run(s):",
        "",
        "| runtime | cold start s | idle RSS MiB | RSS under load MiB (median / peak) | req/s | errors |",  # noqa: E501
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {s.runtime} | {med(s.cold_start_s):.2f} | {med(s.idle_rss_mib):.0f} | "
        f"{med(s.load_rss_mib):.0f} / {max(s.load_peak_rss_mib):.0f} | "
        f"{med(s.load_requests_per_s):.0f} | {s.errors} |"
        for s in serves
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--runs", type=int, default=3, help="agent starts per runtime")
    parser.add_argument("--idle-s", type=float, default=5.0, help="seconds idle before sampling")
    parser.add_argument("--load-s", type=float, default=10.0, help="seconds of load per run")
    args = parser.parse_args()
    runtimes = [r for r in args.runtimes.split(",") if r]
    WORK.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    wheel = build_wheel()
    bundles = make_bundles()
    installs, serves = [], []
    for runtime in runtimes:
        print(f"installing the agent with {runtime} ...", file=sys.stderr)
        installed, venv = install(runtime, wheel)
        installs.append(installed)
        serve = Serve(runtime)
        for n in range(args.runs):
            print(f"  serving, run {n + 1} of {args.runs}", file=sys.stderr)
            serve_once(venv, bundles[runtime], serve, args.idle_s, args.load_s)
        serves.append(serve)
    results = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "settings": {"runs": args.runs, "idle_s": args.idle_s, "load_s": args.load_s, "callers": 2},
        "installs": [asdict(i) for i in installs],
        "serving": [asdict(s) for s in serves],
    }
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(installs, serves, args.runs))


if __name__ == "__main__":
    main()
