"""Open Inference Protocol v2 request decoding and response encoding, JSON and binary.

Pure functions over bytes and numpy arrays; the HTTP layer reads the
``Inference-Header-Content-Length`` header, calls these, and sets it on the way out.
"""

from __future__ import annotations

from agent.codec.request import InferRequest, RequestedOutput, decode_request
from agent.codec.response import encode_response

__all__ = ["InferRequest", "RequestedOutput", "decode_request", "encode_response"]
