"""One test per layer of the read/write path (services/stream/path), each over an in-memory
bottom: one that serves every block at once, and one that must fetch each block first
(it awaits, as a vdisk in a remote store does). The write cache held by the cache service
is tested over the same bottoms in tests/cache/test_remote_write_layer.py (it needs a
cache node)."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections.abc import Awaitable
from functools import partial

import pytest

from services.stream.path.backend import (
    STATE_HOLE,
    STATE_ZERO,
    BlocksMissing,
    Extent,
    Layer,
    ReadOnlyBottom,
    pread_via_map,
)
from services.stream.path.cached_store import CacheLink, version_key
from services.stream.path.outage import Undelivered
from services.stream.path.profile_hint import ProfileHint
from services.stream.path.ride_out import RideOut
from services.stream.path.write_cache import WriteCache
from services.stream.spec import ExportSpec
from shared.block_map import BLOCK
from shared.contracts.cache import wire
from shared.contracts.cache.client import CacheClient
from shared.vdisk_layout import Piece

SIZE = 16 * BLOCK + 1000  # the last block is partial


class MemoryBottom(ReadOnlyBottom):
    """A read-only vdisk in a memfd; counts its attaches, knows when it is closed."""

    def __init__(self, data: bytes) -> None:
        self.fd = os.memfd_create("test-bottom", os.MFD_CLOEXEC)
        os.pwrite(self.fd, data, 0)
        self.size = len(data)
        self.attached = 0
        self.closed = False

    def map_read(self, offset: int, length: int) -> list[Piece]:
        return [(self.fd, offset, length)]

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return [(length, 0)]

    async def attach(self) -> None:
        self.attached += 1

    def close(self) -> None:
        assert not self.closed, "closed twice"
        self.closed = True
        os.close(self.fd)


class AwaitingBottom(MemoryBottom):
    """Every block must be fetched before it is served; the fetch yields to the loop."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.present: set[int] = set()
        self.fetches = 0

    def map_read(self, offset: int, length: int) -> list[Piece]:
        wanted = set(range(offset // BLOCK, (offset + length - 1) // BLOCK + 1))
        missing = wanted - self.present
        if missing:
            raise BlocksMissing(partial(self._fetch, missing))
        return super().map_read(offset, length)

    async def _fetch(self, blocks: set[int]) -> None:
        self.fetches += 1
        await asyncio.sleep(0)
        self.present |= blocks

    async def attach(self) -> None:
        await asyncio.sleep(0)
        await super().attach()


BOTTOMS = {"at-once": MemoryBottom, "awaiting": AwaitingBottom}


@pytest.fixture(params=sorted(BOTTOMS))
def bottom(request: pytest.FixtureRequest) -> MemoryBottom:
    data = random.Random(7).randbytes(SIZE)
    return BOTTOMS[request.param](data)


def base_of(bottom: MemoryBottom) -> bytes:
    return os.pread(bottom.fd, bottom.size, 0)


async def test_a_layer_passes_every_callback_down(bottom: MemoryBottom) -> None:
    class Nothing(Layer):
        pass

    layer = Nothing(bottom)
    # A layer that does not change reads costs no call on the hot path.
    assert layer.map_read == bottom.map_read
    assert layer.size == bottom.size
    assert not layer.can_write() and layer.can_multi_conn()
    await layer.attach()
    assert bottom.attached == 1
    assert await pread_via_map(layer, 10, 3 * BLOCK) == base_of(bottom)[10 : 10 + 3 * BLOCK]
    with pytest.raises(PermissionError):
        await layer.pwrite(0, b"x")
    layer.close()
    assert bottom.closed


async def test_write_cache_keeps_changes_above_a_read_only_bottom(bottom: MemoryBottom) -> None:
    base = base_of(bottom)
    ref = bytearray(base)
    wc = WriteCache(bottom, "server-ram")
    await wc.attach()
    assert bottom.attached == 1 and wc.can_write() and wc.can_multi_conn()
    # Untouched: reads pass straight to the bottom.
    assert await pread_via_map(wc, 0, SIZE) == base

    writes = [(100, 300), (BLOCK - 10, 20), (5 * BLOCK, 2 * BLOCK), (SIZE - 7, 7)]
    for i, (at, n) in enumerate(writes):
        data = bytes([i + 1]) * n
        await wc.pwrite(at, data)
        ref[at : at + n] = data
    await wc.zero(9 * BLOCK + 5, 3 * BLOCK)  # partial edges and whole blocks
    ref[9 * BLOCK + 5 : 12 * BLOCK + 5] = bytes(3 * BLOCK)
    await wc.trim(14 * BLOCK, BLOCK)  # trimmed blocks read as zeros
    ref[14 * BLOCK : 15 * BLOCK] = bytes(BLOCK)
    await wc.flush()

    assert await pread_via_map(wc, 0, SIZE) == bytes(ref)
    assert base_of(bottom) == base, "the bottom never changes"
    assert wc.dirty_bytes == 7 * BLOCK  # blocks 0, 1, 5, 6, 9, 12 and the last
    extents = await wc.extents(10 * BLOCK, 2 * BLOCK)
    assert extents == [(2 * BLOCK, STATE_HOLE | STATE_ZERO)]
    wc.close()
    assert bottom.closed


async def test_write_cache_concurrent_writes_into_one_block(bottom: MemoryBottom) -> None:
    """Two writes into one block at once (each fetching its edge first) both land."""
    wc = WriteCache(bottom, "server-ram")
    await asyncio.gather(wc.pwrite(3 * BLOCK + 10, b"a" * 10), wc.pwrite(3 * BLOCK + 30, b"b" * 10))
    got = await pread_via_map(wc, 3 * BLOCK, BLOCK)
    want = bytearray(base_of(bottom)[3 * BLOCK : 4 * BLOCK])
    want[10:20], want[30:40] = b"a" * 10, b"b" * 10
    assert got == bytes(want)
    wc.close()


def spec_of(size: int) -> ExportSpec:
    return ExportSpec(session_id="s-layers", vdisk="golden", version=2, layers=(), size=size)


async def test_profile_hint_leaves_reads_to_the_layer_below(bottom: MemoryBottom) -> None:
    spec = spec_of(bottom.size)
    link = CacheLink(CacheClient(None))  # type: ignore[arg-type]  # never asked: warmed
    assert link.should_warm(version_key(spec))  # this node warmed the version just now
    hint = ProfileHint(bottom, spec, link)
    assert hint.map_read == bottom.map_read
    await hint.attach()
    assert bottom.attached == 1 and hint._hint is None  # no second warm of the version
    assert await pread_via_map(hint, 0, SIZE) == base_of(bottom)
    hint.close()
    assert bottom.closed


def away() -> wire.CacheError:
    return wire.CacheError(errno.EHOSTUNREACH, "cache node n1 is not alive", "not_alive")


class FlakyRemote(Layer):
    """The layer a :class:`RideOut` wraps (a ``RemoteWriteCache`` as the ride-out sees it),
    over a write cache: while ``away`` its changes and flushes are not taken; ``gone`` makes
    every failure one no recovery cures."""

    def __init__(self, next_: WriteCache) -> None:
        super().__init__(next_)
        self.key = "wc-test"
        self.node = "n1"
        self.on_restart = None
        self.away = False
        self.gone = False
        self.resends = 0
        self.restarted_flush = False  # the next FLUSH is answered by a restarted node

    def _check(self) -> None:
        if self.away or self.gone:
            raise Undelivered(away() if self.away else wire.CacheError(5, "dropped", "dropped"), 0)

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._taken(self.next.pwrite(offset, data, fua))

    async def zero(self, offset: int, length: int, fua: bool = False) -> None:
        await self._taken(self.next.zero(offset, length, fua))

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._taken(self.next.trim(offset, length, fua))

    async def _taken(self, change: Awaitable[None]) -> None:
        await change  # applied to the mirror, then shipped
        self._check()

    async def flush(self) -> None:
        self._check()
        if self.restarted_flush:
            self.restarted_flush = False
            assert self.on_restart is not None
            self.on_restart()
            raise Undelivered(None, 0)

    def recoverable(self, e: wire.CacheError, opens: int) -> bool:
        return wire.transient(e)

    async def probe_and_resend(self, left_s: float) -> int:
        await asyncio.sleep(0)
        if self.away:
            raise away()
        self.resends += 1
        return 0


def ride_out_stack(bottom: MemoryBottom, grace_s: float) -> tuple[RideOut, FlakyRemote]:
    remote = FlakyRemote(WriteCache(bottom, "server-ram"))
    return RideOut(remote, grace_s), remote


async def test_ride_out_holds_changes_until_the_node_answers(bottom: MemoryBottom) -> None:
    top, remote = ride_out_stack(bottom, grace_s=60.0)
    assert top.map_read == remote.next.map_read  # reads go straight to the mirror
    await top.attach()
    assert bottom.attached == 1
    remote.away = True
    writes = [
        asyncio.ensure_future(top.pwrite(0, b"w" * 100, fua=True)),
        asyncio.ensure_future(top.zero(BLOCK, BLOCK)),
        asyncio.ensure_future(top.trim(2 * BLOCK, BLOCK)),
        asyncio.ensure_future(top.flush()),
    ]
    for _ in range(20):
        await asyncio.sleep(0)
    assert not any(w.done() for w in writes), "nothing fails while the node may come back"
    remote.away = False
    await asyncio.gather(*writes)
    assert remote.resends == 1, "one recovery for every request waiting"
    assert await pread_via_map(top, 0, 100) == b"w" * 100
    top.close()
    assert bottom.closed


async def test_ride_out_gives_up_after_the_grace(bottom: MemoryBottom) -> None:
    top, remote = ride_out_stack(bottom, grace_s=0.05)
    remote.away = True
    with pytest.raises(wire.CacheError) as e:
        await top.pwrite(0, b"x")
    assert e.value.kind == "not_alive"
    assert remote.resends == 0
    top.close()


async def test_ride_out_does_not_wait_for_what_no_recovery_cures(bottom: MemoryBottom) -> None:
    top, remote = ride_out_stack(bottom, grace_s=60.0)
    remote.gone = True
    with pytest.raises(wire.CacheError) as e:
        await top.pwrite(0, b"x")
    assert e.value.kind == "dropped"
    with pytest.raises(wire.CacheError):
        await top.flush()
    assert remote.resends == 0
    top.close()


async def test_ride_out_flushes_again_after_a_node_restart(bottom: MemoryBottom) -> None:
    top, remote = ride_out_stack(bottom, grace_s=60.0)
    await top.pwrite(0, b"x" * 10)
    remote.restarted_flush = True
    await top.flush()
    assert remote.resends == 1, "sent again before the FLUSH that covers it"
    assert not remote.restarted_flush
    top.close()
