"""The shared read cache: per vdisk version, the blocks read so far, filled from the store.

One sparse file per version (``<dir>/<version key>/blocks.cache``, image offset = file
offset) and a map of its 256 KiB extents present (in memory and in ``present`` beside it:
a restarted cache service finds its read cache warm, :class:`VersionCache`). All versions
share one byte budget (``capacity``): the least recently used extent goes first (its range
is punched out of the file). Shared by every session of every stream node that reads that version.

A version's chain (base + deltas, ``shared/vdisk_layout.py``) is resolved here, since the
store only hands out layer files: the small delta maps are copied from the store, and the
chain reader runs over local stand-ins (a sparse file of the base's size, empty data
files), so a range resolves to (layer, offset) pieces by the same code as on a local disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from services.cache.stores import Store, StoreError
from services.cache.write_cache import punch_hole
from shared import metrics
from shared.errors import reason
from shared.keyed_locks import KeyedLocks
from shared.private_file import replace_private
from shared.vdisk_layout import ZERO_FD, ChainReader, is_delta

log = logging.getLogger("streamboot.cache.read")

EXTENT = 256 * 1024
# One store read covers at most this much (consecutive missing extents).
FETCH_MAX = 1024 * 1024


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]", "_", key)


class RemoteChain:
    """Resolves image ranges of a version to (layer path, offset, length) in a store."""

    def __init__(self, store: Store, layers: list[str], work: Path) -> None:
        self.store = store
        self.layers = layers
        self.work = work
        self.reader: ChainReader | None = None
        self.data_paths: list[str] = []

    async def open(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        stand_ins: list[Path] = []
        self.data_paths = []
        for i, layer in enumerate(self.layers):
            if is_delta(layer):
                local = self.work / f"L{i}.map"
                size = await self.store.size(layer)
                local.write_bytes(await self.store.read(layer, 0, size))
                local.with_suffix(".data").touch()
                self.data_paths.append(layer[: -len(".map")] + ".data")
            else:
                local = self.work / f"L{i}.raw"
                local.touch()
                os.truncate(local, await self.store.size(layer))
                self.data_paths.append(layer)
            stand_ins.append(local)
        self.reader = ChainReader(stand_ins)

    @property
    def size(self) -> int:
        assert self.reader is not None
        return self.reader.size

    async def read(self, offset: int, length: int) -> bytes:
        assert self.reader is not None
        parts = []
        for fd, off, n in self.reader.resolve(offset, length):
            if fd == ZERO_FD:
                parts.append(bytes(n))
            else:
                path = self.data_paths[self.reader.fds.index(fd)]
                parts.append(await self.store.read(path, off, n))
        return b"".join(parts)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


def warm_local(layers: list[Path], extents: list[tuple[int, int]]) -> int:
    """Read a local version's profile extents once (into the page cache); returns bytes read.

    Blocking: run it in a thread. Useful where the stream node shares this machine's page
    cache (the embedded default) or the store (a SAN/NFS server's cache)."""
    done = 0
    with ChainReader(layers) as chain:
        pieces = []
        for off, n in extents:
            n = min(n, chain.size - off)
            if n > 0:
                pieces += [p for p in chain.resolve(off, n) if p[0] != ZERO_FD]
        for fd, off, n in pieces:  # let the kernel start them all first
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
        for fd, off, n in pieces:
            done += len(os.pread(fd, n, off))
    return done


def boot_id() -> str:
    """This boot of the machine: a page cache written before it is still there."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""  # never equal to a recorded one: only a clean stop keeps a cache


class VersionCache:
    """One version's cached blocks: ``blocks.cache`` (image offset = file offset) and
    ``present`` (one byte per extent) in the version's folder.

    They outlive the process: a cache service restarted (an upgrade, a crash restarted by
    compose or Nomad) finds its read cache warm, so the boots after it do not go back to a
    slow store. ``state.json`` says when the files can be trusted: after a clean stop or a
    checkpoint (both fsynced: any later boot), or on the same boot of the machine (a killed
    process leaves its writes in the page cache, and a fill writes its blocks before their
    ``present`` bytes). After a machine restart since the last checkpoint, the page cache
    may have lost blocks whose ``present`` bytes reached the disk: the cache starts empty.

    A *checkpoint* (:meth:`checkpoint`, once the version has been quiet a while) is what a
    clean stop does, while the service runs, so a machine that goes down (a power cut
    overnight) finds the cache warm. Before the files change again ``state.json`` stops
    saying so (:meth:`_changing`): it never vouches for files that changed after it."""

    def __init__(self, key: str, info: dict[str, Any], chain: RemoteChain, folder: Path) -> None:
        self.key = key
        self.info = info
        self.chain = chain
        self.size = chain.size
        self.folder = folder
        self._state = folder / "state.json"
        extents = -(-self.size // EXTENT)
        state = self._kept_state(extents)
        kept = state is not None
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if kept else os.O_TRUNC)
        self.fd = os.open(folder / "blocks.cache", flags, 0o600)
        self.present_fd = os.open(folder / "present", flags, 0o600)
        os.ftruncate(self.fd, self.size)
        os.ftruncate(self.present_fd, extents)
        self.present = bytearray(os.pread(self.present_fd, extents, 0) if kept else extents)
        # Whether state.json says any boot may trust the files (a clean stop or checkpoint).
        self.durable_on_disk = state is not None and state.get("clean") is True
        if not self.durable_on_disk:  # files just made, or trusted by this boot only
            self._write_state(durable=False)
        # Changes to the files so far, and how many the last checkpoint covered.
        self.changes = self.checkpointed = 0
        self.last_change = time.monotonic()
        # Held while the files are fsynced or closed: a checkpoint's thread and the close.
        self._files_lock = threading.Lock()
        self.closed = False
        self._filling: dict[int, asyncio.Future[None]] = {}

    @property
    def kept_bytes(self) -> int:
        return sum(self.present) * EXTENT

    def _kept_state(self, extents: int) -> dict[str, Any] | None:
        """The ``state.json`` of files a previous process left holding this version's
        blocks, or None when they cannot be trusted."""
        try:
            state = json.loads(self._state.read_text())
            present = (self.folder / "present").read_bytes()
            blocks = (self.folder / "blocks.cache").stat().st_size
        except (OSError, ValueError):
            return None
        trusted = (
            isinstance(state, dict)
            and state.get("info") == self.info
            and (state.get("clean") is True or state.get("boot_id") == boot_id() != "")
            and blocks == self.size
            and len(present) == extents
            and present.count(0) + present.count(1) == extents
        )
        return state if trusted else None

    def _write_state(self, durable: bool) -> None:
        state: dict[str, Any] = {"info": self.info, "boot_id": boot_id()}
        if durable:
            state["clean"] = True
        replace_private(self._state, json.dumps(state), durable=True)
        self.durable_on_disk = durable

    def _changing(self) -> None:
        """The files are about to change: after a checkpoint, first say (on disk) that only
        this boot may trust them; a machine restart before the next checkpoint must not
        find a ``present`` byte whose blocks never reached the disk."""
        if self.durable_on_disk:
            self._write_state(durable=False)
        self.changes += 1
        self.last_change = time.monotonic()

    def write_blocks(self, offset: int, data: bytes) -> None:
        self._changing()
        os.pwrite(self.fd, data, offset)

    def mark(self, first: int, stop: int, value: int) -> None:
        """Extents ``first..stop`` now are (1) or are not (0) in ``blocks.cache``."""
        self._changing()
        self.present[first:stop] = bytes([value]) * (stop - first)
        os.pwrite(self.present_fd, self.present[first:stop], first)

    def checkpoint_due(self, quiet_s: float) -> bool:
        """Changed since the last checkpoint, and quiet for ``quiet_s`` since."""
        return self.changes != self.checkpointed and (
            time.monotonic() - self.last_change >= quiet_s
        )

    async def checkpoint(self) -> bool:
        """What a clean stop does, while running: the files fsynced (in a thread), then
        ``state.json`` says any later boot may use them. False when the files changed
        meanwhile (the next quiet spell tries again) or the cache closed."""
        covered = self.changes
        if not await asyncio.to_thread(self._sync_files):
            return False
        if self.changes != covered or self.closed:
            return False
        # On the loop, so no change slips in between the check and the state it vouches for.
        self._write_state(durable=True)
        self.checkpointed = covered
        return True

    def _sync_files(self) -> bool:
        with self._files_lock:
            if self.closed:
                return False
            os.fsync(self.fd)
            os.fsync(self.present_fd)
            return True

    def close(self) -> None:
        """A clean stop: the files on disk, and ``state.json`` says any later boot may use them."""
        try:
            if not self.durable_on_disk:  # any change since a checkpoint withdrew the mark
                self._sync_files()
                self._write_state(durable=True)
        except OSError as e:
            log.warning("read cache of %s not kept for the next start: %s", self.key, reason(e))
        with self._files_lock:
            self.closed = True
            os.close(self.fd)
            os.close(self.present_fd)
        self.chain.close()


class ReadCaches:
    """Every version's read cache on this node, under one byte budget."""

    def __init__(self, directory: Path, capacity: int, stores: dict[str, Store]) -> None:
        self.dir = directory
        self.capacity = max(capacity, 4 * EXTENT)
        self.stores = stores
        self.versions: dict[str, VersionCache] = {}
        self.local: dict[str, dict[str, Any]] = {}
        self._opening = KeyedLocks()  # keys come from the bus: none is kept after its open
        self.lru: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.hit_bytes = 0
        self.miss_bytes = 0
        # Prometheus (shared/metrics.py): the same figures, in bytes.
        self._hits, self._misses = metrics.cache_counters("read")
        self.store_bytes = 0
        self.evicted_bytes = 0

    @property
    def used(self) -> int:
        return len(self.lru) * EXTENT

    def stats(self) -> dict[str, Any]:
        total = self.hit_bytes + self.miss_bytes
        return {
            "capacity": self.capacity,
            "used": self.used,
            "hit_bytes": self.hit_bytes,
            "miss_bytes": self.miss_bytes,
            "hit_ratio": round(self.hit_bytes / total, 4) if total else None,
            "store_bytes": self.store_bytes,
            "evicted_bytes": self.evicted_bytes,
            "versions": sorted(self.versions),
        }

    async def open(self, req: dict[str, Any]) -> VersionCache:
        key = str(req["key"])
        vc = self.versions.get(key)
        if vc is not None:
            return vc
        async with self._opening.hold(key):
            vc = self.versions.get(key)
            if vc is not None:
                return vc
            store_name = str(req.get("store", "local"))
            store = self.stores.get(store_name)
            if store is None:
                raise StoreError(f"no store named {store_name!r} on this cache node")
            work = self.dir / _safe(key)
            info = {k: req.get(k) for k in ("key", "vdisk", "version", "store", "layers", "size")}
            vdisk = str(req.get("vdisk"))
            layers = [store.layer(vdisk, str(p)) for p in req["layers"]]
            chain = RemoteChain(store, layers, work / "chain")
            await chain.open()
            if req.get("size") is not None and chain.size != int(req["size"]):
                chain.close()
                raise StoreError(
                    f"{key}: the store's chain is {chain.size} bytes, not {req['size']}"
                )
            vc = VersionCache(key, info, chain, work)
            replace_private(work / "version.json", json.dumps(info))
            self.versions[key] = vc
            for i, here in enumerate(vc.present):
                if here:
                    self.lru[(key, i)] = None
            log.info(
                "read cache for %s opened (%d bytes, store %s; %d bytes kept from before)",
                key, vc.size, store_name, vc.kept_bytes,
            )  # fmt: skip
            self.evict()  # the budget may be smaller than it was
            return vc

    def register_local(self, req: dict[str, Any]) -> dict[str, Any]:
        """A local-store version a stream node serves: no cache (the stream reads the files
        itself), only remembered, so a BootRequested can warm its boot profile."""
        info = {k: req.get(k) for k in ("key", "vdisk", "version", "store", "layers", "size")}
        key = str(info["key"])
        if self.local.get(key) != info:
            self.local[key] = info
            work = self.dir / _safe(key)
            work.mkdir(parents=True, exist_ok=True)
            replace_private(work / "version.json", json.dumps(info))
        return info

    def known(self) -> list[dict[str, Any]]:
        """Versions a previous run served (their version.json), for prefetch after a restart."""
        out = []
        for p in self.dir.glob("*/version.json"):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue
        return out

    def get(self, key: str) -> VersionCache | None:
        return self.versions.get(key)

    async def read(self, vc: VersionCache, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > vc.size:
            raise ValueError(f"read {offset}+{length} outside {vc.key} of {vc.size} bytes")
        if not length:
            return b""
        hit = await self.ensure(vc, offset, length)
        self.hit_bytes += hit
        self.miss_bytes += length - hit
        self._hits.inc(hit)
        self._misses.inc(length - hit)
        data = os.pread(vc.fd, length, offset)
        # Evict only after the read: a fill never loses its own extents before it is served.
        self.evict()
        return data

    async def ensure(self, vc: VersionCache, offset: int, length: int) -> int:
        """Make the range present; returns how many of its bytes already were."""
        first, last = offset // EXTENT, (offset + length - 1) // EXTENT
        hit = 0
        waits: list[asyncio.Future[None]] = []
        runs: list[list[int]] = []
        for i in range(first, last + 1):
            a = max(offset, i * EXTENT)
            b = min(offset + length, (i + 1) * EXTENT)
            if vc.present[i]:
                hit += b - a
                self.lru.move_to_end((vc.key, i))
            elif i in vc._filling:
                waits.append(vc._filling[i])
            elif runs and runs[-1][1] == i and (i - runs[-1][0]) * EXTENT < FETCH_MAX:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
        loop = asyncio.get_running_loop()
        fills = []
        for a, b in runs:
            fut: asyncio.Future[None] = loop.create_future()
            for i in range(a, b):
                vc._filling[i] = fut
            fills.append(self._fill(vc, a, b, fut))
        await asyncio.gather(*fills, *waits)
        return hit

    async def _fill(self, vc: VersionCache, a: int, b: int, fut: asyncio.Future[None]) -> None:
        start, stop = a * EXTENT, min(b * EXTENT, vc.size)
        try:
            data = await vc.chain.read(start, stop - start)
            self.store_bytes += len(data)
            if data.count(0) != len(data):
                vc.write_blocks(start, data)
            vc.mark(a, b, 1)  # after the blocks: a killed process leaves no false "present"
            for i in range(a, b):
                self.lru[(vc.key, i)] = None
            fut.set_result(None)
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: waiters re-raise it themselves
            raise
        finally:
            for i in range(a, b):
                vc._filling.pop(i, None)

    def evict(self) -> None:
        while self.used > self.capacity:
            (key, i), _ = self.lru.popitem(last=False)
            vc = self.versions.get(key)
            if vc is None:
                continue
            vc.mark(i, i + 1, 0)  # before the hole: never "present" over a hole
            punch_hole(vc.fd, i * EXTENT, EXTENT)
            self.evicted_bytes += EXTENT

    async def keep_durable(self, quiet_s: float) -> None:
        """Forever: checkpoint every version whose cache changed and then was quiet for
        ``quiet_s`` (VersionCache.checkpoint), so a machine restart finds it warm."""
        while True:
            await asyncio.sleep(quiet_s / 2)
            for vc in list(self.versions.values()):
                if not vc.checkpoint_due(quiet_s):
                    continue
                try:
                    if await vc.checkpoint():
                        log.info(
                            "read cache of %s checkpointed: %d bytes kept across a machine "
                            "restart", vc.key, vc.kept_bytes,
                        )  # fmt: skip
                except OSError as e:
                    log.warning("read cache of %s: checkpoint failed: %s", vc.key, reason(e))

    def close(self) -> None:
        for vc in self.versions.values():
            vc.close()
