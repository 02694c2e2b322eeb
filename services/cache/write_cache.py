"""Per-session write caches owned by the cache service: a sparse data file + a block-state map.

Each cache lives under its directory (``<data_dir>/cache/write`` for ``server-disk``, a tmpfs
folder for ``server-ram``) as three files named after its key:

- ``<key>.data``  sparse, the size of the disk: each written 4 KiB block at its own offset;
- ``<key>.map``   one state byte per block (clean / dirty / zeroed), updated in place;
- ``<key>.json``  what the cache is for (session, vdisk, version, size, kind, persistence).

Why this shape: a write is two ``pwrite`` calls (data, then its state bytes), no log to
compact, and the map *is* the extent map a restarted service or a new stream node reads
back. Data reaches the kernel before the reply, so a ``kill -9`` of this process loses
nothing acknowledged; a FLUSH or FUA write is also fsynced (data, then map) before the
reply, so it survives a crash of the machine too. tmpfs (``server-ram``) survives the
process, not the machine: that is what RAM means.

Descriptors are held only while a cache is in use: its files are made ahead of the first
write (once the opens pause) and closed again, opened by the first write, by a read of
blocks the cache holds, or by an fsync, and closed once the cache has been idle for a
while with every change fsynced (:meth:`WriteCaches.close_idle`). So an idle session
costs this process no descriptor: a node holds more sessions than its descriptor limit.

The key is the session id (persistence ``discard``: dropped when the session closes) or
``device-<mac>-<vdisk>-v<version>`` (``keep``: the device finds its writes at the next boot
of the same version).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import metrics
from shared.block_map import BLOCK, DIRTY, ZEROED, BlockMap, blocks_of
from shared.contracts.cache.bodies import WcOpen
from shared.contracts.cache.wire import FLAG_SYNC, OP_FLUSH, OP_WRITE, OP_ZERO
from shared.errors import reason
from shared.private_file import replace_private

log = logging.getLogger("streamboot.cache.write")
# streamboot_request_seconds{service="cache", op="fsync"}: one write cache's fsync (what a
# FLUSH or FUA write waits for, beside the round trip).
FSYNC_LATENCY = metrics.request_histogram("cache", "fsync")

_KEY_OK = re.compile(r"^[A-Za-z0-9._:@-]{1,200}$")


class WriteCacheError(Exception):
    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


def make_files(paths: tuple[Path, Path, Path], size: int, meta: dict[str, Any]) -> tuple[int, int]:
    """Create a new cache's files (sparse data, clean map, its description); returns the data
    and map fds. Touches nothing but the files, so it can run in a thread."""
    data, map_, meta_path = paths
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_CREAT
    data_fd = os.open(data, flags, 0o600)
    try:
        map_fd = os.open(map_, flags, 0o600)
        try:
            os.ftruncate(data_fd, size)
            os.ftruncate(map_fd, -(-size // BLOCK))
            replace_private(meta_path, json.dumps(meta))
        except BaseException:
            os.close(map_fd)
            raise
    except BaseException:
        os.close(data_fd)
        raise
    return data_fd, map_fd


@dataclass
class SessionWriteCache:
    key: str
    directory: Path
    meta: dict[str, Any]
    capacity: int
    # Set by load / WriteCaches.open.
    state: BlockMap = field(default_factory=lambda: BlockMap(0))
    # The files exist (made ahead, by the first change, or found on start); their
    # descriptors are open only while the cache is in use (-1 when closed).
    made: bool = False
    data_fd: int = -1
    map_fd: int = -1
    last_used: float = field(default_factory=time.monotonic)
    full_reported: bool = False
    meta_synced: bool = True  # False from creation until the first sync()
    # True from the first write or zero (and for recovered caches): files may exist before
    # that (WriteCaches.prepare), changes may not.
    changed: bool = False
    removed: bool = False  # dropped: its files are deleted
    # Group commit (durable()): changes made, changes the last finished fsync covered, and
    # the fsync under way.
    changes: int = 0
    synced: int = 0
    _sync: asyncio.Task[None] | None = None
    # The stream process that last attached it (wc.open's stream_instance); batches of any
    # other are refused. Unknown ("") after a restart until the next attach.
    attached_by: str = ""

    @property
    def size(self) -> int:
        return int(self.meta["size"])

    @property
    def used(self) -> int:
        return self.state.dirty * BLOCK

    def paths(self) -> tuple[Path, Path, Path]:
        d, k = self.directory, self.key
        return d / f"{k}.data", d / f"{k}.map", d / f"{k}.json"

    def load(self) -> None:
        """Read the block map of a cache found on disk (its descriptors stay closed)."""
        self._open_fds()
        try:
            self.state.close()
            self.state = BlockMap(blocks_of(self.size))
            self.state.load_file(self.map_fd)
        finally:
            self.close_fds()
        self.made = True

    def make(self, keep_open: bool) -> None:
        """Create this (still unchanged) cache's files; their descriptors stay open for a
        change about to be made, else are closed again."""
        data_fd, map_fd = make_files(self.paths(), self.size, self.meta)
        self.made = True
        # Not fsynced yet: nothing is promised before the first FLUSH/FUA (see sync()).
        self.meta_synced = False
        if keep_open:
            self.data_fd, self.map_fd = data_fd, map_fd
        else:
            os.close(data_fd)
            os.close(map_fd)

    def _open_fds(self) -> None:
        """The files' descriptors, opened if closed (the files exist)."""
        self.last_used = time.monotonic()
        if self.data_fd >= 0:
            return
        data, map_, _meta = self.paths()
        flags = os.O_RDWR | os.O_CLOEXEC
        data_fd = os.open(data, flags)
        try:
            self.map_fd = os.open(map_, flags)
        except BaseException:
            os.close(data_fd)
            raise
        self.data_fd = data_fd

    def close_fds(self) -> bool:
        """Close the descriptors unless an fsync runs on them or a change is not fsynced
        yet (so an fsync's error is never one a closed descriptor took with it)."""
        if self.data_fd < 0:
            return True
        if self._sync is not None or self.synced < self.changes:
            return False
        fds = (self.data_fd, self.map_fd)
        self.data_fd = self.map_fd = -1
        for fd in fds:
            try:
                os.close(fd)
            except OSError as e:  # everything was fsynced: nothing depends on it
                log.warning("write cache %s: closing a file: %s", self.key, reason(e))
        return True

    def _files(self) -> None:
        # Files appear ahead of the first change (WriteCaches.prepare), or with it.
        if not self.made:
            self.make(keep_open=True)
        self._open_fds()
        self.changed = True

    def _set(self, first: int, stop: int, value: int) -> None:
        self.changes += 1
        self.state.set(first, stop, value)
        os.pwrite(self.map_fd, bytes([value]) * (stop - first), first)

    def _range(self, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"range {offset}+{length} outside disk of {self.size}")
        if offset % BLOCK or (length % BLOCK and offset + length != self.size):
            raise OSError(errno.EINVAL, f"range {offset}+{length} not block aligned")
        return offset // BLOCK, -(-(offset + length) // BLOCK)

    def write(self, offset: int, data: memoryview) -> None:
        first, stop = self._range(offset, len(data))
        grows = (stop - first) - self.state.count(DIRTY, first, stop)
        if grows and self.used + grows * BLOCK > self.capacity:
            raise OSError(
                errno.ENOSPC,
                f"write cache {self.key} full: {self.used} of {self.capacity} bytes used",
            )
        self._files()
        n = os.pwrite(self.data_fd, data, offset)  # ENOSPC of a full disk raises here
        if n != len(data):
            raise OSError(errno.ENOSPC, f"short write to {self.key}: {n} of {len(data)}")
        self._set(first, stop, DIRTY)

    def zero(self, offset: int, length: int) -> None:
        first, stop = self._range(offset, length)
        self._files()
        had_data = self.state.count(DIRTY, first, stop)
        self._set(first, stop, ZEROED)
        # Give the space back: zeroed blocks are only marked. Only dirty blocks hold data
        # (the file is sparse, and a block zeroed before was punched then): a punch costs
        # ~70 us here, most of a trim's time when the guest trims what it never wrote.
        if had_data:
            punch_hole(self.data_fd, first * BLOCK, (stop - first) * BLOCK)

    def sync(self) -> None:
        if not self.changed:
            return  # nothing written yet: nothing to make durable
        self._open_fds()
        os.fsync(self.data_fd)
        os.fsync(self.map_fd)
        if not self.meta_synced:
            # Once: the cache's description and its directory entries, so a machine
            # crash after this FLUSH still finds the cache.
            meta = self.paths()[2]
            fd = os.open(meta, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            self.meta_synced = True

    async def durable(self) -> None:
        """Return once every change made so far is on disk.

        One fsync at a time per cache, in a worker thread; the FLUSHes and FUA writes that
        come while it runs share the next one (group commit), and one with nothing new
        since the last fsync costs none. A failed fsync raises in every waiter."""
        target = self.changes
        while self.synced < target:
            task = self._sync or self._start_sync()
            await asyncio.shield(task)  # a waiter cancelled does not cancel the others' fsync

    def _start_sync(self) -> asyncio.Task[None]:
        covered = self.changes

        async def run() -> None:
            started = time.perf_counter()
            try:
                if self.changed:
                    self._open_fds()  # on the loop: the worker thread finds them open
                await asyncio.to_thread(self.sync)
                self.synced = max(self.synced, covered)
            finally:
                self._sync = None
                FSYNC_LATENCY.observe(time.perf_counter() - started)

        self._sync = asyncio.get_running_loop().create_task(run())
        return self._sync

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise WriteCacheError(f"read {offset}+{length} outside disk of {self.size}")
        first, stop = offset // BLOCK, -(-(offset + length) // BLOCK)
        if not self.made or not self.state.count(DIRTY, first, stop):
            # Only dirty blocks hold data (clean ones were never written, zeroed ones are
            # punched): nothing to open a descriptor for.
            return bytes(length)
        self._open_fds()
        return os.pread(self.data_fd, length, offset)

    def close(self) -> None:
        for fd in (self.data_fd, self.map_fd):
            if fd >= 0:
                os.close(fd)
        self.data_fd = self.map_fd = -1
        self.state.close()

    def remove(self) -> None:
        self.removed = True
        self.close()
        for p in self.paths():
            p.unlink(missing_ok=True)

    def view(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "session_id": self.meta.get("session_id"),
            "vdisk": self.meta.get("vdisk"),
            "version": self.meta.get("version"),
            "kind": self.meta.get("kind"),
            "persistence": self.meta.get("persistence"),
            "used": self.used,
            "capacity": self.capacity,
            "zeroed": self.state.zeroed * BLOCK,
        }


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range (FALLOC_FL_PUNCH_HOLE); best effort: marking is what matters."""
    try:
        _fallocate(fd, 0x01 | 0x02, offset, length)  # KEEP_SIZE | PUNCH_HOLE
    except OSError:
        pass


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes
    import ctypes.util

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


_libc: Any = None

# Called once when a cache first refuses a write for lack of room (emits WriteCacheFull).
Full = Callable[[SessionWriteCache], None]


class WriteCaches:
    """Every write cache this cache node owns, found again on start."""

    def __init__(
        self,
        disk_dir: Path,
        ram_dir: Path,
        capacity: int,
        on_full: Full,
        on_first_change: Callable[[SessionWriteCache], None] | None = None,
    ) -> None:
        self.dirs = {"server-disk": disk_dir, "server-ram": ram_dir}
        self.capacity = capacity
        self.on_full = on_full
        # Called once, at a cache's first change.
        self.on_first_change = on_first_change
        self.caches: dict[str, SessionWriteCache] = {}
        # Caches found on disk that could not be reopened, with why: never silently
        # replaced by a new empty cache of the same key.
        self.unrecoverable: dict[str, str] = {}

    def recover(self) -> int:
        """Reopen the caches a previous run of this service left (after a crash, too)."""
        for kind, d in self.dirs.items():
            d.mkdir(parents=True, exist_ok=True)
            for meta_path in d.glob("*.json"):
                key = meta_path.stem
                try:
                    meta = json.loads(meta_path.read_text())
                    wc = SessionWriteCache(key, d, meta, int(meta.get("capacity", self.capacity)))
                    wc.load()
                    wc.changed = True
                    wc.changes = 1  # unknown whether its last changes were fsynced
                except (OSError, ValueError) as e:
                    log.error("write cache %s in %s cannot be recovered: %s", key, d, e)
                    self.unrecoverable[key] = f"{meta_path}: {e}"
                    continue
                self.caches[key] = wc
                log.info("recovered write cache %s (%s, %d bytes dirty)", key, kind, wc.used)
        return len(self.caches)

    def validate(self, req: WcOpen) -> str:
        """The key of an open request this node could serve; WriteCacheError if not."""
        key = req.key
        if not _KEY_OK.match(key):
            raise WriteCacheError(f"bad write cache key {key!r}")
        if key not in self.caches and req.kind not in self.dirs:
            raise WriteCacheError(f"the cache service holds no {req.kind!r} write caches")
        return key

    def open(self, req: WcOpen) -> SessionWriteCache:
        key = self.validate(req)
        wc = self.caches.get(key)
        if wc is not None:
            if wc.size != req.size:
                raise WriteCacheError(f"write cache {key} is for {wc.size} bytes, not {req.size}")
            # A kept cache (or a session moving node) is now used by this session.
            wc.meta["session_id"] = req.session_id or wc.meta.get("session_id")
            return wc
        kind = req.kind
        meta = req.meta()
        meta["capacity"] = self.capacity
        wc = SessionWriteCache(key, self.dirs[kind], meta, self.capacity)
        wc.state = BlockMap(blocks_of(wc.size))
        self.caches[key] = wc
        log.info("write cache %s opened (%s, %s)", key, kind, meta.get("persistence"))
        return wc

    def prepare(self, key: str) -> None:
        """Create a new cache's files ahead of its first write, once the opens pause (the
        service's WhenQuiet): the first write then costs a write, not the creation of three
        files, while its client waits. A session that never writes pays the creation too,
        off anyone's path. On the loop, not in a worker thread: the hand-off and GIL
        contention of a thread cost a storm more than the creations (docs/cache.md)."""
        wc = self.caches.get(key)
        if wc is None or wc.made:
            return
        try:
            wc.make(keep_open=False)  # the first write opens them: an idle session holds none
        except OSError as e:
            # The first write tries again, and reports it.
            log.warning("write cache %s: files not created ahead: %s", key, reason(e))

    def close_idle(self, idle_s: float) -> int:
        """Close the descriptors of caches unused for ``idle_s`` (every change fsynced);
        returns how many are still open."""
        since = time.monotonic() - idle_s
        still = 0
        for wc in self.caches.values():
            if wc.data_fd >= 0 and not (wc.last_used < since and wc.close_fds()):
                still += 1
        return still

    async def keep_closing_idle(self, idle_s: float) -> None:
        """Every ``idle_s / 2``: :meth:`close_idle`."""
        while True:
            await asyncio.sleep(idle_s / 2)
            self.close_idle(idle_s)

    def get(self, key: str) -> SessionWriteCache:
        wc = self.caches.get(key)
        if wc is None:
            raise WriteCacheError(
                f"no write cache {key!r} (the session was closed and its cache dropped?)",
                "not_found",
            )
        return wc

    async def apply(self, key: str, records: list[tuple[int, int, int, int, Any]]) -> bytes:
        """Apply a batch in order; one status byte per record. Returns after fsync if asked."""
        statuses, wc = self.apply_now(key, records)
        return statuses if wc is None else await self.when_durable(wc, statuses)

    def apply_now(
        self, key: str, records: list[tuple[int, int, int, int, Any]], writer: str = ""
    ) -> tuple[bytes, SessionWriteCache | None]:
        """Apply a batch in order (page-cache copies, on the loop); one status byte per
        record, and the cache to make durable before answering when the batch holds a FLUSH
        or a FUA write (:meth:`when_durable`), else None.

        The caller applies batches in the order they came and may answer the next before
        this one's fsync is done: NBD orders nothing between requests in flight, and a
        FLUSH covers what was answered before it was sent."""
        statuses = bytearray(len(records))
        try:
            wc = self.get(key)
        except WriteCacheError as e:
            log.error("write to %s refused: %s", key, e)
            return bytes([errno.ESTALE]) * len(records), None
        if writer and wc.attached_by and writer != wc.attached_by:
            # The session moved to another stream process: this one's late batches (a
            # ride-out of an outage sending its unflushed blocks again) must not land.
            log.warning(
                "write cache %s: %d records from stream process %s refused: attached by %s",
                key, len(records), writer, wc.attached_by,
            )  # fmt: skip
            return bytes([errno.EBUSY]) * len(records), None
        sync = False
        had_changed = wc.changed
        for i, (op, flags, offset, length, data) in enumerate(records):
            try:
                if op == OP_WRITE:
                    wc.write(offset, data)
                elif op == OP_ZERO:
                    wc.zero(offset, length)
                elif op != OP_FLUSH:
                    raise OSError(errno.EINVAL, f"unknown op {op}")
                sync = sync or op == OP_FLUSH or bool(flags & FLAG_SYNC)
            except OSError as e:
                statuses[i] = e.errno or errno.EIO
                if e.errno == errno.ENOSPC:
                    log.warning("%s", e)
                    if not wc.full_reported:
                        wc.full_reported = True
                        self.on_full(wc)
                else:
                    log.error("write cache %s: %s", key, e)
        if not had_changed and wc.changed and self.on_first_change is not None:
            self.on_first_change(wc)
        if wc.full_reported and wc.used < wc.capacity * 0.9:
            wc.full_reported = False
        return bytes(statuses), (wc if sync else None)

    @staticmethod
    async def when_durable(wc: SessionWriteCache, statuses: bytes) -> bytes:
        """``statuses`` once ``wc`` is on disk; EIO for every record if the fsync failed."""
        try:
            await wc.durable()
        except OSError as e:
            log.error("write cache %s: fsync failed: %s", wc.key, e)
            return bytes([errno.EIO]) * len(statuses)
        return statuses

    def drop(self, key: str) -> bool:
        wc = self.caches.pop(key, None)
        if wc is None:
            return False
        wc.remove()
        log.info("write cache %s dropped", key)
        return True

    def discardable(self, session_id: str) -> list[str]:
        """The keys of the session's caches that its close drops (``discard`` ones)."""
        return [
            k
            for k, wc in self.caches.items()
            if wc.meta.get("session_id") == session_id and wc.meta.get("persistence") != "keep"
        ]

    def drop_session(self, session_id: str) -> list[str]:
        """The session closed: drop its discard-persistence caches, keep ``keep`` ones."""
        gone = self.discardable(session_id)
        for k in gone:
            self.drop(k)
        return gone

    def forget(self, key: str) -> None:
        """Stop serving a cache without touching its files (another node owns its key)."""
        wc = self.caches.pop(key, None)
        if wc is not None:
            wc.close()

    def close(self) -> None:
        for wc in self.caches.values():
            wc.close()
