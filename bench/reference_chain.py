"""The reference PXE chain streamboot's is measured beside: dnsmasq (DHCP and router
advertisements), busybox httpd (iPXE scripts, boot files, Range requests) and nbdkit
(``--filter=cow file IMAGE``: the NBD root, its cow layer the write cache), in a network
namespace of their own with the same bridge (br0 at 10.77.0.1/24) and taps as streamboot's
lab (tests/e2e/pxe_lab.py). bench/pxechain.py boots the demo through it, bench/realboot.py
the real Debian.

iPXE, recognised by DHCP option 175 or user class iPXE, gets a script URL chosen by its MAC
(``scripts``: MAC prefix -> file under www/, else ``default_script``). IPv6: iPXE waits
~13 s for IPv6 autoconfiguration unless a router advertisement without M/O flags arrives;
dnsmasq sends them (``enable-ra``, ``ra-only`` for fd77::/64, router lifetime 0; it needs a
prefix, so iPXE also takes a SLAAC address), as streamboot answers a router solicitation.

DHCP: by default dnsmasq pings an address before it first offers it (up to 3 s), and its
offer carries no PXE options, so iPXE keeps listening for ProxyDHCP offers for a few seconds
before it requests it; streamboot does neither. ``fast_dhcp`` tunes the reference the same
way: dnsmasq ``no-ping`` and iPXE's own setting ipxe.no-pxedhcp (option 175.176 = 1).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.pxe_lab import SERVER_IP, create_bridge_namespace, delete_namespace  # noqa: E402

HTTP_PORT = 18082  # busybox httpd: where the images' streamboot.server URLs point
NBD_PORT = 10809  # the first nbdkit's; serve_nbd picks others
POOL = ("10.77.0.100", "10.77.0.150")
RA_PREFIX = "fd77::"
REF_NONCE = "reference-chain-nonce"  # any nonce: the reference's redeem answer is a file
BASE_URL = f"http://{SERVER_IP}:{HTTP_PORT}"
TOOLS = {"dnsmasq": "dnsmasq-base", "nbdkit": "nbdkit", "busybox": "busybox-static"}


def reference_tools_missing() -> list[str]:
    """The Debian packages the reference chain needs and this machine lacks."""
    return [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]


@dataclass
class ReferenceChain:
    """dnsmasq + busybox httpd + nbdkit in a namespace of their own."""

    root: Path
    image: Path  # what nbdkit serves (each server its own cow layer over it)
    default_script: str  # under www/: the script iPXE gets unless ``scripts`` names another
    scripts: dict[str, str] = field(default_factory=dict)  # MAC prefix -> script under www/
    fast_dhcp: bool = False  # no-ping, ipxe.no-pxedhcp (see the module's doc)
    taps: int = 2
    ns: str = field(default_factory=lambda: f"sbref-{uuid.uuid4().hex[:6]}")
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def www(self) -> Path:
        return self.root / "www"

    def exec(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def create(self) -> None:
        """The namespace and an empty www/ (the caller writes the scripts and files)."""
        create_bridge_namespace(self.ns, taps=self.taps)
        # dnsmasq advertises a prefix it has an address in (nodad: br0 has no carrier yet).
        _run(["ip", "-n", self.ns, "addr", "add", f"{RA_PREFIX}1/64", "dev", "br0", "nodad"])
        self.www.mkdir(parents=True)

    def write_redeem_answer(self, path: str, lines: dict[str, str]) -> None:
        """What the boot service's ``/session/redeem`` answers, as the file busybox httpd
        serves at ``path``/session/redeem (it ignores the query string)."""
        answer = self.www / path.strip("/") / "session" / "redeem"
        answer.parent.mkdir(parents=True, exist_ok=True)
        answer.write_text("".join(f"{key}={value}\n" for key, value in lines.items()))

    def start(self) -> None:
        """dnsmasq (DHCP only, no DNS) and httpd; then serve_nbd for each root."""
        tags = [f"s{i}" for i in range(len(self.scripts))]
        by_mac = [
            line
            for tag, (prefix, script) in zip(tags, self.scripts.items(), strict=True)
            for line in (f"dhcp-mac=set:{tag},{prefix}:*", f"dhcp-boot=tag:ipxe,tag:{tag},{BASE_URL}/{script}")
        ]  # fmt: skip
        others = ",".join(f"tag:!{tag}" for tag in tags)
        conf = self.root / "dnsmasq.conf"
        conf.write_text(
            "\n".join([
                "port=0", "interface=br0", "bind-interfaces", "no-resolv", "no-hosts",
                f"dhcp-range={POOL[0]},{POOL[1]},255.255.255.0,1h",
                f"dhcp-leasefile={self.root / 'dnsmasq.leases'}",
                "dhcp-authoritative",
                "dhcp-match=set:ipxe,175", "dhcp-userclass=set:ipxe,iPXE",
                *by_mac,
                f"dhcp-boot=tag:ipxe{',' + others if others else ''},{BASE_URL}/{self.default_script}",
                "enable-ra", f"dhcp-range={RA_PREFIX},ra-only,64", "ra-param=br0,10,0",
                "log-dhcp", f"log-facility={self.root / 'dnsmasq.log'}",
                *(["no-ping", "dhcp-option=tag:ipxe,encap:175,176,1"] if self.fast_dhcp else []),
            ]) + "\n"
        )  # fmt: skip
        self._spawn("dnsmasq", "dnsmasq", "--keep-in-foreground", f"--conf-file={conf}")
        self._spawn(
            "httpd", "busybox", "httpd", "-f", "-vv", "-p", f"{SERVER_IP}:{HTTP_PORT}",
            "-h", str(self.www),
        )  # fmt: skip
        self.wait(HTTP_PORT)

    def serve_nbd(self, port: int = NBD_PORT) -> None:
        """A fresh nbdkit on ``port`` (an empty cow layer: the one before is ended), as
        each streamboot session gets a fresh write cache."""
        name = f"nbdkit-{port}"
        old = self.procs.pop(name, None)
        if old is not None:
            _end(old)
        self._spawn(
            name, "nbdkit", "-f", "-i", SERVER_IP, "-p", str(port),
            "--filter=cow", "file", str(self.image),
        )  # fmt: skip
        self.wait(port)

    def server_pids(self) -> list[int]:
        return [proc.pid for proc in self.procs.values()]

    def requests(self) -> list[str]:
        """The paths busybox httpd was asked for so far (-vv logs each request line)."""
        log = (self.root / "httpd.out").read_text(errors="replace")
        return [line.split("url:", 1)[1] for line in log.splitlines() if "url:" in line]

    def wait(self, port: int) -> None:
        """Until something listens on SERVER_IP:port (inside the namespace)."""
        code = f"from bench.common import wait_port; wait_port({port}, host={SERVER_IP!r})"
        subprocess.run(self.exec(sys.executable, "-c", code), cwd=ROOT, check=True, timeout=30)

    def _spawn(self, name: str, *argv: str) -> None:
        log = open(self.root / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(
            self.exec(*argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()

    def stop(self) -> None:
        for proc in self.procs.values():
            _end(proc)
        delete_namespace(self.ns)


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server; killed when it lingers (nbdkit waits on a killed VM's half-open
    connection)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _run(argv: list[str]) -> None:
    subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
