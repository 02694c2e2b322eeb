"""The registry's admin REST API (FastAPI; OpenAPI at /docs).

Every route but ``/health`` (and the docs) needs ``Authorization: Bearer <token>`` of a
role that may call it: :mod:`services.registry.gate` checks that from the request head,
caps the body and records the audit trail. Domain errors map to statuses by kind:
invalid 400, refused 403, not_found 404, conflict 409, busy 503 with ``Retry-After`` (a
session open refused by back-pressure: nothing was opened); the body is
``{"error": message, "kind": kind}``. A body that does not fit its model is 400 too, with
a message naming the fields and the problems, never the input itself. Every route is one
call into :class:`~services.registry.app.RegistryApp`, the layer the NATS handlers call too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field

from services.registry.app import RegistryApp
from services.registry.console import LiveFeed, Logins, mount_console
from services.registry.domain.errors import DomainError
from services.registry.domain.identity import normalize_mac
from services.registry.gate import Gate, check_token

STATUS = {"invalid": 400, "refused": 403, "not_found": 404, "conflict": 409, "busy": 503}
# An error message quotes what it refuses; past this it is cut (the input is the caller's).
MAX_ERROR_CHARS = 500
MAX_LISTED_ERRORS = 5

# Identifiers (MACs, names, ids) and file names: bounded, so no error quotes a big input.
Name = Annotated[str, Field(max_length=64)]
Text = Annotated[str, Field(max_length=255)]
# Kernel command lines and the importer's notes.
LongText = Annotated[str, Field(max_length=4096)]


def clip(message: str) -> str:
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 1] + "…"


def validation_message(errors: Any) -> str:
    """What is wrong with a request, by field: pydantic's messages without the input."""
    parts = [
        f"{'.'.join(str(x) for x in e.get('loc', ()))[:100]}: {str(e.get('msg', 'invalid'))[:200]}"
        for e in errors[:MAX_LISTED_ERRORS]
    ]
    more = len(errors) - MAX_LISTED_ERRORS
    return "invalid request: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


# --- request bodies --------------------------------------------------------------------


class DeviceIn(BaseModel):
    mac: Name
    hostname: Name | None = None
    smbios_uuid: Name | None = None
    collection: Name | None = None
    tester: bool = False
    kernel_args: LongText | None = None


class DevicePatch(BaseModel):
    hostname: Name | None = None
    smbios_uuid: Name | None = None
    collection: Name | None = None
    tester: bool | None = None
    kernel_args: LongText | None = None  # "" clears them


class ChapIn(BaseModel):
    user: Text
    secret: Name
    reverse_user: Text | None = None
    reverse_secret: Name | None = None


class AssignmentIn(BaseModel):
    target_kind: Literal["device", "collection"] = "device"
    target: Name
    vdisk: Name
    default: bool = False


class BootScanIn(BaseModel):
    kernel_version: Text | None = None
    root: Text | None = None
    root_fstype: Name | None = None
    kernels: Annotated[list[Text], Field(max_length=256)] = []
    chosen_by: Literal["newest", "operator"] | None = None
    problem: LongText | None = None


class VersionIn(BaseModel):
    """A version staged in the store by ``vdisk_store.stage_version`` (the importing CLI)."""

    version: int
    staging: Text
    layer: Text
    size: int
    checksum: Text
    changed_blocks: int
    block_size: int
    stage: Literal["maintenance", "test", "production"] | None = None
    mode: Literal["standard", "private"] = "standard"
    write_cache: Literal["server-ram", "server-disk", "client-ram", "client-disk"] = "server-disk"
    write_cache_persistence: Literal["discard", "keep"] = "discard"
    store: Name | None = None  # a new vdisk's store (default local)
    # Set when the version is a maintenance session's writes (`streamboot vdisk commit`).
    from_maintenance_session: Name | None = None
    # What the importer found to boot kernel-direct (services/registry/boot_files.py);
    # the registry checks the staged files itself.
    boot: BootScanIn | None = None


class MaintenanceIn(BaseModel):
    """``on``: the device's next PXE boots open a maintenance session on its default vdisk."""

    on: bool


class MergeIn(BaseModel):
    upto: int | None = None  # default: the production version


class PromoteIn(BaseModel):
    version: int
    to: Literal["test", "production"]


class PolicyIn(BaseModel):
    mode: Literal["standard", "private"] | None = None
    write_cache: Literal["server-ram", "server-disk", "client-ram", "client-disk"] | None = None
    write_cache_persistence: Literal["discard", "keep"] | None = None
    store: Name | None = None
    boot_method: (
        Literal["auto", "kernel", "sanboot", "sanboot-iscsi", "nbdroot", "iscsi-ibft"] | None
    ) = None
    kernel: Text | None = None  # "" clears the pick


class SessionIn(BaseModel):
    mac: Name | None = None
    smbios_uuid: Name | None = None
    vdisk: Name | None = None
    maintenance: bool = False


class ReplayIn(BaseModel):
    """A replay session for a past session (``streamboot replay blocks``)."""

    session_id: Name
    stream_node: Text | None = None


class TokenIn(BaseModel):
    name: Name
    role: Literal["admin", "operator", "viewer"]


# --- the app ---------------------------------------------------------------------------


def build_api(
    app: RegistryApp, api_token: str, max_body_bytes: int, feed: LiveFeed | None = None
) -> FastAPI:
    """The API and the web console at ``/``; ``api_token`` is the built-in admin's
    (bootstrap-admin) token, ``feed`` the console's live view (None: nothing live)."""
    api = FastAPI(
        title="streamboot registry",
        description="Devices, vdisks and their versions, assignments, boot sessions.",
        version="0.1.0",
        # /docs and /redoc are the console's, from assets shipped in the package.
        docs_url=None,
        redoc_url=None,
    )
    logins = Logins()
    api.add_middleware(
        Gate,
        bootstrap_token=api_token,
        authenticate=app.api_principal,
        audit=app.record_admin_action,
        max_body_bytes=max_body_bytes,
        cookie_login=logins.from_scope,
    )
    mount_console(
        api, app, logins, lambda token: check_token(token, api_token, app.api_principal), feed
    )

    @api.exception_handler(DomainError)
    async def domain_error(_req: Request, exc: DomainError) -> JSONResponse:
        retry = {} if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
        return JSONResponse(
            {"error": clip(str(exc)), "kind": exc.kind},
            status_code=STATUS[exc.kind],
            headers=retry,
        )

    @api.exception_handler(RequestValidationError)
    async def bad_request(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"error": validation_message(exc.errors()), "kind": "invalid"}, status_code=400
        )

    @api.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "position": app.projection.position}

    # The gate checks the token; this only shows the bearer scheme in the OpenAPI docs.
    r = APIRouter(dependencies=[Depends(HTTPBearer(auto_error=False))])

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

    @r.post("/devices/{mac}/maintenance")
    async def device_maintenance(mac: str, body: MaintenanceIn) -> dict[str, Any]:
        return await app.set_device_maintenance(mac, body.on)

    @r.post("/devices/{mac}/wake")
    async def wake_device(mac: str) -> dict[str, Any]:
        return await app.wake_device(mac)

    @r.delete("/devices/{mac}")
    async def remove_device(mac: str) -> dict[str, Any]:
        return await app.remove_device(mac)

    # CHAP credentials of iSCSI logins (the secrets are write-only: no answer shows them)
    async def set_chap(kind: str, target: str, body: ChapIn) -> dict[str, Any]:
        return await app.set_chap(kind, target, **body.model_dump())

    @r.put("/devices/{mac}/chap")
    async def set_device_chap(mac: str, body: ChapIn) -> dict[str, Any]:
        return await set_chap("device", mac, body)

    @r.delete("/devices/{mac}/chap")
    async def clear_device_chap(mac: str) -> dict[str, Any]:
        return await app.clear_chap("device", mac)

    @r.get("/collections/{name}/chap")
    async def show_collection_chap(name: str) -> dict[str, Any]:
        return app.chap_view("collection", name)

    @r.put("/collections/{name}/chap")
    async def set_collection_chap(name: str, body: ChapIn) -> dict[str, Any]:
        return await set_chap("collection", name, body)

    @r.delete("/collections/{name}/chap")
    async def clear_collection_chap(name: str) -> dict[str, Any]:
        return await app.clear_chap("collection", name)

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

    @r.post("/vdisks/{name}/merge")
    async def merge(name: str, body: MergeIn) -> dict[str, Any]:
        return await app.merge_vdisk(name, body.upto)

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

    api.include_router(r)
    return api
