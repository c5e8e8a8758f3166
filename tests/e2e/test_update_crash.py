"""Crash safety of the update lifecycle: real agent processes killed with SIGKILL during the
download, after verification, during activation and during probation. After a restart the
agent serves the last committed version or the new one, never a broken one; a download resumes
from its ``.part`` file (the server's Range log shows where), and a desired state interrupted
after activation ends rolled back and is not applied again.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.trust.state import TrustState
from agent.update.record import RECORD_FILE
from exporters.package import create_bundle
from tests.agent.test_update_lifecycle import trickle
from tests.e2e.test_update_attacks import DEVICE, ROW, Fleet, target_of
from tests.models import mlp_onnx

ROOT = Path(__file__).resolve().parents[2]
Message = dict[str, Any]


class AgentProcess:
    """``python -m tests.e2e.update_agent``: documents in on stdin, JSON lines out on stdout."""

    def __init__(self, state_dir: Path, fleet: Fleet, root: Path, *args: str) -> None:
        self.state_dir = state_dir
        self.messages: list[Message] = []
        self._sent = 0  # messages there were when the last document was sent
        self._log = (state_dir.parent / f"{state_dir.name}.log").open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "tests.e2e.update_agent",
                "--state-dir", str(state_dir), "--fleet-url", fleet.url, "--root", str(root),
                *args,
            ],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = self.wait_for(lambda m: m["kind"] == "ready")["url"]

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.messages.append(json.loads(line))

    def wait_for(
        self, match: Callable[[Message], bool], timeout: float = 60, since: int = 0
    ) -> Message:
        deadline = time.monotonic() + timeout
        while True:
            found = next((m for m in self.messages[since:] if match(m)), None)
            if found is not None:
                return found
            assert self.process.poll() is None or self._reader.is_alive(), (
                f"the agent exited ({self.process.returncode}) before: {self.messages}"
            )
            assert time.monotonic() < deadline, f"timed out; got {self.messages}"
            time.sleep(0.01)

    def final(self, seq: int | None) -> Message:
        """How ``seq`` ended, as reported after the last document was sent."""
        return self.wait_for(
            lambda m: m["kind"] == "progress" and m["seq"] == seq and _final(m), since=self._sent
        )

    def send(self, document: bytes) -> None:
        self._sent = len(self.messages)
        assert self.process.stdin is not None
        self.process.stdin.write(base64.b64encode(document) + b"\n")
        self.process.stdin.flush()

    def version(self) -> str:
        response = httpx.post(f"{self.url}/v2/models/mlp/infer", json=ROW, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["parameters"]["fallback"] is False
        version: str = response.json()["model_version"]
        return version

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.died()

    def died(self) -> None:
        assert self.process.wait(30) == -signal.SIGKILL
        self._reader.join(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self._reader.join(10)
        for pipe in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):  # stdin of a dead process: a broken pipe
                pipe.close()  # type: ignore[union-attr]
        self._log.close()


def _final(message: Message) -> bool:
    return message["stage"] in ("committed", "refused", "failed", "rolled_back")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with ExitStack() as stack:
        yield Fleet(tmp_path / "fleet", stack)


@pytest.fixture
def start(
    fleet: Fleet, tmp_path: Path, bundles: dict[str, Path]
) -> Iterator[Callable[..., AgentProcess]]:
    """Start an agent process on one state directory (the first start installs mlp@1.0.0)."""
    state_dir = tmp_path / "state"
    TrustState.load(state_dir).enroll(DEVICE, fleet.director_pem())
    root = tmp_path / "root.json"
    root.write_bytes(fleet.repo.root_bytes(1))
    fleet.publish(bundles["mlp-1"])
    started: list[AgentProcess] = []

    def launch(*args: str) -> AgentProcess:
        first = () if started else ("--bundle", str(bundles["mlp-1"]))
        started.append(AgentProcess(state_dir, fleet, root, *first, *args))
        return started[-1]

    yield launch
    for process in started:
        process.stop()


def restarted(start: Callable[..., AgentProcess]) -> tuple[AgentProcess, Message]:
    """A new process on the same state; returns it and how it settled the interrupted update."""
    process = start()
    return process, process.wait_for(lambda m: m["kind"] == "recovered")


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mlp@5.0.0, large enough (about 2.4 MB) to be caught half-way through its download."""
    d = tmp_path_factory.mktemp("large")
    out = d / "mlp-5.0.0.efb"
    create_bundle(
        mlp_onnx(d / "large.onnx", hidden=8192, seed=6),
        name="mlp", version="5.0.0", out=out, max_batch=8,
    )  # fmt: skip
    return out


def test_a_download_killed_half_way_resumes_from_its_part_file(
    fleet: Fleet, start: Callable[..., AgentProcess], large: Path
) -> None:
    fleet.publish(large)
    served_slowly = trickle(fleet, large, pause=0.3)
    document = fleet.desired(1, target_of(large))
    first = start()
    first.send(document)
    first.wait_for(lambda m: m["kind"] == "progress" and (m.get("done_bytes") or 0) > 0)
    first.kill()
    (part,) = (first.state_dir / "downloads").glob("*.part")
    kept = part.stat().st_size
    assert 0 < kept < target_of(large).length

    del fleet.attacker.responses[fleet.bundle_url_path(served_slowly)]
    second, recovered = restarted(start)
    assert (recovered["status"], recovered["reason"]) == ("failed", "interrupted")
    assert second.version() == "1.0.0"
    second.send(document)  # the broker delivers the retained desired state again
    final = second.final(1)
    assert final["stage"] == "committed", final["detail"]
    assert fleet.attacker.target_requests == [None, f"bytes={kept}-"]
    assert second.version() == "5.0.0"


def test_a_kill_after_verification_serves_the_old_version_and_keeps_the_verified_bundle(
    fleet: Fleet, start: Callable[..., AgentProcess], bundles: dict[str, Path]
) -> None:
    fleet.publish(bundles["mlp-2"])
    document = fleet.desired(1, target_of(bundles["mlp-2"]))
    first = start("--crash-at", "load:2.0.0")
    first.send(document)
    first.died()
    assert (first.state_dir / "models" / "mlp" / "2.0.0").is_dir()

    second, recovered = restarted(start)
    assert (recovered["status"], recovered["reason"]) == ("failed", "interrupted")
    assert second.version() == "1.0.0"
    second.send(document)
    assert second.final(1)["stage"] == "committed"
    assert second.version() == "2.0.0"
    assert len(fleet.attacker.target_requests) == 1  # installed once, never fetched again


def test_a_kill_during_activation_rolls_back_at_start(
    fleet: Fleet, start: Callable[..., AgentProcess], bundles: dict[str, Path]
) -> None:
    fleet.publish(bundles["mlp-2"])
    document = fleet.desired(1, target_of(bundles["mlp-2"]))
    first = start("--crash-at", "switch:2.0.0")
    first.send(document)
    first.died()
    pointer = json.loads((first.state_dir / "models" / "mlp" / "active").read_text())
    assert pointer["version"] == "2.0.0"  # switched in, never committed

    second, recovered = restarted(start)
    _assert_rolled_back(second, recovered)
    second.send(document)
    refused = second.final(None)  # refused before its content is trusted: no seq
    assert (refused["stage"], refused["reason"]) == ("refused", "replayed")


def test_a_kill_during_probation_rolls_back_at_start(
    fleet: Fleet, start: Callable[..., AgentProcess], bundles: dict[str, Path]
) -> None:
    fleet.publish(bundles["mlp-2"])
    first = start("--probation-s", "60")
    first.send(fleet.desired(1, target_of(bundles["mlp-2"])))
    first.wait_for(lambda m: m["kind"] == "progress" and m["stage"] == "probation")
    assert first.version() == "2.0.0"
    first.kill()

    second, recovered = restarted(start)
    _assert_rolled_back(second, recovered)


def _assert_rolled_back(process: AgentProcess, recovered: Message) -> None:
    assert (recovered["status"], recovered["reason"]) == ("rolled_back", "interrupted")
    final = process.final(1)
    assert (final["stage"], final["reason"]) == ("rolled_back", "interrupted")
    assert "mlp@1.0.0 serving again" in final["detail"]
    event = process.wait_for(lambda m: m["kind"] == "event")["event"]
    assert (event["kind"], event["model"]) == ("rollback", "mlp") and "2.0.0" in event["detail"]
    assert process.version() == "1.0.0"
    pointer = json.loads((process.state_dir / "models" / "mlp" / "active").read_text())
    assert pointer["version"] == "1.0.0"
    assert TrustState.load(process.state_dir).last_applied_seq == 1
    assert not (process.state_dir / RECORD_FILE).exists()
