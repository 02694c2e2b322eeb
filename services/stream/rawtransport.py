"""A minimal non-blocking socket transport that can ``sendfile`` (zero-copy) replies.

uvloop's transports copy every reply from a Python buffer into the socket, and there is no
safe way to interleave ``os.sendfile`` with their internal queue. This transport implements
the subset of ``asyncio.Transport`` the connections use, over ``loop.add_reader/add_writer``,
plus :meth:`sendfile`, which queues ``(fd, offset, length)`` in order with ordinary writes:
large clean reads then go from the page cache to the socket without passing through Python.
Replies are sent at once when the socket allows (``sendmsg`` of everything queued, i.e. one
``writev``), otherwise when it becomes writable.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from shared.listener import Listener, listening_socket

RECV_SIZE = 256 * 1024
IOV_MAX = 1024


class _RecvBuffer(threading.local):
    """One receive buffer per thread (so per event loop), shared by its transports: a
    transport hands its protocol a view of it, which the protocol copies from before
    returning, and nothing else runs in between. A buffer per connection cost 256 KiB per
    client (50 MiB for 200) and a zero-fill at every connect (0.15 ms, measured)."""

    def __init__(self) -> None:
        self.buf = bytearray(RECV_SIZE)
        self.view = memoryview(self.buf)


_recv = _RecvBuffer()


class _Gone(asyncio.Protocol):
    """A closed transport's protocol: it was told, nothing more reaches it."""


class RawTransport(asyncio.Transport):
    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: asyncio.Protocol
    ) -> None:
        super().__init__()
        sock.setblocking(False)
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._queue: collections.deque[Any] = collections.deque()  # buffer | [fd, off, n]
        self._queued = 0
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._paused_protocol = False
        self._reading = False
        self._writing = False
        self._closing = False
        self._closed = False
        try:
            peer = sock.getpeername()
        except OSError:
            peer = None
        self._extra = {"socket": sock, "peername": peer, "sockname": sock.getsockname()}
        loop.call_soon(self._start)

    def _start(self) -> None:
        self._protocol.connection_made(self)
        if not self._closing:
            self.resume_reading()

    # --- reading -------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            n = self._sock.recv_into(_recv.buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self._finish(e)
        if not n:
            self.pause_reading()
            keep = self._protocol.eof_received()
            if not keep:
                self.close()
            return
        # The protocols copy what they keep: a view of the reused buffer is enough.
        self._protocol.data_received(_recv.view[:n])  # type: ignore[arg-type]

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)

    def is_reading(self) -> bool:
        return self._reading

    # --- writing -------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.send_items([data], has_files=False)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.send_items(list(list_of_data), has_files=False)

    def sendfile(self, fd: int, offset: int, count: int) -> None:
        """Queue ``count`` bytes of file ``fd`` from ``offset``, in order with writes."""
        self.send_items([[fd, offset, count]])

    def send_items(self, items: list[Any], has_files: bool = True) -> None:
        """Send buffers and ``[fd, offset, count]`` file pieces, in order.

        Without file pieces and with nothing queued (the usual case for small replies)
        this is one ``sendmsg`` and no queueing at all.
        """
        if self._closing or not items:
            return
        if not has_files and not self._queue:
            try:
                sent = self._sock.sendmsg(items) if len(items) <= IOV_MAX else 0
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                return self._finish(e)
            if sent == sum(map(len, items)):
                return
            for i, b in enumerate(items):
                n = len(b)
                if sent < n:
                    self._queue.append(memoryview(b)[sent:] if sent else b)
                    self._queued += n - sent
                    for rest in items[i + 1 :]:
                        self._queue.append(rest)
                        self._queued += len(rest)
                    break
                sent -= n
            else:
                return
        else:
            for item in items:
                self._queue.append(item)
                self._queued += item[2] if isinstance(item, list) else len(item)
        self._after_queue()

    def _after_queue(self) -> None:
        if not self._writing:
            self._flush()
        if self._queued > self._high and not self._paused_protocol and not self._closed:
            self._paused_protocol = True
            self._protocol.pause_writing()

    def _flush(self) -> None:
        q = self._queue
        try:
            while q:
                head = q[0]
                if isinstance(head, list):
                    fd, off, n = head
                    sent = os.sendfile(self._fd, fd, off, n)
                    if sent == 0:
                        raise OSError(errno.EIO, "file shorter than its reply")
                    self._queued -= sent
                    if sent < n:
                        head[1] += sent
                        head[2] -= sent
                        break
                    q.popleft()
                    continue
                # Gather the buffers up to the next file piece: one sendmsg (writev).
                bufs = []
                more = 0
                for item in q:
                    if isinstance(item, list):
                        more = socket.MSG_MORE  # a reply header: coalesce it with its data
                        break
                    if len(bufs) == IOV_MAX:
                        break
                    bufs.append(item)
                sent = self._sock.sendmsg(bufs, (), more)
                self._queued -= sent
                while sent:
                    b = q[0]
                    if sent >= len(b):
                        sent -= len(b)
                        q.popleft()
                    else:
                        q[0] = memoryview(b)[sent:]
                        sent = 0
                        break
                else:
                    continue
                break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            return self._finish(e)
        if q and not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)
        elif not q and self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        if self._paused_protocol and self._queued <= self._low:
            self._paused_protocol = False
            self._protocol.resume_writing()
        if not q and self._closing:
            self._finish(None)

    def _on_writable(self) -> None:
        self._flush()

    def get_write_buffer_size(self) -> int:
        return self._queued

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def can_write_eof(self) -> bool:
        return False

    # --- closing -------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._queue:
            self._loop.call_soon(self._finish, None)

    def abort(self) -> None:
        self._closing = True
        self._finish(None)

    def _finish(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        self.pause_reading()
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        self._queue.clear()
        self._queued = 0
        self._sock.close()
        self._loop.call_soon(self._lost, exc)

    def _lost(self, exc: Exception | None) -> None:
        # The protocol holds its transport: dropping it here breaks the cycle, so a closed
        # connection is freed at once, not by a later cyclic collection (a flood of
        # connections would otherwise pile up thousands of them in memory).
        protocol, self._protocol = self._protocol, _Gone()
        protocol.connection_lost(exc)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]


def raw_server(
    loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol], host: str,
    port: int, name: str,
) -> Listener:  # fmt: skip
    """Accepts connections on ``host:port`` and gives each a :class:`RawTransport`."""
    return Listener(
        loop, listening_socket(host, port), lambda conn: RawTransport(loop, conn, factory()), name
    )
