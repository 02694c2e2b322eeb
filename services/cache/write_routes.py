"""Write caches over several cache nodes: the requests for them, routed to the node that
holds each (``placement.py`` places a new key, the owner records say who holds a known one),
and this node's room for new ones. Part of the cache service (service.py wires it)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any

from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from services.cache.placement import Owners, Peers, placement_order
from services.cache.when_quiet import WhenQuiet
from services.cache.write_cache import SessionWriteCache, WriteCacheError, WriteCaches
from shared.block_map import encode_runs
from shared.bus import RemoteError, connection_mark, respond
from shared.contracts.cache import wire
from shared.contracts.cache.bodies import BlockRead, WcMap, WcOpen, parse
from shared.contracts.cache.client import not_alive
from shared.contracts.cache.wire import node_subject
from shared.errors import reason
from shared.service import ServiceRuntime

log = logging.getLogger("streamboot.cache")

# An open may be routed from node to node at most this often (a placement, then the owner
# record of a race's winner); more means the records changed under us.
MAX_HOPS = 2
# Work a reply need not wait for (the owner record's "written" mark at a cache's first
# change) starts this long after the reply: nats-py sends a reply from its flusher task, a
# loop turn or two after respond().
AFTER_REPLY_S = 0.002
# A new cache's files are made once opens have paused this long (a storm's opens come in a
# burst while its clients connect), at the latest this long after its open; a first write
# coming sooner makes them itself (when_quiet.py). Short enough that a lone client's first
# write usually finds them made.
PREPARE_QUIET_S = 0.01
PREPARE_MAX_WAIT_S = 1.0


class WriteCacheRoutes:
    def __init__(
        self,
        rt: ServiceRuntime,
        writes: WriteCaches,
        peers: Peers,
        incarnation: bytes,
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
    ) -> None:
        self.rt = rt
        self.writes = writes
        self.peers = peers
        self.node = rt.settings.node_id
        self.incarnation = incarnation
        self._spawn = spawn
        self.min_free = rt.settings.cache_min_free_bytes
        # Room per kind as last measured (every heartbeat): placement reads it, no statvfs
        # per open; the other nodes see the same figure in that heartbeat.
        self.room: dict[str, bool] = {}
        self.owners: Owners  # opened by start()
        self.unprepared = WhenQuiet(writes.prepare, PREPARE_QUIET_S, PREPARE_MAX_WAIT_S)

    def first_change(self, wc: SessionWriteCache) -> None:
        async def mark() -> None:
            try:
                await self.owners.mark_written(wc.key)
            except Exception as e:
                log.warning(
                    "write cache %s: owner record not marked as written: %s", wc.key, reason(e)
                )

        # After the reply to this write is out: the mark's KV request, sent first, would
        # delay the session's first write.
        asyncio.get_running_loop().call_later(AFTER_REPLY_S, lambda: self._spawn(mark()))

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

    def _opened(self, body: WcOpen) -> dict[str, Any]:
        try:
            wc = self.writes.open(body)
        except WriteCacheError as e:
            raise RemoteError(str(e), e.kind) from e
        if wc.data_fd < 0:
            # A new cache: its files are made once the opens pause, not in the first write.
            self.unprepared.add(wc.key)
        if body.stream_instance:
            wc.attached_by = body.stream_instance
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

    async def wc_map(self, raw: Any, _msg: Msg) -> dict[str, Any]:
        """The next page of a write cache's runs, from block ``from`` (after wc.open)."""
        body = parse(WcMap, raw, "map request")
        try:
            wc = self.writes.get(body.key)
        except WriteCacheError as e:
            raise RemoteError(str(e), e.kind) from e
        first = body.first
        if first is None:
            raise RemoteError("bad map request: from: Field required", "invalid")
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

    async def _attached(self, key: str, body: WcOpen) -> None:
        """Tell every stream process that ``key`` is now attached by the one that opened
        it, so another one still holding a session on it drops its stale mirror."""
        notice = {
            "key": key,
            "session_id": body.session_id,
            "stream_node": body.stream_node,
            "stream_instance": body.stream_instance,
        }
        try:
            await self.rt.nc.publish(wire.WC_ATTACHED, json.dumps(notice).encode())
        except Exception as e:  # the open itself succeeded
            log.warning("write cache %s: could not publish its attach (%s)", key, reason(e))

    async def wc_open(self, raw: Any, _msg: Msg) -> dict[str, Any]:
        """Open a write cache on the node that holds it (or, for a new key, the node placed
        to hold it), routing the request there when that is another node.

        The common cases cost little: a key held here, no lookup; a new key, one KV
        ``create`` on the node it is placed on (plus one hop when that is another node)."""
        body = parse(WcOpen, raw, "open request")
        try:
            key = self.writes.validate(body)
        except WriteCacheError as e:
            raise RemoteError(str(e), e.kind) from e
        if key in self.writes.caches:  # held here (recorded when created or recovered)
            return self._opened(body)
        hops = body.hops
        if body.create is False:
            owner = await self.owners.get(key)
            if owner is None:
                raise RemoteError(f"no cache node holds write cache {key}", "not_found")
        else:
            if hops == 0:
                # The live node the key ranks first opens it (the next one if it is gone;
                # nodes short of space last): a new key is placed there; a known one is
                # routed on by its record.
                kind = body.kind
                for target in placement_order(key, self.peers.alive(), self._has_room(kind)):
                    if target == self.node:
                        break
                    try:
                        return await self._forward(target, key, body, hops)
                    except _NotAlive:
                        log.warning("cache node %s (first for %s) is not alive", target, key)
            owner = await self.owners.claim(key, body.meta())  # create-if-absent: one holder
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

    async def _forward(self, node: str, key: str, body: WcOpen, hops: int) -> dict[str, Any]:
        """The open, answered by ``node`` (its reply says it holds the cache)."""
        payload = body.model_copy(update={"hops": hops + 1}).model_dump_json().encode()
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
            body = parse(BlockRead, json.loads(msg.data), "read")
            wc = self.writes.get(body.key)
            length = min(body.length, wire.MAX_CHUNK)
            reply = wire.ok(wc.read(body.offset, length))
        except RemoteError as e:
            reply = wire.fail(str(e), e.kind)
        except WriteCacheError as e:
            reply = wire.fail(str(e), e.kind)
        except (ValueError, KeyError, OSError) as e:
            reply = wire.fail(f"bad read: {e}", "invalid")
        await respond(msg, reply, mark)

    def views(self) -> list[dict[str, Any]]:
        return [{**wc.view(), "node": self.node} for wc in self.writes.caches.values()]

    async def wc_list(self, _body: Any, _msg: Msg) -> dict[str, Any]:
        return {"node": self.node, "caches": self.views()}


def map_page(wc: SessionWriteCache, first: int) -> dict[str, Any]:
    """Up to MAP_PAGE_RUNS runs of a cache's map from block ``first``, and where the next
    page starts (None: that was the last)."""
    runs = wc.state.nonclean_runs(first, wire.MAP_PAGE_RUNS + 1)
    more = runs[-2][2] if len(runs) > wire.MAP_PAGE_RUNS else None
    return {"runs": encode_runs(runs[: wire.MAP_PAGE_RUNS]), "more_from": more}


class _NotAlive(Exception):
    """No cache node answers on that node's subjects."""
