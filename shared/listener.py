"""A listening socket's accept loop that survives running out of file descriptors.

Out of descriptors, ``accept()`` fails with EMFILE while the pending connection stays in the
backlog: the socket stays readable, and a loop that just returns spins at 100% CPU while
every client waits for a timeout. :class:`Listener` keeps one spare descriptor; when accept
fails for want of one it frees the spare, accepts the connection and closes it at once with
a reset (the client sees its connection refused and retries, or goes to another node), takes
the spare back, and logs it through ``shared.fd_limit.EXHAUSTION`` (rate-limited).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
from collections.abc import Callable

from shared.fd_limit import EXHAUSTION

log = logging.getLogger("streamboot.listener")

OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)
# Connections taken per readiness: a storm's backlog is drained in slices between other work.
ACCEPTS_PER_WAKE = 64
# How long the listener stops watching its socket when not even the spare frees one.
PAUSE_S = 0.1
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def _spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def refuse(conn: socket.socket) -> None:
    """Close an accepted connection with a reset: refused, not half served."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
    except OSError:
        pass
    conn.close()


class Listener:
    """Accepts on ``sock`` (listening, non-blocking) and hands each connection to ``on_accept``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_accept: Callable[[socket.socket], None],
        name: str,
    ) -> None:
        self._loop, self.sock, self._on_accept, self.name = loop, sock, on_accept, name
        self.sock.setblocking(False)
        self._spare = _spare()
        self._closed = False
        self._watching = False
        self._watch()

    def _watch(self) -> None:
        if not self._closed and not self._watching:
            self._loop.add_reader(self.sock.fileno(), self._accept)
            self._watching = True

    def _pause(self) -> None:
        if self._watching:
            self._loop.remove_reader(self.sock.fileno())
            self._watching = False
        self._loop.call_later(PAUSE_S, self._watch)

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_FDS:
                    self._refuse_one()
                else:  # e.g. ECONNABORTED: that client is gone, the next may not be
                    log.debug("%s: accept failed: %s", self.name, exc)
                    continue
                return
            try:
                self._on_accept(conn)
            except Exception:
                log.exception("%s: could not take a connection", self.name)
                refuse(conn)

    def _refuse_one(self) -> None:
        EXHAUSTION.refused_one(self.name)
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        try:
            conn, _ = self.sock.accept()
        except OSError:
            self._pause()  # not even the spare freed one (another thread took it)
        else:
            refuse(conn)
        self._spare = _spare()
        if self._spare is None:
            self._pause()

    def close(self) -> None:
        self._closed = True
        if self._watching:
            self._loop.remove_reader(self.sock.fileno())
            self._watching = False
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        self.sock.close()

    @property
    def sockets(self) -> list[socket.socket]:
        return [self.sock]

    async def wait_closed(self) -> None:
        return None


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP listening socket with the longest backlog: a boot storm connects hundreds at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server(
        (host, port), family=family, reuse_port=False, backlog=socket.SOMAXCONN
    )
    sock.setblocking(False)
    return sock


_setting_up: set[asyncio.Task[None]] = set()


def serve_protocol(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    name: str,
) -> Listener:
    """A :class:`Listener` whose connections get the loop's own transports (``factory()``)."""

    def take(conn: socket.socket) -> None:
        task = loop.create_task(_connect(loop, factory, conn, name))
        _setting_up.add(task)  # the loop holds tasks weakly
        task.add_done_callback(_setting_up.discard)

    return Listener(loop, listening_socket(host, port), take, name)


async def _connect(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.Protocol],
    conn: socket.socket,
    name: str,
) -> None:
    try:
        await loop.connect_accepted_socket(factory, conn)
    except Exception as exc:
        log.warning("%s: could not set up a connection: %s", name, exc)
        refuse(conn)
