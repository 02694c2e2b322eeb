"""The bottom of the stack for a vdisk in a non-local store (FTP, block device...).

Clean blocks come from the cache service's shared read cache, which fills itself from the
store. This node keeps what it fetched in a *mirror* per vdisk version (a sparse unlinked
file + a bitmap of 256 KiB extents, shared by every session of that version here), so a
block crosses the bus once per node and ``map_read`` then returns pieces of the mirror:
the same ``preadv``/``sendfile`` path as a local vdisk.

On attach, the version's boot profile (the cache service's answer to ``rc.open``) is pulled
into the mirror in the background, pipelined, ahead of the client.

A miss never blocks the event loop: ``map_read`` raises :class:`BlocksMissing` with the
fetch to await, the server answers that one request once the blocks are in, and every
other request (of this client or any other) is served meanwhile. Concurrent misses of the
same run, and the prefetch, share one fetch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from services.stream.path.backend import BlocksMissing, Extent, ReadOnlyBottom
from services.stream.path.outage import retried_while_away
from services.stream.spec import ExportSpec
from shared.contracts.cache import wire
from shared.contracts.cache.client import CacheClient
from shared.vdisk_layout import Piece

log = logging.getLogger(__name__)

EXTENT = 256 * 1024
PREFETCH_DEPTH = 8


# A version is warmed (rc.open, its boot profile fetched or fadvised) once per node this often.
WARM_EVERY_S = 30.0


def version_key(spec: ExportSpec) -> str:
    return f"{spec.store}:{spec.vdisk}@{spec.version}"


def read_cache_body(spec: ExportSpec) -> dict[str, object]:
    """A version as ``rc.open`` (and every ``rc.read``) describes it: enough for any cache
    node to open the version's read cache."""
    return {
        "key": version_key(spec),
        "vdisk": spec.vdisk,
        "version": spec.version,
        "store": spec.store,
        "layers": [str(p) for p in spec.layers],
        "size": spec.size,
    }


class Mirror:
    """This node's copy of the blocks of one version it has fetched so far."""

    def __init__(self, key: str, size: int, directory: Path | None) -> None:
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="mirror-", dir=directory)
        os.unlink(name)  # gone with the process, whatever happens
        os.ftruncate(fd, size)
        self.fd = fd
        self.key = key
        self.size = size
        self.present = bytearray(-(-size // EXTENT))
        self.fetching: dict[int, asyncio.Future[None]] = {}  # run offset -> its fetch
        self.closed = False

    def close(self) -> None:
        """Give the mirror's disk space back (the file was unlinked at birth)."""
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def missing(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Byte runs (extent aligned, clipped to the disk) not yet in the mirror."""
        first, last = offset // EXTENT, (offset + length - 1) // EXTENT
        if self.present.find(0, first, last + 1) == -1:
            return []
        runs: list[tuple[int, int]] = []
        for i in range(first, last + 1):
            if self.present[i]:
                continue
            a = i * EXTENT
            b = min(a + EXTENT, self.size)
            if runs and runs[-1][0] + runs[-1][1] == a and runs[-1][1] < wire.MAX_CHUNK:
                runs[-1] = (runs[-1][0], runs[-1][1] + b - a)
            else:
                runs.append((a, b - a))
        return runs

    def fill(self, offset: int, data: bytes) -> None:
        if self.closed:  # a late fetch: its fd number may already be another file's
            return
        if data.count(0) != len(data):  # all-zero data stays a hole: it reads as zeros
            os.pwrite(self.fd, data, offset)
        first = offset // EXTENT
        stop = -(-(offset + len(data)) // EXTENT)
        self.present[first:stop] = b"\1" * (stop - first)


@dataclass
class CacheLink:
    """What a stream node needs of the cache service (set on the SessionManager)."""

    client: CacheClient
    mirror_dir: Path | None = None
    # This process among the stream nodes: the cache service's ``wc.attached`` notices say
    # which process attached a write cache (node ids may repeat; a restart is a new one).
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)
    mirrors: dict[str, Mirror] = field(default_factory=dict)
    # A version's mirror no session has used this long is dropped (its disk space back;
    # old versions would otherwise pile up on a long-running node).
    mirror_idle_s: float = 600.0
    # How long a session's writes, and its reads through the cache service, wait for a
    # cache node that does not answer before they fail with EIO (outage.py);
    # settings.stream_cache_outage_grace_s.
    outage_grace_s: float = 30.0
    # Sessions using each mirror, and the pending drops of unused ones.
    mirror_users: dict[str, int] = field(default_factory=dict)
    _drops: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    # When each version was last warmed on this node (should_warm).
    warmed: dict[str, float] = field(default_factory=dict)

    def should_warm(self, key: str) -> bool:
        """Whether a session of version ``key`` should warm it (``rc.open`` + its boot
        profile) now: once per version per node every ``WARM_EVERY_S``, since the page
        cache and the mirror are the node's, not a session's. Recorded as warming."""
        now = time.monotonic()
        last = self.warmed.get(key)
        if last is not None and now - last < WARM_EVERY_S:
            return False
        self.warmed[key] = now
        return True

    def warm_failed(self, key: str) -> None:
        """The warm did not happen: the next session of the version tries again."""
        self.warmed.pop(key, None)

    def mirror(self, key: str, size: int) -> Mirror:
        """The node's mirror of version ``key``, for one more session (``release_mirror``
        when it closes)."""
        drop = self._drops.pop(key, None)
        if drop is not None:
            drop.cancel()
        m = self.mirrors.get(key)
        if m is None:
            m = self.mirrors[key] = Mirror(key, size, self.mirror_dir)
        self.mirror_users[key] = self.mirror_users.get(key, 0) + 1
        return m

    def release_mirror(self, key: str) -> None:
        """A session of version ``key`` closed; the last one leaves the mirror to be
        dropped after ``mirror_idle_s`` unless another session comes."""
        users = self.mirror_users.get(key, 0) - 1
        if users > 0:
            self.mirror_users[key] = users
            return
        self.mirror_users.pop(key, None)
        if key in self.mirrors and key not in self._drops:
            loop = asyncio.get_running_loop()
            self._drops[key] = loop.call_later(self.mirror_idle_s, self._drop_mirror, key)

    def _drop_mirror(self, key: str) -> None:
        self._drops.pop(key, None)
        m = self.mirrors.pop(key, None)
        if m is not None:
            m.close()
            self.warmed.pop(key, None)  # its blocks are gone: the next session warms again
            log.info("mirror of %s dropped: no session used it for %.0f s", key, self.mirror_idle_s)


class CachedStoreBackend(ReadOnlyBottom):
    """A read-only version served from the cache service's read cache, via a node mirror."""

    def __init__(self, spec: ExportSpec, link: CacheLink) -> None:
        self.spec = spec
        self.link = link
        self.size = spec.size
        self.key = version_key(spec)
        self.mirror = link.mirror(self.key, spec.size)
        self._released = False
        self._prefetch: asyncio.Task[None] | None = None

    def _body(self, offset: int, length: int) -> dict[str, object]:
        # With the version's description: any cache node (queue group) can serve a read,
        # opening the version's read cache at its first one.
        return {**read_cache_body(self.spec), "offset": offset, "length": length}

    async def attach(self) -> None:
        if not self.link.should_warm(self.key):
            return  # opened and prefetched for another session a moment ago
        try:
            reply = await retried_while_away(
                lambda: self.link.client.request_json(wire.RC_OPEN, read_cache_body(self.spec)),
                self.link.outage_grace_s,
                f"open of the read cache of {self.key}",
            )
        except BaseException:
            self.link.warm_failed(self.key)
            raise
        profile = [(int(o), int(n)) for o, n in reply.get("profile", [])]
        if profile:
            self._prefetch = asyncio.get_running_loop().create_task(self._pull(profile))

    async def _pull(self, extents: list[tuple[int, int]]) -> None:
        """Fetch the boot profile into the mirror ahead of the client, in profile order."""
        sem = asyncio.Semaphore(PREFETCH_DEPTH)

        async def one(offset: int, length: int) -> None:
            async with sem:
                if self.mirror.missing(offset, length):
                    await self._fetch_run(offset, length)

        runs = []
        for o, n in extents:
            for a, m in self.mirror.missing(o, min(n, self.size - o)):
                runs.append((a, m))
        try:
            await asyncio.gather(*(one(a, m) for a, m in runs))
        except OSError as e:
            log.warning("prefetch of %s stopped: %s", self.key, e)

    def map_read(self, offset: int, length: int) -> list[Piece]:
        missing = self.mirror.missing(offset, length)
        if missing:
            raise BlocksMissing(partial(self._fetch, missing))
        return [(self.mirror.fd, offset, length)]

    async def _fetch(self, runs: list[tuple[int, int]]) -> None:
        try:
            await asyncio.gather(*(self._fetch_run(a, n) for a, n in runs))
        except OSError as e:
            log.error("read of %s from the cache service failed: %s", self.key, e)
            raise

    async def _fetch_run(self, offset: int, length: int) -> None:
        """One run into the mirror; a run already being fetched is awaited, not fetched again."""
        pending = self.mirror.fetching.get(offset)
        if pending is None:
            pending = asyncio.ensure_future(self._read_run(offset, length))
            self.mirror.fetching[offset] = pending
            pending.add_done_callback(lambda _: self.mirror.fetching.pop(offset, None))
        # Shielded: a client that goes away does not cancel a fetch others wait for.
        await asyncio.shield(pending)

    async def _read_run(self, offset: int, length: int) -> None:
        data = await retried_while_away(
            lambda: self.link.client.request_bytes(wire.RC_READ, self._body(offset, length)),
            self.link.outage_grace_s,
            f"read of {self.key} at {offset}+{length} from the cache service",
        )
        self.mirror.fill(offset, data)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return [(length, 0)]

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.cancel()
        # The mirror stays a while: the next session of this version on this node reuses it.
        if not self._released:  # once: a second release would count another session out
            self._released = True
            self.link.release_mirror(self.key)
