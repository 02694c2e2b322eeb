"""Routes of devices, their CHAP credentials and their vdisk assignments."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel

from services.registry.app import RegistryApp
from services.registry.rest.fields import LongText, Name, Text


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


class MaintenanceIn(BaseModel):
    """``on``: the device's next PXE boots open a maintenance session on its default vdisk."""

    on: bool


def routes(app: RegistryApp) -> APIRouter:
    r = APIRouter()

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

    return r
