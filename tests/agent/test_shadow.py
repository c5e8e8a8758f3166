"""A shadow beside the primary: real digits classifiers of two versions that disagree on some
rows, every row's agreement counted into the shadow's telemetry; a slow shadow never slows a
caller (its queue skips, and says so); a failing one is counted, whatever it raises, and never
stops the comparisons; answers of another shape never agree; answers compared by label,
tolerance or argmax."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from agent.errors import StoreError
from agent.metrics import AgentMetrics
from agent.runner import ModelRunner, RunnerConfig
from agent.service import Agent
from agent.serving import ServedModel, ServingConfig
from agent.settings import AgentSettings
from agent.shadow import RunningShadow, Shadow, ShadowConfig, ShadowFile, agreement
from exporters.package import create_bundle
from protocol.telemetry import MetricsWindow
from tests.agent.fakes import FakeSession, runner
from tests.models import (
    ONNX_IR_VERSION,
    ONNX_OPSET,
    _save_onnx,
    digits_classifier_onnx,
    digits_data,
)

# -- comparing answers -------------------------------------------------------------------------

CONFIG = ShadowConfig()


def test_labels_agree_when_equal_and_scores_then_do_not_count() -> None:
    primary = {"label": np.array([1, 2, 3, 4]), "probabilities": np.zeros((4, 3), np.float32)}
    shadow = {"label": np.array([1, 2, 0, 4]), "probabilities": np.ones((4, 3), np.float32)}
    compared = (("label", "equal"),)
    assert agreement(primary, shadow, 4, compared, CONFIG) == 3


def test_floats_agree_within_the_tolerance_or_on_their_argmax() -> None:
    primary = {"y": np.array([[1.0, 2.0], [3.0, 1.0], [0.5, 0.6]], np.float32)}
    shadow = {"y": np.array([[1.0005, 2.0], [2.0, 1.0], [0.7, 0.6]], np.float32)}
    assert agreement(primary, shadow, 3, (("y", "allclose"),), CONFIG) == 1
    # By argmax: rows 0 and 1 pick the same column, row 2 does not.
    assert agreement(primary, shadow, 3, (("y", "argmax"),), CONFIG) == 2
    loose = ShadowConfig(rtol=0.5, atol=0.0)
    assert agreement(primary, shadow, 3, (("y", "allclose"),), loose) == 3


def test_answers_that_cannot_be_compared_never_agree() -> None:
    primary = {"y": np.zeros((2, 3), np.float32)}
    assert (
        agreement(primary, {"y": np.zeros((2, 4), np.float32)}, 2, (("y", "allclose"),), CONFIG)
        == 0
    )
    assert (
        agreement(primary, {"z": np.zeros((2, 3), np.float32)}, 2, (("y", "allclose"),), CONFIG)
        == 0
    )
    assert agreement(primary, primary, 2, (), CONFIG) == 0
    # A model without a batch dimension answers one row.
    single = {"y": np.array([1.0, 2.0, 3.0], np.float32)}
    assert agreement(single, single, 1, (("y", "allclose"),), CONFIG) == 1


@pytest.mark.parametrize("how", ["allclose", "argmax", "equal"])
def test_answers_of_the_same_size_but_another_shape_disagree_on_every_row(how: str) -> None:
    # (2, 3) against (6,): as many values, but not two rows of three; never broadcast.
    primary = {"y": np.arange(6, dtype=np.float32).reshape(2, 3)}
    flat = {"y": np.arange(6, dtype=np.float32)}
    assert agreement(primary, flat, 2, (("y", how),), CONFIG) == 0
    assert agreement(flat, primary, 2, (("y", how),), CONFIG) == 0
    turned = {"y": np.arange(6, dtype=np.float32).reshape(3, 2)}
    assert agreement(primary, turned, 2, (("y", how),), CONFIG) == 0


# -- real classifiers --------------------------------------------------------------------------


def weak_digits_onnx(path: Path) -> Path:
    """A second digits classifier, regularised hard: it disagrees with the first on ~1 row in 10."""
    import onnx
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    x, y = digits_data()
    clf = LogisticRegression(C=0.003, max_iter=2000).fit(x, y)
    model = convert_sklearn(
        clf,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": ONNX_OPSET, "ai.onnx.ml": 3},
    )
    model.ir_version = ONNX_IR_VERSION
    onnx.save_model(model, str(path))
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("digits")
    models = {
        "1.0.0": digits_classifier_onnx(d / "v1.onnx"),
        "2.0.0": weak_digits_onnx(d / "v2.onnx"),
    }
    found: dict[str, Path] = {}
    for version, model in models.items():
        out = d / f"digits-{version}.efb"
        create_bundle(model, name="digits", version=version, out=out, max_batch=32)
        found[version] = out
        found[f"{version}.onnx"] = model
    return found


def labels(model: Path, x: np.ndarray) -> np.ndarray:
    """The model's labels straight from ONNX Runtime: the reference the shadow must match."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["label"], {"input": x})[0])


@pytest.fixture
async def agent(tmp_path: Path, digits: dict[str, Path]) -> AsyncIterator[Agent]:
    served = Agent(AgentSettings(state_dir=tmp_path / "state", bundles=(digits["1.0.0"],)))
    await served.start()
    yield served
    await served.close()


async def test_a_shadow_counts_every_row_it_agrees_on(
    agent: Agent, digits: dict[str, Path]
) -> None:
    runner_2 = await agent.load(await agent.install(digits["2.0.0"]), shadow=True)
    assert runner_2.config.inline_below_us == 0  # never computes on the event loop
    await agent.attach_shadow(runner_2)
    served = agent.get("digits")
    shadow = served.shadow
    assert shadow is not None

    x, _ = digits_data()
    expected = int((labels(digits["1.0.0.onnx"], x) == labels(digits["2.0.0.onnx"], x)).sum())
    assert 0 < expected < len(x)  # the versions disagree on some rows, not on all
    requests = 0
    for start in range(0, len(x), 20):
        batch = x[start : start + 20]
        answer = await served.infer({"input": batch}, len(batch))
        assert (answer.model_version, answer.fallback) == ("1.0.0", False)
        requests += 1
        if requests % 8 == 0:
            await shadow.idle()  # keep the queue short: this test counts, it does not skip
    await shadow.idle()

    counts = shadow.counts
    assert (counts.offered, counts.skipped, counts.failed) == (requests, 0, 0)
    assert counts.compared == len(x)
    assert counts.agreed == expected

    telemetry = agent.telemetry.find("digits", "2.0.0", "shadow")
    assert telemetry is not None
    assert (telemetry.requests, telemetry.errors) == (requests, 0)
    assert (telemetry.compared_rows, telemetry.agreements) == (len(x), expected)
    assert telemetry.champion == "1.0.0"
    windows, _ = agent.telemetry.cut()
    (record,) = [w for w in windows if w.kind == "metrics" and w.fields["role"] == "shadow"]
    window = MetricsWindow(device_id="cam-1", seq=1, **record.fields)
    assert (window.version, window.compared, window.agreements) == ("2.0.0", len(x), expected)
    assert window.champion == "1.0.0" and window.requests == requests
    assert sum(window.latency_counts) == requests
    # The primary's own window counts the same requests as a primary's.
    (primary,) = [w for w in windows if w.kind == "metrics" and w.fields["role"] == "primary"]
    assert primary.fields["version"] == "1.0.0" and primary.fields["requests"] == requests

    (status,) = agent.status().models
    assert status.version == "1.0.0"
    assert status.shadow is not None and status.shadow.version == "2.0.0"
    assert status.shadow.agreement == pytest.approx(expected / len(x))


async def test_a_shadow_needs_a_primary_and_is_unloaded_when_detached(
    agent: Agent, digits: dict[str, Path]
) -> None:
    runner_2 = await agent.load(await agent.install(digits["2.0.0"]), shadow=True)
    await agent.attach_shadow(runner_2)
    assert agent.shadow_version("digits") == "2.0.0"
    assert await agent.detach_shadow("digits") == "2.0.0"
    assert agent.shadow_version("digits") is None
    assert agent.status().models[0].shadow is None
    assert await agent.detach_shadow("digits") is None
    # Answers go on, with nothing queued for a shadow that is gone.
    x, _ = digits_data()
    answer = await agent.get("digits").infer({"input": x[:3]}, 3)
    assert answer.model_version == "1.0.0"


def doubling_onnx(path: Path, *, flat: bool) -> Path:
    """``y = 2 * x`` for ``x`` FP32 [batch, 3]: shaped [batch, 3], or flattened to [batch * 3]."""
    nodes = [helper.make_node("Mul", ["x", "two"], ["y" if not flat else "doubled"])]
    initializer = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])]
    shape: list[str | int] = ["batch", 3]
    if flat:
        nodes.append(helper.make_node("Reshape", ["doubled", "flat"], ["y"]))
        initializer.append(helper.make_tensor("flat", TensorProto.INT64, [1], [-1]))
        shape = ["values"]
    graph = helper.make_graph(
        nodes,
        "doubling",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=initializer,
    )
    return _save_onnx(graph, path)


async def test_a_shadow_answering_in_another_shape_disagrees_and_keeps_comparing(
    tmp_path: Path,
) -> None:
    bundles = []
    for version, flat in (("1.0.0", False), ("2.0.0", True)):
        model = doubling_onnx(tmp_path / f"{version}.onnx", flat=flat)
        out = tmp_path / f"doubling-{version}.efb"
        create_bundle(model, name="doubling", version=version, out=out)
        bundles.append(out)
    agent = Agent(AgentSettings(state_dir=tmp_path / "state", bundles=(bundles[0],)))
    await agent.start()
    try:
        await agent.attach_shadow(await agent.load(await agent.install(bundles[1]), shadow=True))
        served = agent.get("doubling")
        shadow = served.shadow
        assert shadow is not None
        x = np.ones((2, 3), np.float32)
        for _ in range(3):  # more than one: the first must not have ended the comparisons
            for _ in range(5):
                answer = await served.infer({"x": x}, 2)
                assert answer.outputs["y"].shape == (2, 3)
            await shadow.idle()
        # The same six values, shaped (6,) against (2, 3): answered, and no row agrees.
        counts = shadow.counts
        assert (counts.offered, counts.answered, counts.skipped, counts.failed) == (15, 15, 0, 0)
        assert (counts.compared, counts.agreed) == (30, 0)
    finally:
        await agent.close()


class RaisingRunner(ModelRunner):
    """A runner whose ``run`` raises a plain ``ValueError`` (no agent error) for 2-row requests."""

    async def run(
        self, inputs: Mapping[str, np.ndarray], rows: int, deadline: float
    ) -> dict[str, np.ndarray]:
        if rows == 2:
            raise ValueError("cannot broadcast (2,3) against (2,6)")
        return await super().run(inputs, rows, deadline)


async def test_whatever_a_shadow_raises_counts_as_failed_and_comparisons_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    challenger = runner(FakeSession(), version="2.0.0", config=RunnerConfig(inline_below_us=0))
    raising = RaisingRunner(challenger.manifest, challenger.resolution, challenger.config)
    challenger.close()
    shadow = Shadow(raising, raising.manifest.outputs, ShadowConfig(queue=8, deadline=2.0))
    one, two = np.ones((1, 3), np.float32), np.ones((2, 3), np.float32)
    try:
        for _ in range(3):
            assert shadow.offer({"x": two}, 2, {"y": two * 2}, "1.0.0")
            await shadow.idle()
            assert shadow.offer({"x": one}, 1, {"y": one * 2}, "1.0.0")
            await shadow.idle()
        counts = shadow.counts
        assert (counts.offered, counts.failed, counts.answered, counts.agreed) == (6, 3, 3, 3)
        # Said once, with the reason; not once per request.
        warned = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warned) == 1
        assert "ValueError: cannot broadcast" in warned[0].getMessage()
    finally:
        await shadow.close()


async def test_comparisons_that_stopped_start_again_on_the_next_offer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    challenger = runner(FakeSession(), version="2.0.0", config=RunnerConfig(inline_below_us=0))
    shadow = Shadow(challenger, challenger.manifest.outputs, ShadowConfig(queue=2, deadline=2.0))
    x = np.ones((1, 3), np.float32)
    try:
        assert shadow.offer({"x": x}, 1, {"y": x * 2}, "1.0.0")
        await shadow.idle()
        # Its task ends (here, cancelled from outside) while requests keep coming: the queue
        # fills, and without a restart every later request would be skipped for good.
        worker = shadow._worker
        assert worker is not None
        worker.cancel()
        await asyncio.sleep(0)
        assert worker.done()
        for _ in range(4):
            shadow.offer({"x": x}, 1, {"y": x * 2}, "1.0.0")
        await asyncio.wait_for(shadow.idle(), 5)  # never drains if nothing restarted the task
        counts = shadow.counts
        assert counts.offered == 5
        assert counts.answered + counts.skipped == 5 and counts.answered >= 3
        assert counts.agreed == counts.answered
        assert "starting them again" in caplog.text
    finally:
        await shadow.close()


# -- a shadow never slows a caller -------------------------------------------------------------


def served_with(shadow_session: FakeSession, queue: int) -> tuple[ServedModel, Shadow]:
    primary = runner(FakeSession(), version="1.0.0")
    served = ServedModel("m", ServingConfig(deadline=2.0), AgentMetrics(), primary=primary)
    challenger = runner(
        shadow_session, version="2.0.0", config=RunnerConfig(inline_below_us=0, drain_timeout=5)
    )
    shadow = Shadow(challenger, primary.manifest.outputs, ShadowConfig(queue=queue, deadline=2.0))
    served.shadow = shadow
    return served, shadow


async def timed(served: ServedModel, n: int) -> list[float]:
    x = np.ones((1, 3), np.float32)
    took = []
    for _ in range(n):
        started = time.perf_counter()
        answer = await served.infer({"x": x}, 1)
        took.append(time.perf_counter() - started)
        assert answer.model_version == "1.0.0"
        await asyncio.sleep(0)  # let the shadow's worker take what is queued
    return took


async def test_a_slow_shadow_skips_comparisons_rather_than_slow_callers() -> None:
    served, shadow = served_with(FakeSession(delay=0.2), queue=4)
    alone, _ = served_with(FakeSession(), queue=4)
    alone.shadow = None
    try:
        baseline = await timed(alone, 60)
        took = await timed(served, 60)
        # Each shadow call takes 200 ms; callers never wait for one.
        assert max(took) < 0.1
        assert statistics.median(took) < statistics.median(baseline) + 0.005
        counts = shadow.counts
        assert counts.offered == 60
        assert counts.skipped > 40  # the queue held 4; the rest were skipped, not waited for
        await shadow.idle()
        assert counts.answered + counts.skipped + counts.failed == 60
        assert counts.compared == counts.answered and counts.agreed == counts.answered
    finally:
        await shadow.close()
        served.close()
        alone.close()


async def test_a_failing_shadow_is_counted_and_callers_never_see_it() -> None:
    served, shadow = served_with(FakeSession(fail=True), queue=64)
    try:
        await timed(served, 10)
        await shadow.idle()
        assert (shadow.counts.failed, shadow.counts.answered, shadow.counts.compared) == (10, 0, 0)
    finally:
        await shadow.close()
        served.close()


# -- the shadow list -----------------------------------------------------------------------------


def test_the_shadow_list_survives_damage_and_reports_an_unwritable_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shadows = ShadowFile(tmp_path)
    assert shadows.load() == {}
    kept = {"digits": RunningShadow(version="2.0.0", sha256="a" * 64)}
    shadows.save(kept)
    assert ShadowFile(tmp_path).load() == kept
    shadows.path.write_text('{"schema": 1, "models": {"digits": {"version": 2}}}')
    assert shadows.load() == {}
    assert "ignoring the damaged shadow list" in caplog.text
    blocked = ShadowFile(tmp_path / "file")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StoreError, match="cannot write the shadow list"):
        blocked.save(kept)
