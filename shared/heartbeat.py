"""Heartbeats: each service instance puts its vital signs into a JetStream KV bucket.

``streamboot status`` reads the bucket once (:func:`read_heartbeats`); the registry keeps a
:class:`HeartbeatView` of it for placement and its sweeper. An entry older than the timeout
means the instance is dead (the bucket's TTL also sweeps it away).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue

from shared.bus import HEARTBEAT_BUCKET, follow_forever, key_value_bucket

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


def _beat(value: bytes | None, now: float, timeout_s: float) -> dict[str, Any] | None:
    """A heartbeat entry's value with ``alive`` decided by its age; None for a deleted or
    unreadable one (the bucket is writable by every service: its values are not trusted)."""
    if not value:
        return None
    try:
        beat = json.loads(value)
        at = float(beat.get("at", 0))
    except (ValueError, TypeError, AttributeError):
        return None
    if not isinstance(beat.get("service"), str) or not isinstance(beat.get("node"), str):
        return None
    beat["alive"] = now - at <= timeout_s
    return beat


async def read_heartbeats(js: JetStreamContext, timeout_s: float) -> list[dict[str, Any]]:
    """Every instance's last heartbeat, each with ``alive`` decided by its age.

    For one-shot readers (``status``, ``up``): the keys come from the stream's subject list
    and each value from a direct get, so no JetStream consumer is created (``kv.keys()``
    makes one per call, which lives minutes). A long-running reader keeps a
    :class:`HeartbeatView` instead."""
    try:
        kv = await js.key_value(HEARTBEAT_BUCKET)
        info = await js.stream_info(_stream(HEARTBEAT_BUCKET), subjects_filter=">")
    except BucketNotFoundError:
        return []
    prefix = _prefix(HEARTBEAT_BUCKET)
    now = time.time()
    out = []
    for subject in info.state.subjects or {}:
        try:
            entry = await kv.get(subject.removeprefix(prefix))
        except (KeyNotFoundError, KeyDeletedError):
            continue
        beat = _beat(entry.value, now, timeout_s)
        if beat is not None:
            out.append(beat)
    return out


def _stream(bucket: str) -> str:
    return f"KV_{bucket}"


def _prefix(bucket: str) -> str:
    return f"$KV.{bucket}."


class HeartbeatsUnavailable(Exception):
    """The view cannot vouch for the heartbeats right now (not loaded yet, or its watch
    went silent and is being made again)."""


class HeartbeatView:
    """Every instance's last heartbeat, in memory, kept current by one watch of the bucket.

    What a long-running process reads on its hot paths (the registry places each session
    by it): a read is a dict walk, with no request to NATS. The watch is one JetStream
    consumer for the process's life. When the watch goes quiet for ``timeout_s / 2`` the
    stream's last sequence is asked (no consumer): if the bucket moved on without this
    view (NATS restarted, its store lost, the consumer gone), the watch is made again and
    the view rebuilt from the current values. :meth:`read` refuses to answer once the view
    has gone ``timeout_s`` without being confirmed current: a stale view would call live
    instances dead.
    """

    # A watch that its process stopped following is dropped by the server after this long.
    INACTIVE_THRESHOLD_S = 30.0

    def __init__(self, js: JetStreamContext, timeout_s: float) -> None:
        self._js = js
        self.timeout_s = timeout_s
        self._values: dict[str, bytes] = {}
        self._revision = 0  # the last stream sequence this view applied
        self._confirmed = 0.0  # monotonic time the view was last known current
        self._loaded = asyncio.Event()

    def read_now(self) -> list[dict[str, Any]]:
        """The heartbeats as last seen; raises :class:`HeartbeatsUnavailable` if the view
        is not known to be current."""
        if not self._loaded.is_set():
            raise HeartbeatsUnavailable("the heartbeats are not loaded yet")
        if time.monotonic() - self._confirmed > self.timeout_s:
            raise HeartbeatsUnavailable("the heartbeat watch is silent; watching again")
        now = time.time()
        return [b for v in self._values.values() if (b := _beat(v, now, self.timeout_s))]

    async def read(self) -> list[dict[str, Any]]:
        """:meth:`read_now` for callers that take an awaitable source."""
        return self.read_now()

    async def wait_loaded(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._loaded.wait(), timeout_s)

    async def run(self) -> None:
        """Follow the bucket forever (watching again after any failure)."""
        await follow_forever(self._follow, "heartbeats: the watch", 0.5)

    async def _follow(self) -> None:
        kv = await heartbeat_bucket(self._js)
        watcher = await kv.watchall(inactive_threshold=self.INACTIVE_THRESHOLD_S)
        self._revision = 0  # this watch's own: a stream made anew starts its sequence again
        fresh: dict[str, bytes] | None = {}  # the initial values, until their end marker
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=self.timeout_s / 2)
                except NatsTimeoutError:
                    if fresh is not None or not await self._current():
                        log.warning("heartbeats: the watch fell behind the bucket; watching again")
                        return
                    continue
                if entry is KeyValue.KeyWatcher.STOP_ITER:
                    return
                if entry is None:  # the end of the initial values: the view is whole
                    self._values, fresh = fresh or {}, None
                    self._confirmed = time.monotonic()
                    self._loaded.set()
                    continue
                values = self._values if fresh is None else fresh
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    values.pop(entry.key, None)
                else:
                    values[entry.key] = entry.value
                self._revision = max(self._revision, entry.revision or 0)
                if fresh is None:
                    self._confirmed = time.monotonic()
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _current(self) -> bool:
        """Whether the bucket holds nothing newer than what this view applied (asked of the
        stream, which makes no consumer)."""
        try:
            info = await asyncio.wait_for(
                self._js.stream_info(_stream(HEARTBEAT_BUCKET)), self.timeout_s / 2
            )
        except Exception as exc:
            log.info("heartbeats: cannot check the watch (%s)", exc)
            return False
        if info.state.last_seq != self._revision:
            # Newer entries not delivered, or an older sequence (the stream was made anew).
            return False
        self._confirmed = time.monotonic()
        return True
