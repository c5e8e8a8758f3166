"""Runtime backends (ONNX Runtime, OpenVINO, LiteRT) behind one interface, imported on demand.

A device carries only the runtimes its bundles use: :func:`get_backend` imports a backend's
module, and with it the runtime package, the first time a bundle asks for it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from agent.errors import ModelLoadError
from agent.runtimes.base import Backend, RuntimeOptions, Session

__all__ = ["RUNTIMES", "Backend", "RuntimeOptions", "Session", "get_backend", "runtime_for_path"]

RUNTIMES = ("onnxruntime", "openvino", "litert")

# runtime -> (module, class, packages whose absence means "not installed", how to install it)
_BACKENDS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "onnxruntime": (
        "agent.runtimes.onnx",
        "OnnxBackend",
        ("onnxruntime",),
        "pip install onnxruntime (or the onnxruntime build for your accelerator)",
    ),
    "openvino": (
        "agent.runtimes.openvino",
        "OpenVINOBackend",
        ("openvino",),
        "pip install 'edgefleet[openvino]'",
    ),
    "litert": (
        "agent.runtimes.litert",
        "LiteRTBackend",
        ("ai_edge_litert", "tflite_runtime"),
        "pip install 'edgefleet[litert]'",
    ),
}

_SUFFIXES = {".onnx": "onnxruntime", ".xml": "openvino", ".tflite": "litert"}


def get_backend(runtime: str) -> Backend:
    """A fresh backend for ``runtime`` (one of :data:`RUNTIMES`), importing it now.

    Raises :class:`~agent.errors.ModelLoadError` for an unknown runtime, or when the runtime's
    package is not installed (the message names the extra to install).
    """
    entry = _BACKENDS.get(runtime)
    if entry is None:
        raise ModelLoadError(
            f"unknown runtime {runtime!r}; this agent supports {', '.join(RUNTIMES)}"
        )
    module_name, class_name, packages, install = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        missing = (e.name or "").split(".")[0]
        if missing in packages:
            raise ModelLoadError(
                f"runtime {runtime!r} is not installed on this device; install it with: {install}"
            ) from e
        raise ModelLoadError(f"runtime {runtime!r} failed to import: {e}") from e
    backend: Backend = getattr(module, class_name)()
    return backend


def runtime_for_path(path: Path) -> str:
    """The runtime that loads ``path``, chosen by its suffix (.onnx, .xml, .tflite)."""
    runtime = _SUFFIXES.get(path.suffix.lower())
    if runtime is None:
        supported = ", ".join(f"{s} ({r})" for s, r in _SUFFIXES.items())
        raise ModelLoadError(
            f"no runtime loads {path.name!r}: suffix {path.suffix or '(none)'!r} is not one of "
            f"{supported}"
        )
    return runtime
