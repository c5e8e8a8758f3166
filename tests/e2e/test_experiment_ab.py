"""Experiments in real processes: Mosquitto with the packaged mTLS + ACL configuration, the fleet
service (`edgefleet fleet serve`, which takes telemetry into its store) and four enrolled agents
(`edgefleet agent serve`) under steady traffic, reporting one-second telemetry windows.

An A/B rollout moves half of the devices (by stable hash) to a version that fails every two-row
request; the other half keep 1.0.0. From the windows the agents report, the verdict finds the
treatment significantly worse on its error rate. Then a shadow rollout runs a third version
beside 1.0.0 on the control devices: the agents load it without switching, compare every
answered request, report the comparisons as shadow telemetry, and the verdict shows the
agreement rate. Aborting the shadow rollout unloads the shadow.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from exporters.package import create_bundle
from fleet.rollouts.plan import split_arms
from tests.e2e.broker import Broker, LocalCA, start_broker
from tests.e2e.system import (
    ROWS,
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

DEVICES = ("cam-1", "cam-2", "cam-3", "cam-4")
GROUP = "store-cameras"
MIN_SAMPLES = 200  # requests each arm needs: a few seconds of the test's traffic


@dataclass
class System:
    root: Path
    home: Path
    api: httpx.Client
    agents: dict[str, Process]
    urls: dict[str, str]
    fleet: Process
    traffic: Traffic
    models: dict[str, Path]

    def get(self, path: str) -> Any:
        response = self.api.get(path)
        assert response.status_code == 200, response.text
        return response.json()

    def create(self, version: str, selector: dict[str, Any], experiment: dict[str, Any]) -> str:
        body = {
            "model": "mlp",
            "version": version,
            "selector": selector,
            "policy": {
                "waves": [100],
                "soak_s": 0,
                "wave_deadline_s": 60,
                # The agents run no probation here (the failing version must stay in place to
                # be measured), so no probation reports reach the rate gates.
                "gates": {"min_requests": 0},
                "experiment": {"min_samples": MIN_SAMPLES, **experiment},
            },
        }
        response = self.api.post("/rollouts", json=body)
        assert response.status_code == 201, response.text
        rollout_id: str = response.json()["id"]
        return rollout_id

    def in_place(self, rollout_id: str) -> dict[str, Any]:
        """Wait until every wave passed: the experiment then runs until an operator ends it."""

        def done() -> dict[str, Any] | None:
            view: dict[str, Any] = self.get(f"/rollouts/{rollout_id}")
            return view if view["state"] in ("awaiting_approval", "completed", "aborted") else None

        view: dict[str, Any] = wait_until(done, f"rollout {rollout_id}'s waves", 60, self.tails)
        assert view["state"] == "awaiting_approval", view
        return view

    def verdict(self, rollout_id: str) -> dict[str, Any]:
        def decided() -> dict[str, Any] | None:
            body: dict[str, Any] = self.get(f"/rollouts/{rollout_id}/experiment")
            return None if body["verdict"] == "insufficient" else body

        found: dict[str, Any] = wait_until(decided, "a verdict", 60, self.tails)
        return found

    def tails(self) -> str:
        agents = "\n".join(f"--- {d}\n{p.tail()}" for d, p in self.agents.items())
        return f"--- fleet\n{self.fleet.tail()}\n{agents}"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    root = tmp_path_factory.mktemp("experiments")
    home = root / "home"
    run_cli("fleet", "--home", str(home), "keys", "init", "--broker-host", "localhost")
    broker: Broker = start_broker(root / "broker", LocalCA.existing(home / "ca"))
    models = {
        "1.0.0": mlp_onnx(root / "m1.onnx", seed=1),
        # Passes its self-test (one row) but fails every request of two rows.
        "2.0.0": failing_onnx(root / "f.onnx", seed=3),
        "3.0.0": mlp_onnx(root / "m3.onnx", seed=5),
        "small": mlp_onnx(root / "s.onnx", hidden=4, seed=6),
    }
    bundles: dict[str, Path] = {}
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        bundles[version] = root / f"mlp-{version}.efb"
        batch = 1 if version == "2.0.0" else 8
        create_bundle(models[version], name="mlp", version=version, out=bundles[version],
                      max_batch=batch)  # fmt: skip
        run_cli("fleet", "--home", str(home), "publish", str(bundles[version]),
                "--targets-key", str(home / "keys" / "targets.pem"))  # fmt: skip
    small = root / "mlp-small-1.0.0.efb"
    create_bundle(models["small"], name="mlp-small", version="1.0.0", out=small, max_batch=8)
    port = free_port()
    fleet = start_fleet(home, port, broker, root / "fleet.log")
    api = fleet_api(home, port)
    agents: dict[str, Process] = {}
    urls: dict[str, str] = {}
    traffic: Traffic | None = None
    try:
        env = {
            "EDGEFLEET_AGENT_PROBATION_S": "0",
            "EDGEFLEET_AGENT_STATE_INTERVAL_S": "1",
            "EDGEFLEET_AGENT_TELEMETRY_WINDOW_S": "1",
        }
        for device in DEVICES:
            enroll(home, port, device, root / device)
            agents[device], urls[device] = start_agent(
                bundles["1.0.0"], root / device, root / f"{device}.log", env=env, fallback=small
            )
        join_group(api, agents, GROUP)
        traffic = Traffic(urls).start()
        yield System(root, home, api, agents, urls, fleet, traffic, models)
    finally:
        if traffic is not None:
            traffic.close()
        for process in agents.values():
            process.stop()
        fleet.stop()
        broker.stop()
        api.close()


def test_an_ab_experiment_finds_the_failing_version_worse(system: System) -> None:
    treatment, control = split_arms("mlp", DEVICES, 0.5)
    rollout_id = system.create("2.0.0", {"groups": [GROUP]}, {"mode": "ab", "split": 0.5})
    view = system.in_place(rollout_id)
    assert sorted(d["device"] for d in view["devices"]) == sorted(treatment)
    wait_until(
        lambda: all(system_running(system.api, d) == "2.0.0" for d in treatment),
        "the treatment arm on 2.0.0",
    )
    assert all(system_running(system.api, d) == "1.0.0" for d in control)

    verdict = system.verdict(rollout_id)
    assert verdict["verdict"] == "treatment_worse", verdict
    assert verdict["treatment"]["versions"] == ["2.0.0"]
    assert verdict["control"]["versions"] == ["1.0.0"]
    assert verdict["treatment"]["devices"] == 2 and verdict["control"]["devices"] == 2
    errors = next(m for m in verdict["metrics"] if m["name"] == "error_rate")
    # Every two-row request fails on 2.0.0 (the fallback answers it); none on 1.0.0.
    assert errors["treatment"] > 0.3 and errors["control"] == 0.0
    assert errors["significant"] and errors["better"] == "control"
    assert errors["treatment_samples"] >= MIN_SAMPLES
    # Callers never saw an error: the fallback answered what 2.0.0 failed.
    assert system.traffic.failures == []

    shown = run_cli("fleet", "rollout", "experiment", rollout_id, "--url",
                    str(system.api.base_url).removesuffix("/api/v1/"), "--token",
                    system.api.headers["Authorization"].split()[1])  # fmt: skip
    assert "verdict: treatment_worse" in shown
    # The operator has seen enough: aborting sends the treatment arm back to 1.0.0.
    response = system.api.post(f"/rollouts/{rollout_id}/abort", json={"reason": "worse"})
    assert response.status_code == 200, response.text
    wait_until(
        lambda: all(system_running(system.api, d) == "1.0.0" for d in DEVICES),
        "every device back on 1.0.0",
        60,
        system.tails,
    )


def labels(model: Path, rows: int) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.asarray(ROWS[rows], np.float32).reshape(rows, 64)
    return np.asarray(session.run(["label"], {"input": x})[0])


def test_a_shadow_is_compared_beside_the_primary_and_unloaded_on_abort(system: System) -> None:
    _, control = split_arms("mlp", DEVICES, 0.5)
    for device in control:
        response = system.api.patch(f"/devices/{device}/labels", json={"add_tags": ["control"]})
        assert response.status_code == 200, response.text
    selector = {"groups": [GROUP], "tags": ["control"]}
    rollout_id = system.create("3.0.0", selector, {"mode": "shadow"})
    system.in_place(rollout_id)

    def shadows() -> bool:
        for device in control:
            models = system.get(f"/devices/{device}")["models"]
            if [m.get("shadow") for m in models if m["name"] == "mlp"] != ["3.0.0"]:
                return False
        return True

    wait_until(shadows, "the shadows in the devices' state", 30, system.tails)
    verdict = system.verdict(rollout_id)
    assert verdict["mode"] == "shadow", verdict
    assert verdict["treatment"]["role"] == "shadow"
    assert verdict["treatment"]["versions"] == ["3.0.0"]
    assert verdict["control"]["versions"] == ["1.0.0"]
    agreement = verdict["agreement"]
    assert agreement["compared"] >= MIN_SAMPLES
    # The traffic sends the same two inputs over and over: the versions agree on a row exactly
    # when their labels for it agree.
    same = {
        n: labels(system.models["1.0.0"], n) == labels(system.models["3.0.0"], n) for n in (1, 2)
    }
    if all(s.all() for s in same.values()):
        assert agreement["rate"] == 1.0
    elif not any(s.any() for s in same.values()):
        assert agreement["rate"] == 0.0
    else:
        assert 0.0 < agreement["rate"] < 1.0
    assert agreement["low"] <= agreement["rate"] <= agreement["high"]
    # A shadow answers nobody: every caller of the control devices got 1.0.0.
    for device in control:
        assert system.traffic.answers[device][-1] == ("mlp", "1.0.0")

    response = system.api.post(f"/rollouts/{rollout_id}/abort", json={"reason": "seen enough"})
    assert response.status_code == 200, response.text

    def unloaded() -> bool:
        for device in control:
            models = system.get(f"/devices/{device}")["models"]
            if [m.get("shadow") for m in models if m["name"] == "mlp"] != [None]:
                return False
        return True

    wait_until(unloaded, "the shadows unloaded", 30, system.tails)
    assert system.traffic.failures == []
