"""The cache service process: write caches, the shared read cache, boot profiles, prefetch.

Wiring only; each job is its own module:

- ``write_cache.py``   per-session write caches (files + block maps, recovered on start)
- ``write_routes.py``  their requests, routed to the cache node holding each; room here
- ``write_batches.py`` the stream's write batches, applied in order
- ``read_cache.py``    the shared read cache per vdisk version, bounded, LRU by extent
- ``read_routes.py``   its requests (any node)
- ``stores/``          local directory, FTP (aioftp), block device
- ``boot_profiles.py`` learning from BlocksRequested, BootProfileUpdated
- ``prefetch.py``      on BootRequested, the version's boot profile warmed; PrefetchCompleted
- ``event_followers.py`` the events followed: profiles learn, closed sessions' caches drop
- ``wire.py``          the subjects and framing the stream speaks (raw nats-py)
- ``placement.py``     which cache node holds which write cache (several cache nodes)

On SessionClosed the node holding the session's write cache drops it (unless kept), read
through a durable JetStream consumer per node, so closes that happened while the node was
down are applied when it comes back.

With several cache nodes: write-cache requests reach the node holding the key (per-node
subjects, the owner records, see ``placement.py``); read-cache requests, boot profiles and
the events other than the drop stay in the queue group ``cache`` (any node, once).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from services.cache.boot_profiles import BootProfiles, Profile
from services.cache.event_followers import EventFollowers
from services.cache.placement import Owners, Peers
from services.cache.prefetch import Prefetcher
from services.cache.read_cache import ReadCaches
from services.cache.read_routes import ReadCacheRoutes
from services.cache.stores import Store, open_store
from services.cache.stores.local import LocalStore
from services.cache.write_batches import WriteBatches
from services.cache.write_cache import SessionWriteCache, WriteCaches
from services.cache.write_routes import WriteCacheRoutes
from shared import metrics
from shared.bus import BusError, serve_json
from shared.contracts.cache import wire
from shared.contracts.cache.wire import node_subject
from shared.event_sink import QueuedEventSink
from shared.events import (
    BlocksRequested,
    BootProfileUpdated,
    BootRequested,
    ClientBooted,
    Event,
    SessionClosed,
    WriteCacheFull,
    subject_of,
)
from shared.service import ServiceRuntime, run_service
from shared.settings import Settings

log = logging.getLogger("streamboot.cache")


def ram_dir(settings: Settings) -> Path:
    if settings.cache_ram_dir is not None:
        return settings.cache_ram_dir
    tag = hashlib.sha256(str(settings.data_dir.absolute()).encode()).hexdigest()[:12]
    return Path("/dev/shm") / f"streamboot-cache-{tag}"


class CacheService:
    def __init__(self, rt: ServiceRuntime) -> None:
        self.rt = rt
        self.events = QueuedEventSink(rt.events)
        s = rt.settings
        root = s.data_path("cache")
        self.stores: dict[str, Store] = {"local": LocalStore(str(s.vdisk_root))}
        for name, url in s.cache_stores.items():
            self.stores[name] = open_store(url)
        self.writes = WriteCaches(
            root / "write",
            ram_dir(s),
            s.cache_write_capacity,
            self._full,
            lambda wc: self.routes.first_change(wc),
        )
        self.reads = ReadCaches(root / "read", s.cache_read_capacity, self.stores)
        self.profiles = BootProfiles(
            root / "profiles", s.boot_profile_window_s, s.boot_profile_max_boots, self._profile
        )
        # Fire-and-forget work (event emits, store reads, prefetches), awaited briefly on stop.
        self._tasks: set[asyncio.Task[Any]] = set()
        self.node = s.node_id
        self.peers = Peers(rt.js, self.node, s.heartbeat_timeout_s)
        # This process among the runs of this node (write replies and opens carry it).
        self.incarnation = os.urandom(wire.INCARNATION)
        self.routes = WriteCacheRoutes(rt, self.writes, self.peers, self.incarnation, self._spawn)
        self.batches = WriteBatches(self.writes, self._spawn, self.incarnation)
        self.read_routes = ReadCacheRoutes(self.reads, self.profiles, self._spawn)
        self.prefetcher = Prefetcher(self.reads, self.profiles, self.stores, self.emit, self._spawn)
        self.followers: EventFollowers  # made by start(), once the owner records are open

    async def open_owners(self) -> None:
        """The owner records (placement.py): this node's recovered caches registered."""
        owners = await Owners.open(self.rt.js, self.node)
        self.routes.owners = owners
        self.followers = EventFollowers(self.rt, self.profiles, self.writes, owners)
        await self.routes.register_recovered()

    # --- events out -----------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def emit(self, event: Event, correlation_id: str | None = None) -> None:
        # Queued in order and retried while the registry, NATS or PostgreSQL is away.
        self.events.put(event, correlation_id)

    def _full(self, wc: SessionWriteCache) -> None:
        sid = wc.meta.get("session_id") or wc.key
        self.emit(WriteCacheFull(session_id=sid, capacity=wc.capacity, used=wc.used), sid)

    def _profile(self, key: str, prof: Profile) -> None:
        vdisk, _, version = key.rpartition("@")
        self.emit(
            BootProfileUpdated(
                vdisk=vdisk,
                version=int(version),
                boots_seen=prof.boots,
                extents=prof.extents,
                bytes=prof.bytes,
            )
        )

    async def stats(self, _body: Any, _msg: Any) -> dict[str, Any]:
        return {
            "node": self.node,
            "pid": os.getpid(),
            "peers": self.peers.alive(),
            **self.routes.space(),
            "read_cache": self.reads.stats(),
            "write_caches": self.routes.views(),
            "profiles": {
                k: {"boots": p.boots, "bytes": p.bytes} for k, p in self.profiles.profiles.items()
            },
            "prefetches": self.prefetcher.prefetches,
        }

    async def close(self) -> None:
        await self.events.drain()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        for task in self._tasks:
            task.cancel()
        self.routes.unprepared.cancel()  # files not made yet: a later first write makes them
        self.writes.close()
        self.reads.close()
        for store in self.stores.values():
            await store.close()


async def _refuse_duplicate(rt: ServiceRuntime) -> None:
    """Two live processes with one node id would both take that node's writes: refuse."""
    node = rt.settings.node_id
    try:
        msg = await rt.nc.request(node_subject(node, wire.V_STATS), b"{}", timeout=1.0)
    except (NoRespondersError, NatsTimeoutError):
        return  # nobody, or a dead process NATS has not noticed yet
    other = json.loads(msg.data or b"{}")
    raise BusError(
        f"another cache node runs as {node!r} (pid {other.get('pid')}): give each cache node "
        "its own STREAMBOOT_NODE_ID"
    )


async def start(rt: ServiceRuntime) -> None:
    await _refuse_duplicate(rt)
    svc = CacheService(rt)
    recovered = svc.writes.recover()
    svc.profiles.load()
    await svc.open_owners()
    if recovered:
        log.info("cache: recovered %d write caches", len(svc.writes.caches))
    rt.spawn(svc.events.run(), "event-sink")
    rt.spawn(svc.peers.run(), "cache-peers")
    rt.spawn(svc.followers.follow_closed_sessions(), "cache-closed-sessions")
    if rt.settings.cache_write_idle_close_s > 0:
        idle_s = rt.settings.cache_write_idle_close_s
        rt.spawn(svc.writes.keep_closing_idle(idle_s), "write-cache-idle-close")
    if rt.settings.cache_read_checkpoint_s > 0:
        quiet_s = rt.settings.cache_read_checkpoint_s
        rt.spawn(svc.reads.keep_durable(quiet_s), "read-cache-checkpoints")
    nc, q = rt.nc, wire.QUEUE
    routes, reads, followers = svc.routes, svc.read_routes, svc.followers

    def node(verb: str) -> str:
        return node_subject(svc.node, verb)

    subs = [
        # Routed to the holder (placement.py); each open its own task (it may wait on KV
        # and other nodes).
        await serve_json(nc, wire.WC_OPEN, routes.wc_open, queue=q, concurrent=True),
        await serve_json(nc, node(wire.V_WC_OPEN), routes.wc_open, concurrent=True),
        # One subscription, so one session's batches are applied in the order sent.
        await nc.subscribe(node(wire.V_WC_WRITE), cb=svc.batches.on_batch),
        await nc.subscribe(node(wire.V_WC_READ), cb=routes.wc_read),
        await serve_json(nc, node(wire.V_WC_MAP), routes.wc_map),
        await serve_json(nc, node(wire.V_STATS), svc.stats),
        # Every node answers (scatter-gather).
        await serve_json(nc, wire.WC_LIST, routes.wc_list),
        await serve_json(nc, wire.STATS, svc.stats),
        await serve_json(nc, wire.RC_OPEN, reads.rc_open, queue=q),
        # Store reads may be slow: each read its own task (a subscription's callbacks run
        # one at a time). Writes stay in order on theirs.
        await nc.subscribe(wire.RC_READ, queue=q, cb=reads.spawn_read),
        await nc.subscribe(subject_of(BlocksRequested), queue=q, cb=followers.on_blocks),
        await nc.subscribe(subject_of(SessionClosed), queue=q, cb=followers.on_session_closed),
        await nc.subscribe(subject_of(ClientBooted), queue=q, cb=followers.on_client_booted),
        await nc.subscribe(subject_of(BootRequested), queue=q, cb=svc.prefetcher.on_boot_requested),
    ]
    await nc.flush()

    def vitals() -> dict[str, Any]:
        r = svc.reads.stats()
        return {
            "write_caches": len(svc.writes.caches),
            "write_cache_bytes": sum(wc.used for wc in svc.writes.caches.values()),
            "read_cache_bytes": r["used"],
            "read_cache_hit_ratio": r["hit_ratio"],
            # Placement skips a node short of space (placement.Peers reads "room").
            **routes.space(),
        }

    rt.vitals = vitals
    metrics.write_cache_bytes_from(lambda: sum(wc.used for wc in svc.writes.caches.values()))

    async def stop() -> None:
        for sub in subs:
            await sub.unsubscribe()
        await svc.close()

    rt.on_stop(stop)


def main() -> None:
    run_service("cache", start)
