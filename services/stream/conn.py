"""What NBD and HTTP connections share: socket options, buffered reads, flow control, and a
watchdog that ends idle, stalled or never-finishing connections.

Connections are plain ``asyncio.Protocol`` objects (uvloop underneath), not streams: the NBD
transmission phase parses requests straight out of the receive buffer in
``data_received``, with no coroutine per request on the hot path. Handshakes, being rare,
are coroutines (:meth:`Connection.run`) reading through :meth:`read_exact`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine
from typing import Any, Literal

from services.stream.sessions import Session, SessionManager
from services.stream.settings import StreamSettings
from shared import metrics

log = logging.getLogger(__name__)

# Reply bytes we let the transport buffer before we stop reading requests (backpressure).
WRITE_HIGH = 8 * 1024 * 1024
WRITE_LOW = 2 * 1024 * 1024


def dead_peer_after_s(s: StreamSettings) -> int:
    """Seconds after which a silent peer is declared gone by the kernel."""
    return s.keepalive_idle_s + s.keepalive_interval_s * s.keepalive_count


def tune_socket(sock: socket.socket | None, s: StreamSettings) -> None:
    """TCP keepalive and a user timeout, so a vanished client is noticed by the kernel."""
    if sock is None:
        return
    opts = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, s.keepalive_idle_s),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, s.keepalive_interval_s),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, s.keepalive_count),
        # Linux lets TCP_USER_TIMEOUT override the keepalive probe count, so it must be the
        # same dead-peer budget, or a powered-off client would be kept for the stall timeout.
        (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000 * dead_peer_after_s(s)),
    ]
    for level, name, value in opts:
        try:
            sock.setsockopt(level, name, value)
        except OSError:
            log.debug("setsockopt(%s, %s) failed", level, name)


class Connection(asyncio.Protocol):
    protocol_name: Literal["nbd", "http", "iscsi"] = "nbd"

    def __init__(self, mgr: SessionManager) -> None:
        self.mgr = mgr
        self.settings = mgr.settings
        self.buf = bytearray()
        # The client address counted in mgr.handshakes until the session is attached.
        self._in_handshake: str | None = None
        self._over_cap = False
        self.session: Session | None = None
        self.bytes_read = 0
        self.bytes_written = 0
        # The node's Prometheus byte counters (shared/metrics.py) of this protocol.
        self._read_tally = metrics.bytes_counter(self.protocol_name, "read")
        self._write_tally = metrics.bytes_counter(self.protocol_name, "write")
        self.inflight = 0
        self.closed = False
        self.reason = "disconnect"
        self.peer = "?"
        self._want = 0
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._paused_since: float | None = None
        self._drainers: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._batch: list[Any] | None = None  # buffers and [fd, offset, count] pieces
        self.zero_copy = False
        self._batch_files = False

    @property
    def session(self) -> Session | None:
        return self._session

    @session.setter
    def session(self, session: Session | None) -> None:
        self._session = session
        if session is not None:
            self._handshake_over()

    def _handshake_over(self) -> None:
        if self._in_handshake is not None:
            self.mgr.handshakes.release(self)
            self._in_handshake = None

    def count_read(self, n: int) -> None:
        """``n`` bytes sent to the client: its SessionDetached, and the node's metrics."""
        self.bytes_read += n
        self._read_tally.inc(n)

    def count_written(self, n: int) -> None:
        self.bytes_written += n
        self._write_tally.inc(n)

    # --- transport callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        # A RawTransport can send file pieces (sendfile) in order with buffers.
        self.zero_copy = hasattr(transport, "send_items")
        self.loop = asyncio.get_running_loop()
        tune_socket(transport.get_extra_info("socket"), self.settings)
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        host = str(peer[0]) if peer else "?"
        if not self.mgr.handshakes.admit(self, host, self._shed):
            self._over_cap = self.closed = True
            transport.abort()
            return
        self._in_handshake = host
        self.mgr.connections.add(self)
        self.started = self.last = self.loop.time()
        s = self.settings
        spans = [t for t in (s.idle_timeout_s, s.stall_timeout_s, s.handshake_timeout_s) if t > 0]
        self._period = min(5.0, max(0.05, min(spans, default=20.0) / 4))
        self._watch = self.loop.call_later(self._period, self._watchdog)
        self.spawn(self._main())

    def data_received(self, data: bytes) -> None:
        self.last = self.loop.time()
        self.mgr.busy_poll.touch(self.loop)
        self.buf += data
        if self._waiter is not None and len(self.buf) >= self._want:
            self._wake()
        elif self._waiter is None:
            self.on_data()

    def on_data(self) -> None:
        """Bytes came that no ``read_exact`` waits for: a protocol that parses its requests
        straight out of ``buf`` (NBD transmission, iSCSI full feature phase) does it here."""

    def eof_received(self) -> bool:
        self._eof = True
        self._wake(ConnectionResetError("peer closed"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._over_cap:  # never started: nothing to undo
            return
        self._handshake_over()
        self.closed = True
        self.mgr.connections.discard(self)
        self._watch.cancel()
        self._wake(ConnectionResetError("connection lost"))
        for t in list(self._tasks):
            t.cancel()
        for d in self._drainers:
            if not d.done():
                d.set_exception(ConnectionResetError("connection lost"))
        self._drainers.clear()
        session, self.session = self.session, None
        if session is not None:
            session.conns.discard(self)
            self.mgr.detached(
                session,
                self.protocol_name,
                self.peer,
                self.bytes_read,
                self.bytes_written,
                self.reason,
            )
            self.mgr.release(session)

    def pause_writing(self) -> None:
        # The client does not keep up reading replies: stop taking its requests.
        self._paused_since = self.loop.time()
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused_since = None
        if not self.closed:
            self.transport.resume_reading()
        for d in self._drainers:
            if not d.done():
                d.set_result(None)
        self._drainers.clear()

    # --- helpers for subclasses ----------------------------------------------------------

    async def drain(self) -> None:
        if self._paused_since is not None and not self.closed:
            fut = self.loop.create_future()
            self._drainers.append(fut)
            await fut
        if self.closed:
            raise ConnectionResetError("connection lost")

    def _wake(self, exc: Exception | None = None) -> None:
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            if exc is None:
                w.set_result(None)
            else:
                w.set_exception(exc)

    async def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            if self.closed or self._eof:
                raise ConnectionResetError("peer closed")
            self._want = n
            self._waiter = self.loop.create_future()
            await self._waiter

    async def read_exact(self, n: int) -> bytes:
        await self._fill(n)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_until(self, sep: bytes, limit: int) -> bytes:
        while (i := self.buf.find(sep)) < 0:
            if len(self.buf) > limit:
                raise ValueError("request head too long")
            await self._fill(len(self.buf) + 1)
        data = bytes(self.buf[: i + len(sep)])
        del self.buf[: i + len(sep)]
        return data

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def write(self, data: bytes | bytearray) -> None:
        if self._batch is not None:
            self._batch.append(data)
        elif not self.closed:
            self.transport.write(data)

    def write_file(self, fd: int, offset: int, count: int) -> None:
        """Send file bytes without copying them through Python (zero-copy transports only)."""
        item = [fd, offset, count]
        if self._batch is not None:
            self._batch.append(item)
            self._batch_files = True
        elif not self.closed:
            self.transport.send_items([item])  # type: ignore[attr-defined]

    def begin_batch(self) -> None:
        """Collect replies until :meth:`end_batch`: one ``writev`` instead of a send each."""
        self._batch = []
        self._batch_files = False

    def end_batch(self) -> None:
        batch, self._batch = self._batch, None
        if batch and not self.closed:
            if self.zero_copy:
                self.transport.send_items(batch, self._batch_files)  # type: ignore[attr-defined]
            else:
                self.transport.writelines(batch)

    def close(self, reason: str | None = None) -> None:
        if reason:
            self.reason = reason
        if not self.closed:
            self.transport.close()

    def _shed(self) -> None:
        """Closed in its handshake to make room for a new connection (shared/address_cap.py)."""
        self._in_handshake = None
        self.abort("handshake-shed")

    def abort(self, reason: str) -> None:
        self.reason = reason
        if not self.closed:
            self.transport.abort()

    async def _main(self) -> None:
        try:
            await self.run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s connection from %s failed", self.protocol_name, self.peer)
            self.abort("error")

    async def run(self) -> None:
        raise NotImplementedError

    def _watchdog(self) -> None:
        if self.closed:
            return
        now = self.loop.time()
        s = self.settings
        if self._paused_since is not None and s.stall_timeout_s > 0:
            if now - self._paused_since > s.stall_timeout_s:
                return self.abort("stalled")
        elif self.session is None and s.handshake_timeout_s > 0:
            if now - self.started > s.handshake_timeout_s:
                return self.abort("handshake-timeout")
        elif s.idle_timeout_s > 0 and not self.inflight and now - self.last > s.idle_timeout_s:
            return self.abort("idle-timeout")
        self._watch = self.loop.call_later(self._period, self._watchdog)
