"""Imports and commits (services/registry/jobs.py) live in PostgreSQL: a second registry on
the same database and a restarted one show them; a job whose runner went silent, stopped
or was interrupted shows as interrupted, never as running forever."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from services.registry.jobs import Jobs
from shared.event_store import EventStore
from streamboot.embedded.proc import free_port
from streamboot.job_progress import reporting
from streamboot.registry_api import RegistryClient
from tests.conftest import wait_for
from tests.registry.conftest import TOKEN, Registry, start_registry


def api(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"})


async def jobs_of(url: str) -> list[dict[str, Any]]:
    async with api(url) as http:
        answer = await http.get("/jobs")
    assert answer.status_code == 200, answer.text
    return answer.json()


async def test_jobs_outlive_a_restart_and_every_registry_shows_them(registry: Registry) -> None:
    async with registry.http() as http:
        job = (await http.post("/jobs", json={"kind": "import", "vdisk": "big"})).json()
        await http.put(f"/jobs/{job['id']}", json={"phase": "copy", "done": 30, "total": 120})
    other = registry.settings.model_copy(
        update={"api_port": free_port(), "node_id": registry.settings.node_id + "-b"}
    )
    other_url = f"http://127.0.0.1:{other.api_port}"
    b = await start_registry(other)
    try:
        [seen] = await jobs_of(other_url)
        assert (seen["id"], seen["state"], seen["phase"], seen["percent"]) == (
            job["id"], "running", "copy", 25,
        )  # fmt: skip
        # B ends it and restarts; both show how it ended.
        async with api(other_url) as http_b:
            await http_b.post(f"/jobs/{job['id']}/end", json={"version": 1})
        await b.stop()
        b = await start_registry(other)
        for url in (registry.api_url, other_url):
            [ended] = await jobs_of(url)
            assert (ended["state"], ended["version"], ended["by"]) == ("done", 1, "bootstrap-admin")
        # The CLI lists the same.
        code, out, _ = await registry.cli("job", "list")
        assert code == 0 and job["id"] in out and "v1" in out, out
    finally:
        await b.stop()


async def test_a_job_whose_runner_went_silent_is_interrupted(registry: Registry) -> None:
    async with registry.http() as http:
        job = (await http.post("/jobs", json={"kind": "import", "vdisk": "big"})).json()
        await http.put(f"/jobs/{job['id']}", json={"phase": "hash", "done": 50, "total": 100})
        # Its CLI was killed: no report since, well past the lease.
        async with registry.app.store.pool.acquire() as conn:
            await conn.execute("UPDATE console_jobs SET updated_at = now() - interval '2 min'")
        [seen] = (await http.get("/jobs")).json()
        assert seen["state"] == "interrupted" and "CLI stopped" in seen["error"], seen
        assert seen["phase"] == "hash" and seen["percent"] == 50
        # A late report proves it alive again; its end is taken.
        back = await http.put(
            f"/jobs/{job['id']}", json={"phase": "hash", "done": 60, "total": 100}
        )
        assert back.json()["state"] == "running" and back.json()["error"] is None
        await http.post(f"/jobs/{job['id']}/end", json={"version": 3})
        done = (await http.get(f"/jobs/{job['id']}")).json()
        assert done["state"] == "done" and done["version"] == 3
        # An ended job stays as it ended, whatever comes after.
        late = await http.put(f"/jobs/{job['id']}", json={"phase": "copy", "done": 1, "total": 2})
        assert late.json()["state"] == "done"
        assert (await http.get("/jobs/nope")).status_code == 404


async def test_an_import_stopped_by_ctrl_c_is_interrupted_and_kept_alive_meanwhile(
    registry: Registry,
) -> None:
    client = RegistryClient(registry.api_url, TOKEN)

    def import_stopped_by_ctrl_c() -> None:
        with reporting(client, "big", keepalive_s=0.3) as (report, _end):
            report("copy", 10, 100)
            job_id = client.get("/jobs")[0]["id"]
            first = client.get(f"/jobs/{job_id}")["updated_at"]
            # A phase that reports nothing for a while: the keep-alive refreshes the job.
            for _ in range(200):
                if client.get(f"/jobs/{job_id}")["updated_at"] > first:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("the job was not kept alive")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await asyncio.to_thread(import_stopped_by_ctrl_c)
    [job] = await jobs_of(registry.api_url)
    assert job["state"] == "interrupted" and "Ctrl-C" in job["error"], job
    assert job["percent"] == 10


async def test_a_registrys_own_commit_is_kept_alive_and_interrupted_when_it_stops(
    store: EventStore,
) -> None:
    woken: list[str] = []
    a = Jobs(lambda: store.pool, "registry-a")
    b = Jobs(lambda: store.pool, "registry-b", on_change=lambda: woken.append("b"))
    a.run(store.session)
    b.run(store.session)
    try:
        # B hears A's changes: the console's live pages of every registry wake.
        await asyncio.wait_for(b.listening.wait(), 10)
        job = await a.start("commit", "win", "bootstrap-admin", here=True)
        await wait_for(lambda: "b" in woken, "registry B to hear A's new job")
        # A's worker threads report; A's upkeep writes it.
        a.report(job["id"], "overlay", 3, 4)

        async def written() -> bool:
            [seen] = await b.list()
            return seen["phase"] == "overlay" and seen["percent"] == 75

        await wait_for(written, "A's commit progress written")
        await a.stop()
        [seen] = await b.list()
        assert seen["state"] == "interrupted" and "registry running it stopped" in seen["error"]
    finally:
        await a.stop()
        await b.stop()
