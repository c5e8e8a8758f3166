"""Encode an Open Inference Protocol v2 infer response, in JSON or with a binary section.

Outputs asked for in binary (per output, or all of them through the request's
``binary_data_output``) carry ``parameters.binary_data_size`` instead of ``data``; their raw
bytes follow the JSON header in output order, and the caller sends the header's length as the
``Inference-Header-Content-Length`` response header.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from agent.codec._bytes import pack_bytes
from agent.codec.request import _NATIVE, _WIRE, InferRequest
from agent.errors import InferenceError
from protocol.manifest import TensorSpec

__all__ = ["encode_response"]


def encode_response(
    *,
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: Mapping[str, np.ndarray],
    output_specs: Sequence[TensorSpec],
    parameters: Mapping[str, object],
) -> tuple[bytes, int | None]:
    """Encode the outputs ``request`` asked for (all of ``output_specs`` when it named none).

    Returns the body and the JSON header's length, or ``None`` when no output went binary and
    the whole body is JSON. ``parameters`` become the response's top-level ``parameters``.
    Each output is sent in its spec's datatype. JSON cannot hold NaN or infinity: such values
    are written as ``null`` (clients read NaN back); ask for binary outputs to keep them exact.
    Raises :class:`~agent.errors.InferenceError` when the model did not produce an output.
    """
    specs = {s.name: s for s in output_specs}
    if request.outputs is None:
        wanted = [(s.name, request.binary_output_default) for s in output_specs]
    else:
        wanted = [(o.name, o.binary) for o in request.outputs]

    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary in wanted:
        spec = specs.get(name)
        array = outputs.get(name)
        if spec is None or array is None:
            raise InferenceError(
                f"model {model_name} {model_version} did not produce output '{name}' "
                f"(it produced: {', '.join(outputs) or 'nothing'})"
            )
        datatype = spec.datatype
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = _raw_bytes(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_data(array, datatype)
        entries.append(entry)

    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        document["id"] = request.id
    if parameters:
        document["parameters"] = dict(parameters)
    document["outputs"] = entries
    try:
        header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as e:  # orjson.JSONEncodeError: a response parameter JSON cannot hold
        raise InferenceError(f"cannot encode the response for {model_name}: {e}") from e
    if not chunks:
        return header, None
    return b"".join((header, *chunks)), len(header)


def _raw_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return pack_bytes(array)
    return np.ascontiguousarray(array, dtype=_WIRE[datatype]).tobytes()


def _json_data(array: np.ndarray, datatype: str) -> object:
    if datatype == "BYTES":
        return [_text(item) for item in array.ravel().tolist()]
    # orjson writes a C-contiguous 1-D array straight from its buffer, with no Python floats.
    return np.ascontiguousarray(array, dtype=_NATIVE[datatype]).reshape(-1)


def _text(item: object) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, bytes):
        # JSON strings are Unicode; bytes that are not UTF-8 survive only in binary outputs.
        return item.decode("utf-8", errors="replace")
    return str(item)
