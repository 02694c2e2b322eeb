"""A small Linux guest whose disk is a streamboot NBD export attached by streamboot-nbd.

Debian's kernel and modules (the debootstrapped bookworm the real-OS tests cache), busybox
and the failover helper in an initramfs; QEMU under TCG with user networking, so the
stream nodes on the host's loopback are 10.0.2.2:PORT to the guest. The guest runs a shell
script (``/script``) once the disk is attached; the host talks to it on the serial console
(``Guest.send`` is a line on its stdin). Used by tests/failover and bench/failover.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from streamboot.client_package import build_nbd_helper
from streamboot.debian_image import DEFAULT_MIRROR, cached_root, packages_for

TEST_CACHE = Path(
    os.environ.get("STREAMBOOT_TEST_CACHE", Path.home() / ".cache" / "streamboot-test")
)
HOST = "10.0.2.2"  # the host's loopback, seen from a QEMU user-network guest
MODULES = (  # in dependency order (modules.dep)
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/drivers/block/nbd.ko",
)

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /lib/mod/*.ko; do insmod "$m"; done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
if /bin/streamboot-nbd -d /dev/nbd0 $(cat /options) -N "$(cat /export)" $(cat /nodes); then
    echo GUEST-ATTACHED
    . /script
else
    echo GUEST-ATTACH-FAILED
fi
echo GUEST-DONE
poweroff -f
"""


def debian_kernel() -> tuple[Path, Path] | None:
    """(vmlinuz, modules dir) of the cached bookworm root, if the real-OS tests made it."""
    root = cached_root(TEST_CACHE, "bookworm", DEFAULT_MIRROR, packages_for(()))
    kernels = sorted((root / "boot").glob("vmlinuz-*")) if root.is_dir() else []
    if not kernels:
        return None
    kver = kernels[-1].name.removeprefix("vmlinuz-")
    return kernels[-1], root / "usr/lib/modules" / kver


def missing() -> list[str]:
    """What a guest needs and this machine lacks."""
    out = [t for t in ("qemu-system-x86_64", "cpio", "cc") if shutil.which(t) is None]
    if not Path("/bin/busybox").exists():
        out.append("busybox-static")
    if debian_kernel() is None:
        out.append(f"the cached Debian root in {TEST_CACHE} (run the realos tests once)")
    return out


def build_initramfs(
    work: Path, export: str, nodes: list[str], script: str, options: tuple[str, ...] = ()
) -> Path:
    """An initramfs that attaches ``export`` from ``nodes`` ("host:port") with the
    helper's ``options`` and runs ``script`` (sh)."""
    found = debian_kernel()
    assert found is not None
    _, modules = found
    stage = work / "initramfs"
    shutil.rmtree(stage, ignore_errors=True)
    for d in ("bin", "dev", "proc", "sys", "lib/mod", "tmp"):
        (stage / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", stage / "bin/busybox")
    build_nbd_helper(stage / "bin/streamboot-nbd")
    for i, m in enumerate(MODULES):  # numbered: loaded in dependency order
        shutil.copy(modules / m, stage / "lib/mod" / f"{i:02d}-{Path(m).name}")
    (stage / "init").write_text(INIT)
    (stage / "init").chmod(0o755)
    (stage / "export").write_text(export)
    (stage / "nodes").write_text(" ".join(nodes))
    (stage / "options").write_text(" ".join(options))
    (stage / "script").write_text(script)
    os.mknod(stage / "dev/console", 0o600 | 0o020000, os.makedev(5, 1))
    out = work / "initramfs.cpio"
    names = subprocess.run(
        ["find", "."], cwd=stage, capture_output=True, check=True, timeout=60
    ).stdout
    with open(out, "wb") as f:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], cwd=stage, input=names, stdout=f,
            check=True, timeout=60,
        )  # fmt: skip
    return out


class Guest:
    """A running guest: its console collected in the background, lines sent to it."""

    def __init__(self, initramfs: Path, console: Path, memory_mib: int = 256) -> None:
        found = debian_kernel()
        assert found is not None
        kernel, _ = found
        argv = [
            "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", str(memory_mib),
            "-nographic", "-no-reboot", "-serial", "stdio", "-monitor", "none",
            "-kernel", str(kernel), "-initrd", str(initramfs),
            "-append", "console=ttyS0 panic=-1 loglevel=4",
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
        ]  # fmt: skip
        self.console_path = console
        self.text = ""
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.console_path, "wb") as log:
            while chunk := self.proc.stdout.read1(65536):
                log.write(chunk)
                log.flush()
                with self._lock:
                    self.text += chunk.decode(errors="replace")

    def wait_for(self, text: str, timeout_s: float = 300, after: int = 0) -> int:
        """Waits until ``text`` shows on the console after offset ``after``; returns the
        offset just past it (fails with the console's end when it never comes)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                at = self.text.find(text, after)
                if at >= 0:
                    return at + len(text)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.5)  # the last of the console
                raise AssertionError(f"never saw {text!r}; console:\n{self.text[-4000:]}")
            time.sleep(0.1)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)
