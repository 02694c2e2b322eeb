"""The console's live view: events in log order (some twice) become each machine's boot
and the dashboard's figures."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from services.registry.console.live import LiveView

MAC = "52:54:00:00:0d:01"
T0 = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)


def opened(sid: str) -> dict[str, object]:
    return {
        "session_id": sid, "mac": MAC, "hostname": "h", "machine_id": "m", "vdisk": "d",
        "version": 1, "stream_node": "n", "write_cache": "server-disk",
        "write_cache_persistence": "discard",
    }  # fmt: skip


def test_a_boot_advances_and_a_republished_event_counts_once() -> None:
    view = LiveView()
    feed = [
        (1, "DeviceRegistered", {"mac": MAC, "machine_id": "m", "hostname": "h"}),
        (2, "BootRequested", {"mac": MAC}),
        (3, "SessionOpened", opened("s1")),
        (
            4,
            "SessionAttached",
            {"session_id": "s1", "stream_node": "n", "protocol": "nbd", "client_addr": "10.0.0.5"},
        ),
        (5, "ClientBooted", {"session_id": "s1", "mac": MAC}),
    ]
    for position, type_, data in feed:
        assert view.feed(position, type_, data, T0 + timedelta(seconds=position * 10))
    assert not view.feed(4, "SessionAttached", feed[3][2], T0)  # the relay's re-publish
    [boot] = view.recent_boots()
    assert (boot.mac, boot.session_id, boot.phase) == (MAC, "s1", "booted")
    figures = view.figures(now=T0 + timedelta(minutes=5))
    assert figures["boots_last_hour"] == 1
    assert figures["booted_p50_s"] == 30.0  # BootRequested at 20 s, booted at 50 s
    assert view.figures(now=T0 + timedelta(hours=2))["boots_last_hour"] == 0


def blocks(node: str, read: int, written: int) -> dict[str, object]:
    return {"session_id": "s1", "vdisk": "d", "version": 1, "extents": [],
            "stream_node": node, "bytes_read": read, "bytes_written": written}  # fmt: skip


def test_a_live_sessions_bytes_are_its_nodes_latest_totals() -> None:
    view = LiveView()
    view.feed(1, "BlocksRequested", blocks("n1", 100, 0), T0)
    view.feed(2, "BlocksRequested", blocks("n1", 4096, 512), T0)  # totals, not deltas
    view.feed(3, "BlocksRequested", blocks("n2", 10, 0), T0)  # failed over: both nodes
    [s] = view.with_bytes([{"session_id": "s1", "bytes_read": 0}])
    assert (s["bytes_read"], s["bytes_written"]) == (4106, 512)
    # A node that restarted counts from zero: the ended connections' sums are kept.
    [s] = view.with_bytes([{"session_id": "s1", "bytes_read": 9000, "bytes_written": 512}])
    assert (s["bytes_read"], s["bytes_written"]) == (9000, 512)
    view.feed(4, "SessionClosed", {"session_id": "s1", "reason": "done"}, T0)
    assert view.live_bytes == {}
    [s] = view.with_bytes([{"session_id": "s1"}])
    assert (s["bytes_read"], s["bytes_written"]) == (0, 0)


async def test_a_waiting_stream_wakes_on_a_change_and_on_close() -> None:
    view = LiveView()
    seen = await view.wait_change(-1, 0.01)  # something new already: no wait
    waiter = asyncio.create_task(view.wait_change(seen, 30))
    await asyncio.sleep(0)
    view.feed(1, "BootRequested", {"mac": MAC}, T0)
    assert await asyncio.wait_for(waiter, 5) > seen
    waiter = asyncio.create_task(view.wait_change(view.version, 30))
    await asyncio.sleep(0)
    view.close()
    await asyncio.wait_for(waiter, 5)
    assert view.closed
