"""Open Inference Protocol v2 datatype names and their numpy equivalents."""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["DATATYPES", "Datatype", "datatype_of", "dtype_of"]

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64",
    "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip

_TO_NUMPY: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
_FROM_NUMPY = {dtype: name for name, dtype in _TO_NUMPY.items()}

DATATYPES: tuple[str, ...] = tuple(_TO_NUMPY)


def dtype_of(datatype: str) -> np.dtype[np.generic]:
    """The numpy dtype for an OIP v2 datatype name; raises ``KeyError`` for an unknown name."""
    return _TO_NUMPY[datatype]


def datatype_of(dtype: np.dtype[np.generic] | type) -> str:
    """The OIP v2 datatype name for a numpy dtype; raises ``KeyError`` when there is none."""
    dt = np.dtype(dtype)
    if dt.kind in ("U", "S"):
        return "BYTES"
    return _FROM_NUMPY[dt]
