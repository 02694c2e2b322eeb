"""A client whose connection timed out attaches the same session again on the same node,
as streamboot-nbd does after the kernel's I/O timeout (docs/failover.md): while the old
connection is silent, after it is reset, and again and again while the session lives."""

from __future__ import annotations

import logging
import socket
import struct
import subprocess

import pytest

from shared import nbd_wire as W
from tests.stream.conftest import IMAGE_SIZE, ServerThread
from tests.stream.nbdraw import RawNbd


def reset(c: RawNbd) -> None:
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.sock.close()


def test_reattach_while_old_connection_is_silent_then_reset(make_server) -> None:  # type: ignore[no-untyped-def]
    server: ServerThread = make_server()
    a = RawNbd(server.servers.nbd_port)
    assert a.go("tok-a")[0] == IMAGE_SIZE
    a.write(4096, b"A" * 512)
    # A goes silent (a starved guest): its socket stays open, nothing more is read.
    b = RawNbd(server.servers.nbd_port)
    assert b.go("tok-a")[0] == IMAGE_SIZE
    assert b.read(4096, 512) == b"A" * 512
    reset(a)
    for _ in range(5):
        c = RawNbd(server.servers.nbd_port)
        assert c.go("tok-a")[0] == IMAGE_SIZE
        assert c.read(4096, 512) == b"A" * 512
        reset(b)
        b = c
    b.close()
    info = subprocess.run(
        ["nbdinfo", "--size", f"{server.nbd}/tok-a"], capture_output=True, text=True, timeout=30
    )
    assert info.returncode == 0 and int(info.stdout) == IMAGE_SIZE, info.stderr


def test_a_refused_export_says_why_to_the_client_and_in_the_log(
    make_server, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    server: ServerThread = make_server()
    # A token the resolver knows no live session for (as the registry after it closed the
    # session, its client gone past the detach grace): refused, and told why.
    b = RawNbd(server.servers.nbd_port)
    b.start()
    name = b"tok-closed-meanwhile"
    with caplog.at_level(logging.WARNING, logger="services.stream.sessions"):
        b.option(W.OPT_GO, struct.pack(">I", len(name)) + name + b"\0\0")
        _, rep, why = b.option_reply()
    assert rep == W.REP_ERR_UNKNOWN and b"no live session" in why
    assert any("refused a nbd export" in r.getMessage() for r in caplog.records)
    b.close()
