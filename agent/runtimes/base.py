"""The interface every runtime backend implements: load a bundle's model on a device, run it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from protocol.manifest import TensorSpec

__all__ = ["Backend", "RuntimeOptions", "Session"]


@dataclass(frozen=True)
class RuntimeOptions:
    """Small-device defaults for every backend; each limit carries its unit."""

    intra_op_threads: int = 1  # threads per inference
    inter_op_threads: int = 1  # threads across graph branches
    arena_limit_mb: int = 1024  # MiB; bounds ONNX Runtime's CPU arena (shared by all models)
    openvino_cache_dir: Path | None = None  # compiled-model cache; None disables it
    openvino_hint: str = "LATENCY"


class Session(Protocol):
    """A model loaded on one device, ready to run."""

    runtime: str
    device: str  # the device actually used, as checked after loading ("CPU", "GPU", "NPU")
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Raises :class:`agent.errors.InferenceError` on failure."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    """One runtime (ONNX Runtime, OpenVINO, LiteRT), imported only when a bundle needs it."""

    name: str

    def devices(self) -> list[str]:
        """The devices this runtime can see on this host, e.g. ``["CPU", "GPU"]``."""
        ...

    def load(self, model_path: Path, device: str, options: RuntimeOptions) -> Session:
        """Load ``model_path`` on ``device``.

        Raises :class:`~agent.errors.DeviceUnavailableError` when the device is absent or the
        runtime silently chose another one, :class:`~agent.errors.ModelLoadError` otherwise.
        """
        ...
