"""The live-instance view: session opens make no JetStream consumer, and the view follows
the heartbeat bucket through NATS restarts (real nats-servers, the real registry)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.registry.domain import devices
from services.registry.projection import Projection
from shared import bus
from shared.events import Event
from shared.heartbeat import (
    Heartbeat,
    HeartbeatsUnavailable,
    HeartbeatView,
    heartbeat_bucket,
    read_heartbeats,
)
from streamboot.embedded.nats import EmbeddedNats
from streamboot.embedded.proc import free_port
from tests.conftest import traversable_tmpdir, wait_for
from tests.registry.conftest import Registry
from tests.registry.test_sessions import seed

HEARTBEAT_STREAM = "KV_streamboot_heartbeats"
OPENS = 5000


async def kv_consumers(js: Any) -> set[str]:
    """The bucket's consumers by name: other tests' ephemeral consumers on the shared
    server may expire meanwhile, so a test asserts no new name appears, not a count."""
    return {c.name for c in await js.consumers_info(HEARTBEAT_STREAM)}


def mac_of(i: int) -> str:
    return "52:54:01:" + ":".join(f"{b:02x}" for b in i.to_bytes(3, "big"))


@pytest.mark.timeout(900)
async def test_a_burst_of_opens_makes_no_consumer(registry: Registry, nc: Any) -> None:
    """Each open places its session by the heartbeats: read from the registry's view, so
    the heartbeat bucket's consumers stay as many however many sessions open (reading
    the bucket per open made one consumer each, living minutes, until JetStream refused
    more and every open failed)."""
    await seed(registry, registry.data_dir, name="win")
    macs = [mac_of(i) for i in range(OPENS)]

    def register_all(p: Projection) -> list[Event]:
        return [e for m in macs for e in devices.register(p, m, collection="lab")]

    await registry.app._execute(register_all)
    await registry.app.assign("collection", "lab", "win", default=True)
    js = nc.jetstream()
    node = Heartbeat(js, "stream", "storm-node", 1.0, lambda: {
        "load": 0, "nbd": "127.0.0.1:11111", "http_stream": "http://127.0.0.1:11112"})  # fmt: skip
    beating = asyncio.create_task(node.run())
    await registry.sees("stream", "storm-node")
    before = await kv_consumers(js)
    gate = asyncio.Semaphore(64)
    placed: list[str] = []

    async def open_one(mac: str) -> None:
        async with gate:
            s = await bus.request_json(
                nc, "streamboot.registry.session.open", {"mac": mac}, timeout_s=60
            )
            placed.append(s["stream_node"])

    try:
        await asyncio.gather(*(open_one(m) for m in macs))
    finally:
        beating.cancel()
        await node.stop()
    assert len(placed) == OPENS and set(placed) == {"storm-node"}
    assert len(registry.app.projection.sessions) == OPENS
    # Flat: the view's one watch (made before), nothing per open. A bound, not a time.
    assert await kv_consumers(js) <= before


async def test_one_shot_reads_make_no_consumer(registry: Registry, nc: Any) -> None:
    """``status`` and ``up`` read the bucket without a consumer; a hostile value in it
    (any service may write the bucket) is skipped, by them and by the view."""
    js = nc.jetstream()
    kv = await heartbeat_bucket(js)
    await kv.put("stream.junk", b"\xff not json")
    await kv.put("stream.list", b"[1, 2]")
    await kv.put("stream.nameless", b'{"at": 1}')
    await registry.sees("registry", registry.settings.node_id)
    before = await kv_consumers(js)
    for _ in range(50):
        beats = await read_heartbeats(js, 10.0)
        assert {b["service"] for b in beats} >= {"registry"}
    assert await kv_consumers(js) <= before
    assert registry.beats is not None
    for beats in (await read_heartbeats(js, 10.0), registry.beats.read_now()):
        assert all(isinstance(b["node"], str) for b in beats)
    for key in ("stream.junk", "stream.list", "stream.nameless"):
        await kv.delete(key)


@pytest.fixture
async def own_nats() -> AsyncIterator[EmbeddedNats]:
    """A nats-server of this test's own, which it stops and starts again."""
    root = traversable_tmpdir("streamboot-test-nats-")
    server = EmbeddedNats(root / "nats", port=free_port())
    await server.start(log_path=root / "nats.log")
    try:
        yield server
    finally:
        await server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def restart(server: EmbeddedNats, *, wipe: bool) -> None:
    await server.stop()
    if wipe:  # the JetStream store lost: the bucket comes back empty, sequences from 1
        shutil.rmtree(server.root / "jetstream")
    await server.start(log_path=Path(server.root) / "nats.log")


def seen(view: HeartbeatView, node: str) -> bool:
    with contextlib.suppress(HeartbeatsUnavailable):
        return any(b["node"] == node and b["alive"] for b in view.read_now())
    return False


async def beat(url: str, node: str) -> None:
    """One heartbeat of a stream node ``node``, on a connection of its own."""
    conn = await bus.connect(url, f"beat-{node}")
    try:
        await Heartbeat(conn.jetstream(), "stream", node, 1.0).beat()
    finally:
        await conn.close()


async def test_the_view_follows_the_bucket_across_nats_restarts(own_nats: EmbeddedNats) -> None:
    nc = await bus.connect(own_nats.url, "view-test")
    view = HeartbeatView(nc.jetstream(), timeout_s=2.0)
    task = asyncio.create_task(view.run())
    try:
        await view.wait_loaded(10.0)
        await beat(own_nats.url, "a")
        await wait_for(lambda: seen(view, "a"), "the view to see a")

        # NATS restarts with its store: the view keeps following.
        await restart(own_nats, wipe=False)
        await beat(own_nats.url, "b")
        await wait_for(lambda: seen(view, "b"), "the view to see b after a restart", 30.0)

        # NATS down long enough: the view stops vouching for what it holds (the sweeper
        # then keeps attached sessions rather than closing them on a hunch).
        await own_nats.stop()

        def refused() -> bool:
            try:
                view.read_now()
            except HeartbeatsUnavailable:
                return True
            return False

        await wait_for(refused, "the view to refuse while NATS is down", 30.0)

        # It comes back without its store: the view is rebuilt from the new bucket.
        await restart(own_nats, wipe=True)
        await beat(own_nats.url, "c")
        await wait_for(lambda: seen(view, "c"), "the view to see c in the new bucket", 30.0)
        assert {b["node"] for b in view.read_now()} == {"c"}
        # Each watch made again is one consumer; the old ones are not left behind.
        await asyncio.sleep(0)
        assert len(await kv_consumers(nc.jetstream())) <= 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await nc.close()
