"""Telemetry windows: what a real agent counts per version while it serves over HTTP, cut into
windows that lose and double nothing, agree with /metrics, and validate as telemetry records."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import AgentMetrics
from agent.serving import ServedModel, ServingConfig
from agent.telemetry.collector import TelemetryCollector, TelemetryConfig, Window
from protocol.telemetry import LATENCY_BUCKETS_MS, RECORDS, MetricsWindow
from tests.agent.fakes import FakeSession, runner
from tests.conftest import RunningAgent

StartAgent = Callable[..., RunningAgent]
ROW = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)


def _body(x: np.ndarray) -> dict[str, object]:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip


def _cut(running: RunningAgent) -> list[Window]:
    """Cut a window on the agent's event loop, as whatever reports windows does."""

    async def cut() -> list[Window]:
        return running.agent.telemetry.cut()[0]

    return running.call(cut())


def _metrics(windows: list[Window], model: str = "mlp") -> list[dict[str, Any]]:
    return [w.fields for w in windows if w.kind == "metrics" and w.fields["model"] == model]


def _sample(text: str, name: str, **labels: str) -> float:
    """One sample's value in Prometheus text (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


@pytest.fixture
def agent(start_agent: StartAgent, bundles: dict[str, Path]) -> RunningAgent:
    return start_agent(bundles=(bundles["mlp-1"],), fallback=bundles["small"])


def test_a_window_counts_answers_latency_batches_and_validates_as_a_metrics_record(
    agent: RunningAgent,
) -> None:
    _cut(agent)  # start from an empty window
    three = np.vstack([ROW] * 3)
    with agent.client() as http:
        for i in range(20):
            assert http.post("/v2/models/mlp/infer", json=_body(three if i % 2 else ROW)).is_success
    (window,) = _metrics(_cut(agent))
    assert window["requests"] == 20 and window["errors"] == window["fallbacks"] == 0
    assert window["version"] == "1.0.0" and window["role"] == "primary"
    assert window["device"] == "CPU"
    assert sum(window["latency_counts"]) == 20
    assert len(window["latency_counts"]) == len(LATENCY_BUCKETS_MS) + 1
    assert 0 < window["latency_p50_ms"] <= window["latency_p95_ms"] <= window["latency_p99_ms"]
    assert window["batches"] == 20 and window["batch_rows"] == 10 * 1 + 10 * 3
    assert window["queue_ms_mean"] is not None and window["queue_ms_p95"] is not None
    assert window["cpu_percent"] is not None and window["rss_mb"] > 10
    assert window["seconds"] > 0 and window["start"] <= window["end"]
    record = RECORDS["metrics"](device_id="device-1", seq=7, **window)
    assert isinstance(record, MetricsWindow) and record.requests == 20
    assert _metrics(_cut(agent)) == []  # a window without traffic reports nothing


def test_window_requests_add_up_to_the_prometheus_counter_increase(agent: RunningAgent) -> None:
    name = "edgefleet_agent_requests_total"
    labels = {"model": "mlp", "version": "1.0.0", "fallback": "false"}
    with agent.client() as http:
        before = _sample(http.get("/metrics").text, name, **labels)
        _cut(agent)
        windows: list[dict[str, Any]] = []
        for i in range(45):
            http.post("/v2/models/mlp/infer", json=_body(ROW))
            if i % 10 == 9:
                windows += _metrics(_cut(agent))
        windows += _metrics(_cut(agent))
        after = _sample(http.get("/metrics").text, name, **labels)
    assert len(windows) == 5
    assert sum(w["requests"] for w in windows) == after - before == 45


def test_no_request_is_lost_or_counted_twice_across_cuts_under_concurrent_load(
    agent: RunningAgent,
) -> None:
    _cut(agent)
    sent: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        with agent.client() as http:
            while not stop.is_set():
                assert http.post("/v2/models/mlp/infer", json=_body(ROW)).is_success
                sent.append(1)

    windows: list[dict[str, Any]] = []
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        clients = [pool.submit(hammer) for _ in range(6)]
        while len(windows) < 8 or len(sent) < 200:
            windows += _metrics(_cut(agent))
        stop.set()
        for c in clients:
            c.result()
    windows += _metrics(_cut(agent))
    assert sum(w["requests"] for w in windows) == len(sent)
    assert sum(sum(w["latency_counts"]) for w in windows) == len(sent)
    assert sum(w["batch_rows"] for w in windows) == len(sent)


def test_failures_and_fallbacks_are_counted_against_the_primary(
    start_agent: StartAgent, bundles: dict[str, Path]
) -> None:
    running = start_agent(bundles=(bundles["failing"],), fallback=bundles["small"])
    two_rows = np.vstack([ROW, ROW])  # the fragile model fails on any batch above one
    with running.client() as http:
        for x in (ROW, two_rows, ROW, two_rows, two_rows):
            assert http.post("/v2/models/fragile/infer", json=_body(x)).is_success
        text = http.get("/metrics").text
    (window,) = _metrics(_cut(running), "fragile")
    assert (window["requests"], window["errors"], window["fallbacks"]) == (5, 3, 3)
    assert window["timeouts"] == 0 and sum(window["latency_counts"]) == 2
    prometheus = _sample(text, "edgefleet_agent_requests_total", model="fragile") + _sample(
        text, "edgefleet_agent_request_failures_total", model="fragile"
    )
    assert prometheus == window["requests"]
    MetricsWindow(device_id="device-1", seq=1, **window)


async def test_deadline_misses_count_as_timeouts_and_the_fallback_as_fallbacks() -> None:
    collector = TelemetryCollector()
    served = ServedModel(
        "m",
        ServingConfig(deadline=0.02, circuit_failures=100),
        AgentMetrics(),
        primary=runner(FakeSession(delay=0.2)),
        fallback=runner(FakeSession(3.0), "m-small", "0.1.0"),
        telemetry=collector,
    )
    try:
        answers = [await served.infer({"x": np.ones((1, 3), np.float32)}, 1) for _ in range(2)]
    finally:
        served.close()
        assert served.fallback is not None
        served.fallback.close()
    assert all(a.fallback for a in answers)
    (window,) = [w.fields for w in collector.cut()[0] if w.kind == "metrics"]
    assert (window["requests"], window["errors"], window["timeouts"]) == (2, 2, 2)
    assert window["fallbacks"] == 2 and window["latency_p95_ms"] is None


def test_latency_buckets_hold_their_upper_bound_and_percentiles_fall_back_to_them() -> None:
    collector = TelemetryCollector(TelemetryConfig(latency_samples=4))
    telemetry = collector.version("m", "1.0.0")
    for seconds in (0.0001, 0.0001001, 0.003, 20.0):
        telemetry.answered(seconds)
    (exact,) = collector.cut()[0]
    counts = exact.fields["latency_counts"]
    assert counts[1] == 1 and counts[2] == 1  # 0.1 ms is within its bucket; a hair more is not
    assert counts[LATENCY_BUCKETS_MS.index(5.0)] == 1 and counts[-1] == 1  # 20 s: slower than all
    assert exact.fields["latency_p50_ms"] == pytest.approx(np.median([0.1, 0.1001, 3, 20000]))
    for _ in range(10):  # more answers than samples kept: percentiles from the histogram
        telemetry.answered(0.0004)
    (estimated,) = collector.cut()[0]
    assert 0.25 <= estimated.fields["latency_p95_ms"] <= 0.5


def test_shadow_comparisons_and_batches_go_to_the_shadow_window() -> None:
    collector = TelemetryCollector()
    shadow = collector.version("m", "2.0.0", "shadow")
    shadow.device = "GPU"
    calls = collector.batches("m", "2.0.0")
    assert calls is not None
    calls(4, 1_000_000)
    shadow.answered(0.002)
    shadow.compared(4, 3, champion="1.0.0")
    (window,) = collector.cut()[0]
    fields = window.fields
    assert (fields["role"], fields["compared"], fields["agreements"]) == ("shadow", 4, 3)
    assert fields["champion"] == "1.0.0" and fields["device"] == "GPU"
    assert (fields["batches"], fields["batch_rows"], fields["queue_ms_mean"]) == (1, 4, 1.0)
    MetricsWindow(device_id="device-1", seq=3, **fields)


def test_outcomes_count_into_the_version_that_answered(
    agent: RunningAgent, bundles: dict[str, Path]
) -> None:
    _cut(agent)
    with agent.client() as http, agent.unix_client() as unix:
        assert http.post("/v2/models/mlp/outcome", json={"success": True}).json() == {
            "model_name": "mlp", "model_version": "1.0.0", "success": True,
        }  # fmt: skip
        assert unix.post("/v2/models/mlp/outcome", json={"success": False}).is_success
        versioned = http.post("/v2/models/mlp/versions/1.0.0/outcome", json={"success": True})
        assert versioned.is_success
    (window,) = _metrics(_cut(agent))
    assert (window["outcomes"], window["outcome_successes"], window["requests"]) == (3, 2, 0)
    MetricsWindow(device_id="device-1", seq=1, **window)

    agent.call(agent.agent.update(bundles["mlp-2"]))
    with agent.client() as http:  # an answer from 1.0.0 reported after the update still counts
        late = {"success": True, "model_version": "1.0.0"}
        assert http.post("/v2/models/mlp/outcome", json=late).is_success
        assert http.post("/v2/models/mlp/outcome", json={"success": True}).is_success
    counted = {w["version"]: w["outcomes"] for w in _metrics(_cut(agent))}
    assert counted == {"1.0.0": 1, "2.0.0": 1}


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("mlp", b"{not json", 400, "bad outcome body"),
        ("mlp", b"[]", 400, "send {"),
        ("mlp", b"{}", 400, "success: Field required"),
        ("mlp", b'{"success": "yes"}', 400, "success"),
        ("mlp", b'{"success": 1}', 400, "success"),
        ("mlp", b'{"success": true, "succes": true}', 400, "succes"),
        ("mlp", b'{"success": true, "model_version": ""}', 400, "model_version"),
        ("mlp/versions/1.0.0", b'{"success": true, "model_version": "2.0.0"}', 400, "give one"),
        ("nope", b'{"success": true}', 404, "unknown model 'nope'"),
        ("mlp", b'{"success": true, "model_version": "9.9.9"}', 404, "'9.9.9'"),
    ],
)
def test_outcome_refuses_bad_bodies_and_unknown_models_or_versions(
    agent: RunningAgent, path: str, body: bytes, status: int, says: str
) -> None:
    with agent.client() as http:
        response = http.post(f"/v2/models/{path}/outcome", content=body)
    assert response.status_code == status
    assert says in response.json()["error"]
    assert _metrics(_cut(agent)) == []


def test_window_p95_gauge_shows_the_last_window_and_leaves_with_the_traffic(
    agent: RunningAgent,
) -> None:
    gauge = "edgefleet_agent_window_latency_p95_seconds"
    with agent.client() as http:
        for _ in range(5):
            http.post("/v2/models/mlp/infer", json=_body(ROW))
        (window,) = _metrics(_cut(agent))
        exported = _sample(http.get("/metrics").text, gauge, model="mlp", version="1.0.0")
        assert exported == pytest.approx(window["latency_p95_ms"] / 1000)
        _cut(agent)  # a quiet window: no p95 to show
        assert f'{gauge}{{model="mlp"' not in http.get("/metrics").text


def test_telemetry_off_counts_nothing_and_serves_as_before(
    start_agent: StartAgent, bundles: dict[str, Path]
) -> None:
    running = start_agent(bundles=(bundles["mlp-1"],), telemetry=False)
    with running.client() as http:
        assert http.post("/v2/models/mlp/infer", json=_body(ROW)).is_success
        assert http.post("/v2/models/mlp/outcome", json={"success": True}).is_success
    assert _cut(running) == []
    assert running.agent.telemetry.find("mlp", "1.0.0") is None
