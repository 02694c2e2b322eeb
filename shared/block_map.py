"""The state of every 4 KiB block of a session's disk: clean, dirty (in the write cache) or
zeroed (marked only). The map of a write cache, held by the cache service and mirrored by
the stream node serving the session.

One state byte per block, in an anonymous private memory map rather than a bytearray: the
kernel hands out a page of the map only when a state in it is set (a 4 KiB page covers
16 MiB of disk) and reads of the rest see its shared zero page. So a session costs memory
for what it wrote, not for the size of its disk (a whole-disk array costs memory and CPU
on every open in proportion to the disk: docs/cache.md has the figures).

The dirty and zeroed block counts are kept as states change, so nothing counts over the
whole map. What travels between services is the map's non-clean runs (:meth:`encode`):
nothing at all for a cache never written.
"""

from __future__ import annotations

import base64
import mmap
import os
import struct
import sys
import zlib
from array import array

BLOCK = 4096
CLEAN, DIRTY, ZEROED = 0, 1, 2
STATES = (CLEAN, DIRTY, ZEROED)
_OTHERS = {CLEAN: (b"\1", b"\2"), DIRTY: (b"\0", b"\2"), ZEROED: (b"\0", b"\1")}
_COUNT = struct.Struct("<Q")

# A run: (state, first block, stop block).
Run = tuple[int, int, int]


def blocks_of(size: int) -> int:
    """Blocks of a disk of ``size`` bytes (a last partial block counts)."""
    return -(-size // BLOCK)


class BlockMap:
    def __init__(self, nblocks: int) -> None:
        self.nblocks = nblocks
        # MAP_PRIVATE: a read of a never-set page maps the zero page, allocating nothing.
        self._m = mmap.mmap(-1, max(nblocks, 1), flags=mmap.MAP_PRIVATE)
        self.dirty = 0
        self.zeroed = 0

    def __len__(self) -> int:
        return self.nblocks

    def __getitem__(self, block: int) -> int:
        return self._m[block]

    @property
    def clean(self) -> bool:
        return not (self.dirty or self.zeroed)

    def count(self, state: int, first: int, stop: int) -> int:
        """Blocks in ``state`` among ``first``..``stop`` (a request's range: small)."""
        return self._m[first:stop].count(state)

    def set(self, first: int, stop: int, state: int) -> int:
        """Put blocks ``first``..``stop`` in ``state``; returns how many were clean."""
        if first >= stop:
            return 0
        before = self._m[first:stop]
        n = stop - first
        was_clean, dirty = before.count(CLEAN), before.count(DIRTY)
        zeroed = n - was_clean - dirty
        self.dirty += (n if state == DIRTY else 0) - dirty
        self.zeroed += (n if state == ZEROED else 0) - zeroed
        self._m[first:stop] = bytes([state]) * n
        return was_clean

    def _run_at(self, i: int, stop: int) -> Run:
        """The run of equal state that starts at block ``i`` (ending by ``stop``)."""
        m = self._m
        v = m[i]
        j = stop
        for other in _OTHERS[v]:
            k = m.find(other, i + 1, j)
            if k != -1:
                j = k
        return (v, i, j)

    def runs(self, first: int, stop: int) -> list[Run]:
        """The runs of equal state covering blocks ``first``..``stop``."""
        out = []
        i = first
        while i < stop:
            run = self._run_at(i, stop)
            out.append(run)
            i = run[2]
        return out

    def nonclean_runs(self, first: int = 0, limit: int | None = None) -> list[Run]:
        """The runs of dirty and zeroed blocks from block ``first`` to the end of the map, in
        order; at most ``limit`` of them."""
        m, n = self._m, self.nblocks
        # Where each non-clean state occurs next (searched again only once passed): one
        # scan of the map per state, however many runs.
        present = {b"\1": self.dirty, b"\2": self.zeroed}
        upcoming = {s: m.find(s, first, n) for s, k in present.items() if k}
        out: list[Run] = []
        i = first
        while limit is None or len(out) < limit:
            for s, k in upcoming.items():
                if k != -1 and k < i:
                    upcoming[s] = m.find(s, i, n)
            found = [k for k in upcoming.values() if k != -1]
            if not found:
                return out
            run = self._run_at(min(found), n)
            out.append(run)
            i = run[2]
        return out

    def load_file(self, fd: int) -> None:
        """Fill the map from a map file (one state byte per block, sparse: only the parts
        with data are read, found with SEEK_DATA / SEEK_HOLE)."""
        n = self.nblocks
        pos = 0
        while pos < n:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            if pos >= n:
                break
            end = min(os.lseek(fd, pos, os.SEEK_HOLE), n)
            while pos < end:
                chunk = os.pread(fd, min(end - pos, 1 << 20), pos)
                if not chunk:
                    return
                self._m[pos : pos + len(chunk)] = chunk
                self.dirty += chunk.count(DIRTY)
                self.zeroed += chunk.count(ZEROED)
                pos += len(chunk)

    def encode(self) -> str:
        """The non-clean runs as they travel: gaps and lengths as 64-bit arrays beside the
        states, zlib, base64 ("" for a clean map)."""
        return encode_runs(self.nonclean_runs())

    def close(self) -> None:
        self._m.close()


def encode_runs(runs: list[Run]) -> str:
    if not runs:
        return ""
    states = bytes(v for v, _, _ in runs)
    gaps, lengths = array("Q"), array("Q")
    prev = 0
    for _, a, b in runs:
        gaps.append(a - prev)
        lengths.append(b - a)
        prev = b
    if sys.byteorder != "little":
        gaps.byteswap()
        lengths.byteswap()
    raw = _COUNT.pack(len(runs)) + states + gaps.tobytes() + lengths.tobytes()
    return base64.b64encode(zlib.compress(raw, 1)).decode()


def decode_runs(encoded: str, nblocks: int) -> list[Run]:
    """The runs of :func:`encode_runs`; ValueError if they are not a map of ``nblocks``."""
    if not encoded:
        return []
    try:
        raw = zlib.decompress(base64.b64decode(encoded))
        (count,) = _COUNT.unpack_from(raw)
    except (ValueError, zlib.error, struct.error) as e:
        raise ValueError(f"undecodable block map: {e}") from e
    states = raw[8 : 8 + count]
    gaps, lengths = array("Q"), array("Q")
    gaps.frombytes(raw[8 + count : 8 + 9 * count])
    lengths.frombytes(raw[8 + 9 * count : 8 + 17 * count])
    if len(states) != count or len(gaps) != count or len(lengths) != count:
        raise ValueError("truncated block map")
    if sys.byteorder != "little":
        gaps.byteswap()
        lengths.byteswap()
    out = []
    pos = 0
    for v, gap, n in zip(states, gaps, lengths, strict=True):
        a = pos + gap
        pos = a + n
        if v not in (DIRTY, ZEROED) or not n or pos > nblocks:
            raise ValueError(f"bad block map run ({v}, {a}, {pos}) for {nblocks} blocks")
        out.append((v, a, pos))
    return out
