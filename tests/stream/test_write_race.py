"""Concurrent changes into one 4 KiB block of a write cache over a bottom that fetches.

The bottom stands for a vdisk in a remote store (``CachedStoreBackend``): its blocks are not
on this node until fetched, and the fetch yields to the event loop, so the other requests of
the session run meanwhile. Whatever the interleaving, the cache must end as the changes
applied one after the other in some order: never with a change undone by stale bytes
fetched before it.
"""

from __future__ import annotations

import asyncio
import os
from functools import partial

import pytest

from services.stream.path.backend import BlocksMissing, ReadOnlyBottom, pread_via_map
from services.stream.path.write_cache import WriteCache
from shared.block_map import BLOCK
from shared.vdisk_layout import Piece

SIZE = 16 * BLOCK
SECTOR = 512


class FetchingBottom(ReadOnlyBottom):
    """A read-only disk of ``base`` whose blocks must be fetched before they are read."""

    def __init__(self, base: bytes, yields: int = 3) -> None:
        self.size = len(base)
        self.fd = os.memfd_create("fetching-bottom", os.MFD_CLOEXEC)
        os.pwrite(self.fd, base, 0)
        self.present = bytearray(self.size // BLOCK)
        self.yields = yields
        self.fetches = 0

    def map_read(self, offset: int, length: int) -> list[Piece]:
        first, stop = offset // BLOCK, -(-(offset + length) // BLOCK)
        missing = [b for b in range(first, stop) if not self.present[b]]
        if missing:
            raise BlocksMissing(partial(self._fetch, missing))
        return [(self.fd, offset, length)]

    async def _fetch(self, blocks: list[int]) -> None:
        self.fetches += 1
        for _ in range(self.yields):  # a round trip: everyone else runs meanwhile
            await asyncio.sleep(0)
        for b in blocks:
            self.present[b] = 1

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 0)]

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def base() -> bytes:
    return os.urandom(SIZE)


def stack(base: bytes, *, present: tuple[int, ...] = ()) -> tuple[WriteCache, FetchingBottom]:
    bottom = FetchingBottom(base)
    for b in present:
        bottom.present[b] = 1
    return WriteCache(bottom, "server-ram"), bottom


async def read(wc: WriteCache, offset: int, length: int) -> bytes:
    return await pread_via_map(wc, offset, length)


async def test_two_sector_writes_into_one_block_both_land(base: bytes) -> None:
    wc, bottom = stack(base)
    try:
        a, b = b"\xaa" * SECTOR, b"\xbb" * SECTOR
        await asyncio.gather(wc.pwrite(0, a), wc.pwrite(SECTOR, b))
        assert bottom.fetches >= 1  # the race was there to lose
        assert await read(wc, 0, BLOCK) == a + b + base[2 * SECTOR : BLOCK]
    finally:
        wc.close()


async def test_many_sector_writes_into_one_block_all_land(base: bytes) -> None:
    wc, _ = stack(base)
    try:
        block = 5
        sectors = [bytes([i + 1]) * SECTOR for i in range(BLOCK // SECTOR)]
        # Every sector but the first and last is a partial write of the block.
        await asyncio.gather(
            *(wc.pwrite(block * BLOCK + i * SECTOR, s) for i, s in enumerate(sectors))
        )
        assert await read(wc, block * BLOCK, BLOCK) == b"".join(sectors)
        assert await read(wc, 0, block * BLOCK) == base[: block * BLOCK]
    finally:
        wc.close()


async def test_a_whole_block_written_while_a_partial_write_fetches_is_kept(base: bytes) -> None:
    wc, _ = stack(base)
    try:
        part, whole = b"\x11" * SECTOR, b"\x22" * BLOCK
        await asyncio.gather(wc.pwrite(SECTOR, part), wc.pwrite(0, whole))
        got = await read(wc, 0, BLOCK)
        # Either order is a correct outcome; the base's bytes are in neither.
        assert got in (whole, whole[:SECTOR] + part + whole[2 * SECTOR :])
    finally:
        wc.close()


async def test_a_zeroed_edge_and_a_sector_write_into_one_block_both_land(base: bytes) -> None:
    wc, _ = stack(base)
    try:
        data = b"\x33" * SECTOR
        await asyncio.gather(wc.zero(0, SECTOR), wc.pwrite(3 * SECTOR, data))
        got = await read(wc, 0, BLOCK)
        assert got == bytes(SECTOR) + base[SECTOR : 3 * SECTOR] + data + base[4 * SECTOR : BLOCK]
    finally:
        wc.close()


async def test_a_block_zeroed_while_a_write_fetches_its_other_edge(base: bytes) -> None:
    # The write covers block 0 from its second sector on, block 1, and block 2's first
    # sector: block 0 is on the node, block 2 must be fetched. Block 0 is zeroed whole
    # while the write waits for block 2.
    wc, _ = stack(base, present=(0,))
    try:
        data = b"\x44" * (2 * BLOCK)
        await asyncio.gather(wc.pwrite(SECTOR, data), wc.zero(0, BLOCK))
        got = await read(wc, 0, BLOCK)
        # Zero then write, or write then zero; never the base's first sector.
        assert got in (bytes(SECTOR) + data[: BLOCK - SECTOR], bytes(BLOCK))
        assert (
            await read(wc, 2 * BLOCK, BLOCK)
            == data[-SECTOR:] + base[2 * BLOCK + SECTOR : 3 * BLOCK]
        )
    finally:
        wc.close()
