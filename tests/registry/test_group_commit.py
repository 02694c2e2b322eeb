"""Group commit: commands that arrive together are decided in turn and committed in one
transaction, with the uniqueness rules as exact as one at a time (real PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from services.registry.app import RegistryApp
from services.registry.domain import devices
from services.registry.domain.errors import DomainError
from services.registry.projection import Projection
from shared.event_store import EventStore
from shared.events import Event, SessionClosed
from shared.settings import Settings
from tests.registry.conftest import PATIENT, TOKEN, Registry, write_image

pytestmark = pytest.mark.timeout(120)


def mac_of(i: int) -> str:
    return f"52:54:03:00:{i >> 8:02x}:{i & 255:02x}"


async def ready(app: RegistryApp, n: int) -> list[str]:
    """``n`` devices in a collection with a vdisk assigned (the vdisk staged as import does)."""
    from shared import vdisk_store

    image = write_image(app.vdisk_root.parent / "disk.raw", 1 << 20, {0: b"boot"})
    st = await asyncio.to_thread(vdisk_store.stage_version, app.vdisk_root, "win", image, 1, [])
    await app.publish_version(
        "win", version=1, staging=st.staging, layer=st.layer, size=st.size,
        checksum=st.checksum, changed_blocks=st.changed_blocks, block_size=st.block_size,
    )  # fmt: skip
    macs = [mac_of(i) for i in range(n)]

    def register(p: Projection) -> list[Event]:
        return [e for m in macs for e in devices.register(p, m, collection="lab")]

    await app._execute(register)
    await app.assign("collection", "lab", "win", default=True)
    return macs


async def test_a_burst_is_one_commit_and_one_session_per_device(app: RegistryApp) -> None:
    """Ten openers per device, all at once: they share transactions, and each device still
    gets exactly one session (the others are refused and their refusals logged)."""
    macs = await ready(app, 30)
    commits = app.group_commits

    async def attempt(mac: str) -> str | DomainError:
        try:
            return (await app.open_session(mac))["session_id"]
        except DomainError as exc:
            return exc

    results = await asyncio.gather(*(attempt(m) for m in macs * 10))
    won = [r for r in results if isinstance(r, str)]
    lost = [r for r in results if isinstance(r, DomainError)]
    assert len(won) == len(macs) and len(lost) == 9 * len(macs)
    assert all(e.kind == "conflict" for e in lost)
    assert {app.projection.sessions[s]["mac"] for s in won} == set(macs)
    opened = await app.store.read_all(types=["SessionOpened"])
    assert sorted(e.data["mac"] for e in opened) == sorted(macs)
    assert len(await app.store.read_all(types=["SessionConflictRejected"])) == 9 * len(macs)
    # Grouped: fewer transactions than commands (all 300 waited on the first one).
    assert app.group_commits - commits < len(results)
    assert_live_indexes(app.projection)
    for sid in won[::2]:
        await app.close_session(sid)
    assert_live_indexes(app.projection)
    assert len(app.projection.live_by_hostname) == len(macs) - len(won[::2])


def assert_live_indexes(p: Projection) -> None:
    """The projection's live-session indexes (what an open checks) are its sessions'."""
    want: dict[str, dict[str, dict[str, None]]] = {"hostname": {}, "machine_id": {}, "vdisk": {}}
    for sid, s in p.sessions.items():
        for field in ("vdisk",) if s.get("replay_of") else ("hostname", "machine_id", "vdisk"):
            want[field].setdefault(s[field], {})[sid] = None
    got = {"hostname": p.live_by_hostname, "machine_id": p.live_by_machine_id,
           "vdisk": p.live_by_vdisk}  # fmt: skip
    assert {k: {x: list(v) for x, v in d.items()} for k, d in got.items()} == {
        k: {x: list(v) for x, v in d.items()} for k, d in want.items()
    }


async def test_a_failed_group_leaves_nothing_behind(app: RegistryApp) -> None:
    """A command whose append PostgreSQL refuses (a NUL in its stream id) fails its whole
    group: none of the group's events are in the log, nor in the projection, and the next
    commands go through."""
    macs = await ready(app, 4)
    position = app.projection.position

    async def poisoned() -> None:
        await app._execute(
            lambda p: [SessionClosed(session_id="x\x00y", reason="closed-by-request")]
        )

    results = await asyncio.gather(
        app.open_session(macs[0]), poisoned(), app.open_session(macs[1]), return_exceptions=True
    )
    assert all(isinstance(r, Exception) for r in results), results
    assert app.projection.sessions == {}
    assert await app.store.read_all(position, types=["SessionOpened"]) == []
    s = await app.open_session(macs[0])
    assert list(app.projection.sessions) == [s["session_id"]]


async def test_a_rest_open_commits_its_audit_record_with_the_session(registry: Registry) -> None:
    """A session opened through the REST API is one commit: its SessionOpened and the
    request's AdminActionPerformed share a transaction (PostgreSQL's xmin). A refused open
    still gets exactly one record, with the status it was answered."""
    app = registry.app
    macs = await ready(app, 2)
    async with registry.http() as http:
        opened = await http.post("/sessions", json={"mac": macs[0]})
        refused = await http.post("/sessions", json={"mac": macs[0]})  # it has one live
    assert opened.status_code == 201 and refused.status_code == 409
    rows = await app.store.pool.fetch(
        "SELECT xmin::text AS tx, type, data::jsonb->>'status' AS status FROM events "
        "WHERE type IN ('SessionOpened', 'AdminActionPerformed') "
        "AND (type = 'SessionOpened' OR data::jsonb->>'path' = '/sessions') ORDER BY position"
    )
    assert [(r["type"], r["status"]) for r in rows] == [
        ("SessionOpened", None),
        ("AdminActionPerformed", "201"),
        ("AdminActionPerformed", "409"),
    ]
    assert rows[0]["tx"] == rows[1]["tx"] != rows[2]["tx"]


async def test_a_burst_of_opens_spreads_over_the_stream_nodes(
    store: EventStore, data_dir: Path
) -> None:
    """Opens that arrive together, before any heartbeat could show a node's new load, go
    to the nodes in turn: each placement counts the sessions placed before it."""
    beats = [
        {"service": "stream", "alive": True, "node": n, "nbd": f"{n}:10809",
         "http_stream": f"http://{n}:8080", "load": 0}
        for n in ("a", "b")
    ]  # fmt: skip

    async def heartbeats() -> list[dict[str, Any]]:
        return beats

    app = RegistryApp(store, Settings(data_dir=data_dir, api_token=TOKEN, **PATIENT),
                      heartbeats=heartbeats)  # fmt: skip
    await app.start()
    macs = await ready(app, 40)
    views = await asyncio.gather(*(app.open_session(m) for m in macs))
    assert Counter(v["stream_node"] for v in views) == {"a": 20, "b": 20}
    assert all(v["nbd_nodes"] == [("b" if v["stream_node"] == "a" else "a") + ":10809"]
               for v in views)  # fmt: skip
    # A node whose heartbeat shows more connections than sessions placed on it gets less.
    beats[0]["load"] = 30
    for v in views[:10]:
        await app.close_session(v["session_id"])
    more = await asyncio.gather(*(app.open_session(m) for m in macs[:10]))
    assert Counter(v["stream_node"] for v in more) == {"b": 10}


async def test_an_open_while_the_heartbeats_are_unknown_is_busy(
    store: EventStore, data_dir: Path, nc: Any
) -> None:
    """A heartbeat view not loaded yet (or watching again) cannot place a session: the
    open is refused busy, with a retry delay, and nothing is appended."""
    from shared.heartbeat import HeartbeatView

    view = HeartbeatView(nc.jetstream(), 6.0)  # never run: not loaded
    app = RegistryApp(store, Settings(data_dir=data_dir, api_token=TOKEN, **PATIENT),
                      heartbeats=view.read)  # fmt: skip
    await app.start()
    macs = await ready(app, 1)
    position = app.projection.position
    with pytest.raises(DomainError) as refused:
        await app.open_session(macs[0])
    assert refused.value.kind == "busy" and refused.value.retry_after_s
    assert not app.projection.sessions and app.projection.position == position
