"""A boot network in a box: a network namespace with a bridge, taps for VMs, and the whole
streamboot (`streamboot up --boot-interface br0 --dhcp full`) serving on it.

Everything runs inside the namespace (`ip netns exec`): the system, the CLI, and QEMU, whose
NIC is a tap on the bridge. Nothing listens outside it. The namespace, the VM's QEMU command
line and the console watcher are also used on their own by bench/pxechain.py, whose
reference chain (dnsmasq, busybox httpd, nbdkit) runs in the same kind of namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STREAMBOOT = Path(sys.executable).parent / "streamboot"
SERVER_IP = "10.77.0.1"
POOL = ("10.77.0.100", "10.77.0.150")
BOOT_TIMEOUT_S = 240.0
# Short timers so a test sees sessions end: a powered-off VM's half-open connection is
# found by keepalive after 5 + 2 * 2 s.
SHORT_SESSION_TIMERS = {
    "STREAMBOOT_SESSION_DETACH_GRACE_S": "3",
    "STREAMBOOT_STREAM_KEEPALIVE_IDLE_S": "5",
    "STREAMBOOT_STREAM_KEEPALIVE_INTERVAL_S": "2",
    "STREAMBOOT_STREAM_KEEPALIVE_COUNT": "2",
}


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)


def pxe_tools_missing() -> list[str]:
    tools = {
        "ip": "iproute2",
        "qemu-system-x86_64": "qemu-system-x86",
        "nbd-client": "nbd-client",
        "syslinux": "syslinux",
        "mcopy": "mtools",
        "mkfs.fat": "dosfstools",
    }
    missing = [pkg for tool, pkg in tools.items() if shutil.which(tool) is None]
    if not Path("/usr/lib/ipxe/qemu/efi-virtio.rom").exists():
        missing.append("ipxe-qemu")
    if os.geteuid() != 0:
        missing.append("root (network namespaces, ports 67/69)")
    return missing


def create_bridge_namespace(ns: str, taps: int, address: str = SERVER_IP) -> None:
    """A network namespace ``ns`` with a bridge br0 (``address``/24) and tap0..tapN-1 on it."""
    run("ip", "netns", "add", ns)
    n = ["ip", "-n", ns]
    run(*n, "link", "set", "lo", "up")
    run(*n, "link", "add", "br0", "type", "bridge")
    run(*n, "addr", "add", f"{address}/24", "dev", "br0")
    run(*n, "link", "set", "br0", "up")
    for i in range(taps):
        run(*n, "tuntap", "add", "dev", f"tap{i}", "mode", "tap")
        run(*n, "link", "set", f"tap{i}", "master", "br0")
        run(*n, "link", "set", f"tap{i}", "up")


def kill_namespace(ns: str) -> list[int]:
    """kill -9 everything running in namespace ``ns`` (only a lab's own processes can be
    there); the pids it signalled."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    killed = []
    for pid in pids.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
            killed.append(int(pid))
        except (ProcessLookupError, ValueError):
            pass
    return killed


def delete_namespace(ns: str) -> None:
    """Delete the namespace, first ending what still runs in it (e.g. a forked server child
    still holding a dead VM's connection)."""
    kill_namespace(ns)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@contextmanager
def bridge_host(lab_ns: str, address: str) -> Iterator[str]:
    """Another "host" on the lab's boot network: a namespace of its own, joined to the lab's
    br0 by a veth pair, with ``address``/24 on its end; yields its name. Deleted at the
    end, with whatever still runs in it."""
    tag = uuid.uuid4().hex[:6]
    ns, lab_end = f"sbhost-{tag}", f"vh{tag}"
    run("ip", "netns", "add", ns)
    try:
        run("ip", "-n", lab_ns, "link", "add", lab_end, "type", "veth",
            "peer", "name", "eth0", "netns", ns)  # fmt: skip
        run("ip", "-n", lab_ns, "link", "set", lab_end, "master", "br0")
        run("ip", "-n", lab_ns, "link", "set", lab_end, "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        yield ns
    finally:
        delete_namespace(ns)  # the veth pair goes with it


OVMF = Path("/usr/share/ovmf/OVMF.fd")


def pxe_vm_argv(
    mac: str,
    tap: int,
    *,
    memory_mib: int = 256,
    uefi: bool = False,
    drives: tuple[Path, ...] = (),
) -> list[str]:
    """QEMU (TCG) network-booting from a virtio NIC on tapN: SeaBIOS with the NIC's iPXE ROM
    (Debian's ipxe-qemu), or with ``uefi`` OVMF's own PXE without the ROM, which fetches
    ipxe.efi over TFTP as a UEFI fleet's firmware does. ``drives``: local virtio disks."""
    firmware = ["-bios", str(OVMF)] if uefi else ["-boot", "n"]
    rom = ",romfile=" if uefi else ""
    disks = [a for d in drives for a in ("-drive", f"file={d},format=raw,if=virtio")]
    return [
        "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", str(memory_mib),
        "-nographic", "-no-reboot", "-serial", "stdio", "-monitor", "none", *firmware,
        "-netdev", f"tap,id=n0,ifname=tap{tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=n0,mac={mac}{rom}", *disks,
    ]  # fmt: skip


@dataclass
class VmRun:
    console: str
    # Seconds from the VM's start to the first appearance of each watched text on the
    # console (absent: never seen), and to the VM's exit (None: killed).
    seen: dict[str, float]
    exited_s: float | None


def watch_vm(
    argv: list[str],
    console: Path,
    *,
    until: str | None,
    timeout_s: float,
    watch: tuple[str, ...] = (),
    poll_s: float = 0.5,
    on_seen: Callable[[str, int], None] | None = None,
) -> VmRun:
    """Run a VM whose serial console goes to ``console``, reading it incrementally every
    ``poll_s``; stop it once ``until`` appears (None: wait for it to power off) or after
    ``timeout_s``. Texts in ``watch`` (and ``until``) get the time they first appeared, and
    ``on_seen(text, vm_pid)`` is called then."""
    pending = [*watch, *([until] if until else [])]
    seen: dict[str, float] = {}
    text = ""
    exited_s = None
    with open(console, "wb") as out:
        start = time.monotonic()
        vm = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        with open(console, "rb") as f:
            while True:
                done = vm.poll() is not None
                now = time.monotonic() - start
                if done and exited_s is None:
                    exited_s = now
                chunk = f.read()
                if chunk:
                    # A text split across two reads is found in the joined text (the time is
                    # that of the read that completed it).
                    text += chunk.decode(errors="replace")
                    for want in [w for w in pending if w not in seen]:
                        if want in text:
                            seen[want] = now
                            if on_seen is not None:
                                on_seen(want, vm.pid)
                if done or (until and until in seen) or now > timeout_s:
                    break
                time.sleep(poll_s)
    finally:
        if vm.poll() is None:
            vm.kill()
        vm.wait(10)
    return VmRun(console.read_text(errors="replace"), seen, exited_s)


@dataclass
class BootLab:
    root: Path
    ns: str = field(default_factory=lambda: f"sbpxe-{uuid.uuid4().hex[:6]}")
    taps: int = 3
    up: subprocess.Popen[bytes] | None = None
    pool: tuple[str, str] = POOL  # the DHCP range (bench/pxestorm.py needs a wider one)

    @property
    def data_dir(self) -> Path:
        return self.root / "dd"

    def exec(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def create(self) -> None:
        create_bridge_namespace(self.ns, self.taps)

    def start(self, **env: str) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBOOT_")}
        full.update(env)
        self.log = self.root / "up.log"
        with open(self.log, "wb") as out:
            self.up = subprocess.Popen(
                self.exec(
                    str(STREAMBOOT),
                    "up",
                    "--data-dir",
                    str(self.data_dir),
                    "--boot-interface",
                    "br0",
                    "--dhcp",
                    "full",
                    "--dhcp-range",
                    ",".join(self.pool),
                ),
                env=full,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 120
        while not (self.data_dir / "runtime.json").exists():
            assert self.up.poll() is None, f"up exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"up did not start:\n{self.log.read_text()}"
            time.sleep(0.2)

    def cli(
        self, *args: str, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.exec(str(STREAMBOOT), *args, "--data-dir", str(self.data_dir)),
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check:
            assert done.returncode == 0, f"streamboot {args}:\n{done.stdout}\n{done.stderr}"
        return done

    def events(self, *args: str) -> list[dict[str, Any]]:
        out = self.cli("events", "list", "--json", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def boot_vm(
        self,
        mac: str,
        tap: int,
        until: str | None,
        timeout_s: float = BOOT_TIMEOUT_S,
        **vm: Any,
    ) -> str:
        """PXE-boot a VM with this MAC on tap N (``vm``: pxe_vm_argv's options); returns its
        serial console once ``until`` appears (None: once the VM powers itself off)."""
        console = self.root / f"vm-{mac.replace(':', '')}.log"
        argv = self.exec(*pxe_vm_argv(mac, tap, **vm))
        return watch_vm(argv, console, until=until, timeout_s=timeout_s).console

    def wait_for_event(
        self, type_: str, mac: str | None = None, timeout_s: float = 60
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = [
                e
                for e in self.events("--type", type_)
                if mac is None or e["data"].get("mac") == mac
            ]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(1)

    def stop(self) -> None:
        if self.up is not None and self.up.poll() is None:
            self.up.send_signal(signal.SIGTERM)
            try:
                self.up.wait(90)
            except subprocess.TimeoutExpired:
                self.up.kill()
        delete_namespace(self.ns)
