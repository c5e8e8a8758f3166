"""Purpose-built fakes of the agent's own Protocols (never of a library)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import numpy as np

from agent.devices import Resolution
from agent.runner import ModelRunner, RunnerConfig
from protocol.manifest import FileEntry, Manifest, TensorSpec

X = TensorSpec(name="x", datatype="FP32", shape=(-1, 3))
Y = TensorSpec(name="y", datatype="FP32", shape=(-1, 3))


class FakeSession:
    """Computes ``y = x * factor``; can fail, or stall, on demand."""

    runtime = "fake"
    device = "CPU"
    inputs = (X,)
    outputs = (Y,)

    def __init__(self, factor: float = 2.0, *, fail: bool = False, delay: float = 0.0) -> None:
        self.factor = factor
        self.fail = fail
        self.delay = delay  # seconds each call takes
        self.calls = 0
        self.closed = False
        self._lock = threading.Lock()

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("kernel exploded")
        return {"y": (inputs["x"] * self.factor).astype(np.float32)}

    def close(self) -> None:
        self.closed = True


def manifest(name: str = "m", version: str = "1.0.0", *, batchable: bool = True) -> Manifest:
    return Manifest(
        name=name,
        version=version,
        runtime="onnxruntime",
        model_file="model.onnx",
        files=(FileEntry(path="model.onnx", sha256="0" * 64, size=1),),
        inputs=(X,),
        outputs=(Y,),
        max_batch_size=8 if batchable else 1,
        batchable=batchable,
    )


def runner(
    session: FakeSession,
    name: str = "m",
    version: str = "1.0.0",
    *,
    batchable: bool = True,
    config: RunnerConfig | None = None,
) -> ModelRunner:
    resolution = Resolution(session=session, requested=("CPU",), device="CPU", skipped=())
    return ModelRunner(
        manifest(name, version, batchable=batchable),
        resolution,
        config or RunnerConfig(drain_timeout=5),
    )
