"""The registry's start-up replay (raw rows from the log, data decoded only where needed)
builds the same projection as applying the same events live, one envelope at a time."""

from __future__ import annotations

from services.registry.app import replay
from services.registry.projection import Projection
from shared.envelope import Envelope
from shared.event_store import EventStore
from shared.events import (
    BlocksRequested,
    DeviceRegistered,
    SessionAttached,
    SessionClosed,
    SessionOpened,
    envelope,
)

MAC = "52:54:00:00:00:01"


def opened(sid: str) -> SessionOpened:
    return SessionOpened(
        session_id=sid, mac=MAC, hostname="lab-1", machine_id="m-1", vdisk="win11",
        version=1, stream_node="node-1", write_cache="server-disk",
        write_cache_persistence="discard",
    )  # fmt: skip


def blocks(sid: str, k: int) -> BlocksRequested:
    return BlocksRequested(
        session_id=sid, vdisk="win11", version=1, extents=[(k, k * 65536, 65536, "r")]
    )


async def test_replay_equals_live(database_url: str) -> None:
    events = [
        envelope(DeviceRegistered(mac=MAC, machine_id="m-1", hostname="lab-1")),
        envelope(opened("s1")),
        envelope(
            SessionAttached(
                session_id="s1", stream_node="node-1", protocol="nbd", client_addr="10.0.0.1:1"
            )
        ),
        envelope(blocks("s1", 1)),
        envelope(blocks("s1", 2)),
        envelope(SessionClosed(session_id="s1", reason="shutdown")),
        envelope(opened("s2")),
        # Not in its session's stream: the replay decodes its data like any other event's.
        envelope(blocks("s2", 3), stream_id="misc-blocks"),
        envelope(blocks("s2", 4)),
        # A type the projection does not handle.
        Envelope(type="SomethingElse", stream_id="misc-x", data={"mac": MAC}),
    ]
    store = await EventStore.connect(database_url)
    try:
        for e in events:
            # One append per event, so that their times differ like a real log's.
            await store.append([e])
        live = Projection()
        for e in events:
            live.apply(e.type, e.data, e.position or 0, e.time)
        rebuilt = Projection()
        async with store.pool.acquire() as conn:
            assert await replay(conn, rebuilt) == len(events)
    finally:
        await store.close()
    assert rebuilt.snapshot() == live.snapshot()
    session = rebuilt.sessions["s2"]
    assert session["last_activity"] == events[8].time.timestamp()
    assert session["last_activity"] > session["opened_at"]
