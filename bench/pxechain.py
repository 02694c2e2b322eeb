"""streamboot's PXE chain beside the reference chain (issue #6): QEMU (TCG) network-boots the
same demo vdisk from each, interleaved, and the time from QEMU's start to the demo's marker
and to its power-off is compared. Run as root:

    uv run python bench/pxechain.py [--runs 3] [--fast-dhcp] [--no-kernel-variant] [--json F]

Each chain has its own network namespace (bridge br0 at 10.77.0.1/24, taps; see
tests/e2e/pxe_lab.py) and the same VM (tests.e2e.pxe_lab.pxe_vm_argv: 256 MiB, virtio NIC
with Debian's ipxe-qemu ROM, `-boot n`):

- ``streamboot``: `streamboot up --boot-interface br0 --dhcp full` (DHCP, iPXE script,
  kernel-direct: the vdisk's kernel and initramfs over HTTP, the nonce redeemed, NBD root
  with a server-disk write cache), the demo vdisk made by `streamboot vdisk build-demo`, a
  new device per run (`device add --kernel-args`, `assign`).
- ``reference sanboot``: dnsmasq (DHCP; iPXE, recognised by option 175 or user class iPXE,
  gets a script URL), busybox httpd (Range requests) serving the script
  ``sanboot http://10.77.0.1:18082/demo.img``, the image and a static hand-off answer,
  nbdkit ``--filter=cow file demo.img`` as the NBD root.
- ``reference kernel``: the same servers, the script loads the image's own vmlinuz and
  initrd.img over HTTP (`kernel`/`initrd`, the image's kernel command line), NBD root.

The image is the one streamboot serves (its vdisk's v1.raw), with its syslinux.cfg's kernel
command line extended by ``streamboot.server=http://10.77.0.1:18082 streamboot.nonce=...``,
whose ``/session/redeem`` the reference's busybox httpd answers from a file (busybox ignores
the query string) with the lines the boot service would send. The reference's servers, its
IPv6 router advertisements and its DHCP (`--fast-dhcp` tunes it like streamboot's: no ping
check, no ProxyDHCP wait) are described in bench/reference_chain.py.

Times are read from the serial console, which the bench reads every 50 ms and stamps itself
(the console has no timestamps): each phase is the first appearance of its text.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import cpu_seconds  # noqa: E402
from bench.reference_chain import (  # noqa: E402
    BASE_URL,
    NBD_PORT,
    REF_NONCE,
    ReferenceChain,
    reference_tools_missing,
)
from streamboot.demo.image import MARKER, PARTITION_START, SECTOR  # noqa: E402
from tests.conftest import traversable_tmpdir  # noqa: E402
from tests.e2e.pxe_lab import (  # noqa: E402
    SERVER_IP,
    BootLab,
    pxe_tools_missing,
    pxe_vm_argv,
    watch_vm,
)

BOOT_TIMEOUT_S = 300.0
POLL_S = 0.05
WRITE_CACHE = "server-disk"  # `vdisk build-demo`'s default: the client writes to its export

# Phases: the first appearance of each text on the serial console. SeaBIOS's serial console
# clears the screen (ESC c ...) when a video mode is set: the kernel's real-mode setup code
# does that first thing, so that clear right after the last line of the loader (syslinux's
# banner, iPXE's initrd download) is "the kernel starts" (it prints nothing else: `quiet`).
CLEAR = "\r\n\x1bc\x1b[?7l\x1b[2J"
PHASES: tuple[tuple[str, str], ...] = (
    ("iPXE", "iPXE initialising devices"),  # the NIC's option ROM runs
    ("DHCP", "Filename: http://"),  # iPXE configured: it has its script's URL
    ("script", ""),  # per chain, below
    ("sanboot", "Booting from SAN device"),
    ("SYSLINUX", "SYSLINUX 6"),
    ("kernel", ""),  # per chain, below
    ("hand-off", "streamboot-client: network"),  # the initramfs asks for its export
    ("NBD", "streamboot-client: attached nbd://"),
    ("marker", MARKER),
)
# Each chain's VMs get MACs of their own (the run number is the last byte): dnsmasq picks
# the reference's script by MAC.
MAC_PREFIX = {
    "streamboot": "52:54:00:77:01",
    "reference sanboot": "52:54:00:77:02",
    "reference kernel": "52:54:00:77:03",
}
PER_CHAIN = {
    # The script that boots (streamboot: the second one, for this MAC) has run its first
    # line; the kernel's setup code runs.
    "streamboot": {"script": "streamboot: booting demo", "kernel": "/initrd... ok" + CLEAR},
    "reference sanboot": {"script": "sanboot.ipxe : ", "kernel": "Anvin et al" + CLEAR},
    "reference kernel": {"script": "kernel.ipxe : ", "kernel": "initrd.img... ok" + CLEAR},
}


def phases_for(chain: str) -> list[tuple[str, str]]:
    return [(name, PER_CHAIN[chain].get(name, text)) for name, text in PHASES]


def run(argv: list[str], timeout: float = 60) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True).stdout


def prepare_demo(reference: ReferenceChain, golden: Path) -> None:
    """The demo image in the reference's www/ (for sanboot over HTTP and nbdkit), its own
    kernel, initramfs and command line beside it for the kernel/initrd chain, both chains'
    scripts, and the redeem answer. The command line gets the reference's redeem URL and
    nonce (for both chains: the sanboot one through the image's syslinux.cfg)."""
    shutil.copyfile(golden, reference.image)
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    target = f"{reference.image}@@{PARTITION_START * SECTOR}"
    www = reference.www

    def mcopy(*argv: str) -> None:
        subprocess.run(["mcopy", "-n", "-i", target, *argv], check=True,
                       capture_output=True, env=env)  # fmt: skip

    cfg = reference.root / "syslinux.cfg"
    mcopy("::/syslinux.cfg", str(cfg))
    words = {line.split()[0]: line.split(None, 1)[1].strip()
             for line in cfg.read_text().splitlines() if len(line.split()) > 1}  # fmt: skip
    for key, name in (("KERNEL", "vmlinuz"), ("INITRD", "initrd.img")):
        mcopy(f"::/{words[key]}", str(www / name))
    append = f"{words['APPEND']} streamboot.server={BASE_URL} streamboot.nonce={REF_NONCE}"
    cfg.write_text(cfg.read_text().replace(words["APPEND"], append))
    mcopy("-o", str(cfg), "::/syslinux.cfg")
    (www / "sanboot.ipxe").write_text(f"#!ipxe\nsanboot {BASE_URL}/demo.img\n")
    (www / "kernel.ipxe").write_text(
        f"#!ipxe\nkernel {BASE_URL}/vmlinuz {append}\ninitrd {BASE_URL}/initrd.img\nboot\n"
    )
    # What the boot service's /session/redeem answers (clients/linux/handoff.sh reads it).
    reference.write_redeem_answer("/", {
        "nbd_host": SERVER_IP, "nbd_port": str(NBD_PORT), "export": "demo",
        "write_cache": WRITE_CACHE,
    })  # fmt: skip


@dataclass
class Result:
    chain: str
    run: int
    mac: str
    seen: dict[str, float]
    marker_s: float | None
    poweroff_s: float | None
    vm_cpu_s: float  # QEMU's CPU time (user + system)
    server_cpu_s: float  # the chain's servers' CPU time while the VM ran
    # At each phase: (QEMU's CPU s, the servers' CPU s) since the VM started.
    cpu_at: dict[str, tuple[float, float]] = field(default_factory=dict)
    image_gets: int | None = None  # reference: HTTP requests for the image (sanboot)


def session_closed(lab: BootLab, mac: str, timeout_s: float = 60) -> None:
    """Wait until this MAC's session is closed (the hand-off's NBD disconnect, then the
    firmware's HTTP connection found dead by keepalive), so the next VM boots on a quiet
    system. If the event log cannot be read, wait what that takes with the lab's timers."""
    deadline = time.monotonic() + timeout_s
    try:
        opened = lab.wait_for_event("SessionOpened", mac=mac, timeout_s=10)
        ids = {e["data"]["session_id"] for e in opened}
        while ids and time.monotonic() < deadline:
            closed = {e["data"]["session_id"] for e in lab.events("--type", "SessionClosed")}
            if ids <= closed:
                return
            time.sleep(1)
    except AssertionError as exc:  # `streamboot events list` failed
        print(f"  (event log not readable, waiting 15 s instead: {str(exc)[-200:]!r})")
        time.sleep(15)
        return
    print(f"  (session of {mac} not closed after {timeout_s:.0f} s; going on)", flush=True)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def boot(
    chain: str, run_no: int, mac: str, exec_: list[str], console: Path, servers: list[int]
) -> Result:
    phases = phases_for(chain)
    server_cpu, vm_cpu = cpu_seconds(servers), children_cpu()
    cpu_at: dict[str, tuple[float, float]] = {}

    def on_seen(text: str, vm_pid: int) -> None:
        try:
            t = psutil.Process(vm_pid).cpu_times()
        except psutil.NoSuchProcess:
            return
        cpu_at[text] = (t.user + t.system, cpu_seconds(servers) - server_cpu)

    vm = watch_vm(
        [*exec_, *pxe_vm_argv(mac, tap=0)],
        console,
        until=None,  # wait for the demo to power off
        timeout_s=BOOT_TIMEOUT_S,
        watch=tuple(text for _, text in phases),
        poll_s=POLL_S,
        on_seen=on_seen,
    )
    server_cpu, vm_cpu = cpu_seconds(servers) - server_cpu, children_cpu() - vm_cpu
    seen = {name: vm.seen[text] for name, text in phases if text in vm.seen}
    if "marker" not in seen:
        raise SystemExit(
            f"{chain} run {run_no}: no marker; console {console}:\n{vm.console[-3000:]}"
        )
    return Result(
        chain, run_no, mac, seen, seen.get("marker"), vm.exited_s, vm_cpu, server_cpu,
        cpu_at={name: cpu_at[text] for name, text in phases if text in cpu_at},
    )  # fmt: skip


def stats(values: list[float]) -> tuple[float, float]:
    return min(values), statistics.median(values)


def report(results: list[Result], chains: list[str], runs: int, note: str = "") -> str:
    out = [f"QEMU TCG PXE boot of the demo vdisk, {runs} interleaved runs per chain{note}", ""]
    out.append(
        "| chain | to marker best / median s | to power-off best / median s | runs (marker) |"
    )
    out.append("|---|---|---|---|")
    for chain in chains:
        mine = [r for r in results if r.chain == chain]
        marker = [r.marker_s for r in mine if r.marker_s is not None]
        off = [r.poweroff_s for r in mine if r.poweroff_s is not None]
        m_best, m_med = stats(marker)
        o = "{:.1f} / {:.1f}".format(*stats(off)) if off else "-"
        each = " ".join(f"{v:.1f}" for v in marker)
        out.append(f"| {chain} | {m_best:.1f} / {m_med:.1f} | {o} | {each} |")
    out.append("")
    base = [r for r in results if r.chain == "streamboot"]
    for ref in chains[1:]:
        theirs = [r for r in results if r.chain == ref]
        for what, get in (
            ("marker", lambda r: r.marker_s),
            ("power-off", lambda r: r.poweroff_s),
        ):
            a = [get(r) for r in base if get(r) is not None]
            b = [get(r) for r in theirs if get(r) is not None]
            if a and b:
                out.append(
                    f"streamboot / {ref}, to {what}: best {min(a) / min(b):.2f}x, "
                    f"median {statistics.median(a) / statistics.median(b):.2f}x"
                )
    out.append("")
    out.append("Phases (median s from QEMU start to the first appearance on the console), CPU:")
    out.append("")
    names = [name for name, _ in PHASES] + ["power-off", "VM CPU s", "servers' CPU s"]
    extra = {"power-off": "poweroff_s", "VM CPU s": "vm_cpu_s", "servers' CPU s": "server_cpu_s"}
    out.append("| phase | " + " | ".join(chains) + " |")
    out.append("|---|" + "---|" * len(chains))
    for name in names:
        cells = []
        for chain in chains:
            values = [
                getattr(r, extra[name]) if name in extra else r.seen.get(name)
                for r in results
                if r.chain == chain
            ]
            values = [v for v in values if v is not None]
            cells.append(f"{statistics.median(values):.2f}" if values else "-")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append("")
    out.append(
        "Between phases (median of the runs' differences: wall s / QEMU CPU s / servers' CPU s):"
    )
    out.append("")
    steps: list[str] = []
    cells_of: dict[tuple[str, str], str] = {}
    for chain in chains:
        mine = [r for r in results if r.chain == chain]
        order = ["start"] + [n for n, _ in PHASES if all(n in r.cpu_at for r in mine)]

        def at(r: Result, name: str) -> tuple[float, float, float]:
            return (0.0, 0.0, 0.0) if name == "start" else (r.seen[name], *r.cpu_at[name])

        for a, b in itertools.pairwise(order):
            step = f"{a} -> {b}"
            if step not in steps:
                steps.append(step)
            wall, vm, srv = (
                statistics.median(at(r, b)[i] - at(r, a)[i] for r in mine) for i in range(3)
            )
            cells_of[chain, step] = f"{wall:.2f} / {vm:.2f} / {srv:.2f}"
    rank = {name: i for i, name in enumerate(["start"] + [n for n, _ in PHASES])}
    steps.sort(key=lambda step: [rank[n] for n in step.split(" -> ")])
    out.append("| step | " + " | ".join(chains) + " |")
    out.append("|---|" + "---|" * len(chains))
    for step in steps:
        out.append(f"| {step} | " + " | ".join(cells_of.get((c, step), "-") for c in chains) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--no-kernel-variant",
        action="store_true",
        help="leave out the reference's kernel/initrd-over-HTTP chain",
    )
    parser.add_argument(
        "--fast-dhcp",
        action="store_true",
        help="reference: dnsmasq no-ping and ipxe.no-pxedhcp (no ping check, no ProxyDHCP wait)",
    )
    parser.add_argument("--json", type=Path, help="write every run's times here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (consoles, logs)")
    args = parser.parse_args()
    missing = pxe_tools_missing() + reference_tools_missing()
    if missing:
        raise SystemExit(f"needs {missing} (make bench-deps)")
    chains = ["streamboot", "reference sanboot"]
    if not args.no_kernel_variant:
        chains.append("reference kernel")

    work = traversable_tmpdir("streamboot-pxechain-")
    lab = BootLab(work / "streamboot", taps=1)
    lab.root.mkdir()
    lab.root.chmod(0o711)
    reference: ReferenceChain | None = None
    results: list[Result] = []
    try:
        lab.create()
        # Short timers only for what happens after the boot (so that a session is closed
        # before the next run starts); nothing on the boot path is changed.
        lab.start(
            STREAMBOOT_SESSION_DETACH_GRACE_S="3",
            STREAMBOOT_STREAM_KEEPALIVE_IDLE_S="5",
            STREAMBOOT_STREAM_KEEPALIVE_INTERVAL_S="2",
            STREAMBOOT_STREAM_KEEPALIVE_COUNT="2",
        )
        print("building the demo vdisk (streamboot vdisk build-demo demo)...", flush=True)
        lab.cli("vdisk", "build-demo", "demo")
        image = lab.data_dir / "vdisks" / "demo" / "v1.raw"
        ref_root = work / "reference"
        reference = ReferenceChain(
            ref_root, ref_root / "www" / "demo.img", default_script="sanboot.ipxe",
            scripts={MAC_PREFIX["reference kernel"]: "kernel.ipxe"}, fast_dhcp=args.fast_dhcp,
        )  # fmt: skip
        reference.create()
        prepare_demo(reference, image)
        reference.start()
        reference.serve_nbd()
        for run_no in range(1, args.runs + 1):
            for index, chain in enumerate(chains, start=1):
                mac = f"{MAC_PREFIX[chain]}:{run_no:02x}"
                console = work / f"console-{index}-{run_no}.log"
                if chain == "streamboot":
                    lab.cli("device", "add", mac, "--hostname", f"bench-{run_no:02d}",
                            "--kernel-args", "console=ttyS0 quiet panic=-1")  # fmt: skip
                    lab.cli("assign", mac, "demo", "--default")
                    exec_ = ["ip", "netns", "exec", lab.ns]
                    servers = [lab.up.pid] if lab.up else []
                else:
                    reference.serve_nbd()
                    exec_ = ["ip", "netns", "exec", reference.ns]
                    servers = reference.server_pids()
                    before = len(reference.requests())
                load = os.getloadavg()[0]
                result = boot(chain, run_no, mac, exec_, console, servers)
                if chain == "reference sanboot":
                    asked = reference.requests()[before:]
                    result.image_gets = sum(path.startswith("/demo.img") for path in asked)
                results.append(result)
                print(
                    f"run {run_no} {chain:<18} marker {result.marker_s:6.2f} s  power-off "
                    f"{result.poweroff_s or float('nan'):6.2f} s  (load {load:.2f}, CPU s: VM "
                    f"{result.vm_cpu_s:.1f}, servers {result.server_cpu_s:.1f})  "
                    + " ".join(f"{k}={v:.1f}" for k, v in result.seen.items())
                    + (f" image-GETs={result.image_gets}" if result.image_gets else ""),
                    flush=True,
                )
                if chain == "streamboot":
                    session_closed(lab, mac)
                time.sleep(2)
        print()
        note = (
            " (reference DHCP tuned: dnsmasq no-ping, ipxe.no-pxedhcp)"
            if args.fast_dhcp
            else " (reference DHCP: dnsmasq defaults)"
        )
        print(report(results, chains, args.runs, note))
        print(f"\nuptime: {run(['uptime']).strip()}")
        if args.json:
            args.json.write_text(json.dumps([r.__dict__ for r in results], indent=1))
    finally:
        if reference is not None:
            reference.stop()
        lab.stop()
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
