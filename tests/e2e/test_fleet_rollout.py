"""The whole system in real processes: Mosquitto with the packaged mTLS + ACL configuration, the
fleet service (`edgefleet fleet serve`), and three enrolled agents (`edgefleet agent serve`) under
steady traffic.

1.0.0 → 2.0.0 rolls out through a canary wave to every device. A bad 3.0.0 (it fails every
two-row request) halts at the canary wave: the canary's probation rolls it back, the gate fails,
the rollout aborts, and the canary is back on 2.0.0 with the reasons visible through the API,
while the other devices never see 3.0.0. Then the fleet service is killed with SIGKILL in the
middle of a wave and the broker restarted mid-rollout: the rollout carries on and completes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from edgefleet.cli import cli
from exporters.package import create_bundle
from tests.e2e.broker import Broker, LocalCA, start_broker
from tests.models import failing_onnx, mlp_onnx
from tests.mqtt_support import free_port

pytestmark = pytest.mark.slow

DEVICES = ("cam-1", "cam-2", "cam-3")
GROUP = "store-cameras"
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


@dataclass
class System:
    home: Path
    broker: Broker
    fleet: Process
    agents: dict[str, Process]
    traffic: Traffic
    api: httpx.Client
    bundles: dict[str, Path]

    def rollout(self, version: str, **policy: Any) -> dict[str, Any]:
        body = {
            "model": "mlp",
            "version": version,
            "selector": {"groups": [GROUP]},
            "policy": {
                "waves": [1, 100],
                "soak_s": 1,
                "wave_deadline_s": 60,
                # Latency on a shared two-core host jitters by 2x; this test is about errors.
                "gates": {"min_requests": 20, "max_latency_ratio": 5},
                **policy,
            },
        }
        response = self.api.post("/rollouts", json=body)
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    def get(self, path: str) -> Any:
        response = self.api.get(path)
        assert response.status_code == 200, response.text
        return response.json()

    def ended(self, rollout_id: str) -> dict[str, Any] | None:
        view: dict[str, Any] = self.get(f"/rollouts/{rollout_id}")
        return view if view["state"] in ("completed", "aborted", "failed") else None

    def running(self, device: str) -> str | None:
        return system_running(self.api, device)

    def explain(self, view: dict[str, Any]) -> str:
        return json.dumps(view, indent=1) + "\n" + self.diagnostics()

    def diagnostics(self) -> str:
        agents = "\n".join(f"--- {d}\n{p.tail()}" for d, p in self.agents.items())
        return f"--- fleet\n{self.fleet.tail()}\n{agents}"


def system_running(api: httpx.Client, device: str) -> str | None:
    """The version of ``mlp`` the fleet says ``device`` runs."""
    response = api.get(f"/devices/{device}")
    assert response.status_code == 200, response.text
    versions = [m["version"] for m in response.json()["models"] if m["name"] == "mlp"]
    return versions[0] if versions else None


def build_bundles(directory: Path) -> dict[str, Path]:
    def bundle(model: Path, version: str, name: str = "mlp", **options: Any) -> Path:
        out = directory / f"{name}-{version}.efb"
        create_bundle(model, name=name, version=version, out=out, **options)
        return out

    return {
        "1.0.0": bundle(mlp_onnx(directory / "m1.onnx", seed=1), "1.0.0", max_batch=8),
        "2.0.0": bundle(mlp_onnx(directory / "m2.onnx", seed=2), "2.0.0", max_batch=8),
        # Passes its self-test (one row) but fails every request of two rows.
        "3.0.0": bundle(failing_onnx(directory / "f.onnx", seed=3), "3.0.0", max_batch=1),
        "4.0.0": bundle(mlp_onnx(directory / "m4.onnx", seed=4), "4.0.0", max_batch=8),
        "small": bundle(
            mlp_onnx(directory / "s.onnx", hidden=4, seed=5), "1.0.0", "mlp-small", max_batch=8
        ),
    }


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


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    root = tmp_path_factory.mktemp("fleet-e2e")
    home = root / "home"
    run_cli("fleet", "--home", str(home), "keys", "init", "--broker-host", "localhost")
    broker = start_broker(root / "broker", LocalCA.existing(home / "ca"))
    bundles = build_bundles(root)
    for version in ("1.0.0", "2.0.0", "3.0.0", "4.0.0"):
        run_cli("fleet", "--home", str(home), "publish", str(bundles[version]),
                "--targets-key", str(home / "keys" / "targets.pem"))  # fmt: skip
    port = free_port()
    fleet = start_fleet(home, port, broker, root / "fleet.log")
    agents: dict[str, Process] = {}
    urls: dict[str, str] = {}
    token = (home / "admin.token").read_text().strip()
    api = httpx.Client(
        base_url=f"http://127.0.0.1:{port}/api/v1",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    try:
        for device in DEVICES:
            output = run_cli("fleet", "--home", str(home), "enroll-token", device)
            enroll_token = next(w for w in output.split() if w.startswith("eft_"))
            state = root / device
            fleet_url = f"http://127.0.0.1:{port}"
            run_cli("agent", "enroll", "--fleet", fleet_url, "--device-id", device,
                    "--token", enroll_token, "--state-dir", str(state))  # fmt: skip
            agent_port = free_port()
            env = {
                **os.environ,
                "EDGEFLEET_AGENT_PROBATION_S": "2",
                "EDGEFLEET_AGENT_PROBATION_REQUESTS": "1000",
                "EDGEFLEET_AGENT_STATE_INTERVAL_S": "2",
                "EDGEFLEET_AGENT_PROBATION_MAX_LATENCY_RATIO": "5",
            }
            argv = [*EDGEFLEET, "agent", "serve",
                    "--bundle", str(bundles["1.0.0"]), "--fallback", str(bundles["small"]),
                    "--state-dir", str(state), "--port", str(agent_port),
                    "--socket", str(state / "a.sock")]  # fmt: skip
            agents[device] = Process(argv, env, root / f"{device}.log").start()
            urls[device] = f"http://127.0.0.1:{agent_port}"
        for device in DEVICES:
            wait_until(
                lambda d=device: agents[d].alive() and system_running(api, d) == "1.0.0",  # type: ignore[misc]
                f"{device} to report its state",
                timeout=60,
            )
            response = api.patch(f"/devices/{device}/labels", json={"add_groups": [GROUP]})
            assert response.status_code == 200, response.text
        traffic = Traffic(urls).start()
        system = System(home, broker, fleet, agents, traffic, api, bundles)
        yield system
    finally:
        if "traffic" in locals():
            traffic.close()
        for process in agents.values():
            process.stop()
        # A test may have replaced the fleet service with a new process.
        (system.fleet if "system" in locals() else fleet).stop()
        broker.stop()
        api.close()


def test_a_good_version_rolls_out_through_a_canary_wave(system: System) -> None:
    assert {system.running(d) for d in DEVICES} == {"1.0.0"}
    rollout = system.rollout("2.0.0")
    view = wait_until(lambda: system.ended(rollout["id"]), "rollout 2.0.0 to end")
    assert view["state"] == "completed", system.explain(view)
    canary, rest = view["waves"]
    assert canary["devices"] == 1 and rest["devices"] == 2
    assert all(gate["passed"] is not False for gate in canary["gates"]), canary["gates"]
    assert {d["status"] for d in view["devices"]} == {"committed"}
    wait_until(lambda: {system.running(d) for d in DEVICES} == {"2.0.0"}, "every device on 2.0.0")
    # Callers were answered by a real version all along, never with an error.
    assert system.traffic.failures == []
    for device in DEVICES:
        assert system.traffic.answers[device][-1] == ("mlp", "2.0.0")


def test_a_bad_version_halts_at_the_canary_and_the_canary_returns(system: System) -> None:
    before = {d: len(system.traffic.answers[d]) for d in DEVICES}
    rollout = system.rollout("3.0.0")
    view = wait_until(lambda: system.ended(rollout["id"]), "rollout 3.0.0 to end")
    assert view["state"] == "aborted", system.explain(view)
    assert view["reason"] and "gate" in view["reason"], view["reason"]
    _, second_wave = view["waves"]
    assert second_wave["started_at"] is None, second_wave
    (canary,) = [d for d in view["devices"] if d["wave"] == 0]
    others = [d for d in view["devices"] if d["wave"] != 0]
    # The canary's own probation caught it and says why; the fleet rolled it back to 2.0.0.
    assert canary["previous_version"] == "2.0.0"
    detail = system.get(f"/devices/{canary['device']}")
    reasons = {u["reason"] for u in detail["updates"] if u["stage"] == "rolled_back"}
    assert "error_rate" in reasons, detail["updates"]
    wait_until(lambda: system.running(canary["device"]) == "2.0.0", "the canary back on 2.0.0")
    # The other devices were never sent 3.0.0 and never served it.
    assert all(d["seq"] is None for d in others), others
    for device in DEVICES:
        served = {v for _, v in system.traffic.answers[device][before[device] :]}
        if device != canary["device"]:
            assert "3.0.0" not in served, (device, served)
        wait_until(
            lambda d=device: system.traffic.answers[d][-1] == ("mlp", "2.0.0"),  # type: ignore[misc]
            f"{device} answering with 2.0.0",
        )
    # The fallback answered what 3.0.0 failed: callers never saw an error.
    assert system.traffic.failures == []


def test_the_rollout_survives_a_killed_fleet_service_and_a_broker_restart(
    system: System,
) -> None:
    rollout = system.rollout("4.0.0", waves=[34, 67, 100], soak_s=2)
    rollout_id = rollout["id"]
    wait_until(
        lambda: system.get(f"/rollouts/{rollout_id}")["wave"] >= 1,
        "the second wave to start",
        explain=lambda: (system.get(f"/rollouts/{rollout_id}"), system.diagnostics()),
    )
    port = int(str(system.api.base_url).split(":")[2].split("/")[0])
    system.fleet.kill()
    system.fleet = start_fleet(system.home, port, system.broker, system.fleet.log)
    view = system.get(f"/rollouts/{rollout_id}")
    assert view["state"] == "running", view

    system.broker.restart()
    view = wait_until(lambda: system.ended(rollout_id), "rollout 4.0.0 to end")
    assert view["state"] == "completed", system.explain(view)
    assert {d["status"] for d in view["devices"]} == {"committed"}
    wait_until(lambda: {system.running(d) for d in DEVICES} == {"4.0.0"}, "every device on 4.0.0")
    # Every device got exactly one desired state for 4.0.0: no version it should not have.
    for device in DEVICES:
        updates = system.get(f"/devices/{device}")["updates"]
        committed = [
            u for u in updates if u["rollout_id"] == rollout_id and u["stage"] == "committed"
        ]
        assert len({u["seq"] for u in committed}) == 1, updates
