"""Primary, fallback and circuit: who answers, and the answer says so; swaps fail nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from agent.errors import InferenceError, ModelLoadError, ModelNotReadyError
from agent.metrics import AgentMetrics
from agent.serving import ServedModel, ServingConfig, check_fallback_compatible
from protocol.manifest import TensorSpec
from tests.agent.fakes import FakeSession, runner

X = np.ones((1, 3), dtype=np.float32)
_opened: list[ServedModel] = []


@pytest.fixture(autouse=True)
def _close_models() -> Iterator[None]:
    yield
    while _opened:
        served = _opened.pop()
        served.close()
        if served.fallback is not None:
            served.fallback.close()


def _served(
    primary: FakeSession | None, fallback: FakeSession | None = None, **config: float
) -> ServedModel:
    served = ServedModel(
        "m",
        ServingConfig(
            deadline=config.get("deadline", 1.0),
            circuit_failures=int(config.get("failures", 3)),
            circuit_reset=config.get("reset", 60.0),
            result_cache_entries=int(config.get("cache", 0)),
        ),
        AgentMetrics(),
        primary=runner(primary) if primary else None,
        fallback=runner(fallback, "m-small", "0.1.0") if fallback else None,
        load_error=None if primary else "compile failed on every device",
    )
    _opened.append(served)
    return served


async def test_primary_answers_and_says_it_is_not_the_fallback() -> None:
    served = _served(FakeSession(2.0), FakeSession(3.0))
    answer = await served.infer({"x": X}, 1)
    assert (answer.model_name, answer.model_version, answer.fallback) == ("m", "1.0.0", False)
    np.testing.assert_array_equal(answer.outputs["y"], X * 2)


async def test_fallback_answers_when_primary_raises() -> None:
    served = _served(FakeSession(fail=True), FakeSession(3.0))
    answer = await served.infer({"x": X}, 1)
    assert (answer.model_name, answer.fallback, answer.reason) == ("m-small", True, "error")
    np.testing.assert_array_equal(answer.outputs["y"], X * 3)


async def test_fallback_answers_when_primary_misses_its_deadline() -> None:
    served = _served(FakeSession(delay=0.3), FakeSession(3.0), deadline=0.05)
    answer = await served.infer({"x": X}, 1)
    assert answer.fallback and answer.reason == "deadline"


async def test_fallback_answers_when_primary_did_not_load() -> None:
    served = _served(None, FakeSession(3.0))
    answer = await served.infer({"x": X}, 1)
    assert answer.fallback and answer.reason == "primary_not_loaded"


async def test_open_circuit_skips_the_primary_entirely() -> None:
    primary = FakeSession(fail=True)
    served = _served(primary, FakeSession(3.0), failures=2)
    for _ in range(2):
        assert (await served.infer({"x": X}, 1)).reason == "error"
    calls = primary.calls
    answer = await served.infer({"x": X}, 1)
    assert answer.reason == "circuit_open"
    assert primary.calls == calls


async def test_circuit_recovers_through_a_half_open_trial() -> None:
    primary = FakeSession(fail=True)
    served = _served(primary, FakeSession(3.0), failures=1, reset=0.05)
    assert (await served.infer({"x": X}, 1)).reason == "error"
    assert (await served.infer({"x": X}, 1)).reason == "circuit_open"
    primary.fail = False
    await asyncio.sleep(0.06)
    answer = await served.infer({"x": X}, 1)
    assert not answer.fallback
    assert served.circuit.state.value == "closed"


async def test_without_fallback_the_primary_error_reaches_the_caller() -> None:
    served = _served(FakeSession(fail=True))
    with pytest.raises(InferenceError, match="kernel exploded"):
        await served.infer({"x": X}, 1)


def test_a_model_with_nothing_loaded_is_refused() -> None:
    with pytest.raises(ModelNotReadyError, match="neither a primary nor a fallback"):
        _served(None, None)


async def test_result_cache_answers_repeated_inputs_without_the_model() -> None:
    primary = FakeSession(2.0)
    served = _served(primary, cache=4)
    first = await served.infer({"x": X}, 1)
    second = await served.infer({"x": X.copy()}, 1)
    assert primary.calls == 1
    np.testing.assert_array_equal(first.outputs["y"], second.outputs["y"])
    await served.infer({"x": X * 5}, 1)
    assert primary.calls == 2


async def test_swap_under_load_fails_no_request_and_unloads_the_old_version() -> None:
    old = FakeSession(2.0, delay=0.002)
    served = _served(old)
    new = FakeSession(10.0, delay=0.002)
    failures: list[BaseException] = []
    seen: set[str] = set()
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            try:
                answer = await served.infer({"x": X}, 1)
            except Exception as e:  # noqa: BLE001 — counted, asserted below
                failures.append(e)
            else:
                seen.add(answer.model_version)
                expected = 2.0 if answer.model_version == "1.0.0" else 10.0
                assert float(answer.outputs["y"][0, 0]) == expected

    clients = [asyncio.create_task(client()) for _ in range(8)]
    await asyncio.sleep(0.1)
    await served.swap(runner(new, "m", "2.0.0"))
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*clients)
    assert failures == []
    assert seen == {"1.0.0", "2.0.0"}
    assert old.closed and not new.closed
    assert served.versions == ("2.0.0",)


async def test_requests_are_counted_under_the_version_that_answered_them() -> None:
    metrics = AgentMetrics()
    served = ServedModel("m", ServingConfig(), metrics, primary=runner(FakeSession(delay=0.05)))
    _opened.append(served)
    in_flight = asyncio.create_task(served.infer({"x": X}, 1))
    await asyncio.sleep(0.01)
    await served.swap(runner(FakeSession(3.0), "m", "2.0.0"))  # drains the request above
    assert (await in_flight).model_version == "1.0.0"
    assert (await served.infer({"x": X}, 1)).model_version == "2.0.0"

    def answered(version: str) -> float | None:
        labels = {"model": "m", "version": version, "fallback": "false"}
        return metrics.registry.get_sample_value("edgefleet_agent_requests_total", labels)

    assert (answered("1.0.0"), answered("2.0.0")) == (1.0, 1.0)


async def test_incompatible_fallback_is_named() -> None:
    fallback = runner(FakeSession(), "m-small", "0.1.0")
    other = (TensorSpec(name="x", datatype="INT64", shape=(-1, 3)),)
    with pytest.raises(ModelLoadError, match="input 'x' \\(INT64\\) is FP32 there"):
        check_fallback_compatible(other, fallback.manifest.outputs, fallback)
    outputs = (TensorSpec(name="z", datatype="FP32", shape=(-1,)),)
    with pytest.raises(ModelLoadError, match="does not produce output 'z'"):
        check_fallback_compatible(fallback.manifest.inputs, outputs, fallback)


async def test_without_fallback_there_is_no_circuit_to_turn_requests_away() -> None:
    primary = FakeSession(fail=True)
    served = _served(primary, failures=1)
    for _ in range(3):
        with pytest.raises(InferenceError):
            await served.infer({"x": X}, 1)
    assert primary.calls == 3
    primary.fail = False
    assert not (await served.infer({"x": X}, 1)).fallback
