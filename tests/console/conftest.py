"""The whole demo system (`edgefleet demo`: the fleet with its embedded broker and three agents
under traffic) and one Chromium, shared by the browser tests of one module."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.console.browser import launch
from tests.e2e.system import EDGEFLEET
from tests.mqtt_support import free_port


@dataclass(frozen=True)
class DemoStack:
    """Where the running demo is, from its stack.json, and an admin client on its API."""

    info: dict[str, Any]
    api: httpx.Client
    log: Path

    @property
    def url(self) -> str:
        return str(self.info["fleet_url"])

    def token(self, name: str, role: str) -> str:
        """A new API token with ``role``, made through the API as the demo's admin."""
        response = self.api.post("/tokens", json={"name": name, "role": role})
        assert response.status_code == 201, response.text
        return str(response.json()["secret"])


# Module scope: the demo's processes are gone before the next module's tests count theirs.
@pytest.fixture(scope="module")
def demo_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    work = tmp_path_factory.mktemp("demo")
    log = work.parent / "demo.log"
    ports = [str(free_port()) for _ in range(2)]
    first_agent = str(_three_free_ports())
    argv = [*EDGEFLEET, "demo", "--work-dir", str(work), "--fleet-port", ports[0],
            "--broker-port", ports[1], "--agent-port", first_agent]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=os.environ)
    try:
        info = _wait_for_stack(work / "stack.json", process, log)
        token = Path(info["admin_token_file"]).read_text().strip()
        with httpx.Client(
            base_url=info["api_url"], headers={"Authorization": f"Bearer {token}"}, timeout=10
        ) as api:
            yield DemoStack(info, api, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _three_free_ports() -> int:
    """A port whose next two are free too (the demo's agents take three in a row)."""
    for _ in range(50):
        first = free_port()
        if first < 65533 and all(_free(first + i) for i in (1, 2)):
            return first
    raise AssertionError("no three free ports in a row")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_for_stack(path: Path, process: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 300  # bundles, keys, four publishes, three enrollments
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"edgefleet demo exited:\n{log.read_text()[-4000:]}")
        if path.exists():  # written whole (renamed into place) once every agent reported
            return dict(json.loads(path.read_text()))
        time.sleep(0.5)
    raise AssertionError(f"edgefleet demo did not come up:\n{log.read_text()[-4000:]}")


# Module scope, not session: Playwright's sync API keeps an event loop running in this thread
# until it stops, and the async tests that run after the console's need none to be running.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = launch(playwright)
        try:
            yield chromium
        finally:
            chromium.close()
