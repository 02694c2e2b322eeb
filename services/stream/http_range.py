"""HTTP range server: what iPXE's ``sanboot http://.../s/<token>`` needs, and curl.

``HEAD`` gives the size (Content-Length, Accept-Ranges: bytes); ``GET`` with one ``Range``
answers 206 with Content-Range; without Range the whole export (200). Keep-alive per
HTTP/1.1. iPXE reads 512-byte blocks one request at a time, so a request is served without
any task hop: pieces from the session's stack, ``preadv`` into one buffer, one write.
"""

from __future__ import annotations

import logging
import re

from services.stream.conn import Connection
from services.stream.path.backend import (
    BlocksMissing,
    map_read_async,
    read_into,
    read_into_nowait,
)

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
CHUNK = 1024 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_REASONS = {
    200: "OK",
    206: "Partial Content",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    416: "Range Not Satisfiable",
}


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``(start, end_exclusive)`` of a single-range header; None when unsatisfiable."""
    m = _RANGE.match(value.strip())
    if not m or (not m[1] and not m[2]):
        return None
    if not m[1]:  # suffix: the last N bytes
        n = min(int(m[2]), size)
        return (size - n, size) if n else None
    start = int(m[1])
    end = min(int(m[2]) + 1, size) if m[2] else size
    if start >= size or end <= start:
        return None
    return start, end


class HttpConnection(Connection):
    protocol_name = "http"

    def _respond(self, status: int, headers: dict[str, str | int], keep: bool) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS[status]}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append("Connection: keep-alive" if keep else "Connection: close")
        self.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def run(self) -> None:
        while not self.closed:
            head = await self.read_until(b"\r\n\r\n", MAX_HEAD)
            self.last = self.loop.time()
            try:
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, target, version = request_line.split(" ")
                headers = {}
                for line in header_lines:
                    if line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = int(headers.get("content-length", "0"))
            except ValueError:
                self._respond(400, {"Content-Length": 0}, False)
                return self.close("bad-request")
            conn_hdr = headers.get("connection", "").lower()
            keep = (version == "HTTP/1.1" and conn_hdr != "close") or conn_hdr == "keep-alive"
            if body:
                if body > MAX_HEAD:
                    self._respond(400, {"Content-Length": 0}, False)
                    return self.close("bad-request")
                await self.read_exact(body)
            await self._serve(method, target, headers, keep)
            if not keep:
                return self.close()

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
