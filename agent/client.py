"""A small OIP v2 client for the agent, over TCP or its Unix socket."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from agent.errors import AgentError
from protocol.datatypes import datatype_of, dtype_of

__all__ = ["AgentClient", "ClientError", "InferResult"]


class ClientError(AgentError):
    """The agent could not be reached or answered with an error."""


@dataclass(frozen=True)
class InferResult:
    model_name: str
    model_version: str
    fallback: bool
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any]


class AgentClient:
    """Talks to one agent; ``socket`` wins over ``url`` when both are given."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8470",
        socket: Path | None = None,
        token: str | None = None,
        timeout: float = 10.0,  # seconds
    ) -> None:
        if socket is not None and not socket.exists():
            raise ClientError(
                f"no agent socket at {socket}; is `edgefleet agent serve` running, "
                "and is that its --socket path?"
            )
        headers = {"authorization": f"Bearer {token}"} if token else {}
        transport = httpx.HTTPTransport(uds=str(socket)) if socket else None
        self.target = f"unix:{socket}" if socket else url
        self._http = httpx.Client(
            base_url="http://agent" if socket else url,
            transport=transport,
            headers=headers,
            timeout=timeout,
        )

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ClientError(
                f"cannot reach the agent at {self.target}: {e}; is `edgefleet agent serve` running?"
            ) from e
        if response.status_code >= 400:
            try:
                message = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise ClientError(f"agent answered {response.status_code}: {message}")
        return response.json()

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "/status")
        return result

    def metadata(self, model: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/v2/models/{model}")
        return result

    def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], version: str | None = None
    ) -> InferResult:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        body = {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype_of(array.dtype),
                    "shape": list(array.shape),
                    "data": array.reshape(-1).tolist(),
                }
                for name, array in inputs.items()
            ]
        }
        doc = self._request("POST", path, json=body)
        outputs = {
            o["name"]: np.asarray(o["data"], dtype=dtype_of(o["datatype"])).reshape(o["shape"])
            for o in doc["outputs"]
        }
        parameters = doc.get("parameters", {})
        return InferResult(
            model_name=doc["model_name"],
            model_version=doc.get("model_version", ""),
            fallback=bool(parameters.get("fallback", False)),
            outputs=outputs,
            parameters=parameters,
        )
