"""INT8 quantization of a float ONNX model with ONNX Runtime: dynamic, or static QDQ.

Dynamic quantization stores weights as INT8 and quantizes activations per batch at run time,
so it needs no data. Static quantization also fixes the activation ranges ahead of time from
calibration rows, in QDQ format (QuantizeLinear/DequantizeLinear pairs that every execution
provider reads). Both use signed INT8 weights and unsigned INT8 activations (U8S8), the
format ONNX Runtime's CPU kernels are fastest on.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process

from agent.errors import AgentError
from agent.selftest import make_inputs
from exporters.calibration import Samples
from exporters.errors import ExportError, InvalidModelError
from exporters.options import QuantizeOptions
from exporters.sources import load_onnx_session

__all__ = ["QUANTIZED_OPS", "RowsReader", "quantize"]

logger = logging.getLogger(__name__)

_BATCH_ROWS = 32  # calibration rows per run when the model's batch dimension is dynamic
# Operators whose presence in the output shows that something was quantized.
QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
     "ConvInteger", "QLinearConv", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul"}
)  # fmt: skip
_REGISTRIES = {"dynamic-int8": IntegerOpsRegistry, "static-int8": QDQRegistry}
# Operators with weights: where INT8 saves size and time. A model with none of them is left
# as it was by the quantizer (at most its activations would be wrapped in Q/DQ pairs).
_WEIGHTED_OPS = frozenset(
    {"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "Attention", "LSTM",
     "EmbedLayerNormalization"}
)  # fmt: skip


class RowsReader(CalibrationDataReader):  # type: ignore[misc]  # untyped base class
    """Feeds calibration rows to ONNX Runtime's calibrator, ``batch`` rows per run.

    With ``exact``, every run has exactly ``batch`` rows (a model with a fixed batch size)
    and a remainder is left out; otherwise the last run takes what is left.
    """

    def __init__(
        self, inputs: dict[str, np.ndarray], rows: int, batch: int, *, exact: bool = False
    ) -> None:
        end = rows - rows % batch if exact else rows
        self._batches = (
            {name: a[start : min(start + batch, end)] for name, a in inputs.items()}
            for start in range(0, end, batch)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize(
    onnx_path: Path, out: Path, options: QuantizeOptions, calibration: Samples | None = None
) -> Path:
    """Quantize ``onnx_path`` as ``options`` say and write the result to ``out``; returns ``out``.

    Static INT8 needs ``calibration`` with at least ``options.min_calibration_samples`` rows
    and uses the first ``options.calibration_samples``. With method ``none`` the float model
    is copied. The result is written under a temporary name beside ``out`` and renamed once
    ONNX Runtime has loaded it, so ``out`` is never half-written.
    """
    model = _read(onnx_path)
    if options.method != "none":
        _check_quantizable(model, options, onnx_path)
    if options.method == "static-int8":
        _check_calibration(calibration, options, model, onnx_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        result = work / "model.onnx"
        if options.method == "none":
            shutil.copyfile(onnx_path, result)
        else:
            source = _without_initializer_inputs(model, onnx_path, work)
            source = _preprocess(source, work) if options.preprocess else source
            _run(source, result, options, calibration, model, onnx_path)
            _check_quantized(result, model, options, onnx_path)
        _smoke_test(result)
        os.replace(result, out)
    except InvalidModelError as e:
        raise ExportError(
            f"the {options.method} model of {onnx_path.name} does not load: {e}"
        ) from e
    except AgentError as e:
        raise ExportError(
            f"the {options.method} model of {onnx_path.name} loads but fails on a test input: {e}"
        ) from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _smoke_test(path: Path) -> None:
    """Load the result and run it once: a quantizer can write a model that loads but cannot run."""
    session = load_onnx_session(path)
    try:
        session.run(make_inputs(session.inputs, batch=1))
    finally:
        session.close()


def _without_initializer_inputs(model: onnx.ModelProto, path: Path, work: Path) -> Path:
    """The model with its weights no longer listed as graph inputs (IR version 3 style).

    ONNX Runtime's quantizer folds some such weights and leaves their names behind as inputs
    nothing feeds, so the quantized model asks for them at run time. IR version 4 and later
    let initializers stand alone, and the model computes the same.
    """
    initializers = {i.name for i in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in initializers]
    if len(kept) == len(model.graph.input):
        return path
    normalized = onnx.ModelProto()
    normalized.CopyFrom(model)
    del normalized.graph.input[:]
    normalized.graph.input.extend(kept)
    normalized.ir_version = max(normalized.ir_version, 4)
    target = work / "inputs-normalized.onnx"
    onnx.save_model(normalized, str(target))
    return target


def _read(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise InvalidModelError(f"model file {path} does not exist or is not a file")
    try:
        model = onnx.load_model(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises protobuf decode and checker errors alike
        raise InvalidModelError(
            f"{path} is not a valid ONNX model, so it cannot be quantized: {e}"
        ) from e
    return model


def _check_calibration(
    calibration: Samples | None, options: QuantizeOptions, model: onnx.ModelProto, path: Path
) -> None:
    if calibration is None:
        raise ExportError(
            f"static INT8 quantization of {path.name} needs calibration data: pass rows like "
            "those the model will see (npz, npy, csv or a folder of images)"
        )
    if calibration.rows < options.min_calibration_samples:
        raise ExportError(
            f"the calibration set has {calibration.rows} rows; static INT8 needs at least "
            f"{options.min_calibration_samples} (and works best with "
            f"{options.calibration_samples}): give more rows"
        )
    names = _input_names(model)
    fixed = _fixed_batch(model, names[0]) if names else None
    if fixed is not None and min(calibration.rows, options.calibration_samples) < fixed:
        raise ExportError(
            f"{path.name} takes batches of exactly {fixed} rows, but calibration has "
            f"{calibration.rows} rows (using up to {options.calibration_samples}); give at "
            f"least {fixed}"
        )
    missing = [n for n in names if n not in calibration.inputs]
    if missing:
        raise ExportError(
            f"the calibration data lacks input(s) {', '.join(map(repr, missing))} of {path.name}; "
            f"it has {', '.join(map(repr, calibration.inputs))}"
        )


def _input_names(model: onnx.ModelProto) -> list[str]:
    initializers = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def _preprocess(path: Path, work: Path) -> Path:
    """The model after ONNX Runtime's pre-processing, or as it is where that cannot run."""
    result = work / "preprocessed.onnx"
    # When symbolic shape inference fails, ONNX Runtime saves a debug copy of the model in the
    # current directory; run it from the work directory so that copy is removed with it.
    here = Path.cwd()
    os.chdir(work)
    try:
        quant_pre_process(str(path.resolve()), str(result.resolve()))
    except Exception as e:  # shape inference and the optimizer raise many types
        # Symbolic shape inference gives up on operators it does not know (scikit-learn's
        # ai.onnx.ml ones, for example). Pre-processing without it leaves graphs the quantizer
        # then fails on, while the model as exported quantizes fine: use that.
        if "symbolic shape inference" not in str(e):
            raise ExportError(
                f"pre-processing {path.name} for quantization failed: {e}; quantize without "
                "pre-processing (preprocess=False)"
            ) from e
        logger.warning("quantizing %s without pre-processing: %s", path.name, e)
        return path
    finally:
        os.chdir(here)
    return result


def _fixed_batch(model: onnx.ModelProto, name: str) -> int | None:
    """The batch size an input is fixed to, or None when its first dimension is dynamic."""
    for value in model.graph.input:
        if value.name == name:
            dims = value.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                return int(dims[0].dim_value)
    return None


def _run(
    source: Path,
    result: Path,
    options: QuantizeOptions,
    calibration: Samples | None,
    model: onnx.ModelProto,
    original: Path,
) -> None:
    try:
        if options.method == "dynamic-int8":
            quantize_dynamic(
                str(source), str(result), per_channel=options.per_channel,
                weight_type=QuantType.QInt8,
            )  # fmt: skip
        else:
            assert calibration is not None  # checked by _check_calibration
            names = _input_names(model)
            rows = min(calibration.rows, options.calibration_samples)
            fixed = _fixed_batch(model, names[0]) if names else None
            reader = RowsReader(
                {n: calibration.inputs[n] for n in names},
                rows,
                fixed or _BATCH_ROWS,
                exact=fixed is not None,
            )
            quantize_static(
                str(source),
                str(result),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=options.per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    except Exception as e:  # the quantizer raises many types; name the operator if we can
        raise ExportError(
            f"{options.method} quantization of {original.name} failed{_culprit(model, str(e))}: {e}"
        ) from e


def _culprit(model: onnx.ModelProto, message: str) -> str:
    for node in model.graph.node:
        if node.name and node.name in message:
            return f" at operator {node.op_type} (node {node.name!r})"
    for op in sorted({n.op_type for n in model.graph.node}, key=len, reverse=True):
        if op in message:
            return f" at operator {op}"
    return ""


def _check_quantizable(model: onnx.ModelProto, options: QuantizeOptions, path: Path) -> None:
    """Refuse up front a model in which the quantizer would find nothing to quantize."""
    present = {n.op_type for n in model.graph.node}
    if present & _WEIGHTED_OPS & set(_REGISTRIES[options.method]):
        return
    _refuse_unchanged(present, options, path)


def _check_quantized(
    result: Path, model: onnx.ModelProto, options: QuantizeOptions, path: Path
) -> None:
    """Refuse a "quantized" model in which the quantizer quantized nothing after all."""
    ops = {n.op_type for n in onnx.load_model(str(result), load_external_data=False).graph.node}
    if not ops & QUANTIZED_OPS:
        _refuse_unchanged({n.op_type for n in model.graph.node}, options, path)


def _refuse_unchanged(present: set[str], options: QuantizeOptions, path: Path) -> None:
    registry = set(_REGISTRIES[options.method]) & _WEIGHTED_OPS
    raise ExportError(
        f"{options.method} quantization would leave {path.name} unchanged: none of its "
        f"operators can be quantized (it has {', '.join(sorted(present))}; ONNX Runtime "
        f"quantizes the weights of {', '.join(sorted(registry))}); export the model with "
        "standard operators, or keep it in float (quantization method none)"
    )
