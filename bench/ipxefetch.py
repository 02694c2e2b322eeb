"""How fast iPXE (QEMU's NIC option ROM, under TCG) pulls a kernel and an initramfs over HTTP
from streamboot's boot HTTP server beside trivial peers, in the same VM boot.

One network namespace (tests/e2e/pxe_lab.py's bridge and taps), dnsmasq for DHCP, and the
servers, each on its own port serving the same two files:

- ``streamboot``: services/boot/http_server.py's HttpServer with file_response (what
  ``/boot-files/...`` answers), on uvloop as the boot service runs;
- ``busybox``: ``busybox httpd``;
- ``python``: ``python -m http.server``.

The VM's iPXE script fetches both files from every server in turn, ``--rounds`` times, and
echoes a line before and after each server's pair: the seconds between them (read from the
serial console every 20 ms) are that server's time. The interleaving puts the machine's
load on every server alike. Also printed: the ROM's wait from its ``Press Ctrl-B`` prompt to
DHCP. Run as root:

    uv run python bench/ipxefetch.py --kernel VMLINUZ --initrd INITRD [--rounds 3]
        [--nics virtio-net-pci,e1000]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import traversable_tmpdir  # noqa: E402
from tests.e2e.pxe_lab import (  # noqa: E402
    POOL,
    SERVER_IP,
    create_bridge_namespace,
    delete_namespace,
    pxe_tools_missing,
    watch_vm,
)

SERVERS = {"streamboot": 18090, "busybox": 18091, "python": 18092}
SCRIPT_PORT = 18093  # busybox, serving the script
DONE = "FETCH ALL DONE"
PROMPT, DHCP = "Press Ctrl-B for the iPXE command line", "Configuring (net0"
# streamboot's boot HTTP server alone, its handler answering every path from one directory
# as /boot-files/... does.
STREAMBOOT_SERVER = """
import sys, uvloop, asyncio
from pathlib import Path
from services.boot.http_server import HttpServer, file_response
root = Path(sys.argv[1])
async def handler(request):
    return file_response(str(root / Path(request.path).name), request)
async def main():
    await HttpServer(handler, sys.argv[2], int(sys.argv[3])).start()
    await asyncio.Event().wait()
uvloop.run(main())
"""


def script(rounds: int) -> str:
    lines = ["#!ipxe"]
    for r in range(rounds):
        for name, port in SERVERS.items():
            base = f"http://{SERVER_IP}:{port}"
            lines += [
                f"echo FETCH {name} {r} start",
                f"imgfetch {base}/vmlinuz || goto failed",
                f"imgfetch {base}/initrd || goto failed",
                f"echo FETCH {name} {r} end",
                "imgfree",
            ]
    return "\n".join([*lines, f"echo {DONE}", "sleep 600", ":failed", "echo FETCH FAILED", ""])


@contextmanager
def lab(root: Path, kernel: Path, initrd: Path, rounds: int) -> Iterator[str]:
    ns = f"sbfetch-{root.name[-6:]}"
    create_bridge_namespace(ns, taps=1)
    www = root / "www"
    www.mkdir()
    shutil.copyfile(kernel, www / "vmlinuz")
    shutil.copyfile(initrd, www / "initrd")
    (www / "s.ipxe").write_text(script(rounds))
    conf = root / "dnsmasq.conf"
    conf.write_text(
        "\n".join([
            "port=0", "interface=br0", "bind-interfaces", "no-resolv", "no-hosts", "no-ping",
            f"dhcp-range={POOL[0]},{POOL[1]},255.255.255.0,1h",
            f"dhcp-leasefile={root / 'leases'}", "dhcp-authoritative",
            "dhcp-option=encap:175,176,1",  # ipxe.no-pxedhcp: no wait for ProxyDHCP
            f"dhcp-boot=http://{SERVER_IP}:{SCRIPT_PORT}/s.ipxe",
        ]) + "\n"
    )  # fmt: skip
    n = ["ip", "netns", "exec", ns]
    servers = {
        "dnsmasq": ["dnsmasq", "--keep-in-foreground", f"--conf-file={conf}"],
        "script": ["busybox", "httpd", "-f", "-p", f"{SERVER_IP}:{SCRIPT_PORT}", "-h", str(www)],
        "busybox": ["busybox", "httpd", "-f", "-p", f"{SERVER_IP}:{SERVERS['busybox']}",
                    "-h", str(www)],
        "python": [sys.executable, "-m", "http.server", "-b", SERVER_IP, "-d", str(www),
                   str(SERVERS["python"])],
        "streamboot": [sys.executable, "-c", STREAMBOOT_SERVER, str(www), SERVER_IP,
                       str(SERVERS["streamboot"])],
    }  # fmt: skip
    with ExitStack() as stack:
        stack.callback(delete_namespace, ns)
        for name, argv in servers.items():
            log = open(root / f"{name}.log", "wb")
            proc = subprocess.Popen([*n, *argv], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            stack.callback(proc.wait, 10)
            stack.callback(proc.terminate)
        for port in [SCRIPT_PORT, *SERVERS.values()]:
            code = f"from bench.common import wait_port; wait_port({port}, host={SERVER_IP!r})"
            subprocess.run([*n, sys.executable, "-c", code], cwd=ROOT, check=True, timeout=30)
        yield ns


def vm_argv(ns: str, nic: str) -> list[str]:
    return [
        "ip", "netns", "exec", ns,
        "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "512", "-nographic",
        "-no-reboot", "-serial", "stdio", "-monitor", "none", "-boot", "n",
        "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
        "-device", f"{nic},netdev=n0,mac=52:54:00:90:00:01",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", type=Path, required=True)
    parser.add_argument("--initrd", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nics", default="virtio-net-pci", help="QEMU NIC models, comma-separated")
    args = parser.parse_args()
    if missing := pxe_tools_missing():
        raise SystemExit(f"needs {missing}")
    size = args.kernel.stat().st_size + args.initrd.stat().st_size
    root = traversable_tmpdir("streamboot-ipxefetch-")
    rows = []
    try:
        with lab(root, args.kernel, args.initrd, args.rounds) as ns:
            for nic in args.nics.split(","):
                watch = [PROMPT, DHCP, "FETCH FAILED"] + [
                    f"FETCH {name} {r} {edge}"
                    for r in range(args.rounds) for name in SERVERS for edge in ("start", "end")
                ]  # fmt: skip
                run = watch_vm(vm_argv(ns, nic), root / f"{nic}.log", until=DONE,
                               timeout_s=900, watch=tuple(watch), poll_s=0.02)  # fmt: skip
                if DONE not in run.seen:
                    raise SystemExit(f"{nic}: no {DONE!r}:\n{run.console[-2000:]}")
                prompt = run.seen[DHCP] - run.seen[PROMPT]
                for name in SERVERS:
                    took = [run.seen[f"FETCH {name} {r} end"] - run.seen[f"FETCH {name} {r} start"]
                            for r in range(args.rounds)]  # fmt: skip
                    rows.append((nic, name, took, prompt))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\niPXE fetching {size / 2**20:.1f} MiB (kernel + initramfs), {args.rounds} round(s)\n")
    print("| NIC | server | mean s | MB/s | runs s | ROM prompt to DHCP s |")
    print("|---|---|---|---|---|---|")
    for nic, name, took, prompt in rows:
        mean = statistics.mean(took)
        runs = " ".join(f"{t:.2f}" for t in took)
        print(f"| {nic} | {name} | {mean:.2f} | {size / mean / 1e6:.1f} | {runs} | {prompt:.2f} |")


if __name__ == "__main__":
    main()
