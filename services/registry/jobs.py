"""Long vdisk work the console shows as it goes: imports and maintenance commits.

A job is a phase and how far it got (bytes done of a total, the ``vdisk_store.Progress``
callback's figures), then done (with the version) or failed (with the reason). An import
runs in the CLI (``vdisk import`` stages the image on the machine that runs it) and reports
here through the REST API: ``POST /jobs`` starts it, ``PUT /jobs/{id}`` says how far, ``POST
/jobs/{id}/end`` ends it. A commit (``POST /vdisks/{name}/commit``, the console's button)
runs in the registry itself: it stages the maintenance session's writes read from the cache
service (services/registry/maintenance.py) and publishes them as the next version, as
``streamboot vdisk commit`` does. Each change wakes the console's live streams.

Jobs live in the registry process that runs or hears them (a restart forgets them: the
import or commit itself is recorded in the log when it lands).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Request
from nats.aio.client import Client as NATS
from pydantic import BaseModel, Field

from services.registry import vdisk_store
from services.registry.app import RegistryApp
from services.registry.domain.errors import not_found
from services.registry.maintenance import stage_commit
from shared.errors import reason

if TYPE_CHECKING:
    from services.registry.console.live import LiveFeed

log = logging.getLogger("streamboot.registry.jobs")

# Finished jobs kept to show; the oldest drops out past this.
MAX_FINISHED = 20
# A job nobody reported on for this long is shown as failed (its CLI died).
STALE_S = 600.0


@dataclass
class Job:
    id: str
    kind: Literal["import", "commit"]
    vdisk: str
    by: str
    phase: str = "starting"
    done: int = 0
    total: int = 0
    state: Literal["running", "done", "failed"] = "running"
    error: str | None = None
    version: int | None = None
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def view(self) -> dict[str, Any]:
        out = asdict(self)
        out["percent"] = round(100 * self.done / self.total) if self.total else None
        return out


class Jobs:
    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._on_change = on_change

    def start(self, kind: Literal["import", "commit"], vdisk: str, by: str) -> Job:
        job = Job(secrets.token_hex(8), kind, vdisk, by)
        self._jobs[job.id] = job
        self._trim()
        self._on_change()
        return job

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise not_found(f"no job {job_id!r} (a registry restart forgets them)")
        return job

    def progress(self, job_id: str, phase: str, done: int, total: int) -> Job:
        job = self.get(job_id)
        if job.state == "running":
            job.phase, job.done, job.total = phase, max(0, done), max(0, total)
            job.updated_at = time.time()
            self._on_change()
        return job

    def end(self, job_id: str, *, version: int | None = None, error: str | None = None) -> Job:
        job = self.get(job_id)
        job.state = "failed" if error else "done"
        job.error, job.version = error, version
        job.updated_at = time.time()
        self._trim()
        self._on_change()
        return job

    def list(self, vdisk: str | None = None) -> list[dict[str, Any]]:
        """The newest first; a running job nobody reported on for long shows as failed."""
        now = time.time()
        for job in self._jobs.values():
            if job.state == "running" and now - job.updated_at > STALE_S:
                job.state, job.error = "failed", "no progress reported for 10 min"
        return [
            j.view() for j in reversed(self._jobs.values()) if vdisk is None or j.vdisk == vdisk
        ]

    def _trim(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.state != "running"]
        for k in finished[: max(0, len(finished) - MAX_FINISHED)]:
            del self._jobs[k]


async def run_commit(app: RegistryApp, nc: NATS, jobs: Jobs, job: Job, stage: str | None) -> None:
    """Stage the vdisk's last maintenance session's writes and publish them (the CLI's
    ``vdisk commit``), reporting each phase to ``job``."""
    name = job.vdisk
    root = app.vdisk_root
    try:
        source = app.commit_source(name)
        kernel = app.vdisk_view(name).get("kernel")
        staged = await stage_commit(
            nc, root, source, lambda phase, done, total: jobs.progress(job.id, phase, done, total),
            kernel,
        )  # fmt: skip
        jobs.progress(job.id, "publish", 0, 1)
        try:
            published = await app.publish_version(
                name,
                version=staged.version,
                staging=staged.staging,
                layer=staged.layer,
                size=staged.size,
                checksum=staged.checksum,
                changed_blocks=staged.changed_blocks,
                block_size=staged.block_size,
                stage=stage,
                from_maintenance_session=source["session_id"],
                boot=staged.boot,
            )
        finally:
            await asyncio.to_thread(vdisk_store.discard_staged, root, name, staged.staging)
        jobs.end(job.id, version=published.get("latest_version", staged.version))
    except Exception as exc:
        log.warning("registry: committing %s failed: %s", name, reason(exc))
        jobs.end(job.id, error=reason(exc))


# --- REST ------------------------------------------------------------------------------


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


class CommitIn(BaseModel):
    stage: Literal["maintenance", "test", "production"] | None = None


def add_routes(r: APIRouter, app: RegistryApp, feed: LiveFeed | None) -> None:
    """The jobs' routes; ``feed``: the console's live view, which holds the jobs and the
    registry's NATS connection (None: jobs of this API alone, no commits)."""
    jobs = feed.jobs if feed is not None else Jobs()
    tasks: set[asyncio.Task[None]] = set()

    @r.get("/jobs")
    async def list_jobs(vdisk: str | None = None) -> list[dict[str, Any]]:
        return jobs.list(vdisk)

    @r.post("/jobs", status_code=201)
    async def start_job(body: JobIn, request: Request) -> dict[str, Any]:
        return jobs.start(body.kind, body.vdisk, request.state.principal[0]).view()

    @r.put("/jobs/{job_id}")
    async def job_progress(job_id: str, body: ProgressIn) -> dict[str, Any]:
        return jobs.progress(job_id, body.phase, body.done, body.total).view()

    @r.post("/jobs/{job_id}/end")
    async def end_job(job_id: str, body: EndIn) -> dict[str, Any]:
        return jobs.end(job_id, version=body.version, error=body.error).view()

    @r.post("/vdisks/{name}/commit", status_code=202)
    async def commit(name: str, body: CommitIn, request: Request) -> dict[str, Any]:
        """Commit the vdisk's last maintenance session as its next version, in the
        background: the answer is the job (``GET /jobs``) that shows how far it got."""
        app.commit_source(name)  # refused now, not in the job, when there is none
        bus = feed.nc if feed is not None else None
        if bus is None:
            raise not_found("this registry has no NATS connection to read the write cache")
        job = jobs.start("commit", name, request.state.principal[0])
        task = asyncio.create_task(run_commit(app, bus, jobs, job, body.stage))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return job.view()
