"""Build a small bootable Linux demo vdisk from Debian packages, without loop mounts.

The image (64 MiB by default) is what a new user boots first, and what the tests and
benchmarks boot under QEMU::

    sector 0        MBR: syslinux's mbr.bin, partition 1 (FAT16, bootable), partition 2 (ext4)
    1 MiB ..        FAT16 "STREAMBOOT", a separate /boot: ldlinux.sys (syslinux), syslinux.cfg,
                    vmlinuz-VERSION, initrd.img-VERSION (named as Debian names them, so the
                    registry finds them like any image's and boots them kernel-direct)
    .. -9 MiB       ext4 "streamroot" (8 MiB): the demo's root filesystem, which a client with a
                    client-side write cache mounts read-only under a RAM overlay
    last MiB        scratch area outside the partitions: the client writes a record there

The kernel comes from Debian's ``linux-image-*-cloud-amd64`` package (downloaded with
``apt-get download`` and unpacked with ``dpkg-deb``, nothing installed); the initramfs is
busybox-static, the modules the disk and network need, and ``clients/linux`` (the init
script and the NBD hand-off). The FAT is made with ``mkfs.fat --offset``, filled with
mtools, and made bootable with ``syslinux --offset``; the ext4 root with ``mke2fs -d -E
offset=``: no root privileges, no loop device.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLIENT_DIR = Path(__file__).resolve().parents[2] / "clients" / "linux"
MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")
BUSYBOX = Path("/bin/busybox")
SECTOR = 512
PARTITION_START = 2048  # sectors: 1 MiB, the usual alignment
SCRATCH_SECTORS = 2048  # the last MiB, outside the partitions
ROOT_SECTORS = 16384  # 8 MiB ext4 root, just before the scratch area
DEBIAN_PACKAGES = (
    "busybox-static",
    "syslinux",
    "syslinux-common",
    "mtools",
    "dosfstools",
    "e2fsprogs",
    "nbd-client",
)
NBD_CLIENT = Path("/usr/sbin/nbd-client")
# Modules the client needs, by name; their dependencies are added from modules.dep.
MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "ata_piix",
    "sd_mod",
    "nbd",
    # The client-side write cache: the root partition read-only under a RAM overlay.
    "overlay",
)
MARKER = "streamboot-client: BOOTED"


def recipe_digest() -> str:
    """A digest of what the image is built from (this module and clients/linux), so that
    caches of built images know when they are stale."""
    import hashlib

    h = hashlib.sha256(Path(__file__).read_bytes())
    # The demo's own files; the client package's subdirectories are not in its initramfs.
    for path in sorted(p for p in CLIENT_DIR.iterdir() if p.is_file()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:12]


class DemoBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    modules: Path  # /lib/modules/<version>


def require_tools() -> None:
    missing = [
        name
        for name, path in {
            "busybox-static": BUSYBOX,
            "syslinux-common": MBR_BIN,
            "nbd-client": NBD_CLIENT,
        }.items()
        if not path.exists()
    ]
    missing += [
        pkg
        for tool, pkg in {
            "syslinux": "syslinux",
            "mcopy": "mtools",
            "mkfs.fat": "dosfstools",
        }.items()
        if shutil.which(tool) is None
    ]
    if missing:
        raise DemoBuildError(
            "building the demo vdisk needs these Debian packages: "
            + " ".join(sorted(set(missing)))
            + f" (apt-get install {' '.join(DEBIAN_PACKAGES)})"
        )


def _run(argv: list[str], **kw: object) -> str:
    try:
        done = subprocess.run(argv, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    except FileNotFoundError as exc:
        raise DemoBuildError(f"{argv[0]} is not installed") from exc
    except subprocess.CalledProcessError as exc:
        raise DemoBuildError(f"{' '.join(argv)} failed: {exc.stderr.strip()}") from exc
    return done.stdout


def default_cache_dir() -> Path:
    """Where ``streamboot vdisk build-demo`` keeps the kernel it downloaded."""
    return Path(tempfile.gettempdir()) / "streamboot-demo-cache"


def fetch_kernel(cache_dir: Path) -> Kernel:
    """Download and unpack Debian's cloud kernel into ``cache_dir`` (once)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    depends = _run(["apt-cache", "depends", "linux-image-cloud-amd64"])
    package = next(
        (
            line.split(":", 1)[1].strip()
            for line in depends.splitlines()
            if line.strip().startswith("Depends:") and "linux-image-" in line
        ),
        None,
    )
    if package is None:
        raise DemoBuildError("apt knows no linux-image-cloud-amd64 (run apt-get update first)")
    version = package.removeprefix("linux-image-")
    root = cache_dir / package
    vmlinuz = root / "boot" / f"vmlinuz-{version}"
    if not vmlinuz.exists():
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            _run(["apt-get", "download", package], cwd=tmp)
            [deb] = Path(tmp).glob("*.deb")
            unpack = Path(tmp) / "root"
            _run(["dpkg-deb", "-x", str(deb), str(unpack)])
            if root.exists():
                shutil.rmtree(root)
            unpack.rename(root)
    return Kernel(version, vmlinuz, root / "lib" / "modules" / version)


def module_depends(ko: Path) -> list[str]:
    """The ``depends=`` of a module's .modinfo section (modules.dep is made by depmod at
    install time, and we install nothing; the .ko itself says what it needs)."""
    data = ko.read_bytes()
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    end = data.index(b"\0", at + 1)
    value = data[at + len(b"\0depends=") : end].decode()
    return [d for d in value.split(",") if d]


def module_closure(modules_dir: Path, wanted: Iterable[str]) -> list[Path]:
    """The module files for ``wanted`` and all they depend on, dependencies first."""
    by_name = {ko.name.split(".ko")[0].replace("-", "_"): ko for ko in modules_dir.rglob("*.ko")}
    ordered: list[Path] = []

    def visit(name: str) -> None:
        ko = by_name.get(name.replace("-", "_"))
        if ko is None or ko in ordered:  # built in, absent from this kernel, or done
            return
        for dep in module_depends(ko):
            visit(dep)
        ordered.append(ko)

    for name in wanted:
        visit(name)
    return ordered


class Cpio:
    """A newc cpio archive written in memory (device nodes without root privileges)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        fields = [
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0,
        ]  # fmt: skip
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        blob = header + name.encode() + b"\0"
        blob += b"\0" * (-len(blob) % 4)
        blob += data + b"\0" * (-len(data) % 4)
        self._parts.append(blob)

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def bytes(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def shared_libraries(binary: Path) -> list[Path]:
    """The shared objects a dynamically linked binary loads, the loader included (ldd)."""
    libs = []
    for line in _run(["ldd", str(binary)]).splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            libs.append(Path(path))
    return libs


def build_initramfs(kernel: Kernel, out: Path) -> None:
    archive = Cpio()
    for d in (
        "bin",
        "dev",
        "etc",
        "lib",
        "lib/modules",
        "lib/streamboot",
        "proc",
        "sys",
        "tmp",
        "mnt",
    ):
        archive.directory(d)
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3)
    archive.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("init", (CLIENT_DIR / "init").read_bytes(), 0o755)
    # Debian's nbd-client is dynamically linked: bring its libraries at their own paths.
    archive.file("bin/nbd-client", NBD_CLIENT.read_bytes(), 0o755)
    made: set[str] = set()
    for lib in shared_libraries(NBD_CLIENT):
        parents = list(lib.relative_to("/").parents)[-2::-1]
        for parent in parents:
            if str(parent) not in made and str(parent) not in ("lib", "bin"):
                archive.directory(str(parent))
                made.add(str(parent))
        archive.file(str(lib.relative_to("/")), lib.resolve().read_bytes(), 0o755)
    for script in sorted(CLIENT_DIR.glob("*.sh")):
        archive.file(f"lib/streamboot/{script.name}", script.read_bytes(), 0o755)
    order = []
    for module in module_closure(kernel.modules, MODULES):
        archive.file(f"lib/modules/{module.name}", module.read_bytes())
        order.append(module.name)
    archive.file("etc/modules-order", ("\n".join(order) + "\n").encode())
    out.write_bytes(gzip.compress(archive.bytes(), compresslevel=6))


SYSLINUX_CFG = """DEFAULT streamboot
PROMPT 0
TIMEOUT 0
LABEL streamboot
  KERNEL vmlinuz-{version}
  INITRD initrd.img-{version}
  APPEND console=ttyS0 quiet panic=-1 streamboot.marker={name}{args}
"""


def partitions(total_sectors: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(start, sectors) of the FAT boot partition and of the ext4 root partition."""
    root_start = total_sectors - SCRATCH_SECTORS - ROOT_SECTORS
    return (PARTITION_START, root_start - PARTITION_START), (root_start, ROOT_SECTORS)


def write_mbr(image: Path, total_sectors: int) -> None:
    (boot_start, boot_sectors), (root_start, root_sectors) = partitions(total_sectors)
    # CHS fields are ignored by everything that boots this (LBA); 0xFEFFFF means "use LBA".
    chs = b"\xfe\xff\xff"
    boot = struct.pack("<B3sB3sII", 0x80, chs, 0x0E, chs, boot_start, boot_sectors)
    root = struct.pack("<B3sB3sII", 0x00, chs, 0x83, chs, root_start, root_sectors)
    with open(image, "r+b") as f:
        f.write(MBR_BIN.read_bytes()[:440])
        f.seek(446)
        f.write(boot + root + bytes(32) + b"\x55\xaa")


def build_demo_image(
    out: Path,
    *,
    name: str = "demo",
    size_mib: int = 64,
    cache_dir: Path,
    kernel_args: str = "",
) -> Path:
    """Build the demo vdisk at ``out`` (raw). Returns ``out``.

    Booted kernel-direct by the boot service, its kernel command line carries
    ``streamboot.server=`` and ``streamboot.nonce=``: the client redeems the nonce and
    attaches its NBD export. Booted by its own syslinux (a local disk, sanboot), the line is
    syslinux.cfg's plus ``kernel_args`` (tests put a server and nonce there), and without
    them the client uses the disk it was booted from."""
    require_tools()
    if size_mib < 32:
        raise DemoBuildError("the demo image needs at least 32 MiB")
    kernel = fetch_kernel(cache_dir)
    total = size_mib * 1024 * 1024 // SECTOR
    (_, part_sectors), (root_start, root_sectors) = partitions(total)
    offset = PARTITION_START * SECTOR
    with tempfile.TemporaryDirectory(prefix="streamboot-demo-") as tmp:
        work = Path(tmp)
        vmlinuz, initrd = work / f"vmlinuz-{kernel.version}", work / f"initrd.img-{kernel.version}"
        build_initramfs(kernel, initrd)
        shutil.copyfile(kernel.vmlinuz, vmlinuz)
        (work / "syslinux.cfg").write_text(
            SYSLINUX_CFG.format(
                name=name, version=kernel.version, args=f" {kernel_args}" if kernel_args else ""
            )
        )
        partial = out.with_name(out.name + ".partial")
        with open(partial, "wb") as f:
            f.truncate(total * SECTOR)
        write_mbr(partial, total)
        _run(["mkfs.fat", "-F", "16", "-n", "STREAMBOOT", "--offset", str(PARTITION_START),
              str(partial), str(part_sectors * SECTOR // 1024)])  # fmt: skip
        env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
        target = f"{partial}@@{offset}"
        _run(["mcopy", "-i", target, str(vmlinuz), str(initrd),
              str(work / "syslinux.cfg"), "::/"], env=env)  # fmt: skip
        _run(["syslinux", "--install", "--offset", str(offset), str(partial)], env=env)
        rootfs = work / "rootfs"
        (rootfs / "etc").mkdir(parents=True)
        (rootfs / "etc" / "streamboot-release").write_text(f"streamboot demo vdisk {name}\n")
        _run(["mke2fs", "-q", "-t", "ext4", "-L", "streamroot", "-d", str(rootfs),
              "-E", f"offset={root_start * SECTOR}", str(partial),
              f"{root_sectors * SECTOR // 1024}k"])  # fmt: skip
        partial.rename(out)
    return out
