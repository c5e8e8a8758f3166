"""The whole system in real processes, for the end-to-end tests: the fleet service and enrolled
agents started as `edgefleet` child processes, steady traffic against the agents, and a client
on the fleet's API.

The tests that run the system differ in their models, agents' settings and what they check; how
a process is started, an agent enrolled and a device waited for is the same for all of them and
lives here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from click.testing import CliRunner

from edgefleet.cli import cli
from tests.e2e.broker import Broker
from tests.mqtt_support import free_port

WAIT = 90.0  # seconds a rollout may take here; each finishes in well under 20
ROWS = {1: [0.25] * 64, 2: [0.25] * 128}
EDGEFLEET = [sys.executable, "-c", "from edgefleet.cli import main; main()"]


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def wait_until(
    check: Callable[[], Any],
    what: str,
    timeout: float = WAIT,
    explain: Callable[[], object] = lambda: "",
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{explain()}")


@dataclass
class Process:
    """A child process whose output goes to a log file, for the failure message."""

    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=out)
        return self

    def alive(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            raise AssertionError(f"{self.argv[3:5]} exited:\n{self.tail()}")
        return True

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@dataclass
class Traffic:
    """Requests of one and two rows to every agent, all the time; records who answered."""

    urls: dict[str, str]
    answers: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Traffic:
        for device, url in self.urls.items():
            self.answers[device] = []
            thread = threading.Thread(target=self._run, args=(device, url), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def _run(self, device: str, url: str) -> None:
        with httpx.Client(base_url=url, timeout=5) as client:
            rows = 1
            while not self.stop.is_set():
                rows = 3 - rows
                body = {"inputs": [{"name": "input", "shape": [rows, 64], "datatype": "FP32",
                                    "data": ROWS[rows]}]}  # fmt: skip
                try:
                    response = client.post("/v2/models/mlp/infer", json=body)
                except httpx.HTTPError as e:
                    self.failures.append(f"{device}: {e}")
                    time.sleep(0.05)
                    continue
                if response.status_code != 200:
                    self.failures.append(f"{device}: {response.status_code} {response.text}")
                else:
                    answer = response.json()
                    self.answers[device].append((answer["model_name"], answer["model_version"]))
                time.sleep(0.01)

    def versions(self, device: str) -> set[str]:
        return {version for name, version in self.answers[device] if name == "mlp"}

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)


def system_running(api: httpx.Client, device: str) -> str | None:
    """The version of ``mlp`` the fleet says ``device`` runs."""
    response = api.get(f"/devices/{device}")
    assert response.status_code == 200, response.text
    versions = [m["version"] for m in response.json()["models"] if m["name"] == "mlp"]
    return versions[0] if versions else None


def start_fleet(home: Path, port: int, broker: Broker, log: Path) -> Process:
    env = {
        **os.environ,
        "EDGEFLEET_FLEET_HOME": str(home),
        "EDGEFLEET_FLEET_TICK_S": "0.2",
    }
    argv = [*EDGEFLEET, "fleet", "serve", "--port", str(port),
            "--broker-url", f"mqtts://127.0.0.1:{broker.port}"]  # fmt: skip
    process = Process(argv, env, log).start()
    url = f"http://127.0.0.1:{port}/api/v1/healthz"

    def healthy() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, f"the fleet service on {port}\n{process.tail()}", timeout=30)
    return process


def fleet_api(home: Path, port: int) -> httpx.Client:
    """A client on the fleet service's API on ``port``, as the admin of ``home``."""
    token = (home / "admin.token").read_text().strip()
    return httpx.Client(
        base_url=f"http://127.0.0.1:{port}/api/v1",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def enroll(home: Path, fleet_port: int, device: str, state_dir: Path) -> None:
    """Enroll ``device`` with the fleet service on ``fleet_port``, its identity in ``state_dir``."""
    output = run_cli("fleet", "--home", str(home), "enroll-token", device)
    token = next(w for w in output.split() if w.startswith("eft_"))
    run_cli("agent", "enroll", "--fleet", f"http://127.0.0.1:{fleet_port}", "--device-id", device,
            "--token", token, "--state-dir", str(state_dir))  # fmt: skip


def start_agent(
    bundle: Path,
    state_dir: Path,
    log: Path,
    *,
    env: Mapping[str, str],
    fallback: Path | None = None,
) -> tuple[Process, str]:
    """`agent serve` of an enrolled ``state_dir`` on a free port, with ``env`` over this
    process's environment; the process and the agent's URL."""
    port = free_port()
    argv = [*EDGEFLEET, "agent", "serve", "--bundle", str(bundle)]
    if fallback is not None:
        argv += ["--fallback", str(fallback)]
    argv += ["--state-dir", str(state_dir), "--port", str(port),
             "--socket", str(state_dir / "a.sock")]  # fmt: skip
    process = Process(argv, {**os.environ, **env}, log).start()
    return process, f"http://127.0.0.1:{port}"


def join_group(
    api: httpx.Client,
    agents: Mapping[str, Process],
    group: str,
    explain: Callable[[], object] = lambda: "",
) -> None:
    """Wait until each agent's device reports running ``mlp`` 1.0.0, then label it into
    ``group``."""
    for device, agent in agents.items():
        wait_until(
            lambda d=device, a=agent: a.alive() and system_running(api, d) == "1.0.0",  # type: ignore[misc]
            f"{device} to report its state",
            60,
            explain,
        )
        response = api.patch(f"/devices/{device}/labels", json={"add_groups": [group]})
        assert response.status_code == 200, response.text
