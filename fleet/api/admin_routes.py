"""``/me`` (who is calling), ``/audit`` (who changed what) and ``/tokens`` (who may call the
API, admins only)."""

# No `from __future__ import annotations`: FastAPI reads these routes' annotations at run time,
# and they name dependencies local to the router factory.

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from fleet.api.context import ApiContext
from fleet.api.schemas import TokenCreate, TokenCreated
from fleet.store import AuditEntry, TokenInfo

__all__ = ["admin_routes"]


def admin_routes(ctx: ApiContext) -> APIRouter:
    """The routes ``/me``, and under ``/audit`` and ``/tokens``."""
    router = APIRouter()
    viewer = Depends(ctx.auth.requires("viewer"))
    admin = Depends(ctx.auth.requires("admin"))
    store = ctx.store

    @router.get("/me", tags=["tokens"])
    async def who_am_i(caller: Annotated[TokenInfo, viewer]) -> TokenInfo:
        """The calling token: its name and role (what the console signs in with)."""
        return caller

    @router.get("/audit", tags=["audit"], dependencies=[viewer])
    async def audit_log(
        subject: Annotated[str | None, Query(description="about this subject only")] = None,
        actor: Annotated[str | None, Query(description="by this actor only")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        before_id: Annotated[
            int | None, Query(description="older than this entry: pass the last id seen")
        ] = None,
    ) -> list[AuditEntry]:
        """Audit entries, newest first."""
        return store.audit.find(subject=subject, actor=actor, limit=limit, before_id=before_id)

    @router.get("/tokens", tags=["tokens"], dependencies=[admin])
    async def list_tokens(include_revoked: bool = False) -> list[TokenInfo]:
        """Every API token (never its secret), oldest first."""
        return store.tokens.list(include_revoked=include_revoked)

    @router.post("/tokens", tags=["tokens"], status_code=201)
    async def create_token(
        request: TokenCreate, caller: Annotated[TokenInfo, admin]
    ) -> TokenCreated:
        """Make a token; its secret is in this response and nowhere else, ever."""
        new = store.tokens.create(request.name, request.role, caller.name)
        store.audit.record(
            caller.name,
            "token.created",
            new.info.id,
            {"name": new.info.name, "role": new.info.role},
        )
        return TokenCreated(token=new.info, secret=new.secret)

    @router.delete("/tokens/{token_id}", tags=["tokens"])
    async def revoke_token(token_id: str, caller: Annotated[TokenInfo, admin]) -> TokenInfo:
        """Revoke a token: the next request with it is refused."""
        before = store.tokens.get(token_id)
        revoked = store.tokens.revoke(token_id)
        if before.active:
            store.audit.record(
                caller.name, "token.revoked", token_id, {"name": revoked.name, "role": revoked.role}
            )
        return revoked

    return router
