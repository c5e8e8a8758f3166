"""The endpoints the images' health checks, the compose file and the Kubernetes probes call are
the real ones: a real agent and a real fleet service answer them, without a token."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from click.testing import CliRunner

from edgefleet.cli import cli
from tests.conftest import RunningAgent
from tests.mqtt_support import free_port
from tests.packaging.test_images import IMAGES


def test_the_agent_answers_its_health_checks_without_a_token(
    start_agent: Callable[..., RunningAgent], bundles: dict[str, Path]
) -> None:
    token = "s3cret"  # noqa: S105 — a test token
    agent = start_agent(bundles=(bundles["mlp-1"],), fallback=bundles["small"], token=token)
    with agent.client() as client:
        assert client.get(IMAGES["agent"][0]).json() == {"ready": True}
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/models/mlp").status_code == 401  # the rest needs the token


def test_the_fleet_service_answers_its_health_check_without_a_token(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = CliRunner().invoke(cli, ["fleet", "--home", str(home), "keys", "init"])
    assert result.exit_code == 0, result.output
    port = free_port()
    argv = [sys.executable, "-c", "from edgefleet.cli import main; main()", "fleet", "--home",
            str(home), "serve", "--embedded-broker", "--embedded-broker-port", str(free_port()),
            "--port", str(port)]  # fmt: skip
    log = tmp_path / "fleet.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=out, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}{IMAGES['fleet'][0]}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            try:
                answer = httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, f"no answer on {url}:\n{log.read_text()}"
                time.sleep(0.1)
        assert answer.status_code == 200
        assert answer.json()["status"] == "ok" and answer.json()["schema_version"] >= 1
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/devices").status_code == 401
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
