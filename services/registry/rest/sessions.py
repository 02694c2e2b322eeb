"""Routes of boot and replay sessions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from services.registry import audit
from services.registry.app import RegistryApp
from services.registry.console.live import LiveFeed
from services.registry.rest.fields import Name, Text


class SessionIn(BaseModel):
    mac: Name | None = None
    smbios_uuid: Name | None = None
    vdisk: Name | None = None
    maintenance: bool = False


class ReplayIn(BaseModel):
    """A replay session for a past session (``streamboot replay blocks``)."""

    session_id: Name
    stream_node: Text | None = None


def routes(app: RegistryApp, feed: LiveFeed | None = None) -> APIRouter:
    """``feed``: the console's live view, whose stream nodes' totals give a live session's
    bytes before its connections end (None: their SessionDetached sums only)."""
    r = APIRouter()

    # sessions
    @r.get("/sessions")
    async def list_sessions() -> list[dict[str, Any]]:
        sessions = await app.list_sessions_with_usage()
        return feed.view.with_bytes(sessions) if feed is not None else sessions

    @r.post("/sessions", status_code=201)
    async def open_session(body: SessionIn) -> dict[str, Any]:
        audit.answers(201)  # the open's commit carries the request's audit record
        return await app.open_session(
            body.mac, smbios_uuid=body.smbios_uuid, vdisk=body.vdisk, maintenance=body.maintenance
        )

    @r.post("/sessions/replay", status_code=201)
    async def open_replay_session(body: ReplayIn) -> dict[str, Any]:
        return await app.open_replay_session(body.session_id, stream_node=body.stream_node)

    @r.delete("/sessions/{token_or_id}")
    async def close_session(token_or_id: str, reason: str = "closed-by-request") -> dict[str, Any]:
        return await app.close_session(token_or_id, reason)

    return r
