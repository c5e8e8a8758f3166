"""LiteRT (``.tflite``) models: package an existing file, or convert a Keras model.

Converting needs TensorFlow (the ``export-keras`` extra); checking a file needs only the
LiteRT interpreter the agent itself uses.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from agent.errors import AgentError
from agent.runtimes import RuntimeOptions, get_backend
from exporters.calibration import Samples
from exporters.errors import ExportError, InvalidModelError
from exporters.sources import require
from exporters.sources.keras import load_keras_model

__all__ = ["keras_to_tflite", "package_tflite"]

_TFLITE_ID = b"TFL3"  # flatbuffer file identifier of a .tflite model, at bytes 4..8
_CALIBRATION_ROWS = 200  # representative rows for full-integer conversion


def package_tflite(path: Path) -> Path:
    """Check that ``path`` is a LiteRT model the agent can load; returns ``path``."""
    if not path.is_file():
        raise InvalidModelError(f"model file {path} does not exist or is not a file")
    with path.open("rb") as f:
        head = f.read(8)
    if head[4:8] != _TFLITE_ID:
        raise InvalidModelError(
            f"{path} is not a LiteRT (.tflite) model: it lacks the {_TFLITE_ID.decode()} "
            "flatbuffer identifier"
        )
    try:
        get_backend("litert").load(path, "CPU", RuntimeOptions()).close()
    except AgentError as e:
        raise InvalidModelError(f"LiteRT cannot load {path}: {e}") from e
    return path


def keras_to_tflite(
    model: object, out: Path, *, int8: bool = False, calibration: Samples | None = None
) -> Path:
    """Convert a Keras model (or a ``.keras``/``.h5`` file) to ``out``; returns ``out``.

    With ``int8``, weights and activations are quantized to INT8 using ``calibration`` rows as
    the representative dataset; inputs and outputs stay float. Needs TensorFlow.
    """
    tf = require("tensorflow", "export-keras", "converting Keras models to LiteRT")
    keras_model, _ = load_keras_model(model)
    if int8 and calibration is None:
        raise ExportError(
            "LiteRT INT8 conversion needs calibration data: pass rows like those the model "
            "will see (npz, npy, csv or a folder of images)"
        )
    converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    if int8:
        assert calibration is not None  # checked above
        rows = calibration

        def representative() -> Iterator[list[np.ndarray]]:
            for i in range(min(rows.rows, _CALIBRATION_ROWS)):
                yield [a[i : i + 1] for a in rows.inputs.values()]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
    try:
        flatbuffer = converter.convert()
    except Exception as e:  # the converter raises many types; all mean "cannot convert"
        raise ExportError(f"TensorFlow cannot convert the Keras model to LiteRT: {e}") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, staged = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".tflite", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(flatbuffer)
        package_tflite(Path(staged))
        os.replace(staged, out)
    finally:
        Path(staged).unlink(missing_ok=True)
    return out
