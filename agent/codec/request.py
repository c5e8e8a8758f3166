"""Decode an Open Inference Protocol v2 infer request and check it against the model signature.

Both request forms are accepted: plain JSON, and Triton's binary tensor data extension, where
the first ``Inference-Header-Content-Length`` bytes of the body are the JSON header and each
input that carries ``parameters.binary_data_size`` takes its raw bytes, in input order, from
the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from agent.codec._bytes import BytesFormatError, unpack_bytes
from agent.errors import InvalidRequestError
from protocol.datatypes import DATATYPES, dtype_of
from protocol.manifest import TensorSpec

__all__ = ["InferRequest", "RequestedOutput", "decode_request"]

# Inputs that point at memory the client shares with the server; this server has none.
_SHARED_MEMORY = "shared_memory_region"


@dataclass(frozen=True)
class RequestedOutput:
    """One output the client asked for, and whether it wants it in the binary section."""

    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """An infer request whose inputs match the model signature in name, datatype and shape."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[RequestedOutput, ...] | None  # None: every output of the model
    binary_output_default: bool
    parameters: dict[str, object]


def _little_endian(datatype: str) -> np.dtype[Any]:
    return dtype_of(datatype).newbyteorder("<")


# Per datatype: native dtype, its little-endian wire form, and what JSON values it takes.
_NATIVE = {name: dtype_of(name) for name in DATATYPES}
_WIRE = {name: _little_endian(name) for name in DATATYPES if name != "BYTES"}
_JSON_KINDS = {
    name: "b" if name == "BOOL" else "iu" if name[0] in "IU" else "fiu" for name in _WIRE
}
_INT_RANGE = {
    name: (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    for name, dtype in _WIRE.items()
    if dtype.kind in "iu"
}
_JSON_WHAT = {"b": "true or false", "iu": "integers", "fiu": "numbers"}


def _fail(message: str) -> InvalidRequestError:
    return InvalidRequestError(message)


def _dims(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _names(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(s.name for s in specs)


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def decode_request(
    body: bytes,
    header_length: int | None,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int,
) -> InferRequest:
    """Decode ``body`` and validate it against the model's ``inputs`` and ``outputs``.

    ``header_length`` is the ``Inference-Header-Content-Length`` request header, ``None`` when
    the client sent none. ``max_batch_size`` bounds the first dimension of inputs whose first
    dimension is dynamic; ``0`` or less turns that check off. Arrays handed out are C-contiguous
    and aligned in the model's dtype; binary numeric inputs are read-only views of ``body``.
    BYTES elements come back as ``str``. Every problem raises
    :class:`~agent.errors.InvalidRequestError` naming the tensor and what was expected.
    """
    size = len(body)
    if header_length is None:
        header_length = size
    elif header_length < 0 or header_length > size:
        raise _fail(
            f"Inference-Header-Content-Length {header_length} does not fit the request body of "
            f"{size} bytes: it must be between 0 and the body length"
        )
    try:
        document = orjson.loads(memoryview(body)[:header_length])
    except orjson.JSONDecodeError as e:
        raise _fail(f"request body is not valid JSON: {e}") from None
    if not isinstance(document, dict):
        raise _fail(f"request body must be a JSON object, got {_kind(document)}")

    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _fail(f"request 'id' must be a string, got {_kind(request_id)}")
    parameters = document.get("parameters")
    if parameters is None:
        parameters = {}
    elif not isinstance(parameters, dict):
        raise _fail(f"request 'parameters' must be a JSON object, got {_kind(parameters)}")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise _fail(
            f"request parameter 'binary_data_output' must be true or false, "
            f"got {_kind(binary_default)}"
        )

    decoded = _decode_inputs(document, body, header_length, inputs, max_batch_size)
    requested = _decode_outputs(document.get("outputs"), outputs, binary_default)
    return InferRequest(
        id=request_id,
        inputs=decoded,
        outputs=requested,
        binary_output_default=binary_default,
        parameters=parameters,
    )


def _decode_inputs(
    document: dict[str, Any],
    body: bytes,
    header_length: int,
    specs: Sequence[TensorSpec],
    max_batch_size: int,
) -> dict[str, np.ndarray]:
    entries = document.get("inputs")
    if not isinstance(entries, list):
        what = "is missing" if entries is None else f"must be a list, got {_kind(entries)}"
        raise _fail(f"request 'inputs' {what} (the model takes: {_names(specs)})")
    by_name = {s.name: s for s in specs}
    decoded: dict[str, np.ndarray] = {}
    offset = header_length  # where the next binary input starts in ``body``
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise _fail(f"inputs[{position}] must be a JSON object, got {_kind(entry)}")
        name = entry.get("name")
        if not isinstance(name, str):
            raise _fail(f"inputs[{position}] needs a string 'name'")
        if name in decoded:
            raise _fail(f"input '{name}' appears twice")
        spec = by_name.get(name)
        if spec is None:
            raise _fail(f"unknown input '{name}' (the model takes: {_names(specs)})")
        array, offset = _decode_input(entry, spec, body, offset)
        decoded[name] = array

    missing = [s.name for s in specs if s.name not in decoded]
    if missing:
        word = "input" if len(missing) == 1 else "inputs"
        quoted = ", ".join(f"'{m}'" for m in missing)
        raise _fail(f"missing {word} {quoted} (the model takes: {_names(specs)})")
    if offset != len(body):
        raise _fail(
            f"the request has {len(body) - offset} bytes of binary data that no input's "
            "binary_data_size accounts for"
        )
    if max_batch_size > 0:
        for spec in specs:
            if spec.shape and spec.shape[0] == -1:
                batch = decoded[spec.name].shape[0]
                if batch > max_batch_size:
                    raise _fail(
                        f"batch size {batch} exceeds the model's max batch size {max_batch_size}"
                    )
    return decoded


def _decode_input(
    entry: dict[str, Any], spec: TensorSpec, body: bytes, offset: int
) -> tuple[np.ndarray, int]:
    name = spec.name
    datatype = entry.get("datatype")
    if not isinstance(datatype, str):
        raise _fail(f"input '{name}' needs a string 'datatype' (the model's is {spec.datatype})")
    if datatype != spec.datatype:
        if datatype not in _NATIVE:
            raise _fail(
                f"input '{name}': unknown datatype '{datatype}' (the model's is {spec.datatype})"
            )
        raise _fail(
            f"input '{name}': datatype {datatype} does not match the model's {spec.datatype}"
        )
    shape = _decode_shape(entry.get("shape"), spec)
    count = math.prod(shape)

    params = entry.get("parameters")
    if params is None:
        params = {}
    elif not isinstance(params, dict):
        raise _fail(f"input '{name}': 'parameters' must be a JSON object, got {_kind(params)}")
    if _SHARED_MEMORY in params:
        raise _fail(f"input '{name}': shared memory is not supported; send the data in the body")
    binary_size = params.get("binary_data_size")
    if binary_size is not None:
        if type(binary_size) is not int or binary_size < 0:
            raise _fail(
                f"input '{name}': binary_data_size must be a non-negative integer, "
                f"got {binary_size!r}"
            )
        if "data" in entry:
            raise _fail(
                f"input '{name}' has both 'data' and binary_data_size; send one or the other"
            )
        return _binary_input(spec, shape, count, binary_size, body, offset), offset + binary_size
    if "data" not in entry:
        raise _fail(f"input '{name}' needs 'data' or parameters.binary_data_size")
    return _json_input(spec, shape, count, entry["data"]), offset


def _decode_shape(shape: object, spec: TensorSpec) -> tuple[int, ...]:
    name = spec.name
    if not isinstance(shape, list) or not all(
        type(d) is int
        for d in shape  # bool is an int subclass and is no dimension
    ):
        raise _fail(
            f"input '{name}' needs 'shape' as a list of integers (the model's is "
            f"{_dims(spec.shape)})"
        )
    if any(d < 0 for d in shape):
        raise _fail(f"input '{name}': shape {_dims(shape)} has a negative dimension")
    expected = spec.shape
    if len(shape) != len(expected) or any(
        e != -1 and d != e for d, e in zip(shape, expected, strict=True)
    ):
        raise _fail(
            f"input '{name}': shape {_dims(shape)} does not match the model's {_dims(expected)}"
        )
    return tuple(shape)


def _binary_input(
    spec: TensorSpec, shape: tuple[int, ...], count: int, size: int, body: bytes, offset: int
) -> np.ndarray:
    name = spec.name
    left = len(body) - offset
    if size > left:
        hint = "; is the Inference-Header-Content-Length header set?" if left == 0 else ""
        raise _fail(
            f"input '{name}': binary_data_size {size} runs past the end of the request body "
            f"(only {left} bytes of binary data are left{hint})"
        )
    if spec.datatype == "BYTES":
        try:
            items = unpack_bytes(body, offset, size, count)
        except BytesFormatError as e:
            raise _fail(f"input '{name}': BYTES binary data is malformed: {e}") from None
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape)

    wire = _WIRE[spec.datatype]
    needed = count * wire.itemsize
    if size != needed:
        raise _fail(
            f"input '{name}': binary_data_size {size} does not match shape {_dims(shape)} of "
            f"{spec.datatype} (needs {needed} bytes)"
        )
    if count == 0:
        return np.empty(shape, dtype=_NATIVE[spec.datatype])
    array = np.frombuffer(body, dtype=wire, count=count, offset=offset).reshape(shape)
    if spec.datatype == "BOOL" and array.view(np.uint8).max() > 1:
        raise _fail(f"input '{name}': BOOL binary data holds bytes other than 0 and 1")
    if not wire.isnative or not array.flags.aligned:
        # The JSON header has any length, so the data may start off alignment; kernels that
        # load whole words must not see that, and a copy of one request's tensor is cheap.
        array = array.astype(_NATIVE[spec.datatype])
    return array


def _json_input(spec: TensorSpec, shape: tuple[int, ...], count: int, data: object) -> np.ndarray:
    name = spec.name
    if not isinstance(data, list):
        raise _fail(f"input '{name}': 'data' must be a list, got {_kind(data)}")
    if spec.datatype == "BYTES":
        items: list[str] = []
        _flatten_text(data, items, name)
        array = np.empty(len(items), dtype=object)
        array[:] = items
    else:
        array = _json_numbers(spec, data)
    if array.size != count:
        raise _fail(
            f"input '{name}': shape {_dims(shape)} needs {count} elements but data has {array.size}"
        )
    return array.reshape(shape)


def _json_numbers(spec: TensorSpec, data: list[Any]) -> np.ndarray:
    name, datatype = spec.name, spec.datatype
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise _fail(
            f"input '{name}': 'data' is a ragged nested list; nest it evenly or send it flat"
        ) from None
    kinds = _JSON_KINDS[datatype]
    native = _NATIVE[datatype]
    if raw.size and raw.dtype.kind not in kinds:
        bad = _first_unlike(data, kinds)
        if bad is not None:
            raise _fail(
                f"input '{name}': data for {datatype} must be {_JSON_WHAT[kinds]}, "
                f"found {bad[0]!r} ({_kind(bad[0])})"
            )
        # Only integers, but no single numpy type holds them all (such as -1 beside 2**64 - 1):
        # numpy inferred float64, which the target type may still hold exactly.
        try:
            return np.asarray(data, dtype=native)
        except (OverflowError, ValueError, TypeError):
            least, most = _INT_RANGE[datatype]
            raise _fail(
                f"input '{name}': data for {datatype} holds a value out of range [{least}, {most}]"
            ) from None
    if raw.size and kinds == "iu" and raw.dtype != native:
        # astype would wrap an out-of-range integer around without a word.
        least, most = _INT_RANGE[datatype]
        low, high = int(raw.min()), int(raw.max())
        if low < least or high > most:
            raise _fail(
                f"input '{name}': value {low if low < least else high} is out of range for "
                f"{datatype} [{least}, {most}]"
            )
    return raw.astype(native, copy=False)


def _first_unlike(data: list[Any], kinds: str) -> tuple[object] | None:
    """The first leaf in ``data`` that a tensor of ``kinds`` cannot hold (error path only)."""
    for item in data:
        if isinstance(item, list):
            found = _first_unlike(item, kinds)
            if found is not None:
                return found
        elif isinstance(item, bool):
            if "b" not in kinds:
                return (item,)
        elif isinstance(item, int):
            if "i" not in kinds:
                return (item,)
        elif not (isinstance(item, float) and "f" in kinds):
            return (item,)
    return None


def _flatten_text(data: list[Any], into: list[str], name: str) -> None:
    for item in data:
        if isinstance(item, str):
            into.append(item)
        elif isinstance(item, list):
            _flatten_text(item, into, name)
        else:
            raise _fail(f"input '{name}': data for BYTES must be strings, found {item!r}")


def _decode_outputs(
    entries: object, specs: Sequence[TensorSpec], binary_default: bool
) -> tuple[RequestedOutput, ...] | None:
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise _fail(f"request 'outputs' must be a list, got {_kind(entries)}")
    if not entries:
        return None  # an empty list asks for nothing in particular: every output
    known = {s.name for s in specs}
    requested: list[RequestedOutput] = []
    seen: set[str] = set()
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise _fail(f"outputs[{position}] must be a JSON object with a string 'name'")
        name: str = entry["name"]
        if name not in known:
            raise _fail(
                f"requested output '{name}' does not exist (the model has: {_names(specs)})"
            )
        if name in seen:
            raise _fail(f"output '{name}' is requested twice")
        seen.add(name)
        params = entry.get("parameters")
        binary = binary_default
        if params is not None:
            if not isinstance(params, dict):
                raise _fail(f"output '{name}': 'parameters' must be a JSON object")
            for unsupported in ("classification", _SHARED_MEMORY):
                if unsupported in params:
                    raise _fail(f"output '{name}': parameter '{unsupported}' is not supported")
            binary = params.get("binary_data", binary_default)
            if not isinstance(binary, bool):
                raise _fail(
                    f"output '{name}': parameter 'binary_data' must be true or false, "
                    f"got {_kind(binary)}"
                )
        requested.append(RequestedOutput(name=name, binary=binary))
    return tuple(requested)
