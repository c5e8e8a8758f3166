"""Sources: a trained model in its own framework, exported to a float ONNX file.

Each framework lives in its own module and is imported only when asked for, because each pulls
a large optional dependency (scikit-learn, PyTorch, TensorFlow). :func:`load_source` returns the
float ONNX export together with the framework's own prediction function, so the export can be
checked against the model it came from.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from agent.errors import AgentError
from agent.runtimes import RuntimeOptions, get_backend
from agent.runtimes.base import Session
from exporters.errors import ExportError, InvalidModelError
from protocol.datatypes import datatype_of
from protocol.manifest import TensorSpec

__all__ = [
    "FRAMEWORKS",
    "Predict",
    "SourceModel",
    "check_sample",
    "load_onnx_session",
    "load_source",
    "require",
]

FRAMEWORKS = ("sklearn", "torch", "onnx", "keras")
# framework -> (module that exports it, the extra that installs what it needs)
_MODULES = {
    "sklearn": ("exporters.sources.sklearn", "export"),
    "torch": ("exporters.sources.torch", "export-torch"),
    "onnx": ("exporters.sources.onnx", "export"),
    "keras": ("exporters.sources.keras", "export-keras"),
}

Predict = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True, eq=False)
class SourceModel:
    """A trained model and its float ONNX export.

    ``predict`` is the source framework's own answer for a batch of inputs keyed by the ONNX
    input names, returned keyed by the ONNX output names.
    """

    framework: str  # one of FRAMEWORKS
    onnx_path: Path  # the float ONNX export; for "onnx", the given file
    predict: Predict
    size_bytes: int  # bytes of the source artefact (model file, or the serialized model)


def load_source(
    framework: str,
    model: Path | object,
    sample: Mapping[str, np.ndarray] | np.ndarray,
    work_dir: Path,
    *,
    input_name: str = "input",
    opset: int = 17,
) -> SourceModel:
    """Load ``model`` of ``framework`` and export it to ONNX in ``work_dir``.

    ``model`` is a file (scikit-learn: a joblib or pickle file; PyTorch: a whole pickled
    module or a TorchScript file; ONNX: the ``.onnx`` file; Keras: a ``.keras``/``.h5`` file)
    or the model object itself. ``sample`` is a batch of real inputs: a single array (named
    ``input_name``) or arrays keyed by input name. It fixes the input names, dtypes and
    shapes of the export; the first dimension is always exported as a dynamic batch.

    Loading a pickle, joblib or PyTorch file runs code from that file: load only files you trust.
    """
    entry = _MODULES.get(framework)
    if entry is None:
        raise ExportError(f"unknown framework {framework!r}: use one of {', '.join(FRAMEWORKS)}")
    arrays = _as_arrays(sample, input_name)
    work_dir.mkdir(parents=True, exist_ok=True)
    module_name, extra = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        missing = (e.name or "a package").split(".")[0]
        raise ExportError(
            f"exporting {framework} models needs {missing}, which is not installed ({e}): "
            f"install 'edgefleet[{extra}]' (pip install 'edgefleet[{extra}]')"
        ) from e
    source: SourceModel = module.load(model, arrays, work_dir, input_name=input_name, opset=opset)
    return source


def require(package: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional ``package``, or raise :class:`ExportError` naming the extra to install."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ExportError(
            f"{purpose} needs {package}, which is not installed: "
            f"install 'edgefleet[{extra}]' (pip install 'edgefleet[{extra}]')"
        ) from e


def _as_arrays(
    sample: Mapping[str, np.ndarray] | np.ndarray, input_name: str
) -> dict[str, np.ndarray]:
    raw = {input_name: sample} if isinstance(sample, np.ndarray) else dict(sample)
    if not raw:
        raise ExportError("the sample holds no arrays; pass a batch of real inputs")
    arrays: dict[str, np.ndarray] = {}
    for name, value in raw.items():
        array = np.asarray(value)
        if array.ndim == 0 or array.shape[0] == 0:
            raise ExportError(
                f"sample {name!r} has shape {list(array.shape)}: it needs a first (batch) "
                "dimension with at least one row"
            )
        arrays[name] = array
    rows = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(rows.values())) > 1:
        raise ExportError(f"sample arrays differ in their number of rows: {rows}")
    return arrays


def load_onnx_session(path: Path) -> Session:
    """Load an ONNX file on the CPU with the runtime the agent uses."""
    try:
        return get_backend("onnxruntime").load(path, "CPU", RuntimeOptions())
    except AgentError as e:
        raise InvalidModelError(f"ONNX Runtime cannot load {path}: {e}") from e


def check_sample(
    sample: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], model: str
) -> dict[str, np.ndarray]:
    """Check ``sample`` against a model's inputs; returns it keyed by the model's input names.

    A single array for a single-input model is taken whatever its name. Raises
    :class:`ExportError` naming the input and what was expected versus what was given.
    """
    names = [s.name for s in specs]
    arrays = dict(sample)
    if len(specs) == 1 and len(arrays) == 1 and names[0] not in arrays:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    extra = [n for n in arrays if n not in names]
    if missing or extra:
        raise ExportError(
            f"the sample does not match the inputs of {model}: it expects "
            f"{', '.join(map(repr, names))} but the sample has {', '.join(map(repr, arrays))}"
        )
    for spec in specs:
        array = arrays[spec.name]
        try:
            got = datatype_of(array.dtype)
        except KeyError:
            got = str(array.dtype)
        if got != spec.datatype:
            raise ExportError(
                f"sample {spec.name!r} of {model} is {got} ({array.dtype}) but the model expects "
                f"{spec.datatype}; convert the data to that type"
            )
        shape = list(array.shape)
        fits = len(shape) == len(spec.shape) and all(
            d == -1 or d == g for d, g in zip(spec.shape, shape, strict=True)
        )
        if not fits:
            raise ExportError(
                f"sample {spec.name!r} of {model} has shape {shape} but the model expects "
                f"{list(spec.shape)} (-1: any size)"
            )
    return {n: arrays[n] for n in names}
