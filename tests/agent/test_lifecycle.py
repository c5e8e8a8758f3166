"""Start-up failures, back-pressure and shutdown, through the real server."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent.serving import ServedModel
from protocol.bundle import build_bundle, read_manifest
from protocol.manifest import GoldenCase, GoldenTest, TensorData
from tests.agent.fakes import FakeSession, runner
from tests.conftest import RunningAgent
from tests.models import mlp_onnx

StartAgent = Callable[..., RunningAgent]
ROW = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
FAKE = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}


@pytest.fixture(scope="module")
def wrong_golden(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MLP bundle, re-signed with golden outputs that no device can reproduce."""
    d = tmp_path_factory.mktemp("wrong")
    manifest = read_manifest(bundles["mlp-1"])
    cases = tuple(
        GoldenCase(
            inputs=case.inputs,
            outputs={
                name: TensorData.from_array(tensor.to_array() + 7)
                for name, tensor in case.outputs.items()
            },
        )
        for case in manifest.golden.cases
    )
    manifest = manifest.model_copy(update={"golden": GoldenTest(cases=cases)})
    out = d / "mlp-1.0.0.efb"
    build_bundle(manifest, {manifest.model_file: mlp_onnx(d / manifest.model_file, seed=1)}, out)
    return out


def test_primary_failing_its_self_test_is_served_by_the_fallback(
    start_agent: StartAgent, wrong_golden: Path, bundles: dict[str, Path]
) -> None:
    running = start_agent(bundles=(wrong_golden,), fallback=bundles["small"])
    with running.client() as http:
        answer = http.post("/v2/models/mlp/infer", json=ROW).json()
        status = {m["name"]: m for m in http.get("/status").json()["models"]}
        ready = http.get("/v2/models/mlp/ready")
    assert answer["model_name"] == "mlp-small"
    assert answer["parameters"] == {"fallback": True, "fallback_reason": "primary_not_loaded"}
    assert "self-test" in status["mlp"]["load_error"] or "golden" in status["mlp"]["load_error"]
    assert ready.status_code == 200


def test_model_that_cannot_load_without_fallback_is_503_with_the_reason(
    start_agent: StartAgent, wrong_golden: Path
) -> None:
    running = start_agent(bundles=(wrong_golden,))
    with running.client() as http:
        response = http.post("/v2/models/mlp/infer", json=ROW)
        ready = http.get("/v2/models/mlp/ready")
        status = http.get("/status").json()
    assert response.status_code == 503
    assert "failed to load" in response.json()["error"]
    assert ready.status_code == 503
    assert status["models"][0]["load_error"]


def _install_slow_model(running: RunningAgent, *, delay: float) -> FakeSession:
    session = FakeSession(delay=delay)

    async def install() -> None:
        agent = running.agent
        agent.models["slow"] = ServedModel(
            "slow",
            agent.settings.serving_config(),
            agent.metrics,
            primary=runner(session, "slow", batchable=False, config=agent.settings.runner_config()),
        )

    running.call(install())
    return session


def test_full_queue_answers_503_with_retry_after(
    start_agent: StartAgent, bundles: dict[str, Path]
) -> None:
    running = start_agent(bundles=(bundles["mlp-1"],), max_queue=1)
    _install_slow_model(running, delay=0.2)

    def send(_: int) -> httpx.Response:
        with running.client() as http:
            return http.post("/v2/models/slow/infer", json=FAKE)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(send, range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 2  # one running, one queued
    refused = [r for r in responses if r.status_code == 503]
    assert refused, statuses
    assert all(r.headers["retry-after"] == "1" for r in refused)
    assert "requests waiting" in refused[0].json()["error"]


def test_shutdown_finishes_in_flight_requests(
    start_agent: StartAgent, bundles: dict[str, Path]
) -> None:
    running = start_agent(bundles=(bundles["mlp-1"],))
    session = _install_slow_model(running, delay=0.5)
    with concurrent.futures.ThreadPoolExecutor(1) as pool, running.client() as http:
        pending = pool.submit(http.post, "/v2/models/slow/infer", json=FAKE)
        while session.calls == 0:
            time.sleep(0.01)
        running.stop()
        response = pending.result(10)
    assert response.status_code == 200
    np.testing.assert_array_equal(response.json()["outputs"][0]["data"], [2.0, 4.0, 6.0])
    assert session.closed
    assert not running.listeners.socket_path.exists()
