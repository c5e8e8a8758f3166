"""From a trained model to a validated bundle.

The Python API the ``edgefleet export`` command is a shell over::

    import exporters
    result = exporters.export(model, framework="sklearn", sample=x, name="digits",
                              version="2.0.0", out=Path("dist"),
                              quantize=exporters.QuantizeOptions(method="static-int8"))
    exporters.quantize(Path("model.onnx"), Path("model.int8.onnx"), options, calibration)
    exporters.validate(source_outputs, exported_outputs, labels=y, tolerance=tolerance)

Names are imported on first use: the agent imports :mod:`exporters.errors` on devices that
lack the exporters' heavy dependencies (onnx, scikit-learn, NNCF), and must not pay for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from exporters.errors import ExportError, InvalidModelError, ParityError

if TYPE_CHECKING:
    from exporters.calibration import Samples, load_samples
    from exporters.options import QuantizeMethod, QuantizeOptions, Target, Tolerance
    from exporters.package import create_bundle
    from exporters.parity import check, validate
    from exporters.pipeline import STEPS, ExportResult, export
    from exporters.profiling import LatencyProfile, ModelProfile, profile
    from exporters.quantization import quantize
    from exporters.report import ExportReport
    from exporters.sources import SourceModel, load_source

__all__ = [
    "STEPS",
    "ExportError",
    "ExportReport",
    "ExportResult",
    "InvalidModelError",
    "LatencyProfile",
    "ModelProfile",
    "ParityError",
    "QuantizeMethod",
    "QuantizeOptions",
    "Samples",
    "SourceModel",
    "Target",
    "Tolerance",
    "check",
    "create_bundle",
    "export",
    "load_samples",
    "load_source",
    "profile",
    "quantize",
    "validate",
]

# public name -> the module that defines it
_LAZY = {
    "STEPS": "exporters.pipeline",
    "ExportReport": "exporters.report",
    "ExportResult": "exporters.pipeline",
    "LatencyProfile": "exporters.profiling",
    "ModelProfile": "exporters.profiling",
    "QuantizeMethod": "exporters.options",
    "QuantizeOptions": "exporters.options",
    "Samples": "exporters.calibration",
    "SourceModel": "exporters.sources",
    "Target": "exporters.options",
    "Tolerance": "exporters.options",
    "check": "exporters.parity",
    "create_bundle": "exporters.package",
    "export": "exporters.pipeline",
    "load_samples": "exporters.calibration",
    "load_source": "exporters.sources",
    "profile": "exporters.profiling",
    "quantize": "exporters.quantization",
    "validate": "exporters.parity",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'exporters' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
