"""The bottom of the stack: a vdisk version chain (base + deltas), read-only."""

from __future__ import annotations

import os
from collections.abc import Sequence

from services.stream.path.backend import STATE_HOLE, STATE_ZERO, ZERO_FD, Extent, pread_via_map
from shared.vdisk_layout import ChainReader, Piece, open_chain


class ChainBackend:
    """Serves a version chain straight from its layer files; it never writes them."""

    def __init__(self, layers: Sequence[str | os.PathLike[str]]) -> None:
        self.reader: ChainReader = open_chain(layers)
        self.size = self.reader.size

    def can_write(self) -> bool:
        return False

    def can_flush(self) -> bool:
        return False

    def can_trim(self) -> bool:
        return False

    def can_zero(self) -> bool:
        return False

    def can_fua(self) -> bool:
        return False

    def can_multi_conn(self) -> bool:
        # Read-only data: every connection sees the same bytes.
        return True

    def can_extents(self) -> bool:
        return True

    def map_read(self, offset: int, length: int) -> list[Piece]:
        return self.reader.resolve(offset, length)

    async def pread(self, offset: int, length: int) -> bytes:
        return await pread_via_map(self, offset, length)

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        raise PermissionError("a vdisk version is read-only")

    async def flush(self) -> None:
        return None

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise PermissionError("a vdisk version is read-only")

    async def zero(self, offset: int, length: int, fua: bool = False) -> None:
        raise PermissionError("a vdisk version is read-only")

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return [
            (n, STATE_HOLE | STATE_ZERO if fd == ZERO_FD else 0)
            for fd, _, n in self.reader.resolve(offset, length)
        ]

    def close(self) -> None:
        self.reader.close()
