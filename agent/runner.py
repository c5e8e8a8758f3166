"""One loaded model version on its resolved device, fed by its own batcher."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from agent.batcher import Batcher, BatcherConfig, ObserveFn, Pending
from agent.devices import Resolution
from agent.errors import DeadlineExceededError
from protocol.manifest import Manifest

__all__ = ["ModelRunner", "RunnerConfig"]

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class RunnerConfig:
    max_delay_us: int = 0  # microseconds a batch may wait to fill
    max_queue: int = 256  # requests waiting per model version
    drain_timeout: float = 10.0  # seconds an old version may take to finish in-flight requests
    workers: int = 1  # threads running batches of one model version at once
    inline_below_us: int = 200  # µs; faster models run on the event loop when idle (0 = never)


class ModelRunner:
    """Runs requests on one model version; counts what is in flight so a swap can drain it."""

    def __init__(
        self,
        manifest: Manifest,
        resolution: Resolution,
        config: RunnerConfig,
        observe: ObserveFn | None = None,
    ) -> None:
        self.manifest = manifest
        self.resolution = resolution
        self.config = config
        self.batcher = Batcher(
            f"{manifest.name}@{manifest.version}",
            resolution.session.run,
            BatcherConfig(
                max_batch_size=manifest.max_batch_size,
                max_delay_us=config.max_delay_us,
                max_queue=config.max_queue,
                batchable=manifest.batchable,
                workers=config.workers,
                inline_below_us=config.inline_below_us,
            ),
            observe,
        )
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def device(self) -> str:
        return self.resolution.device

    @property
    def inflight(self) -> int:
        return self._inflight

    async def run(self, inputs: Mapping[str, np.ndarray], rows: int, deadline: float) -> Tensors:
        """Run one request; raises DeadlineExceededError after ``deadline`` seconds."""
        self._inflight += 1
        self._idle.clear()
        try:
            answer = self.batcher.run_inline(inputs, rows)
            if answer is not None:
                return answer
            item = self.batcher.submit(inputs, rows)
            timer = item.loop.call_later(deadline, _expire, item, self.name, deadline)
            try:
                return await item.future
            finally:
                timer.cancel()
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def drain(self) -> bool:
        """Wait until no request is in flight; False if the drain timeout passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.batcher.close()
        self.resolution.session.close()


def _expire(item: Pending, name: str, deadline: float) -> None:
    item.expire(
        DeadlineExceededError(f"model {name!r} did not answer within {deadline * 1000:.0f} ms")
    )
