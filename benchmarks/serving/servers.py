"""Start, probe and stop the servers under test, and read their processes' CPU and memory.

Every server runs in its own process, started here and stopped here: the agent from this
repository's virtual environment, the FastAPI baseline and MLServer from their own environments
under ``.work/`` (they pin other versions of FastAPI and pydantic).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Server",
    "cpu_seconds",
    "free_port",
    "rss_mib",
    "start_agent",
    "start_baseline",
    "start_mlserver",
]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
READY = "/v2/health/ready"
_TICKS = os.sysconf("SC_CLK_TCK")


class ServerError(RuntimeError):
    """A server did not start or become ready; the message names its log file."""


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    unix_path: str | None = None
    ready_s: float = 0.0  # process start → ready endpoint answered 200

    def stop(self) -> None:
        """SIGTERM the server's process group, then SIGKILL after 15 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _launch(
    name: str,
    cmd: list[str],
    port: int,
    log: Path,
    env: dict[str, str] | None,
    timeout: float,
    ready_path: str = READY,
) -> Server:
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=log.parent,  # MLServer, for one, writes a .metrics folder where it runs
            start_new_session=True,  # its own process group, so stop() reaches its workers
        )
    server = Server(name, proc, port, log)
    deadline = started + timeout
    while True:
        if proc.poll() is not None:
            raise ServerError(f"{name} exited with {proc.returncode}; see {log}")
        if _ready(port, ready_path):
            server.ready_s = time.perf_counter() - started
            return server
        if time.perf_counter() > deadline:
            server.stop()
            raise ServerError(f"{name} not ready after {timeout:.0f} s; see {log}")
        time.sleep(0.005)


def _ready(port: int, path: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def start_agent(
    bundle: Path,
    state_dir: Path,
    *,
    threads: int,
    max_delay_us: int,
    workers: int = 1,
    deadline_ms: float = 1000,
    log_level: str = "warning",
    timeout: float = 60,
) -> Server:
    port = free_port()
    sock = state_dir / "agent.sock"
    cmd = [
        str(REPO / ".venv/bin/edgefleet"),
        "agent",
        "serve",
        "--bundle",
        str(bundle),
        "--port",
        str(port),
        "--socket",
        str(sock),
        "--state-dir",
        str(state_dir),
        "--threads",
        str(threads),
        "--workers",
        str(workers),
        "--max-delay-us",
        str(max_delay_us),
        "--deadline-ms",
        str(deadline_ms),
        "--log-level",
        log_level,
    ]
    server = _launch("agent", cmd, port, state_dir.with_suffix(".log"), None, timeout)
    server.unix_path = str(sock)
    return server


def start_baseline(python: Path, model: Path, log: Path, *, threads: int) -> Server:
    """The FastAPI baseline under uvicorn with its default settings (access log included)."""
    port = free_port()
    cmd = [str(python), "-m", "uvicorn", "baseline_server:app", "--app-dir", str(HERE)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    env = {"BASELINE_MODEL": str(model), "BASELINE_THREADS": str(threads)}
    return _launch("fastapi", cmd, port, log, env, 60)


def start_mlserver(venv: Path, model: Path, name: str, folder: Path, *, threads: int) -> Server:
    """MLServer with the small ONNX Runtime model class; its defaults except ports and debug."""
    if folder.exists():
        shutil.rmtree(folder)
    model_dir = folder / name
    model_dir.mkdir(parents=True)
    shutil.copy(model, model_dir / "model.onnx")
    shutil.copy(HERE / "mlserver_runtime.py", model_dir / "mlserver_runtime.py")
    settings = {"name": name, "implementation": "mlserver_runtime.OnnxRuntimeModel"}
    settings["parameters"] = {"uri": "./model.onnx", "extra": {"threads": threads}}  # type: ignore[assignment]
    (model_dir / "model-settings.json").write_text(json.dumps(settings))
    port = free_port()
    server_settings = {
        "debug": False,  # debug logging is a development setting
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
    }
    (folder / "settings.json").write_text(json.dumps(server_settings))
    cmd = [str(venv / "bin/mlserver"), "start", str(folder)]
    # MLServer says it is ready before its models have loaded; ask for the model instead.
    ready = f"/v2/models/{name}/ready"
    return _launch("mlserver", cmd, port, folder.with_suffix(".log"), None, 120, ready)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (MLServer runs its inference workers as children)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in task.read_text().split())
            except OSError:
                continue
    return pids


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its children, MiB (VmRSS from /proc)."""
    total_kib = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except OSError:
            continue
    return total_kib / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its children, seconds (/proc/PID/stat)."""
    ticks = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / _TICKS
