"""A read-only TFTP server for boot files: many transfers at once, windowed, zero-copy reads.

Each transfer gets its own UDP socket (its TID, RFC 1350), connected to the client so the
kernel filters strangers and reports an ICMP "port unreachable" as an error on receive. The
data path reads each block with ``os.preadv`` straight into one reused buffer behind the
4-byte DATA header and sends that memoryview: no per-block allocation or copy in Python.
The listener lives on the event loop; each transfer runs on its own thread with a blocking
socket (see :class:`Transfer` for why).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from services.boot.rate_limit import PerSourceRate
from services.boot.tftp_packets import (
    ACK,
    ERR_ACCESS,
    ERR_NOT_FOUND,
    ERR_OPTIONS,
    ERR_UNDEFINED,
    RRQ,
    WRQ,
    PeerError,
    Request,
    TftpError,
    build_error,
    build_oack,
    is_error,
    negotiate,
    parse_ack,
    parse_request,
)
from shared.log_budget import LogBudget

log = logging.getLogger("streamboot.boot.tftp")

FILE_SHRANK = "file shrank during the transfer"
# Every DATA header, made once: a block's packet is its header and a slice of the file.
_DATA_HEADERS = tuple(struct.pack("!HH", 3, n) for n in range(65536))
# UDP generic segmentation offload (Linux >= 4.18): one sendmsg carries up to 64 datagrams
# of one size (the last may be shorter) within 64 KiB.
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
_gso_usable = True  # cleared for the process on the first send the kernel refuses
# netascii files are converted in memory; a boot file server has no business sending
# huge text files, and this bounds what one request can make us allocate.
MAX_NETASCII_BYTES = 16 * 1024 * 1024
# The listener's receive buffer: room for a burst of requests (a boot storm, or a flood a
# real client's request must get through) while the loop is busy elsewhere.
LISTENER_RCVBUF = 4 * 1024 * 1024


@dataclass(frozen=True)
class TftpConfig:
    root: Path
    timeout_s: float = 1.0
    retries: int = 5
    max_blksize: int = 65464
    max_windowsize: int = 64
    max_transfers: int = 512
    # What one client may take (see docs/boot.md, "Limits"): a PXE or iPXE client needs one
    # or two transfers and a few requests a second; a client's `timeout` option above the
    # cap is ignored (each interval holds a slot).
    max_client_timeout_s: int = 10
    max_transfers_per_client: int = 4
    client_requests_per_s: float = 10.0  # bursts of 3 s worth; 0: no limit


def enlarge_receive_buffer(sock: socket.socket, size: int) -> None:
    """SO_RCVBUFFORCE where permitted (root, CAP_NET_ADMIN: what port 69 runs as), else
    SO_RCVBUF, which the kernel caps at net.core.rmem_max."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), size)
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def resolve_path(root: Path, filename: str) -> Path:
    """The file under ``root`` that ``filename`` names, or TftpError: absolute names, ``..``
    and symlinks that lead out of the root are refused (access violation)."""
    name = filename.replace("\\", "/")  # PXE clients from the Windows world use backslashes
    if name.startswith("/"):
        raise TftpError(ERR_ACCESS, "absolute paths are refused")
    if any(part == ".." for part in name.split("/")):
        raise TftpError(ERR_ACCESS, "'..' is refused")
    real_root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(real_root, name))
    if full != real_root and not full.startswith(real_root + os.sep):
        raise TftpError(ERR_ACCESS, "path leads outside the TFTP root")
    return Path(full)


class Source:
    """What a transfer sends: the whole file as one read-only memoryview.

    A regular file is mapped (``mmap``), so a block is a slice of the page cache handed to
    ``sendmsg`` with its header: no read syscall and no copy in Python. Should the file
    shrink under a transfer, the kernel answers that send with EFAULT (it never touches the
    pages from Python, so no SIGBUS) and the transfer ends with an error.
    """

    def __init__(self, data: bytes | mmap.mmap) -> None:
        self._data = data
        self.view = memoryview(data)
        self.size = len(self.view)

    def close(self) -> None:
        self.view.release()
        if isinstance(self._data, mmap.mmap):
            with contextlib.suppress(BufferError):  # a slice still held: the GC unmaps it
                self._data.close()


def open_source(path: Path, mode: str) -> Source:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise TftpError(ERR_NOT_FOUND, "file not found") from exc
    except PermissionError as exc:
        raise TftpError(ERR_ACCESS, "permission denied") from exc
    except OSError as exc:
        raise TftpError(ERR_NOT_FOUND, f"cannot open: {exc.strerror}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise TftpError(ERR_NOT_FOUND, "not a regular file")
    if mode != "netascii":
        try:
            if st.st_size == 0:
                return Source(b"")  # an empty file cannot be mapped
            return Source(mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ))
        except OSError as exc:
            raise TftpError(ERR_NOT_FOUND, f"cannot read: {exc.strerror}") from exc
        finally:
            os.close(fd)  # the mapping keeps the file
    try:
        if st.st_size > MAX_NETASCII_BYTES:
            raise TftpError(ERR_ACCESS, "file too large for netascii, use octet")
        raw = os.pread(fd, st.st_size, 0)
    finally:
        os.close(fd)
    # netascii: CR -> CR NUL, then LF -> CR LF (RFC 764 line ends)
    return Source(raw.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n"))


class Transfer:
    """One read transfer (RRQ) on its own thread: OACK handshake, then windows of DATA until
    the last ACK.

    A thread with a blocking socket, not event-loop callbacks: in lock-step (what PXE
    firmware and iPXE do) each block is one round trip, and waking from a blocking ``recv``
    saves the epoll round and callback dispatch of the loop on every block — measured, the
    difference between trailing tftpd-hpa and matching it. Syscalls release the GIL, so
    transfers run side by side with each other and with the event loop.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        peer: tuple[str, int],
        request: Request,
        source: Source,
        config: TftpConfig,
        on_done: Callable[[Transfer, str | None], None],
        datagram: bytes = b"",
    ) -> None:
        self.loop, self.sock, self.peer, self.request = loop, sock, peer, request
        self.datagram = datagram  # the request as it came: its resends are recognised
        self.source, self.on_done = source, on_done
        n = negotiate(
            request.options,
            source.size,
            max_blksize=config.max_blksize,
            max_windowsize=config.max_windowsize,
            max_timeout_s=config.max_client_timeout_s,
        )
        self.blksize, self.windowsize = n.blksize, n.windowsize
        self.timeout_s = n.timeout_s or config.timeout_s
        self.max_retries = config.retries
        self.oack = build_oack(n.acknowledged) if n.acknowledged else None
        # The final block is the first one shorter than blksize (possibly empty).
        self.last_block = source.size // self.blksize + 1
        self.data = source.view
        self.acked = 0  # absolute number of the highest block acknowledged (0: none yet)
        self.sent = 0  # absolute number of the highest block sent
        # With UDP GSO a window goes out in one sendmsg of header/data iovecs that the
        # kernel cuts into datagrams of exactly one packet each.
        self.segment = 4 + self.blksize
        self.batch = min(self.windowsize, GSO_MAX_SEGMENTS, GSO_MAX_BYTES // self.segment) or 1
        self.inbox = bytearray(2048)  # ACKs and ERRORs are small; longer is cut, then refused
        self.gso_option = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", self.segment))]
        self.aborted: str | None = None
        # Since when (monotonic) the transfer waits for its client: its start or the last
        # ACK that moved it on. Written by the transfer's thread, read by the listener to
        # pick the slot to reclaim when all are taken.
        self.waiting_since = self.started = time.monotonic()
        self.started_ns = time.time_ns()
        self.ended_ns = 0
        self.thread = threading.Thread(target=self._run, name=f"tftp {peer[0]}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def seconds(self) -> float:
        return (self.ended_ns - self.started_ns) / 1e9

    @property
    def bytes_acknowledged(self) -> int:
        return min(self.acked * self.blksize, self.source.size)

    def abort(self, reason: str) -> None:
        """End the transfer from any thread: its blocked receive returns at once."""
        self.aborted = reason
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        try:
            error = self._serve()
            if error == FILE_SHRANK:  # our failure, not the client's: tell it why
                self._send(build_error(ERR_UNDEFINED, error))
        except Exception as exc:  # one transfer's bug must not go unseen in a dead thread
            log.exception("tftp %s: transfer to %s failed", self.request.filename, self.peer)
            error = f"internal error: {exc}"
        finally:
            self.sock.close()
            self.source.close()
        self.ended_ns = time.time_ns()
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending
            self.loop.call_soon_threadsafe(self.on_done, self, error)

    def _serve(self) -> str | None:
        """The whole transfer: None once the client acknowledged the last block, else why not."""
        sock, inbox, timeout_s = self.sock, self.inbox, self.timeout_s
        sock.setblocking(True)
        seconds, fraction = divmod(timeout_s, 1.0)
        timeval = struct.pack("ll", int(seconds), int(fraction * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        oack_pending = self.oack is not None
        resend = self._send_oack if oack_pending else self._send_window
        retries = max_retries = self.max_retries
        lockstep, blksize, data = self.windowsize == 1, self.blksize, self.data
        sendmsg, headers, monotonic = sock.sendmsg, _DATA_HEADERS, time.monotonic
        error = resend()
        deadline = monotonic() + timeout_s
        while error is None:
            try:
                n = sock.recv_into(inbox)
            except BlockingIOError:  # SO_RCVTIMEO: nothing arrived in time
                n = -1
            except OSError as exc:  # ICMP port unreachable: the client is gone
                return f"client unreachable: {exc.strerror}"
            if self.aborted:
                return self.aborted
            if n >= 0:
                if n == 4 and inbox[1] == ACK and inbox[0] == 0 and not oack_pending:
                    number: int | None = inbox[2] << 8 | inbox[3]  # a plain ACK
                    if lockstep and number == self.sent & 0xFFFF and self.sent < self.last_block:
                        # The hot path of lock-step (PXE, iPXE): the ACK of the block just
                        # sent; the next block goes out at once, with no calls in between.
                        self.acked = acked = self.sent
                        self.sent = block = acked + 1
                        offset = acked * blksize
                        try:
                            sendmsg([headers[block & 0xFFFF], data[offset : offset + blksize]])
                        except OSError as exc:
                            return self._send_failed(exc)
                        retries = max_retries
                        self.waiting_since = now = monotonic()
                        deadline = now + timeout_s
                        continue
                else:
                    try:
                        number = self._ack_number(bytes(inbox[:n]))
                    except PeerError as exc:
                        reason = (
                            "client refused options" if exc.code == ERR_OPTIONS else "client error"
                        )
                        return f"{reason}: {exc.code} {exc.message}"
                if number is not None and self._progress(number, oack_pending):
                    if self.acked >= self.last_block:
                        return None
                    oack_pending, resend = False, self._send_window
                    retries = self.max_retries
                    self.waiting_since = time.monotonic()
                    error = self._send_window()
                    deadline = time.monotonic() + timeout_s
                    continue
                if time.monotonic() < deadline:
                    continue  # a duplicate, stray or bad packet: keep waiting
            if retries <= 0:
                self._send(build_error(ERR_UNDEFINED, "timeout: no acknowledgement"))
                return "client stopped acknowledging"
            retries -= 1
            error = resend()  # the OACK, or the window from the last acknowledged block
            deadline = time.monotonic() + timeout_s
        return error

    def _ack_number(self, packet: bytes) -> int | None:
        """The block number of an ACK; None for a packet to ignore; PeerError for an ERROR."""
        try:
            return parse_ack(packet)
        except PeerError:
            raise  # the client ends the transfer
        except TftpError as exc:  # debug only: the peer chooses how many it sends
            log.debug(
                "tftp %s: ignoring bad packet from %s: %s", self.request.filename, self.peer, exc
            )
            return None

    def _progress(self, number: int, oack_pending: bool) -> bool:
        """Take in an ACK; whether it moved the transfer on. Duplicate and stray ACKs never
        cause a resend (Sorcerer's Apprentice)."""
        if oack_pending:
            return number == 0  # ACK 0: the client accepted our options, data starts
        # Map the 16-bit number onto the window in flight (block numbers roll over).
        ahead = (number - self.acked) & 0xFFFF
        if ahead == 0 or self.acked + ahead > self.sent:
            return False
        self.acked += ahead
        return True

    # -- sending: each returns why the transfer must end, or None ---------------------------

    def _send(self, packet: bytes) -> str | None:
        return self._sendmsg([packet])

    def _send_oack(self) -> str | None:
        assert self.oack is not None
        return self._send(self.oack)  # the client answers with ACK 0

    def _send_window(self) -> str | None:
        """The window after the last acknowledged block (all of it again after a timeout; the
        rest of it after an ACK inside it, when the client lost the tail)."""
        first = self.acked + 1
        last = min(self.acked + self.windowsize, self.last_block)
        self.sent = last
        if first == last:  # lock-step, the hot path: one sendmsg, header + file slice
            offset = (first - 1) * self.blksize
            return self._sendmsg(
                [_DATA_HEADERS[first & 0xFFFF], self.data[offset : offset + self.blksize]]
            )
        for start in range(first, last + 1, self.batch):
            error = self._send_batch(start, min(start + self.batch - 1, last))
            if error:
                return error
        return None

    def _send_batch(self, first: int, last: int) -> str | None:
        """Blocks ``first``..``last`` in one GSO sendmsg, or one sendmsg each without GSO."""
        blksize, data = self.blksize, self.data
        iov: list[bytes | memoryview] = []
        for block in range(first, last + 1):
            offset = (block - 1) * blksize
            iov += (_DATA_HEADERS[block & 0xFFFF], data[offset : offset + blksize])
        global _gso_usable
        if _gso_usable and first != last:
            try:
                self.sock.sendmsg(iov, self.gso_option)
                return None
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOPROTOOPT, errno.EIO, errno.EOPNOTSUPP):
                    return self._send_failed(exc)
                log.info("tftp: no UDP GSO here (%s); sending one packet per syscall", exc)
                _gso_usable = False
        for i in range(0, len(iov), 2):
            error = self._sendmsg(iov[i : i + 2])
            if error:
                return error
        return None

    def _sendmsg(self, iov: list[bytes | memoryview]) -> str | None:
        try:
            self.sock.sendmsg(iov)
        except OSError as exc:
            return self._send_failed(exc)
        return None

    def _send_failed(self, exc: OSError) -> str:
        if exc.errno == errno.EFAULT:  # the mapped file lost pages under us
            return FILE_SHRANK
        return f"send failed: {exc.strerror}"


class TftpServer:
    """The listener on the well-known port: parses requests and starts transfers.

    A transfer holds a slot from its request until its thread ends. Slots are kept per
    client port (a different request from the same address and port replaces that port's
    transfer: the client gave up on it; the same request again, before the client has
    acknowledged anything, is its resend and changes nothing) and limited per client
    address. When all are taken, a new request may take one (see :meth:`_victim`).
    Requests beyond an address's rate are dropped unanswered: an answer to a forged source
    address would go to someone else.
    """

    def __init__(
        self,
        config: TftpConfig,
        host: str,
        port: int,
        on_transfer: Callable[[Transfer, str | None], None] | None = None,
    ) -> None:
        self.config, self.host, self.port = config, host, port
        self.on_transfer = on_transfer  # told of each transfer's end (on the event loop)
        self.transfers: set[Transfer] = set()  # every running transfer
        self.stats = {
            "transfers": 0, "completed": 0, "failed": 0, "bytes": 0, "refused": 0,
            "dropped": 0, "replaced": 0, "duplicates": 0, "reclaimed": 0, "errors_ignored": 0,
        }  # fmt: skip
        self._slots: dict[tuple[str, int], Transfer] = {}  # the slot holders by client port
        self._by_address: dict[str, set[Transfer]] = {}  # the slot holders by client address
        rate = config.client_requests_per_s
        self._rate = PerSourceRate(rate, max(1.0, 3 * rate))
        self._log = LogBudget(log, "tftp")
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Listener(self), local_addr=(self.host, self.port)
        )
        enlarge_receive_buffer(self._transport.get_extra_info("socket"), LISTENER_RCVBUF)
        self.port = self._transport.get_extra_info("sockname")[1]
        log.info("tftp: serving %s on %s:%d", self.config.root, self.host, self.port)

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
        transfers = list(self.transfers)
        for transfer in transfers:
            transfer.abort("server stopping")
        for transfer in transfers:  # their threads end at once: the receive was shut down
            await asyncio.to_thread(transfer.thread.join, 5.0)
        self._log.flush()

    def on_datagram(self, data: bytes, peer: tuple[str, int]) -> None:
        assert self._transport is not None
        address = peer[0]
        if is_error(data):
            self.stats["errors_ignored"] += 1
            return
        old = self._slots.get(peer)
        if old is not None and old.datagram == data and old.waiting_since == old.started:
            # The client's resend of a request we have not heard back on: the same transfer
            # (its own timer resends the first packet), so a resend costs nothing.
            self.stats["duplicates"] += 1
            return
        if not self._rate.allow(address):
            self.stats["dropped"] += 1
            self._log.log(
                logging.WARNING, "over the request rate", address,
                "tftp: dropping requests from %s: more than %g a second",
                address, self.config.client_requests_per_s,
            )  # fmt: skip
            return
        source: Source | None = None
        try:
            request = parse_request(data)
            if request.opcode == WRQ:
                raise TftpError(ERR_ACCESS, "read-only server")
            if old is not None:
                self.stats["replaced"] += 1
                self._free(old, "replaced by a new request from the same port")
            if len(self._by_address.get(address, ())) >= self.config.max_transfers_per_client:
                raise TftpError(ERR_UNDEFINED, "too many transfers from this address, try again")
            source = open_source(resolve_path(self.config.root, request.filename), request.mode)
            if len(self._slots) >= self.config.max_transfers:
                if (victim := self._victim(address)) is None:
                    raise TftpError(ERR_UNDEFINED, "server busy, try again")
                self.stats["reclaimed"] += 1
                self._free(victim, "slot reclaimed for another client: the server is full")
        except TftpError as exc:
            if source is not None:
                source.close()
            self.stats["refused"] += 1
            self._log.log(
                logging.WARNING, exc.message, address,
                "tftp: refused request from %s:%d: %s", *peer, exc.message,
            )  # fmt: skip
            self._transport.sendto(build_error(exc.code, exc.message), peer)
            return
        except Exception:  # never let one request take the listener down
            log.exception("tftp: request from %s:%d failed", *peer)
            self._transport.sendto(build_error(ERR_UNDEFINED, "internal error"), peer)
            return
        assert request.opcode == RRQ and source is not None
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.bind((self.host, 0))
            sock.connect(peer)
        except OSError as exc:
            source.close()
            self._log.log(
                logging.ERROR, "no transfer socket", address,
                "tftp: cannot open a transfer socket for %s:%d: %s", *peer, exc,
            )  # fmt: skip
            return
        transfer = Transfer(
            asyncio.get_running_loop(), sock, peer, request, source, self.config, self._done, data
        )
        self.transfers.add(transfer)
        self._slots[peer] = transfer
        self._by_address.setdefault(address, set()).add(transfer)
        self.stats["transfers"] += 1
        log.debug(
            "tftp: %s -> %s:%d blksize=%d windowsize=%d",
            request.filename,
            *peer,
            transfer.blksize,
            transfer.windowsize,
        )
        transfer.start()

    def _victim(self, address: str) -> Transfer | None:
        """The slot a request from ``address`` may take on a full server: one of the address
        that holds the most, if that is at least two more than ``address`` holds (slots
        spread over addresses and do not swap back and forth; a machine keeps at least
        one); else one whose client has not answered for a whole retransmission interval;
        else none."""
        held = max(self._by_address.values(), key=len)
        if len(held) > len(self._by_address.get(address, ())) + 1:
            return min(held, key=_reclaim_order)
        now = time.monotonic()
        stale = [t for t in self._slots.values() if now - t.waiting_since >= t.timeout_s]
        return min(stale, key=_reclaim_order) if stale else None

    def _free(self, transfer: Transfer, reason: str) -> None:
        """End a transfer and give its slot to a new request now (its thread ends soon)."""
        self._release(transfer)
        transfer.abort(reason)

    def _release(self, transfer: Transfer) -> None:
        if self._slots.get(transfer.peer) is not transfer:
            return  # released already (replaced or reclaimed)
        del self._slots[transfer.peer]
        address = transfer.peer[0]
        held = self._by_address[address]
        held.discard(transfer)
        if not held:
            del self._by_address[address]

    def _done(self, transfer: Transfer, error: str | None) -> None:
        self.transfers.discard(transfer)
        self._release(transfer)
        if error is None:
            self.stats["completed"] += 1
            self.stats["bytes"] += transfer.source.size
            self._log.log(
                logging.INFO, "sent", transfer.peer[0],
                "tftp: sent %s (%d bytes) to %s:%d in %.3fs",
                transfer.request.filename, transfer.source.size, *transfer.peer,
                transfer.seconds,
            )  # fmt: skip
        else:
            self.stats["failed"] += 1
            self._log.log(
                logging.WARNING, f"ended: {error.split(':', 1)[0]}", transfer.peer[0],
                "tftp: transfer of %s to %s:%d ended: %s",
                transfer.request.filename, *transfer.peer, error,
            )  # fmt: skip
        if self.on_transfer is not None:
            try:
                self.on_transfer(transfer, error)
            except Exception:  # an observer's bug must not stop the accounting
                log.exception("tftp: transfer observer failed")


def _reclaim_order(transfer: Transfer) -> tuple[bool, float]:
    """Which of the candidates a full server takes first: a transfer whose client never
    acknowledged anything (no sign that anyone is there: a forged source never sees the
    TID), the oldest first; then the one that has waited longest for its client."""
    return transfer.waiting_since != transfer.started, transfer.waiting_since


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, server: TftpServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("tftp listener: %s", exc)


@contextlib.asynccontextmanager
async def running(
    config: TftpConfig, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[TftpServer]:
    """A started server for the duration of a block (tests, the benchmark)."""
    server = TftpServer(config, host, port)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
