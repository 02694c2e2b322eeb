"""Long vdisk work the console shows as it goes: imports and maintenance commits.

A job is a phase and how far it got (bytes done of a total, the ``vdisk_store.Progress``
callback's figures), then done (with the version) or failed (with the reason). An import
runs in the CLI (``vdisk import`` stages the image on the machine that runs it) and reports
here through the REST API: ``POST /jobs`` starts it, ``PUT /jobs/{id}`` says how far, ``POST
/jobs/{id}/end`` ends it. A commit (``POST /vdisks/{name}/commit``, the console's button)
runs in the registry itself: it stages the maintenance session's writes read from the cache
service (shared/vdisk_commit.py) and publishes them as the next version, as
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
from typing import Any, Literal

from nats.aio.client import Client as NATS

from services.registry.app import RegistryApp
from services.registry.domain.errors import not_found
from shared import vdisk_store
from shared.errors import reason
from shared.vdisk_commit import stage_commit

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
