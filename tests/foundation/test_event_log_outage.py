"""PostgreSQL killed and started again while services emit events: nothing acknowledged or
queued is lost, nothing is stored twice, and the relay carries on.

Real parts: a PostgreSQL of its own (fsync on, as `up` runs it: the test kills it), two real
registry processes (the log's door and relay; two, so one relay waits on the lock while the
other works), the session's NATS. The emitters are the services' own client code: an
:class:`EventClient` whose every append must come back acknowledged, and the
:class:`QueuedEventSink` the data plane hands its events to.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import nats
import pytest

from shared.bus import EVENTS_STREAM
from shared.event_log import EventClient
from shared.event_sink import QueuedEventSink
from shared.events import BootRequested, envelope
from shared.settings import Settings
from streamboot.embedded.postgres import EmbeddedPostgres
from streamboot.embedded.proc import free_port, wait_group_gone
from tests.cache.conftest import Proc
from tests.conftest import TEST_ROLE, BusServer, traversable_tmpdir


@pytest.fixture
async def own_postgres() -> AsyncIterator[EmbeddedPostgres]:
    root = traversable_tmpdir("streamboot-pg-outage-")
    pg = EmbeddedPostgres(
        root, port=free_port(), user=Settings().postgres_user, password=secrets.token_urlsafe(16)
    )
    await pg.start(log_path=root / "postgres.log")
    try:
        yield pg
    finally:
        await pg.stop()


def registry(bus: BusServer, database_url: str, log: Path) -> Proc:
    env = {
        **bus.env("registry"),
        "STREAMBOOT_DATABASE_URL": database_url,
        "STREAMBOOT_API_PORT": str(free_port()),
        "STREAMBOOT_METRICS_PORT": "0",
        "STREAMBOOT_DATA_DIR": str(log.with_suffix("")),
        "STREAMBOOT_NODE_ID": log.stem,
    }
    return Proc([sys.executable, "-m", "services.registry"], env, log)


async def wait_for_log(proc: Proc, text: str) -> None:
    assert proc.log is not None
    for _ in range(600):
        if text in proc.log.read_text():
            return
        assert proc.p.poll() is None, proc.log.read_text()
        await asyncio.sleep(0.1)
    raise AssertionError(f"never logged {text!r}:\n{proc.log.read_text()}")


async def published(nats_url: str, stream_ids: set[str], want: int) -> list[tuple[str, str]]:
    """(stream id, event id) of every message JetStream holds for ``stream_ids``, once
    ``want`` of them are there (the relay may still be catching up)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for _ in range(300):
            found = []
            sub = await js.subscribe(
                "events.BootRequested.boot", stream=EVENTS_STREAM, ordered_consumer=True
            )
            try:
                while True:
                    msg = await sub.next_msg(timeout=1)
                    # The session's NATS is shared: other tests' messages are skipped.
                    headers = msg.headers or {}
                    if headers.get("Streamboot-Stream") in stream_ids:
                        found.append((msg.headers["Streamboot-Stream"], msg.headers["Nats-Msg-Id"]))
            except nats.errors.TimeoutError:
                pass
            finally:
                await sub.unsubscribe()
            if len(found) >= want:
                return found
            await asyncio.sleep(0.2)
        return found
    finally:
        await nc.close()


async def test_events_survive_a_postgres_crash_exactly_once(
    nats_server: BusServer, own_postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    pg = own_postgres
    nats_url = nats_server.url_for("boot")  # the events' appender
    registries = [registry(nats_server, pg.dsn(), tmp_path / f"registry-{i}.log") for i in (1, 2)]
    nc = await nats.connect(nats_url)
    try:
        for r in registries:
            await wait_for_log(r, "serving API")
        client = EventClient(nc, "boot")
        sink = QueuedEventSink(client)
        sink_task = asyncio.create_task(sink.run())
        acked_mac = "02:00:" + ":".join(f"{b:02x}" for b in uuid.uuid4().bytes[:4])
        queued_mac = "02:01:" + ":".join(f"{b:02x}" for b in uuid.uuid4().bytes[:4])
        acked: list[str] = []
        queued = 0
        running = True

        async def emit_acknowledged() -> None:
            # Every append must come back acknowledged, whatever happens meanwhile.
            n = 0
            while running:
                env = envelope(BootRequested(mac=acked_mac, arch=n))
                [stored] = await client.append([env], retry_for_s=120)
                acked.append(str(stored.id))
                n += 1
                await asyncio.sleep(0.01)

        async def emit_queued() -> None:
            nonlocal queued
            while running:
                sink.put(BootRequested(mac=queued_mac, arch=queued))
                queued += 1
                await asyncio.sleep(0.01)

        emitters = [asyncio.create_task(emit_acknowledged()), asyncio.create_task(emit_queued())]

        async def acked_at_least(n: int) -> None:
            for _ in range(1200):
                if len(acked) >= n:
                    return
                assert not any(t.done() for t in emitters), [
                    t.exception() for t in emitters if t.done()
                ]
                await asyncio.sleep(0.1)
            raise AssertionError(f"only {len(acked)} appends acknowledged, waiting for {n}")

        await acked_at_least(5)
        before = len(acked)
        # PostgreSQL dies as a crash would take it (its backends with it), and is started
        # again after a while, as `up` does.
        assert pg.process is not None
        os.kill(pg.process.pid, signal.SIGKILL)
        await pg.process.stop(0)
        await wait_group_gone(pg.process.pid)
        await asyncio.sleep(3)
        assert len(acked) <= before + 1  # nothing acknowledged while the log was away
        await pg.start(log_path=pg.data_dir / "postgres.log")
        await acked_at_least(before + 10)  # appends go on after PostgreSQL came back
        running = False
        await asyncio.gather(*emitters)  # every append acknowledged: none raised
        await sink.drain(60)
        sink_task.cancel()

        conn = await asyncpg.connect(pg.dsn())
        try:
            rows = await conn.fetch(
                "SELECT stream_id, id::text, data FROM events WHERE stream_id = ANY($1)",
                [f"boot-{acked_mac}", f"boot-{queued_mac}"],
            )
        finally:
            await conn.close()
        logged_acked = [r["id"] for r in rows if r["stream_id"] == f"boot-{acked_mac}"]
        assert sorted(logged_acked) == sorted(acked)  # every one, once
        arches = sorted(
            json.loads(r["data"])["arch"] for r in rows if r["stream_id"] == f"boot-{queued_mac}"
        )
        assert arches == list(range(queued))  # every queued one, once

        on_js = await published(
            nats_server.url_for(TEST_ROLE), {f"boot-{acked_mac}", f"boot-{queued_mac}"}, len(rows)
        )
        assert sorted(i for _s, i in on_js) == sorted(r["id"] for r in rows)
        for r in registries:  # both rode the outage out (one relaying, one waiting)
            assert r.p.poll() is None, r.log.read_text() if r.log else ""
    finally:
        await nc.close()
        for r in registries:
            r.stop()
