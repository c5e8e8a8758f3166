"""What keeps `edgefleet demo` from leaving a mess: one demo per work directory, a taken port
named before minutes of work, a child that dies named with its log, and a child that ignores
SIGTERM killed; and the scripted story's words. Quick: nothing here starts the system."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgefleet.cli import cli
from edgefleet.demo.errors import DemoError
from edgefleet.demo.processes import Child, WorkLock, check_port_free, free_ports, stop_children
from edgefleet.demo.story import _Narrator
from fleet.rollouts.gates import GateResult
from fleet.rollouts.spec import RolloutPolicy
from fleet.rollouts.view import AssignmentView, RolloutView, WaveView
from fleet.store.devices import Selector
from tests.e2e.system import wait_until


@pytest.fixture
def listening() -> Iterator[int]:
    """A port something listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _demo(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["demo", *args])
    return result.exit_code, result.output


def test_a_second_demo_in_the_same_work_directory_is_refused(tmp_path: Path) -> None:
    lock = WorkLock(tmp_path)
    lock.acquire()
    try:
        code, output = _demo("--work-dir", str(tmp_path))
        assert code == 1
        assert f"another edgefleet demo (pid {os.getpid()}) is running in {tmp_path}" in output
        assert "or pass another --work-dir" in output
    finally:
        lock.release()
    # Released, the directory is free again: the lock file left behind blocks nothing.
    again = WorkLock(tmp_path)
    again.acquire()
    again.release()


def test_a_taken_port_is_named_before_anything_is_built(tmp_path: Path, listening: int) -> None:
    broker, agent = free_ports(2)
    code, output = _demo(
        "--work-dir", str(tmp_path / "work"), "--fleet-port", str(listening),
        "--broker-port", str(broker), "--agent-port", str(agent),
    )  # fmt: skip
    assert code == 1
    assert f"error: port {listening} (the fleet service) is in use" in output, output
    assert "--fleet-port" in output
    assert not (tmp_path / "work" / "bundles").exists()  # nothing was built
    with pytest.raises(DemoError, match=rf"port {listening} \(an agent\) .* --agent-port"):
        check_port_free(listening, "an agent", "--agent-port")


def test_one_port_for_two_parts_is_a_usage_error(tmp_path: Path) -> None:
    work = str(tmp_path)
    code, output = _demo("--work-dir", work, "--fleet-port", "9000", "--agent-port", "8998")
    assert code == 2
    assert "port 9000 is given to two parts of the demo" in output  # 8998, 8999, 9000


def _python(tmp_path: Path, code: str, name: str = "a child") -> Child:
    return Child(name, [sys.executable, "-c", code], dict(os.environ), tmp_path / "child.log")


def test_a_child_that_exits_is_named_with_the_end_of_its_log(tmp_path: Path) -> None:
    child = _python(
        tmp_path, "print('\\n'.join(f'line {i}' for i in range(30))); raise SystemExit(3)",
        "the agent of demo-9",
    )  # fmt: skip
    child.start()
    wait_until(lambda: child.exit_code() is not None, "the child to exit", 30)
    message = str(child.died())
    assert message.startswith(f"the agent of demo-9 (pid {child.pid}) exited with status 3")
    assert str(tmp_path / "child.log") in message
    assert "    line 29" in message and "line 9\n" not in message  # the last 20 lines only


def test_a_child_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    stubborn = _python(
        tmp_path,
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)",
    )
    stubborn.start()
    wait_until(lambda: "ready" in stubborn.log.read_text(), "the child to ignore SIGTERM", 30)
    started = time.monotonic()
    stop_children([stubborn], timeout=1.0)
    assert stubborn.exit_code() is not None and stubborn.exit_code() != 0
    assert time.monotonic() - started < 10


def _view(
    state: str, waves: list[tuple[str, list[dict[str, Any]]]], devices: list[dict[str, Any]]
) -> RolloutView:
    now = datetime(2026, 11, 23, tzinfo=timezone.utc)
    return RolloutView(
        id="r-1", model="digits", version="2.2.0", selector=Selector(all_devices=True),
        policy=RolloutPolicy(waves=(33, 100), soak_s=8), state=state, wave=0, phase=None,
        phase_started_at=None, reason=None, superseded_by=None, created_at=now,
        created_by="admin", updated_at=now,
        waves=tuple(
            WaveView(index=i, percent=(33, 100)[i], state=s, started_at=None, finished_at=None,
                     devices=1, counts={}, gates=tuple(GateResult(**g) for g in gates))
            for i, (s, gates) in enumerate(waves)
        ),
        devices=tuple(
            AssignmentView(**{"wave": 0, "previous_version": "2.1.0", "seq": 7, "reason": None,
                              "detail": None, **d})
            for d in devices
        ),
    )  # fmt: skip


def test_the_story_tells_waves_devices_and_gates_once_each() -> None:
    told: list[str] = []
    narrator = _Narrator(told.append)
    failed_gate = {"name": "error_rate", "value": 0.5, "threshold": 0.01, "passed": False,
                   "samples": 30, "detail": "error rate 50.00% over 30 requests"}  # fmt: skip
    passed_gate = {"name": "failed_installs", "value": 0.0, "threshold": 0.1, "passed": True,
                   "samples": 1, "detail": ""}  # fmt: skip
    other = {"device": "demo-2", "wave": 1, "seq": None, "status": "pending"}
    views = [
        _view("running", [("waiting", []), ("pending", [])],
              [{"device": "demo-1", "status": "probation"}, other]),
        _view("running", [("waiting", []), ("pending", [])],
              [{"device": "demo-1", "status": "rolled_back", "reason": "error_rate",
                "detail": "50.0% of 30 requests"}, other]),
        _view("aborted", [("failed", [passed_gate, failed_gate]), ("pending", [])],
              [{"device": "demo-1", "status": "rolled_back", "reason": "error_rate",
                "detail": "50.0% of 30 requests"}, {**other, "status": "cancelled"}]),
        _view("aborted", [("failed", [passed_gate, failed_gate]), ("pending", [])],
              [{"device": "demo-1", "status": "rolling_back"},
               {**other, "status": "cancelled"}]),
    ]  # fmt: skip
    for view in views:
        narrator.tell(view)
        narrator.tell(view)  # nothing changed: nothing said
    assert told == [
        "   wave 1 of 2 (33%): demo-1 gets 2.2.0",
        "      demo-1: serving 2.2.0 on probation",
        "      demo-1: rolled 2.2.0 back by itself: error_rate: 50.0% of 30 requests",
        "   wave 1 of 2 failed its gates:",
        "      failed_installs         0 vs 0.1    passed",
        "      error_rate            0.5 vs 0.01   failed: error rate 50.00% over 30 requests",
        "      demo-2: never sent 2.2.0: the rollout stopped first",
        "      demo-1: desired state 2.1.0 published",
    ]
