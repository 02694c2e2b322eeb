"""A session write cache held by the cache service; the layer below it is its local mirror.

The stream side of the write-cache seam. This layer wraps the in-process
:class:`WriteCache` (the *mirror*: reads pass straight to it, so a written block is still a
``preadv`` on this node) and ships what each change left in the mirror to the cache service;
the client gets its acknowledgement only when the cache service has the blocks (FUA /
FLUSH: only once it fsynced them). So nothing acknowledged lives only on this node: when it
dies, the session goes on at another node, which first pulls the session's block map and
dirty blocks (:meth:`RemoteWriteCache.attach`).

What travels is whole 4 KiB blocks as the mirror holds them after the write (the mirror
already did the read-modify-write of partial blocks), so the cache service never needs the
vdisk itself. Zeroed and trimmed blocks travel as marks only.

What the node does not take (it does not answer, or a restarted process answered a FLUSH)
is raised as :class:`Undelivered` (``outage.py``); the layer above (``ride_out.py``) decides whether and how
long to wait, and has this layer probe the node and send again everything changed since
the last acknowledged FLUSH (:meth:`RemoteWriteCache.probe_and_resend`). Sending the
mirror's blocks *as they are then* keeps the order right: a later write reads the mirror
later and goes out behind on the same channel.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable

from services.stream.path.backend import Layer, attach_beside
from services.stream.path.cached_store import CacheLink
from services.stream.path.outage import Undelivered, retried_while_away
from services.stream.path.unflushed import Unflushed, merge
from services.stream.path.write_cache import WriteCache
from services.stream.spec import ExportSpec
from shared.block_map import BLOCK, DIRTY, ZEROED
from shared.contracts.cache import wire
from shared.contracts.cache.client import WriteChannel

log = logging.getLogger(__name__)

# Dirty-block pulls in flight while a session attaches.
PULL_DEPTH = 8
# While a cache node does not answer, each probe (spaced as outage.py says) waits this
# long for its answer.
PROBE_TIMEOUT_S = 1.0
# Sent again after an outage at most this many bytes at a time (the rest read from the
# mirror as the window moves on), so a large unflushed set never sits in memory at once.
RESEND_WINDOW = 32 << 20


def cache_key(spec: ExportSpec) -> str:
    """The session's write cache: its own, or the device's kept one for this version."""
    if spec.write_cache_persistence == "keep" and spec.mac:
        return wire.kept_write_cache_key(spec.mac, spec.vdisk, spec.version)
    return spec.session_id


class RemoteWriteCache(Layer):
    def __init__(self, mirror: WriteCache, spec: ExportSpec, link: CacheLink, node_id: str):
        super().__init__(mirror)
        self.mirror = mirror
        self.spec = spec
        self.client = link.client
        # Who attaches (sent with the open): the cache service tells the other stream
        # processes, so one still holding this session drops its mirror (takeover.py).
        self.attacher = {"stream_node": node_id, "stream_instance": link.instance}
        self.key = cache_key(spec)
        # To the cache node holding it (attach says which).
        self.channel: WriteChannel | None = None
        self.outage_grace_s = link.outage_grace_s
        self.unflushed = Unflushed()
        # The ranges each FLUSH under way took from ``unflushed``: a resend covers them too.
        self._flushing: list[list[tuple[int, int]]] = []
        # Restarts of the node seen (a new incarnation in an answer): a FLUSH answered
        # across one may not cover what it took.
        self.restarts = 0
        # ``restarts`` when the cache was last opened: a node process that restarted since
        # may not hold the cache yet (it had no files: never written, made when the opens
        # pause), so the recovery opens it again before it sends anything.
        self._opened_at = 0
        self._opens = 0  # times opened again: a drop answered from before one is stale
        # Told when the node restarted (the layer above starts its recovery).
        self.on_restart: Callable[[], None] | None = None

    @property
    def node(self) -> str:
        return self._channel().node

    async def attach(self) -> None:
        await attach_beside(self.mirror, self._open())

    async def _open(self) -> None:
        """Open (or find again) the cache service's write cache and mirror its blocks.

        Whichever cache node holds the key answers (``wc.open`` routes it there); every
        write and pull of this session then goes to that node, so a gone node is an error
        naming it (once ``outage_grace_s`` has passed), never a new empty cache on another
        one."""
        # A client booting while its cache node restarts waits for it (up to the grace)
        # rather than failing its boot.
        opened = await retried_while_away(
            lambda: self.client.open_write_cache(self._open_body()),
            self.outage_grace_s,
            f"open of write cache {self.key}",
        )
        self.channel = self.client.writer(self.key, opened.node, self.attacher["stream_instance"])
        self.channel.incarnation = opened.incarnation
        self.channel.on_restart = self._node_restarted
        if opened.blocks != self.mirror.blocks:
            raise OSError(
                f"write cache {self.key}: map of {opened.blocks} blocks, "
                f"disk has {self.mirror.blocks}"
            )
        if not opened.runs:  # never written (a boot storm's sessions)
            return
        if not opened.synced:  # the node may lose some of it should its machine restart
            for _v, a, b in opened.runs:
                self.unflushed.add(a * BLOCK, min(b * BLOCK, self.size) - a * BLOCK)
        pulls = []
        for v, a, b in opened.runs:
            if v == ZEROED:
                self.mirror.mark_zeroed(a, b)
            elif v == DIRTY:
                start, stop = a * BLOCK, min(b * BLOCK, self.size)
                pulls.extend(wire.chunks(start, stop - start))
        sem = asyncio.Semaphore(PULL_DEPTH)

        async def pull(offset: int, length: int) -> None:
            async with sem:
                data = await retried_while_away(
                    lambda: self.client.read_write_cache(opened.node, self.key, offset, length),
                    self.outage_grace_s,
                    f"pull of write cache {self.key} at {offset}+{length}",
                )
            self.mirror.load(offset, data)

        await asyncio.gather(*(pull(o, n) for o, n in pulls))
        log.info(
            "write cache %s: pulled %d dirty bytes from cache node %s",
            self.key,
            self.mirror.dirty_bytes,
            opened.node,
        )

    def _open_body(self) -> dict[str, object]:
        s = self.spec
        return {
            "key": self.key,
            "session_id": s.session_id,
            "vdisk": s.vdisk,
            "version": s.version,
            "size": self.size,
            "kind": s.write_cache,
            "persistence": s.write_cache_persistence,
            "mac": s.mac,
            **self.attacher,
        }

    def recoverable(self, e: wire.CacheError, opens: int) -> bool:
        """Whether a recovery (probe, open again, resend) may cure ``e``, met by a request
        shipped when the cache had been opened again ``opens`` times: the node did not
        answer, or a restarted node process did not hold the cache yet. A cache dropped by
        a node that has not restarted since it was opened is gone for good."""
        if wire.transient(e):
            return True
        return e.kind == "dropped" and (self.restarts != self._opened_at or opens != self._opens)

    def _ship(self, offset: int, length: int, fua: bool) -> list[asyncio.Future[None]]:
        """Queue the blocks covering a changed range, as the mirror now holds them.

        Runs without awaiting, right after the mirror changed: the records of concurrent
        writes queue in the order the mirror saw them."""
        a = offset // BLOCK * BLOCK
        b = min(-(-(offset + length) // BLOCK) * BLOCK, self.size)
        channel = self._channel()
        futs = []
        for v, s, e in self.mirror.runs(a, b - a):
            if v == DIRTY:
                for pos, n in wire.chunks(s, e - s):
                    data = self.mirror.read_dirty(pos, n)
                    futs.append(channel.submit(wire.OP_WRITE, pos, n, data, fua))
            elif v == ZEROED:
                futs.append(channel.submit(wire.OP_ZERO, s, e - s, None, fua))
        return futs

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        if not data:
            return
        # The mirror suspends only while the vdisk's blocks are fetched; it applies the
        # change in the step that returns here, and the change is shipped in that step too.
        await self.mirror.pwrite(offset, data, fua)
        self.unflushed.add(offset, len(data))
        await self._deliver(self._ship(offset, len(data), fua), self._opens)

    async def zero(self, offset: int, length: int, fua: bool = False) -> None:
        if not length:
            return
        await self.mirror.zero(offset, length, fua)  # as pwrite: shipped in the same step
        self.unflushed.add(offset, length)
        await self._deliver(self._ship(offset, length, fua), self._opens)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        # Trimmed blocks read back as zeros (write_cache.py): shipped as zeroed marks.
        await self.zero(offset, length, fua)

    async def flush(self) -> None:
        """One FLUSH, ordered after every record queued before it (the cache fsyncs, then
        answers); :class:`Undelivered` when it does not cover them."""
        restarts, opens = self.restarts, self._opens
        covered = self.unflushed.take()
        self._flushing.append(covered)
        try:
            await self._channel().submit(wire.OP_FLUSH, 0, 0, None, True)
        except wire.CacheError as e:
            self.unflushed.give_back(covered)
            raise Undelivered(e, opens) from e
        finally:
            self._flushing.remove(covered)
        if self.restarts != restarts:
            # Answered by a node process that started after these ranges went out: its
            # fsync may not cover them. They are sent again, then flushed again.
            self.unflushed.give_back(covered)
            raise Undelivered(None, opens)

    async def _deliver(self, records: list[asyncio.Future[None]], opens: int) -> None:
        """Wait for a change's records; what the node did not take is :class:`Undelivered`."""
        try:
            await _all(records)
        except wire.CacheError as e:
            raise Undelivered(e, opens) from e

    def _node_restarted(self) -> None:
        """An answer came from a new process of the node: what it had not fsynced may be
        gone (its machine may have restarted), so it is sent again (``on_restart``)."""
        self.restarts += 1
        log.warning(
            "write cache %s: cache node %s restarted; sending again what changed since the "
            "last flush", self.key, self._channel().node,
        )  # fmt: skip
        if self.on_restart is not None:
            self.on_restart()

    async def probe_and_resend(self, left_s: float) -> int:
        """Probe the node (waiting up to ``left_s``), open the cache again if the node
        restarted since it was last opened, then send every unflushed range again; bytes
        sent. A transient :class:`wire.CacheError` while the node still does not answer."""
        await self._channel().probe(min(PROBE_TIMEOUT_S, max(left_s, 0.01)))
        restarts = self.restarts
        if restarts != self._opened_at:
            # Held again, or opened anew if it never had data; refused (not retried) if
            # it had data and its files are gone.
            try:
                await self.client.open_write_cache(self._open_body())
            except wire.CacheError as e:
                if wire.transient(e):
                    raise
                raise OSError(errno.EIO, f"write cache {self.key}: {e.strerror}") from e
            self._opened_at = restarts
            self._opens += 1
        return await self._resend()

    async def _resend(self) -> int:
        """Ship every unflushed range again, as the mirror holds it now; bytes covered."""
        total = 0
        window: list[asyncio.Future[None]] = []
        size = 0
        taken = [r for ranges in self._flushing for r in ranges]
        for a, b in merge(self.unflushed.runs() + taken):
            for pos in range(a, b, RESEND_WINDOW):
                n = min(RESEND_WINDOW, b - pos)
                window.extend(self._ship(pos, n, False))
                size += n
                total += n
                if size >= RESEND_WINDOW:
                    await _all(window)
                    window, size = [], 0
        await _all(window)
        return total

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
