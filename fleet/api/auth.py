"""Who is calling: ``Authorization: Bearer efa_...`` checked against the API tokens, and the
token's role against what the route needs (``viewer`` < ``operator`` < ``admin``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fleet.errors import AuthenticationError, PermissionDeniedError
from fleet.store import Store, TokenInfo
from fleet.store.tokens import Role, role_allows

__all__ = ["Authorizer"]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="api_token",
    description="An API token: `Authorization: Bearer efa_...` (`edgefleet fleet tokens create`).",
)


class Authorizer:
    """Makes the dependency each route declares: ``Depends(auth.requires("operator"))``."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def requires(self, role: Role) -> Callable[..., Awaitable[TokenInfo]]:
        """A dependency returning the caller's token, refusing callers below ``role``."""
        store = self._store

        # Async so the store is used on the event loop thread, as everywhere in the service.
        async def caller(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        ) -> TokenInfo:
            if credentials is None:
                raise AuthenticationError(
                    "this request needs an API token: send `Authorization: Bearer efa_...`; the "
                    "first admin token is in <home>/admin.token, and an admin makes more with "
                    "`edgefleet fleet tokens create NAME --role viewer`"
                )
            token = store.tokens.authenticate(credentials.credentials)
            if not role_allows(token.role, role):
                raise PermissionDeniedError(
                    f"the API token {token.name!r} has the role {token.role}, and this needs "
                    f"{role} or above; ask an admin for a token with that role"
                )
            return token

        return caller
