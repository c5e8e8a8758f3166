"""Dynamic batching: requests queue up while the model is busy and run together.

Worker threads (one per model version by default) pull requests from a bounded queue. When the
model is idle a request runs at once (no added latency at low load); while a batch runs, new
requests gather and the next batch takes them all, up to ``max_batch_size`` rows.
``max_delay_us`` can hold a batch open a little longer to fill it. Runtimes release the GIL while
they compute, so the event loop keeps serving while a worker runs.

A model that answers in a few microseconds pays more for the hand-off to a worker thread and back
(two thread wake-ups, tens of microseconds) than for its own compute. So when the worker is idle,
nothing is queued and the model's recent calls took less than ``inline_below_us``, the request
runs on the caller's thread instead: the event loop is blocked no longer than such a call takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from agent.errors import AgentError, InferenceError, OverloadedError

__all__ = ["BatchStats", "Batcher", "BatcherConfig", "ObserveFn", "Pending"]

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
RunFn = Callable[[Mapping[str, np.ndarray]], Tensors]


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 1  # rows per model call
    max_delay_us: int = 0  # microseconds to wait for a batch to fill; 0 = only what is queued
    max_queue: int = 256  # requests waiting; more are refused with 503
    batchable: bool = False  # whether inputs may be stacked on dimension 0
    workers: int = 1  # threads running batches of this model at once
    inline_below_us: int = 200  # run on the caller's thread when calls are this fast; 0 = never


@dataclass
class BatchStats:
    """Counters in the shape of Triton's statistics extension (nanoseconds)."""

    inference_count: int = 0  # rows
    execution_count: int = 0  # model calls
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class Pending:
    """A queued request; the caller awaits ``future``."""

    __slots__ = ("cancelled", "enqueued", "future", "inputs", "loop", "rows")

    def __init__(
        self, inputs: Mapping[str, np.ndarray], loop: asyncio.AbstractEventLoop, rows: int
    ) -> None:
        self.inputs = inputs
        self.loop = loop
        self.future: asyncio.Future[Tensors] = loop.create_future()
        self.enqueued = time.perf_counter_ns()
        self.rows = rows
        self.cancelled = False

    def expire(self, error: BaseException) -> None:
        """Answer with ``error`` now (deadline passed); the worker skips it if not yet started."""
        if not self.future.done():
            self.cancelled = True
            self.future.set_exception(error)


_STOP = object()
ObserveFn = Callable[[int, int, int], None]  # rows in batch, queue ns, compute ns


class Batcher:
    """Feeds one model's ``run`` from a bounded queue on a dedicated thread."""

    def __init__(
        self,
        name: str,
        run: RunFn,
        config: BatcherConfig,
        observe: ObserveFn | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.stats = BatchStats()
        self._run = run
        self._observe = observe
        self._queue: queue.Queue[Pending | object] = queue.Queue(maxsize=config.max_queue)
        # Held while a single worker computes, so an inline call never overlaps with it.
        self._computing = threading.Lock()
        self._inline = config.workers == 1 and config.inline_below_us > 0
        self._call_ns = float("inf")  # moving average of one model call; unknown at first
        self._threads = [
            threading.Thread(target=self._work, name=f"batcher-{name}-{i}", daemon=True)
            for i in range(config.workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, inputs: Mapping[str, np.ndarray], rows: int) -> Pending:
        """Queue one request; await ``item.future``. Raises OverloadedError when full."""
        item = Pending(inputs, asyncio.get_running_loop(), rows)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise OverloadedError(
                f"model {self.name!r} has {self.config.max_queue} requests waiting; retry shortly",
                retry_after=1.0,
            ) from None
        return item

    def run_inline(self, inputs: Mapping[str, np.ndarray], rows: int) -> Tensors | None:
        """Run on the caller's thread if the model is fast and idle; None means "queue it"."""
        if (
            not self._inline
            or self._call_ns > self.config.inline_below_us * 1000
            or not self._queue.empty()
            or not self._computing.acquire(blocking=False)
        ):
            return None
        try:
            t0 = time.perf_counter_ns()
            try:
                result: Tensors | BaseException = self._run(inputs)
            except Exception as e:  # noqa: BLE001 — becomes this request's error
                result = _as_agent_error(self.name, e)
            self._record([rows], [result], t0, t0, time.perf_counter_ns() - t0, [t0])
        finally:
            self._computing.release()
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self, timeout: float = 5.0) -> None:  # seconds
        """Stop the workers after the queued requests; later submits are refused by the caller."""
        for _ in self._threads:
            self._queue.put(_STOP)
        for thread in self._threads:
            thread.join(timeout)

    # -- worker thread ---------------------------------------------------------------------

    def _work(self) -> None:
        pending: Pending | None = None
        while True:
            first = pending if pending is not None else self._queue.get()
            pending = None
            if first is _STOP:
                return
            assert isinstance(first, Pending)
            batch = [first]
            if self.config.batchable and self.config.max_batch_size > 1:
                pending, stop = self._gather(batch)
                if stop:
                    self._execute(batch)
                    return
            self._execute(batch)

    def _gather(self, batch: list[Pending]) -> tuple[Pending | None, bool]:
        """Add queued requests to ``batch`` while rows fit; return (left-over item, stop seen)."""
        rows = batch[0].rows
        deadline = time.perf_counter() + self.config.max_delay_us / 1e6
        while rows < self.config.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is _STOP:
                return None, True
            assert isinstance(item, Pending)
            if rows + item.rows > self.config.max_batch_size:
                return item, False
            batch.append(item)
            rows += item.rows
        return None, False

    def _execute(self, batch: list[Pending]) -> None:
        live = [item for item in batch if not item.cancelled]
        if not live:
            return
        started = time.perf_counter_ns()
        groups = _group_by_shape(live) if len(live) > 1 else [live]
        for group in groups:
            self._execute_group(group, started)

    def _execute_group(self, group: list[Pending], started: int) -> None:
        with self._computing if self._inline else contextlib.nullcontext():
            t0 = time.perf_counter_ns()
            try:
                if len(group) == 1:
                    results: list[Tensors | BaseException] = [self._run(group[0].inputs)]
                else:
                    results = _split(self._run(_stack(group)), group)
            except Exception as e:  # noqa: BLE001 — a runtime failure becomes each request's error
                results = self._isolate(group, e)
            compute = time.perf_counter_ns() - t0
        self._record(
            [item.rows for item in group],
            results,
            started,
            t0,
            compute,
            [item.enqueued for item in group],
        )
        try:
            group[0].loop.call_soon_threadsafe(_deliver, group, results)
        except RuntimeError:  # the caller's event loop has closed: nobody is waiting any more
            log.debug("dropping results for a closed event loop", extra={"model": self.name})

    def _record(
        self,
        rows: list[int],
        results: list[Tensors | BaseException],
        started: int,
        t0: int,
        compute: int,
        enqueued: list[int],
    ) -> None:
        """Statistics and metrics of one model call (all times in ns)."""
        now = time.perf_counter_ns()
        queue_ns = sum(started - e for e in enqueued)
        self._call_ns = (
            compute if self._call_ns == float("inf") else 0.8 * self._call_ns + 0.2 * compute
        )
        with self.stats.lock:
            s = self.stats
            s.execution_count += 1
            s.inference_count += sum(rows)
            s.compute_ns += compute
            s.queue_ns += queue_ns
            for result, since in zip(results, enqueued, strict=True):
                if isinstance(result, BaseException):
                    s.fail_count += 1
                    s.fail_ns += now - since
                else:
                    s.success_count += 1
                    s.success_ns += now - since
        if self._observe is not None:
            self._observe(sum(rows), queue_ns // len(rows), compute)

    def _isolate(self, group: list[Pending], error: Exception) -> list[Tensors | BaseException]:
        """A failed batch is retried request by request, so one bad input fails only itself."""
        if len(group) == 1:
            return [_as_agent_error(self.name, error)]
        out: list[Tensors | BaseException] = []
        for item in group:
            try:
                out.append(self._run(item.inputs))
            except Exception as e:  # noqa: BLE001 — reported to that request alone
                out.append(_as_agent_error(self.name, e))
        return out


def _as_agent_error(name: str, error: Exception) -> AgentError:
    if isinstance(error, AgentError):
        return error
    return InferenceError(f"model {name!r} failed: {error}")


def _deliver(group: list[Pending], results: list[Tensors | BaseException]) -> None:
    for item, result in zip(group, results, strict=True):
        if item.future.done():  # the request's deadline passed; it was answered elsewhere
            continue
        if isinstance(result, BaseException):
            item.future.set_exception(result)
        else:
            item.future.set_result(result)


def _shape_key(item: Pending) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    return tuple((k, v.dtype.str, v.shape[1:]) for k, v in item.inputs.items())


def _group_by_shape(items: list[Pending]) -> list[list[Pending]]:
    groups: dict[object, list[Pending]] = {}
    for item in items:
        groups.setdefault(_shape_key(item), []).append(item)
    return list(groups.values())


def _stack(group: list[Pending]) -> Tensors:
    names = group[0].inputs.keys()
    return {n: np.concatenate([item.inputs[n] for item in group], axis=0) for n in names}


def _split(outputs: Tensors, group: list[Pending]) -> list[Tensors | BaseException]:
    rows = sum(item.rows for item in group)
    bounds = np.cumsum([item.rows for item in group])[:-1]
    per_item: list[Tensors] = [{} for _ in group]
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise InferenceError(
                f"output {name!r} has shape {list(array.shape)}, not one row per input row; "
                "set the bundle's batchable to false"
            )
        for target, part in zip(per_item, np.split(array, bounds), strict=True):
            target[name] = part
    return list(per_item)
