"""A PXE boot storm without VMs: N simulated clients boot at once through the whole chain
(issue 28). Run as root:

    uv run python bench/pxestorm.py [--clients 100] [--client-procs 4] [--no-boot-files]
                                    [--json summary.json] [--keep]

The server is `streamboot up --boot-interface br0 --dhcp full` in a network namespace
(tests/e2e/pxe_lab.py's BootLab: bridge br0 at 10.77.0.1/24, DHCP pool POOL), the demo
vdisk built by `streamboot vdisk build-demo`, unknown devices auto-added to a collection
the vdisk is assigned to. The clients live in a second namespace, joined to the bridge by
a veth pair, split over ``--client-procs`` processes there (this file's ``clients``
command), each client a task doing what a BIOS machine's PXE ROM and then iPXE do:

1. ``dhcp-pxe``: DISCOVER (PXEClient, architecture 0, its own MAC and transaction id),
   OFFER, REQUEST, ACK, sent as a PXE ROM does (an Ethernet broadcast from its MAC, IP
   source 0.0.0.0): an address and a boot file. Everything after comes from that address
   (the client namespace holds the whole pool's addresses, added before the storm);
2. ``tftp``: the boot file (undionly.kpxe) by TFTP, with curl;
3. ``dhcp-ipxe``: DHCP again as iPXE (user class "iPXE"): the entry script's URL;
4. ``script``: the entry script, then the per-client script it chains to (which opens the
   boot session: a 503 "busy, retry" is asked again after its Retry-After, as iPXE does);
5. ``boot-files``: the kernel and initramfs the script names, over HTTP (``--no-boot-files``
   leaves them out);
6. ``redeem``: the initramfs's trade of the script's nonce for the session's NBD export;
7. ``nbd``: bench/bootstorm.py's recorded demo boot replayed over NBD at full speed
   (19 MiB read, its writes to the session's write cache).

DHCP packets are retransmitted as a PXE ROM does (after 4, 8, 16, 32 s), each counted.
Reported: clients booted and lost, each phase's p50/p99/max in seconds (as the clients saw
it: on a loaded machine the client processes' own lag is in it), the retransmits, the
whole boot's p50/p99, and the CPU seconds of streamboot's processes. No peer runs beside
it (bench/pxechain.py compares one VM's boot through this chain with dnsmasq + busybox
httpd + nbdkit): what this measures is whether DHCP, TFTP and the boot HTTP server keep
up with N clients at once, and whether any client is lost.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from services.boot import dhcp_packets as dp  # noqa: E402
from streamboot.block_replay import percentile, replay  # noqa: E402

SERVER_IP = "10.77.0.1"
CLIENT_BASE_IP = "10.77.0.2"  # the client namespace's own address (it sends the broadcasts)
POOL = ("10.77.0.10", "10.77.0.250")
CLIENT_IF = "vc0"
PXE_RETRIES_S = (4, 8, 16, 32)  # a PXE ROM's DISCOVER timeouts
PHASES = ("dhcp-pxe", "tftp", "dhcp-ipxe", "script", "boot-files", "redeem", "nbd")
DISCOVER = (ROOT / "tests/boot/fixtures/udhcpc_pxe_discover.bin").read_bytes()


# --- the clients (inside the client namespace) ------------------------------------------


def frame(packet: dp.DhcpPacket) -> bytes:
    """The packet as a PXE ROM sends it: an Ethernet broadcast from its own MAC, IP source
    0.0.0.0 (it has no address yet), so the server answers by broadcast (RFC 2131 4.1)
    and every client process's port-68 socket sees the answer. UDP checksum 0 (none)."""
    payload = dp.build(packet)
    udp = struct.pack("!HHHH", 68, 67, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP,
                     0, bytes(4), b"\xff" * 4)  # fmt: skip
    words = struct.unpack("!10H", ip)
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    ip = ip[:10] + struct.pack("!H", ~total & 0xFFFF) + ip[12:]
    return b"\xff" * 6 + packet.chaddr + b"\x08\x00" + ip + udp


class DhcpPort(asyncio.DatagramProtocol):
    """One UDP socket on port 68 for the simulated clients of this process (answers go to
    the client waiting on their transaction id); packets go out through a raw socket
    (see frame())."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Queue[dp.DhcpPacket]] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        self.raw.bind((CLIENT_IF, 0))

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            packet = dp.parse(data)
        except dp.DhcpParseError:
            return
        queue = self.waiting.get(packet.xid)
        if queue is not None and packet.op == dp.BOOTREPLY:
            queue.put_nowait(packet)

    @classmethod
    async def open(cls) -> DhcpPort:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, CLIENT_IF.encode())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(("0.0.0.0", 68))
        port = cls()
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: port, sock=sock)
        return port

    async def exchange(self, packet: dp.DhcpPacket, want: int, retries: list[int]) -> dp.DhcpPacket:
        """Send (broadcast) until a reply of type ``want`` comes; each resend is counted
        in ``retries``."""
        queue: asyncio.Queue[dp.DhcpPacket] = asyncio.Queue()
        self.waiting[packet.xid] = queue
        try:
            for timeout in PXE_RETRIES_S:
                self.raw.send(frame(packet))
                deadline = time.monotonic() + timeout
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        reply = await asyncio.wait_for(queue.get(), left)
                    except TimeoutError:
                        break
                    if reply.message_type == want:
                        return reply
                retries[0] += 1
            raise TimeoutError(f"no DHCP {dp.MESSAGE_NAMES.get(want, want)} after 4 tries")
        finally:
            del self.waiting[packet.xid]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]


def request_for(discover: dp.DhcpPacket, offer: dp.DhcpPacket) -> dp.DhcpPacket:
    request = dp.parse(dp.build(discover))
    request.options[dp.OPT_MESSAGE_TYPE] = bytes((dp.REQUEST,))
    request.options[dp.OPT_REQUESTED_IP] = dp.ip_bytes(offer.yiaddr)
    request.options[dp.OPT_SERVER_ID] = offer.options[dp.OPT_SERVER_ID]
    return request


def discover_of(mac: bytes, ipxe: bool) -> dp.DhcpPacket:
    """A BIOS PXE ROM's DISCOVER (udhcpc's capture, made architecture 0), or iPXE's."""
    packet = dp.parse(DISCOVER)
    packet.xid = random.getrandbits(32)
    packet.chaddr = mac
    packet.flags = dp.BROADCAST_FLAG
    packet.options[dp.OPT_CLIENT_ID] = b"\x01" + mac
    packet.options[dp.OPT_CLIENT_ARCH] = b"\x00\x00"
    packet.options[dp.OPT_VENDOR_CLASS] = b"PXEClient:Arch:00000:UNDI:002001"
    packet.options.pop(dp.OPT_CLIENT_UUID, None)
    if ipxe:
        packet.options[dp.OPT_USER_CLASS] = b"iPXE"
        packet.options[dp.OPT_IPXE_ENCAP] = b"\x13\x01\x01"  # iPXE's "bus id" style option
    return packet


@dataclass
class Client:
    mac: str
    ip: str = ""
    phases: dict[str, float] = field(default_factory=dict)
    dhcp_retries: int = 0
    busy: int = 0  # 503 "busy, retry" answers to the script request
    stale: int = 0  # requests sent again after the server closed a kept-alive connection
    bytes_http: int = 0
    done_s: float = 0.0
    error: str = ""
    nbd_errors: int = 0
    bytes_read: int = 0


async def lease(port: DhcpPort, client: Client, ipxe: bool) -> dp.DhcpPacket:
    mac = bytes.fromhex(client.mac.replace(":", ""))
    retries = [0]
    discover = discover_of(mac, ipxe)
    try:
        offer = await port.exchange(discover, dp.OFFER, retries)
        return await port.exchange(request_for(discover, offer), dp.ACK, retries)
    finally:
        client.dhcp_retries += retries[0]


async def run(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {err.decode()[-300:]}")


_CHAIN = re.compile(r"^chain\s+(?:--\S+\s+)*(\S+)", re.M)
_KERNEL = re.compile(r"^kernel\s+(?:--\S+\s+)*(\S+)(.*)$", re.M)
_INITRD = re.compile(r"^initrd\s+(?:--name\s+\S+\s+)?(\S+)", re.M)
_NONCE = re.compile(r"streamboot\.nonce=(\S+)")


def expand(url: str, client: Client) -> str:
    """iPXE's settings in a script URL, as the simulated client knows them."""
    return (
        url.replace("${net0/mac}", client.mac)
        .replace("${mac}", client.mac)
        .replace("${uuid}", "")
        .replace("${net0/mac:hexhyp}", client.mac.replace(":", "-"))
    )


async def get(http: Any, url: str, client: Client) -> Any:
    """GET as iPXE does: a 503 with Retry-After is asked again after that delay. A kept-alive
    connection the server closed meanwhile is retried once on a new one (counted: the
    server closes one idle READ_TIMEOUT_S, and a client process running many clients may
    be that late with its next request, where iPXE sends it at once)."""
    while True:
        try:
            r = await http.get(url)
        except httpx.RemoteProtocolError:
            client.stale += 1
            r = await http.get(url)
        if r.status_code == 503 and "retry-after" in r.headers:
            client.busy += 1
            await asyncio.sleep(int(r.headers["retry-after"]))
            continue
        r.raise_for_status()
        return r


async def boot_one(
    port: DhcpPort, client: Client, requests: list[Any], boot_files: bool, start: float
) -> None:
    def mark(phase: str, since: float) -> float:
        now = time.time()
        client.phases[phase] = now - since
        return now

    t = start
    try:
        ack = await lease(port, client, ipxe=False)
        client.ip = ack.yiaddr  # on the client namespace's interface already: used from now on
        t = mark("dhcp-pxe", t)
        server = ack.siaddr if ack.siaddr != "0.0.0.0" else SERVER_IP
        boot_file = ack.file.decode()
        await run(["curl", "-sf", "--interface", client.ip, "-o", "/dev/null",
                   f"tftp://{server}/{boot_file}"])  # fmt: skip
        t = mark("tftp", t)
        ack = await lease(port, client, ipxe=True)
        entry = ack.file.decode()
        if not entry.startswith("http"):
            raise RuntimeError(f"iPXE's DHCP gave boot file {entry!r}, not a script URL")
        t = mark("dhcp-ipxe", t)
        transport = httpx.AsyncHTTPTransport(local_address=client.ip)
        async with httpx.AsyncClient(transport=transport, timeout=120) as http:
            script = (await get(http, entry, client)).text
            chained = _CHAIN.search(script)
            if chained is None:
                raise RuntimeError(f"the entry script chains nowhere: {script[:200]!r}")
            script = (await get(http, expand(chained.group(1), client), client)).text
            kernel, initrd = _KERNEL.search(script), _INITRD.search(script)
            if kernel is None or initrd is None:
                raise RuntimeError(f"not a kernel-direct script: {script[:300]!r}")
            t = mark("script", t)
            if boot_files:
                for url in (kernel.group(1), initrd.group(1)):
                    await fetch(http, url, client)
                t = mark("boot-files", t)
            nonce = _NONCE.search(kernel.group(2))
            server_url = re.search(r"streamboot\.server=(\S+)", kernel.group(2))
            if nonce is None or server_url is None:
                raise RuntimeError(f"no nonce on the kernel line: {kernel.group(0)[:300]!r}")
            r = await get(
                http, f"{server_url.group(1)}/session/redeem?nonce={nonce.group(1)}", client
            )
            answer = dict(line.split("=", 1) for line in r.text.splitlines() if "=" in line)
            t = mark("redeem", t)
        host, nbd_port, token = export_of(answer)
        result = await replay(host, nbd_port, token, requests, paced=False, timeout_s=120,
                              local_addr=client.ip)  # fmt: skip
        client.nbd_errors = result.errors
        client.bytes_read = result.bytes_read
        if result.errors:
            raise RuntimeError(f"NBD: {result.error}")
        t = mark("nbd", t)
        client.done_s = t - start
    except Exception as exc:
        client.error = f"{type(exc).__name__}: {exc}"[:300]


async def fetch(http: Any, url: str, client: Client) -> None:
    """A boot file, read to its end and dropped (see get() for the one retry)."""
    for attempt in (1, 2):
        try:
            async with http.stream("GET", url) as r:
                r.raise_for_status()
                async for chunk in r.aiter_raw(1 << 20):
                    client.bytes_http += len(chunk)
            return
        except httpx.RemoteProtocolError:
            if attempt == 2:
                raise
            client.stale += 1


def export_of(answer: dict[str, str]) -> tuple[str, int, str]:
    """The NBD export in the redeem answer (``key=value`` lines: docs/boot.md)."""
    return answer["nbd_host"], int(answer["nbd_port"]), answer["export"]


async def clients_main(first: int, n: int, boot_files: bool) -> dict[str, Any]:
    """Clients ``first`` .. ``first + n - 1``. Says "ready" on stdout once set up, then
    starts them at the wall-clock time read from stdin (the same for every process)."""
    from bench.bootstorm import load_trace

    _size, requests = load_trace()
    port = await DhcpPort.open()
    clients = [Client(f"52:54:0b:00:{i >> 8:02x}:{i & 255:02x}") for i in range(first, first + n)]
    print("ready", flush=True)
    start_at = float(await asyncio.to_thread(sys.stdin.readline))
    await asyncio.sleep(max(0.0, start_at - time.time()))
    await asyncio.gather(*(boot_one(port, c, requests, boot_files, start_at) for c in clients))
    return {"wall_s": time.time() - start_at, "clients": [asdict(c) for c in clients]}


# --- the server side and the report -----------------------------------------------------


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def join_client_namespace(server_ns: str, client_ns: str) -> None:
    """A second namespace whose interface vc0 is on the server's bridge (veth)."""
    sh("ip", "netns", "add", client_ns)
    sh("ip", "link", "add", "vs0", "netns", server_ns, "type", "veth", "peer", "name",
       CLIENT_IF, "netns", client_ns)  # fmt: skip
    sh("ip", "-n", server_ns, "link", "set", "vs0", "master", "br0")
    sh("ip", "-n", server_ns, "link", "set", "vs0", "up")
    sh("ip", "-n", client_ns, "link", "set", "lo", "up")
    sh("ip", "-n", client_ns, "addr", "add", f"{CLIENT_BASE_IP}/24", "dev", CLIENT_IF)
    # Every address of the DHCP pool, ahead: a client then talks from the address it was
    # leased at once (adding it per client, an `ip` process each, made the client side the
    # storm's bottleneck; the server sees the same traffic either way).
    first, last = (int(ipaddress.IPv4Address(a)) for a in POOL)
    batch = "".join(
        f"addr add {ipaddress.IPv4Address(a)}/24 dev {CLIENT_IF}\n" for a in range(first, last + 1)
    )
    subprocess.run(["ip", "-n", client_ns, "-batch", "-"], input=batch.encode(), check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    sh("ip", "-n", client_ns, "link", "set", CLIENT_IF, "up")


def streamboot_pids(lab: Any) -> list[int]:
    import psutil

    if lab.up is None:
        return []
    top = psutil.Process(lab.up.pid)
    return [top.pid, *(p.pid for p in top.children(recursive=True))]


def cpu_s(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def stats(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{percentile(xs, 50):.2f} / {percentile(xs, 99):.2f} / {max(xs):.2f}"


def report(result: dict[str, Any], n: int, server_cpu: float) -> tuple[str, dict[str, Any]]:
    clients = result["clients"]
    done = [c for c in clients if not c["error"]]
    lost = [c for c in clients if c["error"]]
    lines = [
        f"{n} clients: {len(done)} booted, {len(lost)} lost, wall {result['wall_s']:.1f} s; "
        f"streamboot's processes {server_cpu:.1f} CPU s ({server_cpu * 1000 / n:.0f} ms per "
        "client)",
        "",
        "| phase | p50 / p99 / max s | clients |",
        "|---|---|---|",
    ]
    summary: dict[str, Any] = {"clients": n, "booted": len(done), "lost": len(lost),
                               "wall_s": result["wall_s"], "server_cpu_s": server_cpu}  # fmt: skip
    for phase in PHASES:
        xs = [c["phases"][phase] for c in clients if phase in c["phases"]]
        if xs:
            lines.append(f"| {phase} | {stats(xs)} | {len(xs)} |")
            summary[phase] = {"p50": percentile(xs, 50), "p99": percentile(xs, 99), "max": max(xs)}
    whole = [c["done_s"] for c in done]
    lines.append(f"| whole boot | {stats(whole)} | {len(whole)} |")
    if whole:
        summary["whole boot"] = {
            "p50": percentile(whole, 50), "p99": percentile(whole, 99), "max": max(whole)
        }  # fmt: skip
    retries = sum(c["dhcp_retries"] for c in clients)
    busy = sum(c["busy"] for c in clients)
    stale = sum(c["stale"] for c in clients)
    http_mib = sum(c["bytes_http"] for c in clients) / (1 << 20)
    lines += [
        "",
        f'DHCP retransmits: {retries}; script answers "busy, retry": {busy}; requests '
        f"sent again on a new connection after the server closed an idle one: {stale}; boot "
        f"files over HTTP: {http_mib:.0f} MiB in all; read over NBD per client: "
        f"{done[0]['bytes_read'] >> 20 if done else 0} MiB",
    ]
    summary.update(dhcp_retransmits=retries, busy=busy, stale_keepalive=stale,
                   http_mib=http_mib)  # fmt: skip
    for c in lost[:5]:
        lines.append(f"lost {c['mac']}: {c['error']}")
    return "\n".join(lines), summary


def main_server(args: argparse.Namespace) -> None:
    from tests.conftest import traversable_tmpdir
    from tests.e2e.pxe_lab import BootLab, delete_namespace

    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, ports 67/69)")
    missing = [t for t in ("ip", "curl") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"needs {missing}")
    work = traversable_tmpdir("streamboot-pxestorm-")
    lab = BootLab(work / "streamboot", taps=0, pool=POOL)
    lab.root.mkdir()
    lab.root.chmod(0o711)
    client_ns = f"{lab.ns}-cl"
    try:
        lab.create()
        join_client_namespace(lab.ns, client_ns)
        lab.start(
            STREAMBOOT_UNKNOWN_DEVICE_POLICY="auto-add",
            STREAMBOOT_AUTO_ADD_COLLECTION="storm",
            STREAMBOOT_AUTO_ADD_NAME_TEMPLATE="storm-{n:04}",
        )
        print("building the demo vdisk (streamboot vdisk build-demo demo)...", flush=True)
        lab.cli("vdisk", "build-demo", "demo")
        lab.cli("assign", "storm", "demo", "--collection", "--default")
        pids = streamboot_pids(lab)
        cpu0 = cpu_s(pids)
        print(f"{args.clients} clients boot at once...", flush=True)
        procs, outs = [], []
        for k in range(args.client_procs):
            first = args.clients * k // args.client_procs
            count = args.clients * (k + 1) // args.client_procs - first
            outs.append(work / f"clients-{k}.json")
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", client_ns, sys.executable, __file__, "clients",
                 "--first", str(first), "--clients", str(count), "--out", str(outs[-1]),
                 *(["--no-boot-files"] if args.no_boot_files else [])],
                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            ))  # fmt: skip
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        start_at = time.time() + 0.5
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{start_at}\n")
            proc.stdin.close()
        for proc in procs:
            proc.wait()
        parts = [json.loads(o.read_text()) for o in outs if o.exists()]
        result = {
            "wall_s": max((r["wall_s"] for r in parts), default=0.0),
            "clients": [c for r in parts for c in r["clients"]],
        }
        server_cpu = cpu_s(pids) - cpu0
        text, summary = report(result, args.clients, server_cpu)
        print("\n" + text)
        print(
            f"\nuptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}"
        )
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1))
    finally:
        lab.stop()
        delete_namespace(client_ns)
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="?", default="run", choices=("run", "clients"))
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--client-procs", type=int, default=4, help="processes the clients run in")
    ap.add_argument("--first", type=int, default=0, help="(clients) the first client's number")
    ap.add_argument("--no-boot-files", action="store_true", help="skip the kernel/initrd GETs")
    ap.add_argument("--out", type=Path, help="(clients) where the clients' results go")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = ap.parse_args()
    if args.command == "clients":
        import uvloop

        result = uvloop.run(clients_main(args.first, args.clients, not args.no_boot_files))
        args.out.write_text(json.dumps(result))
    else:
        main_server(args)


if __name__ == "__main__":
    main()
