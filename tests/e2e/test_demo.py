"""The demo's model versions: built once, each doing in an agent what the demo says it does —
2.0.0 answers the printed request, 2.1.0 is the INT8 network with its own reports, and 2.2.0
answers one image but fails on every batch, where the fallback answers instead. And the demo's
traffic, which counts who answered and posts outcomes back."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from edgefleet.demo import DemoBundles, build_demo_bundles
from edgefleet.demo.bundles import digits
from edgefleet.demo.traffic import Traffic, TrafficSettings
from protocol.bundle import verify_bundle
from tests.conftest import RunningAgent
from tests.e2e.system import wait_until


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> DemoBundles:
    return build_demo_bundles(tmp_path_factory.mktemp("demo") / "bundles")


def _infer(agent: RunningAgent, rows: int) -> dict[str, Any]:
    x, _ = digits()
    body = {"inputs": [{"name": "input", "shape": [rows, 64], "datatype": "FP32",
                        "data": x[:rows].ravel().tolist()}]}  # fmt: skip
    with agent.client() as http:
        response = http.post("/v2/models/digits/infer", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_demo_bundles_are_built_once_and_the_printed_request_works(
    bundles: DemoBundles, start_agent: Callable[..., RunningAgent]
) -> None:
    for bundle in (bundles.primary, bundles.good, bundles.bad):
        assert str(verify_bundle(bundle).fallback) == "digits-small@1.0.0", bundle
    assert verify_bundle(bundles.fallback).name == "digits-small"
    built = {p: p.stat().st_mtime_ns for p in bundles.published}
    assert build_demo_bundles(bundles.primary.parent) == bundles
    assert {p: p.stat().st_mtime_ns for p in bundles.published} == built  # cached, not rebuilt

    running = start_agent(bundles=(bundles.primary,), fallback=bundles.fallback)
    request = json.loads(bundles.request.read_text())
    with running.client() as http:
        answer = http.post("/v2/models/digits/infer", json=request).json()
        small = http.post("/v2/models/digits-small/infer", json=request).json()
    outputs = {o["name"]: o["data"] for o in answer["outputs"]}
    assert answer["model_name"] == "digits" and answer["parameters"]["fallback"] is False
    assert outputs["label"] == [0]  # the request is the first image of the digits data: a 0
    assert {o["name"]: o["data"] for o in small["outputs"]}["label"] == [0]


def test_the_good_version_is_the_network_in_int8_with_its_reports(bundles: DemoBundles) -> None:
    primary, good = verify_bundle(bundles.primary), verify_bundle(bundles.good)
    assert (primary.version, good.version) == ("2.0.0", "2.1.0")
    assert good.quantization.method == "dynamic-int8"
    parity = good.quantization.parity
    assert parity is not None and parity.top1_agreement is not None
    assert parity.top1_agreement > 0.97  # the same digit as the float network
    assert good.drift is not None and good.drift.outputs
    assert good.drift != primary.drift  # its own profile, from its own outputs
    report = bundles.primary.parent / "reports" / "digits-2.1.0.report.md"
    assert "dynamic-int8" in report.read_text()


def test_the_bad_version_answers_one_image_and_fails_on_batches(
    bundles: DemoBundles, start_agent: Callable[..., RunningAgent]
) -> None:
    bad = verify_bundle(bundles.bad)
    assert bad.version == "2.2.0" and not bad.batchable
    assert bad.drift is not None  # judged like any version, drift gate included
    running = start_agent(bundles=(bundles.bad,), fallback=bundles.fallback)

    one = _infer(running, 1)
    assert (one["model_name"], one["model_version"]) == ("digits", "2.2.0")
    assert one["parameters"] == {"fallback": False}
    assert {o["name"]: o["data"] for o in one["outputs"]}["label"] == [0]
    # Two images: the runtime refuses the reshape, and the pinned fallback answers instead.
    two = _infer(running, 2)
    assert (two["model_name"], two["model_version"]) == ("digits-small", "1.0.0")
    assert two["parameters"]["fallback"] is True
    assert {o["name"]: o["data"] for o in two["outputs"]}["label"] == [0, 1]


def test_the_demo_traffic_counts_who_answered_and_posts_outcomes(
    bundles: DemoBundles, start_agent: Callable[..., RunningAgent]
) -> None:
    running = start_agent(bundles=(bundles.bad,), fallback=bundles.fallback)
    x, y = digits()
    traffic = Traffic({"demo-1": running.url}, x, y, TrafficSettings(rate=50, rows=(1, 2)))
    traffic.start()
    try:
        wait_until(
            lambda: (
                min(traffic.counts()[0][v] for v in ("digits@2.2.0", "digits-small@1.0.0")) >= 5
            ),
            "answers from 2.2.0 and from the fallback",
            30,
        )
    finally:
        traffic.stop()
    assert traffic.failed == 0, traffic.failures
    assert set(traffic.answered) == {"digits@2.2.0", "digits-small@1.0.0"}
    # Single images come from 2.2.0, pairs from the fallback, which says so.
    assert traffic.by_fallback == {"digits-small@1.0.0": traffic.answered["digits-small@1.0.0"]}
    # Each answer's outcome (was the digit right?) went back to the version that gave it.
    for name, version in (("digits", "2.2.0"), ("digits-small", "1.0.0")):
        counted = running.agent.telemetry.find(name, version)
        assert counted is not None and counted.outcomes > 0, (name, version)
        assert 0 < counted.outcome_successes <= counted.outcomes
