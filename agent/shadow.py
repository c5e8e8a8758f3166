"""A shadow: a challenger version run beside the primary on the same inputs, never answering.

After the primary answered a request, :meth:`Shadow.offer` hands the request's inputs and the
primary's outputs to a bounded queue and returns at once; a task on the event loop feeds them to
the shadow's own runner (its own batcher thread, never inline on the loop) and compares the two
answers row by row. A full queue skips the comparison and counts the skip: a shadow never slows
a caller down, and never answers one. Nothing a shadow does ends that task: an answer that
cannot be run or compared counts as the shadow's failure (logged once, with the reason), and a
task that ended anyway is started again by the next :meth:`Shadow.offer`.

What "agree" means depends on the outputs (:func:`agreement`): labels (integer, boolean or
string outputs) agree when equal; a model with only float outputs agrees within a tolerance
(``allclose``), or on the argmax of each row when the configuration says the scores are a
classifier's. The shadow's answers, failures and agreements are counted into its version's
telemetry with role ``shadow`` and the primary version as the champion.

Which shadows run is kept in ``<state_dir>/update/shadows.json`` (:class:`ShadowFile`) when a
desired state that names them commits, so that a restarted agent runs them again: the desired
state that named them counts as applied and is not delivered twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import AgentError, DeadlineExceededError, OverloadedError, StoreError
from agent.files import atomic_write
from agent.runner import ModelRunner
from protocol.manifest import DriftProfile, TensorSpec

__all__ = [
    "RunningShadow",
    "Shadow",
    "ShadowConfig",
    "ShadowCounts",
    "ShadowFile",
    "ShadowTelemetry",
    "agreement",
]

log = logging.getLogger(__name__)

Tensors = Mapping[str, np.ndarray]
Compare = Literal["auto", "argmax", "allclose"]

_FLOATS = frozenset({"FP16", "FP32", "FP64"})


@dataclass(frozen=True)
class ShadowConfig:
    queue: int = 64  # requests waiting for the shadow; more are skipped, never waited for
    deadline: float = 1.0  # seconds the shadow has for one request before it counts as failed
    compare: Compare = "auto"  # auto: labels if the model has any, else allclose
    rtol: float = 1e-3  # allclose: relative tolerance
    atol: float = 1e-4  # allclose: absolute tolerance


class ShadowTelemetry(Protocol):
    """Where a shadow's counts go: its version's telemetry with role ``shadow``."""

    def answered(self, seconds: float) -> None: ...

    def failed(self, *, timeout: bool) -> None: ...

    def compared(self, rows: int, agreed: int, champion: str) -> None: ...

    def observe(self, inputs: Tensors, outputs: Tensors, profile: DriftProfile | None) -> None: ...


@dataclass
class ShadowCounts:
    """What the shadow did since it was attached (shown in the agent's status)."""

    offered: int = 0  # requests handed to the queue
    skipped: int = 0  # requests not compared: the queue or the shadow's batcher was full
    answered: int = 0
    failed: int = 0
    compared: int = 0  # rows compared
    agreed: int = 0  # rows on which both answers agreed


@dataclass(frozen=True)
class _Offer:
    inputs: Tensors
    rows: int
    outputs: Tensors
    champion: str


class Shadow:
    """One shadow version of one model; owns its runner and closes it."""

    def __init__(
        self,
        runner: ModelRunner,
        primary_outputs: tuple[TensorSpec, ...],
        config: ShadowConfig,
        telemetry: ShadowTelemetry | None = None,
    ) -> None:
        self.runner = runner
        self.config = config
        self.counts = ShadowCounts()
        self._telemetry = telemetry
        self._outputs = _compared_outputs(primary_outputs, runner.manifest.outputs, config.compare)
        self._queue: asyncio.Queue[_Offer] = asyncio.Queue(maxsize=config.queue)
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._failure_logged = False

    @property
    def version(self) -> str:
        return self.runner.version

    @property
    def waiting(self) -> int:
        """Requests queued for the shadow."""
        return self._queue.qsize()

    def offer(self, inputs: Tensors, rows: int, outputs: Tensors, champion: str) -> bool:
        """Queue one answered request for comparison; False (and counted) when skipped.

        Called on the event loop right after the primary answered; costs a queue append.
        """
        if self._closed:
            return False
        self.counts.offered += 1
        # Before the queue: a full queue behind an ended task would otherwise never drain.
        if self._worker is None or self._worker.done():
            if self._worker is not None:
                ended = "cancelled" if self._worker.cancelled() else repr(self._worker.exception())
                log.warning(
                    "shadow comparisons had stopped; starting them again",
                    extra={"version": self.version, "reason": ended},
                )
            self._worker = asyncio.get_running_loop().create_task(self._work())
        try:
            self._queue.put_nowait(_Offer(inputs, rows, outputs, champion))
        except asyncio.QueueFull:
            self.counts.skipped += 1
            return False
        return True

    async def idle(self) -> None:
        """Wait until every queued request was compared (for tests and a clean close)."""
        await self._queue.join()

    async def close(self) -> None:
        """Stop comparing, let the runner finish what it has, and unload it."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        await self.runner.drain()
        self.runner.close()

    async def _work(self) -> None:
        while True:
            first = await self._queue.get()
            offers = [first]
            # Hand the runner every request waiting, so its batcher can batch them.
            while len(offers) < self.runner.manifest.max_batch_size and not self._queue.empty():
                offers.append(self._queue.get_nowait())
            try:
                done = await asyncio.gather(
                    *(self._compare(o) for o in offers), return_exceptions=True
                )
            finally:
                for _ in offers:
                    self._queue.task_done()
            for result in done:
                if isinstance(result, Exception):  # its telemetry failed: the next one may not
                    self._log_failure("shadow telemetry failed", result)

    async def _compare(self, offer: _Offer) -> None:
        started = time.perf_counter()
        try:
            answer = await self.runner.run(offer.inputs, offer.rows, self.config.deadline)
        except OverloadedError:
            self.counts.skipped += 1  # its batcher is full: not the version's failure
            return
        except AgentError as e:
            self._failed(timeout=isinstance(e, DeadlineExceededError))
            log.debug("shadow %s failed: %s", self.runner.version, e)
            return
        except Exception as e:  # noqa: BLE001 - whatever a shadow raises is its failure alone
            self._failed(timeout=False)
            self._log_failure("shadow failed to answer; counted as failed", e)
            return
        seconds = time.perf_counter() - started
        try:
            agreed = agreement(offer.outputs, answer, offer.rows, self._outputs, self.config)
        except Exception as e:  # noqa: BLE001 - an answer that cannot be compared is a failed one
            self._failed(timeout=False)
            self._log_failure("shadow answer cannot be compared; counted as failed", e)
            return
        self.counts.answered += 1
        self.counts.compared += offer.rows
        self.counts.agreed += agreed
        if self._telemetry is not None:
            self._telemetry.answered(seconds)
            self._telemetry.compared(offer.rows, agreed, offer.champion)
            # Its outputs' drift, counted like a primary's (off the loop, by the collector).
            self._telemetry.observe(offer.inputs, answer, self.runner.manifest.drift)

    def _failed(self, *, timeout: bool) -> None:
        self.counts.failed += 1
        if self._telemetry is not None:
            self._telemetry.failed(timeout=timeout)

    def _log_failure(self, message: str, error: Exception) -> None:
        # Once as a warning: the same fault repeats on every request and would flood the log.
        reason = f"{type(error).__name__}: {error}"
        extra = {"version": self.version, "reason": reason}
        if self._failure_logged:
            log.debug("%s: %s", message, reason, extra=extra)
            return
        self._failure_logged = True
        log.warning("%s: %s (repeats are logged at debug level)", message, reason, extra=extra)


def _compared_outputs(
    primary: tuple[TensorSpec, ...], shadow: tuple[TensorSpec, ...], compare: Compare
) -> tuple[tuple[str, str], ...]:
    """(output name, how) for every output both versions produce.

    Labels are compared when there are any (a classifier's scores then do not count); without
    labels, every float output by ``allclose`` or, when configured, by its argmax.
    """
    theirs = {t.name: t.datatype for t in shadow}
    shared = [t for t in primary if theirs.get(t.name) == t.datatype]
    labels = [t.name for t in shared if t.datatype not in _FLOATS]
    if labels and compare != "allclose":
        return tuple((name, "equal") for name in labels)
    how = "argmax" if compare == "argmax" else "allclose"
    return tuple((t.name, how if t.datatype in _FLOATS else "equal") for t in shared)


def agreement(
    primary: Tensors,
    shadow: Tensors,
    rows: int,
    outputs: tuple[tuple[str, str], ...],
    config: ShadowConfig,
) -> int:
    """How many of ``rows`` rows both answers agree on, over every compared output.

    Each output is read as ``rows`` rows of ``k`` values; a tensor whose first dimension is not
    ``rows`` (a model without a batch dimension) is one row, the same for every row. Outputs
    that do not read as the same ``k`` (other sizes, or other shapes such as ``(2, 3)`` against
    ``(6,)``) disagree on every row; with no output in common nothing agrees.
    """
    if not outputs or rows <= 0:
        return 0
    agree = np.ones(rows, dtype=bool)
    for name, how in outputs:
        a, b = primary.get(name), shadow.get(name)
        if a is None or b is None or a.size != b.size:
            return 0
        a2, b2 = _rows(a, rows), _rows(b, rows)
        if a2.shape != b2.shape:
            return 0
        if how == "equal":
            agree &= (a2 == b2).all(axis=1)
        elif how == "argmax":
            agree &= a2.argmax(axis=1) == b2.argmax(axis=1)
        else:
            close = np.isclose(b2, a2, rtol=config.rtol, atol=config.atol, equal_nan=True)
            agree &= close.all(axis=1)
    return int(agree.sum())


def _rows(array: np.ndarray, rows: int) -> np.ndarray:
    if array.ndim and array.shape[0] == rows:
        return array.reshape(rows, -1)
    return np.broadcast_to(array.reshape(1, -1), (rows, array.size))


class RunningShadow(BaseModel):
    """One shadow a committed desired state named: the version and the bundle it came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class _ShadowDocument(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal[1] = Field(default=1, alias="schema")
    models: dict[str, RunningShadow] = Field(default_factory=dict)


class ShadowFile:
    """``<state_dir>/update/shadows.json``: model -> the shadow it runs; one process owns it."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "update" / "shadows.json"

    def load(self) -> dict[str, RunningShadow]:
        """The recorded shadows; none when the file is missing or damaged (logged)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            log.warning("cannot read the shadow list %s: %s", self.path, e.strerror or e)
            return {}
        try:
            return dict(_ShadowDocument.model_validate_json(raw).models)
        except ValidationError as e:
            log.warning("ignoring the damaged shadow list %s: %s", self.path, e.errors()[0])
            return {}

    def save(self, models: Mapping[str, RunningShadow]) -> None:
        """Replace the list; raises :class:`StoreError`."""
        document = _ShadowDocument(models=dict(models))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, document.model_dump_json(by_alias=True, indent=2).encode())
        except OSError as e:
            raise StoreError(
                f"cannot write the shadow list {self.path}: {e.strerror or e}; free disk space "
                "or check the permissions of the state directory"
            ) from e
