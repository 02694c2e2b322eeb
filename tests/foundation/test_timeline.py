"""`events replay --device`: a device's boots rebuilt from the log, through indexes only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shared.envelope import Envelope
from shared.event_store import EventStore
from shared.events import (
    BlocksRequested,
    BootRequested,
    ClientNotice,
    DeviceRegistered,
    Event,
    SessionAttached,
    SessionClosed,
    SessionDetached,
    SessionOpened,
    envelope,
)
from streamboot.timeline import device_timelines

MAC = "52:54:00:00:0a:01"
OTHER = "52:54:00:00:0a:02"
T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


def at(seconds: float, event: Event) -> Envelope:
    return envelope(event).model_copy(update={"time": T0 + timedelta(seconds=seconds)})


def opened(sid: str, mac: str) -> SessionOpened:
    return SessionOpened(
        session_id=sid, mac=mac, hostname=f"h-{mac[-2:]}", machine_id=f"m-{mac[-2:]}",
        vdisk="win11", version=3, stream_node="node-1", write_cache="server-disk",
        write_cache_persistence="discard",
    )  # fmt: skip


def attach(sid: str, proto: str) -> SessionAttached:
    return SessionAttached(
        session_id=sid, stream_node="node-1", protocol=proto, client_addr="10.0.0.9:4000"
    )


def detach(sid: str, proto: str, read: int, written: int) -> SessionDetached:
    return SessionDetached(
        session_id=sid, stream_node="node-1", protocol=proto, client_addr="10.0.0.9:4000",
        bytes_read=read, bytes_written=written,
    )  # fmt: skip


def blocks(sid: str, t_ms: int, length: int) -> BlocksRequested:
    return BlocksRequested(
        session_id=sid, vdisk="win11", version=3, extents=[(t_ms, 0, length, "r")]
    )


@pytest.fixture
async def store(database_url: str):
    s = await EventStore.connect(database_url)
    yield s
    await s.close()


async def test_a_device_boot_history(store: EventStore) -> None:
    await store.append([at(0, DeviceRegistered(mac=MAC, machine_id="m-01", hostname="lab-001"))])
    await store.append([at(1, DeviceRegistered(mac=OTHER, machine_id="m-02", hostname="lab-002"))])
    # Boot 1: PXE, session, HTTP SAN phase, NBD phase, shutdown.
    await store.append([at(100, BootRequested(mac=MAC, arch=0))])
    await store.append([at(104.5, opened("s1", MAC))])
    await store.append([at(105, attach("s1", "http"))])
    await store.append([at(106, blocks("s1", 1000, 4096)), at(107, blocks("s1", 2000, 8192))])
    await store.append([at(120, detach("s1", "http", 9_500_000, 0))])
    await store.append([at(121, attach("s1", "nbd"))])
    await store.append([at(122, blocks("s1", 17000, 65536))])
    notice = ClientNotice(session_id="s1", mac=MAC, kind="wc-ram-fallback", message="in RAM")
    await store.append([at(122.5, notice)])
    # Another device's boot in between must not leak into this device's timeline.
    await store.append([at(123, BootRequested(mac=OTHER, arch=7)), at(124, opened("s9", OTHER))])
    await store.append([at(300, detach("s1", "nbd", 20_000_000, 1_000_000))])
    await store.append([at(301, SessionClosed(session_id="s1", reason="shutdown"))])
    # Boot 2: PXE with no session (e.g. refused, or the machine was switched off).
    await store.append([at(5000, BootRequested(mac=MAC, arch=0))])

    boots = await device_timelines(store, MAC)
    assert [b.session_id for b in boots] == ["s1", None]
    first = boots[0]
    assert [s.type for s in first.steps] == [
        "BootRequested", "SessionOpened", "SessionAttached", "first block read",
        "SessionDetached", "SessionAttached", "last block batch", "ClientNotice",
        "SessionDetached", "SessionClosed",
    ]  # fmt: skip
    assert first.steps[-3].detail == "wc-ram-fallback: in RAM"
    assert first.steps[1].since_start_s == pytest.approx(4.5)
    assert first.steps[1].since_previous_s == pytest.approx(4.5)
    assert first.duration_s == pytest.approx(201)
    assert (first.bytes_read, first.bytes_written) == (29_500_000, 1_000_000)
    assert "win11 v3 on node-1" in first.steps[1].detail
    assert [s.type for s in boots[1].steps] == ["BootRequested"]
    # Each step carries the boot's phase by the state machine (shared/boot_flow.py).
    assert [s.phase for s in first.steps] == [
        "discovered", "session open", "firmware read", "firmware read", "firmware read",
        "OS attached", "OS attached", "OS attached", "OS attached", "closed",
    ]  # fmt: skip
    assert (first.phase, boots[1].phase) == ("closed", "discovered")

    later = await device_timelines(store, MAC, since=T0 + timedelta(seconds=1000))
    assert [b.session_id for b in later] == [None]
    assert [b.session_id for b in await device_timelines(store, OTHER)] == ["s9"]


async def test_a_devices_events_include_its_sessions_own(store: EventStore) -> None:
    """`events list --mac`: attached/detached/closed name the session, not the MAC, and
    still belong to the device's events (why a session closed is not hidden)."""
    await store.append([at(0, BootRequested(mac=MAC, arch=0)), at(1, opened("s1", MAC))])
    await store.append([at(2, opened("s9", OTHER)), at(3, attach("s9", "nbd"))])
    await store.append([at(4, attach("s1", "nbd"))])
    await store.append([at(5, SessionClosed(session_id="s1", reason="expired"))])
    rows = await store.read_device(MAC)
    assert [(e.type, e.stream_id) for e in rows] == [
        ("BootRequested", f"boot-{MAC}"),
        ("SessionOpened", "session-s1"),
        ("SessionAttached", "session-s1"),
        ("SessionClosed", "session-s1"),
    ]
    after_open = await store.read_device(MAC, rows[1].position, types=["SessionClosed"])
    assert [e.data["reason"] for e in after_open] == ["expired"]
    assert len(await store.read_device(MAC, limit=2)) == 2


async def test_the_device_query_uses_the_mac_index(store: EventStore) -> None:
    """An index, not a scan: on a log where the device is rare, the planner picks the index
    on the events' mac (what keeps the answer fast on millions of events)."""
    noise = [
        Envelope(type="BlocksRequested", stream_id=f"session-n{i % 500}", data={"x": i})
        for i in range(30_000)
    ]
    for i in range(0, len(noise), 1000):
        await store.append(noise[i : i + 1000])
    await store.append([at(0, DeviceRegistered(mac=MAC, machine_id="m", hostname="h"))])
    await store.pool.execute("ANALYZE events")
    plan = "\n".join(
        r[0]
        for r in await store.pool.fetch(
            # The query read_all(mac=...) makes.
            "EXPLAIN SELECT position FROM events WHERE position > $1 AND mac = $2 "
            "ORDER BY position LIMIT $3",
            0,
            MAC,
            100_000,
        )
    )
    assert "events_mac" in plan, plan
    assert "Seq Scan" not in plan, plan
