"""The cap on connections one client address holds in their handshake
(shared/address_cap.py, STREAMBOOT_STREAM_MAX_HANDSHAKES_PER_ADDRESS).

A host that opens sockets and never finishes the NBD handshake gets new ones closed once it
holds the cap, on NBD, HTTP and iSCSI alike (one count per address), while a good client from
another address is served (nbdinfo, curl), and a connection that finishes its handshake,
or goes, frees its place.
"""

from __future__ import annotations

import socket
import subprocess
from typing import Any

import pytest

from tests.sockets import closed_at_once
from tests.stream.conftest import ServerThread
from tests.stream.nbdraw import RawNbd

pytestmark = pytest.mark.timeout(120)
CAP = 8
HOSTILE = "127.0.0.2"


def refused(port: int) -> bool:
    """Whether a new connection from HOSTILE is closed by the server without a word past
    the NBD greeting (it may still carry the greeting, written before the check)."""
    return closed_at_once(port, HOSTILE, said=18)


def good_client_served(server: ServerThread) -> None:
    info = subprocess.run(
        ["nbdinfo", "--size", f"{server.nbd}/tok-a"], capture_output=True, text=True, timeout=30
    )
    assert info.returncode == 0 and info.stdout.strip() == str(32 << 20), info.stderr
    got = subprocess.run(
        ["curl", "-sf", "-r", "0-511", f"{server.http}/s/tok-a"], capture_output=True, timeout=30
    )
    assert got.returncode == 0 and len(got.stdout) == 512


def test_a_host_holding_the_cap_gets_no_more_and_others_are_served(make_server: Any) -> None:
    server = make_server(max_handshakes_per_address=CAP)
    port = server.servers.nbd_port
    # They never answer the greeting (left unread: a go() later reads it).
    hostile = [RawNbd(port, source=HOSTILE) for _ in range(CAP - 1)]
    # An HTTP socket that sends nothing counts too: the cap is per address, all protocols.
    http = socket.create_connection(("127.0.0.1", server.servers.http_port), 10, (HOSTILE, 0))
    server.wait_until(
        lambda: server.servers.sessions.handshakes.open[HOSTILE] == CAP, "all counted"
    )
    assert refused(port)
    assert refused(server.servers.http_port)
    good_client_served(server)

    # A connection that finishes its handshake leaves the count: one more may come.
    hostile[0].go("tok-b")
    server.wait_until(lambda: server.servers.sessions.handshakes.open[HOSTILE] == CAP - 1, "freed")
    again = RawNbd(port, source=HOSTILE)
    server.wait_until(lambda: server.servers.sessions.handshakes.open[HOSTILE] == CAP, "again")
    assert refused(port)
    # So does one that goes.
    http.close()
    hostile[1].close()
    server.wait_until(lambda: server.servers.sessions.handshakes.open[HOSTILE] == CAP - 2, "gone")
    RawNbd(port, source=HOSTILE).go("tok-a")
    for h in [*hostile, again]:
        h.close()
    server.wait_until(lambda: not server.servers.sessions.handshakes.open, "all released")
    assert server.servers.sessions.handshakes.refused == 3


def test_no_cap_when_zero(make_server: Any) -> None:
    server = make_server(max_handshakes_per_address=0)
    held = [RawNbd(server.servers.nbd_port, source=HOSTILE) for _ in range(3 * CAP)]
    server.wait_until(
        lambda: server.servers.sessions.handshakes.open[HOSTILE] == 3 * CAP, "all counted"
    )
    good_client_served(server)
    RawNbd(server.servers.nbd_port, source=HOSTILE).go("tok-a")
    for h in held:
        h.close()


def closed_by_server(s: socket.socket) -> bool:
    """Whether the server has closed ``s`` (EOF or reset after what it sent)."""
    s.settimeout(10)
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_at_the_total_the_oldest_handshake_makes_room(make_server: Any) -> None:
    """Many addresses together (a botnet) hold the node's total of handshakes: a new
    connection still gets in, and the oldest of theirs is closed for it."""
    server = make_server(max_handshakes_per_address=0, max_handshakes=CAP)
    gate = server.servers.sessions.handshakes
    port = server.servers.nbd_port
    held = []
    for i in range(CAP):  # from CAP addresses, one each, in order
        held.append(socket.create_connection(("127.0.0.1", port), 10, (f"127.0.3.{i + 1}", 0)))
        server.wait_until(lambda n=i + 1: sum(gate.open.values()) == n, "counted")
    # nbdinfo's connection sheds the oldest; once attached it leaves the count, so curl's
    # finds room.
    good_client_served(server)
    assert gate.shed == 1 and gate.refused == 0
    assert closed_by_server(held[0])
    for s in held[1:]:  # the younger ones are still there
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            while s.recv(4096):
                pass
        s.close()
    server.wait_until(lambda: not gate.open, "all released")
