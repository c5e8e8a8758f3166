"""A served model: the primary version, the pinned fallback, the circuit between them.

Requests go to the primary under a deadline. If the primary is not loaded, raises, misses its
deadline, or its circuit is open, the fallback answers and the answer says so. A new version is
swapped in only after it loaded, warmed up and passed its self-test; the old one drains first.
Each request is also counted against the primary's version (answered with its latency, failed,
answered by the fallback) so that probation can compare a new version with the one before.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter

from agent.circuit import CircuitBreaker, CircuitState
from agent.errors import (
    AgentError,
    DeadlineExceededError,
    ModelLoadError,
    ModelNotReadyError,
    OverloadedError,
)
from agent.metrics import AgentMetrics
from agent.runner import ModelRunner
from agent.shadow import Shadow
from agent.telemetry.collector import TelemetryCollector, VersionTelemetry
from agent.windows import VersionCounter
from protocol.manifest import TensorSpec

__all__ = ["Answer", "ServedModel", "ServingConfig", "check_fallback_compatible"]

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class ServingConfig:
    deadline: float = 1.0  # seconds the primary has to answer one request
    circuit_failures: int = 5  # consecutive primary failures that open the circuit
    circuit_reset: float = 10.0  # seconds before an open circuit lets one trial through
    result_cache_entries: int = 0  # answers kept for repeated inputs; 0 disables the cache


@dataclass(frozen=True)
class Answer:
    outputs: Mapping[str, np.ndarray]
    output_specs: tuple[TensorSpec, ...]
    model_name: str
    model_version: str
    fallback: bool
    reason: str | None = None  # why the fallback answered


class ServedModel:
    """Everything that answers requests for one model name."""

    def __init__(
        self,
        name: str,
        config: ServingConfig,
        metrics: AgentMetrics,
        *,
        primary: ModelRunner | None,
        fallback: ModelRunner | None = None,
        load_error: str | None = None,
        telemetry: TelemetryCollector | None = None,
    ) -> None:
        if primary is None and fallback is None:
            raise ModelNotReadyError(f"model {name!r} has neither a primary nor a fallback loaded")
        self.name = name
        self.config = config
        self.primary = primary
        self.fallback = fallback
        self.load_error = load_error
        self.circuit = CircuitBreaker(config.circuit_failures, config.circuit_reset)
        self._metrics = metrics
        self._cache: OrderedDict[bytes, Answer] = OrderedDict()
        self._latency = metrics.request_seconds.labels(name)
        self._answered = self._answered_by(primary)
        self._window = self._window_of(primary)
        self._collector = telemetry if telemetry is not None and telemetry.enabled else None
        self._telemetry = self._telemetry_of(primary)
        self._circuit_gauge = metrics.circuit_open.labels(name)
        self._circuit_was_open = False
        # A challenger fed the primary's answered requests off the request path (agent/shadow.py).
        self.shadow: Shadow | None = None

    @property
    def serving(self) -> ModelRunner:
        """The runner whose signature and version the API shows."""
        runner = self.primary or self.fallback
        assert runner is not None
        return runner

    @property
    def versions(self) -> tuple[str, ...]:
        return (self.serving.version,)

    def _answered_by(self, primary: ModelRunner | None) -> Counter | None:
        """The primary's request counter, looked up once per version instead of per request."""
        if primary is None:
            return None
        return self._metrics.requests.labels(self.name, primary.version, "false")

    def _window_of(self, primary: ModelRunner | None) -> VersionCounter | None:
        """The primary's probation counter, looked up once per version like its Counter."""
        if primary is None:
            return None
        return self._metrics.windows.counter(self.name, primary.version)

    def _telemetry_of(self, primary: ModelRunner | None) -> VersionTelemetry | None:
        """The primary's telemetry window, looked up once per version like its Counter."""
        if primary is None or self._collector is None:
            return None
        telemetry = self._collector.version(self.name, primary.version)
        telemetry.device = primary.device
        return telemetry

    def observe_latency(self, seconds: float) -> None:
        self._latency.observe(seconds)

    async def infer(self, inputs: Mapping[str, np.ndarray], rows: int) -> Answer:
        key = self._cache_key(inputs) if self.config.result_cache_entries else None
        if key is not None and (hit := self._cache.get(key)) is not None:
            self._cache.move_to_end(key)
            return hit
        answer = await self._infer(inputs, rows)
        if key is not None and not answer.fallback:
            self._cache[key] = answer
            if len(self._cache) > self.config.result_cache_entries:
                self._cache.popitem(last=False)
        return answer

    async def _infer(self, inputs: Mapping[str, np.ndarray], rows: int) -> Answer:
        # Taken together: a swap during this request must not move its count to the new version.
        primary, answered, window = self.primary, self._answered, self._window
        telemetry = self._telemetry
        error: AgentError
        if primary is None:
            reason = "primary_not_loaded"
            error = ModelNotReadyError(f"model {self.name!r} failed to load: {self.load_error}")
        elif self.fallback is not None and not self.circuit.allow():
            # Without a fallback an open circuit would only turn requests away.
            reason = "circuit_open"
            error = ModelNotReadyError(f"model {self.name!r} is failing; its circuit is open")
            # Its own failures opened the circuit: for probation the version failed this one too.
            assert window is not None  # set with every primary
            window.failed(time.perf_counter())
            if telemetry is not None:
                telemetry.failed(timeout=False)
        else:
            started = time.perf_counter()
            try:
                outputs = await primary.run(inputs, rows, self.config.deadline)
            except OverloadedError:
                raise  # a full queue is back-pressure, not a model failure
            except DeadlineExceededError as e:
                reason, error = "deadline", e
                self._record_failure(reason, window, telemetry)
            except AgentError as e:
                reason, error = "error", e
                self._record_failure(reason, window, telemetry)
            else:
                finished = time.perf_counter()
                self.circuit.record_success()
                if self._circuit_was_open:
                    self._circuit_was_open = False
                    self._circuit_gauge.set(0)
                assert answered is not None  # set with every primary
                assert window is not None
                answered.inc()
                window.answered(finished - started, finished)
                if telemetry is not None:
                    telemetry.answered(finished - started)
                    telemetry.observe(inputs, outputs, primary.manifest.drift)
                if self.shadow is not None:
                    self.shadow.offer(inputs, rows, outputs, primary.version)
                return Answer(outputs, primary.manifest.outputs, self.name, primary.version, False)
        fallback = self.fallback
        if fallback is None:
            raise error
        log.debug("fallback answers %s: %s", self.name, reason)
        outputs = await fallback.run(inputs, rows, self.config.deadline)
        self._metrics.fallbacks.labels(self.name, reason).inc()
        self._metrics.requests.labels(fallback.name, fallback.version, "true").inc()
        if window is not None:
            window.fell_back()
        if telemetry is not None:
            telemetry.fell_back()
        return Answer(
            outputs, fallback.manifest.outputs, fallback.name, fallback.version, True, reason
        )

    def _record_failure(
        self,
        reason: str,
        window: VersionCounter | None,
        telemetry: VersionTelemetry | None = None,
    ) -> None:
        self._metrics.failures.labels(self.name, reason).inc()
        if window is not None:
            window.failed(time.perf_counter())
        if telemetry is not None:
            telemetry.failed(timeout=reason == "deadline")
        self.circuit.record_failure()
        if self.circuit.state is CircuitState.OPEN:
            self._circuit_was_open = True
            self._circuit_gauge.set(1)

    async def swap(self, runner: ModelRunner) -> None:
        """Make ``runner`` the primary, then drain and unload the old one.

        ``runner`` has already loaded, warmed up and passed its self-test.
        """
        if self.fallback is not None:
            check_fallback_compatible(
                runner.manifest.inputs, runner.manifest.outputs, self.fallback
            )
        old, self.primary = self.primary, runner
        self._answered = self._answered_by(runner)
        self._window = self._window_of(runner)
        self._telemetry = self._telemetry_of(runner)
        self.load_error = None
        self.circuit.record_success()
        self._cache.clear()
        log.info(
            "model switched",
            extra={"model": self.name, "version": runner.version, "device": runner.device},
        )
        if old is not None:
            if not await old.drain():
                log.warning(
                    "old version still busy after drain timeout; unloading",
                    extra={"model": self.name, "version": old.version},
                )
            old.close()

    def close(self) -> None:
        if self.primary is not None:
            self.primary.close()

    @staticmethod
    def _cache_key(inputs: Mapping[str, np.ndarray]) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for name, array in inputs.items():
            h.update(name.encode())
            h.update(array.dtype.str.encode())
            h.update(repr(array.shape).encode())
            h.update(np.ascontiguousarray(array).data)
        return h.digest()


def check_fallback_compatible(
    inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], fallback: ModelRunner
) -> None:
    """The fallback must accept the primary's inputs and produce the primary's outputs."""
    theirs = {t.name: t for t in fallback.manifest.inputs}
    for spec in inputs:
        other = theirs.get(spec.name)
        if other is None or other.datatype != spec.datatype:
            raise ModelLoadError(
                f"fallback {fallback.name}@{fallback.version} cannot stand in: input "
                f"{spec.name!r} ({spec.datatype}) is "
                + ("missing" if other is None else f"{other.datatype} there")
            )
    produced = {t.name: t.datatype for t in fallback.manifest.outputs}
    for spec in outputs:
        if produced.get(spec.name) != spec.datatype:
            raise ModelLoadError(
                f"fallback {fallback.name}@{fallback.version} cannot stand in: it does not "
                f"produce output {spec.name!r} as {spec.datatype}"
            )
