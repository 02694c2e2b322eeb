"""REST routes for many devices at once: a CSV import and collections.

``POST /devices/import`` takes the file's text (``{"csv": "..."}``: the CLI's
``device import FILE.csv`` and the console's upload send the same) and registers every
row in one append, or none: a refused file answers 400 with an error per bad row in
``rows`` (``[{"line", "mac", "error"}]``). ``GET /collections`` lists collections with their
devices and vdisks; ``POST /collections`` creates one, or adds to it, by moving devices into
it and/or assigning it a vdisk (services/registry/domain/collections.py); ``DELETE
/collections/{name}`` ends one (``?release_devices=true``: its devices leave it too) and
``POST /collections/{name}/rename`` gives one another name.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from services.registry.app import RegistryApp
from services.registry.domain import collections, device_import
from services.registry.projection import Projection
from shared.events import DeviceUpdated, Event

# A CSV of the import's most rows stays well under the API's body cap.
MAX_CSV_CHARS = 1 << 20


class DeviceImportIn(BaseModel):
    csv: Annotated[str, Field(max_length=MAX_CSV_CHARS)]


class CollectionIn(BaseModel):
    name: Annotated[str, Field(max_length=64)]
    devices: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=10_000)] = []
    vdisk: Annotated[str | None, Field(max_length=64)] = None


class RenameIn(BaseModel):
    to: Annotated[str, Field(max_length=64)]


async def import_devices(app: RegistryApp, text: str) -> dict[str, Any]:
    rows, columns = device_import.parse(text)
    # The registered events are the decision's, kept to say what was imported.
    decided: list[Event] = []

    def decide(p: Projection) -> list[Event]:
        decided[:] = device_import.register_rows(p, rows, columns)
        return decided

    await app._execute(decide)
    return device_import.summary(decided)


def routes(app: RegistryApp) -> APIRouter:
    r = APIRouter()

    @r.post("/devices/import", status_code=201, response_model=None)
    async def import_device_csv(body: DeviceImportIn) -> dict[str, Any] | JSONResponse:
        try:
            return await import_devices(app, body.csv)
        except device_import.RowErrors as exc:
            return JSONResponse(
                {"error": str(exc)[:500], "kind": exc.kind, "rows": exc.rows}, status_code=400
            )

    @r.get("/collections")
    async def list_collections() -> list[dict[str, Any]]:
        return collections.view(app.projection)

    @r.post("/collections")
    async def join_collection(body: CollectionIn) -> dict[str, Any]:
        await app._execute(lambda p: collections.join(p, body.name, body.devices, body.vdisk))
        return next(c for c in collections.view(app.projection) if c["name"] == body.name)

    @r.delete("/collections/{name}")
    async def delete_collection(name: str, release_devices: bool = False) -> dict[str, Any]:
        """Delete a collection: its vdisks are unassigned; refused (409) while devices
        are in it unless ``release_devices`` (they stay, in no collection)."""
        out: dict[str, Any] = {"name": name}

        def decide(p: Projection) -> list[Event]:
            events = collections.delete(p, name, release_devices=release_devices)
            out["released"] = [e.mac for e in events if isinstance(e, DeviceUpdated)]
            out["unassigned"] = (p.assignments.get(("collection", name)) or {}).get("vdisks", [])
            return events

        await app._execute(decide)
        return out

    @r.post("/collections/{name}/rename")
    async def rename_collection(name: str, body: RenameIn) -> dict[str, Any]:
        """Give a collection another name: its devices and vdisks move with it."""
        await app._execute(lambda p: collections.rename(p, name, body.to))
        return next(c for c in collections.view(app.projection) if c["name"] == body.to)

    return r
