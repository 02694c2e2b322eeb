"""TFTP packets (RFC 1350) and option negotiation (RFC 2347/2348/2349, RFC 7440).

Pure functions on bytes: parsing never trusts the sender, anything malformed raises
:class:`TftpError` with the error code to answer with.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6

# Error codes (RFC 1350, 2347).
ERR_UNDEFINED = 0
ERR_NOT_FOUND = 1
ERR_ACCESS = 2
ERR_DISK_FULL = 3
ERR_ILLEGAL = 4
ERR_UNKNOWN_TID = 5
ERR_EXISTS = 6
ERR_NO_USER = 7
ERR_OPTIONS = 8

MIN_BLKSIZE, MAX_BLKSIZE = 8, 65464
DEFAULT_BLKSIZE = 512
MAX_WINDOWSIZE = 65535


class TftpError(Exception):
    """A failure that is answered with an ERROR packet carrying ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Request:
    opcode: int  # RRQ or WRQ
    filename: str
    mode: str  # lower-case: "octet", "netascii" (or "mail")
    options: dict[str, str] = field(default_factory=dict)  # names lower-cased


def is_error(data: bytes) -> bool:
    """Whether a datagram is an ERROR packet: never answered (RFC 1350), or two servers
    could bounce errors between each other for ever."""
    return len(data) >= 2 and data[0] == 0 and data[1] == ERROR


def parse_request(data: bytes) -> Request:
    """An RRQ/WRQ: opcode, filename NUL, mode NUL, then option NUL value NUL pairs."""
    if len(data) < 4:
        raise TftpError(ERR_ILLEGAL, "packet too short")
    (opcode,) = struct.unpack_from("!H", data)
    if opcode not in (RRQ, WRQ):
        raise TftpError(ERR_ILLEGAL, f"unexpected opcode {opcode}")
    if not data.endswith(b"\0"):
        raise TftpError(ERR_ILLEGAL, "request not NUL-terminated")
    fields = data[2:-1].split(b"\0")
    if len(fields) < 2 or len(fields) % 2:
        raise TftpError(ERR_ILLEGAL, "malformed request fields")
    try:
        strings = [f.decode("ascii") for f in fields]
    except UnicodeDecodeError as exc:
        raise TftpError(ERR_ILLEGAL, "request is not ASCII") from exc
    filename, mode = strings[0], strings[1].lower()
    if not filename:
        raise TftpError(ERR_ILLEGAL, "empty file name")
    if mode not in ("octet", "netascii", "mail"):
        raise TftpError(ERR_ILLEGAL, f"unknown mode {mode!r}")
    options: dict[str, str] = {}
    for name, value in zip(strings[2::2], strings[3::2], strict=True):
        options[name.lower()] = value
    return Request(opcode, filename, mode, options)


def build_request(opcode: int, filename: str, mode: str = "octet", **options: int) -> bytes:
    """Client side (tests, the benchmark client)."""
    parts = [filename.encode(), mode.encode()]
    for name, value in options.items():
        parts += [name.encode(), str(value).encode()]
    return struct.pack("!H", opcode) + b"\0".join(parts) + b"\0"


def build_error(code: int, message: str) -> bytes:
    return struct.pack("!HH", ERROR, code) + message.encode("ascii", "replace") + b"\0"


def build_oack(options: dict[str, str]) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in options.items())
    return struct.pack("!H", OACK) + body


def build_ack(block: int) -> bytes:
    return struct.pack("!HH", ACK, block & 0xFFFF)


def parse_ack(data: bytes) -> int:
    """The block number of an ACK; TftpError for anything else (an ERROR is reported too)."""
    if len(data) < 4:
        raise TftpError(ERR_ILLEGAL, "packet too short")
    opcode, number = struct.unpack_from("!HH", data)
    if opcode == ACK:
        return number
    if opcode == ERROR:
        message = data[4:].split(b"\0", 1)[0].decode("ascii", "replace")
        raise PeerError(number, message)
    raise TftpError(ERR_ILLEGAL, f"unexpected opcode {opcode}")


class PeerError(TftpError):
    """The peer sent an ERROR packet (never answered: the transfer just ends)."""


def parse_oack(data: bytes) -> dict[str, str]:
    fields = data[2:].rstrip(b"\0").split(b"\0") if len(data) > 2 else []
    try:
        strings = [f.decode("ascii") for f in fields]
    except UnicodeDecodeError as exc:  # RFC 2347 options are NETASCII
        raise TftpError(ERR_ILLEGAL, "OACK is not ASCII") from exc
    return {k.lower(): v for k, v in zip(strings[::2], strings[1::2], strict=False)}


@dataclass(frozen=True)
class Negotiated:
    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout_s: float | None = None  # None: the server's default
    acknowledged: dict[str, str] = field(default_factory=dict)  # what goes into the OACK


WINDOW_BYTES = 128 * 1024


def negotiate(
    options: dict[str, str],
    file_size: int | None,
    *,
    max_blksize: int,
    max_windowsize: int,
    max_timeout_s: int = 255,
) -> Negotiated:
    """Accept what we support within our limits (RFC 2347: unknown or bad options are
    ignored, never an error: the transfer then runs with the defaults).

    A ``timeout`` above ``max_timeout_s`` is ignored, not lowered: RFC 2349 has the OACK
    repeat the client's value exactly. Each retransmission interval holds a transfer slot,
    so a client asking for 255 s would hold one for ``retries`` x 255 s."""
    acked: dict[str, str] = {}
    blksize, windowsize, timeout = DEFAULT_BLKSIZE, 1, None
    if (value := _int(options.get("blksize"))) is not None and value >= MIN_BLKSIZE:
        blksize = min(value, max_blksize, MAX_BLKSIZE)
        acked["blksize"] = str(blksize)
    if (value := _int(options.get("timeout"))) is not None and 1 <= value <= min(
        255, max_timeout_s
    ):
        timeout = float(value)
        acked["timeout"] = str(value)
    if "tsize" in options and file_size is not None:
        acked["tsize"] = str(file_size)
    if (value := _int(options.get("windowsize"))) is not None and value >= 1:
        # A window arrives as one burst: it must fit the receiver's socket buffer (Linux's
        # default is 208 KiB, of which a datagram costs more than its size) or the tail of
        # every window is lost and waits for a timeout. Measured with atftp on loopback:
        # 64 blocks of 8 KiB took 46 s for 64 MiB, 16 of them 0.05 s.
        windowsize = min(value, max_windowsize, MAX_WINDOWSIZE, max(1, WINDOW_BYTES // blksize))
        acked["windowsize"] = str(windowsize)
    return Negotiated(blksize, windowsize, timeout, acked)


def _int(value: str | None) -> int | None:
    if value is None or not value.isdigit() or len(value) > 9:
        return None
    return int(value)
