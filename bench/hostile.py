"""A good client's latency while hostile clients load the server (issue #26, item 4).

    uv run python bench/hostile.py [--loads LOAD ...] [--tries 5]      (as root)

One run. Per load, a real good client is timed ``--tries`` times against streamboot's server
and, where the load applies, a peer in the same run (nbdkit's file plugin, tftpd-hpa,
dnsmasq); beside its latency, what the server process (or process group) holds: resident
memory before and under the load, CPU seconds spent during it, and lines it logged.

Loads (``--loads``; default all):

- ``none``: no load;
- ``nbd-handshakes``: ``--connections`` sockets from 127.0.0.2 that read the NBD greeting
  and never answer it;
- ``http-slowloris``: as many sockets on the stream's HTTP server and on the boot HTTP
  server, each sending its request head a byte a second (never finished);
- ``bare-connections``: ``--bare`` (20,000) TCP connections that never send a byte, from one
  address (127.0.0.2) and spread over 100 (127.0.1.x); every server runs under a
  descriptor limit of ``--fd-limit`` (8,192) so that they exceed it;
- ``tftp-flood``: read requests for a boot file from 250 addresses at ``--tftp-rate`` per
  second (each from a new port, never acknowledged), streamboot's TFTP server beside
  tftpd-hpa (``in.tftpd``); the good client is tftp-hpa's ``tftp``;
- ``dhcp-flood``: DHCP DISCOVERs with random MACs at ``--dhcp-rate`` (2,000) per second, for
  as long as the tries take and at least ``--dhcp-packets`` (10,000) in all, on a veth pair between two
  private network namespaces: streamboot's DHCP server (full mode) beside dnsmasq
  (``--no-ping``: no ICMP check of an address before offering it), both with a pool of 100;
  the good client is busybox ``udhcpc`` getting a lease (tries 0.6 s apart: streamboot
  batches lease writes, at most one per 0.5 s, and an ACK leaves after its write). Also
  reported: the lease file's versions seen during the flood and the addresses in it.

Good clients: ``nbdinfo --size`` (connect, handshake, the size), ``curl -r 0-4095`` (the
stream's HTTP export, the boot HTTP server's file), ``tftp`` (a 64 KiB file), ``udhcpc``.
Bounded: every load lasts only its measurements, every socket is closed and every server
process group ended after it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.nbd import free_port, wait_port  # noqa: E402

TOKEN = "hostile-token"
ATTACKER = "127.0.0.2"
LOADS = ("none", "nbd-handshakes", "http-slowloris", "bare-connections", "tftp-flood",
         "dhcp-flood")  # fmt: skip
# A good client not served within this counts as not served.
CLIENT_TIMEOUT_S = 10.0
TICK = os.sysconf("SC_CLK_TCK")


# --- server processes and what they hold -------------------------------------------------


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def group(self) -> list[int]:
        """The pids of the server's process group (tftpd-hpa forks one per transfer)."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[2]) == self.proc.pid:
                        pids.append(int(entry))
        return pids

    def rss_mib(self) -> float:
        total = 0
        for pid in self.group():
            with contextlib.suppress(OSError, StopIteration):
                line = next(x for x in open(f"/proc/{pid}/status") if x.startswith("VmRSS:"))
                total += int(line.split()[1])
        return total / 1024

    def cpu_s(self) -> float:
        """CPU seconds of the group's live processes and of the children its leader reaped."""
        total = 0
        for pid in self.group():
            with contextlib.suppress(OSError):
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (
                    int(f[11])
                    + int(f[12])
                    + (int(f[13]) + int(f[14]) if pid == self.proc.pid else 0)
                )
        return total / TICK

    def log_lines(self) -> int:
        with contextlib.suppress(OSError):
            return len(self.log.read_bytes().splitlines())
        return 0


@contextlib.contextmanager
def running(name: str, cmd: list[str], logdir: Path, ready: Callable[[], None]) -> Iterator[Server]:
    log = logdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ready()
        yield Server(name, proc, log)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(5)
                break
            except subprocess.TimeoutExpired:
                continue


def fd_limited(cmd: list[str], limit: int) -> list[str]:
    return ["prlimit", f"--nofile={limit}:{limit}", *cmd]


# --- good clients ------------------------------------------------------------------------


def timed(cmd: list[str]) -> float | None:
    """Seconds until ``cmd`` succeeded; None when it failed or took over CLIENT_TIMEOUT_S."""
    t = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=CLIENT_TIMEOUT_S)
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError):
        return None
    return time.perf_counter() - t


@dataclass
class Row:
    load: str
    server: str
    client: str
    times: list[float | None]
    rss_before: float = 0.0
    rss_loaded: float = 0.0
    cpu_s: float = 0.0
    log_lines: int = 0
    note: str = ""

    def cells(self) -> list[str]:
        served = [t for t in self.times if t is not None]
        med = f"{statistics.median(served) * 1000:.0f}" if served else "-"
        worst = f"{max(served) * 1000:.0f}" if served else "-"
        return [self.load, self.server, self.client, f"{len(served)}/{len(self.times)}", med,
                worst, f"{self.rss_before:.0f} -> {self.rss_loaded:.0f}", f"{self.cpu_s:.1f}",
                str(self.log_lines), self.note]  # fmt: skip


@dataclass
class Bench:
    tries: int
    rows: list[Row] = field(default_factory=list)

    def measure(self, load: str, server: Server, client: str, cmd: list[str],
                loaded: Callable[[], contextlib.AbstractContextManager[object]],
                note: Callable[[], str] = lambda: "", gap_s: float = 0.0) -> None:  # fmt: skip
        rss0, lines0 = server.rss_mib(), server.log_lines()
        with loaded():
            cpu0, rss = server.cpu_s(), server.rss_mib()
            times = []
            for _ in range(self.tries):
                time.sleep(gap_s)
                times.append(timed(cmd))
                rss = max(rss, server.rss_mib())
            cpu = server.cpu_s() - cpu0
        self.rows.append(Row(load, server.name, client, times, rss0, rss, cpu,
                             server.log_lines() - lines0, note()))  # fmt: skip


# --- TCP loads ---------------------------------------------------------------------------


# Connections one load process holds: the bench's own descriptor limit cannot be raised
# past its hard limit (20,000 here), so a larger load is spread over several processes.
PER_HOLDER = 8000


def hold(port: int, n: int, trickle: bytes, sources: list[str]) -> None:
    """``n`` connections from ``sources`` (round robin) that never finish; with ``trickle``,
    each sends its next byte every second. Prints how many the server still holds, then
    keeps them until stdin closes (what ``--hold`` runs)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks: list[socket.socket] = []
    for i in range(n):  # connects not waited for: a full backlog drops SYNs for seconds
        s = socket.socket()
        s.setblocking(False)
        try:
            s.bind((sources[i % len(sources)], 0))
            s.connect_ex(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        socks.append(s)
    time.sleep(2.0)
    for s in socks[:]:  # the ones not connected by now count as refused
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            s.close()
            socks.remove(s)
            continue
        try:
            s.getpeername()
        except OSError:
            s.close()
            socks.remove(s)
    stop = threading.Event()

    def drip() -> None:
        i = 0
        while not stop.wait(1.0):
            for s in socks:
                with contextlib.suppress(OSError):
                    s.send(trickle[i % len(trickle) : i % len(trickle) + 1])
            i += 1

    if trickle:
        threading.Thread(target=drip, daemon=True).start()
    time.sleep(1.0)  # the server has accepted or refused them all
    print(sum(map(still_open, socks)), flush=True)
    sys.stdin.read()
    stop.set()


@contextlib.contextmanager
def tcp_load(port: int, n: int, sources: list[str], trickle: bytes = b"") -> Iterator[list[int]]:
    """:func:`hold` in as many processes as it takes. Yields [connections still open]."""
    procs = []
    try:
        for first in range(0, n, PER_HOLDER):
            count = min(PER_HOLDER, n - first)
            cmd = [sys.executable, __file__, "--hold", str(port), str(count), trickle.hex(),
                   *sources[first % len(sources):], *sources[:first % len(sources)]]  # fmt: skip
            procs.append(
                subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
        yield [sum(int(p.stdout.readline() or 0) for p in procs if p.stdout)]
    finally:
        for p in procs:
            with contextlib.suppress(OSError):
                p.stdin.close()  # type: ignore[union-attr]
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def still_open(s: socket.socket) -> bool:
    """Whether the server still holds ``s``: no reset, no EOF after what it said."""
    try:
        while s.recv(1 << 16):
            pass
    except BlockingIOError:
        return True
    except OSError:
        pass
    return False


# --- TFTP flood --------------------------------------------------------------------------


def rrq(name: str) -> bytes:
    return b"\x00\x01" + name.encode() + b"\x00octet\x00blksize\x001428\x00"


@contextlib.contextmanager
def tftp_flood(port: int, name: str, rate: float) -> Iterator[list[int]]:
    """Read requests at ``rate`` per second from 127.1.0.1-250, each from a new port."""
    stop = threading.Event()
    sent = [0]
    packet = rrq(name)

    def run() -> None:
        start = time.monotonic()
        while not stop.is_set():
            due = int((time.monotonic() - start) * rate)
            while sent[0] < due:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    with contextlib.suppress(OSError):
                        s.bind((f"127.1.0.{sent[0] % 250 + 1}", 0))
                        s.sendto(packet, ("127.0.0.1", port))
                sent[0] += 1
            stop.wait(0.01)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        time.sleep(2.0)  # the flood is under way
        yield sent
    finally:
        stop.set()
        thread.join()


# --- the streamboot servers alone in a process (what --serve-* runs) ---------------------


def serve_boot_http(port: int, root: str) -> None:
    import asyncio

    import uvloop

    from services.boot.http_server import HttpServer, Request, Response, file_response

    async def handler(request: Request) -> Response:
        return file_response(os.path.join(root, "file.bin"), request)

    async def main() -> None:
        await HttpServer(handler, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    uvloop.run(main())


def serve_dhcp(interface: str, leases: str) -> None:
    import asyncio
    import logging

    import uvloop

    from services.boot.dhcp_leases import LeaseStore
    from services.boot.dhcp_server import DhcpConfig, DhcpResponder, DhcpServer, open_socket

    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    cfg = DhcpConfig(mode="full", server_ip="10.213.0.1", ipxe_script_url="http://x/",
                     pool_start="10.213.0.100", pool_end="10.213.0.199", lease_s=600)  # fmt: skip

    async def main() -> None:
        store = LeaseStore(Path(leases), "10.213.0.100", "10.213.0.199")
        server = DhcpServer(DhcpResponder(cfg, store), server_port=67, client_port=68)
        await server.start(open_socket("0.0.0.0", 67, interface))
        await asyncio.Event().wait()

    uvloop.run(main())


# --- the benchmark -----------------------------------------------------------------------


def nbd_and_http(b: Bench, args: argparse.Namespace, tmp: Path) -> None:
    image = tmp / "image.raw"
    image.write_bytes(os.urandom(16 << 20))
    (tmp / "file.bin").write_bytes(os.urandom(1 << 20))
    p = {name: free_port() for name in ("nbd", "http", "nbdkit", "boot")}
    py = sys.executable
    stream = fd_limited([py, "-m", "services.stream.standalone", "--token", TOKEN,
                         "--nbd-port", str(p["nbd"]), "--http-port", str(p["http"]), str(image)],
                        args.fd_limit)  # fmt: skip
    nbdkit = fd_limited(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(p["nbdkit"]), "file",
                         str(image)], args.fd_limit)  # fmt: skip
    boot = fd_limited([py, __file__, "--serve-boot-http", str(p["boot"]), str(tmp)], args.fd_limit)
    nbdinfo = {
        "stream": ["nbdinfo", "--size", f"nbd://127.0.0.1:{p['nbd']}/{TOKEN}"],
        "nbdkit": ["nbdinfo", "--size", f"nbd://127.0.0.1:{p['nbdkit']}/"],
    }
    curl = {
        "stream": ["curl", "-sf", "-o", "/dev/null", "-r", "0-4095",
                   f"http://127.0.0.1:{p['http']}/s/{TOKEN}"],
        "boot-http": ["curl", "-sf", "-o", "/dev/null", "-r", "0-4095",
                      f"http://127.0.0.1:{p['boot']}/file.bin"],
    }  # fmt: skip
    nbd_port = {"stream": p["nbd"], "nbdkit": p["nbdkit"]}
    http_port = {"stream": p["http"], "boot-http": p["boot"]}
    spread = [f"127.0.1.{i}" for i in range(1, 101)]
    took: list[int] = [0]

    def load(cm: Callable[[], contextlib.AbstractContextManager[list[int]]]) -> Callable[[], contextlib.AbstractContextManager[object]]:  # fmt: skip
        @contextlib.contextmanager
        def go() -> Iterator[None]:
            with cm() as held:
                yield
                took[0] = held[0]

        return go

    def held() -> str:
        return f"{took[0]:,} still open"

    with contextlib.ExitStack() as stack:
        servers = {
            "stream": stack.enter_context(running("stream", stream, tmp, lambda: wait_port(p["nbd"]))),
            "nbdkit": stack.enter_context(running("nbdkit", nbdkit, tmp, lambda: wait_port(p["nbdkit"]))),
            "boot-http": stack.enter_context(running("boot-http", boot, tmp, lambda: wait_port(p["boot"]))),
        }  # fmt: skip
        none = load(lambda: contextlib.nullcontext([0]))
        if "none" in args.loads:
            for name in ("stream", "nbdkit"):
                b.measure("none", servers[name], "nbdinfo", nbdinfo[name], none)
            for name in ("stream", "boot-http"):
                b.measure("none", servers[name], "curl", curl[name], none)
        if "nbd-handshakes" in args.loads:
            for name in ("stream", "nbdkit"):
                n = args.connections
                b.measure(f"{n:,} NBD handshakes never finished", servers[name], "nbdinfo",
                          nbdinfo[name], load(lambda n=n, name=name: tcp_load(nbd_port[name], n, [ATTACKER])),
                          held)  # fmt: skip
        if "http-slowloris" in args.loads:
            head = (f"GET /s/{TOKEN} HTTP/1.1\r\nHost: x\r\n" + "X-Pad: y\r\n" * 50).encode()
            for name in ("stream", "boot-http"):
                n = args.connections
                b.measure(f"{n:,} HTTP slowloris", servers[name], "curl", curl[name],
                          load(lambda n=n, name=name: tcp_load(http_port[name], n, [ATTACKER], head)),
                          held)  # fmt: skip
        if "bare-connections" in args.loads:
            n = args.bare
            for label, sources in ((f"{n:,} bare connections, 1 address", [ATTACKER]),
                                   (f"{n:,} bare connections, 100 addresses", spread)):  # fmt: skip
                for name, client, cmd, port in (
                    ("stream", "nbdinfo", nbdinfo["stream"], p["nbd"]),
                    ("nbdkit", "nbdinfo", nbdinfo["nbdkit"], p["nbdkit"]),
                    ("boot-http", "curl", curl["boot-http"], p["boot"]),
                ):
                    b.measure(label, servers[name], client, cmd,
                              load(lambda port=port, sources=sources: tcp_load(port, n, sources)),
                              held)  # fmt: skip


def tftp(b: Bench, args: argparse.Namespace, tmp: Path) -> None:
    from bench.tftp import wait_port as wait_tftp

    root = tmp / "tftp"
    root.mkdir()
    root.chmod(0o755)  # in.tftpd drops to the `tftp` user
    (root / "file.bin").write_bytes(os.urandom(64 << 10))
    (root / "file.bin").chmod(0o644)
    p = {"stream": free_port(), "hpa": free_port()}
    ours = [
        sys.executable,
        "-c",
        f"from bench.tftp import serve; serve({str(root)!r}, {p['stream']})",
    ]
    hpa = ["in.tftpd", "-L", "-a", f"127.0.0.1:{p['hpa']}", "-s", str(root)]
    sent = [0]

    def flood(port: int) -> Callable[[], contextlib.AbstractContextManager[object]]:
        @contextlib.contextmanager
        def go() -> Iterator[None]:
            with tftp_flood(port, "file.bin", args.tftp_rate) as n:
                yield
                sent[0] = n[0]

        return go

    for name, cmd, port in (("streamboot-tftp", ours, p["stream"]), ("tftpd-hpa", hpa, p["hpa"])):
        with running(name, cmd, tmp, lambda port=port, name=name: wait_tftp(port, name)) as server:
            get = ["tftp", "127.0.0.1", str(port), "-m", "binary", "-c", "get", "file.bin",
                   str(tmp / f"got-{name}")]  # fmt: skip
            if "none" in args.loads:
                b.measure("none", server, "tftp", get, lambda: contextlib.nullcontext())
            if "tftp-flood" in args.loads:
                b.measure(f"TFTP flood {args.tftp_rate:,.0f} requests/s", server, "tftp", get,
                          flood(port), lambda: f"{sent[0]:,} sent")  # fmt: skip


def dhcp(b: Bench, args: argparse.Namespace, tmp: Path) -> None:
    from services.boot import dhcp_packets as dp
    from tests.boot.netns import client_socket, veth_link

    # A DISCOVER busybox udhcpc sent (recorded for the DHCP tests), with forged MACs.
    discover = dp.parse((ROOT / "tests/boot/fixtures/udhcpc_plain_discover.bin").read_bytes())
    rng = random.Random(26)

    def forged() -> bytes:
        discover.chaddr = bytes((0x02, *rng.randbytes(5)))
        discover.xid = rng.getrandbits(32)
        return dp.build(discover)

    with veth_link() as link:
        script = tmp / "udhcpc.script"
        script.write_text("#!/bin/sh\nexit 0\n")
        script.chmod(0o755)
        udhcpc = link.client_cmd("busybox", "udhcpc", "-i", link.client_if, "-f", "-q", "-n",
                                 "-t", "10", "-T", "1", "-s", str(script))  # fmt: skip
        sender = link.in_client_ns(client_socket(link, port=0))
        writes: set[tuple[int, int]] = set()
        sent = [0]

        def flood(leases: Path) -> Callable[[], contextlib.AbstractContextManager[object]]:
            @contextlib.contextmanager
            def go() -> Iterator[None]:
                stop = threading.Event()

                def run() -> None:  # at --dhcp-rate, until told to stop
                    start = time.monotonic()
                    while not stop.is_set():
                        due = int((time.monotonic() - start) * args.dhcp_rate)
                        while sent[0] < due:
                            with contextlib.suppress(OSError):  # the socket buffer full
                                sender.sendto(forged(), ("255.255.255.255", 67))
                            sent[0] += 1
                        stop.wait(0.005)

                def watch() -> None:
                    while not stop.wait(0.02):
                        with contextlib.suppress(OSError):
                            st = leases.stat()
                            writes.add((st.st_ino, st.st_mtime_ns))

                threads = [threading.Thread(target=f, daemon=True) for f in (run, watch)]
                for t in threads:
                    t.start()
                try:
                    time.sleep(0.5)
                    yield
                    deadline = time.monotonic() + 60
                    while sent[0] < args.dhcp_packets and time.monotonic() < deadline:
                        time.sleep(0.1)  # at least --dhcp-packets in all
                finally:
                    stop.set()
                    for t in threads:
                        t.join()

            return go

        def note(leases: Path) -> Callable[[], str]:
            def say() -> str:
                entries = leases.read_text().count("10.213.0.") if leases.exists() else 0
                return (
                    f"{sent[0]:,} sent; lease file: {len(writes)} versions (the good "
                    f"client's leases included), {entries} addresses in it"
                )

            return say

        py = sys.executable
        for name in ("streamboot-dhcp", "dnsmasq"):
            leases = tmp / f"{name}.leases"
            if name == "dnsmasq":
                cmd = ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
                       f"--interface={link.server_if}", "--bind-interfaces",
                       "--dhcp-range=10.213.0.100,10.213.0.199,255.255.255.0,10m",
                       f"--dhcp-leasefile={leases}", "--dhcp-authoritative", "--no-ping"]  # fmt: skip
            else:
                cmd = [py, __file__, "--serve-dhcp", link.server_if, str(leases)]
            cmd = ["ip", "netns", "exec", link.server_ns, *cmd]
            with running(name, cmd, tmp, lambda: time.sleep(2.0)) as server:
                # Tries apart by more than streamboot's lease-write interval (0.5 s): one
                # after the other, each ACK would wait for the write batch after the last.
                gap = 0.6
                if "none" in args.loads:
                    b.measure("none", server, "udhcpc", udhcpc, lambda: contextlib.nullcontext(),
                              gap_s=gap)  # fmt: skip
                if "dhcp-flood" in args.loads:
                    writes.clear()
                    sent[0] = 0
                    b.measure(f"DHCP DISCOVER flood {args.dhcp_rate:,.0f}/s, random MACs",
                              server, "udhcpc", udhcpc, flood(leases), note(leases), gap)  # fmt: skip
        sender.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--loads", nargs="+", choices=LOADS, default=list(LOADS))
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--bare", type=int, default=20000)
    ap.add_argument("--fd-limit", type=int, default=8192)
    ap.add_argument("--tftp-rate", type=float, default=500.0)
    ap.add_argument("--dhcp-packets", type=int, default=10000)
    ap.add_argument("--dhcp-rate", type=float, default=2000.0)
    ap.add_argument("--tries", type=int, default=5)
    ap.add_argument("--serve-boot-http", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--serve-dhcp", nargs=2, metavar=("IF", "LEASES"), help=argparse.SUPPRESS)
    ap.add_argument("--hold", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hold:
        port, n, trickle, *sources = args.hold
        return hold(int(port), int(n), bytes.fromhex(trickle), sources)
    if args.serve_boot_http:
        return serve_boot_http(int(args.serve_boot_http[0]), args.serve_boot_http[1])
    if args.serve_dhcp:
        return serve_dhcp(*args.serve_dhcp)
    os.chdir(ROOT)
    b = Bench(args.tries)
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as name:
        tmp = Path(name)
        tmp.chmod(0o755)
        if set(args.loads) & {"none", "nbd-handshakes", "http-slowloris", "bare-connections"}:
            nbd_and_http(b, args, tmp)
        if set(args.loads) & {"none", "tftp-flood"}:
            tftp(b, args, tmp)
        if set(args.loads) & {"none", "dhcp-flood"}:
            dhcp(b, args, tmp)

    print(f"\nGood client under hostile load: {args.tries} tries each, {os.cpu_count()} CPUs, "
          f"load avg {os.getloadavg()[0]:.1f} at the end\n")  # fmt: skip
    print(
        "| load | server | good client | served | median ms | worst ms | RSS MiB (before -> "
        "under load) | CPU s under load | log lines | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in b.rows:
        print("| " + " | ".join(row.cells()) + " |")


if __name__ == "__main__":
    main()
