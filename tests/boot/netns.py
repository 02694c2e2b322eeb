"""Two network namespaces joined by a veth pair, for DHCP tests with real broadcast.

The server side's sockets are created inside the server namespace by a short-lived thread
that enters it (setns), so the test process itself (and its NATS connections) stays in the
host namespace while the DHCP server listens only on the test's private link.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass(frozen=True)
class Link:
    server_ns: str
    client_ns: str
    server_if: str
    client_if: str
    server_ip: str
    client_mac: str

    def in_server_ns(self, make: Callable[[], T]) -> T:
        return in_netns(self.server_ns, make)

    def in_client_ns(self, make: Callable[[], T]) -> T:
        return in_netns(self.client_ns, make)

    def client_cmd(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.client_ns, *cmd]


def in_netns(ns: str, make: Callable[[], T]) -> T:
    """Run ``make`` in a thread inside namespace ``ns`` (sockets it creates stay there)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
            result.append(make())
        except BaseException as exc:
            errors.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def wait_up(ns: str, interface: str) -> None:
    """A veth end is "up" a moment after `ip link set up`; a broadcast sent before is lost."""
    for _ in range(100):
        out = subprocess.run(
            ["ip", "-n", ns, "-o", "link", "show", "dev", interface],
            capture_output=True, text=True, timeout=10,
        ).stdout  # fmt: skip
        if "state UP" in out:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{interface} in {ns} did not come up")


@contextmanager
def veth_link(client_mac: str = "52:54:00:12:34:56") -> Iterator[Link]:
    tag = uuid.uuid4().hex[:6]
    link = Link(
        f"sbt-srv-{tag}", f"sbt-cli-{tag}", f"sbs{tag}", f"sbc{tag}", "10.213.0.1", client_mac
    )
    ip("netns", "add", link.server_ns)
    try:
        ip("netns", "add", link.client_ns)
        ip("link", "add", link.server_if, "type", "veth", "peer", "name", link.client_if)
        ip("link", "set", link.server_if, "netns", link.server_ns)
        ip("link", "set", link.client_if, "netns", link.client_ns)
        ip("-n", link.server_ns, "addr", "add", f"{link.server_ip}/24", "dev", link.server_if)
        ip("-n", link.server_ns, "link", "set", link.server_if, "up")
        ip("-n", link.client_ns, "link", "set", link.client_if, "address", client_mac)
        ip("-n", link.client_ns, "link", "set", link.client_if, "up")
        wait_up(link.server_ns, link.server_if)
        wait_up(link.client_ns, link.client_if)
        yield link
    finally:
        for ns in (link.client_ns, link.server_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def client_socket(link: Link, port: int = 68) -> Callable[[], socket.socket]:
    """A factory for a broadcast socket on the client's side (run it in the client ns)."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, link.client_if.encode())
        sock.bind(("0.0.0.0", port))
        sock.settimeout(5)
        return sock

    return make


class HostLink:
    """A veth pair whose servers' end stays in this namespace (NATS on loopback stays
    reachable from the servers) and whose clients' end is in a namespace of its own."""

    def __init__(self, ns_prefix: str) -> None:
        tag = uuid.uuid4().hex[:6]
        self.host_if, self.client_if, self.client_ns = (
            f"sbh{tag}",
            f"sbc{tag}",
            f"{ns_prefix}-{tag}",
        )

    def in_client(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.client_ns, *cmd]


@contextmanager
def host_veth(
    link: HostLink, server_addrs: Sequence[str], client_addr: str | None = None
) -> Iterator[None]:
    """Make ``link`` with the servers' addresses (/24) on its host end and, if given, the
    client's address on the other; removed again at the end."""
    ip("netns", "add", link.client_ns)
    try:
        ip("link", "add", link.host_if, "type", "veth", "peer", "name", link.client_if)
        ip("link", "set", link.client_if, "netns", link.client_ns)
        for address in server_addrs:
            ip("addr", "add", f"{address}/24", "dev", link.host_if)
        ip("link", "set", link.host_if, "up")
        if client_addr:
            ip("-n", link.client_ns, "addr", "add", f"{client_addr}/24", "dev", link.client_if)
        ip("-n", link.client_ns, "link", "set", link.client_if, "up")
        wait_up(link.client_ns, link.client_if)
        yield
    finally:
        subprocess.run(["ip", "link", "del", link.host_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", link.client_ns], capture_output=True, timeout=10)
