"""Routes of the event log (the console's Events and Audit pages) and the registry itself
(status, projection rebuild)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from services.registry.app import RegistryApp
from shared.identity import normalize_mac


def routes(app: RegistryApp) -> APIRouter:
    r = APIRouter()

    # the event log (the console's Events and Audit pages; the CLI reads it directly)
    @r.get("/events")
    async def events(
        after: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
        type: Annotated[str | None, Query(max_length=64)] = None,
        mac: Annotated[str | None, Query(max_length=64)] = None,
        newest: bool = False,
    ) -> list[dict[str, Any]]:
        return await app.events(
            after=after, limit=limit, type_=type, mac=mac and normalize_mac(mac), newest=newest
        )

    # the registry itself
    @r.post("/registry/rebuild")
    async def rebuild() -> dict[str, Any]:
        return await app.rebuild()

    @r.get("/registry/status")
    async def status() -> dict[str, Any]:
        p = app.projection
        return {
            "position": p.position,
            "devices": len(p.devices),
            "vdisks": len(p.vdisks),
            "live_sessions": len(p.sessions),
            "vdisk_root": str(app.vdisk_root),
            "projection_errors": app.projection_errors(),
        }

    return r
