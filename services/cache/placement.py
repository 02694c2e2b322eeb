"""Which cache node holds which write cache, with several cache nodes.

A write cache lives on one cache node (its files are under that node's DATA_DIR, or its
``/dev/shm``), so every request about it must reach that node. Three pieces:

- **Per-node subjects**: every cache node also answers ``streamboot.cache.node.<node>.*``
  (:func:`node_subject`), alone (no queue group). A session talks to its cache's node
  through them for its whole life; ``no responders`` there means that node is not alive.
- **The owner record**: the NATS KV bucket ``streamboot_cache_owners`` maps a cache key to
  the node holding it. A node writes it when it creates a cache (``create``: if two nodes
  try for one key, one wins and the other forwards to it) and again when it recovers its
  caches on start; the holder deletes it when it drops a ``discard`` cache. No TTL: a kept
  cache's record lives as long as the cache.
- **Placement of a new key**: rendezvous hashing (:func:`rank`) over the live cache nodes
  (their heartbeats, :class:`Peers`): stable per key while the set of nodes is, so a kept
  cache's next boot usually reaches its holder without a hop, and spread evenly. A node
  whose heartbeat says it is short of space for that kind of cache comes after every node
  with room (:func:`placement_order`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import (
    APIError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KeyValue

from shared.bus import HEARTBEAT_BUCKET, follow_forever, key_value_bucket, subject_token

log = logging.getLogger("streamboot.cache.placement")

OWNERS_BUCKET = "streamboot_cache_owners"


def score(key: str, node: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{node}\0{key}".encode(), digest_size=8).digest())


def rank(key: str, nodes: Iterable[str]) -> list[str]:
    """The nodes by preference for ``key`` (rendezvous hashing: highest score first)."""
    return sorted(set(nodes), key=lambda n: score(key, n), reverse=True)


def placement_order(key: str, nodes: Iterable[str], has_room: Callable[[str], bool]) -> list[str]:
    """Where a new write cache ``key`` goes: the nodes with room by rank, then the others
    (a node short of space takes new caches only when no node with room is alive)."""
    ranked = rank(key, nodes)
    room = {n: has_room(n) for n in ranked}
    return [n for n in ranked if room[n]] + [n for n in ranked if not room[n]]


@dataclass
class Owner:
    node: str
    revision: int
    record: dict[str, Any]


class Owners:
    """The owner records of write caches (KV bucket :data:`OWNERS_BUCKET`)."""

    def __init__(self, kv: KeyValue, node: str) -> None:
        self.kv = kv
        self.node = node

    @classmethod
    async def open(cls, js: JetStreamContext, node: str) -> Owners:
        return cls(await key_value_bucket(js, OWNERS_BUCKET, 0), node)

    async def get(self, key: str) -> Owner | None:
        try:
            entry = await self.kv.get(subject_token(key))
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if not entry.value:
            return None
        record = json.loads(entry.value)
        return Owner(str(record["node"]), int(entry.revision or 0), record)

    async def claim(self, key: str, meta: dict[str, Any]) -> Owner:
        """Record this node as the holder of ``key`` unless some node already is; returns the
        owner after the call (this node, or the one that got there first)."""
        record = {
            "node": self.node,
            "key": key,
            "persistence": meta.get("persistence"),
            "kind": meta.get("kind"),
            "since": time.time(),
        }
        for _ in range(5):
            try:
                rev = await self.kv.create(subject_token(key), json.dumps(record).encode())
                return Owner(self.node, rev, record)
            except KeyWrongLastSequenceError:
                owner = await self.get(key)  # someone holds it (or just deleted it: retry)
                if owner is not None:
                    return owner
        raise OSError(f"cannot record the owner of write cache {key}: the record keeps changing")

    async def mark_written(self, key: str) -> None:
        """Note in this node's record that the cache has data (its files exist): from then
        on, this node not holding it means its files were lost, not that it never wrote."""
        owner = await self.get(key)
        if owner is None or owner.node != self.node or owner.record.get("written"):
            return
        record = {**owner.record, "written": True}
        with contextlib.suppress(KeyWrongLastSequenceError):
            await self.kv.update(
                subject_token(key), json.dumps(record).encode(), last=owner.revision
            )

    async def release(self, key: str) -> None:
        """Delete the record of a dropped cache, if it is still this node's."""
        owner = await self.get(key)
        if owner is None or owner.node != self.node:
            return
        try:
            await self.kv.delete(subject_token(key), last=owner.revision)
        except APIError as e:
            if e.err_code not in (10071, 10164):  # not "changed meanwhile": a real failure
                raise


class Peers:
    """The cache nodes alive now, from their heartbeats (a watch on ``cache.>``)."""

    def __init__(self, js: JetStreamContext, node: str, timeout_s: float) -> None:
        self.js = js
        self.node = node
        self.timeout_s = timeout_s
        self.beats: dict[str, float] = {}  # node -> time of its last heartbeat
        # node -> {cache kind: whether it has room for new write caches}, from its heartbeat
        self.room: dict[str, dict[str, bool]] = {}

    def alive(self) -> list[str]:
        now = time.time()
        live = {n for n, at in self.beats.items() if now - at <= self.timeout_s}
        return sorted(live | {self.node})

    def has_room(self, node: str, kind: str) -> bool:
        """Whether ``node`` said it has room for a new ``kind`` write cache (yes if it
        never said: older nodes do not)."""
        return self.room.get(node, {}).get(kind, True)

    async def run(self) -> None:
        """Follow the heartbeat bucket forever (watching again after an error)."""
        await follow_forever(self._follow, "cache peers: the heartbeat watch", 1.0)

    async def _follow(self) -> None:
        kv = await key_value_bucket(self.js, HEARTBEAT_BUCKET, 60.0)
        watcher = await kv.watch("cache.>")
        try:
            while True:
                # This node's own heartbeat is among the keys: silence this long means the
                # watch is gone (e.g. JetStream restarted): watch again.
                entry = await watcher.updates(timeout=max(10.0, 3 * self.timeout_s))
                if entry is KeyValue.KeyWatcher.STOP_ITER:
                    break
                if entry is not None:  # None: the end of the initial values
                    self._apply(entry.key, entry.value, entry.operation)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    def _apply(self, key: str, value: bytes | None, op: str | None) -> None:
        if op in ("DEL", "PURGE") or not value:
            # The heartbeat's key (shared/heartbeat.py): ``cache.<node>``, ":" as "_".
            self.beats = {
                n: at for n, at in self.beats.items() if f"cache.{n}".replace(":", "_") != key
            }
            return
        try:
            beat = json.loads(value)
            node = str(beat["node"])
            self.beats[node] = float(beat.get("at", 0))
            room = beat.get("room")
            if isinstance(room, dict):
                self.room[node] = {str(k): bool(v) for k, v in room.items()}
        except (ValueError, KeyError, TypeError):
            pass
