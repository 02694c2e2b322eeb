"""NBD server: fixed newstyle handshake, then the transmission phase on the session's stack.

The bytes are parsed and built by ``protocol.py``; this module is the connection: which
option does what (opening the session), and the transmission loop. Per connection, requests
are parsed straight out of the receive buffer. A READ whose data is in the page cache is
answered inline (pieces from ``map_read`` -> ``preadv`` into the reply buffer -> one
``transport.write``); a READ that would block on the disk and every other command run as
tasks, so their replies may overtake each other (NBD allows any order).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from time import perf_counter

from services.stream.conn import Connection
from services.stream.nbd import protocol as P
from services.stream.nbd import tls as nbd_tls
from services.stream.path.backend import (
    ZERO_FD,
    Backend,
    BlocksMissing,
    Piece,
    all_cached,
    read_into,
    read_into_nowait,
)
from services.stream.sessions import Session, SessionManager
from shared import metrics
from shared import nbd_wire as W

log = logging.getLogger(__name__)

REQ = W.REQUEST
REQ_SIZE = REQ.size
SIMPLE = W.SIMPLE_REPLY
SREAD_HDR = P.STRUCTURED_READ
# Reads at least this large go out by sendfile when the transport can (RawTransport).
SENDFILE_MIN = 64 * 1024
ZEROS = memoryview(bytes(1024 * 1024))
# A copied read's reply buffer up to this size is kept for the next (one per connection).
MAX_SPARE_REPLY = 1024 * 1024 + 64
# Requests a connection may have in flight before we stop reading more.
MAX_INFLIGHT = 128
# streamboot_request_seconds{service="stream", op="nbd:<command>"}: from the request read to
# its reply queued (a write, flush, trim or zero includes the cache service's answer).
LATENCY = {
    op: metrics.request_histogram("stream", f"nbd:{op}")
    for op in ("read", "write", "flush", "trim", "zero")
}
READ_LATENCY = LATENCY["read"]


class ProtocolError(Exception):
    """The client broke the protocol: drop the connection."""


class NbdConnection(Connection):
    protocol_name = "nbd"

    def __init__(self, mgr: SessionManager) -> None:
        super().__init__(mgr)
        self.transmitting = False
        self.structured = False
        self.meta_base_allocation = False
        self.backend: Backend | None = None
        self._reading_paused = False
        self._disconnecting = False
        # Transmission began before the session finished attaching: requests wait.
        self._gated = False
        # A copied read's reply buffer, used again by the next once the transport has sent
        # it (_reply_buffer / end_batch), and the one lent out in this batch.
        self._spare_reply: bytearray | None = None
        self._lent_reply: bytearray | None = None
        self.tls_active = False  # NBD_OPT_STARTTLS done (services/stream/nbd/tls.py)

    # --- handshake -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The server speaks first: the greeting goes out before the socket is tuned and the
        # handshake's task is scheduled (a tenth of a millisecond sooner per connect).
        transport.write(P.SERVER_GREETING)  # type: ignore[attr-defined]
        super().connection_made(transport)

    async def run(self) -> None:
        no_zeroes = P.parse_client_flags(await self.read_exact(W.CLIENT_FLAGS.size))
        if no_zeroes is None:
            return self.close("bad-client-flags")
        self.no_zeroes = no_zeroes
        while not self.closed:
            magic, opt, length = W.OPTION.unpack(await self.read_exact(W.OPTION.size))
            if magic != W.IHAVEOPT:
                return self.close("bad-option-magic")
            if length > W.MAX_OPTION:
                # We cannot skip an unbounded payload: end the connection.
                self.write(P.option_reply(opt, W.REP_ERR_TOO_BIG))
                return self.close("option-too-big")
            data = await self.read_exact(length)
            if await self._option(opt, data):
                return

    def _reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self.write(P.option_reply(opt, rep, data))

    async def _option(self, opt: int, data: bytes) -> bool:
        """Handle one option; True when the handshake is over (transmission or closed)."""
        tls = self.settings.nbd_tls
        if tls is not None and (done := await nbd_tls.option(self, tls, opt, data)) is not None:
            return done
        if opt == W.OPT_EXPORT_NAME:
            token = data.decode("utf-8", "replace")
            session = await self._open(token)
            if session is None:
                # No way to answer an error to EXPORT_NAME: the spec says disconnect.
                if not self.closed:
                    self.mgr.refused("nbd", self.peer, self.mgr.refusal(token))
                self.close("unknown-export")
                return True
            b = session.backend
            self.write(P.export_name_reply(b.size, P.transmission_flags(b), self.no_zeroes))
            self._start_transmission()
            return True
        if opt == W.OPT_ABORT:
            self._reply(opt, W.REP_ACK)
            self.close("abort")
            return True
        if opt == W.OPT_LIST:
            # Export names are session tokens, i.e. secrets: there is nothing to list.
            self._reply(opt, W.REP_ERR_INVALID if data else W.REP_ACK)
            return False
        if opt in (W.OPT_INFO, W.OPT_GO):
            return await self._info_or_go(opt, data)
        if opt == W.OPT_STRUCTURED_REPLY:
            if data:
                self._reply(opt, W.REP_ERR_INVALID)
            else:
                self.structured = True
                self._reply(opt, W.REP_ACK)
            return False
        if opt in (W.OPT_LIST_META_CONTEXT, W.OPT_SET_META_CONTEXT):
            self._meta_context(opt, data)
            return False
        self._reply(opt, W.REP_ERR_UNSUP)
        return False

    async def _info_or_go(self, opt: int, data: bytes) -> bool:
        try:
            name = P.parse_info_request(data)
        except P.BadOption:
            self._reply(opt, W.REP_ERR_INVALID)
            return False
        token = name.decode("utf-8", "replace")
        session = await self._open(token)
        if self.closed:  # the client left meanwhile: nobody to answer
            return True
        if session is not None and not self.mgr.admits(session, "nbd", self.peer):
            self._drop_session()
            self._reply(opt, W.REP_ERR_POLICY, b"this session belongs to another address")
            return False
        if session is None:
            # With the reason (the client shows it), and in this node's log.
            why = self.mgr.refusal(token)
            self.mgr.refused("nbd", self.peer, why)
            self._reply(opt, W.REP_ERR_UNKNOWN, why.encode())
            return False
        b = session.backend
        self.write(P.info_replies(opt, b.size, P.transmission_flags(b)))
        if opt == W.OPT_INFO:
            self._drop_session()
            return False
        self._start_transmission()
        return True

    def _meta_context(self, opt: int, data: bytes) -> None:
        try:
            queries = P.parse_meta_context(data)
        except P.BadOption:
            return self._reply(opt, W.REP_ERR_INVALID)
        if opt == W.OPT_SET_META_CONTEXT and not self.structured:
            return self._reply(opt, W.REP_ERR_INVALID)
        want = P.wants_base_allocation(opt, queries)
        if opt == W.OPT_SET_META_CONTEXT:
            self.meta_base_allocation = want
        self.write(P.meta_context_replies(opt, want))

    async def _open(self, token: str) -> Session | None:
        self._drop_session()
        # Not waiting for an announced session to finish attaching: the handshake ends now
        # and the requests wait (_start_transmission), so a client overlaps its own work
        # with the session's set-up.
        session = await self.mgr.acquire(token, ready=False)
        if session is not None:
            if self.closed:
                self.mgr.release(session)
                return None
            self.session = session
            session.conns.add(self)
        return session

    def _drop_session(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.conns.discard(self)
            self.mgr.release(session)

    def _start_transmission(self) -> None:
        assert self.session is not None
        self.backend = self.session.backend
        self.size = self.backend.size
        self.read_only = not self.backend.can_write()
        self.transmitting = True
        self.mgr.attached(self.session, "nbd", self.peer)
        if self.session.ready is not None:
            # Still attaching: the requests wait in the socket until it is done.
            self._gated = True
            self.transport.pause_reading()
            self.spawn(self._when_ready(self.session))
            return
        if self.buf:
            self._process()

    async def _when_ready(self, session: Session) -> None:
        if not await session.wait_ready():
            return  # its attach failed: close() ended this connection, the log says why
        self._gated = False
        if self.closed:
            return
        if not self._reading_paused:
            self.transport.resume_reading()
        if self.buf:
            self._process()

    # --- transmission --------------------------------------------------------------------

    def on_data(self) -> None:
        if self.transmitting and not self._gated:
            self._process()

    def _process(self) -> None:
        """Handle every complete request in the buffer."""
        buf = self.buf
        pos = 0
        end = len(buf)
        self.begin_batch()
        try:
            while end - pos >= REQ_SIZE and not self.closed:
                magic, flags, cmd, handle, offset, length = REQ.unpack_from(buf, pos)
                if magic != W.REQUEST_MAGIC:
                    raise ProtocolError("bad request magic")
                if cmd == W.CMD_WRITE:
                    if length > W.MAX_BLOCK:
                        raise ProtocolError("write payload too large")
                    if end - pos - REQ_SIZE < length:
                        break  # payload not all here yet
                    data = bytes(buf[pos + REQ_SIZE : pos + REQ_SIZE + length])
                    pos += REQ_SIZE + length
                    self._write(flags, handle, offset, data)
                elif cmd == W.CMD_READ:
                    pos += REQ_SIZE
                    self._read(flags, handle, offset, length)
                else:
                    pos += REQ_SIZE
                    self._command(flags, cmd, handle, offset, length)
        except ProtocolError as e:
            log.info("nbd client %s: %s", self.peer, e)
            self.abort("protocol-error")
            return
        finally:
            if pos:
                del buf[:pos]
            self.end_batch()
        if self.inflight >= MAX_INFLIGHT and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def _bad_range(self, offset: int, length: int) -> bool:
        return offset + length > self.size or length > W.MAX_BLOCK

    def _error(self, handle: int, err: int, is_read: bool = False, msg: str = "") -> None:
        if self.structured and is_read:
            self.write(P.structured_error(handle, err, msg))
        else:
            self.write(P.simple_reply(err, handle))

    def _read(self, flags: int, handle: int, offset: int, length: int, t0: float = 0.0) -> None:
        t0 = t0 or perf_counter()
        if self._bad_range(offset, length):
            err = W.EOVERFLOW if length > W.MAX_BLOCK and self.structured else W.EINVAL
            return self._error(handle, err, True, "read out of range")
        assert self.backend is not None and self.session is not None
        try:
            pieces = self.backend.map_read(offset, length)
        except BlocksMissing as miss:  # a remote store's blocks: answered once fetched
            self.inflight += 1
            self.spawn(self._read_when_fetched(flags, handle, offset, length, miss, t0))
            return None
        if (
            length >= SENDFILE_MIN
            and self.zero_copy
            and len(self.mgr.connections) >= self.mgr.settings.nbd_zero_copy_min_connections
            and all_cached(pieces)
        ):
            self._read_zero_copy(handle, offset, length, pieces)
            READ_LATENCY.observe(perf_counter() - t0)
            return None
        if self.structured:
            hlen = SREAD_HDR.size
            out = self._reply_buffer(hlen + length, pieces, hlen)
            SREAD_HDR.pack_into(
                out, 0, W.STRUCTURED_REPLY_MAGIC, W.REPLY_FLAG_DONE,
                W.REPLY_TYPE_OFFSET_DATA, handle, 8 + length, offset,
            )  # fmt: skip
        else:
            hlen = SIMPLE.size
            out = self._reply_buffer(hlen + length, pieces, hlen)
            SIMPLE.pack_into(out, 0, W.SIMPLE_REPLY_MAGIC, 0, handle)
        self.count_read(length)
        self.session.record("r", offset, length)
        view = memoryview(out)[hlen:]
        try:
            if read_into_nowait(pieces, view):
                self.write(out)
                READ_LATENCY.observe(perf_counter() - t0)
                return
        except OSError as e:
            log.warning("read %d+%d failed: %s", offset, length, e)
            return self._error(handle, W.EIO, True, str(e))
        # Not in the page cache: read in a thread; later requests may be answered first.
        if out is self._lent_reply:
            self._lent_reply = None  # the thread fills it after this batch: not reused
        self.inflight += 1
        self.spawn(self._slow_read(handle, pieces, view, out, t0))

    def _reply_buffer(self, size: int, pieces: list[Piece], hlen: int) -> bytearray:
        """A buffer for a copied read's reply: the previous one again once the transport
        has sent it (no allocation and zero fill of 128 KiB per read), else a new zeroed
        one. One per batch is lent, and only on our own transport, whose queue says at the
        batch's end whether the buffer was sent (end_batch)."""
        if self._batch is None or not self.zero_copy or self._lent_reply is not None:
            return bytearray(size)
        out = self._spare_reply
        self._spare_reply = None
        if out is not None and len(out) == size:
            pos = hlen
            for fd, _off, n in pieces:  # read_into_nowait skips zero pieces: clear them
                if fd == ZERO_FD:
                    out[pos : pos + n] = bytes(n)
                pos += n
        elif size <= MAX_SPARE_REPLY:
            out = bytearray(size)
        else:
            return bytearray(size)
        self._lent_reply = out
        return out

    def end_batch(self) -> None:
        super().end_batch()
        lent, self._lent_reply = self._lent_reply, None
        if lent is not None and not self.transport.get_write_buffer_size():  # type: ignore[attr-defined]
            self._spare_reply = lent

    def _read_zero_copy(self, handle: int, offset: int, length: int, pieces: list[Piece]) -> None:
        """Header from Python, data by sendfile straight from the page cache."""
        assert self.session is not None
        self.write(P.read_reply_header(self.structured, handle, offset, length))
        for fd, off, n in pieces:
            if fd == ZERO_FD:
                while n:
                    k = min(n, len(ZEROS))
                    self.write(ZEROS[:k])
                    n -= k
            else:
                self.write_file(fd, off, n)
        self.count_read(length)
        self.session.record("r", offset, length)

    async def _slow_read(
        self, handle: int, pieces: list[Piece], view: memoryview, out: bytearray, t0: float
    ) -> None:
        try:
            await self.loop.run_in_executor(None, read_into, pieces, view)
        except OSError as e:
            self._error(handle, W.EIO, True, str(e))
        else:
            self.write(out)
        finally:
            READ_LATENCY.observe(perf_counter() - t0)
            self._done()

    async def _read_when_fetched(
        self, flags: int, handle: int, offset: int, length: int, miss: BlocksMissing, t0: float
    ) -> None:
        try:
            await miss.fetch()
        except OSError as e:
            self._error(handle, W.EIO, True, f"read failed: {e}")
            READ_LATENCY.observe(perf_counter() - t0)
        else:
            if not self.closed and self.session is not None:
                self._read(flags, handle, offset, length, t0)
        finally:
            self._done()

    def _done(self) -> None:
        self.inflight -= 1
        if self._disconnecting and not self.inflight:
            return self.close("disconnect")
        if self._reading_paused and self.inflight < MAX_INFLIGHT // 2 and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()
            if self.buf and self.transmitting:
                self._process()  # requests that arrived before we paused

    def _write(self, flags: int, handle: int, offset: int, data: bytes) -> None:
        if self.read_only:
            return self._error(handle, W.EPERM)
        if offset + len(data) > self.size:
            return self._error(handle, W.ENOSPC)
        assert self.backend is not None and self.session is not None
        self.count_written(len(data))
        self.session.record("w", offset, len(data))
        self._run(handle, self.backend.pwrite(offset, data, bool(flags & W.CMD_FLAG_FUA)), "write")

    def _command(self, flags: int, cmd: int, handle: int, offset: int, length: int) -> None:
        b = self.backend
        assert b is not None and self.session is not None
        fua = bool(flags & W.CMD_FLAG_FUA)
        if cmd == W.CMD_FLUSH:
            self._run(handle, b.flush(), "flush")
        elif cmd in (W.CMD_TRIM, W.CMD_WRITE_ZEROES):
            if self.read_only:
                return self._error(handle, W.EPERM)
            if offset + length > self.size:
                return self._error(handle, W.ENOSPC)
            self.session.record("w", offset, length)
            if cmd == W.CMD_TRIM:
                self._run(handle, b.trim(offset, length, fua), "trim")
            else:
                self._run(handle, b.zero(offset, length, fua), "zero")
        elif cmd == W.CMD_DISC:
            # Answer what is in flight, then close; no reply to DISC itself.
            self.transmitting = False
            self.transport.pause_reading()
            self._disconnecting = True
            if not self.inflight:
                self.close("disconnect")
        elif cmd == W.CMD_CACHE:
            self.write(P.simple_reply(0, handle))
        elif cmd == W.CMD_BLOCK_STATUS and self.meta_base_allocation:
            if offset + length > self.size or not length:
                return self._error(handle, W.EINVAL, True)
            self.inflight += 1
            self.spawn(self._block_status(handle, offset, length, flags))
        else:
            self._error(handle, W.EINVAL, cmd == W.CMD_BLOCK_STATUS)

    def _run(self, handle: int, op: Awaitable[None], name: str) -> None:
        self.inflight += 1
        self.spawn(self._finish(handle, op, name, perf_counter()))

    async def _finish(self, handle: int, op: Awaitable[None], name: str, t0: float) -> None:
        try:
            await op
        except PermissionError:
            self._error(handle, W.EPERM)
        except OSError as e:
            log.warning("nbd command failed: %s", e)
            self._error(handle, W.ENOSPC if e.errno == 28 else W.EIO)
        else:
            self.write(P.simple_reply(0, handle))
        finally:
            LATENCY[name].observe(perf_counter() - t0)
            self._done()

    async def _block_status(self, handle: int, offset: int, length: int, flags: int) -> None:
        assert self.backend is not None
        try:
            extents = await self.backend.extents(offset, length)
            self.write(P.block_status_reply(handle, extents, bool(flags & W.CMD_FLAG_REQ_ONE)))
        except OSError as e:
            self._error(handle, W.EIO, True, str(e))
        finally:
            self._done()
