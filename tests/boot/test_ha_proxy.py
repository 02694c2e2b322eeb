"""Two boot services in proxyDHCP mode on one network: kill -9 one during a storm of PXE
DISCOVERs and the clients still get offers, and boot scripts from the survivor
(docs/failover.md, "The boot path").

Both are real `python -m services.boot` processes bound (SO_BINDTODEVICE) to the host end
of a veth pair whose other end is in a client namespace; each DISCOVER broadcast there
reaches both. An iPXE client's offer names the script URL of the instance that made it,
which tells the two apart.
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.boot import dhcp_packets as dp
from streamboot.embedded.proc import free_port
from tests.boot.netns import HostLink, Link, client_socket, host_veth, in_netns
from tests.boot.test_process import boot_env, run_boot
from tests.conftest import BusServer

pytestmark = pytest.mark.timeout(180)
FIXTURES = Path(__file__).parent / "fixtures"
PXE_DISCOVER = (FIXTURES / "udhcpc_pxe_discover.bin").read_bytes()


class Net(HostLink):
    def __init__(self) -> None:
        super().__init__("sbt-ha")
        self.server_ip = f"10.214.{random.randrange(1, 250)}.1"


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net()
    # The client has the address the network's own DHCP server would give (proxyDHCP
    # gives none).
    with host_veth(n, [n.server_ip], client_addr=n.server_ip.rsplit(".", 1)[0] + ".50"):
        yield n


def proxy_env(bus: BusServer, data: Path, n: Net, name: str) -> dict[str, str]:
    data.mkdir()
    env = boot_env(bus, data, 67)
    env.update(
        STREAMBOOT_NODE_ID=name,
        STREAMBOOT_DHCP_MODE="proxy",
        STREAMBOOT_DHCP_INTERFACE=n.host_if,
        STREAMBOOT_DHCP_PXE_PORT=str(free_port()),
        STREAMBOOT_BIND_HOST=n.server_ip,
        STREAMBOOT_PUBLIC_HOST=n.server_ip,
    )
    return env


def discover(xid: int) -> bytes:
    """udhcpc's recorded PXE DISCOVER from a fresh client, as iPXE (user class)."""
    packet = dp.parse(PXE_DISCOVER)
    packet.xid = xid
    packet.chaddr = bytes((0x02, *xid.to_bytes(5, "big")))
    packet.options[dp.OPT_USER_CLASS] = b"iPXE"
    return dp.build(packet)


class Storm:
    """DISCOVERs broadcast from the client namespace every ``gap_s``; the offers seen, by
    transaction id: the script URLs (one per answering instance)."""

    def __init__(self, n: Net, gap_s: float = 0.02) -> None:
        self.sock = in_netns(n.client_ns, client_socket_for(n))
        self.sock.settimeout(0.2)
        self.gap_s = gap_s
        self.sent: list[int] = []
        self.offers: dict[int, set[str]] = {}
        self.stop = threading.Event()
        self.sending = threading.Event()
        self.threads = [threading.Thread(target=self._send), threading.Thread(target=self._recv)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        xid = random.getrandbits(31)
        while not self.stop.is_set():
            xid += 1
            self.sent.append(xid)
            self.sock.sendto(discover(xid), ("255.255.255.255", 67))
            time.sleep(self.gap_s)

    def _recv(self) -> None:
        quiet_since = None
        while True:
            try:
                offer = dp.parse(self.sock.recv(2048))
                quiet_since = None
            except (TimeoutError, dp.DhcpParseError):
                if self.stop.is_set():
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since > 3:  # the last answers are in
                        return
                continue
            if offer.message_type == dp.OFFER:
                self.offers.setdefault(offer.xid, set()).add(offer.file.decode())

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        self.sock.close()


def client_socket_for(n: Net) -> Callable[[], socket.socket]:
    return client_socket(Link("", n.client_ns, "", n.client_if, n.server_ip, ""))


async def test_a_proxy_boot_service_killed_during_a_discover_storm(
    nats_server: BusServer, net: Net, tmp_path: Path
) -> None:
    a_env = proxy_env(nats_server, tmp_path / "a", net, "boot-a")
    b_env = proxy_env(nats_server, tmp_path / "b", net, "boot-b")
    url = {
        f"http://{net.server_ip}:{e['STREAMBOOT_BOOT_HTTP_PORT']}": name
        for name, e in (("a", a_env), ("b", b_env))
    }
    a, b = await run_boot(a_env), await run_boot(b_env)
    storm = Storm(net)
    try:
        storm.start()
        # Both answer before the kill.
        for _ in range(300):
            answered = {name for urls in storm.offers.values() for u in urls
                        for base, name in url.items() if u.startswith(base)}  # fmt: skip
            if answered == {"a", "b"}:
                break
            await asyncio.sleep(0.1)
        assert answered == {"a", "b"}, storm.offers
        a.kill()
        await a.wait()
        after = len(storm.sent)
        await asyncio.sleep(3)  # the storm goes on against b alone
        storm.finish()
        late = storm.sent[after:]
        assert len(late) > 10
        missed = [x for x in late if x not in storm.offers]
        assert not missed, f"{len(missed)} of {len(late)} DISCOVERs after the kill got no offer"
        from_b = [u for x in late for u in storm.offers[x]]
        assert all(url[u.split("/ipxe")[0]] == "b" for u in from_b), set(from_b)

        # The offer's script URL answers from the client's side: the survivor's boot script.
        got = await asyncio.to_thread(
            subprocess.run, net.in_client("curl", "-s", "-m", "20", from_b[-1]),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert got.stdout.startswith("#!ipxe") and "/ipxe/script" in got.stdout, got
    finally:
        if not storm.stop.is_set():
            storm.finish()
        for p in (a, b):
            if p.returncode is None:
                p.kill()
                await p.wait()
