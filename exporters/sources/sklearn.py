"""scikit-learn estimators and pipelines, exported with skl2onnx.

The export takes one 2-D input matrix; its ONNX type follows the sample's dtype (float32 gives
FLOAT, float64 DOUBLE, int64 INT64). ZipMap is disabled so every output is a plain tensor the
agent can serve. Output names are skl2onnx's: classifiers give ``label`` (what ``predict``
returns) and ``probabilities`` (``predict_proba``); regressors and transformers give one
output, ``variable`` (``predict`` or ``transform``).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import joblib  # type: ignore[import-untyped]  # joblib ships no type hints
import numpy as np
import onnx
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType, Int64TensorType
from sklearn.base import is_classifier
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from exporters.errors import ExportError, InvalidModelError
from exporters.sources import SourceModel, load_onnx_session
from protocol.datatypes import dtype_of

__all__ = ["load"]

_TENSOR_TYPES: dict[str, Any] = {
    "float32": FloatTensorType,
    "float64": DoubleTensorType,
    "int64": Int64TensorType,
}
_ML_OPSET = 3  # ai.onnx.ml opset; 3 is read by every ONNX Runtime the agent supports


def load(
    model: Path | object,
    sample: Mapping[str, np.ndarray],
    work_dir: Path,
    *,
    input_name: str,
    opset: int,
) -> SourceModel:
    """Export a fitted estimator (or a joblib/pickle file holding one) to ``work_dir``."""
    estimator, size, label = _estimator(model)
    name, x = _matrix(sample, estimator, label)
    tensor_type = _TENSOR_TYPES.get(str(x.dtype))
    if tensor_type is None:
        raise ExportError(
            f"sample {name!r} is {x.dtype}; scikit-learn models export with float32, float64 or "
            "int64 inputs: convert it (float32 is what devices run fastest)"
        )
    classifier = is_classifier(estimator)
    try:
        proto = convert_sklearn(
            estimator,
            initial_types=[(name, tensor_type([None, x.shape[1]]))],
            # ZipMap turns probabilities into a sequence of maps, which the agent cannot serve.
            options={"zipmap": False} if classifier else None,
            target_opset={"": opset, "ai.onnx.ml": _ML_OPSET},
        )
    except Exception as e:  # skl2onnx raises many types; all mean "cannot convert"
        raise ExportError(f"skl2onnx cannot convert {label}: {e}") from e
    path = work_dir / "model.onnx"
    onnx.save_model(proto, str(path))

    session = load_onnx_session(path)
    try:
        outputs = [(s.name, dtype_of(s.datatype), len(s.shape)) for s in session.outputs]
    finally:
        session.close()
    expected = 2 if classifier else 1
    if len(outputs) != expected:
        raise ExportError(
            f"{label} exported with outputs {[o[0] for o in outputs]}; expected "
            f"{'label and probabilities' if classifier else 'one output'}, so its ONNX outputs "
            "cannot be matched with scikit-learn's answers"
        )
    if not classifier and not hasattr(estimator, "predict") and not hasattr(estimator, "transform"):
        raise ExportError(f"{label} has neither predict nor transform")

    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        data = inputs[name]
        if classifier:
            answers = [estimator.predict(data), estimator.predict_proba(data)]
        elif hasattr(estimator, "predict"):
            answers = [estimator.predict(data)]
        else:
            answers = [estimator.transform(data)]
        return {
            out: _like(np.asarray(a), dtype, rank)
            for (out, dtype, rank), a in zip(outputs, answers, strict=True)
        }

    return SourceModel(framework="sklearn", onnx_path=path, predict=predict, size_bytes=size)


def _estimator(model: Path | object) -> tuple[Any, int, str]:
    """The estimator, the size of its artefact in bytes, and how to name it in messages."""
    if isinstance(model, Path):
        if not model.is_file():
            raise InvalidModelError(f"model file {model} does not exist or is not a file")
        try:
            estimator = joblib.load(model)
        except Exception as e:  # unpickling garbage raises almost anything
            raise InvalidModelError(
                f"{model} is not a joblib or pickle file of a scikit-learn estimator: {e}"
            ) from e
        size = model.stat().st_size
        label = f"{type(estimator).__name__} from {model.name}"
    else:
        estimator = model
        label = type(model).__name__
        try:
            size = len(pickle.dumps(estimator, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception as e:  # any pickling failure means the same here
            raise InvalidModelError(f"{label} cannot be serialized with pickle: {e}") from e
    if not hasattr(estimator, "fit") or not hasattr(estimator, "get_params"):
        where = f" in {model}" if isinstance(model, Path) else ""
        raise InvalidModelError(
            f"the object{where} is a {type(estimator).__name__}, not a scikit-learn estimator"
        )
    try:
        check_is_fitted(estimator)
    except NotFittedError as e:
        raise InvalidModelError(f"{label} is not fitted: fit it before exporting") from e
    except TypeError as e:
        raise InvalidModelError(f"{label} is not a scikit-learn estimator: {e}") from e
    return estimator, size, label


def _matrix(sample: Mapping[str, np.ndarray], estimator: Any, label: str) -> tuple[str, np.ndarray]:
    if len(sample) != 1:
        raise ExportError(
            f"scikit-learn models take one input matrix; the sample has {len(sample)} arrays "
            f"({', '.join(sample)})"
        )
    name, x = next(iter(sample.items()))
    if x.ndim != 2:
        raise ExportError(
            f"sample {name!r} has shape {list(x.shape)}; {label} takes a 2-D matrix [rows, "
            "features]"
        )
    features = getattr(estimator, "n_features_in_", None)
    if features is not None and x.shape[1] != features:
        raise ExportError(
            f"sample {name!r} has {x.shape[1]} features (shape {list(x.shape)}) but {label} "
            f"was fitted on {features}"
        )
    return name, x


def _like(answer: np.ndarray, dtype: np.dtype[Any], rank: int) -> np.ndarray:
    """scikit-learn's answer in the dtype and rank of the ONNX output (e.g. [N] -> [N, 1])."""
    if answer.ndim < rank:
        answer = answer.reshape(answer.shape + (1,) * (rank - answer.ndim))
    if dtype.kind in "biuf" and answer.dtype.kind in "biuf":
        return answer.astype(dtype, copy=False)
    return answer
