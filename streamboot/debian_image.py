"""Build a real Debian disk image with the streamboot client, for `vdisk build-debian`.

debootstrap (minbase plus systemd, a kernel, initramfs-tools, nbd-client) into a folder,
kept in a cache keyed by suite, mirror and package list, so a second build downloads
nothing; a copy of it gets the client .deb (apt-get install ./streamboot-client_*.deb in a
chroot, then update-initramfs), a serial console getty and a unit that prints a marker on
the console at multi-user::

    STREAMBOOT-BOOTED hostname=NAME machine-id=HEX rootfs=FSTYPE

The image is MBR-partitioned (sfdisk on the file), one ext4 partition from 1 MiB made with
``mkfs.ext4 -d ROOTFS -E offset=``: no mount, no loop device, no bootloader (the boot
service boots its kernel directly). debootstrap and chroot need root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from streamboot.client_package import NBD_HELPER_PATH, build_deb, build_nbd_helper

DEFAULT_MIRROR = "http://deb.debian.org/debian"
# What a streamed Debian needs besides minbase: systemd and udev, a kernel and its
# initramfs tooling, the client's nbd-client, DHCP, busybox (nc, the redeem request),
# e2fsprogs (a client-disk write cache is formatted at boot), zstd (initramfs-tools falls
# back to gzip without it: a larger file that the kernel unpacks more slowly).
BASE_PACKAGES = (
    "systemd-sysv", "udev", "linux-image-amd64", "initramfs-tools", "nbd-client", "iproute2",
    "isc-dhcp-client", "kmod", "busybox", "e2fsprogs", "zstd",
)  # fmt: skip
MARKER = "STREAMBOOT-BOOTED"
PROOF = "STREAMBOOT-PROOF"
SECTOR = 512
PARTITION_START = 2048  # sectors: 1 MiB
ROOT_LABEL = "streamroot"

# The marker: what the tests (and an operator trying it) look for on the serial console.
# last-boot= is the boot id the previous boot left in this root ("none": earlier writes are
# gone, as with a discarded write cache); written and synced before the line is printed.
MARKER_SCRIPT = f"""#!/bin/sh
state=/var/lib/streamboot-marker
last=$(cat "$state/last-boot" 2>/dev/null || echo none)
boot=$(cat /proc/sys/kernel/random/boot_id)
mkdir -p "$state" && echo "$boot" > "$state/last-boot" && sync
# streamboot-marker.await-failover=1 (tests/e2e/test_realos_failover.py): say so, wait
# until the root's NBD connection moved to another stream node, then write a file through
# it and read it back past the page cache.
case " $(cat /proc/cmdline) " in
    *" streamboot-marker.await-failover=1 "*)
        echo "STREAMBOOT-AWAIT-FAILOVER" > /dev/console
        i=0
        until dmesg | grep -q "nbd0: reconnected socket" || [ $i -ge 900 ]; do
            sleep 1; i=$((i + 1))
        done
        head -c 1048576 /dev/urandom > /run/failover.want
        cp /run/failover.want "$state/failover" && sync
        echo 3 > /proc/sys/vm/drop_caches
        same=no; cmp -s /run/failover.want "$state/failover" && same=yes
        echo "STREAMBOOT-FAILOVER same=$same" \
            "io-errors=$(dmesg | grep -c -i -e 'I/O error' -e 'Buffer I/O')" > /dev/console
        ;;
esac
# streamboot-marker.proof=WORD (tests/e2e/test_realos_maintenance.py): a change made
# inside the OS, as an operator updating a maintenance boot would; every boot prints what
# the root holds, so a later version's clients show whether the change reached them.
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        streamboot-marker.proof=*) echo "${{arg#*=}}" > /etc/streamboot-maint-proof && sync ;;
    esac
done
echo "{PROOF} $(cat /etc/streamboot-maint-proof 2>/dev/null || echo none)" > /dev/console
echo "{MARKER} hostname=$(hostname) machine-id=$(cat /etc/machine-id)" \\
    "rootfs=$(findmnt -n -o FSTYPE /) boot-id=$boot last-boot=$last" > /dev/console
# streamboot-marker.poweroff=1 on the command line: a clean power-off right after, once the
# client's own report (streamboot-booted.service) is done, which the power-off would cut short.
case " $(cat /proc/cmdline) " in
    *" streamboot-marker.poweroff=1 "*)
        i=0
        while [ $i -lt 120 ] && [ -n "$(systemctl list-jobs --no-legend streamboot-booted.service)" ]; do
            sleep 0.5; i=$((i + 1))
        done
        systemctl --no-block poweroff
        ;;
esac
"""
# At multi-user, as a local boot prints it: the client's report to the server
# (streamboot-booted.service) runs beside it, and the power-off waits for that report.
MARKER_UNIT = """[Unit]
Description=streamboot: print the boot marker on the console at multi-user
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/streamboot-marker

[Install]
WantedBy=multi-user.target
"""
# A streamed client's initramfs needs its NIC drivers and the client, not every storage
# controller, filesystem and framebuffer (MODULES=most): a smaller file to load over the
# network and to unpack at boot. With MODULES=list the client's hook adds what a streamed
# client needs (NICs, ext4, overlay, nbd, the local disks' controllers, keyboards).
INITRAMFS_CONF = "# streamboot: the root comes over the network.\nMODULES=list\nCOMPRESS=zstd\n"
# With open-iscsi (boot method iscsi-ibft) the root is a SCSI disk: MODULES=list leaves
# out the SCSI disk driver that gives it a /dev/sdX.
ISCSI_INITRAMFS_MODULES = "# streamboot: the iSCSI root's disk driver.\nsd_mod\n"
FSTAB = "# The root is mounted by the initramfs (the streamboot client), by write-cache type.\n"


class DebianBuildError(RuntimeError):
    pass


Say = Callable[[str], None]


def _run(argv: list[str], timeout: float = 1800, **kw: object) -> str:
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
            **kw,  # type: ignore[call-overload]
        )
    except FileNotFoundError as exc:
        raise DebianBuildError(f"{argv[0]} is not installed") from exc
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-15:]
        raise DebianBuildError(f"{' '.join(argv[:4])}... failed:\n" + "\n".join(tail)) from exc
    except subprocess.TimeoutExpired as exc:
        raise DebianBuildError(f"{' '.join(argv[:4])}... took over {timeout:.0f} s") from exc
    return done.stdout


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamboot"


def packages_for(extra: Iterable[str]) -> list[str]:
    return sorted({*BASE_PACKAGES, *(p.strip() for p in extra if p.strip())})


def bootstrap_key(suite: str, mirror: str, packages: list[str]) -> str:
    text = f"{suite}\n{mirror}\n{','.join(sorted(packages))}"
    return f"{suite}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def require_build_tools() -> None:
    if os.geteuid() != 0:
        raise DebianBuildError(
            "build-debian needs root (debootstrap and chroot into the new system): "
            "run it with sudo, or build the image yourself and `streamboot vdisk import` it"
        )
    missing = [
        pkg
        for tool, pkg in {
            "debootstrap": "debootstrap",
            "mkfs.ext4": "e2fsprogs",
            "sfdisk": "fdisk",
            "dpkg-deb": "dpkg",
        }.items()
        if shutil.which(tool) is None
    ]
    if missing:
        raise DebianBuildError(f"build-debian needs: apt-get install {' '.join(missing)}")


def cached_root(cache_dir: Path, suite: str, mirror: str, packages: list[str]) -> Path:
    """Where the debootstrapped root for (suite, mirror, packages) is kept."""
    return cache_dir / "debootstrap" / bootstrap_key(suite, mirror, packages) / "rootfs"


def bootstrap(cache_dir: Path, suite: str, mirror: str, packages: list[str], say: Say) -> Path:
    """The debootstrapped root for (suite, mirror, packages): from the cache, or made once
    into it (a half-made one never counts: it is renamed into place when complete)."""
    rootfs = cached_root(cache_dir, suite, mirror, packages)
    base = rootfs.parent
    if rootfs.is_dir():
        return rootfs
    partial = base.with_name(base.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    say(f"debootstrap {suite} from {mirror} (once; cached in {base})...")
    _run([
        "debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
        suite, str(partial / "rootfs"), mirror,
    ], timeout=3600)  # fmt: skip
    unmount_below(partial / "rootfs")
    partial.rename(base)
    return rootfs


def unmount_below(rootfs: Path) -> None:
    """Unmount what a chroot left mounted inside ``rootfs`` (debootstrap's /proc, when a
    process it started kept it busy): a cached root is plain files, and copying a live
    /proc blocks for ever on /proc/kmsg."""
    prefix = str(rootfs.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=60, check=False)


def _chroot(rootfs: Path, *argv: str) -> str:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C",
        "HOME": "/root",
    }
    return _run(["chroot", str(rootfs), *argv], env=env)


def install_client(rootfs: Path, say: Say) -> None:
    """The client .deb into the root (its dependencies are already there), whose trigger
    rebuilds the initramfs, and the check that every initramfs really has it."""
    say("installing the streamboot client (the initramfs is rebuilt)...")
    (rootfs / "etc/initramfs-tools/conf.d").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/initramfs-tools/conf.d/streamboot").write_text(INITRAMFS_CONF)
    if (rootfs / "sbin/iscsistart").exists():
        with open(rootfs / "etc/initramfs-tools/modules", "a") as modules:
            modules.write(ISCSI_INITRAMFS_MODULES)
    # Before the package: its trigger's initramfs then carries the failover helper.
    build_nbd_helper(rootfs / NBD_HELPER_PATH)
    deb = build_deb(rootfs / "tmp")
    _chroot(rootfs, "apt-get", "install", "-y", f"/tmp/{deb.name}")
    deb.unlink()
    initrds = sorted((rootfs / "boot").glob("initrd.img-*"))
    if not initrds:
        raise DebianBuildError("no /boot/initrd.img-* in the new system (is a kernel installed?)")
    if not all(initramfs_has_client(rootfs, i) for i in initrds):
        _chroot(rootfs, "update-initramfs", "-u", "-k", "all")
    for initrd in initrds:
        if not initramfs_has_client(rootfs, initrd):
            raise DebianBuildError(f"{initrd.name} lacks the streamboot client")


def initramfs_has_client(rootfs: Path, initrd: Path) -> bool:
    listing = _chroot(rootfs, "lsinitramfs", f"/boot/{initrd.name}").split()
    return "scripts/streamboot" in listing and any(
        f.endswith("lib/streamboot/client.sh") for f in listing
    )


def configure(rootfs: Path) -> None:
    """What makes the root a streamed client: no fstab root, an identity written at boot,
    a serial getty, the multi-user marker."""
    etc = rootfs / "etc"
    (etc / "fstab").write_text(FSTAB)
    (etc / "hostname").write_text("streamboot\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n")
    # Empty: each client gets the registry's at boot (the initramfs writes it).
    (etc / "machine-id").write_text("")
    (rootfs / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    units = etc / "systemd" / "system"
    (units / "streamboot-marker.service").write_text(MARKER_UNIT)
    marker = rootfs / "usr/local/sbin/streamboot-marker"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(MARKER_SCRIPT)
    marker.chmod(0o755)
    for target, unit, link in (
        ("multi-user.target.wants", "/etc/systemd/system/streamboot-marker.service", None),
        ("getty.target.wants", "/lib/systemd/system/serial-getty@.service", "serial-getty@ttyS0.service"),
    ):  # fmt: skip
        wants = units / target
        wants.mkdir(parents=True, exist_ok=True)
        path = wants / (link or Path(unit).name)
        path.unlink(missing_ok=True)
        path.symlink_to(unit)
    for leftover in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        leftover.unlink()


def make_image(rootfs: Path, image: Path, size_bytes: int) -> None:
    """An MBR disk with one ext4 partition from 1 MiB holding ``rootfs``."""
    total = size_bytes // SECTOR
    if total <= PARTITION_START * 2:
        raise DebianBuildError("the image size is too small")
    with open(image, "wb") as f:
        f.truncate(total * SECTOR)
    _run(["sfdisk", "--quiet", str(image)], input=f"label: dos\nstart={PARTITION_START}, type=83\n")
    part_kib = (total - PARTITION_START) * SECTOR // 1024
    _run(["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-d", str(rootfs),
          "-E", f"offset={PARTITION_START * SECTOR}", str(image), f"{part_kib}k"])  # fmt: skip


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise DebianBuildError(f"size {text!r} is not a size (e.g. 4G, 2048M)") from None


def build_debian_image(
    out: Path,
    *,
    suite: str = "bookworm",
    size: str = "4G",
    extra_packages: Iterable[str] = (),
    mirror: str = DEFAULT_MIRROR,
    cache_dir: Path | None = None,
    say: Say = lambda _m: None,
) -> Path:
    """Build the image at ``out`` (raw); returns ``out``."""
    require_build_tools()
    size_bytes = parse_size(size)
    packages = packages_for(extra_packages)
    cached = bootstrap(cache_dir or default_cache_dir(), suite, mirror, packages, say)
    with tempfile.TemporaryDirectory(prefix="streamboot-debian-", dir=out.parent) as tmp:
        rootfs = Path(tmp) / "rootfs"
        say("copying the debootstrapped system...")
        # --one-file-system: nothing mounted inside the cache is copied (see unmount_below).
        _run(["cp", "-a", "--one-file-system", "--reflink=auto", str(cached), str(rootfs)])
        install_client(rootfs, say)
        configure(rootfs)
        say(f"making the {size} disk image (ext4 on an MBR partition)...")
        partial = out.with_name(out.name + ".partial")
        try:
            make_image(rootfs, partial, size_bytes)
            partial.rename(out)
        finally:
            partial.unlink(missing_ok=True)
    return out
