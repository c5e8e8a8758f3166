"""ONNX Runtime backend: devices map to execution providers, and the provider that actually
runs the model is checked after loading, because ONNX Runtime falls back to CPU silently.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from agent.errors import DeviceUnavailableError, InferenceError, ModelLoadError
from agent.runtimes.base import RuntimeOptions
from protocol.manifest import TensorSpec

__all__ = ["PROVIDERS", "OnnxBackend", "OnnxSession", "verify_provider"]

# Execution providers per device, most preferred first; only those this build of ONNX Runtime
# has are tried. TensorRT is left out: it builds an engine per input shape at load time, which
# takes minutes on a small device and belongs in the export step, not in device resolution.
PROVIDERS: dict[str, tuple[str, ...]] = {
    "CPU": ("CPUExecutionProvider",),
    "GPU": (
        "CUDAExecutionProvider",
        "ROCMExecutionProvider",
        "MIGraphXExecutionProvider",
        "DmlExecutionProvider",
        "CoreMLExecutionProvider",
        "WebGpuExecutionProvider",
    ),
    "NPU": (
        "QNNExecutionProvider",
        "VitisAIExecutionProvider",
        "OpenVINOExecutionProvider",
        "CANNExecutionProvider",
        "NnapiExecutionProvider",
    ),
}

_DATATYPES = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}

# ONNX Runtime's allocators live in its process-wide environment: one bounded CPU arena is
# registered once and shared by every CPU session, so all models together stay under the
# limit set by the first load.
_arena_lock = threading.Lock()
_arena_limit_mb: int | None = None


def _shared_cpu_arena(limit_mb: int) -> None:
    global _arena_limit_mb
    with _arena_lock:
        if _arena_limit_mb is not None:
            return
        memory = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        # Extend strategy 1 is kSameAsRequested: grow by what a run needs, not by powers of two.
        config = ort.OrtArenaCfg({"max_mem": limit_mb << 20, "arena_extend_strategy": 1})
        ort.create_and_register_allocator(memory, config)
        _arena_limit_mb = limit_mb


def _provider_options(provider: str, device: str) -> dict[str, str]:
    if provider == "OpenVINOExecutionProvider":
        return {"device_type": device}
    if provider == "QNNExecutionProvider":
        return {"backend_path": "QnnHtp.dll" if sys.platform == "win32" else "libQnnHtp.so"}
    if provider in ("CUDAExecutionProvider", "ROCMExecutionProvider"):
        return {"arena_extend_strategy": "kSameAsRequested"}
    return {}


def _session_options(options: RuntimeOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn a core while waiting for work; an idle agent must use ≈0% CPU.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if options.arena_limit_mb > 0:
        _shared_cpu_arena(options.arena_limit_mb)
        so.add_session_config_entry("session.use_env_allocators", "1")
    else:
        so.enable_cpu_mem_arena = False
    return so


def _spec(arg: ort.NodeArg, model: str) -> TensorSpec:
    datatype = _DATATYPES.get(arg.type)
    if datatype is None:
        hint = ""
        if arg.type.startswith(("seq(", "map(")):
            hint = (
                "; this is a scikit-learn classifier exported with ZipMap: export it again with "
                "zipmap disabled (skl2onnx: options={id(model): {'zipmap': False}})"
            )
        raise ModelLoadError(
            f"{model}: tensor {arg.name!r} has type {arg.type}, which the agent cannot serve "
            f"(it serves tensors of {', '.join(sorted(set(_DATATYPES.values())))}){hint}"
        )
    # Symbolic ("batch"), unknown (None) and non-positive dims are all dynamic.
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(name=arg.name, datatype=datatype, shape=shape)  # type: ignore[arg-type]


def verify_provider(sess: ort.InferenceSession, provider: str, device: str) -> None:
    """Raise :class:`DeviceUnavailableError` unless ``provider`` really runs ``sess``.

    ONNX Runtime goes on with the next provider in its list, usually CPU, when one fails to
    initialise, and says so only in a log line.
    """
    chosen = sess.get_providers()[0]
    if chosen != provider:
        raise DeviceUnavailableError(
            f"{provider} did not initialise for {device}; ONNX Runtime fell back to {chosen}"
        )


class OnnxSession:
    """One ``onnxruntime.InferenceSession`` on a checked device."""

    runtime = "onnxruntime"

    def __init__(self, sess: ort.InferenceSession, device: str, model: str) -> None:
        self.device = device
        self.provider: str = sess.get_providers()[0]
        self.inputs = tuple(_spec(a, model) for a in sess.get_inputs())
        self.outputs = tuple(_spec(a, model) for a in sess.get_outputs())
        self._run: Callable[[list[str], Mapping[str, np.ndarray]], list[np.ndarray]] = sess.run
        self._output_names = [t.name for t in self.outputs]
        self._model = model

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; ONNX Runtime's errors become :class:`InferenceError`."""
        # The hot path: the caller's dict goes straight to ONNX Runtime.
        try:
            values = self._run(self._output_names, inputs)
        except Exception as e:
            raise InferenceError(
                f"{self._model} failed in ONNX Runtime on {self.device}: {e}"
            ) from e
        return dict(zip(self._output_names, values, strict=True))

    def close(self) -> None:
        # Dropping the bound method drops the last reference to the session, which frees it.
        model = self._model

        def closed(*_: object) -> list[np.ndarray]:
            raise RuntimeError(f"the session for {model} is closed")

        self._run = closed


class OnnxBackend:
    """ONNX Runtime with execution providers chosen per device (CPU, GPU, NPU)."""

    name = "onnxruntime"

    def devices(self) -> list[str]:
        available = set(ort.get_available_providers())
        return [d for d, providers in PROVIDERS.items() if available.intersection(providers)]

    def load(self, model_path: Path, device: str, options: RuntimeOptions) -> OnnxSession:
        device = device.upper()
        if device not in PROVIDERS:
            raise DeviceUnavailableError(
                f"unknown device {device!r}; ONNX Runtime serves {', '.join(PROVIDERS)}"
            )
        if not model_path.is_file():
            raise ModelLoadError(f"model file {model_path} does not exist")
        available = ort.get_available_providers()
        candidates = [p for p in PROVIDERS[device] if p in available]
        if not candidates:
            raise DeviceUnavailableError(
                f"this ONNX Runtime build has no execution provider for {device} "
                f"(it wants one of {', '.join(PROVIDERS[device])}; this build has "
                f"{', '.join(available)})"
            )
        so = _session_options(options)
        failures: list[str] = []
        for provider in candidates:
            providers: list[str | tuple[str, dict[str, str]]] = [
                (provider, _provider_options(provider, device))
            ]
            if provider != "CPUExecutionProvider":
                # Nodes the accelerator lacks run on CPU; the session is still on `device`.
                providers.append("CPUExecutionProvider")
            try:
                sess = ort.InferenceSession(str(model_path), so, providers=providers)
            except Exception as e:
                if provider == "CPUExecutionProvider":
                    raise ModelLoadError(f"ONNX Runtime cannot load {model_path.name}: {e}") from e
                failures.append(f"{provider}: {e}")
                continue
            try:
                verify_provider(sess, provider, device)
            except DeviceUnavailableError as e:
                failures.append(str(e))
                continue
            return OnnxSession(sess, device, model_path.name)
        raise DeviceUnavailableError(
            f"{model_path.name} cannot run on {device} with ONNX Runtime: " + "; ".join(failures)
        )
