"""A minimal blocking NBD client on a raw socket, for crafting good and bad input in tests."""

from __future__ import annotations

import socket
import struct

from shared import nbd_wire as W


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


class RawNbd:
    def __init__(self, port: int, timeout: float = 10, source: str | None = None) -> None:
        """``source``: the local address to connect from (another loopback address)."""
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
        )

    def recv_exact(self, n: int) -> bytes:
        return recv_exact(self.sock, n)

    def greeting(self) -> int:
        magic, opt, flags = W.GREETING.unpack(self.recv_exact(W.GREETING.size))
        assert (magic, opt) == (W.NBDMAGIC, W.IHAVEOPT)
        return flags

    def start(self) -> None:
        self.greeting()
        self.sock.sendall(W.CLIENT_FLAGS.pack(W.FLAG_FIXED_NEWSTYLE | W.FLAG_NO_ZEROES))

    def option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(W.OPTION.pack(W.IHAVEOPT, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, n = W.OPTION_REPLY.unpack(self.recv_exact(W.OPTION_REPLY.size))
        assert magic == W.REPLY_MAGIC_OPT
        return opt, rep, self.recv_exact(n)

    def go(self, token: str) -> tuple[int, int]:
        """Handshake to transmission; returns (size, transmission flags)."""
        self.start()
        name = token.encode()
        self.option(W.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        size = flags = -1
        while True:
            _, rep, data = self.option_reply()
            if rep == W.REP_INFO and struct.unpack_from(">H", data)[0] == W.INFO_EXPORT:
                _, size, flags = W.INFO_EXPORT_S.unpack(data)
            elif rep == W.REP_ACK:
                return size, flags
            elif rep != W.REP_INFO:
                raise ConnectionError(f"GO refused: {rep:#x}")

    def request(self, cmd: int, handle: int, offset: int, length: int, flags: int = 0) -> None:
        self.sock.sendall(W.REQUEST.pack(W.REQUEST_MAGIC, flags, cmd, handle, offset, length))

    def reply(self) -> tuple[int, int]:
        magic, err, handle = W.SIMPLE_REPLY.unpack(self.recv_exact(W.SIMPLE_REPLY.size))
        assert magic == W.SIMPLE_REPLY_MAGIC
        return err, handle

    def read(self, offset: int, length: int, handle: int = 1) -> bytes:
        self.request(W.CMD_READ, handle, offset, length)
        err, h = self.reply()
        assert (err, h) == (0, handle), (err, h)
        return self.recv_exact(length)

    def write(self, offset: int, data: bytes, handle: int = 2) -> int:
        self.sock.sendall(
            W.REQUEST.pack(W.REQUEST_MAGIC, 0, W.CMD_WRITE, handle, offset, len(data)) + data
        )
        err, h = self.reply()
        assert h == handle
        return err

    def closed_by_peer(self) -> bool:
        """True when the server closed (EOF or reset), reading and discarding what is left."""
        try:
            while self.sock.recv(1 << 16):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()
