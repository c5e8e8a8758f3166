"""LiteRT (TensorFlow Lite) backend, on CPU.

Imports ``ai-edge-litert``; ``tflite-runtime`` only when that is missing, since tflite-runtime
breaks on NumPy 2. GPU and NPU delegates are not wired in: those devices report unavailable, so
device resolution moves on to CPU.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import DeviceUnavailableError, InferenceError, ModelLoadError
from agent.runtimes.base import RuntimeOptions
from protocol.datatypes import datatype_of
from protocol.manifest import TensorSpec

__all__ = ["LiteRTBackend", "LiteRTSession"]


def _interpreter_class() -> Any:
    try:
        module = importlib.import_module("ai_edge_litert.interpreter")
    except ImportError:
        module = importlib.import_module("tflite_runtime.interpreter")
    return module.Interpreter


# Imported with this module so that a missing package surfaces in get_backend(), not at load.
_Interpreter = _interpreter_class()


def _spec(detail: Mapping[str, Any], model: str) -> TensorSpec:
    name = str(detail["name"])
    try:
        datatype = datatype_of(np.dtype(detail["dtype"]))
    except (KeyError, TypeError) as e:
        raise ModelLoadError(
            f"{model}: tensor {name!r} has type {detail['dtype']}, which the agent cannot serve"
        ) from e
    # shape_signature keeps -1 for dynamic dims; shape holds the current (resized) value.
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    shape = tuple(int(d) if d > 0 else -1 for d in dims)
    return TensorSpec(name=name, datatype=datatype, shape=shape)  # type: ignore[arg-type]


class LiteRTSession:
    """One interpreter; runs are serialised by a lock because an interpreter is not re-entrant."""

    runtime = "litert"
    device = "CPU"

    def __init__(self, interpreter: Any, model: str) -> None:
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
        self.inputs = tuple(_spec(d, model) for d in inputs)
        self.outputs = tuple(_spec(d, model) for d in outputs)
        self._interpreter: Any = interpreter
        self._model = model
        self._lock = threading.Lock()
        self._input_index = [(str(d["name"]), int(d["index"])) for d in inputs]
        self._output_index = [(str(d["name"]), int(d["index"])) for d in outputs]
        # The shape each input is allocated for; a request of another shape resizes first.
        self._allocated: dict[int, tuple[int, ...]] = {
            int(d["index"]): tuple(int(x) for x in d["shape"]) for d in inputs
        }

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch, resizing the interpreter when the batch shape changed."""
        with self._lock:
            interpreter = self._interpreter
            if interpreter is None:
                raise InferenceError(f"the session for {self._model} is closed")
            feed = []
            for name, index in self._input_index:
                array = inputs.get(name)
                if array is None:
                    raise InferenceError(f"{self._model}: input {name!r} is missing")
                feed.append((name, index, array))
            try:
                self._resize(interpreter, feed)
            except Exception as e:
                self._allocated.clear()  # a half-done resize: resize again next time
                raise InferenceError(
                    f"{self._model}: LiteRT cannot take inputs of shapes "
                    f"{ {n: list(a.shape) for n, _, a in feed} }: {e}"
                ) from e
            step = "invoke"
            try:
                for name, index, array in feed:
                    step = f"input {name!r}"
                    interpreter.set_tensor(index, array)
                step = "invoke"
                interpreter.invoke()
                return {n: interpreter.get_tensor(i) for n, i in self._output_index}
            except Exception as e:
                raise InferenceError(f"{self._model} failed in LiteRT ({step}): {e}") from e

    def _resize(self, interpreter: Any, feed: list[tuple[str, int, np.ndarray]]) -> None:
        resized = False
        for _, index, array in feed:
            if self._allocated.get(index) != array.shape:
                # strict: only dimensions the model declares dynamic (-1) may change.
                interpreter.resize_tensor_input(index, array.shape, strict=True)
                resized = True
        if resized:
            interpreter.allocate_tensors()
            for _, index, array in feed:
                self._allocated[index] = array.shape

    def close(self) -> None:
        with self._lock:
            self._interpreter = None


class LiteRTBackend:
    """LiteRT on the CPU (XNNPACK for float models)."""

    name = "litert"

    def devices(self) -> list[str]:
        return ["CPU"]

    def load(self, model_path: Path, device: str, options: RuntimeOptions) -> LiteRTSession:
        device = device.upper()
        if device != "CPU":
            raise DeviceUnavailableError(
                f"LiteRT runs on CPU in this agent; no {device} delegate is configured"
            )
        if not model_path.is_file():
            raise ModelLoadError(f"model file {model_path} does not exist")
        try:
            interpreter = _Interpreter(
                model_path=str(model_path), num_threads=options.intra_op_threads
            )
            interpreter.allocate_tensors()
        except Exception as e:
            raise ModelLoadError(f"LiteRT cannot load {model_path.name}: {e}") from e
        return LiteRTSession(interpreter, model_path.name)
