"""The log and JetStream agree after a process dies between appending and publishing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from shared.bus import EVENTS_STREAM
from shared.event_store import EventStore
from shared.relay import CURSOR
from tests.conftest import BusServer

HELPER = Path(__file__).with_name("relay_process.py")
ROOT = Path(__file__).resolve().parents[2]


def run(nats_url: str, database_url: str, append: int, mode: str, fault: str | None = None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("STREAMBOOT_FAULT", None)
    if fault:
        env["STREAMBOOT_FAULT"] = fault
    return subprocess.run(
        [sys.executable, str(HELPER), nats_url, database_url, str(append), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def stream_messages(nats_url: str) -> list[str]:
    """The msg ids JetStream holds for the crash test's stream."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    ids: list[str] = []
    try:
        sub = await js.pull_subscribe("events.CrashTested.crash", stream=EVENTS_STREAM)
    except nats.js.errors.NotFoundError:
        await nc.close()
        return ids
    try:
        while True:
            msgs = await sub.fetch(100, timeout=1)
            for m in msgs:
                ids.append(m.headers["Nats-Msg-Id"])
                await m.ack()
    except TimeoutError:  # nats-py raises its own subclass or, under load, asyncio's
        pass
    await nc.close()
    return ids


@pytest.fixture
async def fresh_stream(nats_url: str):
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        await js.delete_stream(EVENTS_STREAM)
    except nats.js.errors.NotFoundError:
        pass
    await nc.close()


async def test_crash_after_append_before_publish(
    nats_url: str, nats_server: BusServer, database_url: str, fresh_stream: None
) -> None:
    # The appending process exits before anything is published: the events are in the log only.
    appended = run(nats_server.url_for("registry"), database_url, 5, "no-relay")
    assert appended.returncode == 0, appended.stderr
    assert await stream_messages(nats_url) == []
    relayed = run(nats_server.url_for("registry"), database_url, 0, "relay")
    assert relayed.returncode == 0, relayed.stderr
    store = await EventStore.connect(database_url)
    ids = [str(e.id) for e in await store.read_stream("crash-1")]
    assert await store.get_cursor(CURSOR) == await store.last_position()
    await store.close()
    assert await stream_messages(nats_url) == ids


async def test_crash_after_publish_before_cursor_moves(
    nats_url: str, nats_server: BusServer, database_url: str, fresh_stream: None
) -> None:
    dying = run(
        nats_server.url_for("registry"), database_url, 7, "relay", fault="relay.after_publish"
    )
    assert dying.returncode == 137, (dying.stdout, dying.stderr)
    store = await EventStore.connect(database_url)
    assert await store.get_cursor(CURSOR) == 0  # it died before recording progress
    # The restarted relay publishes the same batch again; JetStream drops the duplicates.
    again = run(nats_server.url_for("registry"), database_url, 0, "relay")
    assert again.returncode == 0, again.stderr
    ids = [str(e.id) for e in await store.read_stream("crash-1")]
    assert await store.get_cursor(CURSOR) == await store.last_position()
    await store.close()
    got = await stream_messages(nats_url)
    assert got == ids and len(got) == 7


async def test_relay_survives_nats_outage_without_losing(
    nats_url: str, nats_server: BusServer, database_url: str, fresh_stream: None
) -> None:
    """Publishing to a JetStream that is not there fails; the cursor stays, nothing is lost."""
    store = await EventStore.connect(database_url)
    from shared.envelope import Envelope
    from shared.relay import EventRelay

    await store.append([Envelope(type="CrashTested", stream_id="crash-1") for _ in range(3)])
    nc = await nats.connect(nats_url)
    js = nc.jetstream(timeout=10)  # under load an ack can take a while; no stream: refused at once
    relay = EventRelay(store, js)  # the stream does not exist yet: publish gets no ack
    with pytest.raises(Exception):  # noqa: B017 - any publish failure will do
        await relay.publish_pending()
    assert await store.get_cursor(CURSOR) == 0
    from shared.bus import ensure_event_stream

    await ensure_event_stream(js)
    assert await relay.publish_pending() == 3
    await nc.close()
    await store.close()
    assert len(await stream_messages(nats_url)) == 3
    await asyncio.sleep(0)
