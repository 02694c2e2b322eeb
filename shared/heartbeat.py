"""Heartbeats: each service instance puts its vital signs into a JetStream KV bucket.

``streamboot status`` and the registry's stream-node placement read the bucket; an entry
older than the timeout means the instance is dead (the bucket's TTL also sweeps it away).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from shared.bus import HEARTBEAT_BUCKET, key_value_bucket

log = logging.getLogger("streamboot.heartbeat")

VERSION = "0.1.0"


async def heartbeat_bucket(js: JetStreamContext, ttl_s: float = 60.0) -> KeyValue:
    return await key_value_bucket(js, HEARTBEAT_BUCKET, ttl_s)


class Heartbeat:
    """Publishes ``{service, node, version, pid, started_at, uptime_s, load, ...}`` periodically.

    ``vitals`` returns the service-specific part (load, endpoints, counters)."""

    def __init__(
        self,
        js: JetStreamContext,
        service: str,
        node_id: str,
        interval_s: float,
        vitals: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._js = js
        self.service = service
        self.node_id = node_id
        self.interval_s = interval_s
        self._vitals = vitals or dict
        self._started = time.time()
        self._kv: KeyValue | None = None

    @property
    def key(self) -> str:
        return f"{self.service}.{self.node_id}".replace(":", "_")

    def payload(self) -> dict[str, Any]:
        now = time.time()
        return {
            "service": self.service,
            "node": self.node_id,
            "version": VERSION,
            "pid": os.getpid(),
            "started_at": self._started,
            "at": now,
            "uptime_s": round(now - self._started, 1),
            "load": 0,
            **self._vitals(),
        }

    async def beat(self) -> None:
        if self._kv is None:
            self._kv = await heartbeat_bucket(self._js)
        await self._kv.put(self.key, json.dumps(self.payload()).encode())

    async def run(self) -> None:
        while True:
            try:
                await self.beat()
            except Exception as exc:
                log.warning("%s: heartbeat not sent (%s)", self.service, exc)
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        """Say goodbye so status shows the instance gone at once."""
        try:
            if self._kv is not None:
                await self._kv.delete(self.key)
        except Exception:
            pass


async def read_heartbeats(js: JetStreamContext, timeout_s: float) -> list[dict[str, Any]]:
    """Every instance's last heartbeat, each with ``alive`` decided by its age."""
    try:
        kv = await js.key_value(HEARTBEAT_BUCKET)
        keys = await kv.keys()
    except (BucketNotFoundError, NoKeysError):
        return []
    now = time.time()
    out = []
    for key in keys:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            continue
        if not entry.value:
            continue
        beat = json.loads(entry.value)
        beat["alive"] = now - beat.get("at", 0) <= timeout_s
        out.append(beat)
    return out
