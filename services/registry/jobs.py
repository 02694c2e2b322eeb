"""Long vdisk work the console shows as it goes: imports and maintenance commits.

A job is a phase and how far it got (bytes done of a total, the ``vdisk_store.Progress``
callback's figures), then done (with the version), failed (with the reason) or interrupted.
An import runs in the CLI (``vdisk import`` stages the image on the machine that runs it)
and reports here through the REST API: ``POST /jobs`` starts it, ``PUT /jobs/{id}`` says
how far, ``POST /jobs/{id}/end`` ends it. A commit (``POST /vdisks/{name}/commit``, the
console's button) runs in the registry itself: it stages the maintenance session's writes
read from the cache service (shared/vdisk_commit.py) and publishes them as the next
version, as ``streamboot vdisk commit`` does.

Jobs live in PostgreSQL (``console_jobs``, beside the event log): a registry restart keeps
them and every registry on the database shows them. Each change is NOTIFYed on
``streamboot_jobs``; every registry listens and wakes its console's live streams.

A running job is kept alive by whoever runs it: the CLI's reports (and a keep-alive while
a phase reports nothing), or the registry process running a commit, which refreshes it
while it runs and marks it interrupted when it stops. A running job nobody refreshed for
``LEASE`` (its CLI or its registry was killed) is marked interrupted: never running forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any, Literal

import asyncpg
from nats.aio.client import Client as NATS

from services.registry.app import RegistryApp
from services.registry.domain.errors import busy, not_found
from services.registry.side_table import SideTable
from shared import vdisk_store
from shared.errors import reason
from shared.vdisk_commit import stage_commit

log = logging.getLogger("streamboot.registry.jobs")

Kind = Literal["import", "commit"]
# A running job with no word from its runner for this long was interrupted. Runners
# refresh it at least every KEEPALIVE_S (the CLI's reporter keeps to it too).
LEASE = timedelta(seconds=60)
KEEPALIVE_S = 15.0
# How often this process writes its own commits' progress (the CLI's reports come at most
# twice a second as well).
FLUSH_S = 0.5
# Finished jobs kept to show; older ones are deleted.
MAX_FINISHED = 50
# Jobs under way at once: a runaway reporter cannot grow the table.
MAX_RUNNING = 100
NOTIFY_CHANNEL = "streamboot_jobs"
SCHEMA_LOCK_KEY = 0x5EB0_10B5
SCHEMA = """
CREATE TABLE IF NOT EXISTS console_jobs (
    id text PRIMARY KEY,
    kind text NOT NULL,
    vdisk text NOT NULL,
    by_name text NOT NULL,
    phase text NOT NULL DEFAULT 'starting',
    done bigint NOT NULL DEFAULT 0,
    total bigint NOT NULL DEFAULT 0,
    state text NOT NULL DEFAULT 'running',   -- running | done | failed | interrupted
    error text,
    version integer,
    runner text,   -- the registry process running it (a commit); NULL: a CLI's (an import)
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS console_jobs_started ON console_jobs (started_at);
"""
COLUMNS = (
    "id, kind, vdisk, by_name, phase, done, total, state, error, version, "
    "extract(epoch FROM started_at)::float8 AS started_at, "
    "extract(epoch FROM updated_at)::float8 AS updated_at"
)
INTERRUPT_STALE = """
UPDATE console_jobs SET state = 'interrupted', updated_at = now(), error = CASE
    WHEN runner IS NULL THEN 'no report for a minute: the import''s CLI stopped'
    ELSE 'no word for a minute: the registry running it stopped' END
WHERE state = 'running' AND updated_at < now() - $1::interval
"""
SessionSource = Callable[[], contextlib.AbstractAsyncContextManager[asyncpg.Connection]]


def view(row: asyncpg.Record) -> dict[str, Any]:
    out = dict(row)
    out["by"] = out.pop("by_name")
    out["percent"] = round(100 * out["done"] / out["total"]) if out["total"] else None
    return out


class Jobs:
    """The jobs of every registry on the database; ``node`` names this process's runs."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        node: str = "registry",
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._pool = pool
        self.runner = f"{node}/{secrets.token_hex(4)}"
        self._on_change = on_change
        self._table = SideTable(SCHEMA, SCHEMA_LOCK_KEY)
        # This process's commits: their latest progress (reported from worker threads),
        # written by the upkeep loop.
        self._mine: dict[str, tuple[str, int, int]] = {}
        self._upkeep_task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()  # set while other registries' changes are heard

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._pool().acquire() as conn:
            await self._table.ready(conn)
            yield conn

    async def _changed(self, conn: asyncpg.Connection, job_id: str) -> None:
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, job_id)
        self._on_change()

    async def start(self, kind: Kind, vdisk: str, by: str, *, here: bool = False) -> dict[str, Any]:
        """A new running job; ``here``: this process runs it (a commit)."""
        job_id = secrets.token_hex(8)
        async with self._conn() as conn, conn.transaction():
            await conn.execute(INTERRUPT_STALE, LEASE)
            running = await conn.fetchval(
                "SELECT count(*) FROM console_jobs WHERE state = 'running'"
            )
            if running >= MAX_RUNNING:
                raise busy(f"{running} imports and commits are under way; wait for one to end", 10)
            row = await conn.fetchrow(
                f"INSERT INTO console_jobs (id, kind, vdisk, by_name, runner) "
                f"VALUES ($1, $2, $3, $4, $5) RETURNING {COLUMNS}",
                job_id, kind, vdisk, by, self.runner if here else None,
            )  # fmt: skip
            await self._changed(conn, job_id)
        if here:
            self._mine[job_id] = ("starting", 0, 0)
        return view(row)

    async def get(self, job_id: str) -> dict[str, Any]:
        async with self._conn() as conn:
            row = await conn.fetchrow(f"SELECT {COLUMNS} FROM console_jobs WHERE id = $1", job_id)
        if row is None:
            raise not_found(f"no job {job_id!r} (finished jobs are kept {MAX_FINISHED} deep)")
        return view(row)

    async def progress(self, job_id: str, phase: str, done: int, total: int) -> dict[str, Any]:
        """A runner's report: how far it got. A report of a job marked interrupted brings it
        back (its runner was only slow); one that ended stays as it ended."""
        async with self._conn() as conn:
            row = await conn.fetchrow(
                f"UPDATE console_jobs SET phase = $2, done = $3, total = $4, state = 'running', "
                f"error = NULL, updated_at = now() "
                f"WHERE id = $1 AND state IN ('running', 'interrupted') RETURNING {COLUMNS}",
                job_id, phase, max(0, done), max(0, total),
            )  # fmt: skip
            if row is not None:
                await self._changed(conn, job_id)
        return view(row) if row is not None else await self.get(job_id)

    def report(self, job_id: str, phase: str, done: int, total: int) -> None:
        """This process's commit's progress (from any thread): written within FLUSH_S."""
        self._mine[job_id] = (phase, done, total)

    async def end(
        self,
        job_id: str,
        *,
        version: int | None = None,
        error: str | None = None,
        interrupted: bool = False,
    ) -> dict[str, Any]:
        state = "interrupted" if interrupted else "failed" if error else "done"
        self._mine.pop(job_id, None)
        async with self._conn() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"UPDATE console_jobs SET state = $2, error = $3, version = $4, updated_at = now() "
                f"WHERE id = $1 AND state IN ('running', 'interrupted') RETURNING {COLUMNS}",
                job_id, state, error, version,
            )  # fmt: skip
            if row is None:
                return await self.get(job_id)
            await conn.execute(
                "DELETE FROM console_jobs WHERE id IN (SELECT id FROM console_jobs "
                "WHERE state <> 'running' ORDER BY updated_at DESC OFFSET $1)",
                MAX_FINISHED,
            )
            await self._changed(conn, job_id)
        return view(row)

    async def list(self, vdisk: str | None = None) -> list[dict[str, Any]]:
        """The newest first, those whose runner went silent marked interrupted."""
        async with self._conn() as conn:
            await conn.execute(INTERRUPT_STALE, LEASE)
            rows = await conn.fetch(
                f"SELECT {COLUMNS} FROM console_jobs WHERE $1::text IS NULL OR vdisk = $1 "
                f"ORDER BY started_at DESC, id LIMIT $2",
                vdisk, MAX_RUNNING + MAX_FINISHED,
            )  # fmt: skip
        return [view(r) for r in rows]

    # --- this process's side: listening, keeping its commits alive, stopping -----------

    def run(self, session: SessionSource) -> None:
        """Listen to every registry's job changes and keep this process's commits alive,
        until :meth:`stop`."""
        self._upkeep_task = asyncio.create_task(self._upkeep(session))

    async def _upkeep(self, session: SessionSource) -> None:
        while True:
            try:
                async with session() as listener:
                    await listener.add_listener(NOTIFY_CHANNEL, lambda *_: self._on_change())
                    self.listening.set()
                    await self._keep_mine()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database went away: try again, the pages refresh
                self.listening.clear()
                log.warning("registry: job upkeep: %s; retrying", reason(exc))
                await asyncio.sleep(5.0)

    async def _keep_mine(self) -> None:
        written: dict[str, tuple[tuple[str, int, int], float]] = {}
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(FLUSH_S)
            for job_id, latest in list(self._mine.items()):
                last, at = written.get(job_id, (None, 0.0))
                if latest != last or loop.time() - at >= KEEPALIVE_S:
                    await self.progress(job_id, *latest)
                    written[job_id] = (latest, loop.time())
            for gone in written.keys() - self._mine.keys():
                del written[gone]

    async def stop(self) -> None:
        """This process stops: its commits under way are interrupted (said at once, not
        after the lease)."""
        if self._upkeep_task is not None:
            self._upkeep_task.cancel()
            with contextlib.suppress(BaseException):
                await self._upkeep_task
        if not self._mine:
            return
        with contextlib.suppress(Exception):
            async with self._conn() as conn:
                await conn.execute(
                    "UPDATE console_jobs SET state = 'interrupted', updated_at = now(), "
                    "error = 'the registry running it stopped' "
                    "WHERE runner = $1 AND state = 'running'",
                    self.runner,
                )
                await self._changed(conn, "")
        self._mine.clear()


async def run_commit(
    app: RegistryApp, nc: NATS, jobs: Jobs, job_id: str, vdisk: str, stage: str | None
) -> None:
    """Stage the vdisk's last maintenance session's writes and publish them (the CLI's
    ``vdisk commit``), reporting each phase to the job."""
    root = app.vdisk_root
    try:
        source = app.commit_source(vdisk)
        kernel = app.vdisk_view(vdisk).get("kernel")
        staged = await stage_commit(
            nc, root, source, lambda phase, done, total: jobs.report(job_id, phase, done, total),
            kernel,
        )  # fmt: skip
        jobs.report(job_id, "publish", 0, 1)
        try:
            published = await app.publish_version(
                vdisk,
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
            await asyncio.to_thread(vdisk_store.discard_staged, root, vdisk, staged.staging)
        await jobs.end(job_id, version=published.get("latest_version", staged.version))
    except Exception as exc:
        log.warning("registry: committing %s failed: %s", vdisk, reason(exc))
        with contextlib.suppress(Exception):
            await jobs.end(job_id, error=reason(exc))
