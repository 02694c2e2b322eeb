"""A minimal asyncio HTTP/1.1 server for iPXE, the initramfs and the boot files.

iPXE and busybox wget send GET/HEAD and read one answer at a time; aiohttp is not a
dependency and a framework would be most of the code path. Each request's head is bounded
(size and time); connections are kept alive (iPXE loads the kernel and the initramfs on one)
until the client says ``Connection: close`` or idles. A file answer (:class:`FileSlice`) is
streamed from the file chunk by chunk, never read whole into memory,
with ``Range`` (one range: 206 and ``Content-Range``; unsatisfiable: 416).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from shared import http_head
from shared.http_head import BadRequest

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
        ip = self.peer.rsplit(":", 1)[0].strip("[]")
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
    def __init__(self, handler: Handler, host: str, port: int) -> None:
        self.handler, self.host, self.port = handler, host, port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=http_head.MAX_HEAD
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("boot http on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        peer_s = f"{peer[0]}:{peer[1]}" if peer else "?"
        try:
            first = True
            while True:
                answered = await self._respond(reader, peer_s, first)
                if answered is None:
                    return  # the client closed or idled between requests
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
        try:
            writer.write(_head(response, keep, f.end - f.start))
            await writer.drain()
            pos = f.start
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
