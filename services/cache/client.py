"""The stream node's side of the cache service: batched, pipelined block requests over NATS.

Used by the stream's remote layers (``services/stream/path/remote_write_cache.py`` and
``cached_store.py``). Writes of all sessions go out as batches (several records per
message, several messages in flight per session), so a burst of small writes costs a few
round trips, not one each; order is kept because one NATS connection delivers a
publisher's messages in order and the cache applies one subject's messages in order.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from services.cache import wire

log = logging.getLogger("streamboot.cache.client")


class CacheClient:
    def __init__(self, nc: NATS, *, timeout_s: float = 10.0, depth: int = 8) -> None:
        self.nc = nc
        self.timeout_s = timeout_s
        self.depth = depth

    async def _request(self, subject: str, payload: bytes) -> bytes:
        try:
            msg = await self.nc.request(subject, payload, timeout=self.timeout_s)
        except NoRespondersError as e:
            raise wire.CacheError(errno.EIO, "cache service not running (no responders)") from e
        except NatsTimeoutError as e:
            raise wire.CacheError(errno.EIO, f"cache service: no reply in {self.timeout_s}s") from e
        return msg.data

    async def request_json(self, subject: str, body: dict[str, Any]) -> Any:
        reply = json.loads(await self._request(subject, json.dumps(body).encode()) or b"null")
        if isinstance(reply, dict) and "error" in reply:
            kind = reply.get("kind", "error")
            code = errno.ESTALE if kind == "not_found" else errno.EIO
            raise wire.CacheError(code, f"cache service: {reply['error']}", kind)
        return reply

    async def request_bytes(self, subject: str, body: dict[str, Any]) -> bytes:
        return wire.unwrap(await self._request(subject, json.dumps(body).encode()))

    def writer(self, key: str) -> WriteChannel:
        return WriteChannel(self, key)


class WriteChannel:
    """One cache key's ordered, batched, pipelined stream of write records."""

    def __init__(self, client: CacheClient, key: str) -> None:
        self.client = client
        self.prefix = wire.batch_prefix(key)
        self.key = key
        self._queue: list[tuple[bytes, bytes | None, asyncio.Future[None]]] = []
        self._inflight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(
        self, op: int, offset: int, length: int, data: bytes | None = None, sync: bool = False
    ) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        head = wire.RECORD.pack(op, wire.FLAG_SYNC if sync else 0, offset, length)
        self._queue.append((head, data, fut))
        if not self._scheduled and self._inflight < self.client.depth:
            # call_soon: records submitted in the same loop turn share one message.
            self._scheduled = True
            loop.call_soon(self._send)
        return fut

    def _send(self) -> None:
        self._scheduled = False
        while self._queue and self._inflight < self.client.depth:
            parts = [self.prefix]
            size = len(self.prefix)
            futs = []
            while self._queue:
                head, data, fut = self._queue[0]
                n = len(head) + (len(data) if data else 0)
                if futs and size + n > wire.MAX_MESSAGE:
                    break
                self._queue.pop(0)
                parts.append(head)
                if data:
                    parts.append(data)
                size += n
                futs.append(fut)
            self._inflight += 1
            task = asyncio.get_running_loop().create_task(self._request(b"".join(parts), futs))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _request(self, payload: bytes, futs: list[asyncio.Future[None]]) -> None:
        try:
            reply = await self.client._request(wire.WC_WRITE, payload)
            if len(reply) != len(futs):
                raise wire.CacheError(errno.EIO, f"cache service: {reply[:200]!r}")
            for fut, status in zip(futs, reply, strict=True):
                if fut.done():
                    continue
                if status == 0:
                    fut.set_result(None)
                else:
                    fut.set_exception(_status_error(status, self.key))
        except Exception as e:
            err = e if isinstance(e, OSError) else OSError(errno.EIO, f"cache service: {e}")
            log.error("write cache %s: batch of %d records failed: %s", self.key, len(futs), err)
            for fut in futs:
                if not fut.done():
                    fut.set_exception(err)
        finally:
            self._inflight -= 1
            if self._queue and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._send)


def _status_error(status: int, key: str) -> OSError:
    if status == errno.ENOSPC:
        return OSError(errno.ENOSPC, f"write cache {key} is full")
    if status == errno.ESTALE:
        return OSError(errno.EIO, f"write cache {key} was dropped by the cache service")
    return OSError(status, f"write cache {key}: {errno.errorcode.get(status, status)}")
