"""Boot sessions through the real service: NATS handlers, uniqueness under concurrency,
placement by real heartbeats, resolve, close, the sweeper."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from nats import errors as nats_errors

from services.stream.announce import spec_from_record
from shared import bus
from shared.contracts.stream import prepare_subject
from shared.event_log import EventClient
from shared.events import SessionAttached, SessionDetached
from shared.heartbeat import Heartbeat
from tests.registry.conftest import Registry, write_image

MAC = "52:54:00:12:34:56"
pytestmark = pytest.mark.timeout(120)


async def seed(reg: Registry, tmp: Path, *macs: str, name: str = "win") -> None:
    """A vdisk imported with the real CLI and assigned to the devices."""
    image = write_image(tmp / f"{name}.raw", 4 << 20, {0: b"boot", 1 << 20: b"data"})
    await reg.cli_json("vdisk", "import", str(image), "--name", name)
    async with reg.http() as http:
        for mac in macs:
            r = await http.post("/devices", json={"mac": mac})
            assert r.status_code == 201, r.text
            r = await http.post(
                "/assignments", json={"target": mac, "vdisk": name, "default": True}
            )
            assert r.status_code == 200, r.text


def first_bytes(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


async def test_twenty_concurrent_opens_exactly_one_wins(registry: Registry, nc: Any) -> None:
    await seed(registry, registry.data_dir, MAC)

    async def attempt() -> dict[str, Any] | bus.RemoteError:
        try:
            return await bus.request_json(
                nc, "streamboot.registry.session.open", {"mac": MAC}, timeout_s=30
            )
        except bus.RemoteError as exc:
            return exc

    results = await asyncio.gather(*(attempt() for _ in range(20)))
    won = [r for r in results if isinstance(r, dict)]
    lost = [r for r in results if isinstance(r, bus.RemoteError)]
    assert len(won) == 1 and len(lost) == 19
    assert all(e.kind == "conflict" and "already has a live session" in str(e) for e in lost)
    rejected = await registry.app.store.read_all(types=["SessionConflictRejected"])
    assert len(rejected) == 19
    assert {r.data["conflicting_session_id"] for r in rejected} == {won[0]["session_id"]}
    opened = await registry.app.store.read_all(types=["SessionOpened"])
    assert len(opened) == 1


async def test_open_resolve_close_over_nats(registry: Registry, nc: Any) -> None:
    await seed(registry, registry.data_dir, MAC)
    s = await bus.request_json(nc, "streamboot.registry.session.open", {"mac": MAC})
    token = s["token"]
    assert len(token) >= 43  # token_urlsafe(32): 256 bits
    assert s["nbd_uri"].endswith("/" + token) and s["nbd_uri"].startswith("nbd://")
    assert s["http_url"].endswith("/s/" + token)
    assert "no stream node is alive" in s["warning"]
    r = await bus.request_json(nc, "streamboot.registry.session.resolve", {"token": token})
    assert r["session_id"] == s["session_id"] and r["mac"] == MAC
    assert r["vdisk"] == "win" and r["version"] == 1 and r["size"] == 4 << 20
    assert r["layers"] == [str(registry.settings.vdisk_root / "win" / "v1.raw")]
    assert first_bytes(Path(r["layers"][0]), 4) == b"boot"
    assert r["write_cache"] == "server-disk" and r["write_cache_persistence"] == "discard"
    assert r["read_only"] is False
    # The log holds a hash of the token, never the token.
    [row] = await registry.app.store.read_all(types=["SessionOpened"])
    assert token not in str(row.data)
    await bus.request_json(nc, "streamboot.registry.session.close", {"token": token})
    with pytest.raises(bus.RemoteError) as e:
        await bus.request_json(nc, "streamboot.registry.session.resolve", {"token": token})
    assert e.value.kind == "not_found"
    with pytest.raises(bus.RemoteError) as e:
        await bus.request_json(nc, "streamboot.registry.session.resolve", {"token": "guess"})
    assert e.value.kind == "not_found"


async def test_placement_uses_live_stream_heartbeats(registry: Registry, nc: Any) -> None:
    macs = ["52:54:00:00:00:01", "52:54:00:00:00:02"]
    await seed(registry, registry.data_dir, *macs)
    js = nc.jetstream()
    busy = Heartbeat(js, "stream", "node-busy", 1.0, lambda: {
        "load": 9, "nbd": "127.0.0.1:11111", "http_stream": "http://127.0.0.1:11112"})  # fmt: skip
    idle = Heartbeat(js, "stream", "node-idle", 1.0, lambda: {
        "load": 1, "nbd": "127.0.0.1:22221", "http_stream": "http://127.0.0.1:22222"})  # fmt: skip
    await busy.beat()
    await idle.beat()
    await registry.sees("stream", "node-busy")
    await registry.sees("stream", "node-idle")
    try:
        s = await bus.request_json(nc, "streamboot.registry.session.open", {"mac": macs[0]})
        assert s["stream_node"] == "node-idle" and "warning" not in s
        assert s["nbd_uri"] == f"nbd://127.0.0.1:22221/{s['token']}"
        assert s["http_url"] == f"http://127.0.0.1:22222/s/{s['token']}"
        # Where its client goes if node-idle dies (docs/failover.md): the other live node.
        assert s["nbd_nodes"] == ["127.0.0.1:11111"]
        # The same session on that node, for iPXE's multipath sanboot.
        assert s["http_nodes"] == [f"http://127.0.0.1:11112/s/{s['token']}"]
        await idle.stop()  # gone: the next session goes to the other node
        # The beats are by hand here (no beating loop): beat again, so that on a slow
        # machine the busy node is not taken for dead too by the time of the next open.
        await busy.beat()
        await registry.sees("stream", "node-idle", alive=False)
        s2 = await bus.request_json(nc, "streamboot.registry.session.open", {"mac": macs[1]})
        assert s2["stream_node"] == "node-busy"
        assert s2["nbd_nodes"] == [] and s2["http_nodes"] == []  # no other node alive
    finally:
        await busy.stop()
        await idle.stop()


async def test_the_stream_node_is_told_of_its_session_before_the_client(
    registry: Registry, nc: Any
) -> None:
    """The registry announces each session it opens to the stream node it placed it on
    (services/stream/announce.py), with what ``session.resolve`` would answer for its
    token; with no live stream node there is no one to tell."""
    macs = ["52:54:00:00:00:11", "52:54:00:00:00:12"]
    await seed(registry, registry.data_dir, *macs)
    everywhere = await nc.subscribe("streamboot.stream.*.session.prepare")
    s = await bus.request_json(nc, "streamboot.registry.session.open", {"mac": macs[0]})
    assert "no stream node is alive" in s["warning"]
    with pytest.raises(nats_errors.TimeoutError):
        await everywhere.next_msg(timeout=0.5)

    beat = Heartbeat(nc.jetstream(), "stream", "node.a:1", 1.0, lambda: {
        "load": 0, "nbd": "127.0.0.1:33331", "http_stream": "http://127.0.0.1:33332"})  # fmt: skip
    await beat.beat()
    await registry.sees("stream", "node.a:1")
    mine = await nc.subscribe(prepare_subject("node.a:1"))
    try:
        s = await bus.request_json(nc, "streamboot.registry.session.open", {"mac": macs[1]})
        assert s["stream_node"] == "node.a:1"
        msg = await mine.next_msg(timeout=5)
        announced = json.loads(msg.data)
        assert announced.pop("token") == s["token"]
        resolved = await bus.request_json(
            nc, "streamboot.registry.session.resolve", {"token": s["token"]}
        )
        assert announced == resolved
        assert spec_from_record(announced).session_id == s["session_id"]
    finally:
        await beat.stop()
        await mine.unsubscribe()
        await everywhere.unsubscribe()


async def test_device_lookup_applies_unknown_device_policy(registry: Registry, nc: Any) -> None:
    with pytest.raises(bus.RemoteError) as e:
        await bus.request_json(nc, "streamboot.registry.device.lookup", {"mac": MAC})
    assert e.value.kind == "refused" and "unknown device" in str(e.value)
    registry.app.settings.unknown_device_policy = "auto-add"
    registry.app.settings.auto_add_collection = "lab"
    d = await bus.request_json(
        nc, "streamboot.registry.device.lookup",
        {"mac": MAC, "smbios_uuid": "4c4c4544-0000-1000-8000-000000000001"},
    )  # fmt: skip
    assert d["hostname"] == "lab-001" and d["collection"] == "lab" and d["auto_added"]
    again = await bus.request_json(nc, "streamboot.registry.device.lookup", {"mac": MAC})
    assert again["machine_id"] == d["machine_id"]
    # Found by SMBIOS UUID when the NIC changed.
    by_uuid = await bus.request_json(
        nc, "streamboot.registry.device.lookup",
        {"mac": "52:54:00:ff:ff:ff", "smbios_uuid": "4c4c4544-0000-1000-8000-000000000001"},
    )  # fmt: skip
    assert by_uuid["mac"] == MAC


async def test_client_gone_closes_after_grace_only(registry: Registry, nc: Any) -> None:
    """Attach/detach events come from a stream node through the append handler; the sweeper
    closes only after the grace period with no attachment (driven with explicit times)."""
    await seed(registry, registry.data_dir, MAC)
    node = Heartbeat(nc.jetstream(), "stream", "n1", 1.0)
    await node.beat()  # n1 is alive: its attachments count
    await registry.sees("stream", "n1")
    s = await bus.request_json(nc, "streamboot.registry.session.open", {"mac": MAC})
    sid = s["session_id"]
    events = EventClient(nc, "stream")
    att = {"session_id": sid, "stream_node": "n1", "client_addr": "127.0.0.1:5000"}
    await events.emit(SessionAttached(protocol="http", **att), correlation_id=sid)
    detached = await events.emit(
        SessionDetached(protocol="http", bytes_read=512, bytes_written=0, **att), correlation_id=sid
    )
    await registry.app.catch_up()
    live = registry.app.projection.sessions[sid]
    assert live["attached"] == 0 and live["detached_at"] is not None
    t = detached.time.timestamp()
    grace = registry.settings.session_detach_grace_s
    assert await registry.app.sweep(now=t + grace / 2) == []  # PXE hand-over window
    await events.emit(SessionAttached(protocol="nbd", **att), correlation_id=sid)
    await registry.app.catch_up()
    assert await registry.app.sweep(now=t + 10 * grace) == []  # attached over NBD
    gone = await events.emit(
        SessionDetached(protocol="nbd", bytes_read=1, bytes_written=1, **att), correlation_id=sid
    )
    await registry.app.catch_up()
    assert await registry.app.sweep(now=gone.time.timestamp() + grace) == [sid]
    [closed] = await registry.app.store.read_all(types=["SessionClosed"])
    assert closed.data["reason"] == "client-gone" and closed.correlation_id == sid
    # The device can boot again.
    await bus.request_json(nc, "streamboot.registry.session.open", {"mac": MAC})
    await node.stop()


async def test_a_stream_node_stopping_is_not_its_client_leaving(
    registry: Registry, nc: Any
) -> None:
    """A stream node that stops ends its connections ("shutdown"): the client did not
    leave, so the detach grace does not apply; the idle timeout still does."""
    await seed(registry, registry.data_dir, MAC)
    sid = (await bus.request_json(nc, "streamboot.registry.session.open", {"mac": MAC}))[
        "session_id"
    ]
    events = EventClient(nc, "stream")
    att = {"session_id": sid, "stream_node": "n1", "client_addr": "127.0.0.1:5000"}
    await events.emit(SessionAttached(protocol="nbd", **att), correlation_id=sid)
    stopped = await events.emit(
        SessionDetached(protocol="nbd", bytes_read=1, bytes_written=1, reason="shutdown", **att),
        correlation_id=sid,
    )
    await registry.app.catch_up()
    t = stopped.time.timestamp()
    grace = registry.settings.session_detach_grace_s
    idle = registry.settings.session_idle_timeout_s
    assert await registry.app.sweep(now=t + 10 * grace) == []
    assert await registry.app.sweep(now=t + idle) == [sid]


async def test_attachments_on_a_dead_stream_node_do_not_keep_a_session(
    registry: Registry, nc: Any
) -> None:
    """A stream node that is killed never reports its clients' detach: once it stops
    heartbeating, its attachments no longer hold the session open, but only the idle
    timeout closes it (its client may come back once the node is up again)."""
    await seed(registry, registry.data_dir, MAC)
    node = Heartbeat(nc.jetstream(), "stream", "doomed", 1.0)
    await node.beat()
    await registry.sees("stream", "doomed")
    s = await bus.request_json(nc, "streamboot.registry.session.open", {"mac": MAC})
    sid = s["session_id"]
    attached = await EventClient(nc, "stream").emit(
        SessionAttached(
            session_id=sid, stream_node="doomed", protocol="nbd", client_addr="10.0.0.9:1"
        ),
        correlation_id=sid,
    )
    await registry.app.catch_up()
    t = attached.time.timestamp()
    grace = registry.settings.session_detach_grace_s
    assert await registry.app.sweep(now=t + 10 * grace) == []  # its node is alive
    await node.stop()  # the node dies (its heartbeat is gone)
    await registry.sees("stream", "doomed", alive=False)
    idle = registry.settings.session_idle_timeout_s
    assert await registry.app.sweep(now=t + grace) == []  # not after the detach grace
    assert await registry.app.sweep(now=t + idle - 1) == []
    assert await registry.app.sweep(now=t + idle) == [sid]
    [closed] = await registry.app.store.read_all(types=["SessionClosed"])
    assert closed.data["reason"] == "stream-node-gone"


async def test_attachments_from_before_a_stream_node_restart_are_stale(
    registry: Registry, nc: Any
) -> None:
    """A stream node restarted under the same name lost its connections: attachments older
    than its current instance do not keep a session open past the idle timeout (and do
    not close it sooner: its client may reconnect)."""
    await seed(registry, registry.data_dir, MAC)
    s = await bus.request_json(nc, "streamboot.registry.session.open", {"mac": MAC})
    sid = s["session_id"]
    attached = await EventClient(nc, "stream").emit(
        SessionAttached(session_id=sid, stream_node="phoenix", protocol="nbd", client_addr="a:1"),
        correlation_id=sid,
    )
    await registry.app.catch_up()
    reborn = Heartbeat(nc.jetstream(), "stream", "phoenix", 1.0)  # started after the attach
    await reborn.beat()
    await registry.sees("stream", "phoenix")
    t = attached.time.timestamp()
    grace = registry.settings.session_detach_grace_s
    idle = registry.settings.session_idle_timeout_s
    assert await registry.app.sweep(now=t + grace) == []
    assert await registry.app.sweep(now=t + idle) == [sid]
    await reborn.stop()


async def test_idle_session_times_out(registry: Registry, nc: Any) -> None:
    await seed(registry, registry.data_dir, MAC)
    s = await bus.request_json(nc, "streamboot.registry.session.open", {"mac": MAC})
    opened = registry.app.projection.sessions[s["session_id"]]["opened_at"]
    idle = registry.settings.session_idle_timeout_s
    assert await registry.app.sweep(now=opened + idle - 1) == []
    assert await registry.app.sweep(now=opened + idle) == [s["session_id"]]
    [closed] = await registry.app.store.read_all(types=["SessionClosed"])
    assert closed.data["reason"] == "idle-timeout"


async def test_heartbeat_and_metrics(registry: Registry, nc: Any) -> None:
    import httpx

    from shared.heartbeat import read_heartbeats

    await seed(registry, registry.data_dir, MAC)
    await bus.request_json(nc, "streamboot.registry.session.open", {"mac": MAC})
    beats = [
        b
        for b in await read_heartbeats(nc.jetstream(), 60)
        if b["service"] == "registry" and b["node"] == registry.settings.node_id
    ]
    assert beats and beats[0]["alive"] and beats[0]["api"] == registry.api_url
    async with httpx.AsyncClient() as http:
        text = (await http.get(beats[0]["metrics"])).text
    assert 'streamboot_live_sessions{service="registry"} 1.0' in text
    assert "streamboot_boots_total" in text


async def test_private_vdisk_and_maintenance_serve_one_device(registry: Registry) -> None:
    a, b = "52:54:00:00:00:0a", "52:54:00:00:00:0b"
    await seed(registry, registry.data_dir, a, b)
    async with registry.http() as http:
        # Maintenance: one device at a time, read-write, writes kept.
        r = await http.post("/sessions", json={"mac": a, "maintenance": True})
        assert r.status_code == 201 and r.json()["writes_to_vdisk"] is True
        r = await http.post("/sessions", json={"mac": b, "maintenance": True})
        assert r.status_code == 409 and "one device at a time" in r.json()["error"]
        r = await http.post("/sessions", json={"mac": b})  # a normal boot is fine meanwhile
        assert r.status_code == 201 and r.json()["writes_to_vdisk"] is False
        for s in (await http.get("/sessions")).json():
            assert (await http.delete(f"/sessions/{s['session_id']}")).is_success
        # Private: the vdisk serves one device, whose writes are kept.
        r = await http.patch("/vdisks/win", json={"mode": "private"})
        assert r.json()["mode"] == "private"
        r = await http.post("/sessions", json={"mac": a})
        assert r.status_code == 201
        assert r.json()["writes_to_vdisk"] and r.json()["write_cache_persistence"] == "keep"
        r = await http.post("/sessions", json={"mac": b})
        assert r.status_code == 409 and "private and in use" in r.json()["error"]
    rejected = await registry.app.store.read_all(types=["SessionConflictRejected"])
    assert [e.data["mac"] for e in rejected] == [b, b]


async def test_session_and_vdisk_lists_answer_over_nats(registry: Registry, nc: Any) -> None:
    """Every list handler replies (a handler the broker cannot call never answers)."""
    await seed(registry, registry.data_dir, MAC)
    s = await bus.request_json(nc, "streamboot.registry.session.open", {"mac": MAC})
    listed = await bus.request_json(nc, "streamboot.registry.session.list", {}, timeout_s=5)
    assert [x["session_id"] for x in listed] == [s["session_id"]]
    assert "token_hash" not in listed[0]
    vdisks = await bus.request_json(nc, "streamboot.registry.vdisk.list", {}, timeout_s=5)
    assert [v["name"] for v in vdisks] == ["win"]
