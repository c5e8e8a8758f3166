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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from exporters.package import create_bundle
from tests.e2e.broker import Broker, LocalCA, start_broker
from tests.e2e.system import (
    Process,
    Traffic,
    enroll,
    fleet_api,
    join_group,
    run_cli,
    start_agent,
    start_fleet,
    system_running,
    wait_until,
)
from tests.models import failing_onnx, mlp_onnx
from tests.mqtt_support import free_port

pytestmark = pytest.mark.slow

DEVICES = ("cam-1", "cam-2", "cam-3")
GROUP = "store-cameras"


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
    api = fleet_api(home, port)
    try:
        env = {
            "EDGEFLEET_AGENT_PROBATION_S": "2",
            "EDGEFLEET_AGENT_PROBATION_REQUESTS": "1000",
            "EDGEFLEET_AGENT_STATE_INTERVAL_S": "2",
            "EDGEFLEET_AGENT_PROBATION_MAX_LATENCY_RATIO": "5",
        }
        for device in DEVICES:
            enroll(home, port, device, root / device)
            agents[device], urls[device] = start_agent(
                bundles["1.0.0"],
                root / device,
                root / f"{device}.log",
                env=env,
                fallback=bundles["small"],
            )
        join_group(api, agents, GROUP)
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
