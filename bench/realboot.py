"""Real OS boot benchmark: the Debian that `streamboot vdisk build-debian` makes, booted under
QEMU TCG to its multi-user marker line, by 1 and by N clients at once, from streamboot
(PXE, kernel-direct), from the local file and from nbdkit, in one run.

- streamboot: `streamboot up` in a network namespace (tests/e2e/pxe_lab.py's BootLab), each
  VM PXE-boots (SeaBIOS, iPXE, the vdisk's kernel and initramfs over HTTP, the root over
  NBD from the guest's own nbd client), as tests/e2e/test_realos_boot.py boots it.
- local file: the same kernel and initramfs (the files the registry extracted at import)
  with ``-kernel/-initrd``, ``root=`` the image's root filesystem on a virtio disk that is
  the golden image with ``snapshot=on`` (each VM its own throw-away copy-on-write layer).
- nbdkit: the same as local, the virtio disk served by ``nbdkit --filter=cow file`` (one
  server per VM, the cow filter being its write layer) through QEMU's own NBD block driver.
  QEMU's driver rather than the guest's nbd initramfs keeps the kernel command line and
  everything in the guest identical to the local case, so the difference is the server.
- reference PXE: the PXE boot itself done by other servers (bench/reference_chain.py):
  dnsmasq's DHCP, busybox httpd serving the same kernel, initramfs, the iPXE script and
  kernel command line the boot service would write (services/boot/ipxe_scripts.py) and a
  fixed redeem answer, nbdkit (cow, one per VM) as the NBD root. Everything in the guest is
  what the streamboot case runs (iPXE, the client in the initramfs, the guest's nbd driver),
  so the difference between the two is the servers, and between it and the local file the
  network boot itself.

Every VM gets 1 GiB, a hostname and a machine id on its command line (streamboot's VMs get
theirs from the registry). The time is from QEMU's start to the marker on the serial
console. The PXE cases' time includes the NIC's iPXE ROM waiting its banner timeout
(``Press Ctrl-B for the iPXE command line``, 2 s) before it starts DHCP: firmware that no
server shortens (a real NIC's PXE ROM has its own prompt), so the table also gives that wait
and the ratio without it. The machine's speed drifts between runs more than the cases
differ inside one: the cases run interleaved, in an order rotated each run, and the report
gives each boot against the local file's of the same run, and the guest kernel's initramfs
unpack time (the same work in every case) as a probe of how fast the emulated CPU ran.
Needs root (network namespaces); the debootstrap comes from the test cache; the reference
case needs dnsmasq, nbdkit and busybox (`make bench-deps`).

    sudo uv run python bench/realboot.py [--clients 1,4] [--runs 1] [--cases local,streamboot,...]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import NamedTuple

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import cpu_seconds, wait_port  # noqa: E402
from bench.reference_chain import (  # noqa: E402
    BASE_URL,
    NBD_PORT,
    REF_NONCE,
    ReferenceChain,
    reference_tools_missing,
)
from services.boot.ipxe_scripts import KernelBoot, SessionInfo, kernel_script  # noqa: E402
from streamboot.debian_image import DEFAULT_MIRROR, MARKER, bootstrap, packages_for  # noqa: E402
from streamboot.embedded.proc import free_port  # noqa: E402
from tests.client.conftest import TEST_CACHE  # noqa: E402
from tests.conftest import traversable_tmpdir  # noqa: E402
from tests.e2e.pxe_lab import (  # noqa: E402
    SERVER_IP,
    STREAMBOOT,
    BootLab,
    pxe_tools_missing,
    pxe_vm_argv,
    watch_vm,
)
from tests.e2e.test_realos_boot import MEMORY, REALOS_TIMERS, VDISK, wait_closed  # noqa: E402

# no_timer_check: a TCG guest starved of CPU fails the kernel's early IO-APIC timer check
# and panics (seen with 4 guests at once on a loaded machine); every case gets it.
ARGS = "console=ttyS0 panic=-1 no_timer_check"
# The realos tests' short keepalive, so that a powered-off VM's session closes before the
# next round, with the product's detach grace: a guest whose nbd helper reconnects (an I/O
# timeout on a guest starved of CPU) finds its session still there, as it would in use.
TIMERS = {**REALOS_TIMERS, "STREAMBOOT_SESSION_DETACH_GRACE_S": "30"}
TIMEOUT_S = 900.0  # one boot under TCG on a loaded machine, with other VMs at once
POLL_S = 0.1  # how often the console is read: the resolution of every time below
# The NIC's iPXE ROM waits its compiled-in banner timeout after this prompt before it starts
# DHCP: firmware time no server answer shortens, shown apart (real NICs' ROMs have theirs).
ROM_PROMPT = "Press Ctrl-B for the iPXE command line"
ROM_DHCP = "Configuring (net0"
# A session's events that tell whether a hung guest lost it (docs/failover.md).
STORY = ("SessionOpened", "SessionAttached", "SessionDetached", "SessionClosed")
# The kernel's line when the client's nbd helper hands it a new socket: after an I/O
# timeout (streamboot-nbd -t) on a starved guest, or a dead node.
RECONNECTED = "reconnected socket"
# Where the time goes: the first appearance of each text on the serial console (the local
# cases print only the kernel's and systemd's).
PHASES = {
    "iPXE": "iPXE initialising devices",
    "ROM prompt": ROM_PROMPT,
    "DHCP": ROM_DHCP,
    "script": "streamboot: booting",
    "kernel fetch": "/vmlinuz...",
    "initrd fetch": "/initrd...",
    "kernel": "Linux version",
    "/init": "Run /init as init process",
    "attach": "streamboot: attaching",
    "root": "streamboot: root",
    "systemd": "Welcome to",
}


UNPACK = re.compile(
    r"\[\s*([0-9.]+)\] Trying to unpack rootfs image as initramfs.*?"
    r"\[\s*([0-9.]+)\] Freeing initrd memory",
    re.DOTALL,
)


def unpack_seconds(console: str) -> float:
    """Seconds the kernel took to unpack its initramfs, by its own timestamps (nan: not seen)."""
    found = UNPACK.search(console)
    return float(found[2]) - float(found[1]) if found else math.nan


def mac_of(client: int) -> str:
    return f"52:54:00:89:00:{client + 1:02x}"


def hostname_of(client: int) -> str:
    return f"bench-{client + 1:03d}"


def machine_id_of(client: int) -> str:
    return f"{client + 1:032x}"


def find_root(shown: object) -> str:
    """The ``root`` the registry found for the kernel-direct boot (``UUID=...``)."""
    if isinstance(shown, dict):
        if isinstance(shown.get("root"), str) and shown["root"].startswith("UUID="):
            return shown["root"]
        shown = list(shown.values())
    if isinstance(shown, list):
        for item in shown:
            found = find_root(item)
            if found:
                return found
    return ""


def direct_argv(kernel: Path, initrd: Path, root: str, drive: str, client: int) -> list[str]:
    """QEMU (TCG) starting the kernel directly, its root on a virtio disk at ``drive``."""
    cmdline = (f"{ARGS} root={root} rw systemd.hostname={hostname_of(client)} "
               f"systemd.machine_id={machine_id_of(client)}")  # fmt: skip
    return [
        "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", str(MEMORY),
        "-nographic", "-no-reboot", "-serial", "stdio", "-monitor", "none", "-nic", "none",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        "-drive", f"{drive},format=raw,if=virtio,cache=writeback",
    ]  # fmt: skip


class Nbdkit(NamedTuple):
    drive: str  # QEMU's -drive for it
    pid: int


@contextmanager
def nbdkit(image: Path) -> Iterator[Nbdkit]:
    port = free_port()
    argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "--filter=cow", "file", str(image)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield Nbdkit(f"file=nbd://127.0.0.1:{port}", proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


def reference_chain(root: Path, image: Path, kernel: Path, initrd: Path, boot_root: str,
                    clients: int) -> ReferenceChain:  # fmt: skip
    """The reference PXE chain for ``clients`` VMs, created and started (not yet its NBD
    servers): each VM's iPXE chains from the common script to its own, the boot service's
    kernel-direct script for that client, whose command line points the initramfs at the
    client's own redeem answer (``/cN/session/redeem``: its own nbdkit's port)."""
    # DHCP tuned like streamboot's (no ping check, no ProxyDHCP wait): the servers differ.
    chain = ReferenceChain(root, image, default_script="boot.ipxe", taps=clients, fast_dhcp=True)
    chain.create()
    www = chain.www
    shutil.copyfile(kernel, www / "vmlinuz")
    shutil.copyfile(initrd, www / "initrd")
    (www / "boot.ipxe").write_text(f"#!ipxe\nchain {BASE_URL}/boot-${{mac:hexhyp}}.ipxe\n")
    for client in range(clients):
        server = f"{BASE_URL}/c{client}"
        boot = KernelBoot(
            files_url=BASE_URL, server=server, nonce=REF_NONCE, root=boot_root,
            write_cache="server-disk", hostname=hostname_of(client),
            machine_id=machine_id_of(client), extra_args=ARGS,
        )  # fmt: skip
        session = SessionInfo(VDISK, 1, server, hostname_of(client))
        script = kernel_script(session, boot, retry_url=f"{BASE_URL}/boot.ipxe?")
        (www / f"boot-{mac_of(client).replace(':', '-')}.ipxe").write_text(script)
        chain.write_redeem_answer(f"c{client}", {
            "nbd_host": SERVER_IP, "nbd_port": str(NBD_PORT + client), "export": VDISK,
            "write_cache": "server-disk", "persistence": "discard",
            "hostname": hostname_of(client), "machine_id": machine_id_of(client),
            "mac": mac_of(client),
        })  # fmt: skip
        (www / f"c{client}" / "booted").write_text("ok\n")  # the OS's ClientBooted report
    chain.start()
    return chain


class Boot(NamedTuple):
    marker_s: float  # from QEMU's start
    rom_wait_s: float  # the NIC ROM's prompt wait (0 without a ROM)
    vm_cpu_s: float  # QEMU's CPU time (user + system) at the marker
    reconnects: int  # the guest's nbd socket replaced (an I/O timeout on a live node)
    # The guest kernel's unpacking of the initramfs (its own clock): the same work in every
    # case, so it shows how fast this boot's emulated CPU ran, apart from what it did.
    unpack_s: float = math.nan
    server_cpu_s: float = 0.0  # the case's servers' CPU time during the boot, per client


class Bench:
    def __init__(self, lab: BootLab, reference: Path | None) -> None:
        self.lab = lab
        files = lab.data_dir / "vdisks" / VDISK / "boot" / "v1"
        self.kernel, self.initrd = files / "vmlinuz", files / "initrd"
        self.image = lab.data_dir / "vdisks" / VDISK / "v1.raw"
        self.root = find_root(json.loads(lab.cli("vdisk", "show", VDISK, "--json").stdout))
        self.phases: dict[tuple[str, str], list[float]] = {}  # (case, phase) -> seconds
        if not (self.kernel.exists() and self.initrd.exists() and self.root):
            raise SystemExit(f"no boot files in {files} or no root UUID for {VDISK}")
        self.reference_root = reference  # where the reference chain runs, if it is a case
        self.chain: ReferenceChain | None = None

    def start_reference(self, clients: int) -> None:
        assert self.reference_root is not None
        self.chain = reference_chain(self.reference_root, self.image, self.kernel,
                                     self.initrd, self.root, clients)  # fmt: skip

    def stop_reference(self) -> None:
        if self.chain is not None:
            self.chain.stop()

    def at_once(self, clients: int, one: Callable[[int], Boot]) -> list[Boot]:
        """Boot ``clients`` VMs at once; each one's seconds to the marker and ROM wait."""
        with ThreadPoolExecutor(clients) as pool:
            return list(pool.map(one, range(clients)))  # re-raises a VM's failure

    def watched(self, argv: list[str], name: str) -> Boot:
        console = self.lab.root / f"{name}.log"
        if console.exists():  # an earlier run's: kept beside it (--keep copies them all)
            earlier = len(list(self.lab.root.glob(f"{name}.*.log"))) + 1
            console.rename(console.with_suffix(f".{earlier}.log"))
        vm_cpu = math.nan  # no marker: no figure

        def on_seen(text: str, vm_pid: int) -> None:
            nonlocal vm_cpu
            if text == MARKER:
                with suppress(psutil.NoSuchProcess):
                    t = psutil.Process(vm_pid).cpu_times()
                    vm_cpu = t.user + t.system

        run = watch_vm(
            argv,
            console,
            until=MARKER,
            timeout_s=TIMEOUT_S,
            watch=tuple(PHASES.values()),
            poll_s=POLL_S,
            on_seen=on_seen,
        )
        if MARKER not in run.seen:
            # Reported and counted as a failed boot (nan) so the other cases still run.
            print(f"{name}: no marker within {TIMEOUT_S:.0f} s:\n{run.console[-2000:]}", flush=True)
        case = name.rsplit("-", 1)[0]
        for phase, text in PHASES.items():
            if text in run.seen:
                self.phases.setdefault((case, phase), []).append(run.seen[text])
        rom = run.seen[ROM_DHCP] - run.seen[ROM_PROMPT] if ROM_PROMPT in run.seen else 0.0
        marker = run.seen.get(MARKER, math.nan)
        return Boot(
            marker, rom, vm_cpu, run.console.count(RECONNECTED), unpack_seconds(run.console)
        )

    def with_server_cpu(self, boots: list[Boot], pids: list[int], before: float) -> list[Boot]:
        """``boots`` with the servers' CPU time since ``before`` shared out among them."""
        share = (cpu_seconds(pids) - before) / len(boots)
        return [b._replace(server_cpu_s=share) for b in boots]

    def streamboot(self, clients: int) -> list[Boot]:
        def one(client: int) -> Boot:
            argv = self.lab.exec(*pxe_vm_argv(mac_of(client), client, memory_mib=MEMORY))
            return self.watched(argv, f"streamboot-{client}")

        assert self.lab.up is not None
        servers = [self.lab.up.pid]  # `streamboot up`: every service, NATS, PostgreSQL
        before = cpu_seconds(servers)
        times = self.with_server_cpu(self.at_once(clients, one), servers, before)
        for client, boot in enumerate(times):
            if math.isnan(boot.marker_s):
                self.say_story(mac_of(client))
        for client in range(clients):
            wait_closed(self.lab, mac_of(client))  # the next round gets fresh sessions
        return times

    def say_story(self, mac: str) -> None:
        """A hung guest's session as the log has it: when its connections came and went and
        whether (and why) the registry closed it, beside its console's helper lines."""
        for e in self.lab.events("--mac", mac, "--limit", "100000"):
            if e["type"] in STORY:
                d = e["data"]
                print(f"  {mac} {e['time']} {e['type']} {d.get('client_addr', '')} "
                      f"{d.get('reason', '')}", flush=True)  # fmt: skip

    def local(self, clients: int) -> list[Boot]:
        def one(client: int) -> Boot:
            drive = f"file={self.image},snapshot=on"
            argv = direct_argv(self.kernel, self.initrd, self.root, drive, client)
            return self.watched(argv, f"local-{client}")

        return self.at_once(clients, one)

    def nbdkit(self, clients: int) -> list[Boot]:
        with ExitStack() as stack:
            servers = [stack.enter_context(nbdkit(self.image)) for _ in range(clients)]

            def one(client: int) -> Boot:
                drive = servers[client].drive
                argv = direct_argv(self.kernel, self.initrd, self.root, drive, client)
                return self.watched(argv, f"nbdkit-{client}")

            pids = [server.pid for server in servers]
            before = cpu_seconds(pids)
            return self.with_server_cpu(self.at_once(clients, one), pids, before)

    def reference(self, clients: int) -> list[Boot]:
        chain = self.chain
        assert chain is not None
        for client in range(clients):
            chain.serve_nbd(NBD_PORT + client)  # a fresh write layer for each boot

        def one(client: int) -> Boot:
            argv = chain.exec(*pxe_vm_argv(mac_of(client), client, memory_mib=MEMORY))
            return self.watched(argv, f"reference-{client}")

        pids = chain.server_pids()
        before = cpu_seconds(pids)
        return self.with_server_cpu(self.at_once(clients, one), pids, before)


# The cases by their --cases name.
CASES = {
    "local": "local file",
    "streamboot": "streamboot (PXE)",
    "nbdkit": "nbdkit (cow)",
    "reference": "reference PXE",
}


def versus(value: float, base: float | None) -> str:
    """``value`` against the local case's, or a dash when that case was left out."""
    return "-" if base is None else f"{value / base:.2f}x"


def keep(lab: BootLab, where: Path) -> None:
    """Copy what a hang is diagnosed from: every console, the `up` log, the whole event log."""
    where.mkdir(parents=True, exist_ok=True)
    for log in lab.root.glob("*.log"):
        shutil.copy(log, where / log.name)
    try:
        events = lab.cli("events", "list", "--json", "--limit", "100000").stdout
    except AssertionError as error:  # the log is still worth having without the events
        events = f"events list failed: {error}\n"
    (where / "events.jsonl").write_text(events)
    print(f"logs kept in {where}", flush=True)


Times = dict[tuple[str, int], list[Boot]]  # (case, clients) -> every run's boots


def rows(
    times: Times, counts: list[int], cases: list[str]
) -> Iterator[tuple[int, str, list[Boot], list[Boot] | None]]:
    """Each table's rows: (clients, case, its boots, the local file's boots or None)."""
    for clients in counts:
        local = times.get(("local file", clients))
        for name in cases:
            yield clients, name, times[(name, clients)], local


def report(times: Times, counts: list[int], cases: list[str], runs: int,
           phases: dict[tuple[str, str], list[float]], cases_seen: list[str]) -> None:  # fmt: skip
    print(f"\nQEMU TCG boot of the real Debian to its marker, {runs} run(s) each\n")
    print("The ROM's wait: the NIC's iPXE ROM's banner timeout before DHCP (firmware, not a")
    print("server's answer); 'without it' takes it off each boot's time.\n")
    print(f"| {'case':<18} | clients | mean s | vs local | ROM's wait s | without it | vs local |")
    print(f"|{'-' * 20}|---------|--------|----------|--------------|------------|----------|")
    for clients, name, boots, local in rows(times, counts, cases):
        base = statistics.mean(b.marker_s for b in local) if local else None
        mean = statistics.mean(b.marker_s for b in boots)
        rom = statistics.mean(b.rom_wait_s for b in boots)
        print(f"| {name:<18} | {clients:>7} | {mean:6.1f} | {versus(mean, base):>8} | "
              f"{rom:12.1f} | {mean - rom:10.1f} | {versus(mean - rom, base):>8} |")  # fmt: skip
    print("\nEach run's boots against the local file's in the same run (the machine's speed drifts")
    print("between runs more than between the cases of one run): the median of those ratios\n")
    print(f"| {'case':<18} | clients | median vs local, same run | per run |")
    print(f"|{'-' * 20}|---------|---------------------------|---------|")
    for clients, name, boots, local in rows(times, counts, cases):
        if local is None or name == "local file":
            continue
        ratios = [b.marker_s / a.marker_s for a, b in zip(local, boots, strict=True)]
        listed = " ".join(f"{r:.2f}" for r in ratios)
        print(f"| {name:<18} | {clients:>7} | {statistics.median(ratios):24.2f}x | {listed} |")
    print("\nCPU seconds per boot to the marker: the guest's QEMU, and the case's servers (all of")
    print("`streamboot up`, or the case's nbdkit, dnsmasq and httpd) while the round ran, shared")
    print("among its clients; unpack s: the guest kernel's unpacking of the initramfs, the same")
    print("work in every case (how fast the emulated CPU ran)\n")
    print(
        f"| {'case':<18} | clients | VM CPU s | vs local | server CPU s | nbd reconnects | unpack s |"
    )
    print(
        f"|{'-' * 20}|---------|----------|----------|--------------|----------------|----------|"
    )
    for clients, name, boots, local in rows(times, counts, cases):
        base = statistics.mean(b.vm_cpu_s for b in local) if local else None
        vm = statistics.mean(b.vm_cpu_s for b in boots)
        server = statistics.mean(b.server_cpu_s for b in boots)
        again = sum(b.reconnects for b in boots)
        unpack = statistics.mean(b.unpack_s for b in boots)
        print(f"| {name:<18} | {clients:>7} | {vm:8.1f} | {versus(vm, base):>8} | {server:12.1f} | "
              f"{again:14} | {unpack:8.2f} |")  # fmt: skip
    print("\nMean seconds from QEMU's start to each console text, all runs and client counts\n")
    print("| text | " + " | ".join(cases_seen) + " |")
    print("|---|" + "---|" * len(cases_seen))
    for phase, text in PHASES.items():
        got = [phases.get((c, phase)) for c in cases_seen]
        cells = [f"{statistics.mean(g):.1f}" if g else "-" for g in got]
        print(f"| {phase} (`{text}`) | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4", help="comma-separated client counts")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases to run")
    parser.add_argument(
        "--keep", type=Path, help="copy the consoles, the up log and the event log here"
    )
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    wanted = args.cases.split(",")
    if unknown := set(wanted) - set(CASES):
        raise SystemExit(f"unknown case(s) {sorted(unknown)}: choose from {list(CASES)}")
    missing = pxe_tools_missing() + (reference_tools_missing() if "reference" in wanted else [])
    if missing:
        raise SystemExit(f"needs {missing} (make bench-deps)")
    # A SIGTERM (kill, a backgrounded run that ignores SIGINT) ends the run through the
    # cleanup below: VMs, `up`, the namespace, and the kept logs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = traversable_tmpdir("streamboot-realboot-")
    lab = BootLab(root, taps=max(counts))
    lab.create()
    bench: Bench | None = None
    try:
        lab.start(**TIMERS)
        bootstrap(TEST_CACHE, "bookworm", DEFAULT_MIRROR, packages_for(()), say=print)
        subprocess.run(
            lab.exec(str(STREAMBOOT), "vdisk", "build-debian", VDISK, "--size", "2G",
                     "--cache-dir", str(TEST_CACHE), "--data-dir", str(lab.data_dir)),
            check=True, timeout=3600,
        )  # fmt: skip
        for client in range(max(counts)):
            lab.cli("device", "add", mac_of(client), "--hostname", hostname_of(client),
                    "--kernel-args", ARGS)  # fmt: skip
            lab.cli("assign", mac_of(client), VDISK, "--default")
        bench = Bench(lab, root / "reference" if "reference" in wanted else None)
        if "reference" in wanted:
            bench.start_reference(max(counts))
        every: dict[str, Callable[[int], list[Boot]]] = {
            "local file": bench.local,
            "streamboot (PXE)": bench.streamboot,
            "nbdkit (cow)": bench.nbdkit,
            "reference PXE": bench.reference,
        }
        cases = {name: every[name] for key, name in CASES.items() if key in wanted}
        times: Times = {}
        # Interleaved, so that the machine's noise spreads over all the cases, and each run
        # starts with the next case: no case is always the first one after a pause.
        order = list(cases.items())
        for run in range(args.runs):
            turn = run % len(order)
            for clients in counts:
                for name, case in order[turn:] + order[:turn]:
                    got = case(clients)
                    marks = [round(b.marker_s, 1) for b in got]
                    cpu = [round(b.vm_cpu_s, 1) for b in got]
                    unpack = [round(b.unpack_s, 2) for b in got]
                    print(f"run {run + 1}, {clients} client(s), {name}: {marks} s, VM CPU {cpu} s, "
                          f"server CPU {got[0].server_cpu_s:.1f} s each, "
                          f"reconnects {[b.reconnects for b in got]}, unpack {unpack} s", flush=True)  # fmt: skip
                    times.setdefault((name, clients), []).extend(got)
    finally:
        if args.keep is not None:
            keep(lab, args.keep)
        if bench is not None:
            bench.stop_reference()
        lab.stop()
        shutil.rmtree(root, ignore_errors=True)
    report(times, counts, list(cases), args.runs, bench.phases if bench else {},
           [key for key in CASES if key in wanted])  # fmt: skip


if __name__ == "__main__":
    main()
