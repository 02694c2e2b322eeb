"""The registry's admin REST API (FastAPI; OpenAPI at /docs).

Every route but ``/health`` (and the docs) needs ``Authorization: Bearer <token>``; the
token comes from ``STREAMBOOT_API_TOKEN``. Domain errors map to statuses by kind:
invalid 400, refused 403, not_found 404, conflict 409; the body is
``{"error": message, "kind": kind}``. Every route is one call into
:class:`~services.registry.app.RegistryApp`, the layer the NATS handlers call too.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from services.registry.app import RegistryApp
from services.registry.domain.errors import DomainError

STATUS = {"invalid": 400, "refused": 403, "not_found": 404, "conflict": 409}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


# --- request bodies --------------------------------------------------------------------


class DeviceIn(BaseModel):
    mac: str
    hostname: str | None = None
    smbios_uuid: str | None = None
    collection: str | None = None
    tester: bool = False
    kernel_args: str | None = None


class DevicePatch(BaseModel):
    hostname: str | None = None
    smbios_uuid: str | None = None
    collection: str | None = None
    tester: bool | None = None
    kernel_args: str | None = None  # "" clears them


class AssignmentIn(BaseModel):
    target_kind: Literal["device", "collection"] = "device"
    target: str
    vdisk: str
    default: bool = False


class BootScanIn(BaseModel):
    kernel_version: str | None = None
    root: str | None = None
    root_fstype: str | None = None
    kernels: list[str] = []
    chosen_by: Literal["newest", "operator"] | None = None
    problem: str | None = None


class VersionIn(BaseModel):
    """A version staged in the store by ``vdisk_store.stage_version`` (the importing CLI)."""

    version: int
    staging: str
    layer: str
    size: int
    checksum: str
    changed_blocks: int
    block_size: int
    stage: Literal["maintenance", "test", "production"] | None = None
    mode: Literal["standard", "private"] = "standard"
    write_cache: Literal["server-ram", "server-disk", "client-ram", "client-disk"] = "server-disk"
    write_cache_persistence: Literal["discard", "keep"] = "discard"
    store: str | None = None  # a new vdisk's store (default local)
    # Set when the version is a maintenance session's writes (`streamboot vdisk commit`).
    from_maintenance_session: str | None = None
    # What the importer found to boot kernel-direct (services/registry/boot_files.py);
    # the registry checks the staged files itself.
    boot: BootScanIn | None = None


class PromoteIn(BaseModel):
    version: int
    to: Literal["test", "production"]


class PolicyIn(BaseModel):
    mode: Literal["standard", "private"] | None = None
    write_cache: Literal["server-ram", "server-disk", "client-ram", "client-disk"] | None = None
    write_cache_persistence: Literal["discard", "keep"] | None = None
    store: str | None = None
    boot_method: Literal["auto", "kernel", "sanboot"] | None = None
    kernel: str | None = None  # "" clears the pick


class SessionIn(BaseModel):
    mac: str | None = None
    smbios_uuid: str | None = None
    vdisk: str | None = None
    maintenance: bool = False


class ReplayIn(BaseModel):
    """A replay session for a past session (``streamboot replay blocks``)."""

    session_id: str
    stream_node: str | None = None


# --- the app ---------------------------------------------------------------------------


def build_api(app: RegistryApp, api_token: str) -> FastAPI:
    api = FastAPI(
        title="streamboot registry",
        description="Devices, vdisks and their versions, assignments, boot sessions.",
        version="0.1.0",
    )
    bearer = HTTPBearer(auto_error=False)

    def authorized(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if creds is None or not secrets.compare_digest(
            creds.credentials.encode(), api_token.encode()
        ):
            raise ApiError(
                401, "missing or wrong API bearer token (see DATA_DIR/api-token)", "unauthorized"
            )

    @api.exception_handler(DomainError)
    async def domain_error(_req: Request, exc: DomainError) -> JSONResponse:
        return JSONResponse({"error": str(exc), "kind": exc.kind}, status_code=STATUS[exc.kind])

    @api.exception_handler(ApiError)
    async def api_error(_req: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(
            {"error": str(exc), "kind": exc.kind}, status_code=exc.status, headers=headers
        )

    @api.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "position": app.projection.position}

    r = APIRouter(dependencies=[Depends(authorized)])

    # devices
    @r.get("/devices")
    async def list_devices() -> list[dict[str, Any]]:
        return app.list_devices()

    @r.post("/devices", status_code=201)
    async def add_device(body: DeviceIn) -> dict[str, Any]:
        return await app.add_device(
            body.mac,
            hostname=body.hostname,
            smbios_uuid=body.smbios_uuid,
            collection=body.collection,
            tester=body.tester,
            kernel_args=body.kernel_args,
        )

    @r.get("/devices/{mac}")
    async def show_device(mac: str) -> dict[str, Any]:
        return app.show_device(mac)

    @r.patch("/devices/{mac}")
    async def update_device(mac: str, body: DevicePatch) -> dict[str, Any]:
        return await app.update_device(mac, **body.model_dump())

    @r.post("/devices/{mac}/disable")
    async def disable_device(mac: str) -> dict[str, Any]:
        return await app.disable_device(mac)

    @r.post("/devices/{mac}/enable")
    async def enable_device(mac: str) -> dict[str, Any]:
        return await app.enable_device(mac)

    @r.delete("/devices/{mac}")
    async def remove_device(mac: str) -> dict[str, Any]:
        return await app.remove_device(mac)

    # assignments
    @r.get("/assignments")
    async def list_assignments() -> list[dict[str, Any]]:
        return app.list_assignments()

    @r.post("/assignments")
    async def assign(body: AssignmentIn) -> dict[str, Any]:
        return await app.assign(body.target_kind, body.target, body.vdisk, default=body.default)

    @r.delete("/assignments/{target_kind}/{target}/{vdisk}")
    async def unassign(
        target_kind: Literal["device", "collection"], target: str, vdisk: str
    ) -> dict[str, Any]:
        return await app.unassign(target_kind, target, vdisk)

    # vdisks
    @r.get("/vdisks")
    async def list_vdisks() -> list[dict[str, Any]]:
        return app.list_vdisks()

    @r.get("/vdisks/{name}")
    async def show_vdisk(name: str) -> dict[str, Any]:
        return app.vdisk_view(name)

    @r.get("/vdisks/{name}/versions")
    async def versions(name: str) -> list[dict[str, Any]]:
        return app.versions(name)

    @r.post("/vdisks/{name}/versions", status_code=201)
    async def publish(name: str, body: VersionIn) -> dict[str, Any]:
        return await app.publish_version(name, **body.model_dump())

    @r.get("/vdisks/{name}/commit-source")
    async def commit_source(name: str) -> dict[str, Any]:
        return app.commit_source(name)

    @r.post("/vdisks/{name}/promote")
    async def promote(name: str, body: PromoteIn) -> dict[str, Any]:
        return await app.promote(name, body.version, body.to)

    @r.post("/vdisks/{name}/rollback")
    async def rollback(name: str) -> dict[str, Any]:
        return await app.rollback(name)

    @r.patch("/vdisks/{name}")
    async def set_policy(name: str, body: PolicyIn) -> dict[str, Any]:
        return await app.set_policy(name, **body.model_dump())

    @r.delete("/vdisks/{name}")
    async def remove_vdisk(name: str) -> dict[str, Any]:
        return await app.remove_vdisk(name)

    # sessions
    @r.get("/sessions")
    async def list_sessions() -> list[dict[str, Any]]:
        return await app.list_sessions_with_usage()

    @r.post("/sessions", status_code=201)
    async def open_session(body: SessionIn) -> dict[str, Any]:
        return await app.open_session(
            body.mac, smbios_uuid=body.smbios_uuid, vdisk=body.vdisk, maintenance=body.maintenance
        )

    @r.post("/sessions/replay", status_code=201)
    async def open_replay_session(body: ReplayIn) -> dict[str, Any]:
        return await app.open_replay_session(body.session_id, stream_node=body.stream_node)

    @r.delete("/sessions/{token_or_id}")
    async def close_session(token_or_id: str, reason: str = "closed-by-request") -> dict[str, Any]:
        return await app.close_session(token_or_id, reason)

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
        }

    api.include_router(r)
    return api
