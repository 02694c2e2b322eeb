"""A minimal asyncio HTTP/1.1 server for iPXE, the initramfs and the boot files.

iPXE and busybox wget send GET/HEAD and read one answer at a time; aiohttp is not a
dependency and a framework would be most of the code path. Each request's head is bounded
(size and time); connections are kept alive (iPXE loads the kernel and the initramfs on one)
until the client says ``Connection: close`` or idles. A file answer (:class:`FileSlice`) is
streamed from the file chunk by chunk, never read whole into memory,
with ``Range`` (one range: 206 and ``Content-Range``; unsatisfiable: 416).

Anyone on the boot network reaches it, so what one host can hold is bounded: at most
``max_per_address`` open connections per client address (past it new ones are closed at
once), at most ``max_waiting`` connections waiting for a request head from all addresses
together (past it the oldest is closed to make room: :mod:`shared.address_cap`), and out of
file descriptors the listener refuses new connections instead of spinning
(:mod:`shared.listener`); a head that trickles in (slowloris) is cut off after
``READ_TIMEOUT_S`` whatever arrived.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from shared import http_head
from shared.address_cap import AddressCap, peer_host
from shared.http_head import BadRequest
from shared.listener import Listener, listening_socket, refuse

log = logging.getLogger("streamboot.boot.http")

FILE_CHUNK = 256 * 1024
READ_TIMEOUT_S = 10.0
REASONS = {200: "OK", 206: "Partial Content", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           410: "Gone", 416: "Range Not Satisfiable", 429: "Too Many Requests",
           431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]  # the first value of each parameter
    peer: str  # "address:port"
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names

    @property
    def client_ip(self) -> str:
        """The requester's address (IPv4-mapped IPv6 as plain IPv4)."""
        ip = peer_host(self.peer)
        return ip.removeprefix("::ffff:") if "." in ip else ip


@dataclass(frozen=True)
class FileSlice:
    """Bytes ``start`` to ``end`` (exclusive) of an open file, which the server closes."""

    fd: int
    start: int
    end: int
    size: int  # the whole file's


@dataclass(frozen=True)
class Response:
    status: int
    body: str
    content_type: str = "text/plain; charset=utf-8"
    file: FileSlice | None = None
    retry_after_s: int | None = None  # a 503's Retry-After: iPXE asks again after it
    # Called with the file's bytes sent and whether all were, once they are (a trace span).
    sent: Callable[[int, bool], None] | None = None


Handler = Callable[[Request], Awaitable[Response]]


def file_response(path: str, request: Request) -> Response:
    """The file at ``path`` (no symlink as its last part) for a GET/HEAD with or without
    ``Range``; 404 when it is not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return Response(404, "not found\n")
    size = os.fstat(fd).st_size
    wanted = request.headers.get("range")
    if wanted is None:
        return Response(200, "", "application/octet-stream", FileSlice(fd, 0, size, size))
    span = http_head.parse_range(wanted, size)
    if span is None:
        os.close(fd)
        return Response(416, f"range {wanted!r} not satisfiable (size {size})\n")
    return Response(206, "", "application/octet-stream", FileSlice(fd, *span, size))


def _head(response: Response, keep: bool, length: int) -> bytes:
    lines = [
        f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Error')}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {length}",
        f"Connection: {'keep-alive' if keep else 'close'}",
    ]
    if response.file is not None:
        f = response.file
        lines.append("Accept-Ranges: bytes")
        if response.status == 206:
            lines.append(f"Content-Range: bytes {f.start}-{f.end - 1}/{f.size}")
    else:
        lines.append("Cache-Control: no-store")
    if response.retry_after_s is not None:
        lines.append(f"Retry-After: {int(response.retry_after_s)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class HttpServer:
    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        max_per_address: int = 256,
        max_waiting: int = 0,
    ) -> None:
        self.handler, self.host, self.port = handler, host, port
        self.connections = AddressCap(max_per_address, log, "boot http", "open connections")
        self.waiting = AddressCap(
            0, log, "boot http", "connections waiting for a request", total=max_waiting
        )
        self._listener: Listener | None = None
        self._running: set[asyncio.Task[None]] = set()  # the loop holds tasks weakly

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def take(conn: socket.socket) -> None:
            task = loop.create_task(self._take(conn))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

        sock = listening_socket(self.host, self.port)
        self._listener = Listener(loop, sock, take, "boot http")
        self.port = sock.getsockname()[1]
        log.info("boot http on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()

    async def _take(self, conn: socket.socket) -> None:
        try:
            host = str(conn.getpeername()[0]).removeprefix("::ffff:")
        except OSError:  # already gone
            conn.close()
            return
        if not self.connections.admit(conn, host):
            refuse(conn)
            return
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=http_head.MAX_HEAD)
        except OSError:
            self.connections.release(conn)
            conn.close()
            return
        try:
            await self._serve(reader, writer, host)
        finally:
            self.connections.release(conn)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str
    ) -> None:
        peer = writer.get_extra_info("peername")
        peer_s = f"{peer[0]}:{peer[1]}" if peer else "?"
        try:
            first = True
            while True:
                self.waiting.admit(writer, host, writer.transport.abort)
                try:
                    answered = await self._respond(reader, peer_s, first)
                finally:
                    self.waiting.release(writer)
                if answered is None or writer.transport.is_closing():
                    return  # the client closed or idled between requests, or was shed
                response, head_only, keep = answered
                await self._send(writer, response, head_only, keep)
                if not keep:
                    return
                first = False
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _send(
        self, writer: asyncio.StreamWriter, response: Response, head_only: bool, keep: bool
    ) -> None:
        f = response.file
        if f is None:
            body = response.body.encode()
            writer.write(_head(response, keep, len(body)) + (b"" if head_only else body))
            await writer.drain()
            return
        pos = f.start
        try:
            writer.write(_head(response, keep, f.end - f.start))
            await writer.drain()
            while not head_only and pos < f.end:
                # Chunk by chunk, each sent before the next is read (uvloop has no sendfile).
                data = os.pread(f.fd, min(FILE_CHUNK, f.end - pos), pos)
                if not data:
                    raise ConnectionError("the file shrank while it was sent")
                writer.write(data)
                await writer.drain()
                pos += len(data)
        finally:
            os.close(f.fd)
            if response.sent is not None and not head_only:
                response.sent(pos - f.start, pos >= f.end)

    async def _respond(
        self, reader: asyncio.StreamReader, peer: str, first: bool
    ) -> tuple[Response, bool, bool] | None:
        """The next request's answer, whether it is a HEAD and whether to keep the
        connection; None when the client left (or idled) before a new request."""
        try:
            try:
                raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            except asyncio.LimitOverrunError:
                raise http_head.too_long() from None
            head = http_head.parse_head(raw)
            body = head.body_length()
            if body:  # read and dropped: the next request on the connection starts after it
                await asyncio.wait_for(reader.readexactly(body), READ_TIMEOUT_S)
        except TimeoutError:
            return (Response(408, "request timeout\n"), False, False) if first else None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            return Response(400, "incomplete request\n"), False, False
        except BadRequest as e:
            log.warning("boot http: %d to %s: %s", e.status, peer, e.reason)
            return Response(e.status, f"{e.reason}\n"), False, False
        method, target, headers = head.method, head.target, head.headers
        keep = head.keep_alive()
        if method not in ("GET", "HEAD"):
            return Response(405, "only GET and HEAD\n"), False, False
        url = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            response = await self.handler(Request(method, url.path, query, peer, headers))
        except Exception:
            log.exception("boot http: %s %s failed", method, target)
            response = Response(500, "internal error\n")
        # The nonce is a secret: the log names the path only.
        log.info("boot http: %s %s %s -> %d", peer, method, url.path, response.status)
        return response, method == "HEAD", keep
