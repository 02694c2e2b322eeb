"""Finding kernels in disk images the test builds with the real tools: sfdisk (MBR, GPT,
logical partitions), mke2fs -d (ext4 with a /boot tree, no mount) and mkfs.vfat + mcopy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from shared.boot_files import compare_versions, scan
from shared.partitions import read_partitions

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("sfdisk", "mke2fs", "debugfs", "mkfs.vfat", "mcopy")),
    reason="needs fdisk (sfdisk), e2fsprogs, dosfstools and mtools",
)
MIB = 1 << 20


def run(*argv: str, stdin: str | None = None) -> str:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True).stdout


def disk(path: Path, size_mib: int, table: str) -> Path:
    with open(path, "wb") as f:
        f.truncate(size_mib * MIB)
    run("sfdisk", "-q", str(path), stdin=table)
    return path


def sfdisk_parts(path: Path) -> list[tuple[int, int]]:
    """Where sfdisk says the partitions are (the extended container left out)."""
    table = json.loads(run("sfdisk", "--json", str(path)))["partitiontable"]
    return [(p["start"] * 512, p["size"] * 512) for p in table["partitions"] if p["type"] != "5"]


def tree(root: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    for rel, target in (links or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, root / rel)
    return root


def ext4(image: Path, offset: int, size: int, source: Path) -> str:
    run("mke2fs", "-q", "-t", "ext4", "-d", str(source), "-E", f"offset={offset}",
        str(image), f"{size // 1024}k")  # fmt: skip
    # The UUID as e2fsprogs reports it (not the reader's own superblock parsing).
    head = run("dumpe2fs", "-h", f"{image}?offset={offset}")
    return next(
        x.split(":", 1)[1].strip() for x in head.splitlines() if x.startswith("Filesystem UUID")
    )


DEBIAN = {
    "boot/vmlinuz-6.1.0-9-amd64": b"kernel 9",
    "boot/initrd.img-6.1.0-9-amd64": b"initrd 9",
    "boot/vmlinuz-6.1.0-12-amd64": b"kernel 12" * 1000,
    "boot/initrd.img-6.1.0-12-amd64": b"initrd 12" * 3000,
    "boot/config-6.1.0-12-amd64": b"CONFIG_X=y",
    "etc/os-release": b"ID=debian\n",
}


def test_versions_sort_like_dpkg() -> None:
    assert compare_versions("6.1.0-12-amd64", "6.1.0-9-amd64") > 0
    assert compare_versions("6.10.0", "6.9.3") > 0
    assert compare_versions("6.1~rc1", "6.1") < 0
    assert compare_versions("6.5.6-300.fc39.x86_64", "6.5.6-300.fc39.x86_64") == 0
    assert compare_versions("0-rescue-abc", "5.14.0-362.el9.x86_64") < 0


def test_gpt_ext4_picks_the_newest_debian_kernel(tmp_path: Path) -> None:
    image = disk(tmp_path / "gpt.img", 40, "label: gpt\nstart=2048, size=8192, type=uefi\n"
                 "start=10240, size=61440, type=linux\n")  # fmt: skip
    parts = read_partitions(image)
    assert parts is not None
    assert [(p.start, p.size) for p in parts] == sfdisk_parts(image)
    ids = json.loads(run("sfdisk", "--json", str(image)))["partitiontable"]["partitions"]
    assert [p.partuuid for p in parts] == [p["uuid"].lower() for p in ids]
    root = tree(tmp_path / "root", DEBIAN, {"vmlinuz": "boot/vmlinuz-6.1.0-12-amd64"})
    fs_uuid = ext4(image, parts[1].start, parts[1].size, root)

    found = scan(image, tmp_path / "out")
    assert found.problem is None, found
    assert found.kernel_version == "6.1.0-12-amd64" and found.chosen_by == "newest"
    assert found.kernels == ["6.1.0-9-amd64", "6.1.0-12-amd64"]
    assert found.root == f"UUID={fs_uuid}"
    assert (tmp_path / "out" / "vmlinuz").read_bytes() == DEBIAN["boot/vmlinuz-6.1.0-12-amd64"]
    assert (tmp_path / "out" / "initrd").read_bytes() == DEBIAN["boot/initrd.img-6.1.0-12-amd64"]

    picked = scan(image, tmp_path / "picked", kernel="6.1.0-9-amd64")
    assert picked.kernel_version == "6.1.0-9-amd64" and picked.chosen_by == "operator"
    assert (tmp_path / "picked" / "vmlinuz").read_bytes() == b"kernel 9"
    absent = scan(image, tmp_path / "absent", kernel="5.10.0-1-amd64")
    assert absent.kernel_version == "6.1.0-12-amd64" and absent.chosen_by == "newest"
    assert any("5.10.0-1-amd64" in w for w in absent.warnings)


def test_mbr_with_a_vfat_boot_partition_and_logical_ext4_root(tmp_path: Path) -> None:
    image = disk(
        tmp_path / "mbr.img", 48,
        "label: dos\nstart=2048, size=32768, type=c, bootable\n"
        "start=34816, type=5\nstart=36864, size=40960, type=83\n",
    )  # fmt: skip
    parts = read_partitions(image)
    assert parts is not None
    assert [(p.start, p.size) for p in parts] == sfdisk_parts(image)
    assert [p.number for p in parts] == [1, 5]
    boot, root_part = parts
    run("mkfs.vfat", "-F", "16", "--offset", str(boot.start // 512), str(image),
        str(boot.size // 1024))  # fmt: skip
    src = tree(tmp_path / "bootfs", {
        "vmlinuz-6.5.6-300.fc39.x86_64": b"fedora kernel",
        "initramfs-6.5.6-300.fc39.x86_64.img": b"dracut initramfs",
    })  # fmt: skip
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    subprocess.run(["mcopy", "-i", f"{image}@@{boot.start}", *map(str, src.iterdir()), "::/"],
                   check=True, env=env)  # fmt: skip
    fs_uuid = ext4(image, root_part.start, root_part.size, tree(tmp_path / "r", {"etc/x": b"1"}))

    found = scan(image, tmp_path / "out")
    assert found.kernel_version == "6.5.6-300.fc39.x86_64", found
    assert found.root == f"UUID={fs_uuid}"
    assert (tmp_path / "out" / "initrd").read_bytes() == b"dracut initramfs"


def test_a_whole_disk_filesystem_is_the_root(tmp_path: Path) -> None:
    image = tmp_path / "whole.img"
    image.write_bytes(b"")
    os.truncate(image, 16 * MIB)
    ext4(image, 0, 16 * MIB, tree(tmp_path / "r", DEBIAN))
    found = scan(image, tmp_path / "out")
    assert found.kernel_version == "6.1.0-12-amd64" and found.root == "whole"


def test_no_kernel_and_unreadable_filesystems_are_told_not_raised(tmp_path: Path) -> None:
    image = disk(tmp_path / "none.img", 16, "label: dos\nstart=2048, type=83\n")
    [part] = read_partitions(image) or []
    ext4(
        image,
        part.start,
        part.size,
        tree(tmp_path / "r", {"etc/x": b"1", "boot/vmlinuz-1.0": b"k"}),
    )
    found = scan(image, tmp_path / "out")
    assert found.kernel_version is None and found.kernels == ["1.0"]
    assert found.problem and "no initramfs" in found.problem

    blank = disk(tmp_path / "blank.img", 8, "label: gpt\nstart=2048, type=linux\n")
    found = scan(blank, tmp_path / "out2")
    assert found.kernel_version is None and "no ext2/3/4 or vfat" in (found.problem or "")

    # An ext superblock magic over garbage: debugfs cannot open it, and says so.
    with open(image, "r+b") as f:
        f.seek(part.start + 1024)
        f.write(os.urandom(56))
    found = scan(image, tmp_path / "out3")
    assert found.kernel_version is None and "cannot be read" in (found.problem or ""), found
    assert not (tmp_path / "out3" / "vmlinuz").exists()
    assert read_partitions(tmp_path / "none.img") is not None
