"""PyTorch modules, exported with ``torch.onnx.export``.

The TorchScript-based exporter is used first: it is fast (well under a second for a small
network, against several seconds for the ``torch.export``-based one) and handles TorchScript
files. It is deprecated, so when it fails, or is gone from a later PyTorch, the
``torch.export``-based exporter (which needs onnxscript) is tried. Inputs are named after the
sample's keys, in the order of the module's ``forward`` arguments; outputs are ``output``, or
``output_0``, ``output_1``, ... for a module that returns several tensors. The first dimension
of every input and output is a dynamic batch.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporters.errors import ExportError, InvalidModelError
from exporters.sources import SourceModel, load_onnx_session

__all__ = ["load"]

_TRACE_ROWS = 2  # rows of the sample traced; the batch is dynamic, so a few are enough
_BATCH = "batch"


def load(
    model: Path | object,
    sample: Mapping[str, np.ndarray],
    work_dir: Path,
    *,
    input_name: str,
    opset: int,
) -> SourceModel:
    """Export an ``nn.Module`` (or a file holding one) to ``work_dir``."""
    module, size, label = _module(model)
    module.eval()
    names = list(sample)
    _check_dtypes(module, sample, label)
    example = tuple(
        torch.from_numpy(np.ascontiguousarray(a[:_TRACE_ROWS])) for a in sample.values()
    )
    try:
        with torch.no_grad():
            traced = _tensors(module(*example), label)
    except ExportError:
        raise
    except Exception as e:  # a forward pass can raise anything
        given = ", ".join(f"{n} {list(a.shape)} {a.dtype}" for n, a in sample.items())
        raise ExportError(f"{label} failed on the sample ({given}): {e}") from e
    outputs = ["output"] if len(traced) == 1 else [f"output_{i}" for i in range(len(traced))]

    path = work_dir / "model.onnx"
    _export(module, example, path, names, outputs, opset, label)
    session = load_onnx_session(path)  # proves ONNX Runtime accepts the export
    session.close()

    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = tuple(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names)
        with torch.no_grad():
            results = _tensors(module(*args), label)
        return {n: t.detach().cpu().numpy() for n, t in zip(outputs, results, strict=True)}

    return SourceModel(framework="torch", onnx_path=path, predict=predict, size_bytes=size)


def _module(model: Path | object) -> tuple[torch.nn.Module, int, str]:
    if isinstance(model, Path):
        module = _read(model)
        return module, model.stat().st_size, f"{type(module).__name__} from {model.name}"
    if not isinstance(model, torch.nn.Module):
        raise InvalidModelError(f"a {type(model).__name__} is not a PyTorch module (nn.Module)")
    # An in-memory module has no file; its weights, serialized, are what it would weigh on disk.
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return model, buffer.tell(), type(model).__name__


def _read(path: Path) -> torch.nn.Module:
    if not path.is_file():
        raise InvalidModelError(f"model file {path} does not exist or is not a file")
    try:
        if _is_torchscript(path):
            with _quiet():
                loaded: Any = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
        else:
            # weights_only=False unpickles a whole module, which runs code from the file.
            loaded = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # unpickling garbage raises almost anything
        raise InvalidModelError(f"{path} is not a PyTorch model file: {e}") from e
    if isinstance(loaded, Mapping):
        raise InvalidModelError(
            f"{path} holds a dict (a state_dict or a checkpoint), not a module: save the whole "
            "module with torch.save(model, path), or build the module, load the state_dict "
            "into it and pass the module itself"
        )
    if not isinstance(loaded, torch.nn.Module):
        raise InvalidModelError(f"{path} holds a {type(loaded).__name__}, not a PyTorch module")
    return loaded


def _is_torchscript(path: Path) -> bool:
    # A TorchScript archive carries its code and constants; a torch.save archive does not.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") for n in archive.namelist())


def _check_dtypes(module: torch.nn.Module, sample: Mapping[str, np.ndarray], label: str) -> None:
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    if weight is None:
        return
    expected = str(weight.dtype).removeprefix("torch.")
    try:
        weights_dtype = np.dtype(expected)
    except TypeError:  # bfloat16 and other types numpy lacks: nothing to compare with
        return
    for name, array in sample.items():
        if array.dtype.kind == "f" and array.dtype != weights_dtype:
            raise ExportError(
                f"sample {name!r} is {array.dtype} but the weights of {label} are {expected}; "
                f"convert the sample to {expected}"
            )


def _tensors(result: object, label: str) -> list[torch.Tensor]:
    items = list(result) if isinstance(result, tuple | list) else [result]
    tensors = [t for t in items if isinstance(t, torch.Tensor)]
    if not items or len(tensors) != len(items):
        raise ExportError(
            f"{label} returns {type(result).__name__}; export needs forward to return a tensor "
            "or a tuple of tensors"
        )
    return tensors


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence PyTorch's deprecation notices for TorchScript and its ONNX exporter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="no signature found", category=UserWarning)
        yield


def _export(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    inputs: Sequence[str],
    outputs: Sequence[str],
    opset: int,
    label: str,
) -> None:
    try:
        with _quiet():
            torch.onnx.export(
                module,
                example,
                str(path),
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_axes={n: {0: _BATCH} for n in (*inputs, *outputs)},
                opset_version=opset,
                dynamo=False,
            )
    except Exception as legacy:  # any failure here means: try the other exporter
        if isinstance(module, torch.jit.ScriptModule):
            raise ExportError(f"torch.onnx.export cannot export {label}: {legacy}") from legacy
        try:
            _export_dynamo(module, example, path, inputs, outputs, opset)
        except Exception as e:  # reported with both exporters' reasons
            raise ExportError(
                f"torch.onnx.export cannot export {label}: the TorchScript exporter said "
                f"{legacy}; the torch.export-based exporter said {e}"
            ) from e


def _export_dynamo(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    inputs: Sequence[str],
    outputs: Sequence[str],
    opset: int,
) -> None:
    batch = torch.export.Dim(_BATCH, min=1)
    with _quiet():
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_shapes=tuple({0: batch} for _ in example),
            opset_version=opset,
            dynamo=True,
            external_data=False,
        )
