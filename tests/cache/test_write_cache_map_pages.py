"""A write cache kept across many boots gathers a map of many scattered runs. Whoever opens it
gets every run whatever NATS's message limit (1 MB by default on an external server): the
map travels in pages (``wc.open``, then ``wc.map``). Real nats-server, real cache service."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import nats

from shared.block_map import BLOCK, DIRTY, ZEROED, encode_runs
from shared.contracts.cache import wire
from shared.contracts.cache.client import CacheClient
from shared.contracts.cache.wire import node_subject
from tests.cache.conftest import System, cache_request
from tests.conftest import start_nats

SIZE = 1 << 40


async def test_a_map_bigger_than_a_nats_message_is_opened_whole(tmp_path: Path) -> None:
    server = await start_nats(tmp_path / "nats", tmp_path / "nats.log", max_payload="1MB")
    (tmp_path / "sys").mkdir()
    system = System(server, tmp_path / "sys", {})
    nc = await nats.connect(system.nats_url)
    try:
        cache = await system.start_cache()
        client = CacheClient(nc, timeout_s=60)
        body = {"key": "device-kept-d-v1", "session_id": "s1", "vdisk": "d", "version": 1,
                "size": SIZE, "kind": "server-disk", "persistence": "keep", "mac": None}  # fmt: skip
        opened = await client.open_write_cache(body)
        assert opened.runs == []

        # 300,000 runs of 1-3 blocks at random places (none touch): zeroed (marks), every
        # 400th a written block (data).
        rng = random.Random(5)
        starts = sorted(rng.sample(range(0, SIZE // BLOCK, 4), 300_000))
        want = [
            (DIRTY, a, a + 1) if i % 400 == 0 else (ZEROED, a, a + rng.randint(1, 3))
            for i, a in enumerate(starts)
        ]
        assert len(encode_runs(want)) > nc.max_payload == 1 << 20  # one reply cannot hold it
        channel = client.writer(body["key"], opened.node)
        data = bytes(range(256)) * (BLOCK // 256)
        futs = [
            channel.submit(wire.OP_WRITE, a * BLOCK, BLOCK, data)
            if state == DIRTY
            else channel.submit(wire.OP_ZERO, a * BLOCK, (b - a) * BLOCK)
            for state, a, b in want
        ]
        await asyncio.gather(*futs)
        await channel.submit(wire.OP_FLUSH, 0, 0, None, True)

        # A stream node taking the session over opens it again: every run, in order.
        again = await client.open_write_cache({**body, "session_id": "s2"})
        assert again.runs == want
        assert again.used == sum(1 for s, _, _ in want if s == DIRTY) * BLOCK
        dirty = want[400]
        got = await client.read_write_cache(again.node, body["key"], dirty[1] * BLOCK, BLOCK)
        assert got == data

        # And it stops cleanly on SIGTERM right after a burst. A burst holding its loop for
        # seconds left nats-py's pull subscription (SessionClosed) with expiries it never
        # marked done, and the drain at stop waited 30 s for them.
        await asyncio.gather(*(channel.submit(wire.OP_ZERO, a * BLOCK, BLOCK) for a in starts))
        cache.p.terminate()
        assert await asyncio.to_thread(cache.p.wait, 30) == 0
        assert "draining connection timed out" not in system.cache_log().read_text()
    finally:
        await nc.close()
        system.stop()
        await server.stop()


async def test_a_bad_map_request_is_refused_by_name(system: Callable[..., System]) -> None:
    sys_ = system()
    await sys_.start_cache()
    subject = node_subject(sys_.node_id(), wire.V_WC_MAP)
    for body, says in (
        (None, "bad map request"),
        ({"key": "no-such-cache", "from": 0}, "no write cache 'no-such-cache'"),
        ({"key": "no-such-cache"}, "no write cache"),
    ):
        reply = await cache_request(sys_.nats_url, subject, body)  # type: ignore[arg-type]
        assert says in reply["error"], reply


async def test_a_bad_open_or_read_is_refused_naming_the_field(
    system: Callable[..., System],
) -> None:
    """A body that does not fit its request model is refused ``invalid``, naming the field,
    and opens nothing (a wc.open without a size made a cache of no size)."""
    sys_ = system()
    await sys_.start_cache()
    node = sys_.node_id()
    for subject, body, field in (
        (wire.WC_OPEN, {"key": "session-nosize", "session_id": "s"}, "size"),
        (node_subject(node, wire.V_WC_OPEN), {"key": "session-x", "size": "big"}, "size"),
        (wire.WC_OPEN, {"key": "session-neg", "size": -1}, "size"),
        (wire.RC_OPEN, {"key": "rc", "vdisk": "d"}, "version"),
    ):
        reply = await cache_request(sys_.nats_url, subject, body)
        assert reply.get("kind") == "invalid" and field in reply["error"], (body, reply)
    caches = await cache_request(sys_.nats_url, node_subject(node, wire.V_STATS), {})
    assert not [c for c in caches.get("write_caches", []) if "session-" in str(c)], caches
