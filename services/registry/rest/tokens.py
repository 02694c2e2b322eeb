"""Routes of the admin API tokens (admin only, by the gate)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel

from services.registry.app import RegistryApp
from services.registry.rest.fields import Name


class TokenIn(BaseModel):
    name: Name
    role: Literal["admin", "operator", "viewer"]


def routes(app: RegistryApp) -> APIRouter:
    r = APIRouter()

    # admin API tokens (admin only, by the gate)
    @r.get("/tokens")
    async def list_tokens() -> list[dict[str, Any]]:
        return app.list_api_tokens()

    @r.post("/tokens", status_code=201)
    async def create_token(body: TokenIn, request: Request) -> dict[str, Any]:
        return await app.create_api_token(body.name, body.role, by=request.state.principal[0])

    @r.delete("/tokens/{name}")
    async def revoke_token(name: str, request: Request) -> dict[str, Any]:
        return await app.revoke_api_token(name, by=request.state.principal[0])

    return r
