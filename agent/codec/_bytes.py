"""The wire form of BYTES tensors in Triton's binary data extension.

Each element is a 4-byte little-endian length followed by that many bytes, elements in
row-major order, nothing between them.
"""

from __future__ import annotations

import struct

import numpy as np

__all__ = ["BytesFormatError", "pack_bytes", "unpack_bytes"]

_LENGTH = struct.Struct("<I")


class BytesFormatError(ValueError):
    """The serialized elements do not add up; the message says where they stop making sense."""


def unpack_bytes(buffer: bytes | memoryview, start: int, size: int, count: int) -> list[str]:
    """Read ``count`` length-prefixed elements from ``buffer[start:start + size]`` as UTF-8 text.

    Elements come back as ``str`` because ONNX string tensors are UTF-8 text and ONNX Runtime
    turns a ``bytes`` element into its ``repr``.
    """
    end = start + size
    pos = start
    items: list[str] = []
    unpack = _LENGTH.unpack_from
    for index in range(count):
        if pos + 4 > end:
            raise BytesFormatError(
                f"element {index} has no 4-byte length prefix (the data holds {index} of "
                f"{count} elements)"
            )
        (length,) = unpack(buffer, pos)
        pos += 4
        if pos + length > end:
            raise BytesFormatError(
                f"element {index} claims {length} bytes but only {end - pos} remain"
            )
        try:
            items.append(str(buffer[pos : pos + length], "utf-8"))
        except UnicodeDecodeError as e:
            raise BytesFormatError(f"element {index} is not valid UTF-8 text ({e.reason})") from e
        pos += length
    if pos != end:
        raise BytesFormatError(f"{end - pos} bytes are left over after {count} elements")
    return items


def _element_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    return str(item).encode()


def pack_bytes(array: np.ndarray) -> bytes:
    """Serialize every element of ``array`` (``str``, ``bytes`` or anything ``str()`` accepts)."""
    parts: list[bytes] = []
    pack = _LENGTH.pack
    for item in array.ravel().tolist():
        data = _element_bytes(item)
        parts.append(pack(len(data)))
        parts.append(data)
    return b"".join(parts)
