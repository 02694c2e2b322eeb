"""The local vdisk store: import an image into ``<root>/<name>/`` as a version's layer.

Importing is two steps so that nothing is ever half-written:

1. :func:`stage_version` (run by the importing CLI, on the registry's machine) checks the
   source, converts it to raw if needed (``qemu-img convert``), hashes it and writes the new
   layer into a private staging dir ``<root>/<name>/.staging-<random>/``: version 1 as the
   raw base ``v1.raw``, later versions as a delta ``vN.map``/``vN.data`` over the parent
   chain (``shared.vdisk_layout.write_delta``: only the changed blocks).
2. :func:`commit_staged` (run by the registry, under its append lock, right before appending
   ``VdiskVersionPublished``) moves the files into place. If the decision or the append
   fails, the staging dir is dropped and the store is as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared import boot_files
from shared.errors import DomainError, invalid, not_found
from shared.identity import check_name
from shared.layer_paths import LayerPathError, check_layer_file
from shared.vdisk_layout import DEFAULT_BLOCK_SIZE, delta_paths, open_chain, write_delta

CHUNK = 4 * 1024 * 1024
SECTOR = 512
STAGING_PREFIX = ".staging-"
# A vdisk's files and folder: written by the registry's user; read by the stream and cache
# services, which run as that user here and in compose, or under another user in its group
# (a store shared read-only with data-plane machines); never by everyone.
FILE_MODE = 0o640
DIR_MODE = 0o750
# (phase, done, total): phase is "convert", "copy", "hash" or "delta".
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class StagedVersion:
    name: str
    version: int
    staging: str  # the staging dir's name inside <root>/<name>/
    layer: str  # the layer's store-relative path once committed
    size: int
    checksum: str
    changed_blocks: int
    block_size: int
    # What it holds to boot kernel-direct (boot_files.BootScan): the record for the
    # registry, and warnings for the operator; the files are in the staging dir's boot/.
    boot: dict[str, object] | None = None
    boot_warnings: tuple[str, ...] = ()


def _no_progress(_phase: str, _done: int, _total: int) -> None:
    pass


def image_format(path: Path) -> tuple[str, int]:
    """``(format, virtual size)`` of a disk image, or an error naming what is wrong."""
    if not path.exists():
        raise not_found(f"no such file: {path}")
    if not path.is_file():
        raise invalid(f"{path} is not a regular file")
    try:
        out = subprocess.run(
            ["qemu-img", "info", "--output=json", str(path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
    except FileNotFoundError:
        raise DomainError("qemu-img is not installed (Debian package qemu-utils)") from None
    except subprocess.CalledProcessError as exc:
        raise invalid(f"{path} is not a disk image: {exc.stderr.strip()}") from None
    info = json.loads(out.stdout)
    fmt, size = info.get("format", "?"), int(info.get("virtual-size", 0))
    if fmt == "raw":
        size = path.stat().st_size  # qemu-img rounds a raw file's size up to a sector
    if fmt == "raw" and (size == 0 or size % SECTOR):
        # Every file "is" raw to qemu-img; a real disk is whole sectors and not empty.
        raise invalid(
            f"{path} is not a disk image: {size} bytes is not a non-zero multiple of "
            f"{SECTOR} (raw images are whole sectors; qcow2 and other formats are detected)"
        )
    return fmt, size


def new_staging(root: Path, name: str) -> Path:
    """A fresh private staging dir for an import of ``name``."""
    check_name(name)
    vdir = root / name
    vdir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    staging = vdir / f"{STAGING_PREFIX}{secrets.token_hex(8)}"
    # Nobody else gets in while files are made there with whatever mode their tool gives.
    staging.mkdir(mode=0o700)
    return staging


def _seal(files: list[Path]) -> None:
    """The staged files as they will be served (their mode travels with the rename)."""
    for f in files:
        os.chmod(f, FILE_MODE)


def stage_version(
    root: Path,
    name: str,
    source: Path,
    version: int,
    parent_chain: list[Path],
    progress: Progress = _no_progress,
    kernel: str | None = None,
) -> StagedVersion:
    """Write version ``version`` of ``name`` from ``source`` into a staging dir, with the
    kernel and initramfs found in it (``kernel``: the operator's pick of version)."""
    check_name(name)
    source = Path(source)
    fmt, size = image_format(source)
    if version > 1 and not parent_chain:
        raise invalid(f"version {version} of {name!r} needs its parent chain")
    staging = new_staging(root, name)
    try:
        raw = source
        if fmt != "raw":
            raw = staging / "converted.raw"
            _convert(source, fmt, raw, size, progress)
        if version == 1:
            base = staging / "v1.raw"
            if raw == source:
                checksum = _copy_sparse(source, base, size, progress)
            else:
                raw.rename(base)
                checksum = hash_file(base, size, progress)
            _seal([base])
            found = scan_boot_files(base, staging, kernel, progress)
            return StagedVersion(
                name=name,
                version=1,
                staging=staging.name,
                layer=f"{name}/v1.raw",
                size=size,
                checksum=f"sha256:{checksum}",
                changed_blocks=-(-size // DEFAULT_BLOCK_SIZE),
                block_size=DEFAULT_BLOCK_SIZE,
                boot=found.record(),
                boot_warnings=tuple(found.warnings),
            )
        found = scan_boot_files(raw, staging, kernel, progress)
        staged = delta_version(
            staging, name, raw, version, parent_chain, progress, temporary=raw != source,
            unchanged=f"{source} is identical to version {version - 1} of {name!r}: no new version",
        )  # fmt: skip
        return with_boot_files(staged, found)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def scan_boot_files(
    image: Path, staging: Path, kernel: str | None, progress: Progress
) -> boot_files.BootScan:
    """Find the version's kernel and initramfs in its full image, copied to staging/boot."""
    progress("boot files", 0, 1)
    found = boot_files.scan(image, staging / "boot", kernel)
    progress("boot files", 1, 1)
    return found


def with_boot_files(staged: StagedVersion, found: boot_files.BootScan) -> StagedVersion:
    return dataclasses.replace(staged, boot=found.record(), boot_warnings=tuple(found.warnings))


def delta_version(
    staging: Path,
    name: str,
    image: Path,
    version: int,
    parent_chain: list[Path],
    progress: Progress,
    *,
    temporary: bool,
    unchanged: str,
) -> StagedVersion:
    """Stage version ``version`` as the delta of a full raw ``image`` over its parent chain
    (``temporary``: the image is staging scratch, removed afterwards)."""
    size = image.stat().st_size
    checksum = hash_file(image, size, progress)
    progress("delta", 0, size)
    changed = write_delta(parent_chain, image, staging / f"v{version}")
    progress("delta", size, size)
    if temporary:
        image.unlink()
    if changed == 0:
        raise invalid(unchanged)
    _seal(list(delta_paths(staging / f"v{version}")))
    return StagedVersion(
        name=name,
        version=version,
        staging=staging.name,
        layer=f"{name}/v{version}.map",
        size=size,
        checksum=f"sha256:{checksum}",
        changed_blocks=changed,
        block_size=_delta_block_size(staging / f"v{version}.map"),
    )


def materialise(layers: list[Path], out: Path, progress: Progress = _no_progress) -> int:
    """Write a version chain out as one sparse raw image (the base of a maintenance commit)."""
    zero = bytes(CHUNK)
    with open_chain(layers) as chain, open(out, "wb") as f:
        size = chain.size
        for offset in range(0, size, CHUNK):
            data = chain.pread(offset, min(CHUNK, size - offset))
            if data != zero[: len(data)]:
                os.pwrite(f.fileno(), data, offset)
            progress("copy", offset + len(data), size)
        f.truncate(size)
    return size


def staged_files(root: Path, name: str, staging: str) -> list[Path]:
    if not staging.startswith(STAGING_PREFIX) or "/" in staging or ".." in staging:
        raise invalid(f"bad staging dir name {staging!r}")
    sdir = root / name / staging
    if not sdir.is_dir():
        raise not_found(f"staged import {staging!r} of {name!r} not found in {root}")
    return sorted(p for p in sdir.iterdir() if p.is_file())


def commit_staged(root: Path, name: str, staging: str, layer: str) -> list[Path]:
    """Move a staged version's files into place; returns the final paths (for undo)."""
    files = staged_files(root, name, staging)
    want = {Path(layer).name}
    if layer.endswith(".map"):
        want.add(delta_paths(Path(layer).with_suffix(""))[1].name)
    have = {p.name for p in files}
    if want - have:
        raise invalid(f"staged import {staging!r} lacks {sorted(want - have)}")
    moved = []
    for fname in sorted(want):
        final = root / name / fname
        if final.exists():
            raise DomainError(f"{final} already exists: the store and the log disagree", "conflict")
        (root / name / staging / fname).rename(final)
        moved.append(final)
    shutil.rmtree(root / name / staging, ignore_errors=True)
    return moved


BOOT_FILES = ("vmlinuz", "initrd")


def boot_dir(root: Path, name: str, version: int) -> Path:
    """Where a version's kernel and initramfs are kept (the boot service serves them)."""
    return root / name / "boot" / f"v{version}"


def staged_boot_files(root: Path, name: str, staging: str) -> dict[str, object]:
    """Sizes and sha256 of the kernel and initramfs an import staged in ``boot/`` (the
    registry's own reading, not the importer's word); a lone or odd file is refused."""
    staged_files(root, name, staging)  # checks the staging dir's name
    sdir = root / name / staging / "boot"
    found: dict[str, object] = {}
    for fname in BOOT_FILES:
        path = sdir / fname
        if path.is_symlink() or not path.is_file():
            raise invalid(f"staged import {staging!r} of {name!r} lacks its boot file {fname}")
        found[f"{'kernel' if fname == 'vmlinuz' else 'initrd'}_size"] = path.stat().st_size
        found[f"{'kernel' if fname == 'vmlinuz' else 'initrd'}_sha256"] = hash_file(
            path, path.stat().st_size, _no_progress
        )
    return found


def commit_boot_files(root: Path, name: str, staging: str, version: int) -> list[Path]:
    """Move a staged version's boot files into place; returns them (for undo)."""
    target = boot_dir(root, name, version)
    if target.exists():
        raise DomainError(f"{target} already exists: the store and the log disagree", "conflict")
    target.mkdir(parents=True)
    moved = []
    for fname in BOOT_FILES:
        final = target / fname
        (root / name / staging / "boot" / fname).rename(final)
        final.chmod(0o644)
        moved.append(final)
    return moved


def discard_staged(root: Path, name: str, staging: str) -> None:
    try:
        staged_files(root, name, staging)
    except DomainError:
        return
    shutil.rmtree(root / name / staging, ignore_errors=True)


def remove_files(root: Path, name: str) -> None:
    """Drop a removed vdisk's folder (after its removal is in the log)."""
    check_name(name)
    shutil.rmtree(root / name, ignore_errors=True)


def drop_stale_staging(root: Path, max_age_s: float = 24 * 3600) -> list[Path]:
    """Remove staging dirs left by imports that died (older than ``max_age_s``: a running
    import of a big image may be staging right now)."""
    import time

    dropped = []
    for sdir in root.glob(f"*/{STAGING_PREFIX}*"):
        try:
            if time.time() - sdir.stat().st_mtime > max_age_s:
                shutil.rmtree(sdir, ignore_errors=True)
                dropped.append(sdir)
        except FileNotFoundError:
            pass
    return dropped


def layer_paths(root: Path, name: str, layers: list[str]) -> list[str]:
    """The files of a vdisk's layers (store-relative paths from the log) in the vdisk dir;
    one that would lie outside the vdisk's own folder is refused."""
    try:
        return [str(check_layer_file(root / rel, name, root)) for rel in layers]
    except LayerPathError as exc:
        raise invalid(str(exc)) from None


# --- helpers ---------------------------------------------------------------------------

_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def _convert(source: Path, fmt: str, out: Path, size: int, progress: Progress) -> None:
    proc = subprocess.Popen(
        ["qemu-img", "convert", "-p", "-f", fmt, "-O", "raw", str(source), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    buf = b""
    while chunk := proc.stdout.read1(4096):
        buf = (buf + chunk)[-256:]
        found = _PROGRESS.findall(buf)
        if found:
            progress("convert", int(float(found[-1]) / 100 * size), size)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.wait() != 0:
        raise invalid(f"qemu-img could not convert {source} ({fmt}): {err.strip()}")
    progress("convert", size, size)


def _copy_sparse(source: Path, dest: Path, size: int, progress: Progress) -> str:
    """Copy and hash in one pass; all-zero chunks become holes (images are mostly empty)."""
    digest = hashlib.sha256()
    zero = bytes(CHUNK)
    done = 0
    with open(source, "rb") as src, open(dest, "wb") as out:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            if chunk == zero[: len(chunk)]:
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
            done += len(chunk)
            progress("copy", done, size)
        out.truncate(done)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def hash_file(path: Path, size: int, progress: Progress) -> str:
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as src:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            done += len(chunk)
            progress("hash", done, size)
    return digest.hexdigest()


def _delta_block_size(map_path: Path) -> int:
    from shared.vdisk_layout import HEADER

    _magic, _fmt, block_size, _size, _count = HEADER.unpack_from(map_path.read_bytes())
    return block_size
