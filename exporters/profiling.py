"""Size and latency of a source model and its export on this machine, same inputs, same threads."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from agent.errors import AgentError
from agent.runtimes import RuntimeOptions, get_backend
from exporters.errors import ExportError

__all__ = ["LatencyProfile", "ModelProfile", "ProfiledSource", "model_bytes", "profile"]

_WARMUP = 3  # untimed runs first: the first calls allocate arenas and compile kernels


@dataclass(frozen=True)
class LatencyProfile:
    """Latency of one batch, over ``runs`` timed runs."""

    p50_ms: float  # milliseconds
    p95_ms: float  # milliseconds
    runs: int


@dataclass(frozen=True)
class ModelProfile:
    source_bytes: int  # bytes of the source artefact (pickle, .pt, .onnx, ...)
    exported_bytes: int  # bytes of the exported model files (an IR's .xml and .bin together)
    source: LatencyProfile
    exported: LatencyProfile
    threads: int  # intra-op threads both models ran with
    batch: int = 1  # rows per timed run

    @property
    def size_ratio(self) -> float:
        """How many times smaller the export is than its source."""
        return self.source_bytes / self.exported_bytes if self.exported_bytes else 0.0

    @property
    def speedup(self) -> float:
        """Source median latency over exported median latency (above 1: the export is faster)."""
        return self.source.p50_ms / self.exported.p50_ms if self.exported.p50_ms else 0.0


class ProfiledSource(Protocol):
    """What profiling needs of a source model (``exporters.sources.SourceModel`` has it)."""

    @property
    def size_bytes(self) -> int: ...

    @property
    def predict(self) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]: ...


def profile(
    source: ProfiledSource,
    exported_model: Path,
    runtime: str,
    sample: Mapping[str, np.ndarray],
    *,
    threads: int = 1,
    runs: int = 50,
    batch: int = 1,
) -> ModelProfile:
    """Time ``runs`` batches of ``batch`` sample rows through the source and the exported model.

    The exported model is loaded on the CPU by the agent's own runtime layer with ``threads``
    intra-op threads; the source runs with its math libraries limited to the same count.
    """
    if runs < 1:
        raise ExportError(f"profile runs must be 1 or more, not {runs}")
    if batch < 1:
        raise ExportError(f"profile batch must be 1 or more rows, not {batch}")
    if threads < 1:
        raise ExportError(f"threads must be 1 or more, not {threads}")
    inputs = _batch(sample, batch)

    try:
        session = get_backend(runtime).load(
            exported_model, "CPU", RuntimeOptions(intra_op_threads=threads)
        )
    except AgentError as e:
        raise ExportError(f"cannot load {exported_model.name} to profile it: {e}") from e
    try:
        exported = _time(lambda: session.run(inputs), runs, exported_model.name)
    finally:
        session.close()
    with _thread_limit(threads):
        timed_source = _time(lambda: source.predict(inputs), runs, "the source model")

    return ModelProfile(
        source_bytes=source.size_bytes,
        exported_bytes=model_bytes(exported_model),
        source=timed_source,
        exported=exported,
        threads=threads,
        batch=batch,
    )


def model_bytes(model: Path) -> int:
    """Bytes on disk of a model: for OpenVINO IR the ``.xml`` and its ``.bin`` weights."""
    try:
        size = model.stat().st_size
        weights = model.with_suffix(".bin")
        if model.suffix.lower() == ".xml" and weights.is_file():
            size += weights.stat().st_size
    except OSError as e:
        raise ExportError(f"cannot read the size of {model}: {e.strerror or e}") from e
    return size


def _batch(sample: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    if not sample:
        raise ExportError("no sample inputs to profile with")
    inputs = {}
    for name, values in sample.items():
        array = np.asarray(values)
        if array.ndim == 0 or array.shape[0] == 0:
            raise ExportError(f"sample input {name!r} has no rows to profile with")
        # Fewer rows than a batch: repeat them, so every timed run does the same work.
        rows = np.arange(batch) % array.shape[0]
        inputs[name] = np.ascontiguousarray(array[rows])
    return inputs


def _time(run: Callable[[], object], runs: int, what: str) -> LatencyProfile:
    try:
        for _ in range(_WARMUP):
            run()
        times = np.empty(runs, dtype=np.float64)
        for i in range(runs):
            start = time.perf_counter_ns()
            run()
            times[i] = (time.perf_counter_ns() - start) / 1e6
    except (AgentError, ExportError) as e:
        raise ExportError(f"{what} failed while being profiled: {e}") from e
    p50, p95 = np.percentile(times, [50, 95])
    return LatencyProfile(p50_ms=float(p50), p95_ms=float(p95), runs=runs)


@contextlib.contextmanager
def _thread_limit(threads: int) -> Iterator[None]:
    """Limit the source framework's threads (BLAS/OpenMP, and PyTorch if loaded) for a while."""
    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
        except ImportError:  # scikit-learn brings threadpoolctl; without it, run unlimited
            pass
        else:
            stack.enter_context(threadpool_limits(limits=threads))
        torch = sys.modules.get("torch")
        if torch is not None:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            stack.callback(torch.set_num_threads, before)
        yield
