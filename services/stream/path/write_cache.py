"""A session's write cache: the layer that makes a read-only vdisk writable for one client.

The data lives in this process: in a memfd (``server-ram``) or an unlinked sparse temp file
(``server-disk``). Either way a block the session wrote is served with the same ``preadv``
as a clean one. Under a cache service this layer is the local *mirror* of the session's
write cache there: ``remote_write_cache.py`` wraps it and ships what it changed.

Granularity is 4 KiB: a write that covers part of a block first copies the block from the
layers below (read-modify-write). Zeroed / trimmed whole blocks are only marked, not stored.

A change suspends only while the layers below fetch the blocks its partial edges need, then
applies itself whole in one step of the loop (the concurrency model: ``backend.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

from services.stream.path.backend import (
    STATE_HOLE,
    STATE_ZERO,
    ZERO_FD,
    Backend,
    BlocksMissing,
    Extent,
    Layer,
    Piece,
    read_into,
)
from services.stream.path.spare_files import SpareFiles, unlinked_file
from shared.block_map import BLOCK, CLEAN, DIRTY, ZEROED, BlockMap, blocks_of


def new_cache_file(
    kind: str, directory: Path | None, size: int, spares: SpareFiles | None = None
) -> int:
    """The file a write cache holds its blocks in: a memfd (``server-ram``) or an unlinked
    sparse file (``server-disk``: it vanishes with the process, whatever happens), one of
    ``spares`` when given (made ahead: spare_files.py)."""
    if kind == "server-ram":
        fd = os.memfd_create("streamboot-wc", os.MFD_CLOEXEC)
    elif kind == "server-disk":
        fd = spares.take() if spares is not None else unlinked_file(directory)
    else:
        raise ValueError(f"no in-process write cache of kind {kind!r}")
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class WriteCache(Layer):
    def __init__(
        self,
        next_: Backend,
        kind: str = "server-ram",
        directory: Path | None = None,
        spares: SpareFiles | None = None,
    ) -> None:
        super().__init__(next_)
        if kind not in ("server-ram", "server-disk"):
            raise ValueError(f"no in-process write cache of kind {kind!r}")
        self.kind = kind
        self.directory = directory
        self.spares = spares
        # Made by the first change (_file), from ``spares`` when they are given: creating a
        # disk file is a file-system round trip a storm of sessions opening at once would
        # pay before any handshake, and a session that only reads never needs it.
        self.fd = -1
        self.state = BlockMap(blocks_of(self.size))
        self._touched = 0  # blocks not CLEAN; 0 means every read passes straight down

    def can_write(self) -> bool:
        return True

    def can_flush(self) -> bool:
        return True

    def can_trim(self) -> bool:
        return True

    def can_zero(self) -> bool:
        return True

    def can_fua(self) -> bool:
        return True

    def can_multi_conn(self) -> bool:
        # One cache object per session, shared by all its connections: a flush on one
        # covers writes completed on every other.
        return True

    @property
    def dirty_bytes(self) -> int:
        return self.state.dirty * BLOCK

    @property
    def blocks(self) -> int:
        return len(self.state)

    def runs(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """``(state, start, stop)`` byte runs of equal block state covering the range."""
        end = offset + length
        runs = self.state.runs(offset // BLOCK, (end - 1) // BLOCK + 1)
        return [(v, max(a * BLOCK, offset), min(b * BLOCK, end)) for v, a, b in runs]

    def map_read(self, offset: int, length: int) -> list[Piece]:
        if not self._touched:
            return self.next.map_read(offset, length)
        pieces: list[Piece] = []
        for v, a, b in self.runs(offset, length):
            if v == CLEAN:
                pieces.extend(self.next.map_read(a, b - a))
            elif v == DIRTY:
                pieces.append((self.fd, a, b - a))
            else:
                pieces.append((ZERO_FD, 0, b - a))
        return pieces

    def _file(self) -> int:
        """The cache's file, made at the first change."""
        if self.fd < 0:
            self.fd = new_cache_file(self.kind, self.directory, self.size, self.spares)
        return self.fd

    def _mark(self, first: int, stop: int, value: int) -> None:
        self._touched += self.state.set(first, stop, value)

    def read_dirty(self, offset: int, length: int) -> bytes:
        """Bytes of blocks this session wrote (DIRTY runs of :meth:`runs`)."""
        return os.pread(self.fd, length, offset)

    def load(self, offset: int, data: bytes) -> None:
        """Blocks the session wrote earlier, pulled back from where they were kept."""
        os.pwrite(self._file(), data, offset)
        self._mark(offset // BLOCK, -(-(offset + len(data)) // BLOCK), DIRTY)

    def mark_zeroed(self, first: int, stop: int) -> None:
        """Blocks ``first``..``stop`` the session zeroed or trimmed earlier."""
        self._mark(first, stop, ZEROED)

    async def _materialize(self, blocks: set[int]) -> None:
        """Copy partly overwritten blocks into the cache so their other bytes survive.

        Suspends only to fetch what the layers below do not have on this node yet, then
        looks at every block's state again: the copy and the caller's change that follows
        (with no await in between) happen in the same step of the loop."""
        while True:
            copies: list[tuple[int, list[Piece] | None]] = []
            try:
                for block in sorted(blocks):
                    state = self.state[block]
                    if state == DIRTY:
                        continue
                    start = block * BLOCK
                    n = min(BLOCK, self.size - start)
                    copies.append((block, self.next.map_read(start, n) if state == CLEAN else None))
            except BlocksMissing as miss:
                await miss.fetch()  # a remote bottom fetches; other requests run meanwhile
                continue
            break
        for block, pieces in copies:
            start = block * BLOCK
            buf = bytearray(min(BLOCK, self.size - start))  # ZEROED: zeros
            if pieces is not None:
                read_into(pieces, memoryview(buf))
            os.pwrite(self._file(), buf, start)
            self._mark(block, block + 1, DIRTY)

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        if not data:
            return
        end = offset + len(data)
        first, last = offset // BLOCK, (end - 1) // BLOCK
        edges = set()
        if offset % BLOCK:
            edges.add(first)
        if end % BLOCK and end != self.size:
            edges.add(last)
        await self._materialize(edges)
        # From here to the end, no await: the write lands on the edges just copied.
        written = os.pwrite(self._file(), data, offset)
        if written != len(data):
            raise OSError(f"short write to write cache: {written} of {len(data)}")
        self._mark(first, last + 1, DIRTY)

    async def zero(self, offset: int, length: int, fua: bool = False) -> None:
        if not length:
            return
        end = offset + length
        first = -(-offset // BLOCK)
        stop = end // BLOCK if end != self.size else -(-end // BLOCK)
        # Partial edge blocks get real zeros written; whole blocks are only marked.
        if first > stop:  # inside one block
            edges = [(offset, end)]
        else:
            edges = [(a, b) for a, b in ((offset, first * BLOCK), (stop * BLOCK, end)) if a < b]
        await self._materialize({a // BLOCK for a, _ in edges})
        # From here to the end, no await (as in pwrite).
        for a, b in edges:
            os.pwrite(self._file(), bytes(b - a), a)
        if first < stop:
            self._mark(first, stop, ZEROED)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        # Trimmed blocks read back as zeros: deterministic, and it never exposes the base.
        await self.zero(offset, length, fua)

    async def flush(self) -> None:
        # The cache is dropped with the session (persistence "discard"): nothing to sync.
        return None

    async def extents(self, offset: int, length: int) -> list[Extent]:
        if not self._touched:
            return await self.next.extents(offset, length)
        out: list[Extent] = []
        for v, a, b in self.runs(offset, length):
            if v == CLEAN:
                out.extend(await self.next.extents(a, b - a))
            else:
                out.append((b - a, STATE_HOLE | STATE_ZERO if v == ZEROED else 0))
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.state.close()
        self.next.close()
