"""The cache service process: write caches, the shared read cache, boot profiles, prefetch.

Wiring only; each job is its own module:

- ``write_cache.py``   per-session write caches (files + block maps, recovered on start)
- ``read_cache.py``    the shared read cache per vdisk version, bounded, LRU by extent
- ``stores/``          local directory, FTP (aioftp), block device
- ``boot_profiles.py`` learning from BlocksRequested, BootProfileUpdated
- ``wire.py``          the subjects and framing the stream speaks (raw nats-py)
- ``placement.py``     which cache node holds which write cache (several cache nodes)

On BootRequested it prefetches the version's boot profile into the read cache and emits
PrefetchCompleted; on SessionClosed the node holding the session's write cache drops it
(unless kept), read through a durable JetStream consumer per node, so closes that happened
while the node was down are applied when it comes back.

With several cache nodes: write-cache requests reach the node holding the key (per-node
subjects, the owner records, see ``placement.py``); read-cache requests, boot profiles and
the events other than the drop stay in the queue group ``cache`` (any node, once).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace

from services.cache import wire
from services.cache.block_map import encode_runs
from services.cache.boot_profiles import BootProfiles, Profile
from services.cache.client import not_alive
from services.cache.placement import Owners, Peers, node_subject, placement_order
from services.cache.read_cache import ReadCaches, VersionCache, warm_local
from services.cache.stores import Store, StoreError, open_store
from services.cache.stores.local import LocalStore
from services.cache.when_quiet import WhenQuiet
from services.cache.write_batches import WriteBatches
from services.cache.write_cache import SessionWriteCache, WriteCacheError, WriteCaches
from shared import metrics
from shared.bus import (
    EVENTS_STREAM,
    BusError,
    RemoteError,
    connection_mark,
    respond,
    serve_json,
    subject_token,
)
from shared.event_log import closed_in_log
from shared.event_sink import QueuedEventSink
from shared.events import BootProfileUpdated, Event, PrefetchCompleted, WriteCacheFull
from shared.service import ServiceRuntime, run_service
from shared.settings import Settings
from shared.telemetry import context_from_traceparent

tracer = trace.get_tracer("streamboot.cache")
log = logging.getLogger("streamboot.cache")

# An open may be routed from node to node at most this often (a placement, then the owner
# record of a race's winner); more means the records changed under us.
MAX_HOPS = 2
# Work a reply need not wait for (the owner record's "written" mark at a cache's first
# change) starts this long after the reply: nats-py sends a reply from its flusher task, a
# loop turn or two after respond().
AFTER_REPLY_S = 0.002
# A new cache's files are made once opens have paused this long (a storm's opens come in a
# burst while its clients connect, ~1 ms apart here), at the latest this long after its
# open; a first write coming sooner makes them itself (when_quiet.py). Short enough for the
# bench's lone client, whose only write comes ~20 ms after its open.
PREPARE_QUIET_S = 0.01
PREPARE_MAX_WAIT_S = 1.0
# A cache node's consumer of SessionClosed outlives its node's absence this long.
CLOSED_CONSUMER_KEEP_S = 30 * 24 * 3600.0
# How long one pull for SessionClosed waits (an idle node asks again after it).
CLOSED_FETCH_WAIT_S = 2.0
# A close the registry cannot confirm (it is away) comes back after this.
CLOSED_RETRY_S = 2.0


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
            root / "write", ram_dir(s), s.cache_write_capacity, self._full, self._first_change
        )
        self.reads = ReadCaches(root / "read", s.cache_read_capacity, self.stores)
        self.profiles = BootProfiles(
            root / "profiles", s.boot_profile_window_s, s.boot_profile_max_boots, self._profile
        )
        # Fire-and-forget work (event emits, store reads, prefetches), awaited briefly on stop.
        self._tasks: set[asyncio.Task[Any]] = set()
        self.prefetches = 0
        self.node = s.node_id
        self.peers = Peers(rt.js, self.node, s.heartbeat_timeout_s)
        self.min_free = s.cache_min_free_bytes
        # Room per kind as last measured (every heartbeat): placement reads it, no statvfs
        # per open; the other nodes see the same figure in that heartbeat.
        self.room: dict[str, bool] = {}
        self.owners: Owners  # opened by start()
        self.unprepared = WhenQuiet(self.writes.prepare, PREPARE_QUIET_S, PREPARE_MAX_WAIT_S)
        # This process among the runs of this node (write replies and opens carry it).
        self.incarnation = os.urandom(wire.INCARNATION)
        self.batches = WriteBatches(self.writes, self._spawn, self.incarnation)

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

    def _first_change(self, wc: SessionWriteCache) -> None:
        async def mark() -> None:
            try:
                await self.owners.mark_written(wc.key)
            except Exception as e:
                log.warning("write cache %s: owner record not marked as written: %s", wc.key, e)

        # After the reply to this write is out: the mark's KV request, sent first, made the
        # session's first write 0.1-0.2 ms slower.
        asyncio.get_running_loop().call_later(AFTER_REPLY_S, lambda: self._spawn(mark()))

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

    # --- write caches ---------------------------------------------------------------

    async def register_recovered(self) -> None:
        """Record this node as the holder of every cache recover() found. A cache whose key
        another node holds (the record says so) is not served: two live copies of one
        cache must never both take writes."""
        for key, wc in list(self.writes.caches.items()):
            owner = await self.owners.claim(key, wc.meta)
            if owner.node != self.node:
                log.error(
                    "write cache %s (in %s) is recorded as held by cache node %s: not serving "
                    "this copy (delete its owner record to make this node hold it)",
                    key,
                    wc.directory,
                    owner.node,
                )
                self.writes.forget(key)

    def _opened(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            wc = self.writes.open(body)
        except WriteCacheError as e:
            raise RemoteError(str(e), e.kind) from e
        if wc.data_fd < 0:
            # A new cache: its files are made once the opens pause, not in the first write.
            self.unprepared.add(wc.key)
        if body.get("stream_instance"):
            wc.attached_by = str(body["stream_instance"])
            self._spawn(self._attached(wc.key, body))
        return {
            "node": self.node,
            "blocks": len(wc.state),
            **map_page(wc, 0),
            "used": wc.used,
            "capacity": wc.capacity,
            "incarnation": self.incarnation.hex(),
            "synced": wc.synced == wc.changes,
        }

    async def wc_map(self, body: dict[str, Any], _msg: Msg) -> dict[str, Any]:
        """The next page of a write cache's runs, from block ``from`` (after wc.open)."""
        try:
            wc = self.writes.get(str(body.get("key")))
            first = int(body["from"])
        except WriteCacheError as e:
            raise RemoteError(str(e), e.kind) from e
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise RemoteError(f"bad map request: {e!r}", "invalid") from e
        if not 0 <= first <= len(wc.state):
            raise RemoteError(f"write cache {wc.key} has no block {first}", "invalid")
        return map_page(wc, first)

    def free_bytes(self) -> dict[str, int]:
        """Free space where each kind of write cache lives here (disk, RAM dir)."""
        free = {}
        for kind, d in self.writes.dirs.items():
            try:
                st = os.statvfs(d)
            except OSError:
                free[kind] = 0
            else:
                free[kind] = st.f_bavail * st.f_frsize
        return free

    def space(self) -> dict[str, Any]:
        """Free bytes per kind of write cache, and whether this node takes new ones (free
        space at least ``cache_min_free_bytes``): in its heartbeat and stats. A change of
        room is logged."""
        free = self.free_bytes()
        room = {kind: n >= self.min_free for kind, n in free.items()}
        for kind, ok in room.items():
            if ok == self.room.get(kind, True):
                continue
            if ok:
                log.info("cache node %s: room again for new %s write caches", self.node, kind)
            else:
                log.warning(
                    "cache node %s: less than %d MiB free for %s write caches: new ones go "
                    "to other cache nodes while one has room", self.node, self.min_free >> 20,
                    kind,
                )  # fmt: skip
        self.room = room
        return {"room": room, "free_bytes": free}

    def _has_room(self, kind: str) -> Callable[[str], bool]:
        def has_room(node: str) -> bool:
            if node == self.node:
                return self.room.get(kind, True)
            return self.peers.has_room(node, kind)

        return has_room

    async def _attached(self, key: str, body: dict[str, Any]) -> None:
        """Tell every stream process that ``key`` is now attached by the one that opened
        it, so another one still holding a session on it drops its stale mirror."""
        notice = {
            "key": key,
            "session_id": body.get("session_id"),
            "stream_node": body.get("stream_node"),
            "stream_instance": body["stream_instance"],
        }
        try:
            await self.rt.nc.publish(wire.WC_ATTACHED, json.dumps(notice).encode())
        except Exception as e:  # the open itself succeeded
            log.warning("write cache %s: could not publish its attach (%s)", key, e)

    async def wc_open(self, body: dict[str, Any], _msg: Msg) -> dict[str, Any]:
        """Open a write cache on the node that holds it (or, for a new key, the node placed
        to hold it), routing the request there when that is another node.

        The common cases cost little: a key held here, no lookup; a new key, one KV
        ``create`` on the node it is placed on (plus one hop when that is another node)."""
        try:
            key = self.writes.validate(body)
        except WriteCacheError as e:
            raise RemoteError(str(e), e.kind) from e
        if key in self.writes.caches:  # held here (recorded when created or recovered)
            return self._opened(body)
        hops = int(body.get("hops", 0))
        if body.get("create") is False:
            owner = await self.owners.get(key)
            if owner is None:
                raise RemoteError(f"no cache node holds write cache {key}", "not_found")
        else:
            if hops == 0:
                # The live node the key ranks first opens it (the next one if it is gone;
                # nodes short of space last): a new key is placed there; a known one is
                # routed on by its record.
                kind = str(body.get("kind"))
                for target in placement_order(key, self.peers.alive(), self._has_room(kind)):
                    if target == self.node:
                        break
                    try:
                        return await self._forward(target, key, body, hops)
                    except _NotAlive:
                        log.warning("cache node %s (first for %s) is not alive", target, key)
            owner = await self.owners.claim(key, body)  # create-if-absent: one holder
        if owner.node == self.node:
            if key in self.writes.unrecoverable:
                message = (
                    f"write cache {key} on cache node {self.node} could not be recovered "
                    f"({self.writes.unrecoverable[key]})"
                )
            elif owner.record.get("written") and key not in self.writes.caches:
                # Not held (dropped caches have no record) yet it had data: its files are
                # gone (a machine restart emptied /dev/shm, a lost disk...).
                message = (
                    f"write cache {key} held by cache node {self.node} had data, but its "
                    "files are gone"
                )
            else:
                return self._opened(body)
            log.error("%s: open refused", message)
            raise RemoteError(message, "unavailable")
        if hops >= MAX_HOPS:
            raise RemoteError(
                f"write cache {key}: routed {hops} times, its owner record keeps moving "
                f"(now {owner.node})",
                "unavailable",
            )
        try:
            return await self._forward(owner.node, key, body, hops)
        except _NotAlive:
            message = not_alive(owner.node, key)
            log.error("%s (open refused: its writes are there, not here)", message)
            raise RemoteError(message, "not_alive") from None

    async def _forward(
        self, node: str, key: str, body: dict[str, Any], hops: int
    ) -> dict[str, Any]:
        """The open, answered by ``node`` (its reply says it holds the cache)."""
        payload = json.dumps({**body, "hops": hops + 1}).encode()
        try:
            msg = await self.rt.nc.request(node_subject(node, wire.V_WC_OPEN), payload, timeout=10)
        except NoRespondersError:
            raise _NotAlive(node) from None
        except NatsTimeoutError as e:
            raise RemoteError(f"cache node {node}: no reply to open {key}", "unavailable") from e
        reply = json.loads(msg.data)
        if isinstance(reply, dict) and "error" in reply:
            raise RemoteError(reply["error"], reply.get("kind", "error"))
        return reply  # type: ignore[no-any-return]

    async def wc_read(self, msg: Msg) -> None:
        mark = connection_mark(msg._client)
        try:
            body = json.loads(msg.data)
            wc = self.writes.get(str(body["key"]))
            length = min(int(body["length"]), wire.MAX_CHUNK)
            reply = wire.ok(wc.read(int(body["offset"]), length))
        except WriteCacheError as e:
            reply = wire.fail(str(e), e.kind)
        except (ValueError, KeyError, OSError) as e:
            reply = wire.fail(f"bad read: {e}", "invalid")
        await respond(msg, reply, mark)

    def _views(self) -> list[dict[str, Any]]:
        return [{**wc.view(), "node": self.node} for wc in self.writes.caches.values()]

    async def wc_list(self, _body: Any, _msg: Msg) -> dict[str, Any]:
        return {"node": self.node, "caches": self._views()}

    # --- read cache -----------------------------------------------------------------

    async def rc_open(self, body: dict[str, Any], _msg: Msg) -> dict[str, Any]:
        try:
            if body.get("store", "local") == "local":
                self.reads.register_local(body)
            else:
                await self.reads.open(body)
        except (StoreError, OSError) as e:
            raise RemoteError(f"cannot open {body.get('key')}: {e}", "unavailable") from e
        return {"profile": self.profiles.extents(body["vdisk"], int(body["version"]))}

    async def rc_read(self, msg: Msg) -> None:
        mark = connection_mark(msg._client)
        try:
            body = json.loads(msg.data)
            vc = self.reads.get(str(body["key"]))
            if vc is None and body.get("layers") is not None:
                # Opened through another cache node: this one opens it at its first read.
                vc = await self.reads.open(body)
            if vc is None:
                reply = wire.fail(f"read cache {body['key']!r} not open", "not_found")
            else:
                length = min(int(body["length"]), wire.MAX_CHUNK)
                reply = wire.ok(await self.reads.read(vc, int(body["offset"]), length))
        except (StoreError, OSError) as e:
            log.error("read cache: store read failed: %s", e)
            reply = wire.fail(str(e), "unavailable")
        except (ValueError, KeyError) as e:
            reply = wire.fail(f"bad read: {e}", "invalid")
        await respond(msg, reply, mark)

    async def spawn_read(self, msg: Msg) -> None:
        self._spawn(self.rc_read(msg))

    async def stats(self, _body: Any, _msg: Msg) -> dict[str, Any]:
        return {
            "node": self.node,
            "pid": os.getpid(),
            "peers": self.peers.alive(),
            **self.space(),
            "read_cache": self.reads.stats(),
            "write_caches": self._views(),
            "profiles": {
                k: {"boots": p.boots, "bytes": p.bytes} for k, p in self.profiles.profiles.items()
            },
            "prefetches": self.prefetches,
        }

    # --- events in ------------------------------------------------------------------

    async def on_blocks(self, msg: Msg) -> None:
        try:
            self.profiles.observe(json.loads(msg.data)["data"])
        except (ValueError, KeyError) as e:
            log.warning("unusable BlocksRequested event: %s", e)

    async def on_client_booted(self, msg: Msg) -> None:
        self.profiles.booted(json.loads(msg.data).get("data", {}).get("session_id", ""))

    async def on_session_closed(self, msg: Msg) -> None:
        """Queue group (once): the session's boot, if it was being learnt, ends."""
        self.profiles.end_boot(json.loads(msg.data).get("data", {}).get("session_id", ""))

    async def follow_closed_sessions(self) -> None:
        """Drop the ``discard`` caches of closed sessions, also of those closed while this
        node was down: a durable JetStream consumer per node resumes where it stopped (a
        core subscription would miss them, and the caches would stay for good)."""
        durable = f"cache-closed-{subject_token(self.node)}"
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.NEW,  # at creation; then from where it stopped
            ack_policy=AckPolicy.EXPLICIT,
            inactive_threshold=CLOSED_CONSUMER_KEEP_S,  # a node gone for good lets go
        )
        # Checked each turn, not only cancellation: a cancel that lands as nats-py's fetch
        # times out can be lost (seen: the service then did not stop).
        stopping = self.rt.stopping
        while not stopping.is_set():
            try:
                sub = await self.rt.js.pull_subscribe(
                    "events.SessionClosed.>", durable=durable, stream=EVENTS_STREAM, config=config
                )
                try:
                    while not stopping.is_set():
                        try:
                            msgs = await sub.fetch(64, timeout=CLOSED_FETCH_WAIT_S)
                        except NatsTimeoutError:
                            continue
                        for msg in msgs:
                            try:
                                await self.drop_closed_session(msg)
                            except BusError as e:  # the registry cannot confirm it now
                                log.warning("cache: a close not confirmed yet (%s)", e)
                                await msg.nak(delay=CLOSED_RETRY_S)
                                continue
                            except Exception:  # a bad event must not come back forever
                                log.exception("cache: cannot handle a SessionClosed event")
                            await msg.ack()
                finally:
                    # nats-py's fetch takes the expiry notices of earlier fetches out of
                    # the inbox without marking them done: a subscription left open made
                    # the connection's drain at stop wait its whole timeout for them.
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("cache: following closed sessions failed (%s); again in 1 s", e)
                await asyncio.sleep(1.0)

    async def drop_closed_session(self, msg: Msg) -> None:
        """Every node: the one holding the session's ``discard`` cache drops it (and its
        owner record), once the registry confirms that the close is in the log (anyone
        may publish a message; raises BusError when it cannot tell now); the others hold
        nothing of it."""
        sid = json.loads(msg.data).get("data", {}).get("session_id", "")
        if not isinstance(sid, str) or not self.writes.discardable(sid):
            return
        if not await closed_in_log(self.rt.nc, sid):
            log.warning("cache: a SessionClosed of %s that is not in the log; its cache kept", sid)
            return
        for key in self.writes.drop_session(sid):
            try:
                await self.owners.release(key)
            except Exception as e:
                log.warning("write cache %s dropped, but its owner record stays: %s", key, e)

    async def on_boot_requested(self, msg: Msg) -> None:
        event = json.loads(msg.data)
        data = event.get("data", {})
        info = self._version_for(data.get("vdisk"), data.get("version"))
        if info is not None:
            self._spawn(self.traced_prefetch(info, event.get("traceparent")))

    async def traced_prefetch(self, info: dict[str, Any], traceparent: str | None) -> int:
        """The prefetch as a span of the boot's trace (BootRequested carries it)."""
        with tracer.start_as_current_span(
            "prefetch",
            context=context_from_traceparent(traceparent),
            attributes={
                "streamboot.vdisk": str(info["vdisk"]),
                "streamboot.version": int(info["version"]),
            },
        ) as span:
            fetched = await self.prefetch(info)
            span.set_attribute("streamboot.bytes", fetched)
            return fetched

    def _version_for(self, vdisk: str | None, version: int | None) -> dict[str, Any] | None:
        """The booting version as a stream node described it (its newest, when the boot did
        not say which); versions served before a restart of this service count too."""
        seen = [vc.info for vc in self.reads.versions.values()]
        seen += list(self.reads.local.values()) + self.reads.known()
        cands = [
            info
            for info in seen
            if info.get("vdisk") == vdisk and (version is None or info.get("version") == version)
        ]
        return max(cands, key=lambda i: int(i.get("version") or 0), default=None)

    async def prefetch(self, info: dict[str, Any]) -> int:
        """Warm the version's boot profile: into the read cache (a remote store), or into the
        page cache (a local one). PrefetchCompleted says how much and how long."""
        vdisk, version = str(info["vdisk"]), int(info["version"])
        extents = self.profiles.extents(vdisk, version)
        if not extents:
            return 0
        started = time.perf_counter()
        try:
            if info.get("store", "local") == "local":
                local = self.stores["local"]
                layers = [Path(local.layer(vdisk, str(p))) for p in info["layers"]]
                fetched = await asyncio.to_thread(warm_local, layers, extents)
            else:
                fetched = await self._prefetch_remote(await self.reads.open(info), extents)
        except (StoreError, OSError, ValueError) as e:
            log.error("prefetch of %s@%s failed: %s", vdisk, version, e)
            return 0
        ms = (time.perf_counter() - started) * 1000
        self.prefetches += 1
        log.info("prefetched %s@%s: %d bytes in %.0f ms", vdisk, version, fetched, ms)
        self.emit(PrefetchCompleted(vdisk=vdisk, version=version, bytes=fetched, duration_ms=ms))
        return fetched

    async def _prefetch_remote(self, vc: VersionCache, extents: list[tuple[int, int]]) -> int:
        """Fill the read cache from the store; returns the bytes fetched from the store."""
        before = self.reads.store_bytes
        sem = asyncio.Semaphore(8)

        async def one(o: int, n: int) -> None:
            async with sem:
                await self.reads.ensure(vc, o, min(n, vc.size - o))

        await asyncio.gather(*(one(o, n) for o, n in extents if o < vc.size))
        self.reads.evict()
        return self.reads.store_bytes - before

    async def close(self) -> None:
        await self.events.drain()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        for task in self._tasks:
            task.cancel()
        self.unprepared.cancel()  # files not made yet: a later first write makes them
        self.writes.close()
        self.reads.close()
        for store in self.stores.values():
            await store.close()


def map_page(wc: SessionWriteCache, first: int) -> dict[str, Any]:
    """Up to MAP_PAGE_RUNS runs of a cache's map from block ``first``, and where the next
    page starts (None: that was the last)."""
    runs = wc.state.nonclean_runs(first, wire.MAP_PAGE_RUNS + 1)
    more = runs[-2][2] if len(runs) > wire.MAP_PAGE_RUNS else None
    return {"runs": encode_runs(runs[: wire.MAP_PAGE_RUNS]), "more_from": more}


class _NotAlive(Exception):
    """No cache node answers on that node's subjects."""


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
    svc.owners = await Owners.open(rt.js, svc.node)
    await svc.register_recovered()
    if recovered:
        log.info("cache: recovered %d write caches", len(svc.writes.caches))
    rt.spawn(svc.events.run(), "event-sink")
    rt.spawn(svc.peers.run(), "cache-peers")
    rt.spawn(svc.follow_closed_sessions(), "cache-closed-sessions")
    if rt.settings.cache_read_checkpoint_s > 0:
        quiet_s = rt.settings.cache_read_checkpoint_s
        rt.spawn(svc.reads.keep_durable(quiet_s), "read-cache-checkpoints")
    nc, q = rt.nc, wire.QUEUE

    def node(verb: str) -> str:
        return node_subject(svc.node, verb)

    subs = [
        # Routed to the holder (placement.py); each open its own task (it may wait on KV
        # and other nodes).
        await serve_json(nc, wire.WC_OPEN, svc.wc_open, queue=q, concurrent=True),
        await serve_json(nc, node(wire.V_WC_OPEN), svc.wc_open, concurrent=True),
        # One subscription, so one session's batches are applied in the order sent.
        await nc.subscribe(node(wire.V_WC_WRITE), cb=svc.batches.on_batch),
        await nc.subscribe(node(wire.V_WC_READ), cb=svc.wc_read),
        await serve_json(nc, node(wire.V_WC_MAP), svc.wc_map),
        await serve_json(nc, node(wire.V_STATS), svc.stats),
        # Every node answers (scatter-gather).
        await serve_json(nc, wire.WC_LIST, svc.wc_list),
        await serve_json(nc, wire.STATS, svc.stats),
        await serve_json(nc, wire.RC_OPEN, svc.rc_open, queue=q),
        # Store reads may be slow: each read its own task (a subscription's callbacks run
        # one at a time). Writes stay in order on theirs.
        await nc.subscribe(wire.RC_READ, queue=q, cb=svc.spawn_read),
        await nc.subscribe("events.BlocksRequested.>", queue=q, cb=svc.on_blocks),
        await nc.subscribe("events.SessionClosed.>", queue=q, cb=svc.on_session_closed),
        await nc.subscribe("events.ClientBooted.>", queue=q, cb=svc.on_client_booted),
        await nc.subscribe("events.BootRequested.>", queue=q, cb=svc.on_boot_requested),
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
            **svc.space(),
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
