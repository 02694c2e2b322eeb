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

A cache node that does not answer (restarting after an upgrade or a crash, stopped, the
bus away) does not fail the session's writes at once: a guest file system takes a failed
write as a dead disk. They wait, unanswered, while the node is probed; once it answers,
everything changed since the last acknowledged FLUSH is sent again from the mirror (in-flight
batches were lost with the node) and the waiting requests are answered. Only after
``CacheLink.outage_grace_s`` do they fail with EIO, naming the node. Sending the mirror's
blocks *as they are then* keeps the order right: a later write reads the mirror later and
goes out behind on the same channel.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from pathlib import Path

from services.stream.path.backend import Backend
from services.stream.path.cached_store import CacheLink
from services.stream.path.outage import RETRY_FIRST_S, keep_asking, retried_while_away
from services.stream.path.spare_files import SpareFiles
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


class RemoteWriteCache(WriteCache):
    def __init__(
        self,
        next_: Backend,
        spec: ExportSpec,
        link: CacheLink,
        node_id: str,
        directory: Path | None,
        spares: SpareFiles | None = None,
    ) -> None:
        # The mirror: RAM for a RAM cache, an unlinked file beside it for a disk cache; made
        # by the first write or pull.
        super().__init__(next_, spec.write_cache, directory, spares)
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
        # The recovery under way (an outage ridden out, or a restart): probe, then resend.
        self._outage: asyncio.Task[None] | None = None

    async def attach(self) -> None:
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
        if opened.blocks != len(self.state):
            raise OSError(
                f"write cache {self.key}: map of {opened.blocks} blocks, disk has {len(self.state)}"
            )
        if not opened.runs:  # never written (a boot storm's sessions)
            return
        if not opened.synced:  # the node may lose some of it should its machine restart
            for _v, a, b in opened.runs:
                self.unflushed.add(a * BLOCK, min(b * BLOCK, self.size) - a * BLOCK)
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
                data = await retried_while_away(
                    lambda: self.client.read_write_cache(opened.node, self.key, offset, length),
                    self.outage_grace_s,
                    f"pull of write cache {self.key} at {offset}+{length}",
                )
            os.pwrite(self._file(), data, offset)
            self._mark(offset // BLOCK, -(-(offset + length) // BLOCK), DIRTY)

        await asyncio.gather(*(pull(o, n) for o, n in pulls))
        log.info(
            "write cache %s: pulled %d dirty bytes from cache node %s",
            self.key,
            self.dirty_bytes,
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

    def _recoverable(self, e: wire.CacheError, opens: int) -> bool:
        """Whether the recovery (probe, open again, resend) may cure ``e``, met by a request
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
        # Suspends only while the vdisk's blocks are fetched (write_cache.py); the change is
        # applied to the mirror in the step that returns here, and shipped in that step too.
        await super().pwrite(offset, data, fua)
        self.unflushed.add(offset, len(data))
        await self._deliver(self._ship(offset, len(data), fua), fua, self._opens)

    async def zero(self, offset: int, length: int, fua: bool = False) -> None:
        if not length:
            return
        await super().zero(offset, length, fua)  # as pwrite: shipped in the same step
        self.unflushed.add(offset, length)
        await self._deliver(self._ship(offset, length, fua), fua, self._opens)

    async def flush(self) -> None:
        while True:
            if self._outage is not None and not self._outage.done():
                await asyncio.shield(self._outage)  # what is being sent again goes first
            restarts, opens = self.restarts, self._opens
            covered = self.unflushed.take()
            self._flushing.append(covered)
            try:
                # Ordered after every record queued before it; the cache fsyncs, then answers.
                await self._channel().submit(wire.OP_FLUSH, 0, 0, None, True)
            except wire.CacheError as e:
                self.unflushed.give_back(covered)
                if not self._recoverable(e, opens):
                    raise
                await self._ride_out(e)
                continue
            finally:
                self._flushing.remove(covered)
            if self.restarts == restarts:
                return
            # Answered by a node process that started after these ranges went out: its
            # fsync may not cover them. Once they are sent again, flush again.
            self.unflushed.give_back(covered)

    async def _deliver(self, records: list[asyncio.Future[None]], fua: bool, opens: int) -> None:
        """Wait for a change's records; when the node is away, for the node."""
        try:
            await _all(records)
        except wire.CacheError as e:
            if not self._recoverable(e, opens):
                raise
            await self._ride_out(e)  # sent again with everything unflushed
            if fua:
                await self.flush()

    async def _ride_out(self, error: wire.CacheError) -> None:
        # Shielded: a request given up by its client (connection closed) does not end the
        # ride-out the others wait on.
        await asyncio.shield(self._recovery(error))

    def _node_restarted(self) -> None:
        """An answer came from a new process of the node: what it had not fsynced may be
        gone (its machine may have restarted), so send that again."""
        self.restarts += 1
        log.warning(
            "write cache %s: cache node %s restarted; sending again what changed since the "
            "last flush", self.key, self._channel().node,
        )  # fmt: skip
        self._recovery(None)

    def _recovery(self, error: wire.CacheError | None) -> asyncio.Task[None]:
        """The recovery under way, or a new one."""
        if self._outage is None or self._outage.done():
            self._outage = asyncio.get_running_loop().create_task(self._recover(error))
            self._outage.add_done_callback(_retrieved)
        return self._outage

    async def _recover(self, error: wire.CacheError | None) -> None:
        """Probe the node until it answers, then send the unflushed ranges again; past
        ``outage_grace_s``, raise the last error (every waiting request fails with it).
        ``error``: what failed (an outage), or None (the node restarted, and answers)."""
        node = self._channel().node
        loop = asyncio.get_running_loop()
        began = loop.time()
        if error is not None:
            log.warning(
                "write cache %s: %s; holding the session's writes, retrying for up to %g s",
                self.key, error.strerror, self.outage_grace_s,
            )  # fmt: skip
        try:
            resent = await keep_asking(
                self._probe_and_resend,
                self.outage_grace_s,
                first_delay_s=0.0 if error is None else RETRY_FIRST_S,
            )
        except wire.CacheError as e:
            if wire.transient(e):
                log.error(
                    "write cache %s: %s for %.1f s: its writes fail with EIO",
                    self.key, e.strerror, loop.time() - began,
                )  # fmt: skip
            raise
        log.warning(
            "write cache %s: cache node %s answers%s; sent again the %d bytes changed "
            "since the last flush",
            self.key, node, "" if error is None else f" again after {loop.time() - began:.1f} s",
            resent,
        )  # fmt: skip

    async def _probe_and_resend(self, left_s: float) -> int:
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

    def close(self) -> None:
        if self._outage is not None:
            self._outage.cancel()  # the session is gone: nothing to hold any more
        super().close()

    def _channel(self) -> WriteChannel:
        if self.channel is None:  # the stack attaches before any request is served
            raise OSError(errno.EIO, f"write cache {self.key} used before it was attached")
        return self.channel


def _retrieved(task: asyncio.Task[None]) -> None:
    """A recovery nobody waits on (started by a restart) that failed: logged already."""
    if not task.cancelled():
        task.exception()


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
