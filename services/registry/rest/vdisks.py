"""Routes of vdisks and their versions (publish, promote, merge, rollback, policy)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from services.registry.app import RegistryApp
from services.registry.rest.fields import LongText, Name, Text


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
    # What the importer found to boot kernel-direct (shared/boot_files.py);
    # the registry checks the staged files itself.
    boot: BootScanIn | None = None


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


def routes(app: RegistryApp) -> APIRouter:
    r = APIRouter()

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

    return r
