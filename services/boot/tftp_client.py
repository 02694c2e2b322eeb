"""A small blocking TFTP read client with windowsize (RFC 7440) support.

curl and tftp-hpa do not speak windowsize; this client is what the benchmark and tests use
to exercise it (and a handy diagnostic: ``python -m services.boot.tftp_client HOST PORT FILE``).
"""

from __future__ import annotations

import socket
import struct
import sys

from services.boot.tftp_packets import (
    DATA,
    DEFAULT_BLKSIZE,
    ERROR,
    OACK,
    RRQ,
    TftpError,
    build_ack,
    build_request,
    parse_oack,
)


def fetch(
    host: str,
    port: int,
    filename: str,
    *,
    blksize: int | None = None,
    windowsize: int | None = None,
    tsize: bool = False,
    timeout_s: float = 2.0,
    retries: int = 5,
    keep: bool = True,
) -> tuple[bytes, dict[str, str]]:
    """Download ``filename``; returns (content or b"" when not ``keep``, the OACK options).
    The byte count is in the options as ``"received"``."""
    options: dict[str, int] = {}
    if blksize is not None:
        options["blksize"] = blksize
    if tsize:
        options["tsize"] = 0
    if windowsize is not None:
        options["windowsize"] = windowsize
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout_s)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    request = build_request(RRQ, filename, "octet", **options)
    chunks: list[bytes] = []
    received = 0
    acked: dict[str, str] = {}
    size, window = DEFAULT_BLKSIZE, 1
    expected = 1  # absolute block number expected next
    since_ack = 0
    buf = bytearray(65536 + 4)
    view = memoryview(buf)
    try:
        sock.sendto(request, (host, port))

        def send(packet: bytes) -> None:  # until the server's transfer port is known
            sock.sendto(packet, (host, port))

        connected = False
        last_sent: bytes = request
        tries = retries
        while True:
            try:
                if connected:
                    n = sock.recv_into(buf)
                else:
                    n, addr = sock.recvfrom_into(buf)
            except TimeoutError:
                tries -= 1
                if tries < 0:
                    raise TftpError(0, "timeout") from None
                send(last_sent)
                continue
            if not connected:
                # The server answers from its transfer port (its TID): talk only to that
                # from now on, and let the kernel drop anything else.
                sock.connect(addr)
                send = sock.send  # type: ignore[assignment]
                connected = True
            opcode, number = struct.unpack_from("!HH", buf)
            if opcode == ERROR:
                message = bytes(view[4:n]).split(b"\0", 1)[0].decode("ascii", "replace")
                raise TftpError(number, message)
            if opcode == OACK and expected == 1 and not acked:
                acked = parse_oack(bytes(view[:n]))
                size = int(acked.get("blksize", DEFAULT_BLKSIZE))
                window = int(acked.get("windowsize", 1))
                last_sent = build_ack(0)
                send(last_sent)
                continue
            if opcode != DATA:
                continue
            if number != expected & 0xFFFF:
                # Out of order or a resent window: ask again from the last in-order block.
                last_sent = build_ack(expected - 1)
                send(last_sent)
                since_ack = 0
                continue
            tries = retries
            length = n - 4
            received += length
            if keep:
                chunks.append(bytes(view[4:n]))
            expected += 1
            since_ack += 1
            final = length < size
            if final or since_ack >= window:
                last_sent = build_ack(expected - 1)
                send(last_sent)
                since_ack = 0
            if final:
                break
    finally:
        sock.close()
    return b"".join(chunks), {**acked, "received": str(received)}


if __name__ == "__main__":
    host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    data, opts = fetch(host, port, name, blksize=1468, windowsize=16, tsize=True)
    sys.stdout.buffer.write(data)
    print(opts, file=sys.stderr)
