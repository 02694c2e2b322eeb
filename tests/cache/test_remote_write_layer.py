"""The layer that ships a session's changes to the cache service (``RemoteWriteCache``),
over its mirror over the in-memory bottoms of tests/stream/test_layers.py, against a real
cache node: what it acknowledged is at the node, and a new stack (another stream node)
attaching the same cache pulls it back."""

from __future__ import annotations

import random
from collections.abc import Callable

import nats
import pytest

from services.stream.path.backend import pread_via_map
from services.stream.path.cached_store import CacheLink
from services.stream.path.outage import Undelivered
from services.stream.path.remote_write_cache import RemoteWriteCache
from services.stream.path.write_cache import WriteCache
from services.stream.spec import ExportSpec
from shared.block_map import BLOCK
from shared.contracts.cache.client import CacheClient
from tests.cache.conftest import System
from tests.stream.test_layers import BOTTOMS, SIZE, MemoryBottom, base_of


@pytest.mark.parametrize("kind", sorted(BOTTOMS))
async def test_remote_write_cache_ships_what_the_mirror_holds(
    system: Callable[..., System], kind: str, tmp_path
) -> None:
    s = system()
    await s.start_cache()
    nc = await nats.connect(s.bus.url_for("stream"))
    spec = ExportSpec(
        session_id=f"s-layer-{kind}",
        vdisk="golden",
        version=2,
        layers=(),
        size=SIZE,
        write_cache="server-disk",
    )
    data = random.Random(3).randbytes(SIZE)
    stacks: list[RemoteWriteCache] = []
    try:

        async def attached(node: str) -> tuple[RemoteWriteCache, MemoryBottom]:
            bottom = BOTTOMS[kind](data)
            link = CacheLink(CacheClient(nc, timeout_s=5.0))
            mirror = WriteCache(bottom, "server-disk", tmp_path)
            remote = RemoteWriteCache(mirror, spec, link, node)
            stacks.append(remote)
            await remote.attach()
            assert bottom.attached == 1, "the layers below attach too"
            assert remote.map_read == mirror.map_read, "reads go straight to the mirror"
            return remote, bottom

        first, bottom = await attached("node1")
        ref = bytearray(base_of(bottom))
        await first.pwrite(BLOCK - 100, b"a" * 200)  # partial edges of two blocks
        ref[BLOCK - 100 : BLOCK + 100] = b"a" * 200
        await first.zero(4 * BLOCK, 2 * BLOCK, fua=True)
        ref[4 * BLOCK : 6 * BLOCK] = bytes(2 * BLOCK)
        await first.trim(SIZE - 50, 50)
        ref[SIZE - 50 :] = bytes(50)
        await first.flush()
        assert not first.unflushed.runs(), "a FLUSH answered covers every change"
        assert await pread_via_map(first, 0, SIZE) == bytes(ref)
        (wc,) = [w for w in (await s.stats())["write_caches"] if w["key"] == spec.session_id]
        assert wc["used"] == first.mirror.dirty_bytes == 3 * BLOCK

        second, _ = await attached("node2")  # pulls the blocks and marks back
        assert await pread_via_map(second, 0, SIZE) == bytes(ref)
        assert second.mirror.dirty_bytes == 3 * BLOCK
    finally:
        for st in stacks:
            st.close()
        await nc.close()


async def test_what_the_node_does_not_take_is_undelivered(
    system: Callable[..., System], tmp_path
) -> None:
    """Without the ride-out layer above, a stopped node's refusal reaches the caller."""
    s = system()
    await s.start_cache()
    nc = await nats.connect(s.bus.url_for("stream"))
    spec = ExportSpec(session_id="s-layer-away", vdisk="golden", version=2, layers=(), size=SIZE)
    link = CacheLink(CacheClient(nc, timeout_s=1.0))
    remote = RemoteWriteCache(WriteCache(MemoryBottom(bytes(SIZE)), "server-ram"), spec, link, "n")
    try:
        await remote.attach()
        await remote.pwrite(0, b"x" * BLOCK)
        assert s.cache is not None
        s.cache.stop()
        with pytest.raises(Undelivered) as e:
            await remote.pwrite(BLOCK, b"y" * BLOCK)
        assert e.value.error is not None
        assert remote.recoverable(e.value.error, e.value.opens), "an outage may be ridden out"
        assert remote.unflushed.runs(), "kept to be sent again"
    finally:
        remote.close()
        await nc.close()
