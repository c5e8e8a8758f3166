"""`edgefleet demo` (what `make run` starts) as a real process: it comes up with the console's
address printed and stack.json written once every agent has reported to the fleet; SIGTERM stops
every process it started; a second run reuses the work directory. And a child that dies is named
with the end of its log and takes the demo down with it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from click.testing import CliRunner

from edgefleet.cli import cli
from tests.e2e.system import EDGEFLEET, wait_until
from tests.mqtt_support import free_port

pytestmark = pytest.mark.slow

DEVICES = ("demo-1", "demo-2", "demo-3")


@dataclass
class Demo:
    """One `edgefleet demo` process and its output files."""

    work: Path
    ports: list[int]  # fleet, broker, first agent
    process: subprocess.Popen[bytes]
    out: Path
    err: Path

    @classmethod
    def start(cls, work: Path, ports: list[int]) -> Demo:
        out, err = work.parent / "demo.out", work.parent / "demo.err"
        argv = [*EDGEFLEET, "demo", "--work-dir", str(work), "--fleet-port", str(ports[0]),
                "--broker-port", str(ports[1]), "--agent-port", str(ports[2])]  # fmt: skip
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(argv, stdout=stdout, stderr=stderr)
        return cls(work, ports, process, out, err)

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def stack(self) -> dict[str, Any]:
        def written() -> dict[str, Any] | None:
            if self.process.poll() is not None:
                raise AssertionError(f"edgefleet demo exited:\n{self.output()[-4000:]}")
            path = self.work / "stack.json"
            return dict(json.loads(path.read_text())) if path.exists() else None

        found: dict[str, Any] = wait_until(written, "stack.json", 240, self.output)
        return found

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def exit(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"edgefleet demo did not stop:\n{self.output()[-4000:]}") from None


@pytest.fixture
def ports() -> list[int]:
    """Fleet, broker, and a first agent port whose next two are free as well."""
    fleet, broker = free_port(), free_port()
    for _ in range(50):
        first = free_port()
        if first < 65533 and all(_free(first + i) for i in (1, 2)):
            return [fleet, broker, first]
    raise AssertionError("no three free ports in a row")


def _free(port: int) -> bool:
    """Whether nothing listens on ``port`` (connections of the past in TIME_WAIT aside)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def demos() -> Iterator[list[Demo]]:
    started: list[Demo] = []
    yield started
    for demo in started:  # a failed test still leaves nothing running
        leftovers = demo.children() if demo.process.poll() is None else []
        demo.process.kill()
        for child in leftovers:
            child.kill()


def _gone(processes: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)


@pytest.mark.timeout(600)
def test_the_demo_comes_up_and_sigterm_stops_every_process(
    tmp_path: Path, ports: list[int], demos: list[Demo]
) -> None:
    work = tmp_path / "work"
    demo = Demo.start(work, ports)
    demos.append(demo)
    stack = demo.stack()

    fleet_url = f"http://127.0.0.1:{ports[0]}"
    assert stack["console_url"] == f"{fleet_url}/console/"
    assert stack["api_url"] == f"{fleet_url}/api/v1"
    assert stack["agents"] == {d: f"http://127.0.0.1:{ports[2] + i}" for i, d in enumerate(DEVICES)}
    assert stack["groups"] == {"lab": ["demo-1"], "store": ["demo-2", "demo-3"]}
    assert "digits@2.2.0" in stack["published"]
    printed = demo.out.read_text()
    assert f"console   {fleet_url}/console/" in printed, printed
    assert stack["admin_token_file"] in printed
    # Every agent answers the printed request, and the fleet knows every device and its labels.
    request = json.loads((work / "bundles" / "request.json").read_text())
    for url in stack["agents"].values():
        answer = httpx.post(f"{url}/v2/models/digits/infer", json=request, timeout=10).json()
        assert (answer["model_name"], answer["model_version"]) == ("digits", "2.0.0")
    token = Path(stack["admin_token_file"]).read_text().strip()
    with httpx.Client(
        base_url=stack["api_url"], headers={"Authorization": f"Bearer {token}"}, timeout=10
    ) as api:
        devices = {d["id"]: d for d in api.get("/devices").json()}
        assert sorted(devices) == list(DEVICES)
        assert devices["demo-1"]["groups"] == ["lab"] and "canary" in devices["demo-1"]["tags"]
        # The demo's traffic reaches the fleet as telemetry.
        wait_until(
            lambda: api.get("/devices/demo-2/telemetry").json()["received"] > 0,
            "telemetry from demo-2",
            60,
        )
    _terminate(demo, work, ports)

    # A second run in the same work directory reuses keys, enrollments and labels.
    again = Demo.start(work, ports)
    demos.append(again)
    assert again.stack()["agents"] == stack["agents"]
    assert "enrolled" not in again.err.read_text()
    assert "creating the fleet's keys" not in again.err.read_text()
    _terminate(again, work, ports)


def _terminate(demo: Demo, work: Path, ports: list[int]) -> None:
    """SIGTERM to the demo: it exits 0 and leaves no process, no stack.json, no taken port."""
    children = demo.children()
    assert len(children) >= 4, children  # the fleet service and three agents
    demo.process.send_signal(signal.SIGTERM)
    assert demo.exit() == 0, demo.output()
    assert "SIGTERM received: stopping" in demo.err.read_text()
    wait_until(lambda: _gone(children), "every child of the demo to stop", 30)
    assert not (work / "stack.json").exists()
    for port in (ports[0], ports[1], ports[2], ports[2] + 1, ports[2] + 2):
        assert _free(port), f"port {port} still taken after the demo stopped"


@pytest.mark.timeout(300)
def test_a_child_that_dies_takes_the_demo_down_and_is_named(
    tmp_path: Path, ports: list[int]
) -> None:
    """The same command run in this process (so that it is measured), its children real."""
    work = tmp_path / "work"
    killed: list[psutil.Process] = []
    started: list[psutil.Process] = []

    def kill_an_agent() -> None:
        wait_until(lambda: (work / "stack.json").exists(), "stack.json", 240)
        started.extend(psutil.Process().children(recursive=True))
        victim = next(p for p in started if str(work / "devices" / "demo-2") in p.cmdline())
        victim.kill()
        killed.append(victim)

    killer = threading.Thread(target=kill_an_agent, daemon=True)
    killer.start()
    args = ["demo", "--work-dir", str(work), "--fleet-port", str(ports[0]),
            "--broker-port", str(ports[1]), "--agent-port", str(ports[2])]  # fmt: skip
    try:
        result = CliRunner().invoke(cli, args)
        killer.join(timeout=10)
        assert killed, result.output
        assert result.exit_code == 1, result.output
        assert "edgefleet demo: a fleet service" in result.stdout  # it was up: banner printed
        named = result.stderr[result.stderr.index("error: the agent of demo-2") :]
        assert f"(pid {killed[0].pid}) exited with status -9" in named, named
        assert str(work / "logs" / "demo-2.log") in named, named
        assert "\n    " in named, named  # the end of its log, indented
        assert "stopping the agents and the fleet service" in result.stderr
        assert _gone(started), [p for p in started if p.is_running()]
        assert not (work / "stack.json").exists()
    finally:
        for process in started:  # only if the demo failed to stop what it started
            if process.is_running():
                process.kill()
