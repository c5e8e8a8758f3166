"""A small synchronous client of the fleet's REST API, for the operator's commands.

Answers are parsed into the same models the API returns. Every failure is a
:class:`FleetApiError` carrying the API's own message, or saying how to reach the service when
it does not answer.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from fleet.api.schemas import (
    DeviceDetail,
    DeviceTelemetry,
    DeviceView,
    LabelChange,
    LabelCount,
    ModelDetail,
    ModelSummary,
    TokenCreated,
)
from fleet.errors import FleetApiError
from fleet.experiments import ExperimentVerdict
from fleet.rollouts.spec import RolloutSpec
from fleet.rollouts.view import RolloutView
from fleet.store import AuditEntry, TokenInfo
from fleet.store.tokens import Role

__all__ = ["DEFAULT_URL", "FleetApiClient", "RolloutCommandName"]

DEFAULT_URL = "http://127.0.0.1:8480"
API_PREFIX = "/api/v1"
RolloutCommandName = Literal["approve", "pause", "resume", "abort"]

T = TypeVar("T")


class FleetApiClient:
    """Calls ``<url>/api/v1`` with ``Authorization: Bearer <token>``."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 30.0,  # seconds
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url + API_PREFIX,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FleetApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- devices -----------------------------------------------------------------------------

    def devices(
        self, *, groups: Iterable[str] = (), tags: Iterable[str] = (), health: Iterable[str] = ()
    ) -> builtins.list[DeviceView]:
        params = {"group": list(groups), "tag": list(tags), "health": list(health)}
        return self._call(list[DeviceView], "GET", "/devices", params=params)

    def device(self, device_id: str) -> DeviceDetail:
        return self._call(DeviceDetail, "GET", f"/devices/{_part(device_id)}")

    def device_telemetry(
        self, device_id: str, *, after: int = 0, limit: int = 100
    ) -> DeviceTelemetry:
        """The device's telemetry stream and up to ``limit`` of its gaps above seq ``after``."""
        return self._call(
            DeviceTelemetry,
            "GET",
            f"/devices/{_part(device_id)}/telemetry",
            params={"after": after, "limit": limit},
        )

    def label(self, device_id: str, change: LabelChange) -> DeviceView:
        return self._call(
            DeviceView, "PATCH", f"/devices/{_part(device_id)}/labels", json=_body(change)
        )

    def groups(self) -> builtins.list[LabelCount]:
        return self._call(list[LabelCount], "GET", "/groups")

    def tags(self) -> builtins.list[LabelCount]:
        return self._call(list[LabelCount], "GET", "/tags")

    # -- models ------------------------------------------------------------------------------

    def models(self) -> builtins.list[ModelSummary]:
        return self._call(list[ModelSummary], "GET", "/models")

    def model(self, name: str) -> ModelDetail:
        return self._call(ModelDetail, "GET", f"/models/{_part(name)}")

    # -- rollouts ----------------------------------------------------------------------------

    def create_rollout(self, spec: RolloutSpec) -> RolloutView:
        return self._call(RolloutView, "POST", "/rollouts", json=_body(spec))

    def rollouts(self, state: str | None = None) -> builtins.list[RolloutView]:
        params = {"state": state} if state else None
        return self._call(list[RolloutView], "GET", "/rollouts", params=params)

    def rollout(self, rollout_id: str) -> RolloutView:
        return self._call(RolloutView, "GET", f"/rollouts/{_part(rollout_id)}")

    def command(
        self, rollout_id: str, command: RolloutCommandName, reason: str | None = None
    ) -> RolloutView:
        return self._call(
            RolloutView,
            "POST",
            f"/rollouts/{_part(rollout_id)}/{command}",
            json={"reason": reason},
        )

    def experiment(self, rollout_id: str) -> ExperimentVerdict:
        return self._call(ExperimentVerdict, "GET", f"/rollouts/{_part(rollout_id)}/experiment")

    # -- audit and tokens --------------------------------------------------------------------

    def audit(self, *, subject: str | None = None, limit: int = 100) -> builtins.list[AuditEntry]:
        params: dict[str, Any] = {"limit": limit}
        if subject is not None:
            params["subject"] = subject
        return self._call(list[AuditEntry], "GET", "/audit", params=params)

    def tokens(self, *, include_revoked: bool = False) -> builtins.list[TokenInfo]:
        params = {"include_revoked": "true" if include_revoked else "false"}
        return self._call(list[TokenInfo], "GET", "/tokens", params=params)

    def create_token(self, name: str, role: Role) -> TokenCreated:
        return self._call(TokenCreated, "POST", "/tokens", json={"name": name, "role": role})

    def revoke_token(self, token_id: str) -> TokenInfo:
        return self._call(TokenInfo, "DELETE", f"/tokens/{_part(token_id)}")

    # -- transport ---------------------------------------------------------------------------

    def _call(
        self,
        kind: type[T] | Any,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
    ) -> T:
        try:
            response = self._http.request(method, path, params=params, json=json)
        except httpx.ConnectError as e:
            raise FleetApiError(
                f"cannot reach the fleet service at {self.url} ({e}); start it with "
                "`edgefleet fleet serve`, or point --url / EDGEFLEET_FLEET_URL at it"
            ) from e
        except httpx.HTTPError as e:
            raise FleetApiError(f"the fleet service at {self.url} did not answer: {e}") from e
        if response.is_error:
            raise _refused(response)
        try:
            parsed: T = TypeAdapter(kind).validate_json(response.content)
        except ValidationError as e:
            raise FleetApiError(
                f"{method} {path} answered with a body this edgefleet cannot read (is the "
                f"service another version?): {e.errors()[0]['msg']}",
                status=response.status_code,
            ) from e
        return parsed


def _refused(response: httpx.Response) -> FleetApiError:
    try:
        body = response.json()
        message, reason = str(body["error"]), str(body.get("reason", ""))
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code}: {response.text[:200] or response.reason_phrase}"
        reason = ""
    return FleetApiError(message, status=response.status_code, reason=reason)


def _body(model: BaseModel) -> Any:
    return model.model_dump(mode="json", by_alias=True, exclude_defaults=True)


def _part(value: str) -> str:
    # Ids and names travel in the path: keep a '/' or '?' from changing which route answers.
    return quote(value, safe="")
