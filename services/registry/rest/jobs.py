"""Routes of imports and commits under way (services/registry/jobs.py): ``GET /jobs``,
the CLI's import reports (``POST /jobs``, ``PUT /jobs/{id}``, ``POST /jobs/{id}/end``) and
the console's maintenance commit (``POST /vdisks/{name}/commit``, answered with its job)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from services.registry.app import RegistryApp
from services.registry.console.live import LiveFeed
from services.registry.domain.errors import not_found
from services.registry.jobs import Jobs, run_commit


class JobIn(BaseModel):
    kind: Literal["import"] = "import"
    vdisk: Annotated[str, Field(max_length=64)]


class ProgressIn(BaseModel):
    phase: Annotated[str, Field(max_length=64)]
    done: Annotated[int, Field(ge=0)]
    total: Annotated[int, Field(ge=0)]


class EndIn(BaseModel):
    version: int | None = None
    error: Annotated[str | None, Field(max_length=1000)] = None
    # Stopped before its end (Ctrl-C): shown as interrupted, not failed.
    interrupted: bool = False


class CommitIn(BaseModel):
    stage: Literal["maintenance", "test", "production"] | None = None


def routes(app: RegistryApp, feed: LiveFeed | None) -> APIRouter:
    """The jobs' routes; ``feed``: the console's live view, which holds the jobs and the
    registry's NATS connection (None: no live view, no commits)."""
    r = APIRouter()
    jobs = feed.jobs if feed is not None else Jobs(lambda: app.store.pool)
    tasks: set[asyncio.Task[None]] = set()

    @r.get("/jobs")
    async def list_jobs(vdisk: str | None = None) -> list[dict[str, Any]]:
        return await jobs.list(vdisk)

    @r.get("/jobs/{job_id}")
    async def show_job(job_id: str) -> dict[str, Any]:
        return await jobs.get(job_id)

    @r.post("/jobs", status_code=201)
    async def start_job(body: JobIn, request: Request) -> dict[str, Any]:
        return await jobs.start(body.kind, body.vdisk, request.state.principal[0])

    @r.put("/jobs/{job_id}")
    async def job_progress(job_id: str, body: ProgressIn) -> dict[str, Any]:
        return await jobs.progress(job_id, body.phase, body.done, body.total)

    @r.post("/jobs/{job_id}/end")
    async def end_job(job_id: str, body: EndIn) -> dict[str, Any]:
        return await jobs.end(
            job_id, version=body.version, error=body.error, interrupted=body.interrupted
        )

    @r.post("/vdisks/{name}/commit", status_code=202)
    async def commit(name: str, body: CommitIn, request: Request) -> dict[str, Any]:
        """Commit the vdisk's last maintenance session as its next version, in the
        background: the answer is the job (``GET /jobs``) that shows how far it got."""
        app.commit_source(name)  # refused now, not in the job, when there is none
        bus = feed.nc if feed is not None else None
        if bus is None:
            raise not_found("this registry has no NATS connection to read the write cache")
        job = await jobs.start("commit", name, request.state.principal[0], here=True)
        task = asyncio.create_task(run_commit(app, bus, jobs, job["id"], name, body.stage))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return job

    return r
