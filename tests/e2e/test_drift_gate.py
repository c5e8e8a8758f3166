"""Drift, end to end: shifted inputs raise a drift alert and halt a rollout at its drift gate.

Real processes: Mosquitto with the packaged mutual-TLS + ACL configuration, the fleet service
(`edgefleet fleet serve`, checking drift every second) and two enrolled agents (`edgefleet agent
serve`) whose telemetry reporter sends one-second windows, drift counts included, on the bundle's
reference bins. The bundles carry drift profiles of inputs drawn from [0, 1); callers send
inputs from [2, 3). The agents' drift counts travel over MQTT into the fleet's store; the
fleet's PSI crosses the alert threshold, the alert shows in the API and the audit log, and a
rollout of the next version halts at its canary wave with "drift" as the reason.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from exporters.package import create_bundle
from protocol.drift import drift_profile
from protocol.manifest import DriftProfile, TensorSpec
from tests.e2e.broker import LocalCA, start_broker
from tests.e2e.system import (
    Process,
    enroll,
    fleet_api,
    join_group,
    run_cli,
    start_agent,
    start_fleet,
    system_running,
    wait_until,
)
from tests.models import mlp_onnx
from tests.mqtt_support import free_port

pytestmark = pytest.mark.slow

DEVICES = ("cam-1", "cam-2")
GROUP = "lobby"
REFERENCE_ROWS = 2000
WAIT = 60.0  # seconds; each step takes a few


def profile_of(model: Path) -> DriftProfile:
    """The drift profile of ``model`` on inputs drawn uniformly from [0, 1)."""
    inputs = np.random.default_rng(11).random((REFERENCE_ROWS, 64), dtype=np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits, label = session.run(["logits", "label"], {"input": inputs})
    return drift_profile(
        [TensorSpec(name="input", datatype="FP32", shape=(-1, 64))],
        [
            TensorSpec(name="logits", datatype="FP32", shape=(-1, 10)),
            TensorSpec(name="label", datatype="INT64", shape=(-1,)),
        ],
        {"input": inputs},
        {"logits": logits, "label": label},
    )


@dataclass
class ShiftedTraffic:
    """Requests of four rows drawn from [2, 3) to every agent, all the time."""

    urls: dict[str, str]
    answered: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> ShiftedTraffic:
        for device, url in self.urls.items():
            self.answered[device] = 0
            thread = threading.Thread(target=self._run, args=(device, url), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def _run(self, device: str, url: str) -> None:
        rng = np.random.default_rng(sum(map(ord, device)))
        bodies = [
            {"inputs": [{"name": "input", "shape": [4, 64], "datatype": "FP32",
                         "data": (2.0 + rng.random(4 * 64)).round(4).tolist()}]}
            for _ in range(16)
        ]  # fmt: skip
        with httpx.Client(base_url=url, timeout=5) as client:
            i = 0
            while not self.stop.is_set():
                i += 1
                try:
                    response = client.post("/v2/models/mlp/infer", json=bodies[i % len(bodies)])
                except httpx.HTTPError as e:
                    self.failures.append(f"{device}: {e}")
                    time.sleep(0.05)
                    continue
                if response.status_code == 200:
                    self.answered[device] += 1
                else:
                    self.failures.append(f"{device}: {response.status_code} {response.text}")
                time.sleep(0.01)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)


@dataclass
class System:
    api: httpx.Client
    fleet: Process
    agents: dict[str, Process]

    def get(self, path: str, **params: Any) -> Any:
        response = self.api.get(path, params=params)
        assert response.status_code == 200, response.text
        return response.json()

    def diagnostics(self) -> str:
        agents = "\n".join(f"--- {d}\n{p.tail()}" for d, p in self.agents.items())
        return f"--- fleet\n{self.fleet.tail()}\n{agents}"


@pytest.fixture
def system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[System]:
    home = tmp_path / "home"
    run_cli("fleet", "--home", str(home), "keys", "init", "--broker-host", "localhost")
    broker = start_broker(tmp_path / "broker", LocalCA.existing(home / "ca"))
    bundles: dict[str, Path] = {}
    for version, seed in (("1.0.0", 1), ("2.0.0", 2), ("small", 5)):
        model = mlp_onnx(tmp_path / f"{version}.onnx", hidden=4 if version == "small" else 16,
                         seed=seed)  # fmt: skip
        name, semver = ("mlp-small", "1.0.0") if version == "small" else ("mlp", version)
        bundles[version] = tmp_path / f"{name}-{semver}.efb"
        create_bundle(model, name=name, version=semver, out=bundles[version], max_batch=8,
                      drift=None if version == "small" else profile_of(model))  # fmt: skip
    for version in ("1.0.0", "2.0.0"):
        run_cli("fleet", "--home", str(home), "publish", str(bundles[version]),
                "--targets-key", str(home / "keys" / "targets.pem"))  # fmt: skip
    # The fleet service checks drift every second over the last 30 s (start_fleet passes the
    # environment on).
    monkeypatch.setenv("EDGEFLEET_FLEET_DRIFT_CHECK_S", "1")
    monkeypatch.setenv("EDGEFLEET_FLEET_DRIFT_WINDOW_S", "30")
    monkeypatch.setenv("EDGEFLEET_FLEET_DRIFT_MIN_ROWS", "200")
    port = free_port()
    fleet = start_fleet(home, port, broker, tmp_path / "fleet.log")
    api = fleet_api(home, port)
    agents: dict[str, Process] = {}
    urls: dict[str, str] = {}
    traffic: ShiftedTraffic | None = None
    try:
        env = {
            "EDGEFLEET_AGENT_TELEMETRY_WINDOW_S": "1",
            "EDGEFLEET_AGENT_PROBATION_S": "2",
            "EDGEFLEET_AGENT_PROBATION_REQUESTS": "1000",
            "EDGEFLEET_AGENT_STATE_INTERVAL_S": "2",
            "EDGEFLEET_AGENT_PROBATION_MAX_LATENCY_RATIO": "5",
        }
        for device in DEVICES:
            enroll(home, port, device, tmp_path / device)
            agents[device], urls[device] = start_agent(
                bundles["1.0.0"],
                tmp_path / device,
                tmp_path / f"{device}.log",
                env=env,
                fallback=bundles["small"],
            )
        system = System(api, fleet, agents)
        join_group(api, agents, GROUP, system.diagnostics)
        traffic = ShiftedTraffic(urls).start()
        yield system
        assert traffic.failures == [], traffic.failures[:5]
    finally:
        if traffic is not None:
            traffic.close()
        for process in agents.values():
            process.stop()
        fleet.stop()
        broker.stop()
        api.close()


@pytest.mark.timeout(240)
def test_shifted_inputs_raise_an_alert_and_halt_a_rollout_at_its_drift_gate(
    system: System,
) -> None:
    since_start = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()  # before it all

    # The agents' drift windows reach the fleet, and the monitor raises alerts on 1.0.0.
    def alerts() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = system.get(
            "/alerts", model="mlp", version="1.0.0", limit=1000
        )
        return [a for a in found if a["level"] == "alert"]

    raised = wait_until(
        lambda: {a["scope"] for a in alerts()} >= {"fleet", f"group:{GROUP}"} and alerts(),
        "drift alerts on mlp@1.0.0",
        WAIT,
        system.diagnostics,
    )
    # Every input feature drifted (its rows all above the reference's range), so did outputs.
    features = [a for a in raised if a["kind"] == "feature" and a["scope"] == "fleet"]
    assert {a["feature"] for a in features} == {f"input[{i}]" for i in range(64)}, raised
    worst = max(features, key=lambda a: a["psi"])
    assert worst["psi"] >= worst["threshold"] == 0.25
    assert worst["rows"] >= 200 and worst["cleared_at"] is None

    audit = system.get("/audit", actor="drift-monitor", limit=1000)
    entries = {
        (e["action"], e["subject"], e["detail"]["feature"], e["detail"]["scope"]) for e in audit
    }
    assert ("drift.raised", "mlp@1.0.0", worst["feature"], worst["scope"]) in entries

    drift = system.get("/models/mlp/versions/1.0.0/drift", group=GROUP, since=since_start)
    assert drift["devices"] == 2 and drift["rows"] > 0
    shifted = next(f for f in drift["features"] if f["name"] == worst["feature"])
    assert shifted["psi"] >= 0.25
    assert shifted["counts"][-1] == shifted["rows"]  # every row above the reference's range
    until = datetime.fromisoformat(drift["until"])
    series = {"model": "mlp", "version": "1.0.0", "metric": "psi", "step": 5}
    since = (until - timedelta(minutes=1)).isoformat()
    psi = system.get("/telemetry/series", since=since, until=drift["until"], **series)
    assert max(p["value"] or 0 for p in psi["points"]) >= 0.25

    # A rollout of 2.0.0: its canary sees the same shifted inputs, and the drift gate halts it.
    response = system.api.post(
        "/rollouts",
        json={
            "model": "mlp",
            "version": "2.0.0",
            "selector": {"groups": [GROUP]},
            "policy": {
                "waves": [50, 100],
                "soak_s": 3,
                "wave_deadline_s": 60,
                "gates": {"min_requests": 20, "max_latency_ratio": 5},
            },
        },
    )
    assert response.status_code == 201, response.text
    rollout_id = response.json()["id"]

    def ended() -> dict[str, Any] | None:
        view: dict[str, Any] = system.get(f"/rollouts/{rollout_id}")
        return view if view["state"] in ("completed", "aborted", "paused") else None

    view = wait_until(ended, "the rollout to stop", WAIT, system.diagnostics)
    assert view["state"] == "aborted", view
    assert view["reason"].startswith("wave 1 failed its gates: drift: "), view["reason"]
    canary_wave = view["waves"][0]
    gates = {g["name"]: g for g in canary_wave["gates"]}
    assert gates["drift"]["passed"] is False
    assert gates["drift"]["value"] > 0.25
    assert all(g["passed"] is not False for n, g in gates.items() if n != "drift"), gates
    # The canary ran 2.0.0 and reported its own drift windows; the other device never saw it.
    # It names the worst histogram and its PSI; every input feature is over its limit too.
    detail = gates["drift"]["detail"]
    assert re.match(r"(feature|output) \S+ vs .+ PSI \d+\.\d{3} \(allowed 0\.25\)", detail), detail
    assert re.search(r"compared, (6[4-9]|[7-9]\d) over their limit", detail), detail
    canary = next(d["device"] for d in view["devices"] if d["wave"] == 0)
    other = next(d for d in DEVICES if d != canary)
    assert system_running(system.api, other) == "1.0.0"
    new = system.get("/models/mlp/versions/2.0.0/drift", since=since_start)
    assert new["devices"] == 1 and new["rows"] >= 20
