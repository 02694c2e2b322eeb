"""HTTP range server: what iPXE's ``sanboot http://.../s/<token>`` needs, and curl.

``HEAD`` gives the size (Content-Length, Accept-Ranges: bytes); ``GET`` with one ``Range``
answers 206 with Content-Range; without Range the whole export (200). Keep-alive per
HTTP/1.1. iPXE reads 512-byte blocks one request at a time, so a request is served without
any task hop: pieces from the session's stack, ``preadv`` into one buffer, one write.
"""

from __future__ import annotations

import logging

from services.stream.conn import Connection
from services.stream.path.backend import (
    BlocksMissing,
    map_read_async,
    read_into,
    read_into_nowait,
)
from shared.http_head import (
    MAX_HEAD,
    BadRequest,
    parse_head,
    parse_range,
    too_long,
)

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
_REASONS = {
    200: "OK",
    206: "Partial Content",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    416: "Range Not Satisfiable",
    431: "Request Header Fields Too Large",
}


class HttpConnection(Connection):
    protocol_name = "http"

    def _respond(self, status: int, headers: dict[str, str | int], keep: bool) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS[status]}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append("Connection: keep-alive" if keep else "Connection: close")
        self.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def eof_received(self) -> bool:
        # A client may shut its sending side once its request is out: the answer still
        # goes out whole, and run() closes the connection when it has nothing left to do.
        super().eof_received()
        return True

    async def run(self) -> None:
        try:
            await self._serve_requests()
        finally:
            self.close()

    async def _serve_requests(self) -> None:
        while not self.closed:
            try:
                try:
                    raw = await self.read_until(b"\r\n\r\n", MAX_HEAD)
                except ValueError:  # no end of the head within MAX_HEAD
                    raise too_long() from None
                self.last = self.loop.time()
                head = parse_head(raw)
                body = head.body_length()
            except BadRequest as e:
                log.warning("http: %d to %s: %s", e.status, self.peer, e.reason)
                self._respond(e.status, {"Content-Length": 0}, False)
                return self.close("bad-request")
            keep = head.keep_alive()
            if body:
                await self.read_exact(body)
            await self._serve(head.method, head.target, head.headers, keep)
            if not keep:
                return  # run() closes

    async def _serve(self, method: str, target: str, headers: dict[str, str], keep: bool) -> None:
        if method not in ("GET", "HEAD"):
            return self._respond(405, {"Allow": "GET, HEAD", "Content-Length": 0}, keep)
        parts = target.split("?", 1)[0].split("/")
        if len(parts) != 3 or parts[0] or parts[1] != "s" or not parts[2]:
            return self._respond(404, {"Content-Length": 0}, keep)
        if not await self._use_token(parts[2]):
            return self._respond(404, {"Content-Length": 0}, keep)
        assert self.session is not None
        size = self.session.backend.size
        start, end, status = 0, size, 200
        extra: dict[str, str | int] = {}
        if "range" in headers:
            rng = parse_range(headers["range"], size)
            if rng is None:
                log.warning(
                    "http: 416 to %s: range %r of a %d-byte export",
                    self.peer, headers["range"][:40], size,
                )  # fmt: skip
                hdrs: dict[str, str | int] = {"Content-Range": f"bytes */{size}"}
                return self._respond(416, {**hdrs, "Content-Length": 0}, keep)
            start, end = rng
            status = 206
            extra["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        self._respond(
            status,
            {
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
                "Content-Length": end - start,
                **extra,
            },
            keep,
        )
        if method == "GET" and end > start:
            await self._send_body(start, end)

    async def _use_token(self, token: str) -> bool:
        if self.session is not None and self.session.token == token:
            return True
        if self.session is not None:
            old, self.session = self.session, None
            old.conns.discard(self)
            self.mgr.detached(old, "http", self.peer, self.bytes_read, 0, "switched-session")
            self.mgr.release(old)
            self.bytes_read = 0
        session = await self.mgr.acquire(token)
        if session is None:
            return False
        if self.closed or not self.mgr.admits(session, "http", self.peer):
            self.mgr.release(session)
            return False
        self.session = session
        session.conns.add(self)
        self.mgr.attached(session, "http", self.peer)
        return True

    async def _send_body(self, start: int, end: int) -> None:
        assert self.session is not None
        backend = self.session.backend
        self.session.record("r", start, end - start)
        self.inflight += 1
        try:
            pos = start
            while pos < end:
                n = min(CHUNK, end - pos)
                try:
                    pieces = backend.map_read(pos, n)
                except BlocksMissing:  # a remote store's blocks: fetched without blocking
                    pieces = await map_read_async(backend, pos, n)
                out = bytearray(n)
                view = memoryview(out)
                if not read_into_nowait(pieces, view):
                    await self.loop.run_in_executor(None, read_into, pieces, view)
                self.write(out)
                self.count_read(n)
                pos += n
                await self.drain()
        finally:
            self.inflight -= 1
