"""OpenVINO IR from a float ONNX model, in float or INT8 (NNCF post-training quantization).

The IR is an ``.xml`` graph with its ``.bin`` weights beside it. Float weights stay FP32 so
the IR computes what the ONNX model computes; INT8 weights come from NNCF, which calibrates
activation ranges on sample rows and corrects the bias the rounding introduces.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from exporters.calibration import Samples
from exporters.errors import ExportError, InvalidModelError
from exporters.sources import require

__all__ = ["to_openvino"]

# The line of OpenVINO's conversion report that lists the operators it has no rule for.
_UNCONVERTED = re.compile(r"No conversion rule found for operations: ([^\n]+)")


def to_openvino(
    onnx_path: Path,
    out_dir: Path,
    *,
    int8: bool = False,
    calibration: Samples | None = None,
    subset_size: int = 300,
) -> Path:
    """Convert ``onnx_path`` to OpenVINO IR in ``out_dir``; returns the ``.xml``.

    With ``int8``, NNCF quantizes the model on up to ``subset_size`` rows of ``calibration``.
    Both files are written under temporary names and renamed, the ``.xml`` last, so a
    readable ``.xml`` always has its complete ``.bin``.
    """
    ov = require("openvino", "openvino", "exporting to OpenVINO IR")
    if not onnx_path.is_file():
        raise InvalidModelError(f"model file {onnx_path} does not exist or is not a file")
    if subset_size < 1:
        raise ExportError(f"subset_size must be 1 or more, not {subset_size}")
    if int8 and calibration is None:
        raise ExportError(
            f"OpenVINO INT8 of {onnx_path.name} needs calibration data: pass rows like those "
            "the model will see (npz, npy, csv or a folder of images)"
        )
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as e:  # OpenVINO raises its own exception types per frontend
        unsupported = _UNCONVERTED.search(str(e))
        if unsupported:
            raise ExportError(
                f"OpenVINO cannot convert {onnx_path.name}: it has no conversion for operator(s) "
                f"{unsupported.group(1).strip()}; export the model without them, or target "
                "onnxruntime"
            ) from e
        raise ExportError(f"OpenVINO cannot convert {onnx_path.name}: {e}") from e
    if int8:
        assert calibration is not None  # checked above
        model = _quantize(model, calibration, subset_size, onnx_path)

    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / f"{onnx_path.stem}.xml"
    work = Path(tempfile.mkdtemp(prefix=f".{xml.stem}.", dir=out_dir))
    try:
        staged = work / xml.name
        try:
            ov.save_model(model, str(staged), compress_to_fp16=False)
        except Exception as e:  # OpenVINO raises RuntimeError and its own types
            raise ExportError(f"cannot write OpenVINO IR for {onnx_path.name}: {e}") from e
        os.replace(staged.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(staged, xml)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return xml


def _quantize(model: Any, calibration: Samples, subset_size: int, onnx_path: Path) -> Any:
    nncf = require("nncf", "export", "OpenVINO INT8 quantization")
    names = [p.get_any_name() for p in model.inputs]
    missing = [n for n in names if n not in calibration.inputs]
    if missing:
        raise ExportError(
            f"the calibration data lacks input(s) {', '.join(map(repr, missing))} of "
            f"{onnx_path.name}; it has {', '.join(map(repr, calibration.inputs))}"
        )
    rows = min(calibration.rows, subset_size)
    items = [{n: calibration.inputs[n][i : i + 1] for n in names} for i in range(rows)]
    nncf.set_log_level(logging.ERROR)
    try:
        # NNCF draws progress bars on stdout; a caller's own progress display owns it.
        with contextlib.redirect_stdout(io.StringIO()):
            return nncf.quantize(model, nncf.Dataset(items), subset_size=rows)
    except Exception as e:  # NNCF raises many types; all mean "cannot quantize"
        raise ExportError(f"NNCF INT8 quantization of {onnx_path.name} failed: {e}") from e
