"""The stream node's side of the cache service: batched, pipelined block requests over NATS.

Used by the stream's remote layers (``services/stream/path/remote_write_cache.py`` and
``cached_store.py``) and the registry's ``vdisk commit``. Writes of all sessions go out as
batches (several records per message, several messages in flight per session), so a burst
of small writes costs a few round trips, not one each; order is kept because one NATS
connection delivers a publisher's messages in order and the cache applies one subject's
messages in order.

A write cache lives on one cache node: :meth:`CacheClient.open_write_cache` asks any cache
node (queue group), which routes the open to the holder and says which node that is; from
then on the session's writes and reads go to that node's own subjects
(``wire.node_subject``), never through the queue group, so no request of a session
lands on a node that does not hold its cache. A node that is gone answers nothing there
(``no responders``): the error names it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from shared.block_map import Run, decode_runs
from shared.bus import Requests
from shared.contracts.cache import wire
from shared.contracts.cache.wire import node_subject

log = logging.getLogger("streamboot.cache.client")


def not_alive(node: str, key: str | None) -> str:
    if key is None:
        return f"cache node {node} is not alive"
    return f"cache node {node} holding write cache {key} is not alive"


@dataclass
class OpenedWriteCache:
    """A write cache as ``wc.open`` found it: the node holding it, its dirty and zeroed
    block runs (none for a cache never written)."""

    key: str
    node: str
    blocks: int
    runs: list[Run]
    used: int
    capacity: int
    # The node process that answered, and whether an fsync covers every change it holds
    # (if not, what the runs say may be lost should its machine restart).
    incarnation: bytes = b""
    synced: bool = True


class CacheClient:
    def __init__(self, nc: NATS, *, timeout_s: float = 10.0, depth: int = 8) -> None:
        self.nc = nc
        self.timeout_s = timeout_s
        self.depth = depth
        self._requests: Requests | None = None  # on first use (some tests pass no nc)

    async def _request(
        self,
        subject: str,
        payload: bytes,
        *,
        node: str | None = None,
        key: str | None = None,
        timeout_s: float | None = None,
    ) -> bytes:
        """One request; with ``node``, a request to that node's own subject (``key``: the
        write cache it is about, for the error message). Errors are :class:`CacheError`;
        those of kind ``not_alive``, ``timeout`` and ``bus`` may pass (``transient``)."""
        if self._requests is None:
            self._requests = Requests(self.nc)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            msg = await self._requests.request(subject, payload, timeout_s)
        except NoRespondersError as e:
            if node is not None:
                raise wire.CacheError(errno.EIO, not_alive(node, key), "not_alive") from e
            raise wire.CacheError(
                errno.EIO, "cache service not running (no responders)", "not_alive"
            ) from e
        except NatsTimeoutError as e:
            who = f"cache node {node}" if node is not None else "cache service"
            raise wire.CacheError(errno.EIO, f"{who}: no reply in {timeout_s}s", "timeout") from e
        except NatsError as e:  # not connected to NATS (reconnecting, closed)
            raise wire.CacheError(errno.EIO, f"cache service: NATS: {e}", "bus") from e
        return msg.data

    async def request_json(
        self, subject: str, body: dict[str, Any], *, node: str | None = None
    ) -> Any:
        payload = json.dumps(body).encode()
        reply = json.loads(await self._request(subject, payload, node=node) or b"null")
        if isinstance(reply, dict) and "error" in reply:
            kind = reply.get("kind", "error")
            code = errno.ESTALE if kind == "not_found" else errno.EIO
            raise wire.CacheError(code, f"cache service: {reply['error']}", kind)
        return reply

    async def request_bytes(self, subject: str, body: dict[str, Any]) -> bytes:
        return wire.unwrap(await self._request(subject, json.dumps(body).encode()))

    async def open_write_cache(self, body: dict[str, Any]) -> OpenedWriteCache:
        """Open (or find again) the write cache ``body["key"]`` wherever it lives; its map
        comes with the open's reply, the rest of a long one page by page from its node."""
        key = str(body["key"])
        reply = await self.request_json(wire.WC_OPEN, body)
        node, blocks = str(reply["node"]), int(reply["blocks"])
        page, runs = reply, []
        while True:
            try:
                runs.extend(decode_runs(page["runs"], blocks))
            except ValueError as e:
                raise wire.CacheError(errno.EIO, f"write cache {key}: bad block map: {e}") from e
            more = page.get("more_from")
            if more is None:
                break
            if runs and int(more) < runs[-1][2]:
                raise wire.CacheError(errno.EIO, f"write cache {key}: map pages go backwards")
            subject = node_subject(node, wire.V_WC_MAP)
            page = await self.request_json(subject, {"key": key, "from": int(more)}, node=node)
        return OpenedWriteCache(
            key=key,
            node=node,
            blocks=blocks,
            runs=runs,
            used=int(reply.get("used", 0)),
            capacity=int(reply.get("capacity", 0)),
            incarnation=bytes.fromhex(str(reply.get("incarnation", ""))),
            synced=bool(reply.get("synced", True)),
        )

    async def read_write_cache(self, node: str, key: str, offset: int, length: int) -> bytes:
        """Blocks of the write cache ``key`` from the node holding it."""
        body = json.dumps({"key": key, "offset": offset, "length": length}).encode()
        subject = node_subject(node, wire.V_WC_READ)
        return wire.unwrap(await self._request(subject, body, node=node, key=key))

    def writer(self, key: str, node: str, writer: str = "") -> WriteChannel:
        return WriteChannel(self, key, node, writer)


@dataclass
class Gathered:
    """The answers of a scatter-gather: one per node that answered in time."""

    replies: dict[str, Any] = field(default_factory=dict)  # node -> its answer
    missing: set[str] = field(default_factory=set)  # expected nodes that did not answer


async def gather(
    nc: NATS,
    subject: str,
    body: Any,
    *,
    expect: Collection[str] | None = None,
    timeout_s: float = 1.0,
) -> Gathered:
    """Ask every cache node (a subject with no queue group) and collect their answers.

    Returns once every node of ``expect`` (the live cache nodes, by their heartbeats) has
    answered, else after ``timeout_s`` with what came. Each answer carries its ``node``.
    No cache node at all (NATS says no responders): :class:`wire.CacheError`."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    out = Gathered()
    want = set(expect or ())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        await nc.publish(subject, json.dumps(body).encode(), reply=inbox)
        while not want or not want <= out.replies.keys():
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=left)
            except NatsTimeoutError:
                break
            if msg.headers and msg.headers.get("Status") == "503":
                raise wire.CacheError(errno.EIO, "cache service not running (no responders)")
            reply = json.loads(msg.data or b"null")
            if isinstance(reply, dict) and reply.get("node") is not None:
                out.replies[str(reply["node"])] = reply
    finally:
        await sub.unsubscribe()
    out.missing = want - out.replies.keys()
    return out


async def list_write_caches(
    nc: NATS, expect: Collection[str] | None = None, timeout_s: float = 1.0
) -> Gathered:
    """``wc.list`` of every cache node: ``replies[node]["caches"]`` (each with its node)."""
    started = time.monotonic()
    got = await gather(nc, wire.WC_LIST, {}, expect=expect, timeout_s=timeout_s)
    if got.missing:
        log.warning(
            "write caches: no answer from cache node(s) %s in %.1fs",
            ", ".join(sorted(got.missing)),
            time.monotonic() - started,
        )
    return got


async def all_write_caches(
    nc: NATS, expect: Collection[str] | None = None, timeout_s: float = 1.0
) -> tuple[list[dict[str, Any]], bool]:
    """Every write cache of every cache node (each with its ``node``), and whether every
    expected node answered. No node answering at all: :class:`wire.CacheError`."""
    got = await list_write_caches(nc, expect, timeout_s)
    if not got.replies:
        raise wire.CacheError(errno.EIO, f"no cache node answered in {timeout_s}s")
    caches = [c for r in got.replies.values() for c in r.get("caches", [])]
    return caches, not got.missing


class WriteChannel:
    """One cache key's ordered, batched, pipelined stream of write records."""

    def __init__(self, client: CacheClient, key: str, node: str, writer: str = "") -> None:
        self.client = client
        # writer: this stream process (CacheLink.instance); the node refuses batches of a
        # process the cache was not last attached by.
        self.prefix = wire.batch_prefix(key, writer)
        # The node process that answered last; a change means it restarted: on_restart.
        self.incarnation = b""
        self.on_restart: Callable[[], None] | None = None
        self.key = key
        # The node holding the cache: its own subject, not the queue group.
        self.node = node
        self.subject = node_subject(node, wire.V_WC_WRITE)
        # A deque: a burst of small writes queues thousands of records, taken from the front.
        self._queue: deque[tuple[bytes, bytes | None, asyncio.Future[None]]] = deque()
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

    async def probe(self, timeout_s: float) -> None:
        """A batch of no records: answered once the node is there (CacheError when it is
        not). The node answers in order, so a batch sent before the probe and still
        unanswered after it was lost (sent to a process that died): it fails now, as
        transient, instead of at its timeout."""
        older = [t for t in self._tasks if not t.done()]
        reply = await self.client._request(
            self.subject, self.prefix, node=self.node, key=self.key, timeout_s=timeout_s
        )
        self._answered_by(reply[: wire.INCARNATION])
        # Each of them has started by now (a task takes its first step in the loop turn
        # after it was made; this answer came in a later one), so a cancelled one answers
        # its records.
        for task in older:
            task.cancel()

    def _answered_by(self, incarnation: bytes) -> None:
        if incarnation == self.incarnation:
            return
        restarted = bool(self.incarnation)
        self.incarnation = incarnation
        if restarted and self.on_restart is not None:
            self.on_restart()

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
                self._queue.popleft()
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
            reply = await self.client._request(self.subject, payload, node=self.node, key=self.key)
            statuses = reply[wire.INCARNATION :]
            if len(statuses) != len(futs):
                raise wire.CacheError(errno.EIO, f"cache service: {reply[:200]!r}")
            # Before the records are answered: a FLUSH among them learns of a restart.
            self._answered_by(reply[: wire.INCARNATION])
            for fut, status in zip(futs, statuses, strict=True):
                if fut.done():
                    continue
                if status == 0:
                    fut.set_result(None)
                else:
                    fut.set_exception(_status_error(status, self.key))
        except asyncio.CancelledError:  # by probe(): this batch was lost
            lost = wire.CacheError(
                errno.EIO, f"cache node {self.node}: no answer to a batch (lost)", "not_alive"
            )
            for fut in futs:
                if not fut.done():
                    fut.set_exception(lost)
        except Exception as e:
            err = e if isinstance(e, OSError) else OSError(errno.EIO, f"cache service: {e}")
            # A node away is logged once by whoever rides it out (remote_write_cache.py).
            level = logging.DEBUG if wire.transient(err) else logging.ERROR
            log.log(
                level, "write cache %s: batch of %d records failed: %s", self.key, len(futs), err
            )
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
        # Dropped (the session closed), or not held by a node process that restarted
        # before the cache had files: the writer tells them apart (remote_write_cache.py).
        return wire.CacheError(
            errno.EIO, f"write cache {key} was dropped by the cache service", "dropped"
        )
    if status == errno.EBUSY:
        return OSError(
            errno.EIO, f"write cache {key} is attached by another stream process (session moved)"
        )
    return OSError(status, f"write cache {key}: {errno.errorcode.get(status, status)}")
