"""Real machines (QEMU, TCG) on the stream server: iPXE sanboot over HTTP, Linux over NBD.

* iPXE (``/boot/ipxe.lkrn`` from Debian's ``ipxe``, its script passed as initrd) runs
  ``sanboot http://10.0.2.2:PORT/s/<token>`` (slirp's 10.0.2.2 is the host's loopback): it
  takes the size from HEAD, reads blocks by Range and boots the image's MBR, a 20-byte
  boot sector that prints a marker on the serial port.
* Linux: QEMU's own NBD client opens the export (the session token as export name); a tiny
  initramfs (busybox-static, the virtio modules of the Debian kernel) checksums the first
  4 MiB of /dev/vda, writes a sector, reads it back, and prints markers on the serial
  console. Skipped when no kernel (``linux-image-amd64``), busybox-static or QEMU is there.
"""

from __future__ import annotations

import glob
import hashlib
import lzma
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from shared.events import BlocksRequested, SessionAttached
from tests.stream.conftest import IMAGE_SIZE, ServerThread, spec

pytestmark = pytest.mark.slow

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m 2>/dev/null; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "STREAMBOOT-SUM $(dd if=/dev/vda bs=1M count=4 2>/dev/null | md5sum)"
echo hello-from-vm | dd of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
echo "STREAMBOOT-READBACK $(dd if=/dev/vda bs=512 skip=8 count=1 iflag=direct 2>/dev/null | head -c 13)"
echo STREAMBOOT-DONE
poweroff -f
"""


def kernel() -> tuple[Path, str] | None:
    for vmlinuz in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        version = vmlinuz.removeprefix("/boot/vmlinuz-")
        if Path(f"/lib/modules/{version}/modules.dep").exists():
            return Path(vmlinuz), version
    return None


def virtio_modules(version: str) -> list[Path]:
    """virtio_blk and virtio_pci with their dependencies, in load order (unless built in)."""
    root = Path(f"/lib/modules/{version}")
    deps: dict[str, list[str]] = {}
    for line in (root / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    order: list[str] = []

    def add(mod: str) -> None:
        for dep in reversed(deps.get(mod, [])):
            add(dep)
        if mod not in order:
            order.append(mod)

    for name in ("virtio_pci", "virtio_blk"):
        for mod in deps:
            if re.search(rf"/{name}\.ko(\.xz|\.zst|\.gz)?$", mod):
                add(mod)
    return [root / m for m in order]


def build_initramfs(out: Path, version: str) -> None:
    root = out.parent / "initramfs"
    for d in ("bin", "dev", "proc", "sys", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    names = []
    for mod in virtio_modules(version):
        data = mod.read_bytes()
        if mod.suffix == ".xz":
            data = lzma.decompress(data)
        name = mod.name.split(".ko")[0] + ".ko"
        (root / "lib/modules" / name).write_bytes(data)
        names.append(name)
    (root / "modules.order").write_text("\n".join(names) + "\n")
    init = root / "init"
    init.write_text(INIT)
    init.chmod(0o755)
    files = subprocess.run(
        ["find", "."], cwd=root, capture_output=True, check=True, text=True
    ).stdout
    cpio = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        cwd=root,
        input=files.encode(),
        capture_output=True,
        check=True,
    ).stdout
    out.write_bytes(cpio)


# xor ax,ax; mov ds,ax; mov si,msg; mov dx,0x3f8; .l: lodsb; or al,al; jz .h; out dx,al;
# jmp .l; .h: cli; hlt  -- then the message right after it, at 0x7c14.
BOOT_SECTOR_CODE = bytes.fromhex("31C08ED8BE147CBAF803AC08C07403EEEBF8FAF4")
MBR_MARKER = b"STREAMBOOT-MBR-OK"


@pytest.fixture(scope="module")
def server(make_server) -> ServerThread:  # type: ignore[no-untyped-def]
    return make_server(session_linger_s=5.0)


def run_until(cmd: list[str], marker: bytes, timeout: float) -> bytes:
    """Run a VM until ``marker`` shows on its console (or it exits / times out)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while marker not in out and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
    finally:
        proc.kill()
        proc.wait(10)
    return out


def test_ipxe_sanboot_over_http_range(server: ServerThread, tmp_path: Path) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or not Path("/boot/ipxe.lkrn").exists():
        pytest.skip("needs qemu-system-x86 and ipxe")
    sector = BOOT_SECTOR_CODE + MBR_MARKER + b"\r\n\0"
    image = tmp_path / "boot.raw"
    image.write_bytes(
        sector + bytes(510 - len(sector)) + b"\x55\xaa" + os.urandom(IMAGE_SIZE - 512)
    )
    token = "tok-ipxe"
    server.resolver.exports[token] = spec(token, {"base": image}, write_cache="client-ram")
    script = tmp_path / "boot.ipxe"
    script.write_text(
        f"#!ipxe\ndhcp\nsanboot http://10.0.2.2:{server.servers.http_port}/s/{token}\n"
    )
    out = run_until(
        [qemu, "-m", "128", "-nographic", "-no-reboot", "-kernel", "/boot/ipxe.lkrn",
         "-initrd", str(script), "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"],
        MBR_MARKER, timeout=120,
    )  # fmt: skip
    assert MBR_MARKER in out, out.decode(errors="replace")[-3000:]
    sid = f"session-{token}"
    assert any(e.session_id == sid and e.protocol == "http" for e in server.events(SessionAttached))

    def mbr_read() -> bool:
        reads = [
            x for e in server.events(BlocksRequested) if e.session_id == sid for x in e.extents
        ]
        return any(off == 0 and op == "r" for _, off, _, op in reads)  # the MBR, by Range

    # BlocksRequested goes out in batches (each second, or when the client leaves).
    deadline = time.monotonic() + 10
    while not mbr_read() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mbr_read()


def test_vm_boots_with_its_disk_over_nbd(server: ServerThread, images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    found = kernel()
    qemu = shutil.which("qemu-system-x86_64")
    if found is None or qemu is None or not Path("/bin/busybox").exists():
        pytest.skip("needs linux-image-amd64, busybox-static and qemu-system-x86")
    vmlinuz, version = found
    initrd = tmp_path / "initrd.cpio"
    build_initramfs(initrd, version)
    # TCG by default: a kernel this small boots in seconds, and KVM under nested
    # virtualisation hung at the kernel entry on the development machine.
    kvm = ["-enable-kvm"] if os.environ.get("STREAMBOOT_TEST_KVM") == "1" else []
    # QEMU reads the kernel itself; a copy keeps /boot's permissions out of the way.
    shutil.copy(vmlinuz, tmp_path / "vmlinuz")
    out = subprocess.run(
        [qemu, *kvm, "-m", "256", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
         "-kernel", str(tmp_path / "vmlinuz"), "-initrd", str(initrd),
         "-append", "console=ttyS0 panic=-1 loglevel=3",
         "-drive", f"file={server.nbd}/tok-a,format=raw,if=virtio,cache=none"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    console = out.stdout
    assert "STREAMBOOT-DONE" in console, console[-3000:] + out.stderr
    want = hashlib.md5(images["base"].read_bytes()[: 4 << 20]).hexdigest()
    assert f"STREAMBOOT-SUM {want}" in console
    assert "STREAMBOOT-READBACK hello-from-vm" in console
