"""An existing ONNX model: the file is its own export, and ONNX Runtime gives its answers.

The file is used as it is (its input names, dtypes and batch dimension are the author's), so
the sample is checked against its inputs rather than shaping them; ``opset`` is not used.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from agent.errors import AgentError
from exporters.errors import ExportError, InvalidModelError
from exporters.sources import SourceModel, check_sample, load_onnx_session

__all__ = ["load"]


def load(
    model: Path | object,
    sample: Mapping[str, np.ndarray],
    work_dir: Path,
    *,
    input_name: str,
    opset: int,
) -> SourceModel:
    """Check an ONNX file (or an ``onnx.ModelProto``, saved to ``work_dir``) and the sample."""
    if isinstance(model, onnx.ModelProto):
        path = work_dir / "model.onnx"
        onnx.save_model(model, str(path))
    elif isinstance(model, Path):
        path = model
    else:
        raise InvalidModelError(
            f"a {type(model).__name__} is not an ONNX model: pass a .onnx file or an "
            "onnx.ModelProto"
        )
    _check_file(path)
    session = load_onnx_session(path)
    check_sample(sample, session.inputs, path.name)
    names = [s.name for s in session.inputs]

    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # A single array is accepted under any name, as check_sample accepts it.
        if len(names) == 1 and len(inputs) == 1:
            inputs = {names[0]: next(iter(inputs.values()))}
        try:
            return session.run(inputs)
        except AgentError as e:
            raise ExportError(f"ONNX Runtime failed to run {path.name}: {e}") from e

    return SourceModel(
        framework="onnx", onnx_path=path, predict=predict, size_bytes=path.stat().st_size
    )


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise InvalidModelError(f"model file {path} does not exist or is not a file")
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # onnx raises protobuf and checker errors alike
        raise InvalidModelError(f"{path} is not a valid ONNX model: {e}") from e
