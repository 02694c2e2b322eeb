"""Parsing an HTTP/1.x request head and its ``Range`` from a client, strictly: the one
HTTP/1.1 request parser of the stream's range server and the boot service's server of
scripts and boot files (the REST API has uvicorn). Each server reads the head up to its
empty line within :data:`MAX_HEAD` under its own read timeout, then parses it here; the
keep-alive rule and the body limit are here too, so both answer alike.

Hand-written rather than h11 or httptools: ``bench/http_parse.py`` parses an iPXE head
here faster than h11 and a little slower than httptools, and whole requests of the range
server are as fast with either parser (the parse is a small part of a request), so a
compiled dependency with its own acceptance rules buys nothing (docs/architecture.md).

Whatever a client sends, the answer is a :class:`BadRequest` with the status to reply (400,
431) and a reason to log in one line, never an exception from deeper down.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The whole head: request line, header lines and the empty line that ends them.
MAX_HEAD = 16 * 1024
# Bodies are read and dropped (GET and HEAD only); more than this is no client of ours.
MAX_BODY = 16 * 1024
# A decimal number longer than this is larger than any size we serve (2**64 has 20
# digits); ``int()`` of a very long one is quadratic and refused by Python past 4,300.
MAX_DIGITS = 19
_RANGE = re.compile(r"^bytes=([0-9]*)-([0-9]*)$")  # ASCII digits only (\d has others)


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Head:
    method: str
    target: str
    version: str
    headers: dict[str, str]  # names lower-case; a repeated header keeps its last value

    def content_length(self) -> int:
        """The body's length: 0 without the header; plain decimal digits only."""
        value = self.headers.get("content-length")
        if value is None:
            return 0
        if not value.isascii() or not value.isdigit() or len(value) > MAX_DIGITS:
            raise BadRequest(400, f"bad Content-Length {value[:40]!r}")
        return int(value)

    def body_length(self) -> int:
        """The body's length, refused past :data:`MAX_BODY`: GET and HEAD carry none, and
        the servers read and drop whatever a client sends."""
        body = self.content_length()
        if body > MAX_BODY:
            raise BadRequest(400, f"request body of {body} bytes")
        return body

    def keep_alive(self) -> bool:
        """Whether the connection stays open after the answer: HTTP/1.1 unless
        ``Connection: close``, HTTP/1.0 only with ``Connection: keep-alive``."""
        connection = self.headers.get("connection", "").lower()
        return connection != "close" and (self.version == "HTTP/1.1" or connection == "keep-alive")


def too_long() -> BadRequest:
    return BadRequest(431, f"request head over {MAX_HEAD} bytes")


def parse_head(raw: bytes) -> Head:
    """A request head, ``raw`` ending with its empty line."""
    if len(raw) > MAX_HEAD:
        raise too_long()
    request_line, *lines = raw.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, f"bad request line {request_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(400, f"bad header line {line[:80]!r}")
        headers[name.lower()] = value.strip()
    return Head(parts[0], parts[1], parts[2], headers)


def decimal(digits: str) -> int:
    """A number of a header value (digits only), capped: past ``MAX_DIGITS`` digits it is
    2**64, more than any offset or size."""
    return int(digits) if len(digits) <= MAX_DIGITS else 1 << 64


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` as ``(start, end)`` (end exclusive);
    None when it cannot be satisfied or is not one range of bytes."""
    m = _RANGE.match(value.strip())
    if not m or (not m[1] and not m[2]):
        return None
    if not m[1]:  # suffix: the last N bytes
        n = min(decimal(m[2]), size)
        return (size - n, size) if n else None
    start = decimal(m[1])
    end = min(decimal(m[2]) + 1, size) if m[2] else size
    if start >= size or end <= start:
        return None
    return start, end
