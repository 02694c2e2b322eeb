"""Find the Linux kernels and initramfs images inside a disk image, for kernel-direct boot.

Run where a full raw image of a new version exists (an import's staging, a maintenance
commit's materialised image). The image's filesystems are read in user space from the file,
with no mount, no loop device and no privileges: ext2/3/4 with e2fsprogs' ``debugfs``
(``IMAGE?offset=BYTES``), vfat with mtools (``-i IMAGE@@BYTES``). The partition table
(MBR or GPT) comes from :mod:`shared.partitions`; an image without one is
tried as a whole-disk filesystem.

Kernels are looked for in ``/boot`` and ``/`` of every filesystem (a separate /boot
partition holds them at its root): ``vmlinuz-VERSION`` with ``initrd.img-VERSION``
(Debian, Ubuntu) or ``initramfs-VERSION.img`` (dracut), symlinks followed inside their
filesystem. The newest by version order (dpkg's) is chosen unless the operator picked
one. The root filesystem is the ext filesystem with an ``/etc``. The chosen pair is
copied to ``OUT/vmlinuz`` and ``OUT/initrd``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from shared.partitions import read_partitions

TOOL_TIMEOUT_S = 120.0
MAX_FILE_BYTES = 1 << 30  # a kernel or an initramfs larger than this is not one
MAX_SYMLINK_HOPS = 8
_VERSION = r"[A-Za-z0-9._+~-]{1,100}"
_KERNEL = re.compile(rf"^vmlinuz-({_VERSION})$")
_INITRDS = ("initrd.img-{v}", "initramfs-{v}.img")
SEARCH_DIRS = ("/boot", "/")
EXT_MAGIC_AT, EXT_UUID_AT = 1024 + 56, 1024 + 104

FsKind = Literal["ext", "vfat"]


class ScanError(Exception):
    """A filesystem that cannot be read (its tool failed or is missing)."""


@dataclass(frozen=True)
class Entry:
    name: str
    kind: Literal["file", "dir", "link", "other"]
    size: int = 0


@dataclass(frozen=True)
class Filesystem:
    kind: FsKind
    offset: int
    where: str  # "partition 2" or "the whole disk", for messages
    uuid: str | None = None
    whole: bool = False


@dataclass
class BootScan:
    """What was found (BootFilesScanned's data, less what the registry measures)."""

    kernel_version: str | None = None
    root: str | None = None
    root_fstype: str | None = None
    kernels: list[str] = field(default_factory=list)
    chosen_by: Literal["newest", "operator"] | None = None
    problem: str | None = None
    # For the operator (the CLI prints them); not recorded.
    warnings: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        data = asdict(self)
        del data["warnings"]
        return data


# --- version order ---------------------------------------------------------------------


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def compare_versions(a: str, b: str) -> int:
    """dpkg's version comparison (``verrevcmp``): digit runs as numbers, ``~`` before
    anything, letters before other characters."""
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            bc = _order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if ac != bc:
                return ac - bc
            i, j = i + 1, j + 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        first_diff = 0
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            first_diff = first_diff or ord(a[i]) - ord(b[j])
            i, j = i + 1, j + 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


version_key = functools.cmp_to_key(compare_versions)


# --- reading filesystems ---------------------------------------------------------------


def _run(argv: list[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1", MTOOLSRC="/dev/null", LC_ALL="C")
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, errors="replace", timeout=TOOL_TIMEOUT_S,
            cwd=cwd, env=env, check=False,
        )  # fmt: skip
    except FileNotFoundError:
        package = "e2fsprogs" if argv[0] == "debugfs" else "mtools"
        raise ScanError(f"{argv[0]} is not installed (Debian package {package})") from None
    except subprocess.TimeoutExpired:
        raise ScanError(f"{argv[0]} took longer than {TOOL_TIMEOUT_S:.0f} s") from None


class ExtReader:
    """ext2/3/4 through ``debugfs`` (read-only: it opens the image without -w)."""

    def __init__(self, image: Path, fs: Filesystem) -> None:
        self.device = f"{image}?offset={fs.offset}"
        self.fs = fs

    def _debugfs(self, command: str, cwd: Path | None = None) -> str:
        done = _run(["debugfs", "-R", command, self.device], cwd=cwd)
        # debugfs exits 0 whatever happened (and may print to stdout when it cannot open):
        # an answer, or only a "not found", is success.
        err = [
            x for x in done.stderr.splitlines()
            if x.strip() and not x.startswith("debugfs ") and "File not found" not in x
        ]  # fmt: skip
        unopened = any("while trying to open" in x or "not open" in x for x in err)
        if done.returncode != 0 or unopened or (err and not done.stdout.strip()):
            raise ScanError(
                f"the ext filesystem of {self.fs.where} cannot be read: {' '.join(err)[:300]}"
            )
        return done.stdout

    def list_dir(self, path: str) -> list[Entry] | None:
        out = self._debugfs(f"ls -p {path}")
        if not out.strip():
            return None  # no such directory
        entries = []
        for line in out.splitlines():
            parts = line.split("/")
            if len(parts) < 7 or parts[5] in (".", ".."):
                continue
            mode = int(parts[2] or "0", 8) & 0o170000
            kind = {0o100000: "file", 0o040000: "dir", 0o120000: "link"}.get(mode, "other")
            size = int(parts[6]) if parts[6].isdigit() else 0
            entries.append(Entry(parts[5], kind, size))  # type: ignore[arg-type]
        return entries

    def readlink(self, path: str) -> str | None:
        for line in self._debugfs(f"stat {path}").splitlines():
            if line.startswith("Fast link dest:"):
                return line.split(":", 1)[1].strip().strip('"')
        return None

    def copy(self, path: str, dest: Path) -> None:
        # Dumped under a plain name in dest's folder: debugfs splits its command at spaces.
        self._debugfs(f"dump {path} {dest.name}", cwd=dest.parent)
        if not dest.is_file():
            raise ScanError(f"debugfs could not copy {path} out of {self.fs.where}")


class VfatReader:
    """vfat through mtools (no symlinks on FAT)."""

    def __init__(self, image: Path, fs: Filesystem) -> None:
        self.target = f"{image}@@{fs.offset}"
        self.fs = fs

    def list_dir(self, path: str) -> list[Entry] | None:
        done = _run(["mdir", "-b", "-i", self.target, f"::{path}"])
        if done.returncode != 0:
            if "not found" in done.stderr:
                return None
            raise ScanError(f"the FAT of {self.fs.where} cannot be read: {done.stderr.strip()}")
        entries = []
        for line in done.stdout.splitlines():
            name = line.rstrip("/").rsplit("/", 1)[-1]
            if name and line.startswith("::"):
                entries.append(Entry(name, "dir" if line.endswith("/") else "file"))
        return entries

    def readlink(self, path: str) -> str | None:
        return None

    def copy(self, path: str, dest: Path) -> None:
        done = _run(["mcopy", "-n", "-i", self.target, f"::{path}", str(dest)])
        if done.returncode != 0 or not dest.is_file():
            raise ScanError(f"mcopy could not copy {path} out of {self.fs.where}: {done.stderr}")


Reader = ExtReader | VfatReader


def filesystem_at(image: Path, offset: int, where: str, whole: bool = False) -> Filesystem | None:
    """The filesystem starting at ``offset``, if it is one this reads."""
    with open(image, "rb") as f:
        f.seek(offset)
        head = f.read(2048)
    if len(head) < 2048:
        return None
    if head[EXT_MAGIC_AT : EXT_MAGIC_AT + 2] == b"\x53\xef":
        fs_uuid = str(uuid.UUID(bytes=head[EXT_UUID_AT : EXT_UUID_AT + 16]))
        return Filesystem("ext", offset, where, fs_uuid, whole)
    if head[510:512] == b"\x55\xaa" and (head[54:57] == b"FAT" or head[82:87] == b"FAT32"):
        return Filesystem("vfat", offset, where, None, whole)
    return None


def filesystems(image: Path) -> list[Filesystem]:
    """The image's readable filesystems: the whole disk's, else its partitions'."""
    whole = filesystem_at(image, 0, "the whole disk", whole=True)
    if whole is not None:
        return [whole]
    found = []
    for part in read_partitions(image) or []:
        fs = filesystem_at(image, part.start, f"partition {part.number}")
        if fs is not None:
            found.append(fs)
    return found


def reader(image: Path, fs: Filesystem) -> Reader:
    return ExtReader(image, fs) if fs.kind == "ext" else VfatReader(image, fs)


# --- finding kernels -------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    version: str
    fs: Filesystem
    kernel: str  # paths inside fs, symlinks resolved
    initrd: str | None


def _resolve(r: Reader, folder: str, name: str) -> str | None:
    """The path of the regular file ``folder/name`` ends at, following symlinks inside its
    filesystem; None when it leaves it, loops or ends nowhere."""
    path = f"{folder.rstrip('/')}/{name}"
    for _ in range(MAX_SYMLINK_HOPS):
        parent, base = path.rsplit("/", 1)
        listing = {e.name: e for e in r.list_dir(parent or "/") or []}
        entry = listing.get(base)
        if entry is None:
            return None
        if entry.kind == "file":
            return path
        if entry.kind != "link":
            return None
        target = r.readlink(path)
        if not target:
            return None
        path = os.path.normpath(target if target.startswith("/") else f"{parent}/{target}")
    return None


def kernels_in(image: Path, fs: Filesystem) -> list[Candidate]:
    r = reader(image, fs)
    found: dict[str, Candidate] = {}
    for folder in SEARCH_DIRS:
        entries = r.list_dir(folder)
        if entries is None:
            continue
        names = {e.name for e in entries}
        for e in entries:
            m = _KERNEL.match(e.name)
            if m is None or m.group(1) in found or e.kind not in ("file", "link"):
                continue
            kernel = _resolve(r, folder, e.name)
            if kernel is None:
                continue
            version = m.group(1)
            initrd = next(
                (
                    _resolve(r, folder, pattern.format(v=version))
                    for pattern in _INITRDS
                    if pattern.format(v=version) in names
                ),
                None,
            )
            found[version] = Candidate(version, fs, kernel, initrd)
    return list(found.values())


def root_of(image: Path, systems: list[Filesystem]) -> Filesystem | None:
    """The root filesystem: the (first) ext filesystem with an /etc."""
    for fs in systems:
        if fs.kind != "ext":
            continue
        listing = reader(image, fs).list_dir("/") or []
        if any(e.name == "etc" and e.kind == "dir" for e in listing):
            return fs
    return None


def scan(image: Path, out: Path, kernel: str | None = None) -> BootScan:
    """Look for kernels in ``image`` and copy the chosen pair to ``out``/vmlinuz and
    ``out``/initrd. A problem (nothing found, an unreadable filesystem) is reported in the
    result, never raised: the version then boots by sanboot."""
    result = BootScan()
    try:
        systems = filesystems(image)
        if not systems:
            result.problem = (
                "no ext2/3/4 or vfat filesystem was found (as the whole disk or in an MBR/GPT "
                "partition)"
            )
            return result
        candidates: list[Candidate] = []
        unreadable: list[str] = []
        for fs in systems:
            try:
                candidates += kernels_in(image, fs)
            except ScanError as exc:
                unreadable.append(str(exc))
        result.kernels = sorted({c.version for c in candidates}, key=version_key)
        usable = sorted((c for c in candidates if c.initrd), key=lambda c: version_key(c.version))
        for c in candidates:
            if not c.initrd:
                result.warnings.append(f"kernel {c.version} has no initramfs beside it: skipped")
        if not usable:
            where = "; ".join(unreadable) if unreadable else ""
            result.problem = where or (
                f"kernels {', '.join(result.kernels)} have no initramfs (initrd.img-VERSION "
                "or initramfs-VERSION.img) beside them"
                if result.kernels
                else "no vmlinuz-VERSION in /boot or / of any filesystem"
            )
            return result
        chosen = usable[-1]
        result.chosen_by = "newest"
        if kernel:
            picked = [c for c in usable if c.version == kernel]
            if picked:
                chosen, result.chosen_by = picked[0], "operator"
            else:
                result.warnings.append(
                    f"the chosen kernel {kernel} is not in this version (with an initramfs): "
                    f"booting the newest, {chosen.version}"
                )
        root = root_of(image, systems)
        if root is None:
            result.problem = "no root filesystem (an ext filesystem with /etc) was found"
            return result
        result.root = "whole" if root.whole else f"UUID={root.uuid}"
        result.root_fstype = "ext4"  # the ext4 driver mounts ext2 and ext3 as well
        _copy_pair(image, chosen, out)
        result.kernel_version = chosen.version
    except (ScanError, OSError) as exc:
        result.problem = str(exc) if isinstance(exc, ScanError) else f"unreadable image: {exc}"
        result.kernel_version = result.root = result.chosen_by = None
        for name in ("vmlinuz", "initrd"):
            (out / name).unlink(missing_ok=True)  # nothing half-copied
    return result


def _copy_pair(image: Path, chosen: Candidate, out: Path) -> None:
    assert chosen.initrd is not None
    out.mkdir(parents=True, exist_ok=True)
    r = reader(image, chosen.fs)
    with tempfile.TemporaryDirectory(dir=out, prefix=".copy-") as tmp:
        for path, name in ((chosen.kernel, "vmlinuz"), (chosen.initrd, "initrd")):
            dest = Path(tmp) / name
            r.copy(path, dest)
            size = dest.stat().st_size
            if size == 0 or size > MAX_FILE_BYTES:
                raise ScanError(f"{path} in {chosen.fs.where} is {size} bytes: not a {name}")
            dest.chmod(0o644)
            shutil.move(dest, out / name)
