"""Re-drive recorded block accesses against an NBD export, timing every request.

A session's block accesses are in the log as ``BlocksRequested`` extents ``[t_ms since the
session started, offset, length, op]``. This is the client side of a replay: the NBD
handshake, the split of extents into requests, and a replay at queue depth 1 that times
each request from sending it to the last byte of its reply. ``streamboot replay blocks``
and ``bench/bootstorm.py`` both drive it.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from shared import nbd_wire as nbd

# BlocksRequested merges adjacent accesses of one op, so the log holds extents, not the
# guest's requests: replay splits them into requests of this size (Linux's virtio-blk and
# QEMU's NBD client issue sequential reads of about this size).
SPLIT = 128 << 10


class Request(NamedTuple):
    t_ms: int  # when the original began it, ms since its session started
    offset: int
    length: int
    op: str  # "r" | "w"


def split_extents(extents: Iterable[Sequence[Any]], split: int = SPLIT) -> list[Request]:
    """Recorded extents ``[t_ms, offset, length, op]`` as requests of at most ``split`` bytes."""
    out: list[Request] = []
    for t, off, n, op in extents:
        t, off, n = int(t), int(off), int(n)
        for a in range(off, off + n, split):
            out.append(Request(t, a, min(split, off + n - a), str(op)))
    return out


def parse_nbd_uri(uri: str) -> tuple[str, int, str]:
    """``nbd://host:port/export`` -> (host, port, export name)."""
    parts = urlsplit(uri)
    if parts.scheme != "nbd" or not parts.hostname:
        raise ValueError(f"not an nbd:// URI: {uri!r}")
    return parts.hostname, parts.port or 10809, parts.path.lstrip("/")


@dataclass
class NbdExport:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    size: int
    flags: int

    @property
    def read_only(self) -> bool:
        return bool(self.flags & nbd.TF_READ_ONLY)


async def nbd_open(host: str, port: int, name: str) -> NbdExport:
    """Fixed-newstyle handshake with OPT_GO; simple replies only (no structured replies)."""
    r, w = await asyncio.open_connection(host, port)
    magic, opt, _flags = nbd.GREETING.unpack(await r.readexactly(nbd.GREETING.size))
    if (magic, opt) != (nbd.NBDMAGIC, nbd.IHAVEOPT):
        w.close()
        raise ConnectionError(f"{host}:{port} is not an NBD server")
    w.write(nbd.CLIENT_FLAGS.pack(nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))
    n = name.encode()
    data = struct.pack(">I", len(n)) + n + struct.pack(">H", 0)
    w.write(nbd.OPTION.pack(nbd.IHAVEOPT, nbd.OPT_GO, len(data)) + data)
    size, flags = -1, 0
    while True:
        _m, _o, rep, ln = nbd.OPTION_REPLY.unpack(await r.readexactly(nbd.OPTION_REPLY.size))
        payload = await r.readexactly(ln)
        if rep == nbd.REP_INFO and ln >= nbd.INFO_EXPORT_S.size:
            kind, sz, fl = nbd.INFO_EXPORT_S.unpack(payload[: nbd.INFO_EXPORT_S.size])
            if kind == nbd.INFO_EXPORT:
                size, flags = sz, fl
        elif rep == nbd.REP_ACK:
            return NbdExport(r, w, size, flags)
        elif rep & 0x80000000:
            w.close()
            raise ConnectionError(f"the server refused export {name[:8]}... ({rep:#x})")


@dataclass
class ReplayResult:
    seconds: float = 0.0  # the whole replay, connecting included
    connect_s: float = 0.0
    # One entry per completed request, in trace order: reply time in seconds.
    latencies: list[float] = field(default_factory=list)
    bytes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0  # error replies, plus a broken connection
    error: str | None = None  # the first one, said in words

    @property
    def span_s(self) -> float:
        """From the first request sent to the last reply read."""
        return max(0.0, self.seconds - self.connect_s)


async def replay(
    host: str,
    port: int,
    name: str,
    requests: Sequence[Request],
    paced: bool,
    timeout_s: float | None = None,
) -> ReplayResult:
    """Replay ``requests`` one at a time (queue depth 1, in order). ``paced``: each request
    waits for its recorded time (relative to the first request) instead of going at once.
    Writes carry a fixed pattern: the trace records where a boot wrote, not what."""
    res = ReplayResult()
    payload = b"\xa5" * max((x.length for x in requests if x.op == "w"), default=0)
    start = time.perf_counter()
    t_first = requests[0].t_ms if requests else 0
    try:
        async with asyncio.timeout(timeout_s):
            export = await nbd_open(host, port, name)
        r, w = export.reader, export.writer
        res.connect_s = time.perf_counter() - start
        begun = time.perf_counter()
        for handle, (t_ms, off, n, op) in enumerate(requests):
            if paced:
                wait = begun + (t_ms - t_first) / 1000 - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            t0 = time.perf_counter()
            async with asyncio.timeout(timeout_s):
                if op == "r":
                    w.write(nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, handle, off, n))
                else:
                    w.write(nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, handle, off, n))
                    w.write(payload[:n])
                magic, err, h = nbd.SIMPLE_REPLY.unpack(await r.readexactly(nbd.SIMPLE_REPLY.size))
                if magic != nbd.SIMPLE_REPLY_MAGIC or h != handle:
                    raise ConnectionError(f"bad reply (magic {magic:#x}, handle {h})")
                if not err and op == "r":
                    await r.readexactly(n)
            res.latencies.append(time.perf_counter() - t0)
            if err:
                res.errors += 1
                res.error = res.error or f"NBD error {err} on {op} of {n} B at offset {off}"
                continue
            res.bytes += n
            if op == "r":
                res.bytes_read += n
            else:
                res.bytes_written += n
        w.write(nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 0, 0, 0))
        await w.drain()
        w.close()
    except TimeoutError:
        res.errors += 1
        res.error = f"no reply within {timeout_s} s (request {len(res.latencies) + 1})"
    except (OSError, asyncio.IncompleteReadError, ConnectionError) as e:
        res.errors += 1
        res.error = f"{type(e).__name__}: {e}"
    res.seconds = time.perf_counter() - start
    return res


def percentile(xs: Sequence[float], p: float) -> float:
    """The ``p``-th percentile by nearest rank (nan for no values)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]
