"""A minimal asyncio HTTP/1.1 server for small GET answers (iPXE scripts, the hand-off).

iPXE and busybox wget only ever send a GET and read one small answer; aiohttp is not a
dependency and a framework would be most of the code path, so this reads one request
(bounded size and time), calls the handler, answers with a Content-Length and closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from shared.http_head import MAX_HEAD, BadRequest, parse_head, too_long

log = logging.getLogger("streamboot.boot.http")

READ_TIMEOUT_S = 10.0
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}  # fmt: skip


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]  # the first value of each parameter
    peer: str


@dataclass(frozen=True)
class Response:
    status: int
    body: str
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    def __init__(self, handler: Handler, host: str, port: int) -> None:
        self.handler, self.host, self.port = handler, host, port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD)
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
            response, head_only = await self._respond(reader, peer_s)
            body = response.body.encode()
            head = (
                f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Error')}\r\n"
                f"Content-Type: {response.content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head if head_only else head + body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader, peer: str) -> tuple[Response, bool]:
        try:
            try:
                raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            except asyncio.LimitOverrunError:
                raise too_long() from None
            head = parse_head(raw)
            head.content_length()  # refuses a malformed one; a GET's body is never read
        except TimeoutError:
            return Response(408, "request timeout\n"), False
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise
            return Response(400, "incomplete request\n"), False
        except BadRequest as e:
            log.warning("boot http: %d to %s: %s", e.status, peer, e.reason)
            return Response(e.status, f"{e.reason}\n"), False
        method, target = head.method, head.target
        if method not in ("GET", "HEAD"):
            return Response(405, "only GET\n"), False
        url = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            response = await self.handler(Request(method, url.path, query, peer))
        except Exception:
            log.exception("boot http: %s %s failed", method, target)
            response = Response(500, "internal error\n")
        log.info("boot http: %s %s %s -> %d", peer, method, target, response.status)
        return response, method == "HEAD"
