"""TensorFlow/Keras models, exported with tf2onnx (the ``export-keras`` extra).

TensorFlow is imported when a Keras model is exported, never before: most installs lack it.
Inputs are named after the sample's keys, in the order of the model's inputs; outputs keep
the names tf2onnx gives them, in the order of the model's outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from exporters.errors import ExportError, InvalidModelError
from exporters.sources import SourceModel, load_onnx_session, require

__all__ = ["load", "load_keras_model"]

_KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def load(
    model: Path | object,
    sample: Mapping[str, np.ndarray],
    work_dir: Path,
    *,
    input_name: str,
    opset: int,
) -> SourceModel:
    """Export a Keras model (or a ``.keras``/``.h5`` file) to ``work_dir``."""
    tf = require("tensorflow", "export-keras", "exporting Keras models")
    tf2onnx = require("tf2onnx", "export-keras", "exporting Keras models")
    keras_model, size = load_keras_model(model)
    signature = [
        tf.TensorSpec((None, *a.shape[1:]), tf.as_dtype(a.dtype), name=n) for n, a in sample.items()
    ]
    path = work_dir / "model.onnx"
    try:
        tf2onnx.convert.from_keras(
            keras_model, input_signature=signature, opset=opset, output_path=str(path)
        )
    except Exception as e:  # tf2onnx raises many types; all mean "cannot convert"
        raise ExportError(f"tf2onnx cannot convert the Keras model: {e}") from e
    session = load_onnx_session(path)
    outputs = [s.name for s in session.outputs]
    session.close()
    names = list(sample)

    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [inputs[n] for n in names]
        result = keras_model(args[0] if len(args) == 1 else args, training=False)
        items = list(result) if isinstance(result, list | tuple) else [result]
        return {n: np.asarray(t) for n, t in zip(outputs, items, strict=True)}

    return SourceModel(framework="keras", onnx_path=path, predict=predict, size_bytes=size)


def load_keras_model(model: Path | object) -> tuple[Any, int]:
    """A Keras model and the size of its artefact in bytes; needs TensorFlow."""
    tf = require("tensorflow", "export-keras", "exporting Keras models")
    if not isinstance(model, Path):
        if not isinstance(model, tf.keras.Model):
            raise InvalidModelError(f"a {type(model).__name__} is not a Keras model")
        return model, sum(np.asarray(w).nbytes for w in model.weights)
    if not model.is_file():
        raise InvalidModelError(f"model file {model} does not exist or is not a file")
    if model.suffix.lower() not in _KERAS_SUFFIXES:
        raise InvalidModelError(
            f"{model.name} is not a Keras model file: use one of {', '.join(_KERAS_SUFFIXES)}"
        )
    try:
        return tf.keras.models.load_model(model), model.stat().st_size
    except Exception as e:  # Keras raises many types for a bad file
        raise InvalidModelError(f"{model} is not a Keras model Keras can load: {e}") from e
