"""Routes of boot and replay sessions."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.registry import audit
from services.registry.app import RegistryApp
from services.registry.console.live import LiveFeed
from services.registry.domain.errors import DomainError
from services.registry.rest.fields import Name, Text, domain_error_response


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
        return await _open(app, body)

    @r.post("/sessions/replay", status_code=201)
    async def open_replay_session(body: ReplayIn) -> dict[str, Any]:
        return await app.open_replay_session(body.session_id, stream_node=body.stream_node)

    @r.delete("/sessions/{token_or_id}")
    async def close_session(token_or_id: str, reason: str = "closed-by-request") -> dict[str, Any]:
        return await app.close_session(token_or_id, reason)

    return r


async def _open(app: RegistryApp, body: SessionIn) -> dict[str, Any]:
    audit.answers(201)  # the open's commit carries the request's audit record
    return await app.open_session(
        body.mac, smbios_uuid=body.smbios_uuid, vdisk=body.vdisk, maintenance=body.maintenance
    )


class OpenSessionRoute:
    """``POST /sessions`` with a well-formed JSON body, answered without FastAPI's router,
    dependency solving and response encoding: in a storm of REST opens they cost the
    registry more CPU than the open. Behind the gate like every route (token, role, body
    cap, audit). Anything else, a body that is not a valid ``SessionIn`` or a client gone
    mid-body included, goes on to FastAPI with what was read, which answers it as it
    always has (OpenAPI documents the route there too)."""

    def __init__(self, app: ASGIApp, registry: RegistryApp) -> None:
        self.app = app
        self._registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/sessions":
            await self.app(scope, receive, send)
            return
        received: list[Message] = []
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        body = None
        if message["type"] == "http.request":  # else the client went away
            body = _session_in(scope, b"".join(m.get("body", b"") for m in received))
        if body is None:
            await self.app(scope, _replayed(received, receive), send)
            return
        try:
            answer = await _open(self._registry, body)
        except DomainError as exc:
            await domain_error_response(exc)(scope, receive, send)
            return
        data = orjson.dumps(answer, option=orjson.OPT_NON_STR_KEYS)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": data})


def _session_in(scope: Scope, raw: bytes) -> SessionIn | None:
    """The body as a ``SessionIn`` if it is a JSON object that is one (else None)."""
    for key, value in scope["headers"]:
        if key == b"content-type":
            if value.split(b";")[0].strip().lower() != b"application/json":
                return None
            break
    else:
        return None
    try:
        decoded = orjson.loads(raw)
        return SessionIn.model_validate(decoded) if isinstance(decoded, dict) else None
    except (orjson.JSONDecodeError, ValidationError):
        return None


def _replayed(received: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives the messages read already, then the client's own."""
    pending = list(received)

    async def again() -> Message:
        return pending.pop(0) if pending else await receive()

    return again
