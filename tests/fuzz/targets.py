"""One fuzz target per parser of bytes from the network or a disk.

Each target takes the raw input and drives the real parser with it. The only exceptions a
target lets pass are the parser's own "bad input" errors (``ALLOWED``): anything else that
escapes is a finding. ``run.py`` runs them under atheris (``make fuzz``); ``test_corpus.py``
runs each over its seed corpus in the normal suite.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import orjson
from pydantic import ValidationError

from services.boot import dhcp_packets, tftp_packets
from services.stream.nbd import protocol as nbd_protocol
from services.stream.server import StreamServers
from services.stream.settings import StreamSettings
from services.stream.spec import ExportSpec
from shared import http_head, vdisk_layout
from shared.envelope import Envelope
from shared.event_owners import OWNERS, Refused, admit
from shared.partitions import read_partitions
from tests.doubles import NullSink, StaticResolver

Target = Callable[[bytes], None]


def http_head_target(data: bytes) -> None:
    """A request head as a client sends it, its Content-Length and its Range."""
    try:
        head = http_head.parse_head(data)
        head.content_length()
        if "range" in head.headers:
            for size in (0, 1, 4096, 1 << 40):
                http_head.parse_range(head.headers["range"], size)
    except http_head.BadRequest:
        pass


def tftp_target(data: bytes) -> None:
    """A datagram at the server (a request, then the ACKs of a transfer) and at the client
    (an OACK), and the options negotiated from a request."""
    try:
        req = tftp_packets.parse_request(data)
        tftp_packets.negotiate(req.options, 1 << 20, max_blksize=65464, max_windowsize=64)
    except tftp_packets.TftpError:
        pass
    tftp_packets.is_error(data)
    try:
        tftp_packets.parse_ack(data)
    except tftp_packets.TftpError:
        pass
    try:
        options = tftp_packets.parse_oack(data)
        tftp_packets.negotiate(options, None, max_blksize=65464, max_windowsize=64)
    except tftp_packets.TftpError:
        pass


def dhcp_target(data: bytes) -> None:
    """A DHCP datagram, everything the server reads of it, and its rebuild."""
    try:
        p = dhcp_packets.parse(data)
    except dhcp_packets.DhcpParseError:
        return
    dhcp_packets.client_arch(p)
    dhcp_packets.is_pxe(p)
    dhcp_packets.is_ipxe(p)
    dhcp_packets.client_uuid(p)
    dhcp_packets.requested_ip(p)
    dhcp_packets.server_id(p)
    dhcp_packets.build(p)


_CALLERS = sorted(set(OWNERS.values()))


def event_target(data: bytes) -> None:
    """An event off the bus (the envelope decoder) and at the log's door (``admit``), as
    each appending service."""
    try:
        Envelope.model_validate_json(data)
    except ValidationError:
        pass
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError:
        return  # not JSON: the bus layer refuses it before the door
    for caller in _CALLERS:
        try:
            admit(caller, raw)
        except Refused:
            pass


class _Files:
    """A scratch folder for the disk-reading targets, made once per process."""

    _dir: Path | None = None

    @classmethod
    def dir(cls) -> Path:
        if cls._dir is None:
            # In RAM when there is a tmpfs: the targets write a file per input.
            shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            cls._dir = Path(tempfile.mkdtemp(prefix="streamboot-fuzz-", dir=shm))
            atexit.register(shutil.rmtree, cls._dir, True)
        return cls._dir


def vdisk_layout_target(data: bytes) -> None:
    """A delta's ``.map`` file as read from a store: the chain opened over it, and reads."""
    d = _Files.dir()
    base = d / "base.raw"
    if not base.exists():
        base.write_bytes(os.urandom(64 * 1024 + 100))
    m, dat = vdisk_layout.delta_paths(d / "v2")
    m.write_bytes(data)
    if not dat.exists():
        with open(dat, "wb") as f:
            f.truncate(256 * 1024)
    vdisk_layout._LAYOUTS.clear()  # each input is a new layer, whatever its stat says
    try:
        reader = vdisk_layout.open_chain([base, m])
    except vdisk_layout.LayoutError:
        return
    try:
        size = reader.size
        for offset, length in ((0, min(size, 8192)), (size // 2, min(size - size // 2, 65536))):
            if length > 0:
                reader.resolve(offset, length)
                if length <= 65536:
                    reader.pread(offset, length)
    finally:
        reader.close()


def partitions_target(data: bytes) -> None:
    """The first sectors of a disk image (MBR, EBRs, GPT header and entries)."""
    image = _Files.dir() / "disk.img"
    with open(image, "wb") as f:  # a 1 MiB image whose first bytes are the input
        f.truncate(max(len(data), 1 << 20))
        f.write(data)
    read_partitions(image)


def nbd_options_target(data: bytes) -> None:
    """An option payload straight into the NBD parser (nbd/protocol.py), as NBD_OPT_GO and
    as a meta context query: it parses, or is refused with BadOption, nothing else."""
    for parse in (nbd_protocol.parse_info_request, nbd_protocol.parse_meta_context):
        try:
            parse(data)
        except nbd_protocol.BadOption:
            pass


# --- NBD: the real stream server, in a thread, over real sockets ---------------------------

NBD_TOKEN = "fuzz-token"
NBD_SIZE = 1 << 20


class _Findings(logging.Handler):
    """Errors the server logs with a traceback: an exception escaped a connection."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


class _NbdServer:
    instance: _NbdServer | None = None

    def __init__(self) -> None:
        d = _Files.dir()
        base = d / "nbd-base.raw"
        base.write_bytes(os.urandom(NBD_SIZE))
        spec = ExportSpec(session_id="fuzz", vdisk="fuzz", version=1, layers=(base,), size=NBD_SIZE)
        self.findings = _Findings()
        logging.getLogger("services.stream").addHandler(self.findings)
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        self.loop_errors: list[dict[str, object]] = []
        # Free ports: never a real stream node's, nor another fuzz run's.
        settings = StreamSettings(nbd_port=0, http_port=0, write_cache_dir=d / "wc")
        self.servers = StreamServers(StaticResolver({NBD_TOKEN: spec}), NullSink(), settings)
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.servers.start())
            started.set()
            self.loop.run_forever()

        threading.Thread(target=serve, daemon=True, name="nbd-fuzz").start()
        if not started.wait(30):
            raise RuntimeError("the NBD server did not start")
        self.port = self.servers.nbd_port
        self.iscsi_port = self.servers.iscsi_port

    @classmethod
    def get(cls) -> _NbdServer:
        if cls.instance is None:
            cls.instance = _NbdServer()
        return cls.instance

    @classmethod
    def stop(cls) -> None:
        """Stop the server of this process, if one runs (the suite's, after its tests)."""
        server, cls.instance = cls.instance, None
        if server is None:
            return
        logging.getLogger("services.stream").removeHandler(server.findings)
        stopped = asyncio.run_coroutine_threadsafe(server.servers.stop(), server.loop)
        stopped.result(30)
        server.loop.call_soon_threadsafe(server.loop.stop)


class Hang(Exception):
    """The server neither answered nor closed within the limit."""


def nbd_target(data: bytes) -> None:
    """A client's whole byte stream (flags, options, then requests), then EOF: the server
    must close the connection within a second and log no unexpected error."""
    server = _NbdServer.get()
    _client_stream(server, server.port, data, "NBD")


def iscsi_target(data: bytes) -> None:
    """An initiator's whole byte stream (login PDUs, then commands, Data-Out, task
    management, logout), then EOF, at the same server's iSCSI target: as for NBD."""
    server = _NbdServer.get()
    _client_stream(server, server.iscsi_port, data, "iSCSI")


def _client_stream(server: _NbdServer, port: int, data: bytes, protocol: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(1.0)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while s.recv(1 << 16):
                pass
        except TimeoutError:
            raise Hang(f"no close within 1 s after {len(data)} bytes") from None
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server dropped a client that broke the protocol
    if server.findings.records or server.loop_errors:
        record = (server.findings.records or [None])[0]
        server.findings.records.clear()
        errors, server.loop_errors[:] = list(server.loop_errors), []
        raise AssertionError(
            f"the {protocol} server failed on this input: "
            f"{record.getMessage() if record else errors}"
        )


def nbd_client_stream(*options: tuple[int, bytes], requests: bytes = b"") -> bytes:
    """What a client sends: fixed newstyle flags, options, then transmission requests
    (seed corpora are made with it, from what qemu-img and nbdinfo send)."""
    out = struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES
    for opt, payload in options:
        out += b"IHAVEOPT" + struct.pack(">II", opt, len(payload)) + payload
    return out + requests


# What a target needs set up before its first input (so its start is not timed as one).
PREPARE: dict[str, Callable[[], object]] = {"nbd": _NbdServer.get, "iscsi": _NbdServer.get}

TARGETS: dict[str, Target] = {
    "nbd": nbd_target,
    "nbd_options": nbd_options_target,
    "iscsi": iscsi_target,
    "http_head": http_head_target,
    "tftp": tftp_target,
    "dhcp": dhcp_target,
    "event": event_target,
    "vdisk_layout": vdisk_layout_target,
    "partitions": partitions_target,
}
