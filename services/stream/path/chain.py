"""The bottom of the stack: a vdisk version chain (base + deltas), read-only."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from services.stream.path.backend import STATE_HOLE, STATE_ZERO, ZERO_FD, Extent, ReadOnlyBottom
from shared.vdisk_layout import ChainReader, Piece, open_chain


class ChainBackend(ReadOnlyBottom):
    """Serves a version chain straight from its layer files; it never writes them."""

    def __init__(self, layers: Sequence[str | os.PathLike[str]]) -> None:
        self.reader: ChainReader = open_chain(layers)
        self.size = self.reader.size
        self.map_read = self.reader.resolve  # type: ignore[method-assign]

    def can_extents(self) -> bool:
        return True

    def map_read(self, offset: int, length: int) -> list[Piece]:
        return self.reader.resolve(offset, length)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for fd, off, n in self.reader.resolve(offset, length):
            if fd == ZERO_FD:
                out.append((n, STATE_HOLE | STATE_ZERO))
            else:
                out.extend(file_extents(fd, off, n))
        return out

    def close(self) -> None:
        self.reader.close()


def file_extents(fd: int, offset: int, length: int) -> list[Extent]:
    """Data and hole runs of a file range (holes of sparse layers read as zeros)."""
    out: list[Extent] = []
    pos, end = offset, offset + length
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: only a hole up to the end of the file
                return [*out, (end - pos, 0)]
            data = end
        if data > pos:
            out.append((min(data, end) - pos, STATE_HOLE | STATE_ZERO))
            pos = min(data, end)
            continue
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        out.append((hole - pos, 0))
        pos = hole
    return out
