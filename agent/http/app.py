"""The ASGI application: OIP v2 routes, Triton's config/stats extensions, ``/metrics``.

Written directly against ASGI rather than a web framework: this is the serving hot path, and a
request should cost little more than parsing its body and running the model.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from agent.codec import decode_request, encode_response
from agent.errors import (
    AgentError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotReadyError,
    PayloadTooLargeError,
    UnauthorizedError,
)
from agent.http.errors import error_response
from agent.http.views import model_config, model_metadata, model_stats, server_metadata
from agent.service import Agent
from agent.telemetry.outcome import record_outcome

__all__ = ["AgentApp"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_JSON = (b"content-type", b"application/json")
_OCTETS = (b"content-type", b"application/octet-stream")
_PROMETHEUS = (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
_HEADER_LENGTH = b"inference-header-content-length"


class AgentApp:
    """Routes a request to its handler; every error goes through :func:`error_response`."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        token = agent.settings.token
        self._token = f"Bearer {token.get_secret_value()}".encode() if token else None
        self._max_body = agent.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is handled by the server that runs the agent
            return
        try:
            status, headers, body = await self._route(scope, receive)
        except Exception as e:  # noqa: BLE001 — the one place exceptions become responses
            status, extra, body = error_response(e)
            headers = [_JSON, *extra]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _route(self, scope: Scope, receive: Receive) -> tuple[int, Headers, bytes]:
        path: str = scope["path"]
        method: str = scope["method"]
        parts = path.strip("/").split("/")
        if parts[0] == "v2" and len(parts) > 1 and parts[1] == "health":
            return self._health(parts, method)
        self._authorize(scope)
        if parts[0] == "v2" and len(parts) > 2 and parts[1] == "models":
            return await self._model_route(parts[2:], method, scope, receive)
        if method == "GET":
            if parts == ["v2"]:
                return _json(server_metadata())
            if parts == ["metrics"]:
                return 200, [_PROMETHEUS], self.agent.metrics.render()
            if parts == ["status"]:
                return 200, [_JSON], self.agent.status().model_dump_json().encode()
        raise _not_found(method, path)

    def _health(self, parts: list[str], method: str) -> tuple[int, Headers, bytes]:
        if method != "GET" or len(parts) != 3 or parts[2] not in ("live", "ready"):
            raise _not_found(method, "/" + "/".join(parts))
        if parts[2] == "live":
            return _json({"live": True})
        ready = self.agent.ready
        return _json({"ready": ready}, 200 if ready else 503)

    def _authorize(self, scope: Scope) -> None:
        if self._token is None:
            return
        for key, value in scope["headers"]:
            if key == b"authorization" and hmac.compare_digest(value, self._token):
                return
        raise UnauthorizedError(
            "missing or wrong bearer token: send 'Authorization: Bearer <token>'"
        )

    async def _model_route(
        self, parts: list[str], method: str, scope: Scope, receive: Receive
    ) -> tuple[int, Headers, bytes]:
        name, rest = parts[0], parts[1:]
        if name == "stats" and not rest and method == "GET":  # Triton: stats of every model
            return _json(model_stats(self.agent, None))
        version = None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        action = rest[0] if len(rest) == 1 else None if not rest else "?"
        if action == "infer" and method == "POST":
            return await self._infer(name, version, scope, receive)
        if action == "outcome" and method == "POST":
            body = await self._read_body(receive)
            return _json(record_outcome(self.agent, name, version, body))
        if method != "GET" or action not in (None, "ready", "config", "stats"):
            raise _not_found(method, scope["path"])
        if action == "ready":
            try:
                self.agent.get(name, version)
            except ModelNotReadyError:
                return _json({"name": name, "ready": False}, 503)
            return _json({"name": name, "ready": True})
        served = self.agent.get(name, version)
        if action == "config":
            return _json(model_config(served))
        if action == "stats":
            return _json(model_stats(self.agent, served))
        return _json(model_metadata(served))

    async def _infer(
        self, name: str, version: str | None, scope: Scope, receive: Receive
    ) -> tuple[int, Headers, bytes]:
        started = time.perf_counter()
        header_length: int | None = None
        declared = 0
        for key, value in scope["headers"]:
            if key == _HEADER_LENGTH:
                header_length = _int_header(value, "Inference-Header-Content-Length")
            elif key == b"content-length":
                declared = _int_header(value, "Content-Length")
        if declared > self._max_body:
            raise _too_large(declared, self._max_body)
        served = self.agent.get(name, version)
        body = await self._read_body(receive)
        manifest = served.serving.manifest
        # Only batchable models bound dimension 0; for the others it is the model's own business.
        max_batch = manifest.max_batch_size if manifest.batchable else 0
        request = decode_request(body, header_length, manifest.inputs, manifest.outputs, max_batch)
        rows = next(iter(request.inputs.values())).shape[0] if manifest.batchable else 1
        answer = await served.infer(request.inputs, rows)
        parameters: dict[str, object] = {"fallback": answer.fallback}
        if answer.reason is not None:
            parameters["fallback_reason"] = answer.reason
        out, out_header_length = encode_response(
            model_name=answer.model_name,
            model_version=answer.model_version,
            request=request,
            outputs=answer.outputs,
            output_specs=answer.output_specs,
            parameters=parameters,
        )
        served.observe_latency(time.perf_counter() - started)
        if out_header_length is None:
            return 200, [_JSON], out
        return 200, [_OCTETS, (_HEADER_LENGTH, str(out_header_length).encode())], out

    async def _read_body(self, receive: Receive) -> bytes:
        message = await receive()
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            return body
        chunks = [body]
        size = len(body)
        while message.get("more_body", False):
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise _too_large(size, self._max_body)
            chunks.append(chunk)
        return b"".join(chunks)


def _json(document: object, status: int = 200) -> tuple[int, Headers, bytes]:
    return status, [_JSON], orjson.dumps(document)


def _int_header(value: bytes, name: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise InvalidRequestError(f"header {name} must be a whole number, got {value!r}") from None
    if number < 0:
        raise InvalidRequestError(f"header {name} must not be negative")
    return number


def _too_large(size: int, limit: int) -> AgentError:
    return PayloadTooLargeError(
        f"request body of {size} bytes exceeds the agent's limit of {limit} bytes "
        "(raise it with --max-body-mb)"
    )


def _not_found(method: str, path: str) -> AgentError:
    return ModelNotFoundError(f"no route for {method} {path}; see GET /v2 and the API docs")
