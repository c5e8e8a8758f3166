"""OpenVINO backend: one named device per load (never AUTO), checked after compiling.

OpenVINO's ``AUTO:NPU,GPU,CPU`` fails outright when a plugin is absent and hides which device
it picked, so device choice stays with :mod:`agent.devices`; here a model is compiled for the
one device asked for, and ``EXECUTION_DEVICES`` must name that device.
"""

from __future__ import annotations

import queue
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from agent.errors import DeviceUnavailableError, InferenceError, ModelLoadError
from agent.runtimes.base import RuntimeOptions
from protocol.manifest import TensorSpec

__all__ = ["OpenVINOBackend", "OpenVINOSession"]

_DEVICES = ("CPU", "GPU", "NPU")

_DATATYPES = {
    "f32": "FP32",
    "f64": "FP64",
    "f16": "FP16",
    "i8": "INT8",
    "i16": "INT16",
    "i32": "INT32",
    "i64": "INT64",
    "u8": "UINT8",
    "u16": "UINT16",
    "u32": "UINT32",
    "u64": "UINT64",
    "boolean": "BOOL",
    "string": "BYTES",
}


def _plain(device: str) -> str:
    """``GPU.0`` → ``GPU``: OpenVINO numbers devices of a kind; the agent names the kind."""
    return device.split(".", 1)[0].upper()


def _reason(error: Exception) -> str:
    """OpenVINO's messages carry a trace of C++ source locations; the last line says why."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _spec(port: Any, model: str) -> TensorSpec:
    try:
        name = port.get_any_name()
    except RuntimeError as e:
        raise ModelLoadError(f"{model}: a model input or output has no tensor name") from e
    element = port.get_element_type().get_type_name()
    datatype = _DATATYPES.get(element)
    if datatype is None:
        raise ModelLoadError(
            f"{model}: tensor {name!r} has element type {element}, which the agent cannot serve"
        )
    shape = port.get_partial_shape()
    if shape.rank.is_dynamic:
        raise ModelLoadError(f"{model}: tensor {name!r} has no fixed rank; reshape the model")
    dims = tuple(-1 if d.is_dynamic else d.get_length() for d in shape)
    return TensorSpec(name=name, datatype=datatype, shape=dims)  # type: ignore[arg-type]


class OpenVINOSession:
    """A compiled model and a small pool of infer requests, safe to run from several threads."""

    runtime = "openvino"

    def __init__(self, compiled: Any, model: Any, device: str, name: str) -> None:
        self.device = device
        # Names and shapes come from the model as read: compiling may fold a result's producer
        # away and leave the port with extra tensor names.
        self.inputs = tuple(_spec(p, name) for p in model.inputs)
        self.outputs = tuple(_spec(p, name) for p in model.outputs)
        self._compiled: Any = compiled
        self._model = name
        self._output_names = [t.name for t in self.outputs]
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch on an idle infer request (a new one when all are busy)."""
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self._new_request()
        try:
            # share_outputs=False copies the results out, so the request can be reused at once.
            feed = inputs if isinstance(inputs, dict) else dict(inputs)
            results = request.infer(feed, share_inputs=True, share_outputs=False)
            values = results.to_tuple()
        except Exception as e:
            raise InferenceError(
                f"{self._model} failed in OpenVINO on {self.device}: {_reason(e)}"
            ) from e
        finally:
            self._idle.put(request)
        return dict(zip(self._output_names, values, strict=True))

    def _new_request(self) -> Any:
        if self._compiled is None:
            raise InferenceError(f"the session for {self._model} is closed")
        return self._compiled.create_infer_request()

    def close(self) -> None:
        self._compiled = None
        while not self._idle.empty():
            self._idle.get_nowait()


class OpenVINOBackend:
    """OpenVINO on CPU, GPU or NPU, with the compiled-model cache when configured."""

    name = "openvino"

    def __init__(self, core: Any = None) -> None:
        # One Core can be shared by several backends; it holds the plugins and their caches.
        self._core: Any = core if core is not None else ov.Core()

    def devices(self) -> list[str]:
        seen = [_plain(d) for d in self._core.available_devices]
        return [d for d in _DEVICES if d in seen]

    def load(self, model_path: Path, device: str, options: RuntimeOptions) -> OpenVINOSession:
        device = device.upper()
        available = self.devices()
        if device not in available:
            raise DeviceUnavailableError(
                f"OpenVINO sees no {device} on this host (it has {', '.join(available) or 'none'})"
            )
        if not model_path.is_file():
            raise ModelLoadError(f"model file {model_path} does not exist")
        config: dict[str, Any] = {"PERFORMANCE_HINT": options.openvino_hint}
        if options.openvino_cache_dir is not None:
            config["CACHE_DIR"] = str(options.openvino_cache_dir)
        if device == "CPU":
            config["INFERENCE_NUM_THREADS"] = options.intra_op_threads
        try:
            model = self._core.read_model(str(model_path))
        except Exception as e:
            raise ModelLoadError(f"OpenVINO cannot read {model_path.name}: {_reason(e)}") from e
        try:
            compiled = self._core.compile_model(model, device, config)
        except Exception as e:
            raise ModelLoadError(
                f"OpenVINO cannot compile {model_path.name} for {device}: {_reason(e)}"
            ) from e
        used = [_plain(str(d)) for d in compiled.get_property("EXECUTION_DEVICES")]
        if used != [device]:
            raise DeviceUnavailableError(
                f"OpenVINO compiled {model_path.name} for {', '.join(used) or 'no device'} "
                f"instead of {device}"
            )
        return OpenVINOSession(compiled, model, device, model_path.name)
