"""The read/write path as a stack of backends, in the style of nbdkit plugins and filters.

A backend is a small table of callbacks: ``size``, the ``can_*`` capability probes,
``map_read`` (where the bytes of a range live), the async data callbacks ``pread``,
``pwrite``, ``flush``, ``trim``, ``zero`` and ``extents``, and the lifecycle pair
``attach`` (async: whatever a layer must set up before the first request, e.g. opening
its state at the cache service) and ``close``. A :class:`Layer` (a filter) wraps the next
backend and passes every callback it does not change down to it; layers never inherit
from one another, they hold the next one. ``stack.py`` assembles a session's stack from
its policy, in one place; the layers are, top to bottom::

    RideOut (cache outage)  ->  RemoteWriteCache (ships to the cache service)
        ->  WriteCache (the session's blocks; the mirror under a remote one)
        ->  ProfileHint  ->  ChainBackend (version chain)   |   CachedStoreBackend

Why ``map_read`` is synchronous and returns pieces instead of bytes: the read of a clean
block is the hot path. The servers ask the stack *where* the bytes are (pieces
``(fd, file_offset, length)``, ``fd == ZERO_FD`` for zeros; a lookup in in-memory maps, no
I/O) and then read them straight into the reply buffer with ``preadv`` (see
:func:`read_into`), with no per-layer copies and no coroutine per request. A layer that
does not change reads has the next one's ``map_read`` bound in its place.

Concurrency model (the one place it is described):

* One event loop runs every connection of the node; each connection runs its requests
  concurrently. All connections of a session share one stack, so two requests may be in
  any layer at once. There are no threads in the stack: only the blocking file reads of
  :func:`read_into` go to a worker thread, and they touch no layer state.
* A callback is atomic between its ``await`` points. A layer may suspend only where it
  says so; everything it changes after its last suspension it changes in one step of the
  loop, so no other request sees half of a change.
* The only suspension below the write cache is a bottom that has to fetch blocks
  (:class:`BlocksMissing`, a vdisk of a remote store). A change therefore fetches first,
  then reads the state of its blocks as it is *then* and applies itself whole
  (``write_cache.py``): two writes into one block never copy stale bytes over each other.
* A layer that ships changes (``remote_write_cache.py``) queues them in the same step in
  which the layer below applied them, so records go out in the order the blocks changed;
  it then awaits the answers, and other requests run meanwhile.
* Waiting for an absent cache node (``ride_out.py``) is one shared recovery task per
  stack; the requests that wait for it are shielded from each other's cancellation.
* ``attach`` runs before the first request is served, each layer's own work concurrently
  with the layers' below (:func:`attach_beside`); ``close`` runs once, when the session
  ends, top down, and cancels the background work of each layer.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from shared.vdisk_layout import ZERO_FD, Piece, read_pieces

__all__ = [
    "ZERO_FD",
    "Backend",
    "BlocksMissing",
    "Layer",
    "Piece",
    "attach_beside",
    "map_read_async",
    "read_into",
    "read_into_nowait",
]

# NBD base:allocation flags, used by ``extents``.
STATE_HOLE = 1
STATE_ZERO = 2

Extent = tuple[int, int]  # (length, STATE_* flags)


class Backend(Protocol):
    size: int

    def can_write(self) -> bool: ...
    def can_flush(self) -> bool: ...
    def can_trim(self) -> bool: ...
    def can_zero(self) -> bool: ...
    def can_fua(self) -> bool: ...
    def can_multi_conn(self) -> bool: ...
    def can_extents(self) -> bool: ...

    def map_read(self, offset: int, length: int) -> list[Piece]: ...
    async def pread(self, offset: int, length: int) -> bytes: ...
    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None: ...
    async def flush(self) -> None: ...
    async def trim(self, offset: int, length: int, fua: bool = False) -> None: ...
    async def zero(self, offset: int, length: int, fua: bool = False) -> None: ...
    async def extents(self, offset: int, length: int) -> list[Extent]: ...
    async def attach(self) -> None: ...
    def close(self) -> None: ...


class ReadOnlyBottom:
    """The capabilities and refusals of a bottom backend that serves a vdisk version: it is
    the same for every client, so several connections may share it; nothing writes it."""

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
        return True

    def can_extents(self) -> bool:
        return False

    async def pread(self, offset: int, length: int) -> bytes:
        return await pread_via_map(self, offset, length)  # type: ignore[arg-type]

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        raise PermissionError("a vdisk version is read-only")

    async def flush(self) -> None:
        return None

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise PermissionError("a vdisk version is read-only")

    async def zero(self, offset: int, length: int, fua: bool = False) -> None:
        raise PermissionError("a vdisk version is read-only")

    async def attach(self) -> None:
        return None


class Layer:
    """A filter: every callback goes to ``next`` unless the subclass overrides it."""

    def __init__(self, next_: Backend) -> None:
        self.next = next_
        self.size = next_.size
        if type(self).map_read is Layer.map_read:
            # A layer that does not change reads costs no call on the hot path.
            self.map_read = next_.map_read  # type: ignore[method-assign]

    def can_write(self) -> bool:
        return self.next.can_write()

    def can_flush(self) -> bool:
        return self.next.can_flush()

    def can_trim(self) -> bool:
        return self.next.can_trim()

    def can_zero(self) -> bool:
        return self.next.can_zero()

    def can_fua(self) -> bool:
        return self.next.can_fua()

    def can_multi_conn(self) -> bool:
        return self.next.can_multi_conn()

    def can_extents(self) -> bool:
        return self.next.can_extents()

    def map_read(self, offset: int, length: int) -> list[Piece]:
        return self.next.map_read(offset, length)

    async def pread(self, offset: int, length: int) -> bytes:
        return await pread_via_map(self, offset, length)

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self.next.pwrite(offset, data, fua)

    async def flush(self) -> None:
        await self.next.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.next.trim(offset, length, fua)

    async def zero(self, offset: int, length: int, fua: bool = False) -> None:
        await self.next.zero(offset, length, fua)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return await self.next.extents(offset, length)

    async def attach(self) -> None:
        await self.next.attach()

    def close(self) -> None:
        self.next.close()


async def attach_beside(next_: Backend, own: Awaitable[None]) -> None:
    """A layer's own ``attach`` work, run concurrently with the attach of the layers below
    (they are independent: a session open costs one round trip to the cache service, not
    one per layer). Both finish before the first failure, top layer's first, is raised."""
    results = await asyncio.gather(own, next_.attach(), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


class BlocksMissing(Exception):
    """``map_read``'s answer when part of the range is not on this node yet (a vdisk in a
    remote store): await ``fetch()`` and ask again. Only such a bottom layer raises it, so
    the hot path of a local vdisk never pays for it; the servers catch it and answer that
    request when the blocks are in, while the event loop serves everyone else."""

    def __init__(self, fetch: Callable[[], Awaitable[None]]) -> None:
        super().__init__("blocks not on this node yet")
        self.fetch = fetch


async def map_read_async(backend: Backend, offset: int, length: int) -> list[Piece]:
    """``map_read`` that fetches what is missing first."""
    while True:
        try:
            return backend.map_read(offset, length)
        except BlocksMissing as miss:
            await miss.fetch()


async def pread_via_map(backend: Backend, offset: int, length: int) -> bytes:
    """Generic ``pread``: resolve pieces, read them (off the loop when not cached)."""
    buf = bytearray(length)
    view = memoryview(buf)
    pieces = await map_read_async(backend, offset, length)
    if not read_into_nowait(pieces, view):
        await asyncio.get_running_loop().run_in_executor(None, read_pieces, pieces, view)
    return bytes(buf)


def read_into_nowait(pieces: Sequence[Piece], out: memoryview) -> bool:
    """Fill ``out`` from the page cache only (``RWF_NOWAIT``); False when a piece would block.

    The event loop may do this itself: a cached read costs a memcpy. When it returns
    False the caller re-reads with :func:`read_into` in a worker thread, so a cold read
    never stalls the other requests (their replies then overtake this one).
    """
    pos = 0
    for fd, off, n in pieces:
        if fd != ZERO_FD:
            try:
                got = os.preadv(fd, [out[pos : pos + n]], off, os.RWF_NOWAIT)
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                # memfd (RAM write cache) has no NOWAIT: it never blocks anyway.
                got = os.preadv(fd, [out[pos : pos + n]], off)
            if got != n:
                return False
        pos += n
    return True


_probe = bytearray(1)


def all_cached(pieces: Sequence[Piece]) -> bool:
    """Whether the first and last byte of every file piece are in the page cache.

    A cheap guess (two 1-byte ``RWF_NOWAIT`` reads a piece) made before ``sendfile``, which
    would otherwise block the event loop on a cold disk read.
    """
    for fd, off, n in pieces:
        if fd == ZERO_FD:
            continue
        for at in (off, off + n - 1):
            try:
                if os.preadv(fd, [_probe], at, os.RWF_NOWAIT) != 1:
                    return False
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:  # memfd: always in memory
                    return False
    return True


def read_into(pieces: Sequence[Piece], out: memoryview) -> None:
    """Blocking fill of ``out`` (zero pieces must already be zero in ``out``)."""
    read_pieces(pieces, out)
