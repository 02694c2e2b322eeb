"""A read-only TFTP server for boot files: many transfers at once, windowed, zero-copy reads.

Each transfer gets its own UDP socket (its TID, RFC 1350), connected to the client so the
kernel filters strangers and reports an ICMP "port unreachable" as an error on receive. The
data path reads each block with ``os.preadv`` straight into one reused buffer behind the
4-byte DATA header and sends that memoryview: no per-block allocation or copy in Python.
Sends and ACKs are driven by ``loop.add_reader`` callbacks, not a coroutine per packet,
which keeps the per-packet cost at a few microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

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
    negotiate,
    parse_ack,
    parse_request,
)

log = logging.getLogger("streamboot.boot.tftp")

_PACK_DATA = struct.Struct("!HH").pack_into
# UDP generic segmentation offload (Linux >= 4.18): one sendmsg carries up to 64 datagrams
# of one size (the last may be shorter) within 64 KiB.
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
_gso_usable = True  # cleared for the process on the first send the kernel refuses
# netascii files are converted in memory; a boot file server has no business sending
# huge text files, and this bounds what one request can make us allocate.
MAX_NETASCII_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class TftpConfig:
    root: Path
    timeout_s: float = 1.0
    retries: int = 5
    max_blksize: int = 65464
    max_windowsize: int = 64
    max_transfers: int = 512


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
    """What a transfer reads blocks from."""

    size: int

    def readv(self, offset: int, buffers: list[memoryview]) -> int:
        """Fill ``buffers`` in order from ``offset``; the byte count (short at the end)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class FileSource(Source):
    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size

    def readv(self, offset: int, buffers: list[memoryview]) -> int:
        return os.preadv(self.fd, buffers, offset)

    def close(self) -> None:
        os.close(self.fd)


class BytesSource(Source):
    def __init__(self, data: bytes) -> None:
        self.data, self.size = memoryview(data), len(data)

    def readv(self, offset: int, buffers: list[memoryview]) -> int:
        total = 0
        for buffer in buffers:
            chunk = self.data[offset + total : offset + total + len(buffer)]
            buffer[: len(chunk)] = chunk
            total += len(chunk)
        return total


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
        return FileSource(fd, st.st_size)
    try:
        if st.st_size > MAX_NETASCII_BYTES:
            raise TftpError(ERR_ACCESS, "file too large for netascii, use octet")
        raw = os.pread(fd, st.st_size, 0)
    finally:
        os.close(fd)
    # netascii: CR -> CR NUL, then LF -> CR LF (RFC 764 line ends)
    return BytesSource(raw.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n"))


class Transfer:
    """One read transfer (RRQ): OACK handshake, then windows of DATA until the last ACK."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        peer: tuple[str, int],
        request: Request,
        source: Source,
        config: TftpConfig,
        on_done: Callable[[Transfer, str | None], None],
    ) -> None:
        self.loop, self.sock, self.peer, self.request = loop, sock, peer, request
        self.source, self.on_done = source, on_done
        n = negotiate(
            request.options,
            source.size,
            max_blksize=config.max_blksize,
            max_windowsize=config.max_windowsize,
        )
        self.blksize, self.windowsize = n.blksize, n.windowsize
        self.timeout_s = n.timeout_s or config.timeout_s
        self.retries_left = self.max_retries = config.retries
        self.oack = build_oack(n.acknowledged) if n.acknowledged else None
        # The final block is the first one shorter than blksize (possibly empty).
        self.last_block = source.size // self.blksize + 1
        self.acked = 0  # absolute number of the highest block acknowledged (0: none yet)
        self.sent = 0  # absolute number of the highest block sent
        # One buffer of DATA packets laid end to end: a window is read with one preadv
        # (the payload slots skip the 4-byte headers) and, with UDP GSO, sent with one
        # sendmsg that the kernel cuts into datagrams of exactly one packet each.
        self.segment = 4 + self.blksize
        self.batch = min(self.windowsize, GSO_MAX_SEGMENTS, GSO_MAX_BYTES // self.segment) or 1
        self.buffer = bytearray(self.segment * self.batch)
        self.view = memoryview(self.buffer)
        self.payloads = [
            self.view[i * self.segment + 4 : (i + 1) * self.segment] for i in range(self.batch)
        ]
        self.inbox = bytearray(2048)  # ACKs and ERRORs are small; longer is cut, then refused
        self.gso_option = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", self.segment))]
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.finished = False
        self.oack_pending = self.oack is not None
        self.started = loop.time()

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._on_readable)
        if self.oack is not None:
            self._send(self.oack)  # the client answers with ACK 0
            self._arm()
        else:
            self._send_window()

    # -- sending -------------------------------------------------------------------------

    def _send(self, packet: bytes | memoryview) -> None:
        try:
            self.sock.send(packet)
        except (BlockingIOError, InterruptedError):
            pass  # a full socket buffer is a lost packet: the timeout resends it
        except OSError as exc:
            self._finish(f"send failed: {exc}")

    def _send_window(self) -> None:
        last = min(self.acked + self.windowsize, self.last_block)
        block = self.acked + 1
        while block <= last and not self.finished:
            count = min(self.batch, last - block + 1)
            self._send_blocks(block, count)
            block += count
        self.sent = last
        self._arm()

    def _send_blocks(self, first: int, count: int) -> None:
        """Blocks ``first``..``first+count-1``: one read, then one send (GSO) or one each."""
        blksize, segment, buffer = self.blksize, self.segment, self.buffer
        n = self.source.readv((first - 1) * blksize, self.payloads[:count])
        if n < (count - 1) * blksize:
            self._finish("file shrank during the transfer")
            return
        for i in range(count):
            _PACK_DATA(buffer, i * segment, 3, (first + i) & 0xFFFF)
        total = 4 * count + n
        if count == 1:
            self._send(self.view[:total])
            return
        global _gso_usable
        if _gso_usable:
            try:
                self.sock.sendmsg([self.view[:total]], self.gso_option)
                return
            except (BlockingIOError, InterruptedError):
                return  # lost: the timeout resends
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOPROTOOPT, errno.EIO, errno.EOPNOTSUPP):
                    self._finish(f"send failed: {exc}")
                    return
                log.info("tftp: no UDP GSO here (%s); sending one packet per syscall", exc)
                _gso_usable = False
        for i in range(count):
            start = i * segment
            self._send(self.view[start : min(start + segment, total)])

    def _arm(self) -> None:
        self.deadline = self.loop.time() + self.timeout_s
        if self.timer is None:
            self.timer = self.loop.call_at(self.deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.finished:
            return
        now = self.loop.time()
        if now < self.deadline:  # progress since: sleep until the new deadline
            self.timer = self.loop.call_at(self.deadline, self._on_timer)
            return
        if self.retries_left <= 0:
            self._send(build_error(ERR_UNDEFINED, "timeout: no acknowledgement"))
            self._finish("client stopped acknowledging")
            return
        self.retries_left -= 1
        if self.oack_pending:
            self._send(self.oack)
            self._arm()
        else:
            self._send_window()

    # -- receiving -----------------------------------------------------------------------

    def _on_readable(self) -> None:
        # One datagram per wakeup: the reader is level-triggered, so a second queued ACK
        # calls us again, and lock-step transfers save a failing recv() per block.
        inbox = self.inbox
        try:
            n = self.sock.recv_into(inbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # ICMP port unreachable: the client is gone
            self._finish(f"client unreachable: {exc.strerror}")
            return
        if n == 4 and inbox[1] == ACK and inbox[0] == 0 and not self.oack_pending:
            self._on_ack(inbox[2] << 8 | inbox[3])  # the hot path: a plain ACK
        else:
            self._on_packet(bytes(inbox[:n]))

    def _on_packet(self, data: bytes) -> None:
        try:
            number = parse_ack(data)
        except PeerError as exc:
            reason = "client refused options" if exc.code == ERR_OPTIONS else "client error"
            self._finish(f"{reason}: {exc.code} {exc.message}")
            return
        except TftpError as exc:
            log.warning(
                "tftp %s: ignoring bad packet from %s: %s", self.request.filename, self.peer, exc
            )
            return
        if self.oack_pending:
            if number == 0:  # the client accepted our options: data starts
                self.oack_pending = False
                self.retries_left = self.max_retries
                self._send_window()
            return
        self._on_ack(number)

    def _on_ack(self, number: int) -> None:
        # Map the 16-bit number onto the window in flight (block numbers roll over).
        acked = self.acked
        ahead = (number - acked) & 0xFFFF
        if ahead == 0 or acked + ahead > self.sent:
            return  # a duplicate or stray ACK: never resend on it (Sorcerer's Apprentice)
        self.acked = acked = acked + ahead
        self.retries_left = self.max_retries
        if acked >= self.last_block:
            self._finish(None)
        else:
            self._send_window()

    def abort(self, reason: str) -> None:
        self._finish(reason)

    def _finish(self, error: str | None) -> None:
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.source.close()
        self.on_done(self, error)


class TftpServer:
    """The listener on the well-known port: parses requests and starts transfers."""

    def __init__(self, config: TftpConfig, host: str, port: int) -> None:
        self.config, self.host, self.port = config, host, port
        self.transfers: set[Transfer] = set()
        self.stats = {"transfers": 0, "completed": 0, "failed": 0, "bytes": 0, "refused": 0}
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Listener(self), local_addr=(self.host, self.port)
        )
        self.port = self._transport.get_extra_info("sockname")[1]
        log.info("tftp: serving %s on %s:%d", self.config.root, self.host, self.port)

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
        for transfer in list(self.transfers):
            transfer.abort("server stopping")

    def on_datagram(self, data: bytes, peer: tuple[str, int]) -> None:
        assert self._transport is not None
        try:
            request = parse_request(data)
            if request.opcode == WRQ:
                raise TftpError(ERR_ACCESS, "read-only server")
            if len(self.transfers) >= self.config.max_transfers:
                raise TftpError(ERR_UNDEFINED, "server busy, try again")
            path = resolve_path(self.config.root, request.filename)
            source = open_source(path, request.mode)
        except TftpError as exc:
            self.stats["refused"] += 1
            log.warning("tftp: refused request from %s:%d: %s", *peer, exc.message)
            self._transport.sendto(build_error(exc.code, exc.message), peer)
            return
        except Exception:  # never let one request take the listener down
            log.exception("tftp: request from %s:%d failed", *peer)
            self._transport.sendto(build_error(ERR_UNDEFINED, "internal error"), peer)
            return
        assert request.opcode == RRQ
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.bind((self.host, 0))
            sock.connect(peer)
        except OSError as exc:
            source.close()
            log.error("tftp: cannot open a transfer socket for %s:%d: %s", *peer, exc)
            return
        transfer = Transfer(
            asyncio.get_running_loop(), sock, peer, request, source, self.config, self._done
        )
        self.transfers.add(transfer)
        self.stats["transfers"] += 1
        log.debug(
            "tftp: %s -> %s:%d blksize=%d windowsize=%d",
            request.filename,
            *peer,
            transfer.blksize,
            transfer.windowsize,
        )
        transfer.start()

    def _done(self, transfer: Transfer, error: str | None) -> None:
        self.transfers.discard(transfer)
        if error is None:
            self.stats["completed"] += 1
            self.stats["bytes"] += transfer.source.size
            log.info(
                "tftp: sent %s (%d bytes) to %s:%d in %.3fs",
                transfer.request.filename,
                transfer.source.size,
                *transfer.peer,
                transfer.loop.time() - transfer.started,
            )
        else:
            self.stats["failed"] += 1
            log.warning(
                "tftp: transfer of %s to %s:%d ended: %s",
                transfer.request.filename,
                *transfer.peer,
                error,
            )


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
