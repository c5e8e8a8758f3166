"""The dynamic batcher: batching under load, isolation of failures, back-pressure, deadlines."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping

import numpy as np
import pytest

from agent.batcher import Batcher, BatcherConfig
from agent.errors import InferenceError, OverloadedError


class RecordingModel:
    """Doubles its input; records every batch size; can be held to let a queue build up."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.set()
        self.gate.wait(5)
        x = inputs["x"]
        if np.any(x < 0):
            raise ValueError("negative input")
        self.batches.append(x.shape[0])
        return {"y": x * 2, "label": x.sum(axis=1).astype(np.int64)}


def _batcher(model: RecordingModel, **kwargs: int | bool) -> Batcher:
    config = BatcherConfig(
        max_batch_size=int(kwargs.get("max_batch_size", 8)),
        max_delay_us=int(kwargs.get("max_delay_us", 0)),
        max_queue=int(kwargs.get("max_queue", 64)),
        batchable=bool(kwargs.get("batchable", True)),
    )
    return Batcher("test", model.run, config)


def _x(value: float, rows: int = 1, cols: int = 3) -> np.ndarray:
    return np.full((rows, cols), value, dtype=np.float32)


async def test_requests_queued_while_busy_run_as_one_batch_and_get_their_own_rows() -> None:
    model = RecordingModel()
    batcher = _batcher(model)
    model.gate.clear()
    first = batcher.submit({"x": _x(1)}, 1)
    await asyncio.to_thread(model.entered.wait, 5)
    rest = [batcher.submit({"x": _x(float(i))}, 1) for i in range(2, 7)]
    model.gate.set()
    results = await asyncio.gather(first.future, *(p.future for p in rest))
    assert model.batches == [1, 5]
    for i, result in enumerate(results, start=1):
        np.testing.assert_array_equal(result["y"], _x(i) * 2)
        assert result["label"].shape == (1,)
    assert batcher.stats.execution_count == 2
    assert batcher.stats.inference_count == 6
    batcher.close()


async def test_batch_never_exceeds_max_rows() -> None:
    model = RecordingModel()
    batcher = _batcher(model, max_batch_size=4)
    model.gate.clear()
    first = batcher.submit({"x": _x(1)}, 1)
    await asyncio.to_thread(model.entered.wait, 5)
    rest = [batcher.submit({"x": _x(1, rows=3)}, 3) for _ in range(3)]
    model.gate.set()
    await asyncio.gather(first.future, *(p.future for p in rest))
    assert max(model.batches) <= 4
    assert sum(model.batches) == 10
    batcher.close()


async def test_max_delay_gathers_requests_that_arrive_later() -> None:
    model = RecordingModel()
    batcher = _batcher(model, max_delay_us=200_000)
    first = batcher.submit({"x": _x(1)}, 1)
    await asyncio.sleep(0.02)
    second = batcher.submit({"x": _x(2)}, 1)
    await asyncio.gather(first.future, second.future)
    assert model.batches == [2]
    batcher.close()


async def test_one_bad_request_fails_alone_inside_a_batch() -> None:
    model = RecordingModel()
    batcher = _batcher(model)
    model.gate.clear()
    first = batcher.submit({"x": _x(1)}, 1)
    await asyncio.to_thread(model.entered.wait, 5)
    good = batcher.submit({"x": _x(2)}, 1)
    bad = batcher.submit({"x": _x(-1)}, 1)
    model.gate.set()
    await first.future
    np.testing.assert_array_equal((await good.future)["y"], _x(2) * 2)
    with pytest.raises(InferenceError, match="negative input"):
        await bad.future
    assert batcher.stats.fail_count == 1
    batcher.close()


async def test_different_trailing_shapes_run_in_separate_groups() -> None:
    model = RecordingModel()
    batcher = _batcher(model)
    model.gate.clear()
    first = batcher.submit({"x": _x(1)}, 1)
    await asyncio.to_thread(model.entered.wait, 5)
    narrow = batcher.submit({"x": _x(2, cols=3)}, 1)
    wide = batcher.submit({"x": _x(3, cols=5)}, 1)
    narrow2 = batcher.submit({"x": _x(4, cols=3)}, 1)
    model.gate.set()
    await first.future
    assert (await wide.future)["y"].shape == (1, 5)
    assert (await narrow.future)["y"].shape == (1, 3)
    np.testing.assert_array_equal((await narrow2.future)["y"], _x(4) * 2)
    assert sorted(model.batches[1:]) == [1, 2]
    batcher.close()


async def test_full_queue_is_refused_with_retry_after() -> None:
    model = RecordingModel()
    batcher = _batcher(model, max_queue=2, batchable=False)
    model.gate.clear()
    first = batcher.submit({"x": _x(1)}, 1)
    await asyncio.to_thread(model.entered.wait, 5)
    queued = [batcher.submit({"x": _x(1)}, 1) for _ in range(2)]
    with pytest.raises(OverloadedError, match="2 requests waiting") as refused:
        batcher.submit({"x": _x(1)}, 1)
    assert refused.value.status == 503
    assert refused.value.retry_after >= 1
    model.gate.set()
    await asyncio.gather(first.future, *(p.future for p in queued))
    batcher.close()


async def test_expired_request_is_skipped_by_the_worker() -> None:
    model = RecordingModel()
    batcher = _batcher(model, batchable=False)
    model.gate.clear()
    first = batcher.submit({"x": _x(1)}, 1)
    await asyncio.to_thread(model.entered.wait, 5)
    late = batcher.submit({"x": _x(7)}, 1)
    late.expire(TimeoutError("too late"))
    model.gate.set()
    await first.future
    with pytest.raises(TimeoutError):
        await late.future
    batcher.close()
    assert model.batches == [1]  # the expired request never reached the model


async def test_unbatchable_model_runs_each_request_alone() -> None:
    model = RecordingModel()
    batcher = _batcher(model, batchable=False)
    model.gate.clear()
    first = batcher.submit({"x": _x(1)}, 1)
    await asyncio.to_thread(model.entered.wait, 5)
    rest = [batcher.submit({"x": _x(1)}, 1) for _ in range(3)]
    model.gate.set()
    await asyncio.gather(first.future, *(p.future for p in rest))
    assert model.batches == [1, 1, 1, 1]
    batcher.close()


async def test_output_without_a_row_per_input_is_run_per_request() -> None:
    def summed(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(inputs["x"].shape[0])
        gate.wait(5)
        return {"total": np.asarray(inputs["x"].sum(), dtype=np.float32)}

    calls: list[int] = []
    gate = threading.Event()
    batcher = Batcher("scalar", summed, BatcherConfig(max_batch_size=8, batchable=True))
    first = batcher.submit({"x": _x(1)}, 1)
    a = batcher.submit({"x": _x(2)}, 1)
    b = batcher.submit({"x": _x(3)}, 1)
    gate.set()
    results = await asyncio.gather(first.future, a.future, b.future)
    assert [float(r["total"]) for r in results] == [3.0, 6.0, 9.0]
    assert max(calls) > 1  # a batch was tried before each request ran alone
    batcher.close()


async def test_fast_idle_model_runs_on_the_callers_thread_unless_disabled() -> None:
    threads: list[int] = []

    def fast(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        threads.append(threading.get_ident())
        return {"y": inputs["x"] + 1}

    batcher = Batcher("fast", fast, BatcherConfig(inline_below_us=10_000))
    assert batcher.run_inline({"x": _x(1)}, 1) is None  # speed unknown: goes to the worker
    await batcher.submit({"x": _x(1)}, 1).future
    out = batcher.run_inline({"x": _x(2)}, 1)
    assert out is not None
    np.testing.assert_array_equal(out["y"], _x(3))
    assert threads[-1] == threading.get_ident() != threads[0]
    assert batcher.stats.execution_count == 2 and batcher.stats.success_count == 2
    batcher.close()
    never = Batcher("never", fast, BatcherConfig(inline_below_us=0))
    await never.submit({"x": _x(1)}, 1).future
    assert never.run_inline({"x": _x(1)}, 1) is None
    never.close()


async def test_inline_failure_is_the_requests_error() -> None:
    model = RecordingModel()
    batcher = Batcher("m", model.run, BatcherConfig(inline_below_us=1_000_000))
    await batcher.submit({"x": _x(1)}, 1).future
    with pytest.raises(InferenceError, match="negative input"):
        batcher.run_inline({"x": _x(-1)}, 1)
    assert batcher.stats.fail_count == 1
    batcher.close()


async def test_busy_worker_means_no_inline_run() -> None:
    model = RecordingModel()
    batcher = Batcher("m", model.run, BatcherConfig(inline_below_us=1_000_000))
    await batcher.submit({"x": _x(1)}, 1).future
    model.gate.clear()
    model.entered.clear()
    busy = batcher.submit({"x": _x(2)}, 1)
    await asyncio.to_thread(model.entered.wait, 5)
    assert batcher.run_inline({"x": _x(3)}, 1) is None  # the worker is computing
    model.gate.set()
    await busy.future
    batcher.close()


async def test_several_workers_run_batches_of_one_model_at_once() -> None:
    model = RecordingModel()
    inside = threading.Semaphore(0)
    both = threading.Event()

    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        inside.release()
        both.wait(5)
        return model.run(inputs)

    batcher = Batcher("m", run, BatcherConfig(workers=2, inline_below_us=0))
    a = batcher.submit({"x": _x(1)}, 1)
    b = batcher.submit({"x": _x(2)}, 1)
    for _ in range(2):
        assert await asyncio.to_thread(inside.acquire, True, 5)  # two calls in flight together
    both.set()
    await asyncio.gather(a.future, b.future)
    batcher.close()
