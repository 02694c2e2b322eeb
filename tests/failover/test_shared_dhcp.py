"""Full DHCP from two boot services sharing their leases in NATS (docs/failover.md, "The boot
path"): no address is bound to two clients, whichever server each client talks to, and when
one server dies during a storm of DISCOVERs the other goes on handing out addresses.

The store's compare-and-set is tested first on two stores whose views disagree on purpose;
then two real `python -m services.boot` processes in full-DHCP mode on one link: real busybox
udhcpc clients on many macvlan interfaces, and a storm of raw DHCP clients (DISCOVER, the
first OFFER, REQUEST) from many MACs during which one server is killed.
"""

from __future__ import annotations

import asyncio
import json
import random
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from services.boot import dhcp_packets as dp
from services.boot.dhcp_leases import LeaseStore
from services.boot.shared_leases import LEASES_BUCKET, SharedLeases
from shared.bus import connect
from tests.boot.netns import HostLink, Link, client_socket, host_veth, in_netns, ip
from tests.boot.test_process import boot_env, run_boot
from tests.conftest import BusServer, wait_for

pytestmark = pytest.mark.timeout(240)
FIXTURES = Path(__file__).parents[1] / "boot" / "fixtures"
PLAIN_DISCOVER = (FIXTURES / "udhcpc_plain_discover.bin").read_bytes()


@pytest.fixture
async def js(nats_server: BusServer) -> AsyncIterator[JetStreamContext]:
    nc = await connect(
        nats_server.url, "shared-leases-test", credentials=nats_server.credentials("boot")
    )
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def shared_store(
    js: JetStreamContext, path: Path, start: str, end: str
) -> tuple[SharedLeases, asyncio.Task[None]]:
    shared = await SharedLeases.open(js, LeaseStore(path, start, end, load=False))
    task = asyncio.ensure_future(shared.run())
    await asyncio.wait_for(shared.synced(), 10)
    return shared, task


async def test_two_servers_deciding_on_one_view_bind_an_address_once(
    js: JetStreamContext, tmp_path: Path
) -> None:
    a, a_task = await shared_store(js, tmp_path / "a.json", "10.215.0.10", "10.215.0.12")
    b, b_task = await shared_store(js, tmp_path / "b.json", "10.215.0.10", "10.215.0.12")
    try:
        now = time.time()
        # Both see the pool empty and pick its first address, for two different clients.
        first = a.store.bind("02:00:00:00:00:01", "10.215.0.10", 600, now, None)
        second = b.store.bind("02:00:00:00:00:02", "10.215.0.10", 600, now, None)
        assert first and second
        refused_a, refused_b = await asyncio.gather(a.commit(), b.commit())
        assert sorted([refused_a, refused_b], key=len) == [set(), {"10.215.0.10"}]
        loser = b if refused_b else a
        winner_mac = "02:00:00:00:00:01" if refused_b else "02:00:00:00:00:02"
        # The loser's view now holds the winner's lease: its client gets another address.
        assert loser.store.by_ip["10.215.0.10"].mac == winner_mac
        other = "02:00:00:00:00:02" if refused_b else "02:00:00:00:00:01"
        assert loser.store.offer(other, None, time.time()).ip == "10.215.0.11"

        # The winner's client renews through the other server (its server died; it
        # rebinds): the same client's lease, a newer revision: written.
        renewed = loser.store.bind(winner_mac, "10.215.0.10", 600, time.time(), "host")
        assert renewed and await loser.commit() == set()

        # A stale view: a server that has not yet seen a bind still cannot take the address.
        c_store = LeaseStore(tmp_path / "c.json", "10.215.0.10", "10.215.0.12", load=False)
        c = SharedLeases(a.kv, c_store)  # never watched: it knows nothing
        assert c.store.bind("02:00:00:00:00:03", "10.215.0.10", 600, time.time(), None)
        assert await c.commit() == {"10.215.0.10"}
        assert c.store.by_ip["10.215.0.10"].mac == winner_mac

        # Both views converge on the bucket (the watch), and the bucket has one record per
        # address, each naming one client.
        await wait_for(
            lambda: (
                a.store.by_ip["10.215.0.10"].hostname == "host"
                and b.store.by_ip["10.215.0.10"].hostname == "host"
            ),
            "both views to hold the renewal",
        )
        entry = await a.kv.get("10.215.0.10")
        assert json.loads(entry.value or b"{}")["mac"] == winner_mac

        # A hostile record (the bucket is written by every boot service) is ignored.
        await a.kv.put("10.215.0.12", b'{"mac": 1}')
        await wait_for(lambda: a.stats["bad_records"] >= 1, "the bad record seen")
        assert "10.215.0.12" not in a.store.by_ip
    finally:
        for task in (a_task, b_task):
            task.cancel()


# --- two boot service processes on one link -------------------------------------------


class Net(HostLink):
    """The servers' end with one address per server."""

    def __init__(self) -> None:
        super().__init__("sbt-dl")
        self.prefix = f"10.216.{random.randrange(1, 250)}"
        self.server_ips = (f"{self.prefix}.1", f"{self.prefix}.2")


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net()
    with host_veth(n, n.server_ips):
        yield n


def full_env(
    bus: BusServer, data: Path, n: Net, which: int, pool: tuple[int, int]
) -> dict[str, str]:
    data.mkdir()
    env = boot_env(bus, data, 67)
    env.update(
        STREAMBOOT_NODE_ID=f"boot-{which}",
        STREAMBOOT_DHCP_INTERFACE=n.host_if,
        STREAMBOOT_DHCP_SERVER_IP=n.server_ips[which],
        STREAMBOOT_DHCP_LEASE_STORE="nats",
        STREAMBOOT_DHCP_POOL_START=f"{n.prefix}.{pool[0]}",
        STREAMBOOT_DHCP_POOL_END=f"{n.prefix}.{pool[1]}",
        STREAMBOOT_DHCP_LEASE_S="600",
        STREAMBOOT_BIND_HOST=n.server_ips[which],
        STREAMBOOT_PUBLIC_HOST=n.server_ips[which],
        STREAMBOOT_BOOT_IPV6_RA="false",
    )
    return env


async def bucket_leases(js: JetStreamContext) -> dict[str, str]:
    """Every address bound in the bucket, and to whom (direct gets: no consumer)."""
    kv = await js.key_value(LEASES_BUCKET)
    info = await js.stream_info(f"KV_{LEASES_BUCKET}", subjects_filter=f"$KV.{LEASES_BUCKET}.>")
    out = {}
    for subject in info.state.subjects or {}:
        key = subject.split(".", 2)[2]
        record = json.loads((await kv.get(key)).value or b"{}")
        if record.get("state") == "bound":
            out[key] = record["mac"]
    return out


async def kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def udhcpc_on(n: Net, iface: str, tmp: Path) -> str | None:
    """The real busybox udhcpc on one interface; the address it was bound to."""
    out = tmp / f"{iface}.env"
    script = tmp / "udhcpc.script"
    if not script.exists():
        script.write_text(
            '#!/bin/sh\n[ "$1" = bound ] && env > "$UDHCPC_OUT.tmp" && mv "$UDHCPC_OUT.tmp" "$UDHCPC_OUT"\nexit 0\n'
        )
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    proc = await asyncio.create_subprocess_exec(
        *n.in_client("env", f"UDHCPC_OUT={out}", "busybox", "udhcpc", "-i", iface,
                     "-f", "-q", "-n", "-t", "8", "-T", "2", "-s", str(script)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    await asyncio.wait_for(proc.communicate(), 90)
    if proc.returncode != 0 or not out.exists():
        return None
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    return env.get("ip")


async def test_udhcpc_clients_of_two_servers_get_distinct_addresses(
    nats_server: BusServer, net: Net, tmp_path: Path, js: JetStreamContext
) -> None:
    clients = 16
    for i in range(clients):
        ip("-n", net.client_ns, "link", "add", f"mv{i}", "link", net.client_if,
           "address", f"02:5e:00:00:01:{i:02x}", "type", "macvlan", "mode", "bridge")  # fmt: skip
        ip("-n", net.client_ns, "link", "set", f"mv{i}", "up")
    pool = (100, 100 + clients + 3)
    a = await run_boot(full_env(nats_server, tmp_path / "a", net, 0, pool))
    b = await run_boot(full_env(nats_server, tmp_path / "b", net, 1, pool))
    try:
        got = await asyncio.gather(*(udhcpc_on(net, f"mv{i}", tmp_path) for i in range(clients)))
        assert None not in got, got
        assert len(set(got)) == clients, f"an address given twice: {sorted(got)}"  # type: ignore[arg-type]
        bound = await bucket_leases(js)
        mine = {f"02:5e:00:00:01:{i:02x}": got[i] for i in range(clients)}
        # Each client's address is bound to it in the bucket (a client that started over
        # may also have left an older record, which its server's view dropped).
        assert {mac: bound.get(address) for mac, address in mine.items()} == {m: m for m in mine}
        # Each server's local copy (what `streamboot dhcp leases` reads) shows every lease,
        # whichever server made it.
        for side in ("a", "b"):
            path = tmp_path / side / "boot" / "dhcp-leases.json"
            await wait_for(
                lambda path=path: (
                    path.exists()
                    and {
                        x["mac"]
                        for x in json.loads(path.read_text())["leases"]
                        if x["state"] == "bound"
                    }
                    == set(mine)
                ),
                f"{side}'s copy of the leases",
                15,
            )
    finally:
        await kill(a)
        await kill(b)


class DoraStorm:
    """Raw DHCP clients, one per MAC, started every ``gap_s`` from the client namespace:
    DISCOVER, REQUEST of the first OFFER, ACK; a NAK or 2 s of silence starts over. Every
    ACK is kept: (MAC, address, server)."""

    def __init__(self, n: Net, macs: list[bytes], gap_s: float, hold_at: int = 0) -> None:
        link = Link("", n.client_ns, "", n.client_if, "", "")
        self.sock = in_netns(n.client_ns, client_socket(link))
        self.sock.settimeout(0.1)
        self.macs, self.gap_s = macs, gap_s
        self.lock = threading.Lock()
        self.xids: dict[int, bytes] = {}  # live transaction -> its MAC
        self.requested: set[int] = set()
        self.started: dict[bytes, float] = {}  # MAC -> when its current attempt began
        self.acks: list[tuple[str, str, str]] = []
        self.bound: dict[bytes, str] = {}
        self.naks = 0
        self.stop = threading.Event()
        # The first ``hold_at`` clients start, then the rest once ``go_on`` is set.
        self.hold_at, self.go_on = hold_at, threading.Event()
        self.threads = [threading.Thread(target=self._send), threading.Thread(target=self._recv)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _discover(self, mac: bytes) -> None:
        packet = dp.parse(PLAIN_DISCOVER)
        packet.xid = random.getrandbits(31)
        packet.chaddr = mac
        with self.lock:
            self.xids[packet.xid] = mac
            self.started[mac] = time.monotonic()
        self.sock.sendto(dp.build(packet), ("255.255.255.255", 67))

    def _send(self) -> None:
        for i, mac in enumerate(self.macs):
            if i == self.hold_at:
                while not (self.go_on.wait(0.1) or self.stop.is_set()):
                    self._retry()
            if self.stop.is_set():
                return
            self._discover(mac)
            time.sleep(self.gap_s)
        while not self.stop.is_set():
            self._retry()
            time.sleep(0.1)

    def _retry(self) -> None:
        """Start over the clients without an address after 2 s (or a NAK)."""
        now = time.monotonic()
        with self.lock:
            late = [m for m, at in self.started.items() if m not in self.bound and now - at > 2]
        for mac in late:
            self._discover(mac)

    def _recv(self) -> None:
        while not self.stop.is_set():
            try:
                reply = dp.parse(self.sock.recv(2048))
            except (TimeoutError, dp.DhcpParseError):
                continue
            with self.lock:
                mac = self.xids.get(reply.xid)
            if mac is None or reply.chaddr[:6] != mac:
                continue
            server = dp.server_id(reply) or "?"
            if reply.message_type == dp.OFFER and reply.xid not in self.requested:
                self.requested.add(reply.xid)
                request = dp.parse(PLAIN_DISCOVER)
                request.xid, request.chaddr = reply.xid, mac
                request.options[dp.OPT_MESSAGE_TYPE] = bytes((dp.REQUEST,))
                request.options[dp.OPT_REQUESTED_IP] = dp.ip_bytes(reply.yiaddr)
                request.options[dp.OPT_SERVER_ID] = dp.ip_bytes(server)
                self.sock.sendto(dp.build(request), ("255.255.255.255", 67))
            elif reply.message_type == dp.ACK:
                with self.lock:
                    self.acks.append((mac.hex(":"), reply.yiaddr, server))
                    self.bound[mac] = reply.yiaddr
            elif reply.message_type == dp.NAK:
                with self.lock:
                    self.naks += 1
                    self.started[mac] = 0.0  # start over at once

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        self.sock.close()


async def test_a_full_dhcp_server_killed_during_a_discover_storm(
    nats_server: BusServer, net: Net, tmp_path: Path, js: JetStreamContext
) -> None:
    macs = [bytes((0x02, 0x5F, 0, 0, i >> 8, i & 0xFF)) for i in range(160)]
    pool = (10, 200)
    a = await run_boot(full_env(nats_server, tmp_path / "a", net, 0, pool))
    b: asyncio.subprocess.Process | None = None
    storm = DoraStorm(net, macs, gap_s=0.03, hold_at=20)
    try:
        # A alone at first; B joins while A's clients hold their leases (a server started
        # or restarted beside a running one must not hand those out again), then A dies.
        storm.start()
        await wait_for(lambda: len(storm.bound) >= 20, "20 clients bound by A", 90)
        b = await run_boot(full_env(nats_server, tmp_path / "b", net, 1, pool))
        await asyncio.sleep(3)  # B syncs from the bucket and opens its socket meanwhile
        storm.go_on.set()
        await wait_for(
            lambda: net.server_ips[1] in {s for _, _, s in storm.acks} and len(storm.bound) >= 80,
            "B handing out addresses beside A",
            90,
        )
        assert {s for _, _, s in storm.acks} == set(net.server_ips)
        await kill(a)
        await asyncio.sleep(0.5)  # what the dead server sent before is in
        with storm.lock:
            before = {mac for mac, _, _ in storm.acks}
        assert len(before) < len(macs)
        await wait_for(lambda: len(storm.bound) == len(macs), "every client bound", 120)
        storm.finish()
        late = [x for x in storm.acks if x[0] not in before]
        assert late and {s for _, _, s in late} == {net.server_ips[1]}

        holders: dict[str, set[str]] = {}
        for mac, address, _ in storm.acks:
            holders.setdefault(address, set()).add(mac)
        twice = {address: m for address, m in holders.items() if len(m) > 1}
        assert not twice, f"addresses ACKed to two clients: {twice}"
        bound = await bucket_leases(js)
        assert all(bound.get(a) == mac.hex(":") for mac, a in storm.bound.items())
    finally:
        if not storm.stop.is_set():
            storm.finish()
        await kill(a)
        if b is not None:
            await kill(b)
