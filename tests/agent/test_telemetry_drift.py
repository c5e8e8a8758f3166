"""Drift counting: a real digits classifier with a drift profile served over HTTP; shifted
inputs cross the alert threshold and raise a notice, reference-like ones do not; counting is
off the request path, bounded, and loses no row across windows without saying so."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from agent.metrics import AgentMetrics
from agent.runner import ModelRunner, RunnerConfig
from agent.serving import ServedModel, ServingConfig
from agent.telemetry.collector import DriftNotice, TelemetryCollector, TelemetryConfig, Window
from agent.telemetry.columns import ColumnBins
from agent.telemetry.drift import DriftCounting, DriftTally
from exporters.package import create_bundle
from protocol.drift import count, drift_profile, reference_bins
from protocol.manifest import DriftProfile, TensorSpec
from protocol.telemetry import RECORDS, DriftWindow
from tests.agent.fakes import FakeSession, manifest, runner
from tests.conftest import RunningAgent
from tests.models import digits_classifier_onnx, digits_data

StartAgent = Callable[..., RunningAgent]


class Digits:
    """The digits classifier's bundle with a drift profile on half the data; the other half
    is held out as live traffic that looks like the reference."""

    def __init__(self, folder: Path) -> None:
        x, _ = digits_data()
        order = np.random.default_rng(0).permutation(len(x))
        reference, self.held_out = x[order[:1000]], x[order[1000:]]
        model = digits_classifier_onnx(folder / "digits.onnx")
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        label, probabilities = session.run(None, {"input": reference})
        self.profile = drift_profile(
            (TensorSpec(name="input", datatype="FP32", shape=(-1, 64)),),
            (
                TensorSpec(name="label", datatype="INT64", shape=(-1,)),
                TensorSpec(name="probabilities", datatype="FP32", shape=(-1, 10)),
            ),
            {"input": reference},
            {"label": label, "probabilities": probabilities},
        )
        self.bundle = folder / "digits-1.0.0.efb"
        create_bundle(
            model, name="digits", version="1.0.0", out=self.bundle, max_batch=16,
            drift=self.profile,
        )  # fmt: skip


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    return Digits(tmp_path_factory.mktemp("digits"))


def _body(x: np.ndarray) -> dict[str, object]:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip


def _send(running: RunningAgent, rows: np.ndarray, batch: int = 16) -> None:
    with running.client() as http:
        for start in range(0, len(rows), batch):
            response = http.post("/v2/models/digits/infer", json=_body(rows[start : start + batch]))
            assert response.is_success, response.text


def _cut(running: RunningAgent) -> tuple[list[Window], list[DriftNotice]]:
    """Count what is queued, then cut a window on the agent's event loop."""
    telemetry = running.agent.telemetry
    assert telemetry.settle()

    async def cut() -> tuple[list[Window], list[DriftNotice]]:
        return telemetry.cut()

    return running.call(cut())


def _drift(windows: list[Window]) -> list[dict[str, Any]]:
    return [w.fields for w in windows if w.kind == "drift"]


def test_shifted_inputs_cross_the_alert_threshold_and_raise_a_notice(
    start_agent: StartAgent, digits: Digits
) -> None:
    running = start_agent(bundles=(digits.bundle,))
    shifted = np.clip(digits.held_out[:320] * 0.5 + 0.4, 0, 1).astype(np.float32)
    _send(running, shifted)
    windows, notices = _cut(running)
    (drift,) = _drift(windows)
    assert drift["rows"] == 320 and drift["unsampled"] == 0
    assert set(drift["features"]) <= {f.name for f in digits.profile.features}
    assert set(drift["outputs"]) == {f.name for f in digits.profile.outputs}
    assert all(sum(c) == 320 for c in (*drift["features"].values(), *drift["outputs"].values()))
    assert drift["psi"]["input[36]"] > digits.profile.psi_alert
    alerted = {n.feature: n for n in notices}
    assert "input[36]" in alerted and len(alerted) >= 10
    notice = alerted["input[36]"]
    assert (notice.model, notice.version, notice.rows, notice.threshold) == (
        "digits", "1.0.0", 320, 0.25,
    )  # fmt: skip
    assert notice.detail == f"psi {notice.psi:.2f} on input[36] over 320 rows (alert at 0.25)"
    record = RECORDS["drift"](device_id="device-1", seq=2, **drift)
    assert isinstance(record, DriftWindow) and record.rows == 320
    with running.client() as http:
        text = http.get("/metrics").text
    assert 'edgefleet_agent_drift_psi{feature="input[36]",model="digits",version="1.0.0"}' in text


def test_reference_like_inputs_raise_no_notice(start_agent: StartAgent, digits: Digits) -> None:
    running = start_agent(bundles=(digits.bundle,))
    _send(running, digits.held_out[:600])
    windows, notices = _cut(running)
    (drift,) = _drift(windows)
    assert drift["rows"] == 600
    assert notices == []
    assert max(drift["psi"].values()) < digits.profile.psi_warn
    (metrics,) = [w.fields for w in windows if w.kind == "metrics"]
    assert metrics["requests"] == len(range(0, 600, 16))


def test_too_few_rows_give_psi_but_no_notice(start_agent: StartAgent, digits: Digits) -> None:
    running = start_agent(bundles=(digits.bundle,), telemetry_drift_min_rows=100)
    shifted = np.clip(digits.held_out[:64] + 0.5, 0, 1).astype(np.float32)
    _send(running, shifted)
    windows, notices = _cut(running)
    (drift,) = _drift(windows)
    assert drift["rows"] == 64 and max(drift["psi"].values()) > digits.profile.psi_alert
    assert notices == []


def test_rows_across_windows_under_concurrent_load_are_counted_once(
    start_agent: StartAgent, digits: Digits
) -> None:
    running = start_agent(bundles=(digits.bundle,))
    sent: list[int] = []
    stop = threading.Event()

    def hammer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with running.client() as http:
            while not stop.is_set():
                rows = int(rng.integers(1, 5))
                x = digits.held_out[rng.integers(0, len(digits.held_out), rows)]
                assert http.post("/v2/models/digits/infer", json=_body(x)).is_success
                sent.append(rows)

    windows: list[Window] = []

    async def cut() -> list[Window]:
        return running.agent.telemetry.cut()[0]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(hammer, seed) for seed in range(4)]
        while len(_drift(windows)) < 5 or sum(sent) < 300:
            windows += running.call(cut())  # cut while rows still wait to be counted
        stop.set()
        for c in clients:
            c.result()
    windows += _cut(running)[0]
    drift = _drift(windows)
    assert sum(d["rows"] for d in drift) == sum(sent)
    assert sum(d["unsampled"] for d in drift) == 0
    assert sum(sum(d["outputs"]["label"]) for d in drift) == sum(sent)


def test_a_full_buffer_leaves_rows_uncounted_and_says_how_many(
    start_agent: StartAgent, digits: Digits
) -> None:
    running = start_agent(bundles=(digits.bundle,), telemetry_drift_buffer_rows=8)
    _send(running, digits.held_out[:48], batch=16)  # each request alone overflows the buffer
    _send(running, digits.held_out[:4], batch=4)
    (drift,) = _drift(_cut(running)[0])
    assert (drift["rows"], drift["unsampled"]) == (4, 48)
    DriftWindow(device_id="device-1", seq=1, **drift)


def test_counting_that_falls_behind_counts_the_rest_as_unsampled(digits: Digits) -> None:
    counting = DriftCounting(buffer_rows=40, gather_s=30.0)  # the thread waits: nothing drains
    tally = DriftTally("digits", "1.0.0", "primary", digits.profile)
    batch = digits.held_out[:4]
    try:
        for _ in range(25):
            counting.submit(tally, {"input": batch}, {})
        assert counting.settle()
    finally:
        counting.close()
    counts = tally.take()
    assert (counts.rows, counts.unsampled) == (40, 60)
    assert tally.take().rows == 0  # taken once


def test_columns_counted_together_match_counting_each_with_the_protocol() -> None:
    rng = np.random.default_rng(3)
    reference = rng.standard_normal((500, 5))
    reference[:, 4] = rng.integers(0, 3, 500) + 0.5  # few distinct values: fewer edges
    features = [
        reference_bins(reference[:, j], name=f"x[{j}]", tensor="x", column=j) for j in range(5)
    ]
    live = rng.standard_normal((300, 5)) * 2
    live[:4] = np.array([[np.nan], [np.inf], [-np.inf], [0.0]])
    for j, f in enumerate(features):  # every edge itself, the reference maximum included
        live[10 : 10 + len(f.edges), j] = f.edges
    together = ColumnBins(features[::-1])  # columns in any order
    counted = together.count(live.astype(np.float32))
    for f, counts in zip(together.features, counted, strict=True):
        expected = count(live.astype(np.float32)[:, f.column], f)
        np.testing.assert_array_equal(counts, expected, err_msg=f.name)
    assert {len(c) for c in counted} == {len(f.counts) for f in features} and len(counted) == 5


def test_a_version_loaded_again_keeps_counting_into_the_same_window(digits: Digits) -> None:
    collector = TelemetryCollector(TelemetryConfig(drift_gather_s=0.0))
    reloaded = DriftProfile.model_validate_json(digits.profile.model_dump_json())
    assert reloaded is not digits.profile
    try:
        for profile in (digits.profile, reloaded, reloaded):
            collector.observe("digits", "1.0.0", "primary", {"input": digits.held_out[:5]}, {},
                              profile)  # fmt: skip
        assert collector.settle()
        (drift,) = _drift(collector.cut()[0])
    finally:
        collector.close()
    assert drift["rows"] == 15


def test_a_missing_tensor_is_skipped_and_logged_once(
    digits: Digits, caplog: pytest.LogCaptureFixture
) -> None:
    profile = DriftProfile(
        features=(
            *digits.profile.features[:2],
            reference_bins(np.arange(10.0), name="pixels[0]", tensor="pixels", column=0),
            digits.profile.features[2].model_copy(update={"name": "input[99]", "column": 99}),
        ),
        outputs=digits.profile.outputs,
    )
    collector = TelemetryCollector(TelemetryConfig(drift_gather_s=0.0))
    caplog.set_level(logging.WARNING, logger="agent.telemetry.drift")
    try:
        for _ in range(3):
            collector.observe("digits", "1.0.0", "primary", {"input": digits.held_out[:5]}, {},
                              profile)  # fmt: skip
            assert collector.drift.settle()
        (drift,) = _drift(collector.cut()[0])
    finally:
        collector.close()
    assert drift["rows"] == 15
    assert set(drift["features"]) == {"input[0]", "input[1]"}
    assert drift["outputs"] == {}  # the answers were not handed over: nothing to count
    skipped = [r for r in caplog.records if r.getMessage() == "drift feature not counted"]
    assert sorted(r.feature for r in skipped) == [  # type: ignore[attr-defined]
        "input[99]", "label", "pixels[0]",
        *(f.name for f in digits.profile.outputs if f.name != "label"),
    ]  # fmt: skip


async def test_answers_the_fallback_gave_are_not_counted_for_drift() -> None:
    profile = DriftProfile(
        features=(reference_bins(np.arange(10.0), name="x[0]", tensor="x", column=0),),
        outputs=(reference_bins(np.arange(10.0), name="y[0]", tensor="y", column=0),),
    )
    primary_session = FakeSession()
    primary = ModelRunner(
        manifest().model_copy(update={"drift": profile}),
        runner(primary_session).resolution,
        RunnerConfig(drain_timeout=5),
    )
    collector = TelemetryCollector(TelemetryConfig(drift_gather_s=0.0))
    served = ServedModel(
        "m",
        ServingConfig(circuit_failures=100),
        AgentMetrics(),
        primary=primary,
        fallback=runner(FakeSession(3.0), "m-small", "0.1.0"),
        telemetry=collector,
    )
    x = np.full((2, 3), 4.0, np.float32)
    try:
        await served.infer({"x": x}, 2)
        primary_session.fail = True
        assert (await served.infer({"x": x}, 2)).fallback
        assert collector.drift.settle()
        windows = collector.cut()[0]
    finally:
        served.close()
        assert served.fallback is not None
        served.fallback.close()
        collector.close()
    (drift,) = _drift(windows)
    assert drift["rows"] == 2  # the primary's rows; the fallback answered (12.0) the others
    assert drift["features"]["x[0]"] == tuple(count(x[:, 0], profile.features[0]))
    assert drift["outputs"]["y[0]"] == tuple(count(x[:, 0] * 2, profile.outputs[0]))
    assert drift["outputs"]["y[0]"][-1] == 0  # 12.0 would be above the reference maximum
