"""A session write cache held by the cache service, with a local mirror for fast reads.

The stream side of the write-cache seam (``write_cache.py``). Every write is applied to the
in-process :class:`WriteCache` (the *mirror*: reads of written blocks stay a ``preadv`` on
this node) and shipped to the cache service; the client gets its acknowledgement only
when the cache service has the blocks (FUA / FLUSH: only once it fsynced them). So
nothing acknowledged lives only on this node: when it dies, the session goes on at another
node, which first pulls the session's block map and dirty blocks (:meth:`attach`).

What travels is whole 4 KiB blocks as the mirror holds them after the write (the mirror
already did the read-modify-write of partial blocks), so the cache service never needs
the vdisk itself. Zeroed and trimmed blocks travel as marks only.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from pathlib import Path

from services.cache import wire
from services.cache.block_map import BLOCK, DIRTY, ZEROED
from services.cache.client import WriteChannel
from services.stream.path.backend import Backend
from services.stream.path.cached_store import CacheLink
from services.stream.path.write_cache import WriteCache
from services.stream.spec import ExportSpec

log = logging.getLogger(__name__)

# Dirty-block pulls in flight while a session attaches.
PULL_DEPTH = 8


def cache_key(spec: ExportSpec) -> str:
    """The session's write cache: its own, or the device's kept one for this version."""
    if spec.write_cache_persistence == "keep" and spec.mac:
        mac = spec.mac.replace(":", "").lower()
        return f"device-{mac}-{spec.vdisk}-v{spec.version}"
    return spec.session_id


class RemoteWriteCache(WriteCache):
    def __init__(
        self,
        next_: Backend,
        spec: ExportSpec,
        link: CacheLink,
        node_id: str,
        directory: Path | None,
    ) -> None:
        # The mirror: RAM for a RAM cache, an unlinked file beside it for a disk cache; made
        # by the first write or pull.
        super().__init__(next_, spec.write_cache, directory)
        self.spec = spec
        self.client = link.client
        # Who attaches (sent with the open): the cache service tells the other stream
        # processes, so one still holding this session drops its mirror (takeover.py).
        self.attacher = {"stream_node": node_id, "stream_instance": link.instance}
        self.key = cache_key(spec)
        # To the cache node holding it (attach says which).
        self.channel: WriteChannel | None = None

    async def attach(self) -> None:
        """Open (or find again) the cache service's write cache and mirror its blocks.

        Whichever cache node holds the key answers (``wc.open`` routes it there); every
        write and pull of this session then goes to that node, so a gone node is an error
        naming it, never a new empty cache on another one."""
        s = self.spec
        opened = await self.client.open_write_cache(
            {
                "key": self.key,
                "session_id": s.session_id,
                "vdisk": s.vdisk,
                "version": s.version,
                "size": self.size,
                "kind": s.write_cache,
                "persistence": s.write_cache_persistence,
                "mac": s.mac,
                **self.attacher,
            },
        )
        self.channel = self.client.writer(self.key, opened.node)
        if opened.blocks != len(self.state):
            raise OSError(
                f"write cache {self.key}: map of {opened.blocks} blocks, disk has {len(self.state)}"
            )
        if not opened.runs:  # never written (a boot storm's sessions)
            return
        pulls = []
        for v, a, b in opened.runs:
            if v == ZEROED:
                self._mark(a, b, ZEROED)
            elif v == DIRTY:
                start, stop = a * BLOCK, min(b * BLOCK, self.size)
                pulls.extend(wire.chunks(start, stop - start))
        sem = asyncio.Semaphore(PULL_DEPTH)

        async def pull(offset: int, length: int) -> None:
            async with sem:
                data = await self.client.read_write_cache(opened.node, self.key, offset, length)
            os.pwrite(self._file(), data, offset)
            self._mark(offset // BLOCK, -(-(offset + length) // BLOCK), DIRTY)

        await asyncio.gather(*(pull(o, n) for o, n in pulls))
        log.info(
            "write cache %s: pulled %d dirty bytes from cache node %s",
            self.key,
            self.dirty_bytes,
            opened.node,
        )

    def _ship(self, offset: int, length: int, fua: bool) -> list[asyncio.Future[None]]:
        """Queue the blocks covering a changed range, as the mirror now holds them.

        Runs without awaiting, right after the mirror changed: the records of concurrent
        writes queue in the order the mirror saw them."""
        a = offset // BLOCK * BLOCK
        b = min(-(-(offset + length) // BLOCK) * BLOCK, self.size)
        channel = self._channel()
        futs = []
        for v, s, e in self._runs(a, b - a):
            if v == DIRTY:
                for pos, n in wire.chunks(s, e - s):
                    data = os.pread(self.fd, n, pos)
                    futs.append(channel.submit(wire.OP_WRITE, pos, n, data, fua))
            elif v == ZEROED:
                futs.append(channel.submit(wire.OP_ZERO, s, e - s, None, fua))
        return futs

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        if not data:
            return
        await super().pwrite(offset, data, fua)  # never suspends: the mirror is local
        await _all(self._ship(offset, len(data), fua))

    async def zero(self, offset: int, length: int, fua: bool = False) -> None:
        if not length:
            return
        await super().zero(offset, length, fua)
        await _all(self._ship(offset, length, fua))

    async def flush(self) -> None:
        # Ordered after every record queued before it; the cache fsyncs, then answers.
        await self._channel().submit(wire.OP_FLUSH, 0, 0, None, True)

    def _channel(self) -> WriteChannel:
        if self.channel is None:  # the stack attaches before any request is served
            raise OSError(errno.EIO, f"write cache {self.key} used before it was attached")
        return self.channel


async def _all(futs: list[asyncio.Future[None]]) -> None:
    """Wait for every record; raise the first error (after all finished: none left dangling)."""
    if not futs:
        return
    results = await asyncio.gather(*futs, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


async def attach_stack(backend: Backend) -> None:
    """Run the async ``attach`` of every layer of a stack that has one, concurrently (they
    are independent: one round trip to the cache service per session open, not one each)."""
    layers = []
    b: object = backend
    while b is not None:
        layers.append(b)
        b = getattr(b, "next", None)
    attaches = [a for a in (getattr(layer, "attach", None) for layer in layers) if a is not None]
    results = await asyncio.gather(*(a() for a in attaches), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
